"""Per-pixel trust in a shard set's noisy labels, from a pretrained CromSS network (spec 3, 4, 6; ``cromss audit``).

:class:`TrustMaps` runs the two-branch network on every season of every shard row and
gives, per tile (one row's season) and pixel, the two branches' **trust** (the entangled
label confidence ``c^_lbl`` of spec 4: how much the model believes the noisy label) and
their **selection weight** (spec 6, at the selection ratio of a given epoch). Each tile
is selected on its own (one tile is the "batch" of spec 6), so a tile's weights do not
depend on which tiles share a call. It is a Ray Data ``map_batches`` UDF (pyarrow
batches in and out) but imports no Ray. :class:`LabelErrorTally` turns the maps into
what a user cleaning a dataset reads: locations and classes ranked by estimated label
error, and the tiles the model trusts least.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from cromss_ray.data.scaling import network_input
from cromss_ray.data.schema import S1_BAND_NAMES, ShardMetadata, s2_subset_names
from cromss_ray.data.shards import RowValidationError, check_values
from cromss_ray.data.transforms import BinaryColumn, band_indices
from cromss_ray.method import CromSSLoss, CromSSNet, SelectionMaps
from cromss_ray.method.losses import MODALITIES
from cromss_ray.models.segmenter import output_stride, pad_to_multiple

MAP_DTYPE = np.dtype("<f4")
"""The trust and weight maps are stored as little-endian float32 bytes, (height, width) row-major."""
MAP_COLUMNS = tuple(f"{kind}_{branch}" for kind in ("trust", "weight") for branch in MODALITIES)
LOW_WEIGHT = 0.5
"""A pixel whose selection weight is below this counts as low-weight: the model gives its label less than
half the weight of the class's most trusted labels (spec 6)."""


