"""``cromss evaluate``, ``cromss predict`` and ``cromss audit``: a registered model applied to new data.

* ``cromss evaluate --model models:/... --data URI``: its scores on a downstream test split.
* ``cromss predict --model models:/... --s1 S1.tif --s2 S2.tif --out PRED.tif``: a class
  map GeoTIFF on the input's grid, tiled with overlap and blended.
* ``cromss audit --model models:/... --data URI --out DIR``: per-pixel trust in a shard
  set's noisy labels, and locations and classes ranked by estimated label error.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from cromss_ray.arguments import add_command, MODEL_HELP, TRACKING_HELP, fail
from cromss_ray.data.schema import REPRESENTATIONS
from cromss_ray.models import MODEL_TILE

BRANCH_HELP = (
    "for a pretrained CromSS model: predict from 's1' or 's2' alone (default: fused; "
    "a single-modality baseline predicts from its own modality)"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``evaluate``, ``predict`` and ``audit`` subcommands."""
    evaluate = add_command(subparsers, "evaluate", _evaluate)
    _add_model_arguments(evaluate)
    evaluate.add_argument("--data", required=True, metavar="URI", help="downstream shards (directory or s3://...)")
    evaluate.add_argument("--s3-endpoint", help="endpoint of an S3-compatible store")
    evaluate.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="score a shard set whose manifest.json is missing, incomplete or disagrees with its files "
        "(as data.allow_incomplete does for training)",
    )
    evaluate.add_argument(
        "--on-bad-row",
        choices=("raise", "skip"),
        default="raise",
        help="a row with labels outside the classes or non-finite imagery: fail naming it (default), or "
        "leave it out and report it (as data.on_bad_row does for training)",
    )

    predict = add_command(subparsers, "predict", _predict)
    _add_model_arguments(predict)
    predict.add_argument("--s1", type=Path, metavar="S1.tif", help="Sentinel-1 GeoTIFF (VV, VH)")
    predict.add_argument(
        "--s2", type=Path, metavar="S2.tif", help="Sentinel-2 GeoTIFF (named bands, all 13 L1C bands or the model's)"
    )
    predict.add_argument("--out", required=True, type=Path, metavar="PRED.tif", help="class-map GeoTIFF to write")
    for modality, physical in (("s1", "float32 backscatter in dB"), ("s2", "uint16 L1C digital numbers")):
        predict.add_argument(
            f"--{modality}-representation",
            choices=REPRESENTATIONS,
            help=f"the {modality.upper()} GeoTIFF holds the raw product: 'physical' ({physical}) or 'v8' (the "
            "released uint8 codes); default: stored as the model's inputs declare",
        )
    for modality, example in (("s1", "VV,VH"), ("s2", "B2,B3,B4,B5,B6,B7,B8,B8A,B11,B12")):
        predict.add_argument(
            f"--{modality}-bands",
            type=_band_list,
            metavar=example,
            help=f"names of the {modality.upper()} GeoTIFF's bands, in its order (default: its band descriptions); "
            "the model's bands are picked by name, the others dropped",
        )
    audit = add_command(subparsers, "audit", _audit)
    audit.add_argument("--model", required=True, help=f"a two-branch CromSS pretrained model: {MODEL_HELP}")
    audit.add_argument("--data", required=True, metavar="URI", help="shards to audit (directory or s3://...)")
    audit.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help="folder for the maps, rankings and figures"
    )
    audit.add_argument(
        "--previews", type=int, default=0, metavar="N", help="PNG panels of the N least trusted tiles (default: 0)"
    )
    audit.add_argument(
        "--branch", choices=("s1", "s2"), default="s2", help="whose trust ranks locations and classes (default: s2)"
    )
    audit.add_argument(
        "--epoch",
        type=int,
        help="the epoch whose selection ratio gives the weights (spec 5; default: the end of the model's ramp)",
    )
    audit.add_argument(
        "--rows-per-call", type=int, default=8, help="shard rows (all their seasons) per model call (default: 8)"
    )
    audit.add_argument("--s3-endpoint", help="endpoint of an S3-compatible store")
    audit.add_argument("--tracking-uri", help=TRACKING_HELP)


