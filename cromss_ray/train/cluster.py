"""The Ray side of a training run: the cluster, workers and their resources, run identity, data sharding.

``scaling`` becomes a :class:`ray.train.ScalingConfig` (GPUs used when the cluster has
them) and ``run`` a :class:`ray.train.RunConfig` whose name and storage path identify the
run, so that running it again resumes it, and whose failure handling restarts the workers
after a fault of the infrastructure but not after an error in the configuration or the data
(:class:`FailFastOnBadInput`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import ray
import ray._private.ray_constants as ray_constants
import ray.data
import ray.train
from pydantic import ValidationError
from ray.actor import ActorHandle

from cromss_ray.config import ConfigError, RunConfig, ScalingConfig
from cromss_ray.data.shards import RowValidationError, ShardFileError
from cromss_ray.data.storage import IncompleteShardsError
from cromss_ray.tracking.delivery import UndeliveredError

LOCAL_HOST = "127.0.0.1"
TRAIN = "train"
VAL = "val"


SINGLE_MACHINE_VARIABLE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
AUTH_MODE_VARIABLE = "RAY_AUTH_MODE"


def init_ray() -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (as under ``ray job submit``), else start a local one."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        start_local_ray()


def start_local_ray(**options: Any) -> None:
    """Start a Ray instance that only this machine can reach, with token authentication.

    On Linux, Ray swaps a loopback ``_node_ip_address`` for the machine's routable address
    and binds its GCS, raylet, agents and workers to it or to all interfaces, unless it runs
    in its single-machine mode, which the variable ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``
    selects when ``ray`` is imported. The mode is therefore switched on in this process
    (Ray's constant) and for the processes Ray starts (the environment) while they start.
    A new local instance uses token authentication, Ray's default (the token is
    ``~/.ray/auth_token``, created when missing); an explicit ``RAY_AUTH_MODE`` other than
    ``token`` is refused rather than opening the instance to every local user.
    ``options`` go to :func:`ray.init` (``num_cpus``, ``include_dashboard``, ...).
    """
    auth_mode = os.environ.get(AUTH_MODE_VARIABLE)
    if auth_mode is not None and auth_mode.lower() != "token":
        raise RuntimeError(
            f"{AUTH_MODE_VARIABLE}={auth_mode}: a local Ray instance started by cromss-ray uses token "
            f"authentication; unset {AUTH_MODE_VARIABLE} (or set it to token), or start your own cluster "
            "and name it in RAY_ADDRESS"
        )
    with _single_machine_mode():
        ray.init(_node_ip_address=LOCAL_HOST, **options)


@contextmanager
def _single_machine_mode() -> Iterator[None]:
    saved_variable = os.environ.get(SINGLE_MACHINE_VARIABLE)
    saved_constant = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[SINGLE_MACHINE_VARIABLE] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_constant
        if saved_variable is None:
            os.environ.pop(SINGLE_MACHINE_VARIABLE)
        else:
            os.environ[SINGLE_MACHINE_VARIABLE] = saved_variable


def cluster_has_gpus() -> bool:
    """Whether the Ray cluster this process is connected to offers any GPU."""
    return ray.cluster_resources().get("GPU", 0) > 0


def resolve_use_gpu(scaling: ScalingConfig) -> bool:
    """``scaling.use_gpu`` with ``"auto"`` decided by the cluster: GPUs when it has them."""
    if scaling.use_gpu == "auto":
        return cluster_has_gpus()
    return bool(scaling.use_gpu)


def ray_scaling_config(scaling: ScalingConfig) -> ray.train.ScalingConfig:
    """Workers and per-worker resources of a run; one GPU share per worker when GPUs are used."""
    use_gpu = resolve_use_gpu(scaling)
    resources: dict[str, float] = {"CPU": scaling.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    return ray.train.ScalingConfig(num_workers=scaling.num_workers, use_gpu=use_gpu, resources_per_worker=resources)


def absolute_storage_path(path: str) -> str:
    """A local storage path made absolute (Ray workers run elsewhere); URIs (``s3://``...) unchanged."""
    scheme = urlparse(path).scheme
    if scheme and len(scheme) > 1:
        return path
    return str(Path(path).expanduser().resolve())


def ray_run_config(run: RunConfig, callbacks: Sequence[ray.train.UserCallback] = ()) -> ray.train.RunConfig:
    """Run identity, checkpoint retention and fault tolerance of a run.

    The name and storage path identify the run: Ray Train finds the checkpoints of an
    earlier run with the same pair and hands the latest to the loop, which resumes from
    it. Retention keeps the most recent ``run.checkpoints_to_keep`` checkpoints, and a
    failed worker group is restarted from the latest checkpoint up to
    ``run.max_failures`` times, unless it failed on bad configuration or data
    (:class:`FailFastOnBadInput`).
    """
    return ray.train.RunConfig(
        name=run.name,
        storage_path=absolute_storage_path(run.storage_path),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=run.checkpoints_to_keep),
        failure_config=ray.train.FailureConfig(max_failures=run.max_failures),
        callbacks=[FailFastOnBadInput(), *callbacks],
    )


