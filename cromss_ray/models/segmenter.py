"""The one segmenter: class maps of images of any size, tiled, overlapping, blended (spec 1, 11).

A :class:`Segmenter` wraps a network with what inference needs: a fine-tuned
single-branch smp model, or a pretrained CromSS network used fused (the mean of the two
softmax outputs, spec 1) or through one branch. :func:`predict_array` predicts numpy
images (:func:`~cromss_ray.models.geotiff.predict_geotiff` GeoTIFFs, strip by strip);
:func:`predict_maps` runs a pretrained network on whole images, fused and per branch.

Tiling: the image is covered by ``tile`` x ``tile`` windows that overlap by ``overlap``
pixels (a quarter of the tile unless given), the last window of each row and column aligned with the image edge. Each
window's class probabilities are weighted by a window function that is 1 inside and
falls along a raised cosine over the ``overlap`` pixels next to a neighbouring window
(sides on the image border keep weight 1); the weighted probabilities are summed and
divided by the summed weights, so a pixel's prediction moves smoothly from one window
to the next and there are no seams. The class map is the argmax. Images smaller than a
tile are padded (edge values repeated) to a multiple of the network's stride and the
result cropped back.

Windows are run one strip (one row of windows) at a time, and rows are handed out as
soon as no later strip covers them, so memory grows with the image width, not its size.

Inputs with band names (a GeoTIFF's band descriptions, ``cromss predict --s2-bands``, the
pyfunc's ``s2_bands`` param) give the network its bands by name, whatever else they hold
and in whatever order; unnamed ones hold the network's bands in its order, or S2's 13 L1C
bands (:meth:`Segmenter.band_indexes`). A pixel with a NaN or infinite value in any band of
any input is masked: the network sees the code of the band means there (``MEAN_CODE``, so
nothing non-finite reaches a window), and its probabilities are NaN and its class
``NODATA`` (255) (:func:`class_map`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cromss_ray.data.scaling import MEAN_CODE, V8_MAX, network_input
from cromss_ray.data.schema import (
    MODALITY_BANDS,
    NODATA,
    S1_BAND_NAMES,
    S2_BAND_NAMES,
    S2_BAND_SUBSETS,
    ModalitySpec,
    Representation,
    canonical_band_name,
    s2_subset_names,
)
from cromss_ray.method import CromSSNet, SingleModalityNet, fused_probabilities

BranchName = Literal["s1", "s2", "fused"]
"""What a segmenter predicts from: one modality's branch, or both fused (spec 1)."""
BRANCHES: tuple[str, ...] = ("s1", "s2", "fused")
S1_BANDS = len(S1_BAND_NAMES)
ALL_S2_BANDS = len(S2_BAND_NAMES)
DEFAULT_TILE = 256
DEFAULT_BATCH_SIZE = 4
OVERLAP_SHARE = 4
"""Without an explicit overlap, windows overlap by a quarter of the tile."""
MASKED_INPUT = np.float32(MEAN_CODE) / np.float32(V8_MAX)
"""The network input of a masked pixel, every band: the code of the band's mean (spec 9)."""
BAND_NAMING = {
    "s1": "GeoTIFF band descriptions, cromss predict --s1-bands VV,VH, the pyfunc's s1_bands param",
    "s2": "GeoTIFF band descriptions, cromss predict --s2-bands B2,B3,..., the pyfunc's s2_bands param",
}
"""Where an input's band names come from, for the errors that ask for them."""


PRODUCT_INPUTS: dict[str, ModalitySpec] = {
    "s1": ModalitySpec(dtype="float32", bands=S1_BAND_NAMES, unit="dB", representation="physical"),
    "s2": ModalitySpec(dtype="uint16", bands=S2_BAND_NAMES, scale=1e-4, unit="reflectance", representation="physical"),
}
"""The raw products: S1 backscatter in dB (float32), S2 L1C digital numbers (uint16, reflectance x 10 000)."""


