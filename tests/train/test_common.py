"""The pieces every training loop shares: scaling, precision, schedules, checkpoints, data sharding."""

from __future__ import annotations

import threading
import traceback
from pathlib import Path

import pyarrow.fs as pafs
import pydantic
import pytest
import ray.data
import ray.train
import torch
import yaml
from interrupted_writes import WriteInterrupted, interrupting_filesystem
from ray import cloudpickle
from ray.train.v2._internal.util import construct_user_exception_with_traceback
from torch.optim.lr_scheduler import ExponentialLR, LambdaLR, ReduceLROnPlateau, StepLR

from cromss_ray.config import (
    ConfigError,
    FinetuneConfig,
    OptimConfig,
    PretrainConfig,
    RunConfig,
    ScalingConfig,
    TuneConfig,
    build_config,
    to_yaml,
)
from cromss_ray.data.shards import RowValidationError, ShardFileError
from cromss_ray.tracking.delivery import UndeliveredError
from cromss_ray.train.checkpoints import (
    CHANGEABLE_KEYS,
    TrainingState,
    check_resumable,
    load_model_state,
    read_meta,
    restored_changes,
)
from cromss_ray.train.cluster import (
    BadInputError,
    ExactValidationDataConfig,
    FailFastOnBadInput,
    absolute_storage_path,
    not_retried_cause,
    ray_run_config,
    ray_scaling_config,
)
from cromss_ray.train.collectives import all_reduce_sums
from cromss_ray.train import finetune, pretrain
from cromss_ray.train.optim import Precision, build_lr_scheduler, build_optimizer, step_lr_scheduler
from cromss_ray.train.pretrain import rgb_positions, true_colour
from cromss_ray.tune.sweep import run_sweep


def test_precision_autocasts_only_on_a_gpu() -> None:
    cpu = Precision.on(torch.device("cpu"), "bf16")
    assert (cpu.dtype, cpu.name, cpu.grad_scaler().is_enabled()) == (None, "fp32", False)
    assert Precision.on(torch.device("cuda", 0), "bf16").dtype == torch.bfloat16
    assert Precision.on(torch.device("cuda", 0), "fp16").name == "fp16"
    assert Precision.on(torch.device("cuda", 0), "fp32").dtype is None
    with cpu.autocast():
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32


@pytest.mark.parametrize(
    ("name", "kind"),
    [("plateau", ReduceLROnPlateau), ("exponential", ExponentialLR), ("cosine", LambdaLR), ("step", StepLR)],
)
def test_each_schedule_name_builds_its_scheduler(name: str, kind: type) -> None:
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(1))], OptimConfig(scheduler=name))
    assert isinstance(build_lr_scheduler(optimizer, OptimConfig(scheduler=name)), kind)
    assert build_lr_scheduler(optimizer, OptimConfig(scheduler="none")) is None


def test_the_plateau_schedule_halves_the_rate_after_patience_epochs_without_a_better_val_loss() -> None:
    optim = OptimConfig(lr=1.0, plateau_factor=0.5, plateau_patience=1)
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(1))], optim)
    scheduler = build_lr_scheduler(optimizer, optim)
    rates = []
    for val_loss in (1.0, 1.0, 1.0, 0.5, 0.5, 0.5):
        step_lr_scheduler(scheduler, val_loss)
        rates.append(optimizer.param_groups[0]["lr"])
    # Epoch 1 sets the best loss; the 2nd bad epoch in a row exceeds patience 1; 0.5 is a new best.
    assert rates == [1.0, 1.0, 0.5, 0.5, 0.5, 0.25]


