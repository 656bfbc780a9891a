"""``cromss evaluate`` and ``cromss predict``: a registered model applied to new data.

* ``cromss evaluate --model models:/... --data URI``: its scores on a downstream test split.
* ``cromss predict --model models:/... --s1 S1.tif --s2 S2.tif --out PRED.tif``: a class
  map GeoTIFF on the input's grid, tiled with overlap and blended.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from cromss_ray.arguments import add_command, MODEL_HELP, TRACKING_HELP, fail
from cromss_ray.data.schema import REPRESENTATIONS
from cromss_ray.models import MODEL_TILE

BRANCH_HELP = "for a pretrained CromSS model: predict from 's1' or 's2' alone (default: fused)"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` and ``predict`` subcommands."""
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
        "--s2", type=Path, metavar="S2.tif", help="Sentinel-2 GeoTIFF (all 13 L1C bands or the model's)"
    )
    predict.add_argument("--out", required=True, type=Path, metavar="PRED.tif", help="class-map GeoTIFF to write")
    for modality, physical in (("s1", "float32 backscatter in dB"), ("s2", "uint16 L1C digital numbers")):
        predict.add_argument(
            f"--{modality}-representation",
            choices=REPRESENTATIONS,
            help=f"the {modality.upper()} GeoTIFF holds the raw product: 'physical' ({physical}) or 'v8' (the "
            "released uint8 codes); default: stored as the model's inputs declare",
        )


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
    from cromss_ray.tracking.registry import ModelNotFoundError

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
    """
    import torch

    from cromss_ray.models.geotiff import predict_geotiff
    from cromss_ray.models.segmenter import product_input
    from cromss_ray.tracking.registry import ModelNotFoundError, load_segmenter

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
        )
    except (ModelNotFoundError, ValueError) as exc:
        return fail("predict", exc)
    print(f"wrote {out} ({segmenter.branch} prediction, {len(segmenter.class_names)} classes)")
    return 0