def product_input(modality: str, representation: Representation) -> ModalitySpec:
    """How ``modality``'s raw product arrives: physical (:data:`PRODUCT_INPUTS`) or the released uint8 v8 codes."""
    if representation == "physical":
        return PRODUCT_INPUTS[modality]
    return ModalitySpec(dtype="uint8", bands=MODALITY_BANDS[modality], representation="v8")


def output_stride(network: nn.Module) -> int:
    """The factor input sizes must be multiples of: the largest encoder output stride of ``network``."""
    if isinstance(network, CromSSNet):
        return max(network.encoder_for(modality).output_stride for modality in ("s1", "s2"))
    encoder = getattr(network, "encoder", None)
    return int(getattr(encoder, "output_stride", 1))


def pad_to_multiple(images: torch.Tensor, multiple: int) -> torch.Tensor:
    """``images`` (N, B, H, W) padded at the bottom and right, edge values repeated, to multiples of ``multiple``."""
    height, width = images.shape[-2:]
    if height % multiple == 0 and width % multiple == 0:
        return images
    return F.pad(images, (0, -width % multiple, 0, -height % multiple), mode="replicate")


@dataclass(frozen=True)
class Segmenter:
    """A network ready for inference, with the inputs it takes and the classes it predicts.

    ``network`` is a :class:`~cromss_ray.method.CromSSNet` (``branch`` 's1', 's2' or
    'fused') or a single-modality network taking ``branch``'s image (a fine-tuned smp
    model, or the pretrained :class:`~cromss_ray.method.SingleModalityNet` of that modality).
    ``inputs`` says per modality how the values given to it are stored (dtype, unit,
    representation; its band names are not used): :meth:`network_input` makes them model
    inputs by the one rule of spec 9.
    """

    network: nn.Module
    branch: BranchName
    s2_bands: int
    class_names: tuple[str, ...]
    inputs: Mapping[str, ModalitySpec] = field(default_factory=lambda: dict(PRODUCT_INPUTS))

    def __post_init__(self) -> None:
        if self.branch not in BRANCHES:
            raise ValueError(f"branch must be one of {BRANCHES}, got {self.branch!r}")
        if self.branch == "fused" and not isinstance(self.network, CromSSNet):
            raise ValueError("the fused prediction needs a two-branch CromSS network")
        if isinstance(self.network, SingleModalityNet) and self.branch != self.network.modality:
            modality = self.network.modality
            raise ValueError(f"the single-modality {modality.upper()} baseline predicts from '{modality}' only")
        if self.s2_bands not in S2_BAND_SUBSETS:
            raise ValueError(f"s2_bands must be one of {sorted(S2_BAND_SUBSETS)}, got {self.s2_bands}")

    @property
    def modalities(self) -> tuple[str, ...]:
        """The images the network needs: ('s1', 's2') for the fused prediction, else its branch."""
        return ("s1", "s2") if self.branch == "fused" else (self.branch,)

    @property
    def stride(self) -> int:
        """Input sizes the network takes are multiples of this (its encoders' output stride)."""
        return output_stride(self.network)

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def bands(self, modality: str) -> int:
        """The band count the network takes for ``modality``."""
        return S1_BANDS if modality == "s1" else self.s2_bands

    def band_names(self, modality: str) -> tuple[str, ...]:
        """The names of the bands the network takes for ``modality``, in its order."""
        return S1_BAND_NAMES if modality == "s1" else s2_subset_names(self.s2_bands)

    def band_indexes(self, modality: str, count: int, names: Sequence[str] | None, where: str) -> list[int]:
        """0-based positions, in ``where``'s ``count`` bands, of the bands the network takes, in its order.

        With ``names`` (one per band, any spelling :func:`canonical_band_name` reads) the
        bands are picked by name and the others dropped; without, the input holds the
        network's bands in its order, or for S2 all 13 L1C bands in theirs. Errors name
        ``where``, the band missing or not of ``modality``, or the counts and the fix.
        """
        wanted = self.band_names(modality)
        if names:
            if len(names) != count:
                raise ValueError(f"{where}: {len(names)} band names ({', '.join(names)}) for {count} bands")
            return band_positions(names, wanted, modality, where)
        if count == len(wanted):
            return list(range(count))
        if modality == "s2" and count == ALL_S2_BANDS:
            return list(S2_BAND_SUBSETS[self.s2_bands])
        takes = f"{len(wanted)} {modality.upper()} bands ({', '.join(wanted)})"
        also = f" or all {ALL_S2_BANDS} L1C bands" if modality == "s2" else ""
        raise ValueError(
            f"{where}: has {count} unnamed bands; the model takes {takes}{also}. "
            f"Name the bands to pick them by name ({BAND_NAMING[modality]})"
        )

    def network_input(self, modality: str, stored: np.ndarray) -> np.ndarray:
        """float32 model input (spec 9) of ``modality``'s network bands (..., bands, H, W) stored as :attr:`inputs`
        say; NaN at every pixel where a band is not finite (masked, module docstring)."""
        result = network_input(stored, self.inputs[modality].with_bands(self.band_names(modality)))
        stored = np.asarray(stored)
        if np.issubdtype(stored.dtype, np.floating):
            result[np.broadcast_to(~np.isfinite(stored).all(axis=-3, keepdims=True), result.shape)] = np.nan
        return result

    @torch.no_grad()
    def probabilities(self, images: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Class probabilities (N, C, H, W) of images (N, bands, H, W) keyed by modality, any H and W."""
        height, width = images[self.modalities[0]].shape[-2:]
        padded = {modality: pad_to_multiple(images[modality], self.stride) for modality in self.modalities}
        self.network.eval()
        if isinstance(self.network, CromSSNet):
            if self.branch == "fused":
                result = fused_probabilities(*self.network(padded["s1"], padded["s2"]))
            else:
                result = torch.softmax(self.network.forward_branch(padded[self.branch], self.branch), dim=1)
        else:
            result = torch.softmax(self.network(padded[self.branch]), dim=1)
        return result[..., :height, :width]


def band_positions(names: Sequence[str], wanted: Sequence[str], modality: str, where: str) -> list[int]:
    """Positions in ``names`` (an input's band names) of the ``wanted`` bands, in their order; errors name
    ``where`` and a band that is not of ``modality``, named twice, or missing."""
    canonical = []
    for name in names:
        band = canonical_band_name(name, modality)
        if band is None:
            raise ValueError(
                f"{where}: band {name!r} is not a {modality.upper()} band ({', '.join(MODALITY_BANDS[modality])})"
            )
        if band in canonical:
            raise ValueError(f"{where}: band {band} is named twice")
        canonical.append(band)
    missing = [band for band in wanted if band not in canonical]
    if missing:
        raise ValueError(
            f"{where}: lacks the {modality.upper()} band{'s' * (len(missing) > 1)} {', '.join(missing)} that the "
            f"model takes ({', '.join(wanted)}); it holds {', '.join(canonical)}"
        )
    return [canonical.index(band) for band in wanted]


def fill_masked(images: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``images`` (..., bands, H, W) with every pixel that is not finite in some band of some image set to
    :data:`MASKED_INPUT` in all bands; and that mask (..., H, W)."""
    masked = torch.stack([~torch.isfinite(image).all(dim=-3) for image in images.values()]).any(dim=0)
    fill = torch.tensor(MASKED_INPUT, dtype=torch.float32, device=masked.device)
    return {key: torch.where(masked.unsqueeze(-3), fill, image) for key, image in images.items()}, masked


def class_map(probabilities: np.ndarray, axis: int = 0) -> np.ndarray:
    """The argmax of ``probabilities`` over ``axis`` (int64), ``NODATA`` where they are NaN (masked pixels)."""
    classes = np.nan_to_num(probabilities, nan=0.0).argmax(axis=axis)
    classes[np.isnan(probabilities).any(axis=axis)] = NODATA
    return classes


def check_tiling(tile: int, overlap: int | None, stride: int) -> int:
    """The overlap to use (a quarter of ``tile`` when None), checked: ``tile`` a positive multiple of
    the network's stride, ``0 <= overlap < tile``."""
    if tile < stride or tile % stride:
        raise ValueError(f"tile must be a positive multiple of the network's stride {stride}, got {tile}")
    overlap = tile // OVERLAP_SHARE if overlap is None else overlap
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be at least 0 and below the tile size {tile}, got {overlap}")
    return overlap


def window_origins(size: int, span: int, overlap: int) -> list[int]:
    """Start offsets of ``span``-pixel windows covering ``size`` pixels with ``overlap``; the last ends at the edge."""
    if size <= span:
        return [0]
    step = span - overlap
    return [*range(0, size - span, step), size - span]


def window_span(size: int, tile: int, stride: int) -> int:
    """The window length along an axis of ``size`` pixels: the tile, or the axis padded to the stride when shorter."""
    return tile if size > tile else math.ceil(size / stride) * stride


def taper(span: int, overlap: int, *, before: bool, after: bool) -> np.ndarray:
    """1-D blending weights of a window: 1, falling along a raised cosine over ``overlap`` pixels on a side facing
    another window (``before``: the low-index side). Strictly positive, so every pixel has weight."""
    weights = np.ones(span, dtype=np.float32)
    ramp_length = min(overlap, span)
    if ramp_length == 0:
        return weights
    ramp = (0.5 - 0.5 * np.cos(np.pi * np.arange(1, ramp_length + 1) / (ramp_length + 1))).astype(np.float32)
    if before:
        weights[:ramp_length] = np.minimum(weights[:ramp_length], ramp)
    if after:
        weights[span - ramp_length :] = np.minimum(weights[span - ramp_length :], ramp[::-1])
    return weights


RowReader = Callable[[int, int], dict[str, np.ndarray]]
"""``read(first_row, stop_row)``: the model inputs (bands, rows, W) of those image rows, keyed by modality."""


def iter_probability_rows(
    segmenter: Segmenter,
    read_rows: RowReader,
    height: int,
    width: int,
    *,
    tile: int = DEFAULT_TILE,
    overlap: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> Iterator[tuple[int, np.ndarray]]:
    """Blended class probabilities, top to bottom, in ``(first row, (C, rows, width) float32)`` blocks.

    ``read_rows`` supplies the inputs strip by strip; see the module docstring for the tiling.
    Masked pixels (not finite in some input) have NaN probabilities.
    """
    overlap = check_tiling(tile, overlap, segmenter.stride)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    row_span, col_span = window_span(height, tile, segmenter.stride), window_span(width, tile, segmenter.stride)
    row_origins, col_origins = window_origins(height, row_span, overlap), window_origins(width, col_span, overlap)
    padded_width = max(width, col_span)
    classes = len(segmenter.class_names)
    weight, mask = classes, classes + 1
    carry = np.zeros((classes + 2, 0, padded_width), dtype=np.float32)
    for strip, top in enumerate(row_origins):
        accumulator = np.zeros((classes + 2, row_span, padded_width), dtype=np.float32)
        accumulator[:, : carry.shape[1]] = carry
        row_weights = taper(row_span, overlap, before=strip > 0, after=strip < len(row_origins) - 1)
        images, masked = _strip_tensors(segmenter, read_rows(top, min(top + row_span, height)), row_span, padded_width)
        accumulator[mask, : masked.shape[0], : masked.shape[1]] += masked
        _add_strip(segmenter, images, accumulator[: mask], row_weights, col_origins, col_span, overlap, batch_size)
        last = strip == len(row_origins) - 1
        finished = min(height, top + row_span) - top if last else row_origins[strip + 1] - top
        block = accumulator[:classes, :finished, :width] / accumulator[weight, :finished, :width]
        block[:, accumulator[mask, :finished, :width] > 0] = np.nan
        yield top, block
        carry = accumulator[:, finished:]


def _add_strip(
    segmenter: Segmenter,
    images: Mapping[str, torch.Tensor],
    accumulator: np.ndarray,
    row_weights: np.ndarray,
    col_origins: Sequence[int],
    col_span: int,
    overlap: int,
    batch_size: int,
) -> None:
    """Add one strip's windows to ``accumulator``: weighted probabilities (C planes) and weights (last plane)."""
    classes = accumulator.shape[0] - 1
    for start in range(0, len(col_origins), batch_size):
        lefts = col_origins[start : start + batch_size]
        windows = {
            modality: torch.cat([image[..., left : left + col_span] for left in lefts])
            for modality, image in images.items()
        }
        probabilities = segmenter.probabilities(windows).float().cpu().numpy()
        if probabilities.shape[1] != classes:
            raise ValueError(f"the network predicts {probabilities.shape[1]} classes, the segmenter names {classes}")
        for index, left in enumerate(lefts):
            column = start + index
            col_weights = taper(col_span, overlap, before=column > 0, after=column < len(col_origins) - 1)
            weights = np.outer(row_weights, col_weights)
            accumulator[:classes, :, left : left + col_span] += probabilities[index] * weights
            accumulator[classes, :, left : left + col_span] += weights


def _strip_tensors(
    segmenter: Segmenter, inputs: Mapping[str, np.ndarray], rows: int, width: int
) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """One strip's inputs as (1, bands, rows, width) tensors on the segmenter's device, masked pixels filled
    (:func:`fill_masked`) and edge-padded when short; and the mask of its own rows and columns."""
    images = {
        modality: torch.as_tensor(np.ascontiguousarray(inputs[modality]), dtype=torch.float32, device=segmenter.device)
        for modality in segmenter.modalities
    }
    filled, masked = fill_masked(images)
    tensors = {}
    for modality, image in filled.items():
        pad_rows, pad_cols = rows - image.shape[-2], width - image.shape[-1]
        image = image[None]
        if pad_rows or pad_cols:
            image = F.pad(image, (0, pad_cols, 0, pad_rows), mode="replicate")
        tensors[modality] = image
    return tensors, masked.cpu().numpy()


@dataclass(frozen=True)
class Prediction:
    """A predicted class map (H, W) int64 and its class probabilities (C, H, W) float32; ``NODATA`` and NaN
    where an input pixel is masked (not finite)."""

    classes: np.ndarray
    probabilities: np.ndarray


BandNames = Mapping[str, Sequence[str] | None]
"""Band names of the inputs, by modality (absent or empty: unnamed)."""


def _checked_arrays(
    segmenter: Segmenter, images: Mapping[str, np.ndarray | None], band_names: BandNames
) -> dict[str, np.ndarray]:
    """The images the segmenter needs, (bands, H, W), cut to its bands (:meth:`Segmenter.band_indexes`);
    errors name the input."""
    arrays: dict[str, np.ndarray] = {}
    for modality in segmenter.modalities:
        image = images.get(modality)
        if image is None:
            raise ValueError(f"the {segmenter.branch} prediction needs the {modality.upper()} image")
        image = np.asarray(image)
        if image.ndim != 3:
            raise ValueError(f"{modality} must be (bands, H, W), got shape {image.shape}")
        indexes = segmenter.band_indexes(modality, image.shape[0], band_names.get(modality), modality)
        arrays[modality] = image if indexes == list(range(image.shape[0])) else image[indexes]
    shapes = {modality: image.shape[1:] for modality, image in arrays.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"the images differ in size: {shapes}")
    return arrays


def predict_array(
    segmenter: Segmenter,
    *,
    s1: np.ndarray | None = None,
    s2: np.ndarray | None = None,
    tile: int = DEFAULT_TILE,
    overlap: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    stored: bool = False,
    band_names: BandNames | None = None,
) -> Prediction:
    """Class map and probabilities of images (bands, H, W): model inputs, or with ``stored`` images
    stored as the segmenter's :attr:`~Segmenter.inputs` declare (made model inputs by spec 9's rule).

    ``band_names`` names an image's bands, by modality; the network's are picked by name.
    Unnamed, ``s2`` holds the model's S2 bands or all 13 L1C bands (the subset is taken,
    spec 9). Only the images the segmenter needs are required. Tiled and blended, masked
    pixels NODATA (module docstring).
    """
    arrays = _checked_arrays(segmenter, {"s1": s1, "s2": s2}, band_names or {})
    if stored:
        arrays = {modality: segmenter.network_input(modality, image) for modality, image in arrays.items()}
    height, width = next(iter(arrays.values())).shape[1:]
    probabilities = np.empty((len(segmenter.class_names), height, width), dtype=np.float32)

    def read_rows(first: int, stop: int) -> dict[str, np.ndarray]:
        return {modality: image[:, first:stop] for modality, image in arrays.items()}

    for top, block in iter_probability_rows(
        segmenter, read_rows, height, width, tile=tile, overlap=overlap, batch_size=batch_size
    ):
        probabilities[:, top : top + block.shape[1]] = block
    return Prediction(classes=class_map(probabilities), probabilities=probabilities)


MAPS_BATCH_SIZE = 8
"""Images :func:`predict_maps` runs at once unless told otherwise (the pretrained pyfunc's default)."""


def _checked_pair(network: CromSSNet, s1: np.ndarray, s2: np.ndarray) -> None:
    for name, array, bands in (("s1", s1, network.s1_bands), ("s2", s2, network.s2_bands)):
        if array.ndim != 4 or array.shape[1] != bands:
            raise ValueError(f"input '{name}' must be (N, {bands}, H, W), got {array.shape}")
    if s1.shape[0] != s2.shape[0] or s1.shape[2:] != s2.shape[2:]:
        raise ValueError(f"inputs 's1' {s1.shape} and 's2' {s2.shape} differ in N, H or W")


@torch.no_grad()
def predict_maps(
    network: CromSSNet, s1: np.ndarray, s2: np.ndarray, batch_size: int = MAPS_BATCH_SIZE
) -> dict[str, np.ndarray]:
    """Class maps and probabilities of whole images (N, bands, H, W), fused (spec 1) and of each branch.

    Keys ``classes`` / ``probabilities`` (fused) and ``s1_...``, ``s2_...`` (one branch
    alone). Each image is padded to the encoders' stride and the outputs cropped back;
    runs on the device of ``network``'s parameters, ``batch_size`` images at a time. A pixel
    not finite in some band of either image is masked in every output (module docstring).
    """
    _checked_pair(network, s1, s2)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = next(network.parameters()).device
    stride = output_stride(network)
    height, width = s1.shape[2:]
    parts: dict[str, list[torch.Tensor]] = {"probabilities": [], "s1_probabilities": [], "s2_probabilities": []}
    for start in range(0, s1.shape[0], batch_size):
        images = {
            name: torch.as_tensor(image[start : start + batch_size], dtype=torch.float32, device=device)
            for name, image in (("s1", s1), ("s2", s2))
        }
        filled, masked = fill_masked(images)
        x1, x2 = (pad_to_multiple(filled[name], stride) for name in ("s1", "s2"))
        z1, z2 = (logits[..., :height, :width] for logits in network(x1, x2))
        for key, probabilities in (
            ("probabilities", fused_probabilities(z1, z2)),
            ("s1_probabilities", torch.softmax(z1, dim=1)),
            ("s2_probabilities", torch.softmax(z2, dim=1)),
        ):
            parts[key].append(probabilities.masked_fill(masked.unsqueeze(1), float("nan")).cpu())
    outputs: dict[str, np.ndarray] = {}
    for prefix in ("", "s1_", "s2_"):
        probabilities = torch.cat(parts[f"{prefix}probabilities"]).numpy()
        outputs[f"{prefix}classes"] = class_map(probabilities, axis=1)
        outputs[f"{prefix}probabilities"] = probabilities
    return outputs
