"""``cromss audit``: how much a pretrained CromSS model trusts each noisy label of a shard set (spec 4, 6).

The registered two-branch model runs over every row of the shards on Ray Data
(``map_batches`` of :class:`~cromss_ray.models.trust.TrustMaps`, the network on each
worker, on a GPU when the cluster has one); the driver streams the maps into
``DIR/trust_maps.parquet`` (one row per tile: location id, season, labels, and per
branch the trust and selection-weight maps) and tallies them. Written into ``DIR``:

* ``locations.csv`` and ``classes.csv``: locations and noisy classes ranked by
  estimated label error (mean ``1 - trust`` of one branch, default S2), with the share of
  low-weight pixels, and the true noise rate when the shards carry clean labels;
* with clean labels, ``precision_recall.png``, and the selection's precision, recall,
  AUROC and base rate per branch, by the definitions of the training diagnostics
  (:class:`~cromss_ray.method.NoiseDiagnostics`);
* ``previews/``: PNG panels (S2 RGB, noisy label, trust, weight) of the least trusted tiles.

Everything is logged to an MLflow run in the experiment ``cromss-audit``. The maps are
written to a temporary name and renamed when complete; an existing audit in ``DIR`` is
never overwritten.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
import torch
from pydantic import BaseModel

from cromss_ray.data.scaling import network_input
from cromss_ray.data.schema import s2_subset_names
from cromss_ray.data.storage import ShardSet, TileSet, read_shard_set, scan_shards
from cromss_ray.data.transforms import band_indices
from cromss_ray.method import CromSSNet, NoiseDiagnostics
from cromss_ray.method.losses import MODALITIES
from cromss_ray.method.schedules import selection_ratio
from cromss_ray.models.stored import PretrainedModel
from cromss_ray.models.trust import LabelErrorTally, TrustMaps, check_auditable, decode_map, trust_schema
from cromss_ray.tracking.figures import precision_recall_figure, validation_sample_figure
from cromss_ray.tracking.model_uris import store_uri
from cromss_ray.tracking.registry import load_cromss_model
from cromss_ray.tracking.runs import RunTracker
from cromss_ray.train.cluster import cluster_has_gpus, init_ray
from cromss_ray.train.pretrain import NOISE_METRICS, build_criterion, rgb_positions, true_colour

AUDIT_EXPERIMENT = "cromss-audit"
MAPS_FILE = "trust_maps.parquet"
LOCATIONS_FILE = "locations.csv"
CLASSES_FILE = "classes.csv"
FIGURE_FILE = "precision_recall.png"
PREVIEWS_DIR = "previews"
DEFAULT_ROWS_PER_CALL = 8
"""Shard rows each model call takes (every season of each): 8 locations of 264 px, 4 seasons, are 32 tiles."""
SHOWN_LOCATIONS = 10


class AuditRecord(BaseModel):
    """What was audited with what: the MLflow run's params."""

    model_uri: str
    model_name: str | None
    model_version: int | None
    data_uri: str
    branch: str
    epoch: int
    selection_ratio: float
    rows: int
    seasons: int
    tiles: int
    has_clean_label: bool
    previews: int


@dataclass(frozen=True)
class AuditResult:
    """An audit's outputs: where they are, the rankings, the noise diagnostics (empty without clean labels)."""

    record: AuditRecord
    out: Path
    run_id: str
    locations: pa.Table
    classes: pa.Table
    diagnostics: dict[str, dict[str, float]]
    previews: list[Path] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """``audit/<branch>/<metric>`` of the diagnostics, and the ranked branch's mean estimated error."""
        metrics = {
            f"audit/{branch}/{name}": scores[name]
            for branch, scores in self.diagnostics.items()
            for name in NOISE_METRICS
        }
        errors = np.asarray(self.classes.column("estimated_error"), dtype=np.float64)
        pixels = np.asarray(self.classes.column("labelled_pixels"), dtype=np.float64)
        metrics[f"audit/{self.record.branch}/estimated_error"] = float((errors * pixels).sum() / pixels.sum())
        return metrics


def load_auditable(model_uri: str, tracking_uri: str | None) -> PretrainedModel:
    """The registered model, refused unless it is a two-branch CromSS pretrained network."""
    stored = load_cromss_model(model_uri, tracking_uri=tracking_uri)
    if not isinstance(stored, PretrainedModel) or not isinstance(stored.model, CromSSNet):
        raise ValueError(
            f"{model_uri} is not a two-branch CromSS pretrained model: the audit needs the trust of both "
            "modalities' branches in each label (spec 4)"
        )
    return stored


