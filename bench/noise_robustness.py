"""Noise robustness of CromSS on synthetic data whose true labels are known (issue 8; spec 2-9, 11).

Synthetic NoLDO-S12-like locations (:mod:`cromss_ray.data.synth`) carry Dynamic-World-like
noisy labels with an exact corrupted-pixel rate, next to the clean labels they were
derived from. The scenes are the same for every noise rate; only the label noise differs.
For every noise rate and seed this pretrains

* (i)   ``s2_only``: an S2-only U-Net on the noisy labels (cross-entropy + Dice);
* (ii)  ``multimodal``: both branches, no selection, no smoothing (consistency with v = 1);
* (iii) ``smoothing``: (ii) plus spatial-temporal label smoothing (0.15, 0.05), prior 'ts';
* (iv)  ``selection``: (ii) plus cross-modal sample selection;
* (v)   ``cromss``: selection and smoothing, the reference setting;

(ii)-(v) for middle and late fusion, and scores the mIoU against the clean labels of
held-out locations: the S2 branch (comparable with (i)) and the fused prediction. The
noisy labels of the held-out locations are scored against their clean labels too: a
network that reproduced the noise exactly would reach that mIoU. Every pretrained S2
encoder is then transferred to a synthetic DW-like set, frozen and fine-tuned, and scored
on its test tiles, next to the same network from random initialisation.

Runs go without Ray, on :class:`bench.in_memory.InMemoryShard` batches cut by the pipeline's
own UDF: (ii)-(v) call the pretraining loop's ``train_epoch`` and ``validate``, the
transfers the fine-tuning loop's ``train_epoch`` and ``evaluate_split``, so the per-step
code is the trainers'. (i) has its own short loop: the pretraining loop trains two-branch
networks only. Settings scaled to the run length: the selection ramp is 40 % of the
epochs (the reference's 80 of 200), no learning-rate schedule in pretraining. Run from
the repository root::

    python -m bench.noise_robustness                       # CPU-sized default
    python -m bench.noise_robustness --locations 512 --size 128 --epochs 40 --encoder resnet50
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from bench.common import Section, machine_section, mean_std, publish, resolve_device
from bench.in_memory import EpochCounter, InMemoryShard
from cromss_ray.config import FinetuneConfig, PretrainConfig, build_config
from cromss_ray.data.pipeline import DOWNSTREAM_ROTATION_PROBABILITY, to_device
from cromss_ray.data.schema import ShardMetadata
from cromss_ray.data.storage import scan_shards
from cromss_ray.data.synth import synthesize
from cromss_ray.data.transforms import CutSamples, SampleDraw
from cromss_ray.method import (
    ConfusionMatrix,
    SingleModalityLoss,
    build_model,
    build_segmentation_model,
    build_single_model,
    encoder_state_dict,
    load_encoder_state,
)
from cromss_ray.train import finetune, pretrain
from cromss_ray.train.checkpoints import TrainingState
from cromss_ray.train.optim import Precision, build_lr_scheduler, build_optimizer, step_lr_scheduler

TITLE = "bench.noise_robustness: CromSS vs naive noisy pretraining"
S2_ONLY = "s2_only"
RANDOM_INIT = "random_init"
FROZEN, FINETUNED = "frozen", "finetune"
SMOOTHING_FACTORS = (0.15, 0.05)
PRIOR = "ts"
RAMP_SHARE = 0.4
"""Selection ramp as a share of the epochs: the reference ramps over 80 of 200 epochs (spec 9)."""
TILE_MARGIN = 8
"""Tiles are the crop plus this many pixels, as the released 264 px tiles around 256 px crops (spec 9)."""
S2_BANDS = 13
ROTATION_PROBABILITY = 0.2
"""Training augmentation of the S2-only run, as the pretraining config's default (spec 9)."""
TRANSFER_LR = 1e-3
DATA_SEEDS = {"pretrain": 101, "heldout": 202, "dw_train": 303, "dw_test": 404}
"""Scene seeds of the synthetic sets: every noise rate shares the pretraining scenes."""


