"""The pyfunc model: padding and cropping, outputs, signature, registration, aliases, a fresh-process load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from mlflow.models import Model
from tracking_helpers import ENCODER, tiny_config, unique

from cromss_ray.config import PretrainConfig, TuneConfig
from cromss_ray.method import build_model, fused_probabilities
from cromss_ray.tracking import set_alias
from cromss_ray.data.scaling import network_input
from cromss_ray.models.segmenter import NODATA, PRODUCT_INPUTS, predict_maps, product_input
from cromss_ray.tracking.pyfunc import example_input, log_pretrained_model, model_signature
from cromss_ray.tracking.runs import RunTracker
from cromss_ray.models.stored import check_matches_config, pretrain_part


@pytest.fixture(scope="module")
def late_model():
    torch.manual_seed(1)
    return build_model("late", ENCODER, s2_bands=3, classes=4).eval()


def _inputs(n: int, height: int, width: int, s2_bands: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    s1 = rng.standard_normal((n, 2, height, width), dtype=np.float32)
    s2 = rng.random((n, s2_bands, height, width), dtype=np.float32)
    return s1, s2


def test_multiples_of_the_stride_give_the_plain_forward_pass(late_model):
    s1, s2 = _inputs(2, 64, 32, 3)
    outputs = predict_maps(late_model, s1, s2)
    with torch.no_grad():
        z1, z2 = late_model(torch.from_numpy(s1), torch.from_numpy(s2))
    fused = fused_probabilities(z1, z2)
    assert np.allclose(outputs["probabilities"], fused.numpy(), atol=1e-6)
    assert np.allclose(outputs["s1_probabilities"], torch.softmax(z1, 1).numpy(), atol=1e-6)
    assert np.allclose(outputs["s2_probabilities"], torch.softmax(z2, 1).numpy(), atol=1e-6)
    assert np.array_equal(outputs["classes"], fused.argmax(1).numpy())


def test_other_sizes_are_padded_by_edge_repetition_and_cropped_back(late_model):
    s1, s2 = _inputs(3, 37, 50, 3)
    outputs = predict_maps(late_model, s1, s2, batch_size=2)
    assert {key: value.shape for key, value in outputs.items()} == {
        "classes": (3, 37, 50),
        "probabilities": (3, 4, 37, 50),
        "s1_classes": (3, 37, 50),
        "s1_probabilities": (3, 4, 37, 50),
        "s2_classes": (3, 37, 50),
        "s2_probabilities": (3, 4, 37, 50),
    }
    assert outputs["classes"].dtype == np.int64 and outputs["probabilities"].dtype == np.float32
    padded1 = np.pad(s1, ((0, 0), (0, 0), (0, 27), (0, 14)), mode="edge")
    padded2 = np.pad(s2, ((0, 0), (0, 0), (0, 27), (0, 14)), mode="edge")
    with torch.no_grad():
        z1, z2 = late_model(torch.from_numpy(padded1), torch.from_numpy(padded2))
    expected = fused_probabilities(z1, z2)[..., :37, :50].numpy()
    assert np.allclose(outputs["probabilities"], expected, atol=1e-6)
    assert np.allclose(outputs["probabilities"].sum(axis=1), 1.0, atol=1e-5)
    branch_mean = (outputs["s1_probabilities"] + outputs["s2_probabilities"]) / 2
    assert np.allclose(outputs["probabilities"], branch_mean, atol=1e-6)
    assert np.array_equal(outputs["s2_classes"], outputs["s2_probabilities"].argmax(axis=1))


def test_batch_size_does_not_change_the_result(late_model):
    s1, s2 = _inputs(3, 40, 40, 3)
    one, all_at_once = predict_maps(late_model, s1, s2, batch_size=1), predict_maps(late_model, s1, s2, batch_size=8)
    assert all(np.allclose(one[key], all_at_once[key], atol=1e-5) for key in one)


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        (((1, 3, 32, 32), (1, 3, 32, 32)), r"input 's1' must be \(N, 2, H, W\)"),
        (((1, 2, 32, 32), (1, 13, 32, 32)), r"input 's2' must be \(N, 3, H, W\)"),
        (((1, 2, 32, 32), (2, 3, 32, 32)), "differ in N, H or W"),
        (((1, 2, 32, 32), (1, 3, 32, 64)), "differ in N, H or W"),
    ],
)
def test_mismatched_inputs_are_named(late_model, shapes, message):
    s1, s2 = (np.zeros(shape, np.float32) for shape in shapes)
    with pytest.raises(ValueError, match=message):
        predict_maps(late_model, s1, s2)


def test_signature_has_named_tensors_with_free_batch_and_image_size():
    signature = model_signature(classes=9)
    assert signature.inputs.input_names() == ["s1", "s2"]
    assert [spec.shape for spec in signature.inputs.inputs] == [(-1, 2, -1, -1), (-1, -1, -1, -1)]
    assert [spec.type for spec in signature.inputs.inputs] == [np.dtype(np.float32)] * 2
    outputs = {spec.name: (spec.type, spec.shape) for spec in signature.outputs.inputs}
    assert outputs["classes"] == (np.dtype(np.int64), (-1, -1, -1))
    assert outputs["s1_probabilities"] == (np.dtype(np.float32), (-1, 9, -1, -1))
    assert signature.params.to_dict() == [
        {"name": "batch_size", "type": "long", "default": 8, "shape": None},
        {"name": "s1_bands", "type": "string", "default": [], "shape": (-1,)},
        {"name": "s2_bands", "type": "string", "default": [], "shape": (-1,)},
    ]


def test_the_stored_example_is_one_small_float32_image():
    example = example_input(13, {"s1": torch.ones(4, 2, 64, 64, dtype=torch.float64), "s2": np.ones((4, 13, 64, 64))})
    assert {key: (value.shape, value.dtype) for key, value in example.items()} == {
        "s1": ((1, 2, 32, 32), np.float32),
        "s2": ((1, 13, 32, 32), np.float32),
    }
    assert example_input(3)["s2"].shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"missing \['s2'\]"):
        example_input(3, {"s1": np.zeros((1, 2, 8, 8))})
    with pytest.raises(ValueError, match=r"input_example 's1' must be \(N, bands, H, W\)"):
        example_input(3, {"s1": np.zeros((2, 8, 8)), "s2": np.zeros((1, 3, 8, 8))})


def test_an_example_stored_otherwise_is_converted_to_the_models_inputs():
    """A pretraining run's example comes in its shards' storage (here v8 codes); the model takes raw products."""
    codes = {"s1": np.full((1, 2, 4, 4), 127, np.uint8), "s2": np.full((1, 3, 4, 4), 255, np.uint8)}
    storage = {modality: product_input(modality, "v8") for modality in codes}
    example = example_input(3, codes, storage=storage)
    np.testing.assert_allclose(example["s1"][0, :, 0, 0], [-12.54847273, -20.19237134], rtol=1e-6)  # the means
    for modality, image in example.items():
        spec = PRODUCT_INPUTS[modality].with_bands(("VV", "VH") if modality == "s1" else ("B4", "B3", "B2"))
        np.testing.assert_array_equal(network_input(image, spec), codes[modality] / np.float32(255))


def test_a_model_that_its_config_cannot_rebuild_is_refused(late_model):
    config = tiny_config(model={"fusion": "late", "classes": 4}, data={"s2_bands": 9})
    with pytest.raises(ValueError, match=r"data.s2_bands: config 9, model 3"):
        check_matches_config(late_model, config)


def test_tune_configs_are_stored_without_their_sweep():
    tune = TuneConfig.model_validate({"model": {"encoder": ENCODER}, "tune": {"num_samples": 3}})
    stored = pretrain_part(tune)
    assert type(stored) is PretrainConfig and stored.model.encoder == ENCODER


def test_registration_links_run_logged_model_version_and_aliases(registered):
    client = MlflowClient(tracking_uri=registered.store, registry_uri=registered.store)
    version = client.get_model_version_by_alias(registered.name, "best")
    assert int(version.version) == registered.version == 1
    assert version.run_id == registered.run_id and version.source.startswith("models:/m-")
    assert version.tags == {"val/s2/miou": "0.25", "epoch": "1"}
    assert "mid-fusion resnet18" in version.description
    assert set(client.get_registered_model(registered.name).aliases) == {"best"}
    assert int(client.get_model_version_by_alias(registered.name, "latest").version) == registered.version
    model_id = version.source.removeprefix("models:/")
    outputs = client.get_run(registered.run_id).outputs.model_outputs
    assert [(output.model_id, output.step) for output in outputs] == [(model_id, 1)]
    logged = client.get_logged_model(model_id)
    assert logged.source_run_id == registered.run_id and logged.params["model.encoder"] == ENCODER
    assert {metric.key for metric in logged.metrics} == {"val/s2/miou", "epoch"}


def test_the_logged_model_carries_signature_example_and_pinned_requirements(registered):
    client = MlflowClient(tracking_uri=registered.store, registry_uri=registered.store)
    location = client.get_model_version_download_uri(registered.name, str(registered.version))
    folder = location.removeprefix("file://")
    mlmodel = Model.load(folder)
    assert mlmodel.signature.inputs.input_names() == ["s1", "s2"]
    assert mlmodel.saved_input_example_info["type"] == "ndarray"
    flavor = mlmodel.flavors["python_function"]
    assert set(flavor["artifacts"]) == {"weights", "config", "inputs"} and flavor["code"] == "code"
    assert not any(name.endswith(".pkl") for name in os.listdir(folder))
    requirements = open(os.path.join(folder, "requirements.txt")).read().split()
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements
    assert any(line.startswith("segmentation-models-pytorch==") for line in requirements)


def test_new_versions_move_latest_and_set_alias_moves_best(registered):
    name = unique("cromss-late-3b")
    torch.manual_seed(2)
    model = build_model("late", ENCODER, s2_bands=3)
    config = tiny_config(model={"fusion": "late"}, data={"s2_bands": 3})
    with RunTracker.start(config, tracking_uri=registered.store, experiment=unique("p"), run_name="v") as tracker:
        first = log_pretrained_model(model, config, tracker=tracker, registry_name=name, aliases=["best"])
        second = log_pretrained_model(model, config, tracker=tracker, registry_name=name, aliases=["latest"])
    client = MlflowClient(tracking_uri=registered.store, registry_uri=registered.store)
    assert (first, second) == (1, 2)
    assert int(client.get_model_version_by_alias(name, "latest").version) == 2
    assert int(client.get_model_version_by_alias(name, "best").version) == 1
    set_alias(name, "best", 2, tracking_uri=registered.store)
    assert int(client.get_model_version_by_alias(name, "best").version) == 2
    with pytest.raises(ValueError, match="built-in alias"):
        set_alias(name, "latest", 1, tracking_uri=registered.store)


def test_a_mismatched_config_is_refused_before_anything_is_logged(registered, late_model):
    config = tiny_config(model={"fusion": "mid"})
    with RunTracker.start(config, tracking_uri=registered.store, experiment=unique("p"), run_name="x") as tracker:
        with pytest.raises(ValueError, match="model.fusion: config 'mid', model 'late'"):
            log_pretrained_model(late_model, config, tracker=tracker, registry_name=unique("never"), aliases=[])
    assert not tracker.client.get_run(tracker.run_id).outputs.model_outputs


FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    import mlflow
    import numpy as np

    model = mlflow.pyfunc.load_model(sys.argv[1], dst_path=sys.argv[2])
    report = {}
    for index in range(2):
        inputs = np.load(f"{sys.argv[2]}/input_{index}.npz")
        outputs = model.predict({"s1": inputs["s1"], "s2": inputs["s2"]}, params={"batch_size": 1})
        np.savez(f"{sys.argv[2]}/output_{index}.npz", **outputs)
        report[index] = {key: [list(value.shape), str(value.dtype)] for key, value in outputs.items()}
    try:
        model.predict({"s1": inputs["s1"].astype("float64"), "s2": inputs["s2"]})
    except Exception as error:
        report["float64"] = str(error)
    np.savez(f"{sys.argv[2]}/example.npz", **model.input_example)
    np.savez(f"{sys.argv[2]}/example_output.npz", **model.predict(model.input_example))
    first = np.load(f"{sys.argv[2]}/input_0.npz")
    s2 = first["s2"][:, ::-1].copy()
    s2[0, 4, 5, 7] = np.nan
    names = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"][::-1]
    named = model.predict({"s1": first["s1"], "s2": s2}, params={"s2_bands": names})
    np.savez(f"{sys.argv[2]}/named.npz", **named)
    try:
        model.predict({"s1": first["s1"], "s2": s2[:, 1:]}, params={"s2_bands": names[1:]})
    except Exception as error:
        report["l2a"] = str(error)
    print(json.dumps(report))
    """
)


