"""The single-modality baseline as a registered model (spec 11): stored and loaded back, predicted
through the pyfunc from its one modality, its encoder pulled for a transfer run and exported (no Ray)."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch
from tracking_helpers import ENCODER, tiny_config, unique

from cromss_ray.cli import main
from cromss_ray.config import ConfigError, FinetuneConfig, build_config
from cromss_ray.method import SingleModalityNet, build_segmentation_model, build_single_model, load_encoder_state
from cromss_ray.models.segmenter import PRODUCT_INPUTS, predict_array
from cromss_ray.tracking.pyfunc import log_pretrained_model
from cromss_ray.tracking.registry import load_pretrained, using_tracking_uri
from cromss_ray.tracking.runs import RunTracker
from cromss_ray.train.finetune import resolve_init

SIZE = 64
CLASSES = 9


def test_a_single_modality_model_registers_predicts_and_transfers_its_encoder(store, tmp_path, capsys):
    torch.manual_seed(3)
    model = build_single_model("s2", ENCODER, bands=13, classes=CLASSES).eval()
    config = tiny_config(model={"fusion": "single", "modality": "s2"})
    name = unique(config.registry_name())
    assert name.startswith("cromss-single-s2-13b-")
    with RunTracker.start(config, tracking_uri=store, experiment=unique("pretrain"), run_name="single") as tracker:
        version = log_pretrained_model(model, config, tracker=tracker, registry_name=name, aliases=["latest"], epoch=1)
    uri = f"models:/{name}/{version}"

    pulled = load_pretrained(uri, tracking_uri=store)
    assert isinstance(pulled.model, SingleModalityNet) and pulled.model.modality == "s2"
    for key, value in model.state_dict().items():
        torch.testing.assert_close(pulled.model.state_dict()[key], value)
    segmenter = pulled.segmenter()
    assert segmenter.branch == "s2" and segmenter.modalities == ("s2",)
    for other in ("s1", "fused"):
        with pytest.raises(ValueError, match="single-modality|two-branch"):
            pulled.segmenter(other)

    # the pyfunc takes the raw S2 product alone and scales it itself (spec 9)
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 4000, (2, 13, SIZE, SIZE)).astype(np.float32)
    with using_tracking_uri(store):
        pyfunc = mlflow.pyfunc.load_model(uri)
    assert [spec.name for spec in pyfunc.metadata.get_input_schema().inputs] == ["s2"]
    outputs = pyfunc.predict({"s2": raw})
    assert set(outputs) == {"classes", "probabilities"}
    assert outputs["probabilities"].shape == (2, CLASSES, SIZE, SIZE)
    for index in range(2):
        expected = predict_array(segmenter, s2=raw[index], tile=SIZE, stored=True)
        np.testing.assert_allclose(outputs["probabilities"][index], expected.probabilities, atol=1e-5)
    assert segmenter.inputs["s2"] == PRODUCT_INPUTS["s2"]

    # transfer: the S2 encoder initialises a fresh network; there is no S1 encoder to take
    transfer = build_config(FinetuneConfig, {"model": {"init": uri, "branch": "s2"}, "tracking": {"uri": store}})
    init = resolve_init(transfer)
    assert init.source.fusion == "single" and init.source.encoder == ENCODER
    network = build_segmentation_model("FPN", ENCODER, in_channels=13, classes=4)
    load_encoder_state(network, init.encoder_state)
    for key, value in model.encoder.state_dict().items():
        torch.testing.assert_close(network.encoder.state_dict()[key], value)
    with pytest.raises(ConfigError, match=r"model.branch: 's1'.*single-modality S2 baseline: it has no S1 encoder"):
        resolve_init(transfer.model_copy(update={"model": transfer.model.model_copy(update={"branch": "s1"})}))

    # cromss export: its one encoder, and a clear refusal of the other
    out = tmp_path / "encoder.pt"
    assert main(["export", "--model", uri, "--branch", "s2", "--out", str(out), "--tracking-uri", store]) == 0
    assert "13 input bands" in capsys.readouterr().out
    assert torch.load(out, weights_only=True).keys() == model.encoder.state_dict().keys()
    missing = tmp_path / "s1.pt"
    assert main(["export", "--model", uri, "--branch", "s1", "--out", str(missing), "--tracking-uri", store]) == 1
    assert "single-modality S2 network has no S1 encoder" in capsys.readouterr().err
    assert not missing.exists()
