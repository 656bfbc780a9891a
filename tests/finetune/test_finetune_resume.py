"""An interrupted transfer run, started again with the same name, resumes (spec 11; cf. the pretraining
resume test in tests/train): the same MLflow run, from its checkpoint, to the configured epoch count.
The run is the session's warm-up run (``warmup_run``): its first attempt fails after the first checkpoint
and ``cromss finetune`` on the command line, with the first attempt's options, resumes it, so the one
pair of Ray Train runs also shows the command end to end."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import ray.train
from finetune_helpers import Pretrained, ResumedRun
from mlflow import MlflowClient

from cromss_ray.config import ConfigError, FinetuneConfig, build_config
from cromss_ray.train.finetune import build_trainer

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_an_interrupted_run_resumes_from_its_checkpoint_in_the_same_mlflow_run(
    warmup_run: ResumedRun, store: str, pretrained: Pretrained
):
    """The run takes its crop from the decoder and has no validation split; the resumed epochs are the
    ones after the warm-up, with the encoder unfrozen."""
    config = warmup_run.config
    assert isinstance(warmup_run.failure, ray.train.TrainingFailedError)
    assert warmup_run.interrupted_checkpoint is not None
    assert warmup_run.interrupted_checkpoint.endswith("checkpoint_epoch_0001")
    # The worker trains on while the controller handles the failing report, so the second epoch may be
    # logged too; the third one's report waits for the controller, which takes no more, so the run ends
    # before its last epoch and registers nothing.
    logged = warmup_run.interrupted_steps
    assert logged in ([1], [1, 2])
    assert warmup_run.registered_by_the_interrupted_run == [], "nothing is registered before the end"

    other_network = config.model_dump(mode="json", exclude_unset=True)
    other_network["model"]["decoder"] = "Unet"
    with pytest.raises(ConfigError, match=r"of another network: model\.decoder: 'DeepLabV3Plus' -> 'Unet'"):
        build_trainer(build_config(FinetuneConfig, other_network))

    assert warmup_run.exit_code == 0
    out = warmup_run.output
    source = f"{pretrained.name}/{pretrained.version}"
    assert f"initialised from {source}" in out
    assert "registered model cromss-ft-dfc2020-deeplabv3plus version 1" in out
    assert "test/s1/miou" in out
    run_id = warmup_run.run_id
    assert run_id == warmup_run.interrupted_run_id, "the resumed run keeps writing to the same MLflow run"
    resumed = ray.train.Result.from_path(str(Path(config.run.storage_path) / config.run.name))
    assert resumed.checkpoint.path.endswith("checkpoint_epoch_0003")
    assert resumed.metrics["epoch"] == config.optim.epochs == 3
    client = MlflowClient(store, registry_uri=store)
    steps = [point.step for point in client.get_metric_history(run_id, "train/loss")]
    assert steps.count(1) == 1, "epoch 1 is not trained again: the second attempt continues after its checkpoint"
    assert sorted(set(steps)) == [1, 2, 3] and steps == logged + [2, 3]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["data.crop"] == "496", "DeepLabV3+'s crop from the decoder (the whole 32 px tiles train)"
    assert not any(key.startswith("val/") for key in run.data.metrics), "no validation split"
    assert math.isfinite(run.data.metrics["test/s1/miou"])
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    same_name = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{config.run.name}'")
    assert [found.info.run_id for found in same_name] == [run_id], "one MLflow run across the interruption"
    version = client.get_model_version("cromss-ft-dfc2020-deeplabv3plus", "1")
    assert version.run_id == run_id and version.tags["cromss.init"] == source
