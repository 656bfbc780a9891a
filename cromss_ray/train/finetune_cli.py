"""``cromss finetune``, ``evaluate``, ``predict`` and ``compare``: transfer learning and its use (issue 6).

* ``cromss finetune --config FILE [--init SOURCE] [--data URI] [--tracking-uri URI] [--set key=value ...]``
  trains a single-modality network from a pretrained encoder on the Ray cluster
  (``RAY_ADDRESS``, else a local one) and registers it.
* ``cromss evaluate --model models:/... --data URI``: its scores on a test split.
* ``cromss predict --model models:/... --s1 S1.tif --s2 S2.tif --out PRED.tif``: a class
  map GeoTIFF on the input's grid, tiled with overlap and blended.
* ``cromss compare EXPERIMENT``: test scores across transfer runs, as in the paper's tables.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from cromss_ray.train.cli import add_config_arguments

TRACKING_HELP = "MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)"
MODEL_HELP = "models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/model"
BRANCH_HELP = "for a pretrained CromSS model: predict from 's1' or 's2' alone (default: fused)"
TILE = 512
"""Default window of ``evaluate`` and ``predict``: the registered models' own (tracking.finetuned.DEFAULT_TILE),
so the CLI, the pyfunc and a run's test scores predict with the same windows."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``finetune``, ``evaluate``, ``predict`` and ``compare`` subcommands."""
    finetune = subparsers.add_parser(
        "finetune",
        help="fine-tune a single-modality network from a pretrained encoder on Ray Train",
        description=(
            "Train an smp segmentation network (any decoder) on downstream shards, its S1 or S2 encoder "
            "taken from a registered pretrained model, a paper checkpoint or random; frozen or fine-tuned. "
            "Tracked in MLflow, registered as cromss-ft-<dataset>-<decoder>."
        ),
    )
    add_config_arguments(finetune)
    finetune.add_argument(
        "--init",
        metavar="SOURCE",
        help="models:/NAME@ALIAS, models:/NAME/VERSION, a paper checkpoint file, or 'random'; overrides model.init",
    )
    finetune.set_defaults(handler=_finetune)

    evaluate = subparsers.add_parser(
        "evaluate",
        help="score a registered model on a downstream test split",
        description="Predict every tile of a downstream shard set and print OA, mIoU, mF1 and per-class scores "
        "from one confusion matrix (spec 11).",
    )
    evaluate.add_argument("--model", required=True, help=MODEL_HELP)
    evaluate.add_argument("--data", required=True, metavar="URI", help="downstream shards (directory or s3://...)")
    evaluate.add_argument("--branch", choices=("s1", "s2", "fused"), help=BRANCH_HELP)
    evaluate.add_argument("--s3-endpoint", help="endpoint of an S3-compatible store")
    _add_inference_arguments(evaluate, tile=TILE)
    evaluate.add_argument("--tracking-uri", help=TRACKING_HELP)
    evaluate.set_defaults(handler=_evaluate)

    predict = subparsers.add_parser(
        "predict",
        help="predict a class-map GeoTIFF from Sentinel-1/2 GeoTIFFs",
        description=(
            "Predict a class map on the grid and CRS of the input GeoTIFFs (any size), tiled with overlap and "
            "blended so there are no seams. Input values are scaled as the model's training shards were "
            "(fine-tuned models) or as raw products, S1 in dB and S2 L1C digital numbers (pretrained models), "
            "unless --s1-scale ... say otherwise."
        ),
    )
    predict.add_argument("--model", required=True, help=MODEL_HELP)
    predict.add_argument("--s1", type=Path, metavar="S1.tif", help="Sentinel-1 GeoTIFF (VV, VH)")
    predict.add_argument(
        "--s2", type=Path, metavar="S2.tif", help="Sentinel-2 GeoTIFF (all 13 L1C bands or the model's)"
    )
    predict.add_argument("--out", required=True, type=Path, metavar="PRED.tif", help="class-map GeoTIFF to write")
    predict.add_argument("--branch", choices=("s1", "s2", "fused"), help=BRANCH_HELP)
    _add_inference_arguments(predict, tile=TILE)
    for modality in ("s1", "s2"):
        for part in ("scale", "offset"):
            predict.add_argument(
                f"--{modality}-{part}", type=float, help=f"model input = stored * scale + offset for {modality.upper()}"
            )
    predict.add_argument("--tracking-uri", help=TRACKING_HELP)
    predict.set_defaults(handler=_predict)

    compare = subparsers.add_parser(
        "compare",
        help="tabulate test mIoU / OA of the transfer runs of an experiment",
        description="Group the transfer runs of an MLflow experiment by initialisation, decoder and encoder mode "
        "and print their mean test mIoU / OA as in the paper's tables; the CSV goes to --out, else into a "
        "new run of the experiment.",
    )
    compare.add_argument("experiment", help="MLflow experiment, e.g. cromss-finetune")
    compare.add_argument("--out", type=Path, metavar="CSV", help="write the CSV here instead of logging a run")
    compare.add_argument("--tracking-uri", help=TRACKING_HELP)
    compare.set_defaults(handler=_compare)