def _rates(optim: OptimConfig) -> list[float]:
    """The learning rate each epoch trains at, stepping the schedule after every epoch."""
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(1))], optim)
    scheduler = build_lr_scheduler(optimizer, optim)
    rates = []
    for _ in range(optim.epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        step_lr_scheduler(scheduler, float("nan"))
    return rates


def test_the_reference_cosine_falls_to_the_floor_over_40_epochs_then_holds() -> None:
    """Spec 11: 5e-4 to 1e-5 over epochs 0..39, then 1e-5 until epoch 49; by hand, with
    lr(e) = 1e-5 + 4.9e-4 (1 + cos(pi e / 40)) / 2."""
    rates = _rates(OptimConfig(scheduler="cosine", lr=5e-4, lr_floor=1e-5, cosine_epochs=40, epochs=50))
    assert len(rates) == 50
    assert rates[0] == pytest.approx(5e-4, rel=1e-9)
    assert rates[10] == pytest.approx(1e-5 + 4.9e-4 * (1 + 2**-0.5) / 2, rel=1e-9)  # 4.28241e-4
    assert rates[20] == pytest.approx(2.55e-4, rel=1e-9)
    assert rates[30] == pytest.approx(1e-5 + 4.9e-4 * (1 - 2**-0.5) / 2, rel=1e-9)  # 8.1759e-5
    assert rates[39] > 1e-5
    assert rates[40:] == pytest.approx([1e-5] * 10, rel=1e-9)
    assert all(a > b for a, b in zip(rates[:40], rates[1:41]))


def test_cosine_without_floor_or_length_anneals_to_zero_over_the_run() -> None:
    rates = _rates(OptimConfig(scheduler="cosine", lr=1.0, epochs=4))
    assert rates == pytest.approx([1.0, (1 + 2**-0.5) / 2, 0.5, (1 - 2**-0.5) / 2])


def test_the_cosine_schedule_resumes_from_its_state() -> None:
    optim = OptimConfig(scheduler="cosine", lr=5e-4, lr_floor=1e-5, cosine_epochs=4, epochs=6)
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(1))], optim)
    scheduler = build_lr_scheduler(optimizer, optim)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    resumed_optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(1))], optim)
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    resumed = build_lr_scheduler(resumed_optimizer, optim)
    resumed.load_state_dict(scheduler.state_dict())
    resumed_optimizer.step()
    resumed.step()
    assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lr": 1e-3, "lr_floor": 1e-3}, r"optim\n?.*lr_floor \(0.001\) must be below lr \(0.001\)"),
        ({"epochs": 50, "cosine_epochs": 60}, r"optim\n?.*cosine_epochs \(60\) exceeds epochs \(50\)"),
    ],
)
def test_bad_schedule_options_are_named(options: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(PretrainConfig, {"optim": options})


def test_optimiser_names_and_hyperparameters() -> None:
    parameters = [torch.nn.Parameter(torch.zeros(1))]
    adam = build_optimizer(parameters, OptimConfig(optimizer="adam", lr=5e-3, weight_decay=1e-8))
    sgd = build_optimizer(parameters, OptimConfig(optimizer="sgd", lr=0.1, momentum=0.8))
    assert isinstance(adam, torch.optim.Adam) and adam.defaults["weight_decay"] == 1e-8
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.8
    assert isinstance(build_optimizer(parameters, OptimConfig(optimizer="adamw")), torch.optim.AdamW)


def test_storage_paths_become_absolute_and_uris_stay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert absolute_storage_path("runs") == str(tmp_path / "runs")
    assert absolute_storage_path("s3://bucket/runs") == "s3://bucket/runs"


def test_run_config_names_the_run_keeps_checkpoints_and_retries(tmp_path: Path) -> None:
    run = ray_run_config(RunConfig(name="r", storage_path=str(tmp_path), checkpoints_to_keep=3, max_failures=4))
    assert (run.name, run.storage_path) == ("r", str(tmp_path))
    assert run.checkpoint_config.num_to_keep == 3
    assert run.failure_config.max_failures == 4
    assert any(isinstance(callback, FailFastOnBadInput) for callback in run.callbacks)
    assert RunConfig().max_failures == 1, "a lost worker or node is retried by default"


def test_restarting_without_limit_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"run\.max_failures: .*restarting without limit \(-1\) is refused"):
        build_config(PretrainConfig, {}, ["run.max_failures=-1"])


