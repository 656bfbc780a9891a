"""Samples per second per CPU core: the cromss-ray sample cutter against a reference-style
per-sample pipeline, on the same shards, side by side (issue 3; spec 2, 9).

Both read the same Parquet row groups with pyarrow in this process (Parquet decoding is
part of the cost; torch runs on one thread), then:

* cromss-ray (``CutSamples``, what the Ray Data UDF runs): per row, a zero-copy view of
  the drawn season, crop / flip / rotation of the view, one copy of the window; the
  smoothing prior is left to the device (default) or computed on the CPU (``cpu prior``).
* reference-style: per sample, decode all four seasons of S1, S2 and labels to float32,
  scipy ``gaussian_filter`` priors per class (temporal and spatial, spec 2) on the full
  tile, then crop / flip / rotation of image, label and prior.

"Per core" is samples per second of process CPU time (all threads), which depends far
less on other load of the machine than wall time; ``speedup_per_core_x`` is the ratio to
the reference-style pipeline (target >= 8x). The whole measurement (every pipeline in
turn) repeats ``--runs`` times (default 3); the report gives the median over runs and
their range, with the load average at the start of each run. Run from the repository root::

    python -m bench.data_pipeline                     # 24 synthetic 264 x 264 locations
    python -m bench.data_pipeline --data DIR --recompress lz4 --json out.json

The read checks the training path makes (page checksums, labels in the class set, finite
imagery; ``docs/reliability.md``) are timed against the same cutter without them
(``cromss_unchecked``): ``read_checks_cost_pct`` is the extra CPU time per sample they cost,
``checksums_cost_pct`` the part of it that verifying the page checksums alone costs.

``--recompress CODEC`` measures the same shards rewritten with another Parquet codec;
``--ray-cpus N`` also times the Ray Data pipeline end to end with N CPUs (wall clock, so
only meaningful on an otherwise idle machine).
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
import torch
from scipy import ndimage

from bench.common import Repeats, Section, machine_section, publish, timed
from cromss_ray.data.schema import MANIFEST_NAME, S2_BAND_SUBSETS, ShardMetadata, read_metadata
from cromss_ray.data.shards import list_shards
from cromss_ray.data.synth import synthesize
from cromss_ray.data.transforms import CutSamples, SampleDraw, random_geometry, sample_rng

TITLE = "data pipeline: samples per CPU core, cromss-ray against a reference-style pipeline"
CPU = torch.device("cpu")


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
        "s1": np.ascontiguousarray(geometry.apply(s1[season])),
        "s2": np.ascontiguousarray(geometry.apply(s2[season][bands])),
        "label": np.ascontiguousarray(geometry.apply(labels[season])).astype(np.int64),
        "prior": np.ascontiguousarray(geometry.apply(prior)),
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


def ray_pass(data: str, crop: int, bands: int, cpus: int) -> Section:
    """Samples per wall second per CPU of the Ray Data pipeline itself (prior on the device)."""
    import ray

    from cromss_ray.config import DataConfig
    from cromss_ray.data.pipeline import pretrain_datasets

    ray.init(num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        datasets = pretrain_datasets(DataConfig(uri=data, crop=crop, s2_bands=bands, val_fraction=0.0), seed=0)
        for _ in datasets.train.iter_batches(batch_size=16):
            pass
        start = time.perf_counter()
        samples = sum(len(batch["key"]) for batch in datasets.train.iter_batches(batch_size=16))
        seconds = time.perf_counter() - start
    finally:
        ray.shutdown()
    return {"ray_cpus": cpus, "samples_per_wall_s_per_cpu": samples / seconds / cpus}


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
        if args.ray_cpus:
            shard_dir = os.path.dirname(files[0])
            sections["ray_data_prior_on_device"] = ray_pass(shard_dir, args.crop, args.bands, args.ray_cpus)
    publish(TITLE, sections, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