def _add_inference_arguments(parser: argparse.ArgumentParser, *, tile: int) -> None:
    parser.add_argument("--tile", type=int, default=tile, help=f"window size in pixels (default: {tile})")
    parser.add_argument("--overlap", type=int, help="overlap of neighbouring windows (default: a quarter of the tile)")
    parser.add_argument("--batch-size", type=int, default=4, help="windows run at once (default: 4)")


def _fail(command: str, message: object) -> int:
    print(f"cromss {command}: {message}", file=sys.stderr)
    return 1


def _finetune(args: argparse.Namespace) -> int:
    from cromss_ray.config import FinetuneConfig, load_config

    overrides = [*args.overrides, *([f"model.init={args.init}"] if args.init else [])]
    config = load_config(FinetuneConfig, args.config, overrides, data=args.data, tracking_uri=args.tracking_uri)

    from cromss_ray.tracking.registry import ModelNotFoundError
    from cromss_ray.train.common import init_ray
    from cromss_ray.train.finetune import resolve_init, run_finetune

    try:
        initialisation = resolve_init(config)
    except ModelNotFoundError as exc:
        return _fail("finetune", exc)
    init_ray()
    outcome = run_finetune(config, initialisation=initialisation)
    print(f"MLflow run {outcome.run_id} ({config.tracking.experiment}), initialised from {outcome.source.label}")
    keys = [f"test/{config.model.branch}/{name}" for name in ("oa", "miou", "mf1")]
    print("  ".join(f"{key} {outcome.test_metrics[key]:.4f}" for key in keys if key in outcome.test_metrics))
    if outcome.version is not None:
        print(f"registered model {outcome.registry_name} version {outcome.version}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from cromss_ray.tracking.registry import ModelNotFoundError
    from cromss_ray.train.evaluate import evaluate_model, format_evaluation

    try:
        result = evaluate_model(
            args.model,
            args.data,
            branch=args.branch,
            tracking_uri=args.tracking_uri,
            s3_endpoint=args.s3_endpoint,
            tile=args.tile,
            overlap=args.overlap,
            batch_size=args.batch_size,
        )
    except (ModelNotFoundError, ValueError, FileNotFoundError) as exc:
        return _fail("evaluate", exc)
    print(format_evaluation(result))
    return 0


def _predict(args: argparse.Namespace) -> int:
    import torch

    from cromss_ray.predict import Scaling, predict_geotiff
    from cromss_ray.tracking.finetuned import load_segmenter
    from cromss_ray.tracking.registry import ModelNotFoundError

    try:
        segmenter = load_segmenter(args.model, branch=args.branch, tracking_uri=args.tracking_uri)
        scaling = dict(segmenter.scaling)
        for modality in ("s1", "s2"):
            scale, offset = getattr(args, f"{modality}_scale"), getattr(args, f"{modality}_offset")
            default = scaling[modality]
            scaling[modality] = Scaling(
                default.scale if scale is None else scale, default.offset if offset is None else offset
            )
        segmenter = replace(segmenter, scaling=scaling)
        segmenter.network.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        out = predict_geotiff(
            segmenter,
            args.out,
            s1=args.s1,
            s2=args.s2,
            tile=args.tile,
            overlap=args.overlap,
            batch_size=args.batch_size,
            tags={"model": args.model, "branch": segmenter.branch},
        )
    except (ModelNotFoundError, ValueError) as exc:
        return _fail("predict", exc)
    print(f"wrote {out} ({segmenter.branch} prediction, {len(segmenter.class_names)} classes)")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from cromss_ray.tracking.compare import compare_experiment

    try:
        comparison = compare_experiment(args.experiment, tracking_uri=args.tracking_uri, out=args.out)
    except ValueError as exc:
        return _fail("compare", exc)
    print(comparison.table)
    where = comparison.path if comparison.path is not None else f"MLflow run {comparison.run_id}"
    print(f"CSV: {where}")
    return 0