def _as_ray_delivers(error: Exception) -> Exception:
    """``error`` raised in a Ray task, caught by a training worker and handed to the controller as Ray
    Train does: a ``RayTaskError`` in the worker, wrapped with its traceback text, pickled across."""
    try:
        try:
            raise error
        except Exception as raised:
            raise ray.exceptions.RayTaskError("map_batches", traceback.format_exc(), raised).as_instanceof_cause()
    except Exception as in_worker:
        return cloudpickle.loads(cloudpickle.dumps(construct_user_exception_with_traceback(in_worker)))


@pytest.mark.parametrize(
    "error",
    [
        RowValidationError("loc-7", "label", "values [17] outside 0..8"),
        ShardFileError("/data/part-00001.parquet", "row 3: bad bytes"),
        ConfigError("model.classes: 9, but the shards have 10 classes"),
        UndeliveredError("MLflow run r", ["metrics of epoch 2 (train/loss, epoch)"], 300.0, None),
    ],
)
def test_bad_configuration_or_data_fails_the_run_once(error: Exception) -> None:
    delivered = _as_ray_delivers(error)
    assert not_retried_cause(delivered) == type(error).__name__
    with pytest.raises(BadInputError, match=r"worker 1 failed on a \w+, which a restart cannot mend") as failure:
        FailFastOnBadInput().after_exception(None, {0: _as_ray_delivers(OSError("collective aborted")), 1: delivered})
    assert str(error) in str(failure.value), "the worker's own message reaches the user"


def test_a_config_that_fails_validation_in_a_worker_is_not_retried() -> None:
    with pytest.raises(pydantic.ValidationError) as failure:
        PretrainConfig.model_validate({"optim": {"lr": "fast"}})
    assert not_retried_cause(_as_ray_delivers(failure.value)) == "ValidationError"


@pytest.mark.parametrize(
    "error",
    [
        ray.exceptions.ActorDiedError(),
        OSError("AWS Error NETWORK_CONNECTION during GetObject operation"),
        ValueError("s3://bucket/noldo/part-00000.parquet: cannot read rows [3, 5]: connection refused"),
        RuntimeError("Connection closed by peer"),
    ],
)
def test_infrastructure_faults_are_left_to_the_restarts(error: Exception) -> None:
    delivered = _as_ray_delivers(error)
    assert not_retried_cause(delivered) is None
    FailFastOnBadInput().after_exception(None, {0: delivered})


def test_gpus_are_requested_only_when_asked_or_present(ray_cluster: None) -> None:
    auto = ray_scaling_config(ScalingConfig(num_workers=2, use_gpu="auto", cpus_per_worker=0.5))
    assert (auto.num_workers, auto.use_gpu, auto.resources_per_worker) == (2, False, {"CPU": 0.5})
    forced = ray_scaling_config(ScalingConfig(use_gpu=True, gpus_per_worker=0.5))
    assert forced.use_gpu and forced.resources_per_worker == {"CPU": 1.0, "GPU": 0.5}


def test_a_training_state_round_trips_through_a_checkpoint_directory(tmp_path: Path) -> None:
    torch.manual_seed(0)
    optim = OptimConfig(lr=0.1, plateau_patience=0)
    model = torch.nn.Linear(3, 2)
    optimizer = build_optimizer(model.parameters(), optim)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    state = TrainingState(model, optimizer, build_lr_scheduler(optimizer, optim), scaler)
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    step_lr_scheduler(state.scheduler, 1.0)
    step_lr_scheduler(state.scheduler, 2.0)
    state.save(tmp_path, PretrainConfig(), {"epoch": 2, "mlflow_run_id": "abc"})

    fresh_model = torch.nn.Linear(3, 2)
    fresh_model.load_state_dict(load_model_state(tmp_path))
    fresh_optimizer = build_optimizer(fresh_model.parameters(), optim)
    fresh = TrainingState(fresh_model, fresh_optimizer, build_lr_scheduler(fresh_optimizer, optim), scaler)
    fresh.load_optimisation(tmp_path, torch.device("cpu"))
    assert torch.equal(fresh_model.weight, model.weight)
    assert fresh_optimizer.state_dict()["state"][0]["step"] == 1
    assert fresh_optimizer.param_groups[0]["lr"] == pytest.approx(0.05), "the plateau step is restored"
    assert read_meta(tmp_path) == {"epoch": 2, "mlflow_run_id": "abc"}
    assert build_config(PretrainConfig, yaml.safe_load((tmp_path / "config.yaml").read_text())) == PretrainConfig()