def trust_schema(meta: ShardMetadata) -> pa.Schema:
    """The columns of the trust-map table: one row per tile (location id and season)."""
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("season", pa.int32(), nullable=False),
        pa.field("date", pa.string(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("label", pa.binary(), nullable=False),
    ]
    if meta.has_clean_label:
        fields.append(pa.field("clean_label", pa.binary(), nullable=False))
    fields.extend(pa.field(name, pa.binary(), nullable=False) for name in MAP_COLUMNS)
    return pa.schema(fields)


def check_auditable(network: CromSSNet, classes: int, meta: ShardMetadata, where: str) -> None:
    """Raise a ValueError naming ``where`` unless the shards hold what the network takes and label its classes."""
    if meta.num_classes != classes:
        raise ValueError(
            f"{where}: the shards label {meta.num_classes} classes ({', '.join(meta.classes)}), "
            f"the model predicts {classes}"
        )
    if tuple(meta.s1.bands) != S1_BAND_NAMES:
        raise ValueError(
            f"{where}: the shards store S1 bands {list(meta.s1.bands)}, the model takes {list(S1_BAND_NAMES)}"
        )
    try:
        band_indices(meta, network.s2_bands)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


@dataclass
class TrustMaps:
    """Ray Data UDF (``batch_format="pyarrow"``): shard rows to one trust-map row per season (module docstring).

    ``criterion`` is the model's own CromSS objective (its confidence kind, selection
    schedule and class balancing); ``epoch`` picks the selection ratio (spec 5). The
    batch needs the shard columns and ``path`` (named in errors). Every array of a row is
    checked first (labels in the class set or no-data, finite imagery, byte lengths).
    """

    network: CromSSNet
    criterion: CromSSLoss
    meta: ShardMetadata
    epoch: int
    device: str = "cpu"
    _bands: np.ndarray | slice = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.network = self.network.to(self.device).eval()
        self._bands = band_indices(self.meta, self.network.s2_bands)

    def __call__(self, batch: pa.Table) -> pa.Table:
        meta = self.meta
        ids, paths = batch.column("id").to_pylist(), batch.column("path").to_pylist()
        dates = batch.column("dates").to_pylist()
        heights, widths = batch.column("height").to_numpy(), batch.column("width").to_numpy()
        columns = self._columns(batch)
        rows: list[dict[str, np.ndarray]] = []
        by_size: dict[tuple[int, int], list[int]] = {}
        for row, row_id in enumerate(ids):
            size = (int(heights[row]), int(widths[row]))
            try:
                views = {name: column.view(row, row_id, *size) for name, column in columns.items()}
                for name, view in views.items():
                    check_values(meta, row_id, name, view)
            except RowValidationError as exc:
                raise ValueError(f"{paths[row]}: {exc}") from None
            rows.append({name: self._by_season(name, view) for name, view in views.items()})
            by_size.setdefault(size, []).append(row)
        schema = trust_schema(meta)
        tiles: dict[str, list] = {name: [] for name in schema.names}
        label_names = [name for name in ("label", "clean_label") if name in columns]
        for (height, width), members in by_size.items():
            maps = self._maps([rows[row] for row in members])
            tile_rows = [(row, season) for row in members for season in range(meta.seasons)]
            for slot, (row, season) in enumerate(tile_rows):
                tiles["id"].append(ids[row])
                tiles["season"].append(season)
                tiles["date"].append(dates[row][season] if season < len(dates[row]) else "")
                tiles["height"].append(height)
                tiles["width"].append(width)
                for name in label_names:
                    tiles[name].append(np.ascontiguousarray(rows[row][name][season]).tobytes())
                for name, stack in maps.items():
                    tiles[name].append(stack[slot].astype(MAP_DTYPE, copy=False).tobytes())
        return pa.Table.from_pydict(tiles, schema=schema)

    def _columns(self, batch: pa.Table) -> dict[str, BinaryColumn]:
        """Zero-copy views of the images and labels of the batch's rows."""
        meta = self.meta
        columns = {
            name: BinaryColumn(
                batch.column(name), name, meta.numpy_dtype(name), lambda h, w, m=name: meta.image_shape(m, h, w)
            )
            for name in ("s1", "s2")
        }
        for name in ("label", "clean_label") if meta.has_clean_label else ("label",):
            columns[name] = BinaryColumn(batch.column(name), name, np.dtype(np.uint8), meta.label_shape)
        return columns

    def _by_season(self, name: str, view: np.ndarray) -> np.ndarray:
        """A row's array with the season axis first, also when the shards hold one season per row."""
        per_season = view.shape[-2:] if name in ("label", "clean_label") else view.shape[-3:]
        return view.reshape(self.meta.seasons, *per_season)

    @torch.no_grad()
    def _maps(self, rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Trust and weight maps (tiles, H, W) of rows of one size, every season of each in order."""
        s2_spec = self.meta.s2.with_bands(s2_subset_names(self.network.s2_bands))
        x1, x2 = (
            torch.from_numpy(network_input(np.concatenate(stack), spec)).to(self.device)
            for stack, spec in (
                ([row["s1"] for row in rows], self.meta.s1),
                ([row["s2"][:, self._bands] for row in rows], s2_spec),
            )
        )
        labels = torch.from_numpy(np.concatenate([row["label"] for row in rows])).to(self.device)
        height, width = labels.shape[-2:]
        stride = output_stride(self.network)
        z1, z2 = (
            logits[..., :height, :width]
            for logits in self.network(pad_to_multiple(x1, stride), pad_to_multiple(x2, stride))
        )
        tiles = [
            self.criterion.selection_maps(z1[i : i + 1], z2[i : i + 1], labels[i : i + 1], self.epoch)
            for i in range(len(labels))
        ]
        return {
            **{f"trust_{branch}": self._stack(tiles, "trust", index) for index, branch in enumerate(MODALITIES)},
            **{f"weight_{branch}": self._stack(tiles, "weights", index) for index, branch in enumerate(MODALITIES)},
        }

    @staticmethod
    def _stack(tiles: Sequence[SelectionMaps], kind: str, branch: int) -> np.ndarray:
        return torch.cat([getattr(maps, kind)[branch] for maps in tiles]).float().cpu().numpy()


def decode_map(table: pa.Table, column: str, index: int) -> np.ndarray:
    """Tile ``index``'s ``column`` of a trust-map table as an (H, W) array (float32 maps, uint8 labels)."""
    height, width = table.column("height")[index].as_py(), table.column("width")[index].as_py()
    dtype = MAP_DTYPE if column in MAP_COLUMNS else np.dtype(np.uint8)
    return np.frombuffer(table.column(column)[index].as_py(), dtype=dtype).reshape(height, width)


@dataclass(frozen=True)
class WorstTile:
    """A tile the model trusts least: its mean trust over labelled pixels and its maps."""

    mean_trust: float
    id: str
    season: int
    label: np.ndarray
    clean_label: np.ndarray | None
    trust: np.ndarray
    weight: np.ndarray


@dataclass
class _Location:
    labelled: int = 0
    trust_sum: float = 0.0
    low_weight: int = 0
    corrupted: int = 0
    worst_season: int = -1
    worst_mean: float = float("inf")


class LabelErrorTally:
    """Estimated label error of one branch's trust, by location and by (noisy) class, and the least trusted tiles.

    A pixel counts when its noisy label is one of the ``class_names`` (no-data pixels do
    not). The estimated error of a set of pixels is their mean ``1 - trust``; the
    low-weight share is the share with selection weight below :data:`LOW_WEIGHT`. With
    clean labels the true share of wrong noisy labels (``noise_rate``) is tallied beside them.
    """

    def __init__(self, class_names: Sequence[str], branch: str, keep_worst: int = 0) -> None:
        if branch not in MODALITIES:
            raise ValueError(f"branch must be one of {MODALITIES}, got {branch!r}")
        if keep_worst < 0:
            raise ValueError(f"keep_worst must be at least 0, got {keep_worst}")
        self.class_names = tuple(class_names)
        self.branch = branch
        self.keep_worst = keep_worst
        classes = len(self.class_names)
        self.class_pixels = np.zeros(classes, np.int64)
        self.class_trust = np.zeros(classes, np.float64)
        self.class_low_weight = np.zeros(classes, np.int64)
        self.class_corrupted = np.zeros(classes, np.int64)
        self.has_clean = False
        self._locations: dict[str, _Location] = {}
        self._worst: list[tuple[float, int, WorstTile]] = []
        self._added = 0

    def add_tile(
        self,
        row_id: str,
        season: int,
        label: np.ndarray,
        trust: np.ndarray,
        weight: np.ndarray,
        clean_label: np.ndarray | None = None,
    ) -> None:
        """Count one tile's maps (H, W)."""
        classes = len(self.class_names)
        labelled = label < classes
        noisy = label[labelled].astype(np.int64)
        kept_trust = trust[labelled].astype(np.float64)
        low = weight[labelled] < LOW_WEIGHT
        self.class_pixels += np.bincount(noisy, minlength=classes)
        self.class_trust += np.bincount(noisy, weights=kept_trust, minlength=classes)
        self.class_low_weight += np.bincount(noisy, weights=low, minlength=classes).astype(np.int64)
        corrupted = 0
        if clean_label is not None:
            self.has_clean = True
            wrong = (clean_label[labelled] != label[labelled]) & (clean_label[labelled] < classes)
            self.class_corrupted += np.bincount(noisy, weights=wrong, minlength=classes).astype(np.int64)
            corrupted = int(wrong.sum())
        location = self._locations.setdefault(row_id, _Location())
        location.labelled += int(labelled.sum())
        location.trust_sum += float(kept_trust.sum())
        location.low_weight += int(low.sum())
        location.corrupted += corrupted
        if not labelled.any():
            return
        mean = float(kept_trust.mean())
        if mean < location.worst_mean:
            location.worst_season, location.worst_mean = season, mean
        self._added += 1
        if self.keep_worst:
            clean_copy = None if clean_label is None else clean_label.copy()
            tile = WorstTile(mean, row_id, season, label.copy(), clean_copy, trust.copy(), weight.copy())
            entry = (-mean, -self._added, tile)
            if len(self._worst) < self.keep_worst:
                heapq.heappush(self._worst, entry)
            elif entry > self._worst[0]:
                heapq.heapreplace(self._worst, entry)

    def add_table(self, table: pa.Table) -> None:
        """Count every tile of a trust-map table (:class:`TrustMaps` output)."""
        clean = "clean_label" in table.column_names
        for index in range(table.num_rows):
            self.add_tile(
                table.column("id")[index].as_py(),
                table.column("season")[index].as_py(),
                decode_map(table, "label", index),
                decode_map(table, f"trust_{self.branch}", index),
                decode_map(table, f"weight_{self.branch}", index),
                decode_map(table, "clean_label", index) if clean else None,
            )

    def worst_tiles(self) -> list[WorstTile]:
        """The kept tiles, least trusted first (ties: the tile counted first)."""
        return [tile for _, _, tile in sorted(self._worst, reverse=True)]

    def location_ranking(self) -> pa.Table:
        """One row per location with labelled pixels, highest estimated error first (ties by id)."""
        counted = [(row_id, loc) for row_id, loc in self._locations.items() if loc.labelled]
        rows = sorted(
            ((1.0 - loc.trust_sum / loc.labelled, row_id, loc) for row_id, loc in counted),
            key=lambda item: (-item[0], item[1]),
        )
        table = {
            "id": [row_id for _, row_id, _ in rows],
            "labelled_pixels": [loc.labelled for _, _, loc in rows],
            "estimated_error": [error for error, _, _ in rows],
            "low_weight_share": [loc.low_weight / loc.labelled for _, _, loc in rows],
            "worst_season": [loc.worst_season for _, _, loc in rows],
        }
        if self.has_clean:
            table["noise_rate"] = [loc.corrupted / loc.labelled for _, _, loc in rows]
        return pa.table(table)

    def class_ranking(self) -> pa.Table:
        """One row per class present in the noisy labels, highest estimated error first (ties by class index)."""
        present = np.flatnonzero(self.class_pixels)
        pixels = self.class_pixels[present]
        error = 1.0 - self.class_trust[present] / pixels
        order = np.lexsort((present, -error))
        table = {
            "class": present[order].tolist(),
            "name": [self.class_names[index] for index in present[order]],
            "labelled_pixels": pixels[order].tolist(),
            "pixel_share": (pixels[order] / self.class_pixels.sum()).tolist(),
            "estimated_error": error[order].tolist(),
            "low_weight_share": (self.class_low_weight[present] / pixels)[order].tolist(),
        }
        if self.has_clean:
            table["noise_rate"] = (self.class_corrupted[present] / pixels)[order].tolist()
        return pa.table(table)