NOT_RETRIED = (
    ValidationError,
    ConfigError,
    RowValidationError,
    ShardFileError,
    IncompleteShardsError,
    UndeliveredError,
)
"""Errors a restart cannot mend: the configuration, the shards' rows or files, writes the tracking
server did not take in the time allowed. Anything else (a lost worker, actor or node, a storage
read that failed) is an infrastructure fault and restarts the workers."""


class BadInputError(RuntimeError):
    """A training worker failed on one of :data:`NOT_RETRIED`; the run ends without a restart."""


def _qualified_name(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def not_retried_cause(error: BaseException) -> str | None:
    """The name of the :data:`NOT_RETRIED` error behind a worker's failure, or None.

    Ray hands the controller a wrapper of the worker's exception (with its traceback as
    text) whose chained causes do not survive pickling, so both the exceptions reachable
    from ``error`` and the exception lines of its text are looked at.
    """
    pending: list[BaseException | None] = [error]
    seen: set[int] = set()
    while pending:
        node = pending.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for kind in NOT_RETRIED:
            if isinstance(node, kind) or f"{_qualified_name(kind)}:" in str(node):
                return kind.__name__
        pending += [getattr(node, "_base_exc", None), getattr(node, "cause", None), node.__cause__, node.__context__]
    return None


class FailFastOnBadInput(ray.train.UserCallback):
    """Ends a run at once when a worker fails on bad configuration or data (:data:`NOT_RETRIED`).

    Ray Train retries every worker failure up to ``max_failures`` times and offers no
    public way to tell them apart; an error raised by a callback on the controller ends
    the run without a retry, so this callback raises :class:`BadInputError`, carrying the
    worker's error, for the failures a restart cannot mend.
    """

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        for rank, error in sorted(worker_exceptions.items()):
            cause = not_retried_cause(error)
            if cause is not None:
                raise BadInputError(
                    f"worker {rank} failed on a {cause}, which a restart cannot mend (not retried):\n{error}"
                )


class ExactValidationDataConfig(ray.train.DataConfig):
    """Shard ``train`` equally across workers and ``val`` exactly.

    Training needs the same number of rows (hence steps) on every rank, or a DDP rank
    would wait for a gradient all-reduce its peers never start; Ray Train's equal split
    drops the remainder for that. Validation must score every held-out row once
    (spec 11: one confusion matrix over the whole set), so its split keeps every row and
    the ranks' confusion matrices are summed afterwards.

    Validation samples are cut without augmentation, the same in every epoch, so they are
    cut once and kept in the object store: a streaming split would start a new Ray Data
    execution and cut them again every epoch (docs/benchmarks.md, section 2). The cost
    is the held-out samples' size in object-store memory (1 % of NoLDO-S12 at 256 px:
    about 1.2 GB for the whole cluster).
    """

    def configure(
        self,
        datasets: dict[str, ray.data.Dataset],
        world_size: int,
        worker_handles: list[ActorHandle] | None,
        worker_node_ids: list[str] | None,
        **kwargs: Any,
    ) -> list[dict[str, ray.data.DataIterator]]:
        others = {name: dataset for name, dataset in datasets.items() if name != VAL}
        shards = super().configure(others, world_size, worker_handles, worker_node_ids, **kwargs)
        if VAL in datasets:
            validation = datasets[VAL].materialize().split(world_size, equal=False, locality_hints=worker_handles)
            for shard, split in zip(shards, validation, strict=True):
                shard[VAL] = split.iterator()
        return shards
