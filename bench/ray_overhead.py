"""What Ray Train and Ray Data cost per pretraining epoch, against a plain PyTorch loop (issue 8).

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

The first epoch of every run is a warm-up and left out; the figure is the median epoch.
``overhead_pct = 100 * (ray - plain) / plain``; samples/s count the training and
validation samples of an epoch. Start-up (workers, datasets, MLflow run), the first
epoch and the finish (checkpoint, run closed) of the Ray run are reported apart. Run from the repository root::

    python -m bench.ray_overhead                     # CPU: 32 locations of 64 px, resnet18
    python -m bench.ray_overhead --locations 512 --size 256 --encoder resnet50 --batch 32
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import ray
import ray.data
import torch
from mlflow import MlflowClient

from bench.common import Section, machine_section, publish, resolve_device
from bench.in_memory import EpochCounter, InMemoryShard
from cromss_ray.config import PretrainConfig, build_config
from cromss_ray.data.storage import scan_shards
from cromss_ray.data.synth import synthesize
from cromss_ray.data.transforms import CutSamples, SampleDraw
from cromss_ray.method import build_model
from cromss_ray.train import pretrain
from cromss_ray.train.checkpoints import TrainingState
from cromss_ray.train.cluster import LOCAL_HOST
from cromss_ray.train.optim import Precision, build_optimizer

TITLE = "bench.ray_overhead: Ray Train + Ray Data vs a plain PyTorch loop"
TILE_MARGIN = 8
"""Tiles are the crop plus this many pixels, as the released 264 px tiles around 256 px crops (spec 9)."""
DATA_SEEDS = (11, 12)
EPOCH_METRIC = "train/loss"


def synthesize_sets(root: Path, args: argparse.Namespace) -> tuple[str, str]:
    """Training and held-out pretraining shards under ``root``."""
    tile = args.size + TILE_MARGIN
    train, heldout = root / "train", root / "heldout"
    synthesize(train, "pretrain", args.locations, tile, DATA_SEEDS[0], overwrite=True)
    synthesize(heldout, "pretrain", args.heldout, tile, DATA_SEEDS[1], overwrite=True)
    return str(train), str(heldout)


def bench_config(args: argparse.Namespace, train: str, heldout: str, root: Path) -> PretrainConfig:
    """The reference CromSS objective on the benchmark's data, tracked in a private MLflow store."""
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


def plain_epochs(config: PretrainConfig, device: torch.device) -> list[float]:
    """Seconds of every epoch (train + validate) of the trainer's loop functions, without Ray."""
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
    seconds = []
    for epoch in range(config.optim.epochs):
        clock.epoch = epoch
        started = time.perf_counter()
        pretrain.train_epoch(context, state, train, epoch)
        pretrain.validate(context, network, heldout, epoch, figures=0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - started)
    return seconds


def ray_epochs(config: PretrainConfig) -> tuple[list[float], float]:
    """Seconds of every epoch but the first of the real trainer (MLflow timestamp gaps), and the run's wall time."""
    started = time.perf_counter()
    outcome = pretrain.run_pretrain(config)
    wall = time.perf_counter() - started
    history = MlflowClient(config.tracking.resolved_uri()).get_metric_history(outcome.run_id, EPOCH_METRIC)
    stamps = [metric.timestamp for metric in sorted(history, key=lambda metric: metric.step)]
    return [(later - earlier) / 1e3 for earlier, later in zip(stamps, stamps[1:])], wall


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.ray_overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--locations", type=int, default=32, help="training locations (default 32)")
    parser.add_argument("--heldout", type=int, default=8, help="validation locations (default 8)")
    parser.add_argument("--size", type=int, default=64, help="crop side in px, a multiple of 32 (default 64)")
    parser.add_argument(
        "--epochs", type=int, default=8, help="epochs per run, the first one a warm-up (default 8: a median of 7)"
    )
    parser.add_argument("--batch", type=int, default=8, help="samples per step and worker (default 8)")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (the plain loop is one process)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs of a Ray Train worker (default 1)")
    parser.add_argument(
        "--precision", choices=("fp32", "bf16"), default="fp32", help="autocast on a GPU (default fp32)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke size: 4 locations of 32 px, 2 epochs")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    return parser


def resolve_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """Apply ``--quick`` and reject sizes the comparison cannot take."""
    if args.quick:
        args.locations, args.heldout, args.size, args.epochs, args.batch = 4, 2, 32, 2, 2
    if args.size % 32 or args.size < 32:
        raise SystemExit(f"--size {args.size}: must be a positive multiple of 32 (the encoders' output stride)")
    if args.epochs < 2:
        raise SystemExit(f"--epochs {args.epochs}: need at least 2 (the first epoch is a warm-up)")
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
        config = bench_config(args, train, heldout, root)
        plain_before = plain_epochs(config, device)
        started_here = not ray.is_initialized()
        if started_here:
            ray.init(include_dashboard=False, _node_ip_address=LOCAL_HOST)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            ray_seconds, ray_wall = ray_epochs(config)
        finally:
            if started_here:
                ray.shutdown()
        plain_after = plain_epochs(config, device)
    plain_steady = plain_before[1:] + plain_after[1:]
    plain_median, ray_median = statistics.median(plain_steady), statistics.median(ray_seconds)
    samples = args.locations + args.heldout
    setup: Section = {
        "encoder": args.encoder,
        "fusion": config.model.fusion,
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
    comparison: Section = {
        "plain_epoch_s": plain_median,
        "plain_epoch_spread": f"{min(plain_steady):.2f} .. {max(plain_steady):.2f} s over {len(plain_steady)}",
        "plain_first_epochs_s": f"{plain_before[0]:.2f}, {plain_after[0]:.2f}",
        "ray_epoch_s": ray_median,
        "ray_epoch_spread": f"{min(ray_seconds):.2f} .. {max(ray_seconds):.2f} s over {len(ray_seconds)} gaps",
        "plain_samples_per_s": samples / plain_median,
        "ray_samples_per_s": samples / ray_median,
        "overhead_pct": 100 * (ray_median - plain_median) / plain_median,
        "ray_run_wall_s": ray_wall,
        "ray_startup_first_epoch_finish_s": ray_wall - sum(ray_seconds),
    }
    publish(TITLE, {"machine": machine_section(device), "setup": setup, "per_epoch": comparison}, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