def _raw_products(n: int, height: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """S1 backscatter in dB and S2 L1C digital numbers, as float32 (the pyfunc's tensor type)."""
    rng = np.random.default_rng(seed)
    s1 = rng.uniform(-30, 5, size=(n, 2, height, width)).astype(np.float32)
    s2 = rng.integers(0, 6000, size=(n, 13, height, width)).astype(np.float32)
    return s1, s2


def test_the_registered_model_predicts_in_a_fresh_process(registered, tmp_path):
    """The pulled pyfunc takes raw products (its ``inputs.json``) and scales them itself by spec 9's rule;
    its stored input example holds raw products whose network input is the v8 codes it was logged from, and
    round-trips through it; named bands in another order give the same prediction, a NaN pixel is masked."""
    sizes = [(2, 37, 50), (1, 64, 64)]
    for index, (n, height, width) in enumerate(sizes):
        s1, s2 = _raw_products(n, height, width, seed=index)
        np.savez(tmp_path / f"input_{index}.npz", s1=s1, s2=s2)
    environment = {
        **os.environ,
        "MLFLOW_TRACKING_URI": registered.store,
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    done = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, f"models:/{registered.name}@best", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=environment,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for index, (n, height, width) in enumerate(sizes):
        assert report[str(index)]["classes"] == [[n, height, width], "int64"]
        assert report[str(index)]["probabilities"] == [[n, 9, height, width], "float32"]
        assert report[str(index)]["s1_probabilities"] == [[n, 9, height, width], "float32"]
        inputs, outputs = np.load(tmp_path / f"input_{index}.npz"), np.load(tmp_path / f"output_{index}.npz")
        scaled = {modality: network_input(inputs[modality], PRODUCT_INPUTS[modality]) for modality in ("s1", "s2")}
        expected = predict_maps(registered.model, scaled["s1"], scaled["s2"])
        assert np.allclose(outputs["probabilities"], expected["probabilities"], atol=1e-5)
        assert (outputs["s2_classes"] == expected["s2_classes"]).mean() > 0.99
    assert "dtype of input float64 does not match expected dtype float32" in report["float64"]
    assert "input 's2': lacks the S2 band B12 that the model takes" in report["l2a"]

    example, from_example = np.load(tmp_path / "example.npz"), np.load(tmp_path / "example_output.npz")
    codes = {modality: image[:, :, :32, :32] for modality, image in registered.example_codes.items()}
    by_codes = {modality: image / np.float32(255) for modality, image in codes.items()}
    for modality in ("s1", "s2"):
        assert example[modality].dtype == np.float32 and example[modality].shape == codes[modality].shape
        np.testing.assert_array_equal(network_input(example[modality], PRODUCT_INPUTS[modality]), by_codes[modality])
    expected = predict_maps(registered.model, by_codes["s1"], by_codes["s2"])
    np.testing.assert_allclose(from_example["probabilities"], expected["probabilities"], atol=1e-5)
    named, first = np.load(tmp_path / "named.npz"), np.load(tmp_path / "output_0.npz")
    assert named["classes"][0, 5, 7] == NODATA and np.isnan(named["probabilities"][0, :, 5, 7]).all()
    assert np.isfinite(named["probabilities"][1]).all()
    np.testing.assert_allclose(named["probabilities"][1], first["probabilities"][1], atol=1e-5)
