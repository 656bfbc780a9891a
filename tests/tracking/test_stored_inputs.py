"""A stored model carries how its input images are stored, so it scales raw input itself (spec 9)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from tracking_helpers import ENCODER, tiny_config

from cromss_ray.data.scaling import network_input
from cromss_ray.config import FinetuneConfig
from cromss_ray.data.schema import DW_CLASSES, S1_BAND_NAMES, S2_BAND_NAMES, ModalitySpec, ShardMetadata
from cromss_ray.method import build_model
from cromss_ray.models.segmenter import PRODUCT_INPUTS, predict_array, product_input
from cromss_ray.models.stored import (
    CONFIG_FILE,
    INPUTS_FILE,
    SHARDS_FILE,
    WEIGHTS_FILE,
    ModelInputs,
    PretrainedModel,
    load_stored,
    save_stored,
    transfer_network,
)

SIZE = 32


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(5)
    return build_model("mid", ENCODER, s2_bands=13, classes=9).eval()


def _raw(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "s1": rng.uniform(-30, 5, size=(2, SIZE, SIZE)).astype(np.float32),
        "s2": rng.integers(0, 6000, size=(13, SIZE, SIZE)).astype(np.uint16),
    }


def _load(folder: Path) -> PretrainedModel:
    stored = load_stored(folder / WEIGHTS_FILE, folder / CONFIG_FILE, None, folder / INPUTS_FILE)
    assert isinstance(stored, PretrainedModel)
    return stored


def test_a_stored_pretrained_model_scales_raw_products_itself(network, tmp_path: Path):
    files = save_stored(tmp_path, network, tiny_config())
    assert set(files) == {WEIGHTS_FILE, CONFIG_FILE, INPUTS_FILE}
    segmenter = _load(tmp_path).segmenter()
    assert dict(segmenter.inputs) == PRODUCT_INPUTS
    raw = _raw()
    by_hand = {modality: network_input(image, PRODUCT_INPUTS[modality]) for modality, image in raw.items()}
    expected = predict_array(segmenter, **by_hand, tile=SIZE)
    from_raw = predict_array(segmenter, **raw, tile=SIZE, stored=True)
    np.testing.assert_array_equal(from_raw.probabilities, expected.probabilities)


def test_a_model_stored_for_v8_codes_predicts_what_the_physical_one_does(network, tmp_path: Path):
    """The released uint8 codes are the raw products' rule x 255: the same class map, pixel for pixel."""
    (tmp_path / "physical").mkdir()
    (tmp_path / "v8").mkdir()
    save_stored(tmp_path / "physical", network, tiny_config())
    v8 = ModelInputs(s1=product_input("s1", "v8"), s2=product_input("s2", "v8"))
    save_stored(tmp_path / "v8", network, tiny_config(), inputs=v8)
    raw = _raw(1)
    codes = {
        modality: np.rint(network_input(image, PRODUCT_INPUTS[modality]) * 255).astype(np.uint8)
        for modality, image in raw.items()
    }
    from_raw = predict_array(_load(tmp_path / "physical").segmenter(), **raw, tile=SIZE, stored=True)
    from_codes = predict_array(_load(tmp_path / "v8").segmenter(), **codes, tile=SIZE, stored=True)
    np.testing.assert_array_equal(from_raw.classes, from_codes.classes)
    np.testing.assert_array_equal(from_raw.probabilities, from_codes.probabilities)


def test_a_fine_tuned_model_reads_inputs_stored_like_its_shards(tmp_path: Path):
    config = FinetuneConfig.model_validate({"model": {"encoder": ENCODER, "branch": "s2"}, "data": {"s2_bands": 9}})
    meta = ShardMetadata(
        kind="dw",
        classes=DW_CLASSES,
        seasons=1,
        s1=ModalitySpec(dtype="float32", bands=S1_BAND_NAMES, unit="dB", representation="physical"),
        s2=ModalitySpec(dtype="uint8", bands=S2_BAND_NAMES, representation="v8"),
    )
    save_stored(tmp_path, transfer_network(config, len(DW_CLASSES)), config, meta)
    assert not (tmp_path / INPUTS_FILE).exists()
    stored = load_stored(tmp_path / WEIGHTS_FILE, tmp_path / CONFIG_FILE, tmp_path / SHARDS_FILE)
    assert stored.segmenter().inputs == {"s1": meta.s1, "s2": meta.s2}


def test_missing_or_broken_inputs_files_are_named(network, tmp_path: Path):
    save_stored(tmp_path, network, tiny_config())
    with pytest.raises(ValueError, match=r"has no inputs\.json: it was stored before"):
        load_stored(tmp_path / WEIGHTS_FILE, tmp_path / CONFIG_FILE)
    (tmp_path / INPUTS_FILE).write_text('{"s1": {"dtype": "float32", "bands": ["VV", "VH"], "unit": "dB"}}')
    with pytest.raises(ValueError, match=rf"(?s){re.escape(str(tmp_path / INPUTS_FILE))}: .*s1 does not say"):
        _load(tmp_path)
