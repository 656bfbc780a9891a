"""Training-step throughput of the CromSS networks and the cost of the CromSS objective.

One training step, per fusion (spec 1): the smoothing prior computed on the device from
the four seasons' labels (spec 2, the pipeline's fast path), the forward pass of both
branches, the CromSS objective (confidences, entangling, selection, smoothed targets,
losses; spec 3-8), the backward pass and an Adam step (spec 9). Every repeat times,
back to back on the same batch:

* ``step``: the whole step with one synchronisation at its end (images/s comes from it);
* ``objective``: the prior plus the objective's forward and backward from detached
  logits, i.e. everything in the step that is CromSS rather than the network;
* ``prior`` and ``weights`` (confidences, entangling, selection and consistency
  weights) alone, to split the objective;
* ``noise_diagnostics``: one batch's update of both branches'
  :class:`~cromss_ray.method.NoiseDiagnostics` from the step's trust and weight maps and
  the clean labels, what a training loop adds per step to score the selection against
  known clean labels (``noise_diagnostics_share_pct`` of the step).

The network's time is ``step - objective``. Figures are medians over ``--repeats``
after ``--warmup`` untimed rounds. On a CPU the process CPU time of the step and of
the objective is reported too (``images_per_cpu_s``, ``objective_share_cpu_pct``):
on a shared machine it depends far less on other load than the wall time does. On a
CUDA device the forward runs under bf16 autocast with channels_last tensors
(``--compile`` adds ``torch.compile`` of the network, ``--compile-objective`` of the
objective), and the model FLOPs of a step (forward and
backward of the network, counted once with ``FlopCounterMode``) give the achieved
TFLOP/s and, with ``--peak-tflops``, the model FLOP utilisation. Run from the repository root::

    python -m bench.step                      # CPU: resnet18, batch 2, 256 x 256
    python -m bench.step --encoder resnet50 --batch 64 --compile --peak-tflops 989   # an H100
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bench.common import Repeats, Section, check_crop, machine_section, publish, resolve_device, timed
from cromss_ray.method import (
    CromSSLoss,
    NoiseDiagnostics,
    build_model,
    consistency_weights,
    entangle,
    label_confidence,
    prediction_confidence,
    selection_ratio,
    selection_weights,
    smoothing_prior,
)

TITLE = "bench.step: CromSS training step"
SEASONS = 4
S1_BANDS = 2
LABEL_PATCH = 16
"""Side in pixels of the constant-class patches of the synthetic label maps."""
SEASONAL_CHANGE = 0.2
"""Share of label patches that change class from one season to another."""
LEARNING_RATE, WEIGHT_DECAY = 5e-3, 1e-8
"""Adam settings of the reference training (spec 9)."""


@dataclass(frozen=True)
class StepBatch:
    """A training batch on the device, shaped like the pipeline's fast path delivers it."""

    x1: torch.Tensor
    x2: torch.Tensor
    labels_all: torch.Tensor
    season: torch.Tensor
    y: torch.Tensor
    clean: torch.Tensor


def synthetic_batch(
    batch: int, size: int, s2_bands: int, classes: int, device: torch.device, channels_last: bool, seed: int = 0
) -> StepBatch:
    """Random images in [0, 1] and patchy four-season label maps (the cost of a step does not depend on content).

    The clean label map is the patches' base class; the seasonal changes make the noisy label differ from it.
    """
    generator = torch.Generator().manual_seed(seed)
    cells = size // LABEL_PATCH
    base = torch.randint(classes, (batch, 1, cells, cells), generator=generator)
    changed = torch.rand(batch, SEASONS, cells, cells, generator=generator) < SEASONAL_CHANGE
    seasonal = torch.where(changed, torch.randint(classes, changed.shape, generator=generator), base)
    labels_all = seasonal.repeat_interleave(LABEL_PATCH, dim=-2).repeat_interleave(LABEL_PATCH, dim=-1)
    season = torch.randint(SEASONS, (batch,), generator=generator)
    y = labels_all[torch.arange(batch), season]
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x1 = torch.rand(batch, S1_BANDS, size, size, generator=generator)
    x2 = torch.rand(batch, s2_bands, size, size, generator=generator)
    return StepBatch(
        x1=x1.to(device).contiguous(memory_format=memory_format),
        x2=x2.to(device).contiguous(memory_format=memory_format),
        labels_all=labels_all.to(device, torch.uint8),
        season=season.to(device),
        y=y.to(device),
        clean=base[:, 0].repeat_interleave(LABEL_PATCH, dim=-2).repeat_interleave(LABEL_PATCH, dim=-1).to(device),
    )


