"""``cromss export``, ``cromss import-checkpoint`` and ``cromss compare``: the registry and the runs, from the shell.

``export`` writes one branch's encoder as a plain state dict that an smp ``Unet``
encoder and a timm ResNet with the same input channels load (spec 11).
``import-checkpoint`` registers one of the paper's Lightning checkpoints (spec 12) as
a pretrained model, logged in a run of its own tagged ``source=paper-checkpoint``.
``compare`` tabulates the test scores of the transfer runs of an experiment, as in the
paper's tables.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from cromss_ray.arguments import add_command, MODEL_HELP, TRACKING_HELP, fail

SOURCE_TAG = "paper-checkpoint"
PRETRAIN_EXPERIMENT = "cromss-pretrain"
HASH_CHUNK_BYTES = 1 << 20


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``export``, ``import-checkpoint`` and ``compare`` subcommands."""
    export = add_command(subparsers, "export", export_encoder)
    export.add_argument("--model", required=True, help=MODEL_HELP)
    export.add_argument("--branch", required=True, choices=("s1", "s2"), help="which modality's encoder")
    export.add_argument("--out", required=True, type=Path, help="output file (torch.save)")
    export.add_argument("--tracking-uri", help=TRACKING_HELP)

    importer = add_command(subparsers, "import-checkpoint", import_checkpoint)
    importer.add_argument("path", type=Path, help="the checkpoint file (.ckpt)")
    importer.add_argument("--fusion", required=True, choices=("mid", "late"), help="fusion of the checkpoint")
    importer.add_argument("--register", required=True, metavar="NAME", help="registered model name")
    importer.add_argument("--encoder", default="resnet50", help="smp encoder name (default: resnet50)")
    importer.add_argument(
        "--alias", dest="aliases", action="append", metavar="ALIAS", help="alias for the new version (repeatable)"
    )
    importer.add_argument("--experiment", default=PRETRAIN_EXPERIMENT, help="MLflow experiment of the import run")
    importer.add_argument("--tracking-uri", help=TRACKING_HELP)
    importer.add_argument(
        "--trusted", action="store_true", help="unpickle the whole checkpoint (only for files you trust)"
    )

    compare = add_command(subparsers, "compare", _compare)
    compare.add_argument("experiment", help="MLflow experiment, e.g. cromss-finetune")
    compare.add_argument("--out", type=Path, metavar="CSV", help="write the CSV here instead of logging a run")
    compare.add_argument("--tracking-uri", help=TRACKING_HELP)


def export_encoder(args: argparse.Namespace) -> int:
    """write a pretrained model's S1 or S2 encoder as a plain state dict.

    Write one branch's encoder of a registered pretrained model as a torch state dict that smp
    (Unet(...).encoder) and timm ResNets with the same input channels load.
    """
    import torch

    from cromss_ray.method import encoder_state_dict
    from cromss_ray.models.stored import modality_bands
    from cromss_ray.tracking.model_uris import ModelNotFoundError
    from cromss_ray.tracking.registry import load_pretrained

    try:
        pretrained = load_pretrained(args.model, tracking_uri=args.tracking_uri)
        state = encoder_state_dict(pretrained.model, args.branch)
    except (ModelNotFoundError, ValueError) as exc:
        return fail("export", exc)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_name(args.out.name + ".partial")
    torch.save(state, partial)
    partial.replace(args.out)
    bands = modality_bands(pretrained.config, args.branch)
    encoder = pretrained.model.encoder_name
    print(f"wrote {args.out}: {args.branch} encoder ({encoder}, {bands} input bands) of {args.model}")
    return 0


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def import_checkpoint(args: argparse.Namespace) -> int:
    """register one of the paper's released checkpoints as a pretrained model.

    Load a CromSS Lightning checkpoint (net.encoder1. / net.model1. ... keys), log it in a run
    of the pretraining experiment and register it as a pyfunc model.
    """
    from cromss_ray.config import PretrainConfig, build_config
    from cromss_ray.method import load_reference_checkpoint
    from cromss_ray.models.stored import check_matches_config
    from cromss_ray.tracking.pyfunc import log_pretrained_model
    from cromss_ray.tracking.model_uris import store_uri
    from cromss_ray.tracking.runs import RunTracker

    if not args.path.is_file():
        return fail("import-checkpoint", f"{args.path}: no such checkpoint file")
    try:
        model = load_reference_checkpoint(args.path, args.fusion, encoder=args.encoder, trusted=args.trusted)
    except ValueError as exc:
        return fail("import-checkpoint", exc)
    aliases = args.aliases or ["latest"]
    config = build_config(
        PretrainConfig,
        {
            "data": {"s2_bands": model.s2_bands},
            "model": {"fusion": args.fusion, "encoder": args.encoder, "classes": model.classes},
            "run": {"name": f"import-{args.path.stem}"},
            "tracking": {
                "uri": args.tracking_uri,
                "experiment": args.experiment,
                "registry_name": args.register,
                "aliases": aliases,
            },
        },
    )
    try:
        check_matches_config(model, config)
    except ValueError as exc:
        return fail("import-checkpoint", f"{args.path}: {exc}")
    tags = {"source": SOURCE_TAG, "checkpoint": args.path.name, "checkpoint_sha256": _sha256(args.path)}
    with RunTracker.start(
        config,
        tracking_uri=store_uri(args.tracking_uri),
        experiment=args.experiment,
        run_name=config.run.name,
        tags=tags,
    ) as tracker:
        version = log_pretrained_model(model, config, tracker=tracker, registry_name=args.register, aliases=aliases)
    shown = ", ".join(f"models:/{args.register}@{alias}" for alias in aliases)
    print(f"registered {args.path} as models:/{args.register}/{version} ({shown}); run {tracker.run_id}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    """tabulate test mIoU / OA of the transfer runs of an experiment.

    Group the transfer runs of an MLflow experiment by initialisation, decoder and encoder mode
    and print their mean test mIoU / OA as in the paper's tables; the CSV goes to --out, else
    into a new run of the experiment.
    """
    from cromss_ray.tracking.compare import compare_experiment

    try:
        comparison = compare_experiment(args.experiment, tracking_uri=args.tracking_uri, out=args.out)
    except ValueError as exc:
        return fail("compare", exc)
    print(comparison.table)
    where = comparison.path if comparison.path is not None else f"MLflow run {comparison.run_id}"
    print(f"CSV: {where}")
    return 0