def audit_labels(
    model_uri: str,
    data_uri: str,
    out: Path,
    *,
    tracking_uri: str | None = None,
    s3_endpoint: str | None = None,
    branch: str = "s2",
    epoch: int | None = None,
    previews: int = 0,
    rows_per_call: int = DEFAULT_ROWS_PER_CALL,
) -> AuditResult:
    """Audit the labels of the shards at ``data_uri`` with ``model_uri`` into ``out`` (module docstring).

    ``epoch`` picks the selection ratio of the weights (spec 5); default the end of the
    model's ramp, where it reaches its final ratio. ``branch`` is the branch whose trust
    ranks locations and classes and picks the ``previews`` least trusted tiles.
    """
    if branch not in MODALITIES:
        raise ValueError(f"branch must be one of {MODALITIES}, got {branch!r}")
    if previews < 0 or rows_per_call < 1:
        raise ValueError(f"need previews >= 0 and rows_per_call >= 1, got {previews} and {rows_per_call}")
    maps_path = out / MAPS_FILE
    if maps_path.exists():
        raise FileExistsError(f"{maps_path}: an audit is already there; choose another output folder")
    stored = load_auditable(model_uri, tracking_uri)
    config = stored.config
    epoch = config.cromss.ramp_length if epoch is None else epoch
    if epoch < 0:
        raise ValueError(f"epoch must be at least 0, got {epoch}")
    shards = scan_shards(data_uri, s3_endpoint)
    meta = shards.meta
    check_auditable(stored.model, config.model.classes, meta, data_uri)
    if shards.num_rows == 0:
        raise ValueError(f"{data_uri}: the shard set holds no rows")
    ratio = selection_ratio(epoch, config.cromss.ramp_length, config.cromss.final_ratio, config.cromss.ramp)
    record = AuditRecord(
        model_uri=model_uri,
        model_name=stored.name,
        model_version=stored.version,
        data_uri=data_uri,
        branch=branch,
        epoch=epoch,
        selection_ratio=ratio if config.cromss.selection else 1.0,
        rows=shards.num_rows,
        seasons=meta.seasons,
        tiles=shards.num_rows * meta.seasons,
        has_clean_label=meta.has_clean_label,
        previews=previews,
    )
    out.mkdir(parents=True, exist_ok=True)
    model_name = stored.name or model_uri
    with RunTracker.start(
        record, tracking_uri=store_uri(tracking_uri), experiment=AUDIT_EXPERIMENT, run_name=f"audit {model_name}"
    ) as tracker:
        init_ray()
        use_gpu = cluster_has_gpus()
        udf_options: dict[str, Any] = {
            "network": stored.model,
            "criterion": build_criterion(config, meta.nodata),
            "meta": meta,
            "epoch": epoch,
            "device": "cuda" if use_gpu else "cpu",
        }
        maps = read_shard_set(shards).map_batches(
            TrustMaps,
            fn_constructor_kwargs=udf_options,
            batch_size=rows_per_call,
            batch_format="pyarrow",
            zero_copy_batch=True,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=_max_workers(use_gpu)),
            num_gpus=1 if use_gpu else 0,
        )
        tally = LabelErrorTally(meta.classes, branch, keep_worst=previews)
        diagnostics = {name: NoiseDiagnostics(meta.num_classes, meta.nodata) for name in MODALITIES}
        partial = maps_path.with_name(f".{MAPS_FILE}.partial")
        try:
            with pq.ParquetWriter(partial, trust_schema(meta)) as writer:
                for table in maps.iter_batches(batch_format="pyarrow", batch_size=None):
                    writer.write_table(table)
                    tally.add_table(table)
                    if meta.has_clean_label:
                        _add_evidence(diagnostics, table)
            partial.rename(maps_path)
        finally:
            partial.unlink(missing_ok=True)
        scores = {name: value.compute() for name, value in diagnostics.items()} if meta.has_clean_label else {}
        result = AuditResult(record, out, tracker.run_id, tally.location_ranking(), tally.class_ranking(), scores)
        result.previews.extend(_write_previews(tally, shards, stored, out / PREVIEWS_DIR))
        _write_csv(result.locations, out / LOCATIONS_FILE)
        _write_csv(result.classes, out / CLASSES_FILE)
        tracker.log_metrics(result.metrics(), epoch=epoch)
        for file in (LOCATIONS_FILE, CLASSES_FILE):
            tracker.log_artifact(out / file, "rankings")
        if scores:
            curves = {
                name: tuple(curve.numpy() for curve in value.precision_recall()) for name, value in diagnostics.items()
            }
            figure = precision_recall_figure(curves, 1.0 - scores[branch]["base_rate"], f"label audit of {model_name}")
            figure.savefig(out / FIGURE_FILE)
            tracker.log_artifact(out / FIGURE_FILE)
        if result.previews:
            tracker.log_artifact(out / PREVIEWS_DIR)
    return result


