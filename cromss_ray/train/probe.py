"""The transfer probe of ``tune.objective: transfer``: a pretrained encoder judged by a short frozen transfer.

On real data the validation labels are as noisy as the training labels, so a sweep that
maximises noisy-label mIoU rewards memorising the noise. The probe asks what the encoder
is for instead: a fresh decoder trained for a few epochs on a small clean downstream set
on top of the frozen encoder of one branch (spec 11, with fine-tuning's freezing, loss and
whole-tile scoring), scored on that set's held-out tiles. It is plain PyTorch on one
process (rank 0 of a trial), deterministic given ``tune.transfer.seed``, and leaves the
pretrained network and the global random state as they were.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from cromss_ray.config import ConfigError, TransferProbeConfig
from cromss_ray.data.schema import MODALITY_BANDS, ShardMetadata
from cromss_ray.data.storage import ShardSet, TileSet, scan_shards
from cromss_ray.data.transforms import HashSplit, band_indices
from cromss_ray.method import build_segmentation_model, encoder_state_dict, load_encoder_state, segmentation_loss
from cromss_ray.models.scoring import SUMMARY_SCORES, score_tiles
from cromss_ray.models.segmenter import Segmenter, output_stride
from cromss_ray.train.finetune import freeze_encoder

PROBE_SPLIT = "transfer"
"""The metric-key split of the probe's scores: ``transfer/<branch>/<score>``."""
KEY = "tune.transfer"


def probe_metric(branch: str) -> str:
    """The metric a transfer-objective sweep maximises: the probe's mIoU of ``branch``."""
    return f"{PROBE_SPLIT}/{branch}/miou"


@dataclass(frozen=True)
class ProbeRows:
    """The probe's downstream tiles, decoded in memory: its training rows and the rows it is scored on."""

    train: list[dict[str, Any]]
    evaluation: list[dict[str, Any]]
    meta: ShardMetadata


@dataclass(frozen=True)
class ProbeData:
    """The probe's checked tiles (driver side, light to pickle): ``settings`` and the two tile sets."""

    settings: TransferProbeConfig
    train: TileSet
    evaluation: TileSet

    def load(self) -> ProbeRows:
        return ProbeRows(list(self.train.rows()), list(self.evaluation.rows()), self.train.meta)


def _scan(uri: str, key: str, settings: TransferProbeConfig) -> ShardSet:
    try:
        shards = scan_shards(uri, settings.s3_endpoint)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key}: {exc}") from None
    if shards.meta.seasons != 1:
        raise ConfigError(
            f"{key}: {uri} holds {shards.meta.kind} shards of {shards.meta.seasons} dates per row; "
            "the probe takes downstream tiles (e.g. cromss data synth --kind dw)"
        )
    return shards


def probe_data(settings: TransferProbeConfig, encoder: str, s2_bands: int) -> ProbeData:
    """Check the probe's config against its data and network before any trial starts; a ConfigError names the key.

    The shard sets exist and hold downstream tiles with the branch's bands, the test tiles
    have the training tiles' classes, both sides have tiles, a training batch fits, and
    the decoder's output stride divides the crop.
    """
    if settings.data is None:
        raise ConfigError(f"{KEY}.data: the transfer objective needs a downstream shard set")
    shards = _scan(settings.data, f"{KEY}.data", settings)
    meta = shards.meta
    if settings.branch == "s2":
        try:
            band_indices(meta, s2_bands)
        except ValueError as exc:
            raise ConfigError(f"{KEY}.data: {settings.data}: {exc}") from None
    elif set(MODALITY_BANDS["s1"]) - set(meta.s1.bands):
        raise ConfigError(f"{KEY}.data: {settings.data} stores S1 bands {list(meta.s1.bands)}, not VV and VH")
    if settings.test_data is not None:
        test = _scan(settings.test_data, f"{KEY}.test_data", settings)
        if tuple(test.meta.classes) != tuple(meta.classes):
            raise ConfigError(
                f"{KEY}.test_data: classes {list(test.meta.classes)} are not those of "
                f"{settings.data} {list(meta.classes)}"
            )
        train, evaluation, num_train = TileSet(shards), TileSet(test), shards.num_rows
    else:
        ids = shards.read_ids()
        split = HashSplit.for_ids(ids, settings.val_fraction)
        held_out = frozenset(row_id for row_id in ids if split.is_val(row_id))
        if not held_out:
            raise ConfigError(f"{KEY}.val_fraction: holds out no tile of the {len(ids)} in {settings.data}")
        train, evaluation = TileSet(shards, frozenset(ids) - held_out), TileSet(shards, held_out)
        num_train = len(ids) - len(held_out)
    if num_train < settings.batch_size:
        raise ConfigError(
            f"{KEY}.batch_size: {settings.batch_size}, but {settings.data} has {num_train} training tiles"
        )
    stride = output_stride(_probe_network(settings, encoder, s2_bands, meta.num_classes))
    if settings.crop % stride:
        raise ConfigError(
            f"{KEY}.crop: {settings.crop} is not a multiple of {stride}, the output stride of {settings.decoder}"
        )
    return ProbeData(settings, train, evaluation)


