"""Noise robustness of CromSS in the memorisation regime, on synthetic data whose true labels are known.

Noisy-label methods pay off once a network starts to memorise the noise: its score against
the clean labels peaks, then falls. Synthetic NoLDO-S12-like locations
(:mod:`cromss_ray.data.synth`) carry Dynamic-World-like noisy labels with an exact
corrupted-pixel rate next to the clean labels they came from, and a small network trained
long on few of them reaches that regime on a CPU. For every noise rate and seed this
pretrains, on the same locations and batches,

* ``s2_only``: an S2-only U-Net on the noisy labels (cross-entropy + Dice), the naive baseline;
* ``multimodal``: both branches, no selection, no smoothing (consistency with v = 1);
* ``cromss``: cross-modal selection and spatial-temporal label smoothing, the reference setting;
* optionally ``smoothing`` or ``selection`` alone (``--variants``);

the multimodal ones for middle and late fusion. After every epoch it scores the S2 branch
(and the fused prediction) on held-out locations against their clean labels, and reads
the noise diagnostics (:class:`~cromss_ray.method.NoiseDiagnostics`) of the epoch's
training pixels: selection precision, noise recall, the AUROC of the trust score as a
detector of corrupted labels, and the base rate. For ``s2_only`` the trust score is the
network's own label confidence ``p_y`` (spec 3) at weight 1, so its AUROC says how well a
single modality's confidence alone detects the noise.

Each clean-label curve is smoothed by a trailing mean over ``--window`` epochs: its maximum
is the peak, its last value the final score, and final minus peak the loss to
memorisation. Runs of the same seed see the same data and batches, so variants are
compared by paired per-seed differences with a 95 % t-interval over the seeds.

Runs go without Ray, on :class:`bench.in_memory.InMemoryShard` batches cut by the pipeline's
own UDF; the multimodal runs call the pretraining loop's ``train_epoch`` and ``validate``,
so the per-step code and the method math are the trainer's (:mod:`cromss_ray.method`).
``s2_only`` has its own short loop: the pretraining loop trains two-branch networks only.
The learning rate is held (no schedule); the selection ramp is 40 % of the epochs (the
reference's 80 of 200). Run from the repository root::

    python -m bench.noise_robustness --jobs 2 --threads 1 --json docs/results/noise-robustness-memorisation-cpu.json
    python -m bench.noise_robustness --setting gpu --json noise-robustness-memorisation-gpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from scipy import stats
from torch import nn

from bench.common import Section, check_crop, machine_section, mean_std, publish, resolve_device
from bench.in_memory import EpochCounter, InMemoryShard
from cromss_ray.config import PretrainConfig, build_config
from cromss_ray.data.device import to_device
from cromss_ray.data.schema import ShardMetadata
from cromss_ray.data.storage import scan_shards
from cromss_ray.data.synth import synthesize
from cromss_ray.data.transforms import CutSamples, SampleDraw
from cromss_ray.method import (
    ConfusionMatrix,
    NoiseDiagnostics,
    SingleModalityLoss,
    build_model,
    build_single_model,
    label_confidence,
)
from cromss_ray.train import pretrain
from cromss_ray.train.checkpoints import TrainingState
from cromss_ray.train.optim import Precision, build_optimizer

TITLE = "bench.noise_robustness: CromSS vs naive noisy pretraining in the memorisation regime"
S2_ONLY = "s2_only"
MULTIMODAL = "multimodal"
SMOOTHING_FACTORS = (0.15, 0.05)
PRIOR = "ts"
RAMP_SHARE = 0.4
"""Selection ramp as a share of the epochs: the reference ramps over 80 of 200 epochs (spec 9)."""
TILE_MARGIN = 8
"""Tiles are the crop plus this many pixels, as the released 264 px tiles around 256 px crops (spec 9)."""
S2_BANDS = 13
ROTATION_PROBABILITY = 0.2
"""Training augmentation of the S2-only run, as the pretraining config's default (spec 9)."""
CONFIDENCE = 0.95
DATA_SEEDS = {"pretrain": 101, "heldout": 202}
"""Scene seeds of the synthetic sets: every noise rate shares the pretraining scenes."""
CURVE_SCORE = "s2_clean_miou"
"""The curve whose peak and final value compare the runs: the S2 branch on the held-out clean labels."""
DIAGNOSTICS = ("selected_precision", "noise_recall", "noise_auroc", "base_rate")


