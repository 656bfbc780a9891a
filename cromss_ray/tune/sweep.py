"""A Ray Tune sweep over the CromSS design space, every trial tracked in MLflow.

``run_sweep`` turns a ``TuneConfig`` into a Tuner: the search space (:mod:`.space`), a
search algorithm (random or grid: ``BasicVariantGenerator``; Optuna TPE: ``OptunaSearch``
behind a ``ConcurrencyLimiter``), ASHA on the sweep metric with ``epoch`` as its time
attribute, and one pretraining Ray Train run per trial (:mod:`.trial`).

Tracking: one MLflow parent run per sweep in ``tune.experiment`` (``cromss-tune``), one
child run per trial (written by the trial's rank 0, tagged with the sweep and trial id);
when Tune ends a trial, its run is tagged ``stopped_early`` and closed. Trials register
their models as ``<name>-trials``, apart from the standalone models; at the end, the best
completed trial's model becomes a version of the standalone name with the alias ``@best``
(:func:`~cromss_ray.tune.trial_runs.promote_trial_model`), and the results table
(``results.csv``) and a parallel-coordinates plot are logged on the parent run and kept
in the sweep folder ``<run.storage_path>/<run.name>``.

Resuming: the sweep folder holds Tune's experiment state, ``cromss-sweep.json`` (the
config and the parent run id) and ASHA's rungs (``asha-rungs.pkl``, :mod:`.scheduler`),
both written through a temporary file renamed into place.
Running the same command again restores the Tuner, finishes the unfinished trials (each
continues its Train run from its latest checkpoint), judges them against the rungs of
the trials before the interruption, and logs into the same parent run.

Resources: a trial's driver holds no CPU or GPU; its Train workers hold
``scaling.num_workers`` x ``cpus_per_worker`` (and ``gpus_per_worker``), and by default as
many trials run at once as the cluster fits, counting one more CPU per trial for its
Ray Data tasks. When Tune stops a trial, the Train controller ends with the trial's
driver, and Ray Train's placement-group cleaner returns the workers' reservation; the
cleaner queries the Ray state API, so a cluster started without the dashboard keeps
those reservations until the sweep ends.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
import ray.tune
from ray.tune import ExperimentAnalysis
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, SearchAlgorithm
from ray.tune.search.optuna import OptunaSearch

from cromss_ray.config import ConfigError, PretrainConfig, TrackingConfig, TuneConfig, flatten
from cromss_ray.data.storage import resolve_filesystem, scan_shards, write_atomically
from cromss_ray.tracking.runs import RunTracker
from cromss_ray.tracking.uris import absolute_tracking_uri, redact_uri
from cromss_ray.train.cluster import absolute_storage_path, init_ray, resolve_use_gpu
from cromss_ray.train.loop import check_no_credentials
from cromss_ray.train.probe import ProbeData, probe_data, probe_metric
from cromss_ray.tune import trial_runs
from cromss_ray.tune.results import (
    UNFINISHED,
    TrialRow,
    best_row,
    collect_rows,
    format_table,
    from_csv,
    plot_parallel_coordinates,
    sampled_log_keys,
    table_columns,
    table_records,
    to_csv,
)
from cromss_ray.tune.trial_runs import SWEEP_TAG
from cromss_ray.tune.scheduler import ResumableASHA
from cromss_ray.tune.space import check_space, expected_trials, param_space
from cromss_ray.tune.trial import TRAIN_RUNS_DIR, TrialContext, run_trial, trial_dirname

SWEEP_STATE_FILE = "cromss-sweep.json"
ASHA_STATE_FILE = "asha-rungs.pkl"
RESULTS_CSV = "results.csv"
PLOT_PNG = "parallel_coordinates.png"
BEST_ALIAS = "best"
METRIC_CLEAN = "val_clean/s2/miou"
METRIC_NOISY = "val/s2/miou"
TIME_ATTR = "epoch"
DRIVER_RESOURCES = {"memory": 512 * 2**20}
"""A trial's driver only builds and watches its Train run: it holds memory but no CPU, so that
the CPUs stay with the Train workers and their Ray Data tasks."""
DATA_CPUS_PER_TRIAL = 1.0
"""CPUs left free per running trial for its Ray Data tasks (reading and cutting shards)."""


class SweepStateError(ValueError):
    """A sweep folder's ``cromss-sweep.json`` cannot be read; the message names the file."""


