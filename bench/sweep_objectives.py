"""What each sweep objective picks, on synthetic data whose clean labels are known.

A sweep on real pretraining data can judge its trials only by labels as noisy as the
training labels (``tune.objective: noisy_validation``), which rewards a network for
memorising the noise, or by a short frozen-encoder transfer on a few clean downstream
tiles (``transfer``). Synthetic NoLDO-S12-like shards carry the clean labels too, so the
truth both stand in for (``clean_validation``) can be measured beside them.

This runs one real ``cromss tune`` sweep (Ray Tune over Ray Train, tracked in a private
MLflow store) in the memorisation regime of ``bench.noise_robustness``: a grid over
fusion and cross-modal selection, a held learning rate, the transfer probe every
``--probe-every`` epochs, no early stopping, so every trial logs all three scores
every epoch. For each objective it reports the trial it picks (the best value over
epochs, as the sweep's results table ranks trials), the epoch of that value, and the
clean-label score of the pick: its best over epochs and its value at the picked epoch,
each beside the clean pick's. Run from the repository root::

    python -m bench.sweep_objectives --json docs/results/sweep-objectives-cpu.json
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray
from ray.tune import ExperimentAnalysis

from bench.common import Row, Section, check_crop, machine_section, publish, resolve_device
from bench.noise_robustness import RAMP_SHARE, S2_BANDS, SMALL_ENCODER, TILE_MARGIN, synthesize_sets
from cromss_ray.config import TuneConfig, build_config
from cromss_ray.data.synth import synthesize
from cromss_ray.train.cluster import start_local_ray
from cromss_ray.tune.sweep import DATA_CPUS_PER_TRIAL, run_sweep

TITLE = "bench.sweep_objectives: what noisy-validation, clean-validation and transfer objectives pick"
OBJECTIVES = {
    "noisy_validation": "val/s2/miou",
    "clean_validation": "val_clean/s2/miou",
    "transfer": "transfer/s2/miou",
}
"""Each objective's metric, as ``tune.objective`` names it (README, "Declaring a sweep")."""
CLEAN = "clean_validation"
EPOCH = "epoch"
PROBE_SEED = 303
"""Scene seed of the downstream probe tiles (the pretraining sets use ``bench.noise_robustness``'s)."""


@dataclass(frozen=True)
class Peak:
    """The best value of one metric over a trial's epochs (the first, on ties) and its epoch."""

    value: float
    epoch: int


def best_epoch(epochs: Sequence[int], values: Sequence[float]) -> Peak:
    """The first maximum of ``values`` (NaN never wins) and the epoch it was reported at."""
    finite = [(value, epoch) for value, epoch in zip(values, epochs, strict=True) if math.isfinite(value)]
    if not finite:
        raise ValueError("no finite value to pick from")
    best = max(range(len(finite)), key=lambda index: finite[index][0])
    return Peak(*finite[best])


@dataclass(frozen=True)
class TrialCurves:
    """One trial: its sampled values and, per epoch, each objective's metric."""

    trial_id: str
    sampled: dict[str, object]
    epochs: list[int]
    scores: dict[str, list[float]]

    def peak(self, objective: str) -> Peak:
        return best_epoch(self.epochs, self.scores[objective])

    def at(self, objective: str, epoch: int) -> float:
        return self.scores[objective][self.epochs.index(epoch)]


@dataclass(frozen=True)
class Pick:
    """The trial an objective picks and what the clean labels say of it."""

    objective: str
    trial_id: str
    epoch: int
    value: float
    clean_best: float
    clean_at_epoch: float


def picks(trials: Sequence[TrialCurves]) -> list[Pick]:
    """Per objective, the trial with the best value over its epochs (the first on ties), with the
    clean-validation score of that trial: its best over epochs and its value at the picked epoch."""
    if not trials:
        raise ValueError("no trial to pick from")
    chosen = []
    for objective in OBJECTIVES:
        trial = max(trials, key=lambda candidate: candidate.peak(objective).value)
        peak = trial.peak(objective)
        clean_best, clean_at_epoch = trial.peak(CLEAN).value, trial.at(CLEAN, peak.epoch)
        chosen.append(Pick(objective, trial.trial_id, peak.epoch, peak.value, clean_best, clean_at_epoch))
    return chosen