class StepBench:
    """The timed pieces of one fusion's training step on one batch."""

    def __init__(
        self,
        model: nn.Module,
        criterion: CromSSLoss,
        batch: StepBatch,
        epoch: int,
        autocast_dtype: torch.dtype | None,
    ) -> None:
        self.model = model
        self.criterion = criterion
        self.batch = batch
        self.epoch = epoch
        self.autocast_dtype = autocast_dtype
        self.optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
        with torch.no_grad(), self.autocast():
            z1, z2 = model(batch.x1, batch.x2)
        self.logits = (z1.detach().requires_grad_(), z2.detach().requires_grad_())
        _, _, self.maps = criterion.forward_with_selection(z1, z2, batch.y, epoch=epoch)
        classes, ignore = criterion.classes, criterion.ignore_index
        self.noise = [NoiseDiagnostics(classes, ignore, batch.y.device) for _ in self.maps.trust]

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.batch.x1.device.type, dtype=self.autocast_dtype)

    def prior(self) -> torch.Tensor:
        """The 'ts' smoothing prior of the batch after the crop, on the device (spec 2)."""
        return smoothing_prior(self.batch.labels_all, self.batch.season, "ts", self.criterion.classes)

    def step(self) -> None:
        """Prior, forward, CromSS objective, backward, Adam step."""
        prior = self.prior()
        with self.autocast():
            z1, z2 = self.model(self.batch.x1, self.batch.x2)
        loss, _ = self.criterion(z1, z2, self.batch.y, prior=prior, epoch=self.epoch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def objective(self) -> None:
        """Prior plus the objective's forward and backward down to the logits."""
        for logits in self.logits:
            logits.grad = None
        loss, _ = self.criterion(*self.logits, self.batch.y, prior=self.prior(), epoch=self.epoch)
        loss.backward()

    @torch.no_grad()
    def weights(self) -> None:
        """Confidences, entangling, selection and consistency weights as the objective computes them (spec 3-7)."""
        criterion, y = self.criterion, self.batch.y
        logits = [z.float() for z in self.logits]
        label = entangle(*(label_confidence(z, y) for z in logits))
        prediction = entangle(*(prediction_confidence(z, criterion.confidence) for z in logits))
        ratio = selection_ratio(self.epoch, criterion.ramp_length, criterion.final_ratio, criterion.ramp)
        for confidence in label:
            selection_weights(confidence, y, ratio, criterion.classes, criterion.class_balanced)
        for confidence in prediction:
            consistency_weights(confidence, self.epoch, criterion.ramp_length, criterion.ramp)

    def noise_diagnostics(self) -> None:
        """Both branches' noise-diagnostics update for the batch (per step; their compute runs once per epoch)."""
        for diagnostics, trust, weights in zip(self.noise, self.maps.trust, self.maps.weights):
            diagnostics.update(self.batch.y, self.batch.clean, weights, trust)

    def model_flops(self) -> int:
        """FLOPs of the network's forward and backward on the batch (the optimiser and objective left out)."""
        with FlopCounterMode(display=False) as counter:
            with self.autocast():
                z1, z2 = self.model(self.batch.x1, self.batch.x2)
            (z1.float().sum() + z2.float().sum()).backward()
        self.model.zero_grad(set_to_none=True)
        return counter.get_total_flops()


def measure(
    pieces: dict[str, Callable[[], None]], device: torch.device, warmup: int, repeats: int
) -> dict[str, Repeats]:
    """Run every piece once per round, in turn; ``warmup`` untimed rounds, then ``repeats`` timed ones."""
    for _ in range(warmup):
        for action in pieces.values():
            action()
    wall: dict[str, list[float]] = {name: [] for name in pieces}
    cpu: dict[str, list[float]] = {name: [] for name in pieces}
    for _ in range(repeats):
        for name, action in pieces.items():
            wall_seconds, cpu_seconds, _ = timed(action, device)
            wall[name].append(wall_seconds)
            cpu[name].append(cpu_seconds)
    return {name: Repeats(tuple(wall[name]), tuple(cpu[name])) for name in pieces}


def bench_fusion(fusion: str, args: argparse.Namespace, device: torch.device) -> Section:
    """The report rows of one fusion."""
    torch.manual_seed(args.seed)
    model = build_model(fusion, args.encoder, S1_BANDS, args.s2_bands, args.classes).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    criterion = CromSSLoss(classes=args.classes)
    batch = synthetic_batch(args.batch, args.size, args.s2_bands, args.classes, device, args.channels_last, args.seed)
    autocast_dtype = torch.bfloat16 if args.precision == "bf16" else None
    bench = StepBench(model, criterion, batch, args.epoch, autocast_dtype)
    flops = bench.model_flops()
    if args.compile:
        bench.model = torch.compile(model)
    if args.compile_objective:
        bench.criterion = torch.compile(criterion)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    pieces = {"step": bench.step, "objective": bench.objective, "prior": bench.prior, "weights": bench.weights}
    timings = measure({**pieces, "noise_diagnostics": bench.noise_diagnostics}, device, args.warmup, args.repeats)
    step, objective = timings["step"].median, timings["objective"].median
    prior, weights = timings["prior"].median, timings["weights"].median
    noise = timings["noise_diagnostics"].median
    achieved = flops / step / 1e12
    rows: Section = {
        "images_per_s": args.batch / step,
        "step_ms": step * 1e3,
        "step_spread": timings["step"].spread,
        "network_ms": (step - objective) * 1e3,
        "objective_ms": objective * 1e3,
        "objective_share_pct": 100 * objective / step,
        "prior_ms": prior * 1e3,
        "weights_ms": weights * 1e3,
        "loss_terms_ms": (objective - prior - weights) * 1e3,
        "noise_diagnostics_ms": noise * 1e3,
        "noise_diagnostics_share_pct": 100 * noise / step,
        "model_gflop_per_step": flops / 1e9,
        "model_gflop_per_image": flops / args.batch / 1e9,
        "achieved_tflop_per_s": achieved,
    }
    if device.type == "cpu":
        step_cpu = timings["step"].cpu_median
        rows["step_cpu_s"] = step_cpu
        rows["images_per_cpu_s"] = args.batch / step_cpu
        rows["objective_share_cpu_pct"] = 100 * timings["objective"].cpu_median / step_cpu
        rows["noise_diagnostics_share_cpu_pct"] = 100 * timings["noise_diagnostics"].cpu_median / step_cpu
    if args.peak_tflops is not None:
        rows["mfu_pct"] = 100 * achieved / args.peak_tflops
    if device.type == "cuda":
        rows["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--fusion", nargs="+", choices=("mid", "late"), default=["mid", "late"])
    parser.add_argument("--encoder", help="smp encoder name (default resnet18 on a CPU, resnet50 on a GPU)")
    parser.add_argument("--batch", type=int, help="images per step (default 2 on a CPU, 64 on a GPU)")
    parser.add_argument("--size", type=int, default=256, help="crop side in pixels, a multiple of 32 (default 256)")
    parser.add_argument("--s2-bands", type=int, choices=(13, 12, 9, 3), default=13)
    parser.add_argument("--classes", type=int, default=9)
    parser.add_argument("--epoch", type=int, default=40, help="schedule epoch: 40 lies mid-ramp, selection active")
    parser.add_argument("--warmup", type=int, help="untimed rounds (default 2 on a CPU, 10 on a GPU)")
    parser.add_argument("--repeats", type=int, help="timed rounds (default 5 on a CPU, 20 on a GPU)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--precision", choices=("fp32", "bf16"), help="autocast dtype (default bf16 on a GPU, fp32 on a CPU)"
    )
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, help="default on for a GPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network")
    parser.add_argument("--compile-objective", action="store_true", help="torch.compile the CromSS objective")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense peak TFLOP/s for the MFU row")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke size: resnet18, batch 2, 32 px, 1 round")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    return parser