@dataclass(frozen=True)
class SweepState:
    """``cromss-sweep.json``: what a later resume or report needs to know about a sweep."""

    name: str
    parent_run_id: str
    experiment: str
    metric: str
    mode: str
    epochs: int
    keys: list[str]
    log_keys: list[str]
    config: dict[str, Any]

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> SweepState:
        try:
            return cls(**json.loads(text))
        except (json.JSONDecodeError, TypeError) as exc:
            raise SweepStateError(f"{where}: not a readable sweep state file: {exc}") from None


@dataclass(frozen=True)
class SweepResult:
    """The outcome of ``run_sweep``: the trials' rows, the winner and where everything is."""

    name: str
    path: str
    parent_run_id: str
    metric: str
    rows: list[TrialRow]
    best: TrialRow | None
    best_model: str | None
    interrupted: bool
    table: str


def sweep_metric(config: TuneConfig) -> str:
    """``tune.metric``, else ``tune.objective``'s: the transfer probe's mIoU, or the S2 mIoU against the
    clean or the noisy validation labels (by default clean where the validation data has them)."""
    objective = config.tune.objective
    if objective == "transfer":
        return config.tune.metric or probe_metric(config.tune.transfer.branch)
    data = config.data
    validation_uri = data.val_uri or data.uri
    validation = scan_shards(validation_uri, data.s3_endpoint, allow_incomplete=data.allow_incomplete)
    has_clean = validation.meta.has_clean_label
    if objective == "clean_validation" and not has_clean:
        raise ConfigError(f"tune.objective: 'clean_validation', but {validation_uri} has no clean labels")
    if config.tune.metric:
        return config.tune.metric
    if objective == "noisy_validation":
        return METRIC_NOISY
    return METRIC_CLEAN if has_clean else METRIC_NOISY


def sweep_probe(config: TuneConfig) -> ProbeData | None:
    """The transfer probe's checked data for ``tune.objective`` 'transfer' (absolute locations), else None."""
    if config.tune.objective != "transfer":
        return None
    settings = config.tune.transfer.model_copy()
    settings.data = absolute_storage_path(settings.data)
    if settings.test_data is not None:
        settings.test_data = absolute_storage_path(settings.test_data)
    return probe_data(settings, config.model.encoder, config.data.s2_bands)


def trial_resources(config: PretrainConfig, use_gpu: bool) -> dict[str, float]:
    """What one running trial needs: workers x CPUs (and GPUs) per worker, and a CPU for its data."""
    scaling = config.scaling
    resources = {"CPU": scaling.num_workers * scaling.cpus_per_worker + DATA_CPUS_PER_TRIAL}
    if use_gpu:
        resources["GPU"] = scaling.num_workers * scaling.gpus_per_worker
    return resources


def default_max_concurrent(per_trial: dict[str, float], cluster: dict[str, float]) -> int:
    """How many trials the cluster can run at once: the scarcest resource decides (at least one)."""
    fits = [math.floor(cluster.get(name, 0.0) / amount) for name, amount in per_trial.items() if amount > 0]
    return max(1, min(fits, default=1))


def build_search_alg(config: TuneConfig, max_concurrent: int) -> SearchAlgorithm | ConcurrencyLimiter:
    """Random or grid: Tune's variant generator (seeded); optuna: TPE behind a concurrency limiter.

    The metric and mode reach the algorithm (and the scheduler) from ``ray.tune.TuneConfig``.
    """
    if config.tune.search_alg == "optuna":
        searcher = OptunaSearch(seed=config.run.seed)
        return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)
    return BasicVariantGenerator(max_concurrent=max_concurrent, random_state=config.run.seed)