def trial_curves(
    frames: Mapping[str, Any], configs: Mapping[str, Mapping[str, object]], keys: Sequence[str]
) -> list[TrialCurves]:
    """:class:`TrialCurves` from Tune's per-trial result frames (pandas), in trial-id order."""
    trials = []
    for trial_id in sorted(frames):
        frame = frames[trial_id]
        missing = [metric for metric in (EPOCH, *OBJECTIVES.values()) if metric not in frame]
        if missing:
            raise ValueError(f"trial {trial_id} reported no {', '.join(missing)}")
        scores = {objective: [float(v) for v in frame[metric]] for objective, metric in OBJECTIVES.items()}
        sampled = {key: configs[trial_id].get(key) for key in keys}
        trials.append(TrialCurves(trial_id, sampled, [int(e) for e in frame[EPOCH]], scores))
    return trials


def sweep_config(
    args: argparse.Namespace, root: Path, pretrain_uri: str, heldout_uri: str, probe_uri: str
) -> TuneConfig:
    """The sweep: the noise benchmark's regime (its network, sizes and held learning rate) on one
    noise rate, a grid over fusion and selection, FIFO (every trial runs every epoch)."""
    grid = f"{{model.fusion: {{grid: {list(args.fusions)}}}, cromss.selection: {{grid: {list(args.selection)}}}}}"
    overrides = [
        f"data.uri={pretrain_uri}",
        f"data.val_uri={heldout_uri}",
        f"data.crop={args.size}",
        f"data.s2_bands={S2_BANDS}",
        f"model.encoder={args.encoder}",
        f"cromss.ramp_length={max(1, round(RAMP_SHARE * args.epochs))}",
        f"optim.lr={args.lr}",
        f"optim.batch_size={args.batch}",
        f"optim.epochs={args.epochs}",
        "optim.scheduler=none",
        "scaling.num_workers=1",
        f"scaling.cpus_per_worker={args.cpus_per_worker}",
        "run.name=sweep-objectives",
        f"run.storage_path={root / 'runs'}",
        f"run.checkpoint_frequency={args.epochs}",
        "run.checkpoints_to_keep=1",
        "run.validation_figures=0",
        f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
        "tune.search_alg=grid",
        "tune.num_samples=1",
        "tune.scheduler=none",
        "tune.objective=transfer",
        f"tune.max_concurrent_trials={args.concurrent}",
        f"tune.search_space={grid}",
        f"tune.transfer.data={probe_uri}",
        f"tune.transfer.every={args.probe_every}",
        f"tune.transfer.crop={args.size}",
    ]
    return build_config(TuneConfig, {}, overrides)


