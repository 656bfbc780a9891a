"""Samples per second per CPU core: the cromss-ray sample cutter against a reference-style
per-sample pipeline, on the same shards, side by side (spec 2, 9).

Both read the same Parquet row groups with pyarrow in this process (Parquet decoding is
part of the cost; torch runs on one thread), then:

* cromss-ray (``CutSamples``, what the Ray Data UDF runs): per row, a zero-copy view of
  the drawn season, crop / flip of the view, one copy of the window; a sample's rotation
  and the smoothing prior are left to the device (default; the prior can be computed on
  the CPU instead, ``cpu prior``). ``cromss_rotation_on_this_cpu`` adds the device's
  rotation (:func:`~cromss_ray.data.device.rotated_fields`, bilinear images, nearest
  labels) run here with torch on one CPU thread: what the cut costs when the training
  device is a CPU core too.
* reference-style: per sample, decode all four seasons of S1, S2 and labels to float32,
  scipy ``gaussian_filter`` priors per class (temporal and spatial, spec 2) on the full
  tile, then crop / flip / rotation of image, label and prior (spec 9's augmentation,
  the same :func:`random_geometry` as cromss-ray).

"Per core" is samples per second of process CPU time (all threads), which depends far
less on other load of the machine than wall time; ``speedup_per_core_x`` is the ratio to
the reference-style pipeline (target >= 8x). The whole measurement (every pipeline in
turn) repeats ``--runs`` times (default 3); the report gives the median over runs and
their range, with the load average at the start of each run. Run from the repository root::

    python -m bench.data_pipeline                     # 24 synthetic 264 x 264 locations
    python -m bench.data_pipeline --data DIR --recompress lz4 --json out.json

Section ``prior_after_rotation`` (spec 9) measures how far the device prior, computed from
the augmented labels, is from the reference's, computed on the whole tile and then
augmented like an image (bilinear): on every location, ``--prior-draws`` geometries with
a rotation (angle uniform in [-90, 90] degrees) and as many without (crop and flip
only, which differ near the crop border alone), it reports the mean absolute difference
of the prior and of the smoothed target (factors (0.15, 0.05), labelled pixels), both
per class entry, the largest entry difference of the prior, and the share of labelled
pixels whose prior argmax differs, over the whole window and more than 4 sigma = 12 px
from its border.

The read checks the training path makes (page checksums, labels in the class set, finite
imagery; ``docs/reliability.md``) are timed against the same cutter without them
(``cromss_unchecked``): ``read_checks_cost_pct`` is the extra CPU time per sample they cost,
``checksums_cost_pct`` the part of it that verifying the page checksums alone costs.

``--recompress CODEC`` measures the same shards rewritten with another Parquet codec;
``--ray-cpus N`` also times the Ray Data pipeline end to end with N CPUs, in each
training order of :data:`ORDERS` (wall clock, so only meaningful on an otherwise idle
machine).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
import torch
from scipy import ndimage

from bench.common import Repeats, Section, machine_section, publish, timed
from cromss_ray.data.device import rotated_fields
from cromss_ray.data.schema import MANIFEST_NAME, S2_BAND_SUBSETS, ShardMetadata, read_metadata
from cromss_ray.data.shards import iter_rows, list_shards
from cromss_ray.data.synth import synthesize
from cromss_ray.data.transforms import CutSamples, Geometry, SampleDraw, random_geometry, sample_rng
from cromss_ray.method.smoothing import smoothed_target, smoothing_prior
from cromss_ray.train.cluster import start_local_ray

TITLE = "data pipeline: samples per CPU core, cromss-ray against a reference-style pipeline"
CPU = torch.device("cpu")
SMOOTHING_FACTORS = (0.15, 0.05)
PRIOR_BORDER = 12
"""4 sigma: farther from the window border, a crop-only device prior equals the reference's."""


class UncheckedCutSamples(CutSamples):
    """The sample cutter without its per-row value checks: the baseline their cost is measured against."""

    def _check(self, columns: dict, row: int, row_id: str, height: int, width: int) -> None:
        return None