def build_scheduler(config: TuneConfig, location: SweepLocation) -> TrialScheduler:
    """ASHA on the sweep metric with ``epoch`` as time, up to the config's epoch count, its rungs
    kept in the sweep folder (:mod:`.scheduler`); or FIFO.

    A trial that reaches its last epoch is left to end by itself (``stop_last_trials``
    off): after its last report, rank 0 still logs the confusion matrices and registers
    the model, which a stop at that report would cut short.
    """
    if config.tune.scheduler == "none":
        return FIFOScheduler()
    return ResumableASHA(
        state_path=location.path(ASHA_STATE_FILE),
        filesystem=location.filesystem,
        time_attr=TIME_ATTR,
        max_t=config.optim.epochs,
        grace_period=min(config.tune.grace_period, config.optim.epochs),
        reduction_factor=config.tune.reduction_factor,
        stop_last_trials=False,
    )


def trial_base(config: TuneConfig, tracking_uri: str) -> PretrainConfig:
    """The pretraining config every trial starts from: absolute locations, the sweep's experiment."""
    base = PretrainConfig.model_validate(config.model_dump(exclude={"tune"}))
    base.data.uri = absolute_storage_path(base.data.uri)
    if base.data.val_uri is not None:
        base.data.val_uri = absolute_storage_path(base.data.val_uri)
    base.tracking.uri = tracking_uri
    base.tracking.experiment = config.tune.experiment
    return base


def sweep_fingerprint(config: TuneConfig) -> dict[str, Any]:
    """The flattened config a sweep was started with, as stored in its state file.

    URIs are redacted, and the tracking store is left out: the same store may be named
    differently (a relative path, an environment variable) when the sweep is resumed.
    """
    flat = {
        key: redact_uri(value) if isinstance(value, str) else value
        for key, value in flatten(config).items()
        if key != "tracking.uri"
    }
    return json.loads(json.dumps(flat))


@dataclass(frozen=True)
class SweepLocation:
    """Where a sweep lives: the storage root as Ray takes it (an absolute path or a URI), and
    the sweep folder ``<root>/<name>`` as a path on a pyarrow filesystem."""

    storage: str
    filesystem: pafs.FileSystem
    folder: str

    @classmethod
    def of(cls, storage_path: str, name: str, s3_endpoint: str | None = None) -> SweepLocation:
        storage = absolute_storage_path(storage_path).rstrip("/")
        filesystem, root = resolve_filesystem(storage, s3_endpoint)
        return cls(storage, filesystem, f"{root.rstrip('/')}/{name}")

    def path(self, file_name: str) -> str:
        return f"{self.folder}/{file_name}"

    def exists(self, file_name: str) -> bool:
        return self.filesystem.get_file_info(self.path(file_name)).type == pafs.FileType.File

    def write(self, file_name: str, data: bytes) -> None:
        """Write ``data`` to a file of the sweep folder (creating the folder) through a temporary file
        renamed into place: a write that fails leaves the previous file whole."""
        write_atomically(self.filesystem, self.path(file_name), data)

    def read_state(self) -> SweepState | None:
        """The sweep state of the folder, or None when no sweep was started there."""
        if not self.exists(SWEEP_STATE_FILE):
            return None
        with self.filesystem.open_input_stream(self.path(SWEEP_STATE_FILE)) as stream:
            return SweepState.from_json(stream.read().decode(), self.path(SWEEP_STATE_FILE))


def _start_or_resume(
    config: TuneConfig, metric: str, tracking_uri: str, location: SweepLocation
) -> tuple[SweepState, RunTracker]:
    """The sweep's state and parent run: resumed when the folder holds this sweep, else new.

    A folder holding a sweep with another config is refused: Tune cannot change a
    search space mid-sweep.
    """
    fingerprint = sweep_fingerprint(config)
    state = location.read_state()
    if state is not None:
        if state.config != fingerprint:
            changed = sorted(
                key for key in state.config.keys() | fingerprint.keys() if state.config.get(key) != fingerprint.get(key)
            )
            raise ConfigError(
                f"{location.folder}: sweep '{config.run.name}' was started with another config (differs in "
                f"{', '.join(changed)}); rerun it with the same config to resume, or choose another run.name"
            )
        parent = RunTracker.start(
            config,
            tracking_uri=tracking_uri,
            experiment=state.experiment,
            run_name=config.run.name,
            run_id=state.parent_run_id,
        )
        return state, parent
    parent = RunTracker.start(
        config,
        tracking_uri=tracking_uri,
        experiment=config.tune.experiment,
        run_name=config.run.name,
        tags={SWEEP_TAG: config.run.name, "cromss.sweep.metric": metric, "cromss.sweep.path": location.folder},
    )
    state = SweepState(
        name=config.run.name,
        parent_run_id=parent.run_id,
        experiment=config.tune.experiment,
        metric=metric,
        mode=config.tune.mode,
        epochs=config.optim.epochs,
        keys=list(config.tune.search_space),
        log_keys=sampled_log_keys(config.tune.search_space),
        config=fingerprint,
    )
    location.write(SWEEP_STATE_FILE, state.to_json().encode())
    return state, parent