def _band_list(text: str) -> list[str]:
    """``B2,B3,B4`` as a list of names; empty names are refused."""
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"band names must be separated by single commas, got {text!r}")
    return names


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, its branch, the windows and the store: what ``evaluate`` and ``predict`` share."""
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument("--branch", choices=("s1", "s2", "fused"), help=BRANCH_HELP)
    parser.add_argument("--tile", type=int, default=MODEL_TILE, help=f"window size in pixels (default: {MODEL_TILE})")
    parser.add_argument("--overlap", type=int, help="overlap of neighbouring windows (default: a quarter of the tile)")
    parser.add_argument("--batch-size", type=int, default=4, help="windows run at once (default: 4)")
    parser.add_argument("--tracking-uri", help=TRACKING_HELP)


def _windows(args: argparse.Namespace) -> dict[str, int | None]:
    """The window arguments of ``_add_model_arguments`` as keyword arguments of the prediction."""
    return {"tile": args.tile, "overlap": args.overlap, "batch_size": args.batch_size}


def _evaluate(args: argparse.Namespace) -> int:
    """score a registered model on a downstream test split.

    Predict every tile of a downstream shard set and print OA, mIoU, mF1 and per-class scores
    from one confusion matrix, and mIoU and mF1 in the reference's convention (spec 11).
    """
    from cromss_ray.data.storage import IncompleteShardsError
    from cromss_ray.inference.evaluate import evaluate_model, format_evaluation
    from cromss_ray.tracking.model_uris import ModelNotFoundError

    try:
        result = evaluate_model(
            args.model,
            args.data,
            branch=args.branch,
            tracking_uri=args.tracking_uri,
            s3_endpoint=args.s3_endpoint,
            allow_incomplete=args.allow_incomplete,
            on_bad_row=args.on_bad_row,
            **_windows(args),
        )
    except IncompleteShardsError as exc:
        return fail("evaluate", f"{exc} (cromss evaluate: --allow-incomplete)")
    except (ModelNotFoundError, ValueError, FileNotFoundError) as exc:
        return fail("evaluate", exc)
    for message in result.skipped:
        print(f"cromss evaluate: skipped: {message}", file=sys.stderr)
    print(format_evaluation(result))
    return 0


def _predict(args: argparse.Namespace) -> int:
    """predict a class-map GeoTIFF from Sentinel-1/2 GeoTIFFs.

    Predict a class map on the grid and CRS of the input GeoTIFFs (any size), tiled with overlap
    and blended so there are no seams. The model scales the images itself by the reference's
    rule (spec 9): they must be stored as its inputs declare (a fine-tuned model: like its
    training shards; a pretrained one: the raw products, S1 dB and S2 L1C digital numbers,
    unless registered otherwise), or as --s1-representation / --s2-representation say.
    The model's bands are picked by name from --s1-bands / --s2-bands or the GeoTIFFs' band
    descriptions (other bands are dropped); unnamed bands must be the model's, in its order,
    or S2's 13 L1C bands. Pixels that are no-data or not finite in an input are 255.
    """
    import torch

    from cromss_ray.models.geotiff import predict_geotiff
    from cromss_ray.models.segmenter import product_input
    from cromss_ray.tracking.model_uris import ModelNotFoundError
    from cromss_ray.tracking.registry import load_segmenter

    try:
        segmenter = load_segmenter(args.model, branch=args.branch, tracking_uri=args.tracking_uri)
        inputs = dict(segmenter.inputs)
        for modality in ("s1", "s2"):
            representation = getattr(args, f"{modality}_representation")
            if representation is not None:
                inputs[modality] = product_input(modality, representation)
        segmenter = replace(segmenter, inputs=inputs)
        segmenter.network.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        out = predict_geotiff(
            segmenter,
            args.out,
            s1=args.s1,
            s2=args.s2,
            **_windows(args),
            tags={"model": args.model, "branch": segmenter.branch},
            band_names={"s1": args.s1_bands, "s2": args.s2_bands},
        )
    except (ModelNotFoundError, ValueError) as exc:
        return fail("predict", exc)
    print(f"wrote {out} ({segmenter.branch} prediction, {len(segmenter.class_names)} classes)")
    return 0




def _audit(args: argparse.Namespace) -> int:
    """audit a shard set's noisy labels with a pretrained CromSS model.

    Run the model over every row (every season) of the shards on Ray Data and write, in DIR,
    per-pixel maps of each branch's trust in the noisy label (the entangled label confidence)
    and the selection weight it would give (trust_maps.parquet), and locations and classes
    ranked by estimated label error (locations.csv, classes.csv). With clean labels in the
    shards, also print the selection's precision, recall and AUROC as a detector of wrong
    labels and draw its precision-recall curve. Logged in the MLflow experiment cromss-audit.
    """
    from cromss_ray.inference.audit import audit_labels, format_audit
    from cromss_ray.tracking.model_uris import ModelNotFoundError

    try:
        result = audit_labels(
            args.model,
            args.data,
            args.out,
            tracking_uri=args.tracking_uri,
            s3_endpoint=args.s3_endpoint,
            branch=args.branch,
            epoch=args.epoch,
            previews=args.previews,
            rows_per_call=args.rows_per_call,
        )
    except (ModelNotFoundError, ValueError, FileNotFoundError, FileExistsError) as exc:
        return fail("audit", exc)
    print(format_audit(result))
    return 0
