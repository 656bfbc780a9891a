"""An interrupted transfer run, started again with the same name, resumes (spec 11; cf. the pretraining
resume test in tests/train): the same MLflow run, from its checkpoint, to the configured epoch count.
The run is the random baseline, and it is resumed from the command line, so the one pair of Ray Train
runs also shows ``cromss finetune --init random`` end to end."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import ray.train
from finetune_helpers import TINY_CONFIG, Shards, unique_name
from mlflow import MlflowClient

from cromss_ray.cli import main
from cromss_ray.config import ConfigError, FinetuneConfig, build_config, load_config
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
    ray_cluster, store: str, storage: Path, dw_shards: Shards, capsys: pytest.CaptureFixture[str]
):
    """The run is the random baseline (FPN, its crop from the decoder, no validation split); the second
    attempt is ``cromss finetune`` on the command line with the first attempt's options."""
    options = [
        f"data.test_uri={dw_shards.test}",
        "model.decoder=FPN",
        "optim.epochs=3",
        "data.crop=null",
        "optim.batch_size=2",
        "data.val_fraction=0",
        f"run.storage_path={storage}",
        f"run.name={unique_name('random')}",
    ]
    config = load_config(
        FinetuneConfig, TINY_CONFIG, [*options, "model.init=random"], data=str(dw_shards.train), tracking_uri=store
    )
    with pytest.raises(ray.train.TrainingFailedError):
        run_finetune(config, RunLinks(callbacks=[_interrupt_after_the_first_checkpoint()]))
    run_path = str(Path(config.run.storage_path) / config.run.name)
    checkpoint = ray.train.Result.from_path(run_path).checkpoint
    assert checkpoint is not None and checkpoint.path.endswith("checkpoint_epoch_0001")
    client = MlflowClient(store, registry_uri=store)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    [interrupted] = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{config.run.name}'")
    # The worker trains on while the controller handles the failing report, so the second epoch may be
    # logged too; the third one's report waits for the controller, which takes no more, so the run ends
    # before its last epoch and registers nothing.
    logged = [point.step for point in client.get_metric_history(interrupted.info.run_id, "train/loss")]
    assert logged in ([1], [1, 2])
    assert client.search_model_versions("name = 'cromss-ft-dw-fpn'") == [], "nothing is registered before the end"

    other_network = config.model_dump(mode="json", exclude_unset=True)
    other_network["model"]["decoder"] = "Unet"
    with pytest.raises(ConfigError, match=r"of another network: model\.decoder: 'FPN' -> 'Unet'"):
        build_trainer(build_config(FinetuneConfig, other_network))

    command = ["finetune", "--config", str(TINY_CONFIG), "--init", "random", "--data", str(dw_shards.train)]
    assert main([*command, "--tracking-uri", store, *(part for option in options for part in ("--set", option))]) == 0
    out = capsys.readouterr().out
    assert "initialised from random" in out and "registered model cromss-ft-dw-fpn version 1" in out
    assert "test/s2/miou" in out
    run_id = out.split("MLflow run ", 1)[1].split()[0]
    assert run_id == interrupted.info.run_id, "the resumed run keeps writing to the same MLflow run"
    resumed = ray.train.Result.from_path(run_path)
    assert resumed.checkpoint.path.endswith("checkpoint_epoch_0003")
    assert resumed.metrics["epoch"] == config.optim.epochs == 3
    steps = [point.step for point in client.get_metric_history(run_id, "train/loss")]
    assert steps.count(1) == 1, "epoch 1 is not trained again: the second attempt continues after its checkpoint"
    assert sorted(set(steps)) == [1, 2, 3] and steps == logged + [2, 3]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["data.crop"] == "480", "FPN's crop from the decoder (the whole 32 px tiles train)"
    assert math.isfinite(run.data.metrics["test/s2/miou"])
    same_name = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{config.run.name}'")
    assert [found.info.run_id for found in same_name] == [run_id], "one MLflow run across the interruption"
    version = client.get_model_version("cromss-ft-dw-fpn", "1")
    assert version.run_id == run_id and version.tags["cromss.init"] == "random"