def _probe_network(settings: TransferProbeConfig, encoder: str, s2_bands: int, classes: int) -> nn.Module:
    bands = len(MODALITY_BANDS["s1"]) if settings.branch == "s1" else s2_bands
    try:
        return build_segmentation_model(settings.decoder, encoder, bands, classes)
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"{KEY}.decoder: cannot build the network: {exc}") from None


def _inputs(
    segmenter: Segmenter, rows: list[dict[str, Any]], meta: ShardMetadata
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Each row's network input of the segmenter's branch (spec 9) and its label, as tensors."""
    branch = segmenter.branch
    bands = band_indices(meta, segmenter.s2_bands) if branch == "s2" else slice(None)
    for row in rows:
        image = segmenter.network_input(branch, row[branch][bands])
        yield torch.from_numpy(image), torch.from_numpy(row["label"].astype(np.int64))


def _random_crop(
    image: torch.Tensor, label: torch.Tensor, crop: int, generator: torch.Generator, row_id: str
) -> tuple[torch.Tensor, torch.Tensor]:
    height, width = label.shape
    if height < crop or width < crop:
        raise ValueError(f"{KEY}.crop: {crop} px exceeds tile {row_id} ({height} x {width} px)")
    top = int(torch.randint(0, height - crop + 1, (), generator=generator))
    left = int(torch.randint(0, width - crop + 1, (), generator=generator))
    return image[:, top : top + crop, left : left + crop], label[top : top + crop, left : left + crop]


def transfer_probe(
    pretrained: nn.Module,
    encoder: str,
    s2_bands: int,
    rows: ProbeRows,
    settings: TransferProbeConfig,
    device: torch.device,
) -> dict[str, float]:
    """Score the ``settings.branch`` encoder of ``pretrained`` by a short frozen transfer (module docstring).

    A fresh ``settings.decoder`` network gets a copy of the encoder, frozen as fine-tuning
    freezes it (``settings.frozen_batch_norm``), and trains ``settings.epochs`` epochs of
    full batches of random crops with ``settings.loss``; the rows of ``rows.evaluation`` are
    then scored whole (:func:`~cromss_ray.models.scoring.score_tiles`). Returns
    ``transfer/<branch>/<score>`` for the summary scores (``miou``, ``miou_ref``, ...).
    """
    branch, meta = settings.branch, rows.meta
    state = encoder_state_dict(pretrained, branch)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(settings.seed)
        network = _probe_network(settings, encoder, s2_bands, meta.num_classes)
        load_encoder_state(network, state)
        freeze_encoder(network, settings.frozen_batch_norm)
        network.to(device)
        segmenter = Segmenter(network, branch, s2_bands, tuple(meta.classes), {"s1": meta.s1, "s2": meta.s2})
        samples = list(_inputs(segmenter, rows.train, meta))
        ids = [row["id"] for row in rows.train]
        generator = torch.Generator().manual_seed(settings.seed)
        optimizer = torch.optim.Adam([p for p in network.parameters() if p.requires_grad], lr=settings.lr)
        network.train()
        for _ in range(settings.epochs):
            order = torch.randperm(len(samples), generator=generator).tolist()
            for start in range(0, len(order) - settings.batch_size + 1, settings.batch_size):
                crops = [
                    _random_crop(*samples[index], settings.crop, generator, ids[index])
                    for index in order[start : start + settings.batch_size]
                ]
                images, labels = (torch.stack(part).to(device) for part in zip(*crops))
                loss = segmentation_loss(network(images), labels, settings.loss, ignore_index=meta.nodata)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        result = score_tiles(segmenter, rows.evaluation, meta).matrix.compute()
    return {f"{PROBE_SPLIT}/{branch}/{name}": result[name] for name in SUMMARY_SCORES}