def resolve_arguments(args: argparse.Namespace, device: torch.device) -> argparse.Namespace:
    """Fill the device-dependent defaults and the ``--quick`` sizes; reject impossible sizes."""
    gpu = device.type == "cuda"
    if args.quick:
        args.encoder, args.batch, args.size, args.warmup, args.repeats = "resnet18", 2, 32, 1, 1
    defaults: dict[str, Any] = {
        "encoder": "resnet50" if gpu else "resnet18",
        "batch": 64 if gpu else 2,
        "warmup": 10 if gpu else 2,
        "repeats": 20 if gpu else 5,
        "precision": "bf16" if gpu else "fp32",
        "channels_last": gpu,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    check_crop(args.size)
    if args.batch < 1 or args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--batch and --repeats must be at least 1, --warmup at least 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    parsed = build_parser().parse_args(argv)
    if parsed.threads is not None:
        if parsed.threads < 1:
            raise SystemExit(f"--threads {parsed.threads}: must be at least 1")
        torch.set_num_threads(parsed.threads)
    device = resolve_device(parsed.device)
    args = resolve_arguments(parsed, device)
    setup: Section = {
        "encoder": args.encoder,
        "batch": args.batch,
        "size_px": args.size,
        "s2_bands": args.s2_bands,
        "precision": args.precision,
        "channels_last": str(args.channels_last),
        "compiled": str(args.compile),
        "objective_compiled": str(args.compile_objective),
        "schedule_epoch": args.epoch,
        "warmup_rounds": args.warmup,
        "timed_rounds": args.repeats,
    }
    sections = {"machine": machine_section(device), "setup": setup}
    for fusion in args.fusion:
        sections[fusion] = bench_fusion(fusion, args, device)
    publish(TITLE, sections, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