def row_groups(files: list[str], verify_checksums: bool = True) -> Iterator[pa.Table]:
    """Every row group of the shards, with the ``path`` column Ray adds; page checksums
    verified as the training read does, unless ``verify_checksums`` is false."""
    for path in files:
        parquet = pq.ParquetFile(path, page_checksum_verification=verify_checksums)
        for group in range(parquet.num_row_groups):
            table = parquet.read_row_group(group)
            yield table.append_column("path", pa.array([path] * table.num_rows))


def cromss_pass(files: list[str], udf: CutSamples, verify_checksums: bool = True) -> int:
    return sum(len(udf(table)["key"]) for table in row_groups(files, verify_checksums))


def cromss_rotating_pass(files: list[str], udf: CutSamples) -> int:
    count = 0
    for table in row_groups(files):
        samples = {name: torch.from_numpy(array) for name, array in udf(table).items()}
        rotated_fields(samples, CPU)
        count += len(samples["key"])
    return count


def reference_prior(labels: np.ndarray, season: int, classes: int, sigma: float = 3.0) -> np.ndarray:
    """Spec 2 the reference way: one scipy gaussian_filter per class and prior kind."""

    def normalised(maps: np.ndarray) -> np.ndarray:
        total = maps.sum(axis=0, keepdims=True)
        return maps / np.maximum(total, 1e-12)

    onehot = np.stack([(labels == c).astype(np.float32) for c in range(classes)], axis=1)
    temporal = normalised(np.stack([ndimage.gaussian_filter(onehot[:, c].mean(0), sigma) for c in range(classes)]))
    spatial = normalised(np.stack([ndimage.gaussian_filter(onehot[season, c], sigma) for c in range(classes)]))
    return (temporal + spatial) / 2


def reference_sample(row: dict, meta: ShardMetadata, bands: list[int], crop: int, rng: np.random.Generator) -> dict:
    """One sample the reference way: decode everything to float, prior on the CPU, crop / flip."""
    height, width, seasons = row["height"], row["width"], meta.seasons
    s1 = np.frombuffer(row["s1"], meta.numpy_dtype("s1")).reshape(meta.image_shape("s1", height, width))
    s2 = np.frombuffer(row["s2"], meta.numpy_dtype("s2")).reshape(meta.image_shape("s2", height, width))
    labels = np.frombuffer(row["label"], np.uint8).reshape(meta.label_shape(height, width))
    s1, s2 = s1.astype(np.float32) * meta.s1.scale + meta.s1.offset, s2.astype(np.float32) * meta.s2.scale
    season = int(rng.integers(seasons))
    prior = reference_prior(labels, season, meta.num_classes)
    geometry = random_geometry(rng, height, width, crop, 0.2)
    return {
        "s1": np.ascontiguousarray(geometry.apply(s1[season], nearest=False)),
        "s2": np.ascontiguousarray(geometry.apply(s2[season][bands], nearest=False)),
        "label": np.ascontiguousarray(geometry.apply(labels[season], nearest=True)).astype(np.int64),
        "prior": np.ascontiguousarray(geometry.apply(prior, nearest=False)),
    }


def reference_pass(files: list[str], meta: ShardMetadata, bands: list[int], crop: int) -> int:
    count = 0
    for table in row_groups(files):
        for row in table.to_pylist():
            reference_sample(row, meta, bands, crop, sample_rng(0, 0, row["id"]))
            count += 1
    return count


def measure(run: Callable[[], int], repeats: int) -> dict[str, float]:
    """Median samples per CPU-second (all threads of this process) and per wall second of
    ``repeats`` passes, after a warm-up pass that fills the page cache."""
    run()
    walls, cpus, samples = [], [], 0
    for _ in range(repeats):
        wall, cpu, samples = timed(run, CPU)
        walls.append(wall)
        cpus.append(cpu)
    figures = Repeats(tuple(walls), tuple(cpus))
    return {
        "samples_per_pass": samples,
        "samples_per_cpu_s": samples / figures.cpu_median,
        "samples_per_wall_s": samples / figures.median,
    }