def switch(text: str) -> bool:
    """``true`` or ``false`` (any case) as a bool, for grid values on the command line."""
    values = {"true": True, "false": False}
    if text.lower() not in values:
        raise argparse.ArgumentTypeError(f"{text!r}: expected true or false")
    return values[text.lower()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.sweep_objectives", description=__doc__.split("\n\n")[0])
    parser.add_argument("--locations", type=int, default=8, help="pretraining locations (default 8)")
    parser.add_argument("--heldout", type=int, default=8, help="validation locations (noisy and clean labels)")
    parser.add_argument("--probe-tiles", type=int, default=24, help="clean downstream tiles of the transfer probe")
    parser.add_argument("--size", type=int, default=64, help="crop side in px (default 64)")
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate, held")
    parser.add_argument("--encoder", default=SMALL_ENCODER)
    parser.add_argument("--noise-rate", type=float, default=0.4)
    parser.add_argument("--fusions", nargs="+", choices=("mid", "late"), default=["mid", "late"])
    parser.add_argument(
        "--selection", nargs="+", type=switch, default=[True, False], help="cromss.selection values: true and/or false"
    )
    parser.add_argument("--probe-every", type=int, default=10, help="pretraining epochs between transfer probes")
    parser.add_argument("--concurrent", type=int, default=2, help="trials at a time (default 2)")
    parser.add_argument("--cpus-per-worker", type=float, default=0.5)
    parser.add_argument("--work-dir", type=Path, help="shards, sweep folder and MLflow store (default: temporary)")
    parser.add_argument("--quick", action="store_true", help="smoke size: 4 locations of 32 px, 3 epochs, mid only")
    parser.add_argument("--json", type=Path, help="write the report and every trial's curves here as JSON")
    return parser


def resolve_arguments(args: argparse.Namespace) -> argparse.Namespace:
    if args.quick:
        args.locations, args.heldout, args.probe_tiles, args.size, args.epochs = 4, 2, 16, 32, 3
        args.fusions, args.probe_every = ["mid"], 2
    check_crop(args.size)
    sizes = (args.locations, args.heldout, args.probe_tiles, args.epochs, args.batch, args.probe_every, args.concurrent)
    if min(sizes) < 1:
        raise SystemExit("sizes, --probe-every and --concurrent must be at least 1")
    return args


def write_data(root: Path, args: argparse.Namespace) -> tuple[str, str, str]:
    """Pretraining and validation shards at one noise rate (the noise benchmark's scenes) and clean probe tiles."""
    sizes = {"locations": args.locations, "heldout": args.heldout, "size": args.size}
    sets = synthesize_sets(root, [args.noise_rate], **sizes)
    probe = root / "probe-dw"
    synthesize(probe, "dw", args.probe_tiles, args.size + TILE_MARGIN, PROBE_SEED, overwrite=True)
    return sets.pretrain[args.noise_rate], sets.heldout[args.noise_rate], str(probe)


def trial_rows(trials: Sequence[TrialCurves]) -> Section:
    """Per trial: its sampled values and each objective's best over epochs (with the epoch)."""
    section: Section = {}
    for trial in trials:
        label = " ".join(f"{key.rpartition('.')[2]}={value}" for key, value in trial.sampled.items())
        section[f"{trial.trial_id}.sampled"] = label
        for objective in OBJECTIVES:
            peak = trial.peak(objective)
            section[f"{trial.trial_id}.{objective}_best_pct"] = f"{100 * peak.value:.2f} (epoch {peak.epoch})"
        section[f"{trial.trial_id}.clean_validation_last_pct"] = f"{100 * trial.scores[CLEAN][-1]:.2f}"
    return section


def pick_rows(chosen: Sequence[Pick]) -> Section:
    """Per objective: the pick, and its clean score against the clean pick's (percentage points)."""
    clean = next(pick for pick in chosen if pick.objective == CLEAN)
    section: dict[str, Row] = {}
    for pick in chosen:
        section[f"{pick.objective}.trial"] = f"{pick.trial_id} (epoch {pick.epoch}, {100 * pick.value:.2f} %)"
        section[f"{pick.objective}.clean_best_pct"] = f"{100 * pick.clean_best:.2f}"
        section[f"{pick.objective}.clean_at_picked_epoch_pct"] = f"{100 * pick.clean_at_epoch:.2f}"
        gap = pick.clean_best - clean.clean_best
        section[f"{pick.objective}.clean_best_minus_clean_pick_pp"] = f"{100 * gap:+.2f}"
    return section


def main(argv: Sequence[str] | None = None) -> int:
    args = resolve_arguments(build_parser().parse_args(argv))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cromss-sweep-bench-") as scratch:
        root = args.work_dir or Path(scratch)
        config = sweep_config(args, root, *write_data(root, args))
        cpus = math.ceil(args.concurrent * (args.cpus_per_worker + DATA_CPUS_PER_TRIAL))
        start_local_ray(num_cpus=cpus, include_dashboard=False)
        try:
            result = run_sweep(config)
        finally:
            ray.shutdown()
        analysis = ExperimentAnalysis(result.path)
        configs = {trial.trial_id: trial.config for trial in analysis.trials}
        trials = trial_curves(analysis.trial_dataframes, configs, list(config.tune.search_space))
    chosen = picks(trials)
    sections = {
        "machine": machine_section(resolve_device("cpu")),
        "setup": {
            "encoder": args.encoder,
            "pretrain_locations": args.locations,
            "validation_locations": args.heldout,
            "probe_tiles": args.probe_tiles,
            "crop_px": args.size,
            "epochs": args.epochs,
            "lr_held": args.lr,
            "noise_rate": args.noise_rate,
            "probe_every_epochs": args.probe_every,
        },
        "trials": trial_rows(trials),
        "picks": pick_rows(chosen),
        "timing": {"total_s": time.perf_counter() - started},
    }
    curves = [{"trial": t.trial_id, "sampled": t.sampled, "epochs": t.epochs, "scores": t.scores} for t in trials]
    publish(TITLE, sections, args.json, {"trials": curves, "picks": [asdict(pick) for pick in chosen]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