@dataclass(frozen=True)
class Variant:
    """One multimodal pretraining setting of the comparison."""

    name: str
    selection: bool
    smoothing: bool


MULTIMODAL_VARIANTS = (
    Variant(MULTIMODAL, False, False),
    Variant("smoothing", False, True),
    Variant("selection", True, False),
    Variant("cromss", True, True),
)


@dataclass(frozen=True)
class Setting:
    """A benchmark size: the defaults of the sizing flags."""

    locations: int
    heldout: int
    size: int
    epochs: int
    batch: int
    lr: float
    encoder: str
    seeds: tuple[int, ...]
    noise_rates: tuple[float, ...]
    fusions: tuple[str, ...]
    window: int


SEEDS = (0, 1, 2, 3, 4)
SMALL_ENCODER = "tu-mobilenetv3_small_050"
"""timm's MobileNetV3-Small at half width under the spec-1 decoder: 2.2 M parameters, ~2.4 times cheaper
per step than resnet18 on one CPU thread at 64 px, and still large enough to memorise 8 locations."""
SETTINGS = {
    "cpu": Setting(8, 8, 64, 150, 4, 1e-3, SMALL_ENCODER, SEEDS, (0.2, 0.4), ("mid", "late"), 5),
    "gpu": Setting(8, 8, 64, 150, 4, 1e-3, SMALL_ENCODER, SEEDS, (0.4,), ("mid",), 5),
}
"""Both in the regime where the baseline memorises the noise (docs/benchmarks.md section 5.1): ``cpu``
the whole comparison, ``gpu`` its mid-fusion part at noise 0.4, estimated under 8 minutes on one GPU."""


@dataclass(frozen=True)
class SyntheticSets:
    """Shard locations of one benchmark: pretraining and held-out sets per noise rate."""

    pretrain: dict[float, str]
    heldout: dict[float, str]
    achieved_noise: dict[float, float]


def synthesize_sets(
    root: Path, noise_rates: Sequence[float], *, locations: int, heldout: int, size: int
) -> SyntheticSets:
    """Write a pretraining and a held-out shard set per noise rate under ``root`` (tiles ``size + TILE_MARGIN`` px)."""
    tile = size + TILE_MARGIN
    pretrain_sets, heldout_sets, achieved = {}, {}, {}
    for noise in noise_rates:
        train_dir, heldout_dir = root / f"pretrain-noise{noise}", root / f"heldout-noise{noise}"
        manifest = synthesize(
            train_dir, "pretrain", locations, tile, DATA_SEEDS["pretrain"], noise, overwrite=True
        )
        synthesize(heldout_dir, "pretrain", heldout, tile, DATA_SEEDS["heldout"], noise, overwrite=True)
        pretrain_sets[noise], heldout_sets[noise] = str(train_dir), str(heldout_dir)
        achieved[noise] = float(manifest.provenance["noise"]["achieved_rate"])
    return SyntheticSets(pretrain_sets, heldout_sets, achieved)


def training_shard(
    uri: str, crop: int, seed: int, clock: EpochCounter, *, labels_all: bool, rotation: float
) -> InMemoryShard:
    """Training samples as the pipeline cuts them: random season, crop, flips and rotation per (seed, epoch, id)."""
    shards = scan_shards(uri)
    draw = SampleDraw(True, seed, rotation, clock)
    seasonal = shards.meta.seasons > 1
    cut = CutSamples(shards.meta, S2_BANDS, crop, draw, seasons_out=seasonal, labels_all=labels_all)
    return InMemoryShard(shards, cut, clock, shuffle_seed=seed)


def evaluation_shard(uri: str, crop: int) -> InMemoryShard:
    """Evaluation samples as the pipeline cuts them: centre crop, the season fixed by the id."""
    shards = scan_shards(uri)
    cut = CutSamples(shards.meta, S2_BANDS, crop, SampleDraw(False), seasons_out=shards.meta.seasons > 1)
    return InMemoryShard(shards, cut, EpochCounter())