def _tuner(
    config: TuneConfig,
    state: SweepState,
    context: TrialContext,
    location: SweepLocation,
    space: dict[str, Any],
    callbacks: Sequence[ray.tune.Callback],
) -> ray.tune.Tuner:
    """A new Tuner for the sweep, or the interrupted one restored from the sweep folder.

    A restored Tuner keeps the search algorithm, scheduler and callbacks it was pickled
    with. A trial whose driver fails is retried ``run.max_failures`` times, never without
    limit (-1): its Train run already retries failed workers, and a trial that fails on
    its config would otherwise be retried forever.
    """
    trainable = ray.tune.with_resources(ray.tune.with_parameters(run_trial, context=context), DRIVER_RESOURCES)
    experiment_path = f"{location.storage}/{state.name}"
    if ray.tune.Tuner.can_restore(experiment_path):
        return ray.tune.Tuner.restore(experiment_path, trainable=trainable, resume_unfinished=True)
    per_trial = trial_resources(config, resolve_use_gpu(config.scaling))
    max_concurrent = config.tune.max_concurrent_trials or default_max_concurrent(per_trial, ray.cluster_resources())
    closer = trial_runs.TrialRunCloser(
        tracking_uri=context.base.tracking.resolved_uri(),
        experiment=state.experiment,
        sweep_name=state.name,
        epochs=config.optim.epochs,
    )
    return ray.tune.Tuner(
        trainable,
        param_space=space,
        tune_config=ray.tune.TuneConfig(
            metric=state.metric,
            mode=state.mode,
            search_alg=build_search_alg(config, max_concurrent),
            scheduler=build_scheduler(config, location),
            num_samples=config.tune.num_samples,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=ray.tune.RunConfig(
            name=state.name,
            storage_path=location.storage,
            callbacks=[closer, *callbacks],
            failure_config=ray.tune.FailureConfig(max_failures=max(config.run.max_failures, 0)),
        ),
    )


def load_rows(location: SweepLocation, state: SweepState) -> list[TrialRow]:
    """The trials' rows from the Tune experiment state in the sweep folder (none before its first save)."""
    try:
        analysis = ExperimentAnalysis(location.folder, storage_filesystem=location.filesystem)
    except ValueError:
        return []
    return collect_rows(analysis, state.keys, state.metric, state.mode, state.epochs)


def render_table(state: SweepState, rows: Sequence[TrialRow]) -> tuple[str, str]:
    """The results as a printed table (the best completed trial marked ``*``) and as CSV text."""
    columns = table_columns(state.keys, state.metric)
    records = table_records(rows, state.keys)
    best = best_row(rows, state.mode)
    return format_table(columns, records, marked=best.trial_id if best else None), to_csv(columns, records)


def _publish(parent: RunTracker, location: SweepLocation, state: SweepState, rows: list[TrialRow]) -> str:
    """Results table and plot: written to the sweep folder and logged on the parent run; the table text."""
    table, csv_text = render_table(state, rows)
    location.write(RESULTS_CSV, csv_text.encode())
    parent.log_text(csv_text, RESULTS_CSV)
    with tempfile.TemporaryDirectory(prefix="cromss-sweep-") as scratch:
        plot = plot_parallel_coordinates(
            rows, state.keys, state.metric, Path(scratch) / PLOT_PNG, log_keys=state.log_keys
        )
        location.write(PLOT_PNG, plot.read_bytes())
        parent.log_artifact(plot)
    return table


def run_sweep(config: TuneConfig, *, callbacks: Sequence[ray.tune.Callback] = ()) -> SweepResult:
    """Run (or resume) the sweep of ``config`` to the end; see the module docstring.

    ``callbacks`` are extra Ray Tune callbacks (notifications, custom loggers); a resumed
    sweep keeps those it started with. A sweep interrupted by Ctrl+C (SIGINT) or SIGUSR1
    returns with ``interrupted`` set and its parent run KILLED; calling again with the same
    config resumes it. Raises ConfigError for a search space the config rejects (before
    anything is written) or a sweep folder holding a sweep with another config.
    """
    check_no_credentials(config)
    tracking_uri = absolute_tracking_uri(config.tracking.resolved_uri())
    base = trial_base(config, tracking_uri)
    check_space(base, config.tune.search_space)
    space = param_space(config.tune.search_space, config.tune.search_alg)
    metric = sweep_metric(config)
    probe = sweep_probe(config)
    init_ray()
    location = SweepLocation.of(config.run.storage_path, config.run.name, config.data.s3_endpoint)
    state, parent = _start_or_resume(config, metric, tracking_uri, location)
    with parent:
        context = TrialContext(
            sweep_name=state.name,
            base=base,
            train_storage=f"{location.storage}/{state.name}/{TRAIN_RUNS_DIR}",
            parent_run_id=state.parent_run_id,
            probe=probe,
        )
        _tuner(config, state, context, location, space, callbacks).fit()
        rows = load_rows(location, state)
        expected = expected_trials(config.tune.search_space, config.tune.search_alg, config.tune.num_samples)
        interrupted = len(rows) < expected or any(row.status == UNFINISHED for row in rows)
        table = _publish(parent, location, state, rows)
        best = best_row(rows, state.mode)
        best_model = None
        if interrupted:
            parent.finish("KILLED")
        elif best is not None:
            best_model = trial_runs.promote_trial_model(
                tracking_uri, state.experiment, state.name, best.trial_id, BEST_ALIAS
            )
            parent.set_tags({"best_trial": best.trial_id, f"best {state.metric}": best.best, "best_model": best_model})
    return SweepResult(
        name=state.name,
        path=location.folder,
        parent_run_id=state.parent_run_id,
        metric=state.metric,
        rows=rows,
        best=best,
        best_model=best_model,
        interrupted=interrupted,
        table=table,
    )


def sweep_report(
    name: str,
    *,
    storage_path: str = "runs",
    tracking_uri: str | None = None,
    experiment: str = "cromss-tune",
    s3_endpoint: str | None = None,
) -> str:
    """The results table of sweep ``name`` again: from its folder (also mid-sweep), else from MLflow.

    Raises LookupError when neither the folder ``<storage_path>/<name>`` nor the MLflow
    experiment holds such a sweep.
    """
    location = SweepLocation.of(storage_path, name, s3_endpoint)
    state = location.read_state()
    if state is not None:
        rows = load_rows(location, state)
        table, _ = render_table(state, rows)
        lines = [f"sweep {name}: {len(rows)} trial(s), metric {state.metric} ({state.mode}); folder {location.folder}"]
        lines.append(table)
        if location.exists(PLOT_PNG):
            lines.append(f"parallel coordinates: {location.path(PLOT_PNG)}")
        return "\n".join(lines)
    uri = absolute_tracking_uri(tracking_uri or TrackingConfig().resolved_uri())
    run = trial_runs.find_sweep_run(uri, experiment, name)
    if run is None:
        raise LookupError(
            f"no sweep '{name}' in {location.folder} nor in MLflow experiment '{experiment}' at {redact_uri(uri)}"
        )
    columns, records = from_csv(trial_runs.read_artifact_text(uri, run.info.run_id, RESULTS_CSV))
    table = format_table(columns, records, marked=run.data.tags.get("best_trial"))
    return "\n".join([f"sweep {name}: MLflow run {run.info.run_id} ({experiment})", table])
