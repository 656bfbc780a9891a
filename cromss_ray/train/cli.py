"""``cromss pretrain``: one CromSS pretraining run on the Ray cluster (issue 4).

``cromss pretrain --config FILE [--data URI] [--tracking-uri URI] [--set key=value ...]``
loads and validates a :class:`~cromss_ray.config.PretrainConfig` (an unknown key or a bad
value exits with code 2 and names the key), joins the cluster named by ``RAY_ADDRESS`` or
starts a local one on 127.0.0.1, and trains. Running it again with the same ``run.name``
and ``run.storage_path`` resumes from the latest checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config``, ``--data``, ``--tracking-uri`` and repeatable ``--set`` (shared by the training commands)."""
    parser.add_argument("--config", required=True, type=Path, metavar="FILE", help="YAML run configuration")
    parser.add_argument("--data", metavar="URI", help="shard location (directory or s3://...); overrides data.uri")
    parser.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking store; overrides tracking.uri")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set optim.lr=1e-3 (repeatable)",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pretrain",
        help="pretrain a multimodal network with CromSS on Ray Train",
        description=(
            "Pretrain a middle- or late-fusion S1/S2 network with CromSS on NoLDO-S12 shards across "
            "Ray Train workers; tracked in MLflow, the model registered under cromss-<fusion>-<bands>b."
        ),
    )
    add_config_arguments(parser)
    parser.set_defaults(handler=_pretrain)


def _pretrain(args: argparse.Namespace) -> int:
    from cromss_ray.config import PretrainConfig, load_config

    config = load_config(PretrainConfig, args.config, args.overrides, data=args.data, tracking_uri=args.tracking_uri)

    from cromss_ray.train.common import init_ray
    from cromss_ray.train.pretrain import run_pretrain

    init_ray()
    outcome = run_pretrain(config)
    print(f"MLflow run {outcome.run_id} ({config.tracking.experiment})")
    if outcome.version is not None:
        aliases = ", ".join(f"@{alias}" for alias in config.tracking.aliases)
        print(f"registered model {config.registry_name()} version {outcome.version} {aliases}".rstrip())
    print(f"latest checkpoint {outcome.result.checkpoint.path}")
    return 0
