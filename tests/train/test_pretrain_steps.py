"""The training step functions on one worker without Ray: the noise diagnostics pretraining adds to the
epoch's metrics, and the guard that skips and counts steps with a non-finite loss (both tasks).

Batches come from an in-memory shard that records what it hands out, so every figure
can be worked out again directly from those batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cromss_ray.config import FinetuneConfig, PretrainConfig, build_config, load_config
from cromss_ray.data.device import to_device
from cromss_ray.data.schema import ShardMetadata
from cromss_ray.data.synth import synth_metadata
from cromss_ray.method import SingleModalityLoss, SingleModalityNet
from cromss_ray.method.losses import MODALITIES
from cromss_ray.models.stored import NonFiniteModelError, network_from_config, transfer_network
from cromss_ray.train import finetune
from cromss_ray.train.checkpoints import TrainingState
from cromss_ray.train.loop import NONFINITE_STEPS_METRIC, NonFiniteLossError
from cromss_ray.train.optim import Precision, build_lr_scheduler, build_optimizer
from cromss_ray.train.pretrain import NOISE_METRICS, WorkerContext, build_criterion, train_epoch, validate

TINY_CONFIG = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "pretrain_tiny.yaml"
SIZE = 32
BATCHES = 3
BATCH_SIZE = 2
EPOCH = 1  # inside the 2-epoch ramp of the tiny config: the selection excludes pixels


class RecordedShard:
    """A shard of fixed synthetic batches (``iter_torch_batches`` as Ray Data's iterator has it)."""

    def __init__(self, meta: ShardMetadata, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        classes = meta.num_classes
        self.batches = []
        for index in range(BATCHES):
            shape = (BATCH_SIZE, SIZE, SIZE)
            clean = torch.randint(0, classes, shape, generator=generator, dtype=torch.uint8)
            flipped = torch.rand(shape, generator=generator) < 0.3
            noisy = torch.where(flipped, (clean + 1) % classes, clean)
            noisy[:, 0, : 4 + index] = meta.nodata
            batch = {
                "key": torch.arange(index * BATCH_SIZE, (index + 1) * BATCH_SIZE),
                "s1": torch.randint(0, 256, (BATCH_SIZE, 2, SIZE, SIZE), generator=generator, dtype=torch.uint8),
                "s2": torch.randint(0, 256, (BATCH_SIZE, 13, SIZE, SIZE), generator=generator, dtype=torch.uint8),
                "label": noisy,
            }
            if meta.has_clean_label:
                batch["clean_label"] = clean
            self.batches.append(batch)

    def iter_torch_batches(
        self, batch_size: int, prefetch_batches: int, drop_last: bool = False
    ) -> Iterator[dict[str, torch.Tensor]]:
        assert batch_size == BATCH_SIZE
        yield from self.batches


def worker_context(clean_labels: bool, *overrides: str) -> WorkerContext:
    meta = synth_metadata("pretrain").model_copy(update={"has_clean_label": clean_labels})
    config = load_config(
        PretrainConfig,
        TINY_CONFIG,
        [f"model.classes={meta.num_classes}", f"optim.batch_size={BATCH_SIZE}", f"data.crop={SIZE}", *overrides],
    )
    device = torch.device("cpu")
    return WorkerContext(config, meta, device, Precision.on(device, "fp32"), build_criterion(config, meta.nodata))


def training_state(context: WorkerContext) -> TrainingState:
    torch.manual_seed(0)
    network = network_from_config(context.config)
    optimizer = build_optimizer(network.parameters(), context.config.optim)
    scheduler = build_lr_scheduler(optimizer, context.config.optim)
    return TrainingState(network, optimizer, scheduler, context.precision.grad_scaler())


def right_label_share(batches: list[dict[str, torch.Tensor]], classes: int, nodata: int) -> float:
    """The share of right noisy labels among the pixels where both labels are class labels."""
    right = counted = 0
    for batch in batches:
        noisy, clean = batch["label"].long(), batch["clean_label"].long()
        valid = (noisy < classes) & (noisy != nodata) & (clean < classes) & (clean != nodata)
        right += int((valid & (noisy == clean)).sum())
        counted += int(valid.sum())
    return right / counted


def noise_keys(split: str) -> set[str]:
    return {f"{split}/{branch}/{name}" for branch in MODALITIES for name in NOISE_METRICS}


def test_an_epoch_with_clean_labels_scores_the_selection_of_both_branches() -> None:
    context = worker_context(clean_labels=True)
    classes, nodata = context.config.model.classes, context.meta.nodata
    state = training_state(context)
    training, held_out = RecordedShard(context.meta, seed=1), RecordedShard(context.meta, seed=2)

    metrics = train_epoch(context, state, training, EPOCH)
    validation = validate(context, state.model, held_out, EPOCH, figures=0)

    assert noise_keys("train") <= metrics.keys() and noise_keys("val") <= validation.metrics.keys()
    for split, values in (("train", metrics), ("val", validation.metrics)):
        for key in noise_keys(split):
            assert 0.0 <= values[key] <= 1.0, key
    for branch in MODALITIES:
        assert metrics[f"train/{branch}/base_rate"] == pytest.approx(
            right_label_share(training.batches, classes, nodata), abs=1e-12
        )
        assert validation.metrics[f"val/{branch}/base_rate"] == pytest.approx(
            right_label_share(held_out.batches, classes, nodata), abs=1e-12
        )
    # Validation scores the selection the loss would apply at this epoch to the held-out batches.
    state.model.eval()
    kept, kept_right, labelled = [0.0, 0.0], [0.0, 0.0], 0
    with torch.no_grad():
        for batch in held_out.batches:
            inputs = to_device(batch, context.meta, "cpu", prior="none", classes=classes)
            z1, z2 = state.model(inputs.x1, inputs.x2)
            maps = context.criterion.selection_maps(z1, z2, inputs.y, epoch=EPOCH)
            right = (inputs.y == inputs.clean_y) & (inputs.y < classes)
            labelled += int((inputs.y < classes).sum())
            for index, weights in enumerate(maps.weights):
                kept[index] += float(weights.double().sum())
                kept_right[index] += float((weights.double() * right).sum())
    assert max(kept) < labelled, "the selection must exclude some pixels at this epoch"
    for index, branch in enumerate(MODALITIES):
        assert validation.metrics[f"val/{branch}/selected_precision"] == pytest.approx(
            kept_right[index] / kept[index], rel=1e-9
        )


def test_an_epoch_without_clean_labels_logs_no_noise_diagnostics() -> None:
    context = worker_context(clean_labels=False)
    state = training_state(context)

    metrics = train_epoch(context, state, RecordedShard(context.meta, seed=1), EPOCH)
    validation = validate(context, state.model, RecordedShard(context.meta, seed=2), EPOCH, figures=0)

    assert "train/loss" in metrics and "val/s2/miou" in validation.metrics
    assert not noise_keys("train") & metrics.keys()
    assert not noise_keys("val") & validation.metrics.keys()
    assert not any(key.endswith(NOISE_METRICS) for key in (*metrics, *validation.metrics))


@pytest.mark.parametrize("modality", ["s1", "s2"])
def test_the_single_modality_baseline_trains_and_scores_its_one_branch(modality: str) -> None:
    context = worker_context(True, "model.fusion=single", f"model.modality={modality}")
    classes, nodata = context.config.model.classes, context.meta.nodata
    state = training_state(context)
    assert isinstance(state.model, SingleModalityNet) and state.model.modality == modality
    training, held_out = RecordedShard(context.meta, seed=1), RecordedShard(context.meta, seed=2)

    metrics = train_epoch(context, state, training, EPOCH)
    validation = validate(context, state.model, held_out, EPOCH, figures=2)

    other = "s2" if modality == "s1" else "s1"
    assert {"train/loss", f"train/loss/ce/{modality}", f"train/loss/dice/{modality}"} <= metrics.keys()
    assert {f"val/{modality}/miou", f"val_clean/{modality}/miou", "val/loss"} <= validation.metrics.keys()
    everything = (*metrics, *validation.metrics, *validation.confusion)
    assert not [key for key in everything if f"/{other}/" in key or "fused" in key or "consistency" in key]
    assert validation.example is not None and validation.example.keys() == {modality}
    assert [sorted(key for key in sample if key.startswith("weights_")) for sample in validation.samples] == [
        [f"weights_{modality}"]
    ] * 2
    # Every labelled pixel keeps weight 1: the kept pixels are right as often as the labels are,
    # nothing is excluded, and the trust (its own label confidence) still ranks the labels.
    for split, values, shard in (("train", metrics, training), ("val", validation.metrics, held_out)):
        base_rate = right_label_share(shard.batches, classes, nodata)
        assert values[f"{split}/{modality}/base_rate"] == pytest.approx(base_rate, abs=1e-12)
        assert values[f"{split}/{modality}/selected_precision"] == pytest.approx(base_rate, rel=1e-9)
        assert values[f"{split}/{modality}/noise_recall"] == 0.0
        assert 0.0 <= values[f"{split}/{modality}/noise_auroc"] <= 1.0
    # the validation loss is the objective of the one branch on the one-hot labels
    state.model.eval()
    losses, samples = 0.0, 0
    with torch.no_grad():
        for batch in held_out.batches:
            inputs = to_device(batch, context.meta, "cpu", prior="none", classes=classes)
            z = state.model(inputs.x1 if modality == "s1" else inputs.x2)
            loss, _ = SingleModalityLoss(modality, "cd", classes=classes).evaluate(z, inputs.y)
            losses += float(loss) * inputs.y.shape[0]
            samples += inputs.y.shape[0]
    assert validation.metrics["val/loss"] == pytest.approx(losses / samples, rel=1e-6)


def _logits(*pixels: tuple[float, float]) -> torch.Tensor:
    """(1, 2, 1, P) logits (log-probabilities) whose pixel i has the probabilities ``pixels[i]``."""
    return torch.tensor(pixels).log().T.reshape(1, 2, 1, len(pixels))


# Labels 0, 0, 1, 1. S1 gives its labels 0.5, 0.75, 0.5, 0.75, S2 0.5 everywhere, so the entangled
# label confidences (spec 4) are 0.75 * c1 = (3/8, 9/16, 3/8, 9/16) for S1 and 0.25 + 0.25 * c1 =
# (3/8, 7/16, 3/8, 7/16) for S2. With rho = 0.5 every class keeps its most confident pixel at
# weight 1 and scales the other by c / tau (spec 6): w1 = (2/3, 1, 2/3, 1), w2 = (6/7, 1, 6/7, 1).
SMOOTHING_OFF_Z1 = _logits((0.5, 0.5), (0.75, 0.25), (0.5, 0.5), (0.25, 0.75))
SMOOTHING_OFF_Z2 = _logits((0.5, 0.5), (0.5, 0.5), (0.5, 0.5), (0.5, 0.5))
SMOOTHING_OFF_Y = torch.tensor([[[0, 0, 1, 1]]])
LN2, LN43 = math.log(2), math.log(4 / 3)


@pytest.mark.parametrize(
    ("selection", "expected"),
    [
        # plain CE of the one-hot noisy labels: S1 (ln 2 + ln 4/3) / 2, S2 ln 2
        (False, (LN2 + LN43) / 2 + LN2),
        # the selection-weighted CE of the one-hot labels: S1 (2/3 ln 2 + ln 4/3) / (5/3); S2 ln 2 whatever w2
        (True, (2 / 3 * LN2 + LN43) * 3 / 5 + LN2),
    ],
)
def test_smoothing_off_trains_on_the_one_hot_noisy_labels(selection: bool, expected: float) -> None:
    overrides = [
        f"cromss.selection={str(selection).lower()}",
        "cromss.loss_terms=c",
        "cromss.consistency=none",
        "cromss.ramp=none",
        "model.classes=2",
    ]
    config = build_config(PretrainConfig, {}, ["cromss.smoothing=false", *overrides])
    # a prior that smoothing would pull the targets towards; off, it changes nothing, and none is computed
    prior = torch.nn.functional.one_hot(1 - SMOOTHING_OFF_Y, 2).permute(0, 3, 1, 2).float()
    loss, _ = build_criterion(config, 255)(SMOOTHING_OFF_Z1, SMOOTHING_OFF_Z2, SMOOTHING_OFF_Y, prior=prior)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert config.training_prior() == "none"
    smoothed = build_criterion(build_config(PretrainConfig, {}, overrides), 255)
    assert float(smoothed(SMOOTHING_OFF_Z1, SMOOTHING_OFF_Z2, SMOOTHING_OFF_Y, prior=prior)[0]) > expected + 0.05


class NaNInputs:
    """A forward pre-hook that turns the S2 input of the given calls (counted from 0) into NaN."""

    def __init__(self, calls: set[int]) -> None:
        self.calls, self.count = calls, 0

    def __call__(self, module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
        call, self.count = self.count, self.count + 1
        if call not in self.calls:
            return None
        x1, x2 = args
        return x1, torch.full_like(x2, math.nan)


def network_tensors(state: TrainingState) -> dict[str, torch.Tensor]:
    return {**dict(state.model.named_parameters()), **dict(state.model.named_buffers())}


def test_a_nan_batch_is_skipped_counted_and_leaves_weights_and_batch_norm_as_without_it() -> None:
    context = worker_context(False)
    guarded, reference = training_state(context), training_state(context)
    shard = RecordedShard(context.meta, seed=1)
    guarded.model.register_forward_pre_hook(NaNInputs({1}))

    metrics = train_epoch(context, guarded, shard, EPOCH)
    shard.batches = [shard.batches[0], shard.batches[2]]
    expected = train_epoch(context, reference, shard, EPOCH)

    assert metrics[NONFINITE_STEPS_METRIC] == 1 and expected[NONFINITE_STEPS_METRIC] == 0
    assert metrics["train/loss"] == pytest.approx(expected["train/loss"], rel=1e-6)
    ours, theirs = network_tensors(guarded), network_tensors(reference)
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert torch.isfinite(tensor.float()).all(), name
        torch.testing.assert_close(tensor, theirs[name], rtol=1e-5, atol=1e-6, msg=name)
    assert guarded.optimizer.state_dict()["state"][0]["step"] == 2


def test_more_nonfinite_steps_than_allowed_fail_the_run_naming_it_and_the_key() -> None:
    context = worker_context(False, "optim.max_nonfinite_steps=1")
    state = training_state(context)
    state.model.register_forward_pre_hook(NaNInputs({0, 2}))
    with pytest.raises(NonFiniteLossError, match=r"run 'cromss-pretrain-tiny', epoch 2: 2 training steps .*"
                       r"optim\.max_nonfinite_steps \(1\)"):
        train_epoch(context, state, RecordedShard(context.meta, seed=1), EPOCH)


def test_an_epoch_without_one_finite_step_fails_the_run() -> None:
    context = worker_context(False)
    state = training_state(context)
    state.model.register_forward_pre_hook(NaNInputs({0, 1, 2}))
    with pytest.raises(NonFiniteLossError, match=r"every training step \(3\) had a non-finite loss"):
        train_epoch(context, state, RecordedShard(context.meta, seed=1), EPOCH)
    assert all(torch.isfinite(tensor.float()).all() for tensor in network_tensors(state).values())


def test_a_fine_tuning_step_with_a_nan_loss_is_skipped_and_counted() -> None:
    meta = synth_metadata("dw").model_copy(update={"s2": synth_metadata("pretrain").s2})
    config = build_config(
        FinetuneConfig,
        {},
        ["model.encoder=resnet18", "model.branch=s1", f"data.crop={SIZE}", f"optim.batch_size={BATCH_SIZE}"],
    )
    device = torch.device("cpu")
    context = finetune.WorkerContext(config, meta, device, Precision.on(device, "fp32"))
    torch.manual_seed(0)
    network = transfer_network(config, meta.num_classes)
    optimizer = build_optimizer(network.parameters(), config.optim)
    state = TrainingState(network, optimizer, None, context.precision.grad_scaler())
    shard = RecordedShard(meta, seed=1)
    for batch in shard.batches:
        batch["s1"] = torch.randn(BATCH_SIZE, 2, SIZE, SIZE, generator=torch.Generator().manual_seed(2)) - 12
    calls = iter(range(BATCHES))
    network.register_forward_hook(lambda module, args, logits: logits * math.nan if next(calls) == 1 else None)

    metrics = finetune.train_epoch(context, state, shard, 0)

    assert metrics[NONFINITE_STEPS_METRIC] == 1 and math.isfinite(metrics["train/loss"])
    assert all(torch.isfinite(tensor.float()).all() for tensor in network_tensors(state).values())
    assert optimizer.state_dict()["state"][0]["step"] == 2


def test_a_network_with_a_nan_parameter_is_not_checkpointed(tmp_path: Path) -> None:
    context = worker_context(False, "run.name=nan-run")
    state = training_state(context)
    with torch.no_grad():
        next(state.model.parameters())[0] = math.nan
    with pytest.raises(NonFiniteModelError, match=r"run 'nan-run', checkpoint of epoch 3: not written: 1 tensor"):
        state.save(tmp_path, context.config, {"epoch": 3})
    assert list(tmp_path.iterdir()) == []
