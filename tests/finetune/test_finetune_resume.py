"""An interrupted transfer run, started again with the same name, resumes (spec 11; cf. the pretraining
resume test in tests/train): the same MLflow run, from its checkpoint, to the configured epoch count."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import ray.train
from finetune_helpers import Pretrained, Shards, tiny_config
from mlflow import MlflowClient

from cromss_ray.config import ConfigError, FinetuneConfig, build_config
from cromss_ray.train.finetune import build_trainer, run_finetune
from cromss_ray.train.loop import RunLinks

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _interrupt_after_the_first_checkpoint() -> ray.train.UserCallback:
    """A Ray Train callback that fails the run once the first checkpoint is registered, as a crash would.

    Defined in a function so that it is pickled by value for the Train controller.
    """

    class InterruptAfterFirstCheckpoint(ray.train.UserCallback):
        def after_report(self, run_context, metrics, checkpoint) -> None:
            if checkpoint is not None:
                raise RuntimeError("interrupted by the test after the first checkpoint")

    return InterruptAfterFirstCheckpoint()


def test_an_interrupted_run_resumes_from_its_checkpoint_in_the_same_mlflow_run(
    ray_cluster, store: str, storage: Path, dw_shards: Shards, pretrained: Pretrained
):
    config = tiny_config(
        dw_shards,
        store,
        storage,
        f"model.init=models:/{pretrained.name}@best",
        "tracking.registry_name=ft-resume",
        "optim.epochs=3",
    )
    with pytest.raises(ray.train.TrainingFailedError):
        run_finetune(config, RunLinks(callbacks=[_interrupt_after_the_first_checkpoint()]))
    checkpoint = ray.train.Result.from_path(str(Path(config.run.storage_path) / config.run.name)).checkpoint
    assert checkpoint is not None and checkpoint.path.endswith("checkpoint_epoch_0001")
    client = MlflowClient(store, registry_uri=store)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    [interrupted] = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{config.run.name}'")
    # The worker trains on while the controller handles the failing report, so epochs after the
    # first may be logged too; the run still ends before its last epoch and registers nothing.
    logged = [point.step for point in client.get_metric_history(interrupted.info.run_id, "val/s2/miou")]
    assert logged in ([1], [1, 2])
    assert client.search_model_versions("name = 'ft-resume'") == [], "nothing is registered before the end"

    other_network = config.model_dump(mode="json", exclude_unset=True)
    other_network["model"]["decoder"] = "FPN"
    with pytest.raises(ConfigError, match=r"of another network: model\.decoder: 'Unet' -> 'FPN'"):
        build_trainer(build_config(FinetuneConfig, other_network))

    resumed = run_finetune(config)
    assert resumed.start_epoch == 1, "the second attempt continues after the epoch-1 checkpoint"
    assert resumed.run_id == interrupted.info.run_id, "the resumed run keeps writing to the same MLflow run"
    assert resumed.result.metrics["epoch"] == config.optim.epochs == 3
    steps = [point.step for point in client.get_metric_history(resumed.run_id, "val/s2/miou")]
    assert steps.count(1) == 1, "epoch 1 is not trained again"
    assert sorted(set(steps)) == [1, 2, 3] and steps == logged + [2, 3]
    run = client.get_run(resumed.run_id)
    assert run.info.status == "FINISHED"
    assert math.isfinite(run.data.metrics["test/s2/miou"])
    same_name = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{config.run.name}'")
    assert [found.info.run_id for found in same_name] == [resumed.run_id], "one MLflow run across the interruption"
    version = client.get_model_version("ft-resume", str(resumed.version))
    assert resumed.version == 1 and version.run_id == resumed.run_id
    assert version.tags["cromss.source_model"] == pretrained.name