def noisy_label_miou(heldout: InMemoryShard) -> float:
    """mIoU of the held-out noisy labels against the clean ones (the score of reproducing the noise)."""
    meta = heldout.cut.meta
    matrix = ConfusionMatrix(meta.num_classes, meta.nodata)
    for batch in heldout.iter_torch_batches(batch_size=64):
        matrix.update(batch["label"].long(), batch["clean_label"].long())
    return float(matrix.compute()["miou"])


@dataclass
class RunResult:
    """One pretraining run: its per-epoch scores (mIoU in [0, 1]), wall and process-CPU seconds.

    ``curve[e]`` holds, after epoch ``e + 1``: ``s2_clean_miou`` (and ``fused_clean_miou``
    for two branches) on the held-out clean labels, and ``<branch>_<diagnostic>`` of the
    epoch's training pixels (:data:`DIAGNOSTICS`).
    """

    noise: float
    seed: int
    fusion: str
    variant: str
    curve: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0

    @property
    def name(self) -> str:
        return self.variant if self.variant == S2_ONLY else f"{self.fusion}.{self.variant}"


@dataclass(frozen=True)
class PeakFinal:
    """Peak and final value of a curve smoothed by a trailing mean (module docstring); epochs 1-based."""

    peak: float
    peak_epoch: int
    final: float

    @property
    def drop(self) -> float:
        """Final minus peak: 0 when the smoothed curve ends at its maximum, negative after memorisation."""
        return self.final - self.peak


def peak_and_final(values: Sequence[float], window: int) -> PeakFinal:
    """Smooth ``values`` (one per epoch) by the trailing mean of ``window`` epochs, from the first
    epoch that has ``window`` before it (all of them when the curve is shorter); the peak is the
    first maximum of the smoothed curve, the final value its last."""
    if not values:
        raise ValueError("an empty curve has no peak")
    width = min(window, len(values))
    smoothed = [statistics.fmean(values[end - width : end]) for end in range(width, len(values) + 1)]
    best = max(range(len(smoothed)), key=smoothed.__getitem__)
    return PeakFinal(smoothed[best], best + width, smoothed[-1])


@dataclass(frozen=True)
class Interval:
    """Mean of paired differences and its two-sided t-interval; bounds NaN for a single pair."""

    mean: float
    low: float
    high: float
    n: int


def t_interval(differences: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """``mean ± t_{(1+confidence)/2, n-1} * s / sqrt(n)`` with ``s`` the sample standard deviation."""
    n = len(differences)
    if n == 0:
        raise ValueError("no differences to summarise")
    mean = statistics.fmean(differences)
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1)
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * statistics.stdev(differences) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def ramp_length(epochs: int) -> int:
    """Selection ramp E for a run of ``epochs`` epochs, at least 1."""
    return max(1, round(RAMP_SHARE * epochs))


def pretrain_config(args: argparse.Namespace, fusion: str, variant: Variant, seed: int) -> PretrainConfig:
    """The pretraining config of one multimodal run."""
    overrides = [
        f"model.fusion={fusion}",
        f"model.encoder={args.encoder}",
        f"data.crop={args.size}",
        f"data.s2_bands={S2_BANDS}",
        "data.prefetch_batches=0",
        f"cromss.selection={variant.selection}",
        f"cromss.smoothing_factors={list(SMOOTHING_FACTORS) if variant.smoothing else []}",
        f"cromss.prior={PRIOR if variant.smoothing else 'none'}",
        f"cromss.ramp_length={ramp_length(args.epochs)}",
        f"optim.lr={args.lr}",
        f"optim.batch_size={args.batch}",
        f"optim.epochs={args.epochs}",
        "optim.scheduler=none",
        f"run.seed={seed}",
    ]
    return build_config(PretrainConfig, {}, overrides)


def branch_diagnostics(metrics: Mapping[str, float], split: str) -> dict[str, float]:
    """``<branch>_<diagnostic>`` from the trainer's ``<split>/<branch>/<diagnostic>`` metrics."""
    return {
        f"{branch}_{name}": metrics[f"{split}/{branch}/{name}"] for branch in ("s1", "s2") for name in DIAGNOSTICS
    }