def test_an_interrupted_checkpoint_write_keeps_the_files_written_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = build_optimizer(model.parameters(), OptimConfig())
    state = TrainingState(model, optimizer, None, torch.amp.GradScaler("cpu", enabled=False))
    state.save(tmp_path, PretrainConfig(), {"epoch": 1})
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    with torch.no_grad():
        model.weight.add_(1.0)
    monkeypatch.setattr(pafs, "LocalFileSystem", interrupting_filesystem)

    with pytest.raises(WriteInterrupted):
        state.save(tmp_path, PretrainConfig(), {"epoch": 2})

    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before


def test_a_broken_meta_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"meta\.json: not a readable checkpoint meta file"):
        read_meta(tmp_path)


def test_a_checkpoint_without_a_readable_config_is_named(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("model: [unclosed")
    with pytest.raises(ConfigError, match=r"config\.yaml: not the config of a pretraining checkpoint"):
        check_resumable(PretrainConfig(), ray.train.Checkpoint.from_directory(str(tmp_path)))


def checkpoint_of(directory: Path, *overrides: str) -> ray.train.Checkpoint:
    """A checkpoint directory holding only the ``config.yaml`` of ``PretrainConfig`` with ``overrides``."""
    (directory / "config.yaml").write_text(to_yaml(build_config(PretrainConfig, {}, list(overrides))))
    return ray.train.Checkpoint.from_directory(str(directory))


def test_resuming_with_another_config_is_refused_naming_each_key_old_and_new(tmp_path: Path) -> None:
    checkpoint = checkpoint_of(tmp_path, "optim.lr=0.005", "data.uri=data/a")
    changed = build_config(PretrainConfig, {}, ["optim.lr=0.001", "data.uri=data/b"])
    with pytest.raises(ConfigError, match=r"data\.uri: 'data/a' -> 'data/b'; optim\.lr: 0\.005 -> 0\.001\. .*"
                       r"--allow-config-change"):
        check_resumable(changed, checkpoint)


def test_changeable_keys_resume_silently(tmp_path: Path) -> None:
    checkpoint = checkpoint_of(tmp_path, "optim.epochs=2", "run.max_failures=0", "scaling.cpus_per_worker=1")
    assert set(CHANGEABLE_KEYS) >= {"optim.epochs", "run.max_failures", "scaling.cpus_per_worker"}
    extended = build_config(PretrainConfig, {}, ["optim.epochs=5", "run.max_failures=2", "scaling.cpus_per_worker=2"])
    assert check_resumable(extended, checkpoint) == {}


def test_more_epochs_under_the_cosine_schedule_change_its_period_and_are_refused(tmp_path: Path) -> None:
    checkpoint = checkpoint_of(tmp_path, "optim.scheduler=cosine", "optim.epochs=2")
    with pytest.raises(ConfigError, match=r"optim\.epochs: 2 -> 5"):
        check_resumable(build_config(PretrainConfig, {}, ["optim.scheduler=cosine", "optim.epochs=5"]), checkpoint)


def test_an_allowed_change_is_returned_to_record_but_never_one_of_the_network(tmp_path: Path) -> None:
    checkpoint = checkpoint_of(tmp_path, "optim.lr=0.005")
    allowed = build_config(PretrainConfig, {}, ["optim.lr=0.001", "optim.epochs=7", "run.allow_config_change=true"])
    assert check_resumable(allowed, checkpoint) == {"optim.lr": (0.005, 0.001)}
    assert restored_changes(allowed, tmp_path) == {"optim.lr": (0.005, 0.001)}, "what rank 0 records"
    assert restored_changes(allowed, None) == {}
    other_network = build_config(PretrainConfig, {}, ["model.fusion=late", "run.allow_config_change=true"])
    with pytest.raises(ConfigError, match=r"of another network: model\.fusion: 'mid' -> 'late'"):
        check_resumable(other_network, checkpoint)


def test_sums_of_one_worker_are_its_own() -> None:
    assert all_reduce_sums({"b": 2, "a": 1.5}, torch.device("cpu")) == {"a": 1.5, "b": 2.0}


def _consume(iterators: list[ray.data.DataIterator]) -> list[list[int]]:
    """Read every split at once (a streaming split advances only when all its consumers read)."""
    rows: list[list[int]] = [[] for _ in iterators]

    def read(index: int) -> None:
        rows[index] = [row["id"] for row in iterators[index].iter_rows()]

    threads = [threading.Thread(target=read, args=(index,)) for index in range(len(iterators))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return rows


def test_training_rows_split_equally_and_validation_rows_exactly_once(ray_cluster: None) -> None:
    config = ExactValidationDataConfig()
    train = config.configure({"train": ray.data.range(7)}, world_size=2, worker_handles=None, worker_node_ids=None)
    val = config.configure({"val": ray.data.range(5)}, world_size=2, worker_handles=None, worker_node_ids=None)
    train_rows = _consume([shard["train"] for shard in train])
    val_rows = _consume([shard["val"] for shard in val])
    assert len(train_rows[0]) == len(train_rows[1]) == 3, "equal steps per rank: one of 7 rows is dropped"
    assert sorted(val_rows[0] + val_rows[1]) == [0, 1, 2, 3, 4]


def test_true_colour_takes_b4_b3_b2_of_each_band_subset() -> None:
    # Spec 9 subsets: 13 = B1..B12, 9 = B2 B3 B4 B5 B6 B7 B8 B11 B12, 3 = B4 B3 B2.
    assert rgb_positions(13) == [3, 2, 1]
    assert rgb_positions(12) == [3, 2, 1]
    assert rgb_positions(9) == [2, 1, 0]
    assert rgb_positions(3) == [0, 1, 2]
    s2 = torch.stack([torch.full((4, 4), float(band)) for band in range(9)])
    s2[2, 0, 0] = 100.0
    image = true_colour(s2, rgb_positions(9))
    assert image.shape == (4, 4, 3)
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert image[1, 1, 0] > image[1, 1, 1] > image[1, 1, 2], "red (B4) is the brightest band here"


def test_runs_refuse_credentials_in_the_config_naming_the_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretraining, fine-tuning and sweeps refuse a config (or tracking URI) holding credentials before
    Ray starts or anything is written: the config reaches workers, checkpoints and Tune's state."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    secret = {
        "tracking": {"uri": "https://alice:pw-7f3a@mlflow.example.org"},
        "data": {"uri": "s3://b/noldo", "s3_endpoint": "https://s3.example.org/?X-Amz-Signature=sig-7f3a"},
        "run": {"storage_path": str(tmp_path / "runs")},
    }
    attempts = [
        lambda: pretrain.build_trainer(build_config(PretrainConfig, secret)),
        lambda: finetune.build_trainer(build_config(FinetuneConfig, {**secret, "model": {"init": "models:/m@best"}})),
        lambda: run_sweep(build_config(TuneConfig, secret)),
    ]
    for attempt in attempts:
        with pytest.raises(ConfigError, match=r"^data\.s3_endpoint, tracking\.uri: carries credentials") as info:
            attempt()
        assert "pw-7f3a" not in str(info.value) and "sig-7f3a" not in str(info.value)
    assert not (tmp_path / "runs").exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://bob:pw-9c1d@mlflow.example.org")
    with pytest.raises(ConfigError, match=r"^MLFLOW_TRACKING_URI \(environment\): carries credentials"):
        pretrain.build_trainer(build_config(PretrainConfig, {"data": {"uri": "s3://b/noldo"}}))