def summarise_runs(runs: Sequence[dict[str, dict[str, float]]], reference: str) -> dict[str, Section]:
    """One section per pipeline: medians over runs, the range of samples per CPU-second and,
    for every pipeline but ``reference``, the per-run ratio of samples per CPU-second to it."""
    sections: dict[str, Section] = {}
    for name in runs[0]:
        per_core = [run[name]["samples_per_cpu_s"] for run in runs]
        rows: Section = {
            "samples_per_pass": runs[0][name]["samples_per_pass"],
            "samples_per_cpu_s": statistics.median(per_core),
            "samples_per_cpu_s_range": f"{min(per_core):.4g} .. {max(per_core):.4g} over {len(runs)} runs",
            "samples_per_wall_s": statistics.median(run[name]["samples_per_wall_s"] for run in runs),
        }
        if name != reference:
            ratios = [run[name]["samples_per_cpu_s"] / run[reference]["samples_per_cpu_s"] for run in runs]
            rows["speedup_per_core_x"] = statistics.median(ratios)
            rows["speedup_per_core_x_range"] = f"{min(ratios):.4g} .. {max(ratios):.4g} over {len(runs)} runs"
        sections[name] = rows
    return sections


ORDERS = ("file_order", "local_buffer", "random_shuffle", "epoch_permutation", "epoch_permutation_unordered")
"""Training orders timed by ``--ray-cpus`` (spec 9): the files as stored; a local shuffle
buffer over that stream; Ray Data's ``random_shuffle`` (reseeded every execution); the
pipeline's own, the epoch's permutation of all rows read chunk by chunk, delivered in the
permutation's order, and the same with the chunks in completion order."""
LOCAL_BUFFER_ROWS = 64


def ordered_dataset(data: str, crop: int, bands: int, order: str) -> tuple[ray.data.Dataset, dict[str, int]]:
    """The pretraining samples in one of :data:`ORDERS`, and the iterator options it needs."""
    from cromss_ray.config import DataConfig
    from cromss_ray.data.pipeline import ROWS_PER_CALL, EpochClock, pretrain_datasets
    from cromss_ray.data.storage import read_shard_set, scan_shards

    if order.startswith("epoch_permutation"):
        dataset = pretrain_datasets(DataConfig(uri=data, crop=crop, s2_bands=bands, val_fraction=0.0), seed=0).train
        dataset.context.execution_options.preserve_order = order == "epoch_permutation"
        return dataset, {}
    shards = scan_shards(data)
    udf = CutSamples(shards.meta, bands, crop, SampleDraw(True, 0, 0.2, EpochClock.create().read), labels_all=True)
    dataset = read_shard_set(shards).map_batches(
        udf, batch_format="pyarrow", batch_size=ROWS_PER_CALL, zero_copy_batch=True
    )
    if order == "random_shuffle":
        return dataset.random_shuffle(seed=ray.data.RandomSeedConfig(seed=0, reseed_after_execution=True)), {}
    if order == "local_buffer":
        return dataset, {"local_shuffle_buffer_size": LOCAL_BUFFER_ROWS, "local_shuffle_seed": 0}
    return dataset, {}


def ray_pass(data: str, crop: int, bands: int, cpus: int) -> Section:
    """Per training order: wall seconds to an epoch's first batch and of the whole epoch, and
    samples per wall second per CPU of the Ray Data pipeline (prior on the device), after a
    warm-up epoch."""
    start_local_ray(num_cpus=cpus, include_dashboard=False)
    section: Section = {"ray_cpus": cpus, "local_buffer_rows": LOCAL_BUFFER_ROWS}
    try:
        for order in ORDERS:
            dataset, options = ordered_dataset(data, crop, bands, order)
            for _ in dataset.iter_batches(batch_size=16, **options):
                pass
            start = time.perf_counter()
            first, samples = None, 0
            for batch in dataset.iter_batches(batch_size=16, **options):
                first = time.perf_counter() - start if first is None else first
                samples += len(batch["key"])
            seconds = time.perf_counter() - start
            section[f"{order}_first_batch_s"] = first
            section[f"{order}_epoch_s"] = seconds
            section[f"{order}_samples_per_wall_s_per_cpu"] = samples / seconds / cpus
    finally:
        ray.shutdown()
    return section