def pretrain_multimodal(
    config: PretrainConfig, sets: SyntheticSets, noise: float, device: torch.device
) -> list[dict[str, float]]:
    """One two-branch run through the trainer's epoch and validation functions: its per-epoch scores."""
    seed = config.run.seed
    clock = EpochCounter()
    with_prior = config.cromss.prior != "none"
    rotation = config.data.rotation_probability
    crop = config.data.crop
    train = training_shard(sets.pretrain[noise], crop, seed, clock, labels_all=with_prior, rotation=rotation)
    heldout = evaluation_shard(sets.heldout[noise], crop)
    meta = train.cut.meta
    precision = Precision.on(device, config.scaling.precision)
    context = pretrain.WorkerContext(config, meta, device, precision, pretrain.build_criterion(config, meta.nodata))
    torch.manual_seed(seed)
    network = build_model(config.model.fusion, config.model.encoder, len(meta.s1.bands), S2_BANDS, meta.num_classes)
    network.to(device)
    optimizer = build_optimizer(network.parameters(), config.optim)
    state = TrainingState(network, optimizer, None, precision.grad_scaler())
    curve = []
    for epoch in range(config.optim.epochs):
        clock.epoch = epoch
        training = pretrain.train_epoch(context, state, train, epoch)
        validation = pretrain.validate(context, network, heldout, epoch, figures=0).metrics
        curve.append(
            {
                CURVE_SCORE: validation["val_clean/s2/miou"],
                "fused_clean_miou": validation["val_clean/fused/miou"],
                **branch_diagnostics(training, "train"),
            }
        )
    return curve


def pretrain_s2_only(
    args: argparse.Namespace, sets: SyntheticSets, noise: float, seed: int, device: torch.device
) -> list[dict[str, float]]:
    """The platform's single-modality S2 baseline (spec 11: the same U-Net, CE + Dice on the noisy
    labels, every labelled pixel at weight 1) on the same batches: its per-epoch scores.

    Its noise diagnostics score the network's own label confidence ``p_y`` (spec 3) as the
    trust, every labelled pixel at weight 1, on each step's training pixels.
    """
    clock = EpochCounter()
    train = training_shard(
        sets.pretrain[noise], args.size, seed, clock, labels_all=False, rotation=ROTATION_PROBABILITY
    )
    heldout = evaluation_shard(sets.heldout[noise], args.size)
    meta = train.cut.meta
    torch.manual_seed(seed)
    network = build_single_model("s2", args.encoder, S2_BANDS, meta.num_classes).to(device)
    criterion = SingleModalityLoss("s2", "cd", classes=meta.num_classes, ignore_index=meta.nodata)
    optimizer = torch.optim.Adam(network.parameters(), lr=args.lr, weight_decay=1e-8)
    curve = []
    for epoch in range(args.epochs):
        clock.epoch = epoch
        network.train()
        noise_evidence = NoiseDiagnostics(meta.num_classes, meta.nodata, device)
        for batch in train.iter_torch_batches(batch_size=args.batch):
            inputs = to_device(batch, meta, device, prior="none")
            logits = network(inputs.x2)
            loss, _ = criterion(logits, inputs.y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            weights = torch.ones_like(inputs.y, dtype=torch.float32)
            noise_evidence.update(inputs.y, inputs.clean_y, weights, label_confidence(logits, inputs.y))
        evidence = noise_evidence.compute()
        curve.append(
            {
                CURVE_SCORE: clean_miou(network, heldout, meta, device),
                **{f"s2_{name}": evidence[name] for name in DIAGNOSTICS},
            }
        )
    return curve


@torch.no_grad()
def clean_miou(network: nn.Module, heldout: InMemoryShard, meta: ShardMetadata, device: torch.device) -> float:
    """mIoU of an S2 network on the held-out locations, against their clean labels (spec 11)."""
    network.eval()
    matrix = ConfusionMatrix(meta.num_classes, meta.nodata, device)
    for batch in heldout.iter_torch_batches(batch_size=64):
        inputs = to_device(batch, meta, device, prior="none")
        matrix.update(network(inputs.x2).argmax(dim=1), inputs.clean_y)
    return float(matrix.compute()["miou"])


@dataclass(frozen=True)
class RunSpec:
    """One pretraining run of the comparison; ``variant`` None is the ``s2_only`` baseline (fusion '-')."""

    noise: float
    seed: int
    fusion: str
    variant: Variant | None


def run_specs(args: argparse.Namespace) -> list[RunSpec]:
    """Every run, in report order: per noise rate and seed, the baseline, then each fusion's variants."""
    variants = [variant for variant in MULTIMODAL_VARIANTS if variant.name in args.variants]
    specs = []
    for noise in args.noise_rates:
        for seed in args.seeds:
            if S2_ONLY in args.variants:
                specs.append(RunSpec(noise, seed, "-", None))
            specs += [RunSpec(noise, seed, fusion, variant) for fusion in args.fusions for variant in variants]
    return specs


def run_one(spec: RunSpec, args: argparse.Namespace, sets: SyntheticSets, device: torch.device) -> RunResult:
    """One pretraining run with its wall and process-CPU seconds."""
    started, cpu_started = time.perf_counter(), time.process_time()
    if spec.variant is None:
        curve = pretrain_s2_only(args, sets, spec.noise, spec.seed, device)
        result = RunResult(spec.noise, spec.seed, spec.fusion, S2_ONLY, curve)
    else:
        config = pretrain_config(args, spec.fusion, spec.variant, spec.seed)
        curve = pretrain_multimodal(config, sets, spec.noise, device)
        result = RunResult(spec.noise, spec.seed, spec.fusion, spec.variant.name, curve)
    result.seconds = time.perf_counter() - started
    result.cpu_seconds = time.process_time() - cpu_started
    return result


def run_all(args: argparse.Namespace, sets: SyntheticSets, device: torch.device) -> list[RunResult]:
    """Every run of :func:`run_specs`, ``--jobs`` at a time in worker processes of ``--threads`` torch
    threads each (runs are independent: a run's curve depends only on its seed, not on its process)."""
    specs = run_specs(args)
    if args.jobs == 1:
        results = []
        for spec in specs:
            results.append(run_one(spec, args, sets, device))
            progress(results, args.window, args.json)
        return results
    finished: dict[int, RunResult] = {}
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, spawn, initializer=torch.set_num_threads, initargs=(args.threads or 1,)) as pool:
        pending = {pool.submit(run_one, spec, args, sets, device): index for index, spec in enumerate(specs)}
        for future in as_completed(pending):
            finished[pending[future]] = future.result()
            progress([*finished.values()], args.window, args.json)
    return [finished[index] for index in range(len(specs))]