@dataclass(frozen=True)
class Variant:
    """One pretraining setting of the comparison."""

    name: str
    label: str
    selection: bool
    smoothing: bool


MULTIMODAL_VARIANTS = (
    Variant("multimodal", "(ii) multimodal, no selection, no smoothing", False, False),
    Variant("smoothing", "(iii) + label smoothing", False, True),
    Variant("selection", "(iv) + sample selection", True, False),
    Variant("cromss", "(v) CromSS: selection + smoothing", True, True),
)


@dataclass(frozen=True)
class SyntheticSets:
    """Shard locations of one benchmark: pretraining and held-out sets per noise rate, downstream sets."""

    pretrain: dict[float, str]
    heldout: dict[float, str]
    achieved_noise: dict[float, float]
    dw_train: str
    dw_test: str


def synthesize_sets(root: Path, args: argparse.Namespace) -> SyntheticSets:
    """Write the synthetic shard sets under ``root`` (tiles ``size + TILE_MARGIN`` px)."""
    tile = args.size + TILE_MARGIN
    pretrain_sets, heldout_sets, achieved = {}, {}, {}
    for noise in args.noise_rates:
        train_dir, heldout_dir = root / f"pretrain-noise{noise}", root / f"heldout-noise{noise}"
        manifest = synthesize(
            train_dir, "pretrain", args.locations, tile, DATA_SEEDS["pretrain"], noise, overwrite=True
        )
        synthesize(heldout_dir, "pretrain", args.heldout, tile, DATA_SEEDS["heldout"], noise, overwrite=True)
        pretrain_sets[noise], heldout_sets[noise] = str(train_dir), str(heldout_dir)
        achieved[noise] = float(manifest.provenance["noise"]["achieved_rate"])
    dw_train, dw_test = root / "dw-train", root / "dw-test"
    synthesize(dw_train, "dw", args.transfer_locations, tile, DATA_SEEDS["dw_train"], overwrite=True)
    synthesize(dw_test, "dw", args.transfer_test, tile, DATA_SEEDS["dw_test"], overwrite=True)
    return SyntheticSets(pretrain_sets, heldout_sets, achieved, str(dw_train), str(dw_test))


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
    """Scores of one pretraining run and of its encoder's transfers (mIoU in [0, 1])."""

    noise: float
    seed: int
    fusion: str
    variant: str
    s1_miou: float | None
    s2_miou: float | None
    fused_miou: float | None
    frozen_miou: float | None = None
    finetuned_miou: float | None = None
    seconds: float = 0.0


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