def prior_difference(
    labels: np.ndarray, season: int, geometry: Geometry, classes: int, nodata: int
) -> dict[str, np.ndarray]:
    """Per-pixel differences between the reference's prior (whole tile, then augmented
    bilinear) and the device prior (from the augmented labels), and their smoothed targets."""
    stack = torch.from_numpy(np.array(labels))
    full_prior = smoothing_prior(stack, season, "ts", classes).numpy()
    reference = torch.from_numpy(np.array(geometry.apply(full_prior, nearest=False)))
    augmented = torch.from_numpy(np.array(geometry.apply(labels, nearest=True)))
    device = smoothing_prior(augmented, season, "ts", classes)
    target = augmented[season].long()[None]
    q_reference = smoothed_target(target, reference[None], SMOOTHING_FACTORS, classes)[0]
    q_device = smoothed_target(target, device[None], SMOOTHING_FACTORS, classes)[0]
    return {
        "labelled": (target[0] != nodata).numpy(),
        "prior_abs": (reference - device).abs().numpy(),
        "target_abs": (q_reference - q_device).abs().numpy(),
        "argmax_differs": (reference.argmax(0) != device.argmax(0)).numpy(),
    }


def prior_rotation_section(files: list[str], meta: ShardMetadata, crop: int, draws: int) -> Section:
    """Spec 9's approximation measured: device prior against the reference's, rotated or not."""
    section: Section = {"draws_per_location": draws}
    for rotated in (True, False):
        parts: dict[str, list[np.ndarray]] = {"prior_abs": [], "target_abs": [], "argmax_differs": [], "inner": []}
        for path in files:
            for row in iter_rows(path):
                labels = row["label"]
                for draw in range(draws):
                    rng = sample_rng(draw, int(rotated), row["id"])
                    season = int(rng.integers(meta.seasons))
                    geometry = random_geometry(rng, *labels.shape[-2:], crop, 1.0 if rotated else 0.0)
                    differences = prior_difference(labels, season, geometry, meta.num_classes, meta.nodata)
                    labelled = differences["labelled"]
                    inner = np.zeros_like(labelled)
                    inner[PRIOR_BORDER:-PRIOR_BORDER, PRIOR_BORDER:-PRIOR_BORDER] = True
                    parts["prior_abs"].append(differences["prior_abs"][:, labelled])
                    parts["target_abs"].append(differences["target_abs"][:, labelled])
                    parts["argmax_differs"].append(differences["argmax_differs"][labelled])
                    parts["inner"].append(inner[labelled])
        prior_abs, target_abs = np.concatenate(parts["prior_abs"], 1), np.concatenate(parts["target_abs"], 1)
        differs, inner = np.concatenate(parts["argmax_differs"]), np.concatenate(parts["inner"])
        name = "rotated" if rotated else "crop_flip_only"
        section[f"{name}_prior_mean_abs"] = float(prior_abs.mean())
        section[f"{name}_prior_mean_abs_inner"] = float(prior_abs[:, inner].mean())
        section[f"{name}_prior_max_abs"] = float(prior_abs.max())
        section[f"{name}_target_mean_abs"] = float(target_abs.mean())
        section[f"{name}_argmax_differs_pct"] = 100 * float(differs.mean())
        section[f"{name}_argmax_differs_inner_pct"] = 100 * float(differs[inner].mean())
    return section