def progress(results: list[RunResult], window: int, json_path: Path | None) -> None:
    """A line on stderr per finished run, and the runs so far in the JSON file, so that a long
    benchmark shows where it is and an interrupted one keeps what it finished."""
    result = results[-1]
    scores = peak_and_final([epoch[CURVE_SCORE] for epoch in result.curve], window)
    auroc = result.curve[-1]["s2_noise_auroc"]
    line = (
        f"[noise_robustness] noise {result.noise} seed {result.seed} {result.name}: S2 clean mIoU peak "
        f"{scores.peak:.3f} (epoch {scores.peak_epoch}), final {scores.final:.3f}, "
        f"S2 noise AUROC {auroc:.3f} ({result.seconds:.0f} s)"
    )
    print(line, file=sys.stderr, flush=True)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        partial = {"title": TITLE, "complete": False, "runs": [asdict(run) for run in results]}
        json_path.write_text(json.dumps(partial, indent=2) + "\n")


def percent(values: Sequence[float]) -> str:
    """``mean ± std`` in percent over seeds, with the seed count."""
    mean, std = mean_std([100 * value for value in values])
    return f"{mean:.2f} ± {std:.2f} (n={len(values)})"


def percent_interval(interval: Interval) -> str:
    """A paired difference in percentage points: ``mean [low, high] (n=..)``."""
    return f"{100 * interval.mean:+.2f} [{100 * interval.low:+.2f}, {100 * interval.high:+.2f}] (n={interval.n})"