def pretrain_multimodal(
    config: PretrainConfig, sets: SyntheticSets, noise: float, device: torch.device
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """One CromSS run through the trainer's epoch and validation functions: clean-label mIoUs, S2 encoder."""
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
    for epoch in range(config.optim.epochs):
        clock.epoch = epoch
        pretrain.train_epoch(context, state, train, epoch)
    validation = pretrain.validate(context, network, heldout, config.optim.epochs - 1, figures=0)
    scores = {branch: validation.metrics[f"val_clean/{branch}/miou"] for branch in ("s1", "s2", "fused")}
    return scores, encoder_state_dict(network, "s2")


def pretrain_s2_only(
    args: argparse.Namespace, sets: SyntheticSets, noise: float, seed: int, device: torch.device
) -> tuple[float, dict[str, torch.Tensor]]:
    """(i): the platform's single-modality S2 baseline (spec 11: the same U-Net, CE + Dice on the noisy labels,
    every labelled pixel at weight 1) on the same batches; clean-label mIoU and its encoder."""
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
    for epoch in range(args.epochs):
        clock.epoch = epoch
        network.train()
        for batch in train.iter_torch_batches(batch_size=args.batch):
            inputs = to_device(batch, meta, device, prior="none")
            loss, _ = criterion(network(inputs.x2), inputs.y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return clean_miou(network, heldout, meta, device), {
        key: value.detach().clone() for key, value in network.encoder.state_dict().items()
    }


@torch.no_grad()
def clean_miou(network: nn.Module, heldout: InMemoryShard, meta: ShardMetadata, device: torch.device) -> float:
    """mIoU of an S2 network on the held-out locations, against their clean labels (spec 11)."""
    network.eval()
    matrix = ConfusionMatrix(meta.num_classes, meta.nodata, device)
    for batch in heldout.iter_torch_batches(batch_size=64):
        inputs = to_device(batch, meta, device, prior="none")
        matrix.update(network(inputs.x2).argmax(dim=1), inputs.clean_y)
    return float(matrix.compute()["miou"])


def transfer(
    args: argparse.Namespace,
    sets: SyntheticSets,
    encoder_state: dict[str, torch.Tensor] | None,
    mode: str,
    seed: int,
    device: torch.device,
) -> float:
    """Test mIoU on the DW-like set of a network whose S2 encoder starts from ``encoder_state`` (spec 11).

    ``encoder_state`` None is the random-initialisation baseline.
    """
    overrides = [
        f"model.decoder={args.decoder}",
        f"model.encoder={args.encoder}",
        f"model.encoder_mode={mode}",
        "model.frozen_batch_norm=fixed",
        f"data.crop={args.size}",
        f"data.s2_bands={S2_BANDS}",
        "data.prefetch_batches=0",
        f"optim.lr={TRANSFER_LR}",
        f"optim.batch_size={args.batch}",
        f"optim.epochs={args.transfer_epochs}",
        f"run.seed={seed}",
    ]
    config = build_config(FinetuneConfig, {}, overrides)
    clock = EpochCounter()
    rotation = DOWNSTREAM_ROTATION_PROBABILITY
    train = training_shard(sets.dw_train, args.size, seed, clock, labels_all=False, rotation=rotation)
    test = evaluation_shard(sets.dw_test, args.size)
    meta = train.cut.meta
    torch.manual_seed(seed)
    network = build_segmentation_model(config.model.decoder, config.model.encoder, S2_BANDS, meta.num_classes)
    if encoder_state is not None:
        load_encoder_state(network, encoder_state)
    if mode == FROZEN:
        finetune.freeze_encoder(network, config.model.frozen_batch_norm)
    network.to(device)
    precision = Precision.on(device, config.scaling.precision)
    context = finetune.WorkerContext(config, meta, device, precision)
    optimizer = build_optimizer(network.parameters(), config.optim)
    state = TrainingState(network, optimizer, build_lr_scheduler(optimizer, config.optim), precision.grad_scaler())
    for epoch in range(config.optim.epochs):
        clock.epoch = epoch
        metrics = finetune.train_epoch(context, state, train, epoch)
        step_lr_scheduler(state.scheduler, metrics["train/loss"])
    return float(finetune.evaluate_split(context, network, test, "test").metrics["test/s2/miou"])


def run_all(args: argparse.Namespace, sets: SyntheticSets, device: torch.device) -> list[RunResult]:
    """Every pretraining run, each followed by its transfers, then the random-initialisation baselines."""
    results = []
    for noise in args.noise_rates:
        for seed in args.seeds:
            jobs: list[tuple[str, Variant | None]] = [("-", None)] if S2_ONLY in args.variants else []
            jobs += [(fusion, v) for fusion in args.fusions for v in MULTIMODAL_VARIANTS if v.name in args.variants]
            for fusion, variant in jobs:
                started = time.perf_counter()
                if variant is None:
                    s2, encoder = pretrain_s2_only(args, sets, noise, seed, device)
                    result = RunResult(noise, seed, fusion, S2_ONLY, None, s2, None)
                else:
                    config = pretrain_config(args, fusion, variant, seed)
                    scores, encoder = pretrain_multimodal(config, sets, noise, device)
                    result = RunResult(noise, seed, fusion, variant.name, scores["s1"], scores["s2"], scores["fused"])
                if args.transfer:
                    result.frozen_miou = transfer(args, sets, encoder, FROZEN, seed, device)
                    result.finetuned_miou = transfer(args, sets, encoder, FINETUNED, seed, device)
                result.seconds = time.perf_counter() - started
                results.append(result)
                progress(results, args.json)
    if args.transfer:
        for seed in args.seeds:
            started = time.perf_counter()
            result = RunResult(-1.0, seed, "-", RANDOM_INIT, None, None, None)
            result.frozen_miou = transfer(args, sets, None, FROZEN, seed, device)
            result.finetuned_miou = transfer(args, sets, None, FINETUNED, seed, device)
            result.seconds = time.perf_counter() - started
            results.append(result)
            progress(results, args.json)
    return results


def progress(results: list[RunResult], json_path: Path | None) -> None:
    """A line on stderr per finished run, and the runs so far in the JSON file, so that a long
    benchmark shows where it is and an interrupted one keeps what it finished."""
    result = results[-1]
    named = {
        "s2": result.s2_miou,
        "fused": result.fused_miou,
        "frozen": result.frozen_miou,
        "finetuned": result.finetuned_miou,
    }
    scores = ", ".join(f"{name} {value:.3f}" for name, value in named.items() if value is not None)
    where = "random init" if result.variant == RANDOM_INIT else f"noise {result.noise} {result.fusion}/{result.variant}"
    line = f"[noise_robustness] seed {result.seed} {where}: {scores} ({result.seconds:.0f} s)"
    print(line, file=sys.stderr, flush=True)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        partial = {"title": TITLE, "complete": False, "runs": [asdict(run) for run in results]}
        json_path.write_text(json.dumps(partial, indent=2) + "\n")


def summarise(values: Sequence[float | None]) -> str:
    """``mean ± std`` in mIoU percent over seeds, with the seed count."""
    present = [100 * value for value in values if value is not None]
    mean, std = mean_std(present)
    return f"{mean:.2f} ± {std:.2f} (n={len(present)})"


def result_sections(results: list[RunResult], noisy_mious: dict[float, float]) -> dict[str, Section]:
    """One section per noise rate (rows ``<fusion>.<variant>.<score>_miou_pct``) and one for random init."""
    sections: dict[str, Section] = {}
    for noise, noisy_miou in noisy_mious.items():
        section: Section = {"noisy_labels.miou_pct": f"{100 * noisy_miou:.2f}"}
        runs = [result for result in results if result.noise == noise]
        for key in dict.fromkeys((result.fusion, result.variant) for result in runs):
            group = [result for result in runs if (result.fusion, result.variant) == key]
            prefix = key[1] if key[1] == S2_ONLY else f"{key[0]}.{key[1]}"
            for score in ("s2", "fused", "frozen", "finetuned"):
                values = [getattr(result, f"{score}_miou") for result in group]
                if any(value is not None for value in values):
                    section[f"{prefix}.{score}_miou_pct"] = summarise(values)
        sections[f"noise {noise}"] = section
    baseline = [result for result in results if result.variant == RANDOM_INIT]
    if baseline:
        sections[RANDOM_INIT] = {
            f"{score}_miou_pct": summarise([getattr(result, f"{score}_miou") for result in baseline])
            for score in ("frozen", "finetuned")
        }
    return sections


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.noise_robustness", description=__doc__.split("\n\n")[0])
    parser.add_argument("--locations", type=int, default=32, help="pretraining locations (default 32)")
    parser.add_argument("--heldout", type=int, default=16, help="locations scored on clean labels (default 16)")
    parser.add_argument("--size", type=int, default=64, help="crop side in px, a multiple of 32 (default 64)")
    parser.add_argument("--epochs", type=int, default=8, help="pretraining epochs (default 8)")
    parser.add_argument("--batch", type=int, default=4, help="samples per step (default 4)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of pretraining (default 1e-3)")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--noise-rates", type=float, nargs="+", default=[0.2, 0.4])
    parser.add_argument("--fusions", nargs="+", choices=("mid", "late"), default=["mid", "late"])
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=(S2_ONLY, *(variant.name for variant in MULTIMODAL_VARIANTS)),
        default=[S2_ONLY, *(variant.name for variant in MULTIMODAL_VARIANTS)],
    )
    parser.add_argument(
        "--transfer", action=argparse.BooleanOptionalAction, default=True, help="transfer every encoder (default on)"
    )
    parser.add_argument("--transfer-locations", type=int, default=24, help="DW-like training tiles (default 24)")
    parser.add_argument("--transfer-test", type=int, default=16, help="DW-like test tiles (default 16)")
    parser.add_argument("--transfer-epochs", type=int, default=4, help="transfer epochs (default 4)")
    parser.add_argument("--decoder", default="Unet", help="smp architecture of the transfer network (default Unet)")
    parser.add_argument("--work-dir", type=Path, help="where the synthetic shards go (default: a temporary directory)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke size: 4 locations of 32 px, 1 epoch, 1 seed, mid fusion"
    )
    parser.add_argument(
        "--json", type=Path, help="write every run's scores here as JSON after each run, and the report at the end"
    )
    return parser


def resolve_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """Apply ``--quick`` and reject sizes the networks or the comparison cannot take."""
    if args.quick:
        args.locations, args.heldout, args.size, args.epochs, args.batch = 4, 2, 32, 1, 2
        args.seeds, args.noise_rates, args.fusions = [0], [0.3], ["mid"]
        args.transfer_locations, args.transfer_test, args.transfer_epochs = 4, 2, 1
    if args.size % 32 or args.size < 32:
        raise SystemExit(f"--size {args.size}: must be a positive multiple of 32 (the encoders' output stride)")
    if min(args.locations, args.heldout, args.epochs, args.batch, args.transfer_locations, args.transfer_test) < 1:
        raise SystemExit("--locations, --heldout, --epochs, --batch and the transfer sizes must be at least 1")
    if any(not 0.0 <= noise <= 1.0 for noise in args.noise_rates):
        raise SystemExit(f"--noise-rates {args.noise_rates}: every rate must lie in [0, 1]")
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"--threads {args.threads}: must be at least 1")
    return args


