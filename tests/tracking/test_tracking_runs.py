"""RunTracker against a real MLflow sqlite store: params, metrics, artifacts, resume, redaction."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from cromss_ray.config import PretrainConfig, TuneConfig, flatten
from cromss_ray.data.schema import DW_CLASSES
from cromss_ray.method import ConfusionMatrix
from cromss_ray.tracking.figures import validation_sample_figure
from cromss_ray.tracking.runs import RunTracker, config_params
from tracking_helpers import tiny_config, unique

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _artifact(client: MlflowClient, run_id: str, path: str, tmp_path: Path) -> Path:
    return Path(client.download_artifacts(run_id, path, str(tmp_path)))


def test_new_run_logs_the_config_as_params_and_yaml(store, artifact_root, tmp_path):
    config = tiny_config(cromss={"final_ratio": 0.4}, optim={"lr": 0.01})
    experiment = unique("pretrain")
    with RunTracker.start(
        config, tracking_uri=store, experiment=experiment, run_name="first", tags={"stage": "test"}
    ) as tracker:
        client = tracker.client
        run = client.get_run(tracker.run_id)
        assert run.info.run_name == "first" and run.info.status == "RUNNING"
    params = client.get_run(tracker.run_id).data.params
    assert params == {key: str(value) for key, value in flatten(config).items()}
    assert params["cromss.final_ratio"] == "0.4" and params["model.encoder"] == "resnet18"
    assert params["cromss.smoothing_factors"] == "[0.15, 0.05]"
    stored = yaml.safe_load(_artifact(client, tracker.run_id, "config.yaml", tmp_path).read_text())
    assert PretrainConfig.model_validate(stored) == config
    finished = client.get_run(tracker.run_id)
    assert finished.info.status == "FINISHED"
    assert finished.data.tags["stage"] == "test" and "cromss_ray.version" in finished.data.tags
    location = client.get_experiment_by_name(experiment).artifact_location
    assert location == (artifact_root / experiment).as_uri()
    assert (artifact_root / experiment / tracker.run_id / "artifacts" / "config.yaml").is_file()


def test_metrics_are_logged_per_epoch_with_an_epoch_metric(store):
    with RunTracker.start(tiny_config(), tracking_uri=store, experiment=unique("pretrain"), run_name="m") as tracker:
        tracker.log_metrics({"train/loss": 1.5, "val/s2/miou": torch.tensor(0.25)}, epoch=0)
        tracker.log_metrics({"train/loss": 1.25, "val/s2/miou": 0.5}, epoch=1)
    history = {
        key: [(m.step, m.value) for m in tracker.client.get_metric_history(tracker.run_id, key)]
        for key in ("train/loss", "val/s2/miou", "epoch")
    }
    assert sorted(history["train/loss"]) == [(0, 1.5), (1, 1.25)]
    assert sorted(history["val/s2/miou"]) == [(0, 0.25), (1, 0.5)]
    assert sorted(history["epoch"]) == [(0, 0.0), (1, 1.0)]


def test_resuming_by_run_id_adds_metrics_to_the_same_run_and_keeps_its_params(store):
    experiment = unique("pretrain")
    first = RunTracker.start(tiny_config(), tracking_uri=store, experiment=experiment, run_name="resumable")
    first.log_metrics({"train/loss": 2.0}, epoch=0)
    first.finish("FAILED")
    changed = tiny_config(optim={"lr": 0.1})
    with RunTracker.start(
        changed, tracking_uri=store, experiment=experiment, run_name="resumable", run_id=first.run_id
    ) as resumed:
        assert resumed.run_id == first.run_id
        assert resumed.client.get_run(first.run_id).info.status == "RUNNING"
        resumed.log_metrics({"train/loss": 1.0}, epoch=1)
    client = resumed.client
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.005"
    assert sorted((m.step, m.value) for m in client.get_metric_history(first.run_id, "train/loss")) == [
        (0, 2.0),
        (1, 1.0),
    ]
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    assert len(client.search_runs([experiment_id])) == 1


def test_resuming_an_unknown_run_names_it(store):
    with pytest.raises(ValueError, match="cannot resume MLflow run '0123abcd'"):
        RunTracker.start(tiny_config(), tracking_uri=store, experiment=unique("p"), run_name="x", run_id="0123abcd")


def test_credentials_never_reach_params_tags_or_artifacts(store, tmp_path):
    secret_uri = "https://alice:s3cr3t-pw@mlflow.example.org"
    config = tiny_config(
        tracking={"uri": secret_uri},
        data={"uri": "s3://shards/noldo", "s3_endpoint": "http://AKIAKEY:t0psecret@127.0.0.1:9000"},
    )
    with RunTracker.start(
        config, tracking_uri=store, experiment=unique("pretrain"), run_name="redacted", tags={"remote": secret_uri}
    ) as tracker:
        tracker.set_tags({"endpoint": "http://AKIAKEY:t0psecret@127.0.0.1:9000?token=abc"})
    run = tracker.client.get_run(tracker.run_id)
    logged = json.dumps([run.data.params, run.data.tags])
    logged += _artifact(tracker.client, tracker.run_id, "config.yaml", tmp_path).read_text()
    for secret in ("s3cr3t-pw", "t0psecret", "AKIAKEY", "alice", "token=abc"):
        assert secret not in logged
    assert run.data.params["tracking.uri"] == "https://mlflow.example.org"
    assert run.data.params["data.s3_endpoint"] == "http://127.0.0.1:9000"
    assert run.data.tags["remote"] == "https://mlflow.example.org"


def test_long_values_are_cut_to_the_param_limit_and_kept_whole_in_the_yaml(store, tmp_path):
    long_uri = "s3://bucket/" + "x" * (MAX_PARAM_VAL_LENGTH + 500)
    config = tiny_config(data={"uri": long_uri})
    with RunTracker.start(config, tracking_uri=store, experiment=unique("pretrain"), run_name="long") as tracker:
        pass
    value = tracker.client.get_run(tracker.run_id).data.params["data.uri"]
    assert len(value) == MAX_PARAM_VAL_LENGTH and value.endswith("...") and long_uri.startswith(value[:-3])
    stored = yaml.safe_load(_artifact(tracker.client, tracker.run_id, "config.yaml", tmp_path).read_text())
    assert stored["data"]["uri"] == long_uri


def test_tune_configs_flatten_search_spaces_into_valid_param_keys():
    space = {"optim.lr": {"loguniform": [1e-4, 1e-2]}, "cromss.final_ratio": {"choice": [0.3, 0.5]}}
    config = TuneConfig.model_validate({"tune": {"search_space": space}})
    params = config_params(config)
    assert params["tune.search_space.optim.lr.loguniform"] == "[0.0001, 0.01]"
    assert params["tune.search_space.cromss.final_ratio.choice"] == "[0.3, 0.5]"


@pytest.mark.parametrize(("raised", "status"), [(RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_the_context_manager_ends_the_run_by_how_the_block_ended(store, raised, status):
    with pytest.raises(type(raised)):
        with RunTracker.start(tiny_config(), tracking_uri=store, experiment=unique("p"), run_name="end") as tracker:
            raise raised
    assert tracker.client.get_run(tracker.run_id).info.status == status


def test_child_runs_name_their_parent(store):
    experiment = unique("tune")
    with RunTracker.start(tiny_config(), tracking_uri=store, experiment=experiment, run_name="sweep") as parent:
        with RunTracker.start(
            tiny_config(), tracking_uri=store, experiment=experiment, run_name="trial", parent_run_id=parent.run_id
        ) as child:
            pass
    assert child.client.get_run(child.run_id).data.tags["mlflow.parentRunId"] == parent.run_id


def test_a_deleted_experiment_is_named_instead_of_silently_recreated(store):
    experiment = unique("gone")
    with RunTracker.start(tiny_config(), tracking_uri=store, experiment=experiment, run_name="x") as tracker:
        pass
    tracker.client.delete_experiment(tracker.experiment_id)
    with pytest.raises(ValueError, match=f"experiment '{experiment}' is deleted"):
        RunTracker.start(tiny_config(), tracking_uri=store, experiment=experiment, run_name="y")


def test_finish_rejects_unknown_statuses(store):
    tracker = RunTracker.start(tiny_config(), tracking_uri=store, experiment=unique("p"), run_name="s")
    with pytest.raises(ValueError, match="FINISHED, FAILED or KILLED"):
        tracker.finish("DONE")
    tracker.finish("KILLED")
    tracker.finish("FINISHED")
    assert tracker.client.get_run(tracker.run_id).info.status == "KILLED"


def test_confusion_matrix_json_holds_the_hand_computed_scores_and_a_png(store, tmp_path):
    # target 0 0 1 2, prediction 0 1 1 2, class 3 absent: matrix rows = target.
    matrix = ConfusionMatrix(4)
    matrix.update(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 0, 1, 2]))
    names = ["water", "trees", "grass", "crops"]
    with RunTracker.start(tiny_config(), tracking_uri=store, experiment=unique("p"), run_name="cm") as tracker:
        tracker.log_confusion_matrix("val_s2", matrix.compute(), names)
    stored = json.loads(_artifact(tracker.client, tracker.run_id, "confusion/val_s2.json", tmp_path).read_text())
    assert stored["class_names"] == names
    assert stored["matrix"] == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert stored["oa"] == pytest.approx(0.75)
    assert stored["iou"][:3] == pytest.approx([0.5, 0.5, 1.0]) and stored["iou"][3] is None
    assert stored["miou"] == pytest.approx(2 / 3)
    assert stored["precision"][:3] == pytest.approx([1.0, 0.5, 1.0]) and stored["precision"][3] is None
    assert stored["recall"][:3] == pytest.approx([0.5, 1.0, 1.0]) and stored["recall"][3] is None
    png = _artifact(tracker.client, tracker.run_id, "confusion/val_s2.png", tmp_path)
    assert png.read_bytes().startswith(PNG_MAGIC)


def test_confusion_matrix_and_class_names_must_agree(store):
    matrix = ConfusionMatrix(3)
    with RunTracker.start(tiny_config(), tracking_uri=store, experiment=unique("p"), run_name="cm") as tracker:
        with pytest.raises(ValueError, match=r"confusion matrix 'val_s1' has shape \(3, 3\) but 9 class names"):
            tracker.log_confusion_matrix("val_s1", matrix.compute(), DW_CLASSES)


def _sample(size: int = 16, **extra: np.ndarray) -> dict:
    rng = np.random.default_rng(0)
    label = rng.integers(0, 9, (size, size))
    label[:2] = 255
    return {"s2_rgb": rng.random((size, size, 3)), "label": torch.from_numpy(label), **extra}


def test_validation_samples_become_one_png_per_sample(store, tmp_path):
    rng = np.random.default_rng(1)
    full = _sample(
        clean_label=rng.integers(0, 9, (16, 16)),
        prediction=rng.integers(0, 9, (16, 16)),
        weights_s1=rng.random((16, 16)),
        weights_s2=torch.rand(16, 16),
    )
    with RunTracker.start(tiny_config(), tracking_uri=store, experiment=unique("p"), run_name="fig") as tracker:
        tracker.log_validation_samples([full, {**_sample(), "id": "tile-7"}], DW_CLASSES, epoch=3)
    listed = [item.path for item in tracker.client.list_artifacts(tracker.run_id, "samples/epoch_0003")]
    assert listed == ["samples/epoch_0003/sample_00.png", "samples/epoch_0003/sample_01.png"]
    for path in listed:
        assert _artifact(tracker.client, tracker.run_id, path, tmp_path).read_bytes().startswith(PNG_MAGIC)


def test_sample_figures_show_only_the_panels_a_sample_has():
    full = _sample(clean_label=np.zeros((16, 16)), prediction=np.zeros((16, 16)), weights_s1=np.ones((16, 16)))
    full = {key: np.asarray(value) for key, value in full.items()}
    minimal = {key: np.asarray(value) for key, value in _sample().items()}
    titles = [axes.get_title() for axes in validation_sample_figure(full, DW_CLASSES, "t").axes if axes.get_title()]
    assert titles == ["S2 RGB", "noisy label", "clean label", "prediction", "S1 selection weight"]
    titles = [axes.get_title() for axes in validation_sample_figure(minimal, DW_CLASSES, "t").axes if axes.get_title()]
    assert titles == ["S2 RGB", "noisy label"]


@pytest.mark.parametrize(
    ("sample", "message"),
    [
        ({"s2_rgb": np.zeros((8, 8, 3))}, "validation sample 0: missing 'label'"),
        ({"s2_rgb": np.zeros((8, 8)), "label": np.zeros((8, 8))}, r"'s2_rgb' must be \(H, W, 3\)"),
        ({"s2_rgb": np.zeros((8, 8, 3)), "label": np.zeros((8, 9))}, r"'label' has shape \(8, 9\), expected \(8, 8\)"),
        ({"s2_rgb": np.zeros((8, 8, 3)), "label": np.zeros((8, 8)), "weight_s1": np.zeros((8, 8))}, "unknown keys"),
    ],
)
def test_malformed_validation_samples_are_named(store, sample, message):
    with RunTracker.start(tiny_config(), tracking_uri=store, experiment=unique("p"), run_name="bad") as tracker:
        with pytest.raises(ValueError, match=message):
            tracker.log_validation_samples([sample], DW_CLASSES, epoch=0)


def test_text_and_dict_artifacts(store, tmp_path):
    with RunTracker.start(tiny_config(), tracking_uri=store, experiment=unique("p"), run_name="t") as tracker:
        tracker.log_text("hello", "notes/readme.txt")
        tracker.log_dict({"score": np.float32(0.5), "per_class": torch.tensor([1.0, float("nan")])}, "scores.json")
    assert _artifact(tracker.client, tracker.run_id, "notes/readme.txt", tmp_path).read_text() == "hello"
    scores = json.loads(_artifact(tracker.client, tracker.run_id, "scores.json", tmp_path).read_text())
    assert scores == {"score": 0.5, "per_class": [1.0, None]}