def _max_workers(use_gpu: bool) -> int:
    """Model workers to scale up to: one per GPU of the cluster, else one per CPU."""
    return max(1, int(ray.cluster_resources().get("GPU" if use_gpu else "CPU", 1)))


def _add_evidence(diagnostics: dict[str, NoiseDiagnostics], table: pa.Table) -> None:
    """Add every tile of a trust-map table to each branch's noise diagnostics."""
    for index in range(table.num_rows):
        noisy, clean = (torch.tensor(decode_map(table, name, index)) for name in ("label", "clean_label"))
        for branch, accumulator in diagnostics.items():
            weight, trust = (torch.tensor(decode_map(table, f"{kind}_{branch}", index)) for kind in ("weight", "trust"))
            accumulator.update(noisy, clean, weight, trust)


def _write_csv(table: pa.Table, path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(table.column_names)
        writer.writerows(zip(*(table.column(name).to_pylist() for name in table.column_names)))


def _write_previews(tally: LabelErrorTally, shards: ShardSet, stored: PretrainedModel, folder: Path) -> list[Path]:
    """PNG panels of the least trusted tiles, ``<rank>_<id>_season<k>.png``; their S2 images are read again."""
    worst = tally.worst_tiles()
    if not worst:
        return []
    folder.mkdir(exist_ok=True)
    meta, s2_bands = shards.meta, stored.model.s2_bands
    images = {row["id"]: row["s2"] for row in TileSet(shards, frozenset(tile.id for tile in worst)).rows()}
    spec = meta.s2.with_bands(s2_subset_names(s2_bands))
    paths = []
    for rank, tile in enumerate(worst, start=1):
        season_s2 = images[tile.id].reshape(meta.seasons, -1, *tile.label.shape)[tile.season]
        stored_s2 = season_s2[band_indices(meta, s2_bands)]
        sample = {
            "s2_rgb": true_colour(torch.from_numpy(network_input(stored_s2, spec)), rgb_positions(s2_bands)),
            "label": tile.label,
            **({"clean_label": tile.clean_label} if tile.clean_label is not None else {}),
            f"trust_{tally.branch}": tile.trust,
            f"weights_{tally.branch}": tile.weight,
        }
        title = f"{tile.id}, season {tile.season}: mean {tally.branch.upper()} trust {tile.mean_trust:.2f}"
        path = folder / f"{rank:03d}_{_file_part(tile.id)}_season{tile.season}.png"
        validation_sample_figure(sample, meta.classes, title).savefig(path)
        paths.append(path)
    return paths


def _file_part(text: str) -> str:
    return "".join(character if character.isalnum() or character in "-_." else "_" for character in text)


def format_audit(result: AuditResult) -> str:
    """The console report: the diagnostics (with clean labels), the most suspect locations, every class."""
    record = result.record
    lines = [
        f"model  {record.model_uri}" + (f" (version {record.model_version})" if record.model_version else ""),
        f"data   {record.data_uri}: {record.rows} rows, {record.tiles} tiles; selection at epoch {record.epoch} "
        f"(ratio {record.selection_ratio:.2f})",
        f"wrote  {result.out / MAPS_FILE}",
    ]
    if result.diagnostics:
        header = f"{'branch':<7}" + "".join(f"{n:>20}" for n in NOISE_METRICS)
        lines += ["", "wrong-label detection against the clean labels:", header]
        for branch, scores in result.diagnostics.items():
            lines.append(f"{branch:<7}" + "".join(f"{_number(scores[n]):>20}" for n in NOISE_METRICS))
    lines += ["", f"locations by estimated label error ({record.branch.upper()} trust), top {SHOWN_LOCATIONS}:"]
    lines += _table_lines(result.locations.slice(0, SHOWN_LOCATIONS))
    lines += ["", "classes by estimated label error:"]
    lines += _table_lines(result.classes)
    return "\n".join(lines)


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if math.isfinite(value) else "-"
    return str(value)


def _table_lines(table: pa.Table) -> list[str]:
    cells = [[_number(value) for value in row.values()] for row in table.to_pylist()]
    widths = [max([len(name), *(len(row[i]) for row in cells)]) for i, name in enumerate(table.column_names)]
    header = "  ".join(f"{name:>{width}}" for name, width in zip(table.column_names, widths))
    return [header, *("  ".join(f"{cell:>{width}}" for cell, width in zip(row, widths)) for row in cells)]