def setup_section(args: argparse.Namespace, sets: SyntheticSets) -> Section:
    achieved = ", ".join(f"{noise}: {rate:.4f}" for noise, rate in sets.achieved_noise.items())
    return {
        "encoder": args.encoder,
        "pretrain_locations": args.locations,
        "heldout_locations": args.heldout,
        "tile_px": args.size + TILE_MARGIN,
        "crop_px": args.size,
        "epochs": args.epochs,
        "batch": args.batch,
        "lr": args.lr,
        "selection_ramp_epochs": ramp_length(args.epochs),
        "seeds": " ".join(str(seed) for seed in args.seeds),
        "achieved_noise_rates": achieved,
        "transfer": f"{args.decoder}, {args.transfer_locations} train / {args.transfer_test} test tiles, "
        f"{args.transfer_epochs} epochs" if args.transfer else "off",
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = resolve_arguments(build_parser().parse_args(argv))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cromss-noise-bench-") as scratch:
        sets = synthesize_sets(args.work_dir or Path(scratch), args)
        noisy = {
            noise: noisy_label_miou(evaluation_shard(sets.heldout[noise], args.size)) for noise in args.noise_rates
        }
        results = run_all(args, sets, device)
    sections = {"machine": machine_section(device), "setup": setup_section(args, sets)}
    sections.update(result_sections(results, noisy))
    sections["timing"] = {"total_s": time.perf_counter() - started}
    publish(TITLE, sections, args.json, {"complete": True, "runs": [asdict(result) for result in results]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