def recompressed(files: list[str], codec: str, out_dir: str) -> list[str]:
    """Copies of the shards with another Parquet codec (same schema, metadata, row groups, page
    checksums) and their manifest (same files and row counts)."""
    copies = []
    for path in files:
        parquet = pq.ParquetFile(path)
        rows_per_group = parquet.metadata.row_group(0).num_rows
        copy = os.path.join(out_dir, os.path.basename(path))
        pq.write_table(
            parquet.read(),
            copy,
            compression=codec,
            row_group_size=rows_per_group,
            use_dictionary=["id"],
            write_page_checksum=True,
        )
        copies.append(copy)
    shutil.copy(os.path.join(os.path.dirname(files[0]), MANIFEST_NAME), out_dir)
    return copies


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.data_pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="shard directory (default: synthesize one)")
    parser.add_argument("--locations", type=int, default=24, help="locations to synthesize (default 24)")
    parser.add_argument("--size", type=int, default=264, help="tile side to synthesize in px (default 264)")
    parser.add_argument("--crop", type=int, default=256, help="crop side in px (default 256)")
    parser.add_argument("--bands", type=int, default=13, choices=sorted(S2_BAND_SUBSETS), help="S2 band subset")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per pipeline and run (default 3)")
    parser.add_argument("--runs", type=int, default=3, help="repeats of the whole measurement (default 3)")
    parser.add_argument("--recompress", help="rewrite the shards with this Parquet codec first (lz4, snappy, none)")
    parser.add_argument("--prior-draws", type=int, default=4, help="geometries per location for the prior section")
    parser.add_argument("--ray-cpus", type=int, default=0, help="also time Ray Data with N CPUs (wall clock)")
    parser.add_argument("--json", type=Path, help="also write the report as JSON to this file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.runs < 1 or args.repeats < 1:
        raise SystemExit(f"--runs {args.runs} and --repeats {args.repeats}: both must be at least 1")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        data = args.data
        if data is None:
            data = os.path.join(scratch, "shards")
            print(f"synthesizing {args.locations} locations of {args.size} x {args.size} px ...", flush=True)
            synthesize(data, "pretrain", args.locations, args.size, seed=0)
        files = list_shards(data)
        if args.recompress:
            os.makedirs(os.path.join(scratch, "recompressed"))
            files = recompressed(files, args.recompress, os.path.join(scratch, "recompressed"))
        meta = read_metadata(pq.read_schema(files[0]), files[0])
        shards: Section = {
            "locations": sum(pq.ParquetFile(path).metadata.num_rows for path in files),
            "files": len(files),
            "size_mib": sum(Path(path).stat().st_size for path in files) / 2**20,
            "codec": pq.ParquetFile(files[0]).metadata.row_group(0).column(0).compression,
            "crop_px": args.crop,
            "s2_bands": args.bands,
        }
        draw = SampleDraw(True, 0, 0.2)
        device_prior = CutSamples(meta, args.bands, args.crop, draw, labels_all=True)
        cpu_prior = CutSamples(meta, args.bands, args.crop, draw, cpu_prior="ts")
        unchecked = UncheckedCutSamples(meta, args.bands, args.crop, draw, labels_all=True)
        bands = list(S2_BAND_SUBSETS[args.bands])
        pipelines: dict[str, Callable[[], int]] = {
            "reference_style": lambda: reference_pass(files, meta, bands, args.crop),
            "cromss_prior_on_device": lambda: cromss_pass(files, device_prior),
            "cromss_rotation_on_this_cpu": lambda: cromss_rotating_pass(files, device_prior),
            "cromss_prior_on_cpu": lambda: cromss_pass(files, cpu_prior),
            "cromss_checksums_only_prior_on_device": lambda: cromss_pass(files, unchecked),
            "cromss_unchecked_prior_on_device": lambda: cromss_pass(files, unchecked, False),
        }
        loads, runs = [], []
        for _ in range(args.runs):
            loads.append(os.getloadavg()[0])
            runs.append({name: measure(run, args.repeats) for name, run in pipelines.items()})
        repeats: Section = {
            "runs": args.runs,
            "timed_passes_per_run": args.repeats,
            "load_average_1min_at_starts": ", ".join(f"{load:.2f}" for load in loads),
        }
        sections = {
            "machine": machine_section(CPU),
            "shards": shards,
            "repeats": repeats,
            **summarise_runs(runs, "reference_style"),
        }
        baseline = sections["cromss_unchecked_prior_on_device"]["samples_per_cpu_s"]
        for name, cost in (("cromss_prior_on_device", "read_checks"), ("cromss_checksums_only_prior_on_device", "checksums")):
            sections[name][f"{cost}_cost_pct"] = 100 * (baseline / sections[name]["samples_per_cpu_s"] - 1)
        sections["prior_after_rotation"] = prior_rotation_section(files, meta, args.crop, args.prior_draws)
        if args.ray_cpus:
            shard_dir = os.path.dirname(files[0])
            sections["ray_data_orders"] = ray_pass(shard_dir, args.crop, args.bands, args.ray_cpus)
    publish(TITLE, sections, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
