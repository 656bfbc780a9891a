"""Shared fixtures of the transfer tests: an MLflow store, synthetic downstream shards, a registered
pretrained model, and the transfer runs the tests inspect (the Ray cluster is the suite's ``ray_cluster``).

A Ray Train run takes tens of seconds on two cores, so the runs many tests inspect are session
fixtures: one frozen run from a registry alias on DW-like tiles, and one warm-up-then-fine-tuned
S1 run from a registry version on DFC2020-like patches, which is interrupted after its first
checkpoint and resumed by ``cromss finetune`` (the resume test inspects both attempts). Their test
tiles are larger than the training crop, so the test split is scored on whole tiles, as
``cromss evaluate`` scores them.
The registered pretrained model is a fresh ``build_model`` network logged with the tracking
layer's own function, a real registry entry without a pretraining run.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import ray.train
import torch
from finetune_helpers import (
    ENCODER,
    FROZEN_RUN_LR_FLOOR,
    PRETRAINED_BANDS,
    PRETRAINED_NAME,
    TEST_TILE,
    TILE,
    TINY_CONFIG,
    Pretrained,
    ResumedRun,
    Shards,
    tiny_config,
    unique_name,
)
from mlflow import MlflowClient

from cromss_ray.cli import main
from cromss_ray.config import FinetuneConfig, PretrainConfig, load_config
from cromss_ray.data.synth import synthesize
from cromss_ray.method import build_model
from cromss_ray.tracking.pyfunc import log_pretrained_model
from cromss_ray.tracking.runs import RunTracker
from cromss_ray.train.finetune import FinetuneResult, run_finetune
from cromss_ray.train.loop import RunLinks


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fresh MLflow sqlite store (absolute URI) shared by the session."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _shards(root: Path, kind: str, seed: int) -> Shards:
    synthesize(root / "train", kind, locations=10, size=TILE, seed=seed)
    synthesize(root / "test", kind, locations=3, size=TEST_TILE, seed=seed + 100)
    return Shards(root / "train", root / "test")


@pytest.fixture(scope="session")
def dw_shards(tmp_path_factory: pytest.TempPathFactory) -> Shards:
    """SSL4EO-S12@DW-like tiles (9 classes, ignore 255): 10 of 32 px for training, 3 of 64 px for testing."""
    return _shards(tmp_path_factory.mktemp("dw"), "dw", seed=11)


@pytest.fixture(scope="session")
def dfc_shards(tmp_path_factory: pytest.TempPathFactory) -> Shards:
    """DFC2020-like patches (8 classes, ignore 255): 10 of 32 px for training, 3 of 64 px for testing."""
    return _shards(tmp_path_factory.mktemp("dfc2020"), "dfc2020", seed=21)


@pytest.fixture(scope="session")
def pretrained(store: str) -> Pretrained:
    """A seeded mid-fusion ResNet-18 on 9 S2 bands, registered as ``cromss-mid-9b`` with alias @best."""
    torch.manual_seed(3)
    model = build_model("mid", ENCODER, s2_bands=PRETRAINED_BANDS).eval()
    config = PretrainConfig.model_validate(
        {"model": {"fusion": "mid", "encoder": ENCODER}, "data": {"s2_bands": PRETRAINED_BANDS}}
    )
    with RunTracker.start(config, tracking_uri=store, experiment="cromss-pretrain", run_name="source") as tracker:
        version = log_pretrained_model(
            model, config, tracker=tracker, registry_name=PRETRAINED_NAME, aliases=["latest", "best"]
        )
    return Pretrained(model, PRETRAINED_NAME, version, tracker.run_id)


@pytest.fixture(scope="session")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ray Train storage for the session's runs."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def frozen_run(ray_cluster, store: str, storage: Path, dw_shards: Shards, pretrained: Pretrained) -> FinetuneResult:
    """U-Net on S2 from ``models:/cromss-mid-9b@best``, encoder frozen with its batch norm fixed, 2 epochs
    on 2 workers (DW-like), with the reference's CE + Dice and a cosine that reaches its floor after
    epoch 1 and holds it."""
    config = tiny_config(
        dw_shards,
        store,
        storage,
        f"model.init=models:/{pretrained.name}@best",
        "model.encoder_mode=frozen",
        "model.frozen_batch_norm=fixed",
        "optim.loss=ce+dice",
        f"optim.lr_floor={FROZEN_RUN_LR_FLOOR}",
        "optim.cosine_epochs=1",
    )
    return run_finetune(config)


def _interrupt_after_the_first_checkpoint() -> ray.train.UserCallback:
    """A Ray Train callback that fails the run once the first checkpoint is registered, as a crash would.

    Defined in a function so that it is pickled by value for the Train controller.
    """

    class InterruptAfterFirstCheckpoint(ray.train.UserCallback):
        def after_report(self, run_context, metrics, checkpoint) -> None:
            if checkpoint is not None:
                raise RuntimeError("interrupted by the test after the first checkpoint")

    return InterruptAfterFirstCheckpoint()


@pytest.fixture(scope="session")
def warmup_run(ray_cluster, store: str, storage: Path, dfc_shards: Shards, pretrained: Pretrained) -> ResumedRun:
    """DeepLabV3+ on S1 from ``models:/cromss-mid-9b/<version>`` on DFC2020-like patches, its crop from
    the decoder and no validation split: encoder frozen in epoch 1, fine-tuned in epochs 2 and 3.

    The first attempt fails once its first checkpoint is registered; ``cromss finetune`` with the same
    options then resumes it (spec 11). One worker: the frozen run is the 2-worker transfer. Three epochs, so that the interrupted attempt cannot reach its
    end (the worker trains on while the controller handles the failing report).
    """
    init = f"models:/{pretrained.name}/{pretrained.version}"
    options = [
        f"data.test_uri={dfc_shards.test}",
        "data.crop=null",
        "data.val_fraction=0",
        "optim.batch_size=2",
        "optim.epochs=3",
        "scaling.num_workers=1",
        "optim.scheduler=step",
        "model.branch=s1",
        "model.decoder=DeepLabV3Plus",
        "model.unfreeze_epoch=1",
        f"run.storage_path={storage}",
        f"run.name={unique_name('warmup')}",
    ]
    config = load_config(
        FinetuneConfig, TINY_CONFIG, [*options, f"model.init={init}"], data=str(dfc_shards.train), tracking_uri=store
    )
    failure = None
    try:
        run_finetune(config, RunLinks(callbacks=[_interrupt_after_the_first_checkpoint()]))
    except ray.train.TrainingFailedError as exc:
        failure = exc
    checkpoint = ray.train.Result.from_path(str(storage / config.run.name)).checkpoint
    client = MlflowClient(store, registry_uri=store)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    [interrupted] = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{config.run.name}'")
    interrupted_id = interrupted.info.run_id
    interrupted_steps = [point.step for point in client.get_metric_history(interrupted_id, "train/loss")]
    registered = client.search_model_versions(f"run_id = '{interrupted_id}'")

    command = ["finetune", "--config", str(TINY_CONFIG), "--init", init, "--data", str(dfc_shards.train)]
    command += ["--tracking-uri", store, *(part for option in options for part in ("--set", option))]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exit_code = main(command)
    output = printed.getvalue()
    mlflow_run = re.search(r"^MLflow run (\S+) ", output, re.MULTILINE)
    model = re.search(r"^registered model (\S+) version (\d+)$", output, re.MULTILINE)
    if mlflow_run is None or model is None:
        pytest.fail(f"cromss finetune (exit code {exit_code}) named no MLflow run or model:\n{output}")
    metrics = client.get_run(mlflow_run[1]).data.metrics
    return ResumedRun(
        config=config,
        failure=failure,
        interrupted_checkpoint=checkpoint.path if checkpoint is not None else None,
        interrupted_run_id=interrupted_id,
        interrupted_steps=interrupted_steps,
        registered_by_the_interrupted_run=[f"{version.name}/{version.version}" for version in registered],
        exit_code=exit_code,
        output=output,
        run_id=mlflow_run[1],
        registry_name=model[1],
        version=int(model[2]),
        test_metrics={key: value for key, value in metrics.items() if key.startswith("test/")},
    )