def final_diagnostics(result: RunResult, window: int) -> dict[str, float]:
    """The S2 diagnostics averaged over the last ``window`` epochs (NaN-free epochs only)."""
    tail = result.curve[-window:]
    averaged = {}
    for name in DIAGNOSTICS:
        values = [epoch[f"s2_{name}"] for epoch in tail if not math.isnan(epoch[f"s2_{name}"])]
        averaged[name] = statistics.fmean(values) if values else math.nan
    return averaged


def comparisons(names: Sequence[str]) -> list[tuple[str, str]]:
    """Pairs (run, reference) to difference: every multimodal run against ``s2_only``, and every
    other variant against the plain ``multimodal`` run of its fusion."""
    pairs = [(name, S2_ONLY) for name in names if name != S2_ONLY and S2_ONLY in names]
    for name in names:
        fusion, _, variant = name.partition(".")
        reference = f"{fusion}.{MULTIMODAL}"
        if variant and variant != MULTIMODAL and reference in names:
            pairs.append((name, reference))
    return pairs


def noise_section(results: Sequence[RunResult], noisy_miou: float, window: int) -> tuple[Section, Section]:
    """The per-run summary (mean ± std over seeds) and the paired differences of one noise rate."""
    names = list(dict.fromkeys(result.name for result in results))
    by_name = {name: {result.seed: result for result in results if result.name == name} for name in names}
    scores = {
        name: {seed: peak_and_final([epoch[CURVE_SCORE] for epoch in run.curve], window) for seed, run in runs.items()}
        for name, runs in by_name.items()
    }
    summary: Section = {"noisy_labels.miou_pct": f"{100 * noisy_miou:.2f}"}
    for name in names:
        values = list(scores[name].values())
        summary[f"{name}.peak_pct"] = percent([value.peak for value in values])
        summary[f"{name}.peak_epoch"] = f"{statistics.fmean(value.peak_epoch for value in values):.1f}"
        summary[f"{name}.final_pct"] = percent([value.final for value in values])
        summary[f"{name}.final_minus_peak_pct"] = percent([value.drop for value in values])
        diagnostics = [final_diagnostics(run, window) for run in by_name[name].values()]
        for diagnostic in DIAGNOSTICS:
            present = [entry[diagnostic] for entry in diagnostics if not math.isnan(entry[diagnostic])]
            if present:
                summary[f"{name}.s2_{diagnostic}"] = f"{statistics.fmean(present):.4f}"
    paired: Section = {}
    for name, reference in comparisons(names):
        seeds = sorted(set(scores[name]) & set(scores[reference]))
        for metric in ("peak", "final", "drop"):
            differences = [getattr(scores[name][s], metric) - getattr(scores[reference][s], metric) for s in seeds]
            label = "final_minus_peak" if metric == "drop" else metric
            paired[f"{name} - {reference}.{label}_pp"] = percent_interval(t_interval(differences))
    return summary, paired


def result_sections(results: list[RunResult], noisy_mious: Mapping[float, float], window: int) -> dict[str, Section]:
    """Per noise rate: ``noise <rate>`` (runs) and ``noise <rate> paired`` (differences)."""
    sections: dict[str, Section] = {}
    for noise, noisy_miou in noisy_mious.items():
        summary, paired = noise_section([result for result in results if result.noise == noise], noisy_miou, window)
        sections[f"noise {noise}"] = summary
        if paired:
            sections[f"noise {noise} paired"] = paired
    return sections


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.noise_robustness", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--setting", choices=tuple(SETTINGS), default="cpu", help="size defaults: cpu (default) or gpu"
    )
    parser.add_argument("--locations", type=int, help="pretraining locations")
    parser.add_argument("--heldout", type=int, help="locations scored on clean labels")
    parser.add_argument("--size", type=int, help="crop side in px, a multiple of 32")
    parser.add_argument("--epochs", type=int, help="pretraining epochs")
    parser.add_argument("--batch", type=int, help="samples per step")
    parser.add_argument("--lr", type=float, help="Adam learning rate, held for the whole run")
    parser.add_argument("--encoder", help="segmentation-models-pytorch encoder name")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--noise-rates", type=float, nargs="+")
    parser.add_argument("--window", type=int, help="epochs of the trailing mean that smooths each curve")
    parser.add_argument("--fusions", nargs="+", choices=("mid", "late"))
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=(S2_ONLY, *(variant.name for variant in MULTIMODAL_VARIANTS)),
        default=[S2_ONLY, MULTIMODAL, "cromss"],
    )
    parser.add_argument("--work-dir", type=Path, help="where the synthetic shards go (default: a temporary directory)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice; 1 with --jobs)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process (default 1)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke size: 4 locations of 32 px, 2 epochs, 2 seeds, 1 noise rate, mid"
    )
    parser.add_argument(
        "--json", type=Path, help="write every run's curves here as JSON after each run, and the report at the end"
    )
    return parser


