"""What Ray Train and Ray Data cost per pretraining epoch, against a plain PyTorch loop.

Both sides run the same epochs of the same CromSS pretraining on the same synthetic
locations (training on one set, validation on a held-out set, every epoch):

* ``ray``: the real trainer, :func:`cromss_ray.train.pretrain.run_pretrain`: Ray Data
  streams and cuts the shards in its own processes, Ray Train runs the worker loop
  (DDP-prepared model, metric all-reduce, MLflow logging and ``ray.train.report`` every
  epoch, one checkpoint at the end). Epoch times are the gaps between the MLflow
  timestamps rank 0 writes at the end of each epoch.
* ``plain``: the trainer's own ``train_epoch`` and ``validate`` in this process, on the
  rows held in memory and cut by the pipeline's UDF in the loop
  (:class:`bench.in_memory.InMemoryShard`), timed with ``perf_counter``. It runs with as
  many torch threads as a Ray worker gets (``floor(cpus_per_worker)``, at least 1: Ray
  sets ``OMP_NUM_THREADS`` so), once before and once after the Ray run, so that a
  change of machine load between them shows up instead of biasing the comparison.

The first epoch of every run is a warm-up and left out; a run's figure is its median
epoch, ``overhead_pct = 100 * (ray - plain) / plain``; samples/s count the training and
validation samples of an epoch. Start-up (workers, datasets, MLflow run), the first
epoch and the finish (checkpoint, run closed) of the Ray run are reported apart.

The whole comparison (plain, Ray on a fresh local cluster, plain) repeats ``--runs``
times (default 3) on the same data; the report gives the median over runs and their
range, so one lucky or unlucky run cannot carry a claim. Every run also records the
load average when it starts and the CPU seconds of the Ray run's processes (sampled
from ``/proc`` while it runs), split into the training worker, Ray's other workers
(Ray Data tasks, the Train controller) and Ray's daemons, to show who shares the cores
with the worker; ``cpu_overhead_pct`` compares the CPU seconds per epoch of all the Ray
run's processes with the plain loop's, a figure that other load on the machine moves far
less than the wall-clock one. The JSON report lists every run's epochs. Run from the repository root::

    python -m bench.ray_overhead                     # CPU: 32 locations of 64 px, resnet18
    python -m bench.ray_overhead --locations 512 --size 256 --encoder resnet50 --batch 32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import ray
import ray.data
import torch
from mlflow import MlflowClient

from bench.common import Section, check_crop, machine_section, publish, resolve_device
from bench.in_memory import EpochCounter, InMemoryShard
from cromss_ray.config import PretrainConfig, build_config
from cromss_ray.data.storage import scan_shards
from cromss_ray.data.synth import synthesize
from cromss_ray.data.transforms import CutSamples, SampleDraw
from cromss_ray.method import build_model
from cromss_ray.train import pretrain
from cromss_ray.train.checkpoints import TrainingState
from cromss_ray.train.cluster import start_local_ray
from cromss_ray.train.optim import Precision, build_optimizer

TITLE = "bench.ray_overhead: Ray Train + Ray Data vs a plain PyTorch loop"
TILE_MARGIN = 8
"""Tiles are the crop plus this many pixels, as the released 264 px tiles around 256 px crops (spec 9)."""
DATA_SEEDS = (11, 12)
EPOCH_METRIC = "train/loss"
CPU_SAMPLE_INTERVAL_S = 0.5
PROCESS_GROUPS = ("train_worker", "other_ray_workers", "ray_daemons")
"""Who used the CPU during the Ray run: the Ray Train worker, Ray's other workers, Ray's daemons."""


def synthesize_sets(root: Path, args: argparse.Namespace) -> tuple[str, str]:
    """Training and held-out pretraining shards under ``root``."""
    tile = args.size + TILE_MARGIN
    train, heldout = root / "train", root / "heldout"
    synthesize(train, "pretrain", args.locations, tile, DATA_SEEDS[0], overwrite=True)
    synthesize(heldout, "pretrain", args.heldout, tile, DATA_SEEDS[1], overwrite=True)
    return str(train), str(heldout)


def bench_config(args: argparse.Namespace, train: str, heldout: str, root: Path) -> PretrainConfig:
    """The reference CromSS objective on the benchmark's data, tracked in a private MLflow store.

    Every call names a new run, so repeated runs never resume one another's checkpoints.
    """
    overrides = [
        f"data.uri={train}",
        f"data.val_uri={heldout}",
        f"data.crop={args.size}",
        f"model.encoder={args.encoder}",
        f"optim.epochs={args.epochs}",
        f"optim.batch_size={args.batch}",
        "optim.scheduler=none",
        f"cromss.ramp_length={max(1, args.epochs // 2)}",
        f"scaling.num_workers={args.workers}",
        f"scaling.cpus_per_worker={args.cpus_per_worker}",
        f"scaling.precision={args.precision}",
        f"run.name=bench-ray-overhead-{uuid.uuid4().hex[:8]}",
        f"run.storage_path={root / 'runs'}",
        f"run.checkpoint_frequency={args.epochs}",
        "run.checkpoints_to_keep=1",
        "run.validation_figures=0",
        f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
        "tracking.log_model=false",
    ]
    return build_config(PretrainConfig, {}, overrides)


def plain_epochs(config: PretrainConfig, device: torch.device) -> tuple[list[float], list[float]]:
    """Wall and process-CPU seconds of every epoch (train + validate) of the trainer's loop functions, without Ray."""
    clock = EpochCounter()
    shards = scan_shards(config.data.uri)
    meta = shards.meta
    draw = SampleDraw(True, config.run.seed, config.data.rotation_probability, clock)
    train = InMemoryShard(
        shards,
        CutSamples(meta, config.data.s2_bands, config.data.crop, draw, labels_all=config.cromss.prior != "none"),
        clock,
        shuffle_seed=config.run.seed,
    )
    held = scan_shards(config.data.val_uri)
    held_cut = CutSamples(held.meta, config.data.s2_bands, config.data.crop, SampleDraw(False))
    heldout = InMemoryShard(held, held_cut, EpochCounter())
    precision = Precision.on(device, config.scaling.precision)
    context = pretrain.WorkerContext(config, meta, device, precision, pretrain.build_criterion(config, meta.nodata))
    torch.manual_seed(config.run.seed)
    model = config.model
    network = build_model(model.fusion, model.encoder, len(meta.s1.bands), config.data.s2_bands, meta.num_classes)
    network.to(device)
    state = TrainingState(network, build_optimizer(network.parameters(), config.optim), None, precision.grad_scaler())
    wall, cpu = [], []
    for epoch in range(config.optim.epochs):
        clock.epoch = epoch
        started, started_cpu = time.perf_counter(), time.process_time()
        pretrain.train_epoch(context, state, train, epoch)
        pretrain.validate(context, network, heldout, epoch, figures=0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    return wall, cpu


def process_table() -> dict[int, tuple[int, float, str]]:
    """``pid -> (parent pid, CPU seconds used so far, command line)`` of every process ``/proc`` lets us read."""
    ticks = os.sysconf("SC_CLK_TCK")
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{entry.name}/cmdline", "rb") as cmdline:
                command = cmdline.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        # After the command name: state, ppid, ..., utime and stime are fields 14 and 15 of proc(5).
        table[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks, command)
    return table


def process_group(command: str) -> str:
    """The group of a Ray process by its title: Ray names its workers ``ray::<task or actor>``."""
    if not command.startswith("ray::"):
        return "ray_daemons"
    return "train_worker" if "RayTrainWorker" in command else "other_ray_workers"


class ProcessTreeCpu:
    """CPU seconds that this process's descendants (Ray's daemons and workers) use while a block runs, by group.

    A thread samples ``/proc`` every ``interval`` seconds and keeps each process's latest
    CPU time, so a process that exits loses at most its last interval. A worker once
    seen running the Ray Train worker counts as the training worker for good (an idle
    Ray worker takes on the actor's title only when it starts it). Every sample keeps the
    CPU time per process, and any span is summed per process and grouped by each process's
    last known group, so a process changing group between samples moves no time between them.
    """

    def __init__(self, interval: float = CPU_SAMPLE_INTERVAL_S) -> None:
        self.interval = interval
        self.root = os.getpid()
        self.cpu: dict[int, float] = {}
        self.baseline: dict[int, float] = {}
        self.timeline: list[tuple[float, dict[int, float]]] = []
        self.group: dict[int, str] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def sample(self) -> None:
        table = process_table()
        children: dict[int, list[int]] = {}
        for pid, (parent, _, _) in table.items():
            children.setdefault(parent, []).append(pid)
        pending = list(children.get(self.root, []))
        while pending:
            pid = pending.pop()
            pending.extend(children.get(pid, []))
            _, seconds, command = table[pid]
            self.cpu[pid] = max(seconds, self.cpu.get(pid, 0.0))
            if self.group.get(pid) != "train_worker":
                self.group[pid] = process_group(command)
        self.timeline.append((time.time(), dict(self.cpu)))

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> ProcessTreeCpu:
        self.sample()
        self.baseline = dict(self.cpu)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.sample()

    def seconds(self) -> dict[str, float]:
        """CPU seconds per group of :data:`PROCESS_GROUPS` since the block began."""
        return self.grouped(self.baseline, self.cpu)

    def seconds_between(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds per group between the samples nearest to the Unix times ``start`` and ``end``."""

        def nearest(moment: float) -> dict[int, float]:
            return min(self.timeline, key=lambda entry: abs(entry[0] - moment))[1]

        return self.grouped({**self.baseline, **nearest(start)}, nearest(end))

    def grouped(self, earlier: dict[int, float], later: dict[int, float]) -> dict[str, float]:
        """Per group, the CPU seconds its processes used from ``earlier`` to ``later`` (per-process times)."""
        totals = dict.fromkeys(PROCESS_GROUPS, 0.0)
        for pid, seconds in later.items():
            totals[self.group[pid]] += seconds - earlier.get(pid, 0.0)
        return totals


def ray_epochs(config: PretrainConfig) -> tuple[list[float], float]:
    """Unix times at which the real trainer ended each epoch (rank 0's MLflow timestamps), and the run's wall time."""
    started = time.perf_counter()
    outcome = pretrain.run_pretrain(config)
    wall = time.perf_counter() - started
    history = MlflowClient(config.tracking.resolved_uri()).get_metric_history(outcome.run_id, EPOCH_METRIC)
    return [metric.timestamp / 1e3 for metric in sorted(history, key=lambda metric: metric.step)], wall


@dataclass(frozen=True)
class Run:
    """One comparison: the plain loop, the Ray run on a fresh local cluster, the plain loop again."""

    load_average_1min: float
    plain_before_s: list[float]
    plain_after_s: list[float]
    plain_cpu_s: list[float]
    ray_gaps_s: list[float]
    ray_wall_s: float
    ray_process_cpu_s: dict[str, float]
    ray_timed_epochs_cpu_s: dict[str, float]
    driver_cpu_s: float

    @property
    def plain_steady(self) -> list[float]:
        """Every plain epoch but the warm-up epoch of each of the two plain runs."""
        return self.plain_before_s[1:] + self.plain_after_s[1:]

    @property
    def plain_median(self) -> float:
        return statistics.median(self.plain_steady)

    @property
    def ray_median(self) -> float:
        return statistics.median(self.ray_gaps_s)

    @property
    def overhead_pct(self) -> float:
        return 100 * (self.ray_median - self.plain_median) / self.plain_median

    @property
    def ray_epoch_cpu_s(self) -> float:
        """CPU seconds of all the Ray run's processes per timed epoch (worker, data tasks, daemons)."""
        return sum(self.ray_timed_epochs_cpu_s.values()) / len(self.ray_gaps_s)

    @property
    def cpu_overhead_pct(self) -> float:
        """The overhead in CPU time per epoch: unlike wall time, it does not depend on who else shares the cores."""
        plain = statistics.median(self.plain_cpu_s)
        return 100 * (self.ray_epoch_cpu_s - plain) / plain


def compare_once(args: argparse.Namespace, train: str, heldout: str, root: Path, device: torch.device) -> Run:
    """One run of the comparison, with a fresh Ray cluster unless the caller already started one."""
    load = os.getloadavg()[0]
    config = bench_config(args, train, heldout, root)
    before, before_cpu = plain_epochs(config, device)
    started_here = not ray.is_initialized()
    driver_started = time.process_time()
    with ProcessTreeCpu() as tree:
        if started_here:
            start_local_ray(include_dashboard=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            ends, wall = ray_epochs(config)
        finally:
            if started_here:
                ray.shutdown()
    driver_cpu = time.process_time() - driver_started
    after, after_cpu = plain_epochs(config, device)
    gaps = [later - earlier for earlier, later in zip(ends, ends[1:])]
    timed_cpu = tree.seconds_between(ends[0], ends[-1])
    return Run(load, before, after, before_cpu[1:] + after_cpu[1:], gaps, wall, tree.seconds(), timed_cpu, driver_cpu)


def value_range(values: Sequence[float], unit: str, what: str) -> str:
    """``min .. max unit over n what``."""
    return f"{min(values):.2f} .. {max(values):.2f}{unit} over {len(values)} {what}"


def comparison_section(runs: Sequence[Run], samples: int) -> Section:
    """Medians over runs of each run's median epoch and overhead, and their ranges."""
    plain = statistics.median(run.plain_median for run in runs)
    ray_epoch = statistics.median(run.ray_median for run in runs)
    overheads = [run.overhead_pct for run in runs]
    walls = [run.ray_wall_s for run in runs]
    return {
        "runs": len(runs),
        "plain_epoch_s": plain,
        "plain_epoch_spread": value_range([s for run in runs for s in run.plain_steady], " s", "epochs"),
        "plain_first_epochs_s": ", ".join(f"{run.plain_before_s[0]:.2f}, {run.plain_after_s[0]:.2f}" for run in runs),
        "ray_epoch_s": ray_epoch,
        "ray_epoch_spread": value_range([s for run in runs for s in run.ray_gaps_s], " s", "gaps"),
        "plain_samples_per_s": samples / plain,
        "ray_samples_per_s": samples / ray_epoch,
        "overhead_pct": statistics.median(overheads),
        "overhead_pct_range": value_range(overheads, " %", "runs"),
        "ray_run_wall_s": statistics.median(walls),
        "ray_startup_first_epoch_finish_s": statistics.median(run.ray_wall_s - sum(run.ray_gaps_s) for run in runs),
    }


def cpu_section(runs: Sequence[Run]) -> Section:
    """Medians over runs: CPU seconds of the Ray run's processes per group, over the whole run and per timed
    epoch (between the first and the last epoch's end), the cores the run kept busy on average, and the
    overhead in CPU seconds per epoch against the plain loop's."""
    rows: Section = {}
    for group in (*PROCESS_GROUPS, "driver"):
        seconds = [run.driver_cpu_s if group == "driver" else run.ray_process_cpu_s[group] for run in runs]
        rows[f"{group}_cpu_s"] = statistics.median(seconds)
    for group in PROCESS_GROUPS:
        rows[f"{group}_cpu_s_per_timed_epoch"] = statistics.median(
            run.ray_timed_epochs_cpu_s[group] / len(run.ray_gaps_s) for run in runs
        )
    rows["ray_run_cores_busy"] = statistics.median(
        (sum(run.ray_process_cpu_s.values()) + run.driver_cpu_s) / run.ray_wall_s for run in runs
    )
    rows["plain_epoch_cpu_s"] = statistics.median(s for run in runs for s in run.plain_cpu_s)
    rows["ray_epoch_cpu_s"] = statistics.median(run.ray_epoch_cpu_s for run in runs)
    rows["cpu_overhead_pct"] = statistics.median(run.cpu_overhead_pct for run in runs)
    rows["cpu_overhead_pct_range"] = value_range([run.cpu_overhead_pct for run in runs], " %", "runs")
    rows["load_average_1min_at_starts"] = ", ".join(f"{run.load_average_1min:.2f}" for run in runs)
    return rows


def run_details(runs: Sequence[Run], complete: bool) -> dict[str, object]:
    """The JSON report's record of every run, and whether all asked-for runs finished."""
    derived = ("overhead_pct", "ray_epoch_cpu_s", "cpu_overhead_pct")
    records = [{**asdict(run), **{key: getattr(run, key) for key in derived}} for run in runs]
    return {"complete": complete, "runs": records}


def write_runs(path: Path, runs: Sequence[Run], complete: bool) -> None:
    """Write the runs finished so far, so that a later run's failure (e.g. Ray failing to start) loses none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"title": TITLE, **run_details(runs, complete)}, indent=2) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.ray_overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--locations", type=int, default=32, help="training locations (default 32)")
    parser.add_argument("--heldout", type=int, default=8, help="validation locations (default 8)")
    parser.add_argument("--size", type=int, default=64, help="crop side in px, a multiple of 32 (default 64)")
    parser.add_argument(
        "--epochs", type=int, default=8, help="epochs per run, the first one a warm-up (default 8: a median of 7)"
    )
    parser.add_argument("--runs", type=int, help="repeats of the whole comparison (default 3, 1 with --quick)")
    parser.add_argument("--batch", type=int, default=8, help="samples per step and worker (default 8)")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (the plain loop is one process)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs of a Ray Train worker (default 1)")
    parser.add_argument(
        "--precision", choices=("fp32", "bf16"), default="fp32", help="autocast on a GPU (default fp32)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke size: 4 locations of 32 px, 2 epochs, 1 run")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    return parser


def resolve_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """Apply ``--quick`` and the default run count; reject sizes the comparison cannot take."""
    if args.quick:
        args.locations, args.heldout, args.size, args.epochs, args.batch = 4, 2, 32, 2, 2
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    check_crop(args.size)
    if args.epochs < 2:
        raise SystemExit(f"--epochs {args.epochs}: need at least 2 (the first epoch is a warm-up)")
    if args.runs < 1:
        raise SystemExit(f"--runs {args.runs}: must be at least 1")
    if min(args.locations, args.heldout, args.batch, args.workers) < 1 or args.cpus_per_worker <= 0:
        raise SystemExit("--locations, --heldout, --batch and --workers must be at least 1, --cpus-per-worker above 0")
    if args.locations < args.workers * args.batch:
        raise SystemExit(
            f"--locations {args.locations}: need at least one batch per worker ({args.workers} x {args.batch})"
        )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = resolve_arguments(build_parser().parse_args(argv))
    device = resolve_device("auto")
    threads = max(int(args.cpus_per_worker), 1)
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="cromss-ray-bench-") as scratch:
        root = Path(scratch)
        train, heldout = synthesize_sets(root, args)
        fusion = bench_config(args, train, heldout, root).model.fusion
        runs: list[Run] = []
        for _ in range(args.runs):
            runs.append(compare_once(args, train, heldout, root, device))
            if args.json is not None:
                write_runs(args.json, runs, complete=False)
    setup: Section = {
        "encoder": args.encoder,
        "fusion": fusion,
        "train_locations": args.locations,
        "heldout_locations": args.heldout,
        "crop_px": args.size,
        "batch_per_worker": args.batch,
        "epochs_per_run": args.epochs,
        "ray_workers": args.workers,
        "cpus_per_worker": args.cpus_per_worker,
        "plain_loop_threads": threads,
        "precision": Precision.on(device, args.precision).name,
    }
    sections = {
        "machine": machine_section(device),
        "setup": setup,
        "per_epoch": comparison_section(runs, args.locations + args.heldout),
        "ray_run_cpu": cpu_section(runs),
    }
    publish(TITLE, sections, args.json, run_details(runs, complete=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
