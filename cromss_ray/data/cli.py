"""``cromss data synth | convert <format> | check``: make, convert and validate shards.

Long commands report progress on stderr and end with a one-line summary on stdout; bad
input ends with exit code 1 and a message naming the file and row, or with ``--skip-bad``
is skipped and counted (``docs/data.md``).
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from cromss_ray.data.schema import REPRESENTATIONS

SYNTH_KINDS = ("pretrain", "dw", "osm", "dfc2020")
DOWNSTREAM_SOURCES = {
    "dw": "SSL4EO-S12@DW GeoTIFF tiles",
    "osm": "SSL4EO-S12@OSM GeoTIFF tiles",
    "dfc2020": "DFC2020 GeoTIFF patches",
}
EXIT_BAD_DATA = 1


class Progress:
    """Progress on stderr: one rewritten line on a terminal, else a line per tenth done."""

    def __init__(self, label: str, unit: str, stream: TextIO | None = None) -> None:
        self.label = label
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = self.stream.isatty()
        self._tenths = -1

    def __call__(self, done: int, total: int) -> None:
        text = f"{self.label}: {done}/{total} {self.unit}"
        if self.interactive:
            self.stream.write(f"\r{text}" + ("\n" if done == total else ""))
        elif (tenths := done * 10 // max(total, 1)) > self._tenths:
            self._tenths = tenths
            self.stream.write(text + "\n")
        self.stream.flush()


def _fail(command: str, message: str, hint: str = "") -> int:
    print(f"{command}: error: {message}" + (f" ({hint})" if hint else ""), file=sys.stderr)
    return EXIT_BAD_DATA


def _synth(args: argparse.Namespace) -> int:
    from cromss_ray.data.synth import synthesize

    command = "cromss data synth"
    try:
        manifest = synthesize(
            args.out,
            args.kind,
            locations=args.locations,
            size=args.size,
            seed=args.seed,
            noise_rate=args.noise_rate,
            progress=Progress(command, "locations" if args.kind == "pretrain" else "tiles"),
            overwrite=args.overwrite,
            target_bytes=int(args.target_mb * 2**20),
        )
    except (ValueError, FileExistsError) as exc:
        return _fail(command, str(exc))
    size_mb = sum(entry.bytes for entry in manifest.files) / 2**20
    noise = manifest.provenance.get("noise")
    noise_text = f"; noise rate {noise['achieved_rate']:.3f} (target {noise['target_rate']:.3f})" if noise else ""
    print(
        f"{command}: wrote {manifest.total_rows} {args.kind} rows of {args.size} px in {len(manifest.files)} files "
        f"({size_mb:.1f} MB) to {args.out}{noise_text}"
    )
    return 0


def _convert(args: argparse.Namespace) -> int:
    from cromss_ray.data.convert.common import SourceError

    command = f"cromss data convert {args.format}"
    progress = Progress(command, "samples")
    try:
        if args.format == "ssl4eo":
            from cromss_ray.data.convert.ssl4eo import convert_ssl4eo

            summary = convert_ssl4eo(
                args.images,
                args.labels,
                args.ids,
                args.out,
                skip_bad=args.skip_bad,
                progress=progress,
                overwrite=args.overwrite,
            )
        elif args.format == "lmdb":
            from cromss_ray.data.convert.lmdb import convert_lmdb

            summary = convert_lmdb(
                args.s1,
                args.s2,
                args.labels,
                args.out,
                skip_bad=args.skip_bad,
                progress=progress,
                overwrite=args.overwrite,
            )
        else:
            from cromss_ray.data.convert.downstream import convert_downstream

            summary = convert_downstream(
                args.format,
                args.root,
                args.split,
                args.out,
                patch_size=args.patch_size,
                skip_bad=args.skip_bad,
                progress=progress,
                overwrite=args.overwrite,
            )
    except SourceError as exc:
        kept = "the previous shards are kept unchanged" if args.overwrite else "rows written before it are kept"
        return _fail(command, str(exc), f"{kept}; --skip-bad skips bad samples")
    except (ValueError, FileExistsError) as exc:
        return _fail(command, str(exc))
    for message in summary.skipped:
        print(f"{command}: skipped: {message}", file=sys.stderr)
    print(summary.line(command))
    return 0


def _check(args: argparse.Namespace) -> int:
    from cromss_ray.data.check import check_shards

    command = "cromss data check"
    filesystem = None
    if "://" in args.dir:
        from cromss_ray.data.storage import resolve_filesystem

        filesystem, _ = resolve_filesystem(args.dir, args.s3_endpoint)
    report = check_shards(args.dir, skip_bad=args.skip_bad, filesystem=filesystem, progress=Progress(command, "files"))
    for line in report.histogram_lines():
        print(line)
    for warning in report.warnings:
        print(f"{command}: warning: {warning}", file=sys.stderr)
    for problem in report.problems:
        print(f"{command}: {'skipped' if args.skip_bad else 'bad'}: {problem}", file=sys.stderr)
    print(report.summary_line())
    return 0 if report.ok else EXIT_BAD_DATA


def _migrate(args: argparse.Namespace) -> int:
    from cromss_ray.data.migrate import MigrationError, migrate_shards

    command = "cromss data migrate"
    declared = {modality: getattr(args, modality) for modality in ("s1", "s2") if getattr(args, modality)}
    try:
        report = migrate_shards(args.dir, declared)
    except MigrationError as exc:
        return _fail(command, str(exc))
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
        return _fail(command, str(exc), "no file was changed")
    print(
        f"{command}: rewrote the metadata of {len(report.rewritten)} files in {args.dir} "
        f"({len(report.current)} already current)"
    )
    return 0


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output directory for the shards and manifest.json")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in --out")


def _add_convert_options(parser: argparse.ArgumentParser) -> None:
    _add_output_options(parser)
    parser.add_argument("--skip-bad", action="store_true", help="skip bad samples (counted in the summary)")
    parser.set_defaults(handler=_convert)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``cromss data`` and its subcommands."""
    data = subparsers.add_parser("data", help="make, convert and check Parquet shards (docs/data.md)")
    data.set_defaults(handler=lambda _args: data.print_help() or 0)
    commands = data.add_subparsers(title="data commands", metavar="COMMAND")

    synth = commands.add_parser("synth", help="write realistic synthetic shards (noisy and clean labels)")
    _add_output_options(synth)
    synth.add_argument("--kind", choices=SYNTH_KINDS, default="pretrain", help="pretraining or a downstream scheme")
    synth.add_argument("--locations", type=int, default=64, help="rows to write (locations or tiles)")
    synth.add_argument("--size", type=int, default=264, help="tile size in pixels (spec 10: 264)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--noise-rate", type=float, default=0.2, help="share of corrupted noisy-label pixels")
    synth.add_argument("--target-mb", type=float, default=256.0, help="target shard file size in MB")
    synth.set_defaults(handler=_synth)

    convert = commands.add_parser("convert", help="convert published data to shards")
    formats = convert.add_subparsers(title="source formats", metavar="FORMAT", dest="format", required=True)
    ssl4eo = formats.add_parser("ssl4eo", help="SSL4EO-S12 image folders + NoL label folders")
    ssl4eo.add_argument("--images", required=True, help="SSL4EO-S12 root with s1/ and s2c/")
    ssl4eo.add_argument("--labels", required=True, help="NoL label root: <id:07d>/<S2 product>/label.tif")
    ssl4eo.add_argument("--ids", required=True, help="CSV 'ids, sub1..sub4' naming each season's S2 product")
    _add_convert_options(ssl4eo)
    lmdb = formats.add_parser("lmdb", help="the reference implementation's LMDB files")
    lmdb.add_argument("--s1", required=True, help="S1 LMDB")
    lmdb.add_argument("--s2", required=True, help="S2 LMDB")
    lmdb.add_argument("--labels", required=True, help="noisy label LMDB")
    _add_convert_options(lmdb)
    for kind, description in DOWNSTREAM_SOURCES.items():
        downstream = formats.add_parser(kind, help=f"{description} (spec 10 label mapping)")
        downstream.add_argument("--root", required=True, help="dataset root (or the split folder itself)")
        downstream.add_argument("--split", choices=("train", "test"), required=True)
        downstream.add_argument("--patch-size", type=int, default=256, help="cut tiles into patches of this size")
        _add_convert_options(downstream)

    migrate = commands.add_parser(
        "migrate", help="rewrite schema-1 shard metadata in place, declaring each modality's representation"
    )
    migrate.add_argument("dir", help="local shard directory")
    for modality in ("s1", "s2"):
        migrate.add_argument(
            f"--{modality}",
            choices=REPRESENTATIONS,
            default=None,
            help=f"{modality.upper()} holds physical values or the reference's v8 codes (inferred where certain)",
        )
    migrate.set_defaults(handler=_migrate)

    check = commands.add_parser("check", help="validate every shard and row; non-zero exit on problems")
    check.add_argument("dir", help="shard directory or URI (s3://bucket/prefix)")
    check.add_argument("--skip-bad", action="store_true", help="report bad rows and files but pass if others are valid")
    check.add_argument("--s3-endpoint", default=None, help="endpoint URL of an S3-compatible store (for s3:// URIs)")
    check.set_defaults(handler=_check)