def resolve_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset sizes from ``--setting``, apply ``--quick`` and reject sizes the comparison cannot take."""
    setting = asdict(SETTINGS[args.setting])
    if args.quick:
        quick = {"locations": 4, "heldout": 2, "size": 32, "epochs": 2, "batch": 2, "window": 1}
        setting.update(quick, seeds=(0, 1), noise_rates=(0.3,), fusions=("mid",))
    for name, default in setting.items():
        if getattr(args, name) is None:
            setattr(args, name, list(default) if isinstance(default, tuple) else default)
    check_crop(args.size)
    if min(args.locations, args.heldout, args.epochs, args.batch, args.window) < 1:
        raise SystemExit("--locations, --heldout, --epochs, --batch and --window must be at least 1")
    if any(not 0.0 <= noise <= 1.0 for noise in args.noise_rates):
        raise SystemExit(f"--noise-rates {args.noise_rates}: every rate must lie in [0, 1]")
    if len(set(args.seeds)) != len(args.seeds):
        raise SystemExit(f"--seeds {args.seeds}: the paired comparison needs distinct seeds")
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"--threads {args.threads}: must be at least 1")
    if args.jobs < 1:
        raise SystemExit(f"--jobs {args.jobs}: must be at least 1")
    return args


def setup_section(args: argparse.Namespace, sets: SyntheticSets) -> Section:
    achieved = ", ".join(f"{noise}: {rate:.4f}" for noise, rate in sets.achieved_noise.items())
    return {
        "setting": args.setting + (" (quick)" if args.quick else ""),
        "encoder": args.encoder,
        "pretrain_locations": args.locations,
        "heldout_locations": args.heldout,
        "tile_px": args.size + TILE_MARGIN,
        "crop_px": args.size,
        "epochs": args.epochs,
        "batch": args.batch,
        "lr_held": args.lr,
        "selection_ramp_epochs": ramp_length(args.epochs),
        "smoothing_window_epochs": args.window,
        "seeds": " ".join(str(seed) for seed in args.seeds),
        "fusions": " ".join(args.fusions),
        "achieved_noise_rates": achieved,
    }


def timing_section(results: Sequence[RunResult], total: float) -> Section:
    """Wall seconds in all, and wall and process-CPU seconds per epoch of each kind of run (CPU
    seconds, which other load on the machine changes far less, project other sizes)."""
    section: Section = {"total_s": total}
    for name in dict.fromkeys(result.name for result in results):
        runs = [result for result in results if result.name == name]
        epochs = sum(len(result.curve) for result in runs)
        section[f"{name}.epoch_s"] = sum(result.seconds for result in runs) / epochs
        section[f"{name}.epoch_cpu_s"] = sum(result.cpu_seconds for result in runs) / epochs
    return section


def main(argv: Sequence[str] | None = None) -> int:
    args = resolve_arguments(build_parser().parse_args(argv))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cromss-noise-bench-") as scratch:
        sizes = {"locations": args.locations, "heldout": args.heldout, "size": args.size}
        sets = synthesize_sets(args.work_dir or Path(scratch), args.noise_rates, **sizes)
        noisy = {
            noise: noisy_label_miou(evaluation_shard(sets.heldout[noise], args.size)) for noise in args.noise_rates
        }
        results = run_all(args, sets, device)
    sections = {"machine": machine_section(device), "setup": setup_section(args, sets)}
    sections.update(result_sections(results, noisy, args.window))
    sections["timing"] = timing_section(results, time.perf_counter() - started)
    publish(TITLE, sections, args.json, {"complete": True, "runs": [asdict(result) for result in results]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
