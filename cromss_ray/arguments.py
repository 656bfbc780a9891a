"""argparse pieces the subcommand modules share (each module registers its own ``cromss`` subcommands).

This module sits beside :mod:`cromss_ray.config` at the bottom of the layers, so every
package's ``cli.py`` can use it without importing another package's command line.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Callable
from pathlib import Path

TRACKING_HELP = "MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)"
MODEL_HELP = "models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/model"


def add_config_arguments(
    parser: argparse.ArgumentParser,
    *,
    config_help: str = "YAML run configuration",
    config_required: bool = True,
    example: str = "optim.lr=1e-3",
) -> None:
    """``--config``, ``--data``, ``--tracking-uri`` and repeatable ``--set`` (the commands that run a config).

    A command with subcommands of its own (``cromss tune report``) leaves ``--config``
    optional and checks it in its handler.
    """
    parser.add_argument("--config", required=config_required, type=Path, metavar="FILE", help=config_help)
    parser.add_argument("--data", metavar="URI", help="shard location (directory or s3://...); overrides data.uri")
    parser.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking store; overrides tracking.uri")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override one config value, e.g. --set {example} (repeatable)",
    )


def fail(command: str, message: object) -> int:
    """Print ``cromss COMMAND: message`` to stderr; exit code 1."""
    print(f"cromss {command}: {message}", file=sys.stderr)
    return 1


def add_command(
    subparsers: argparse._SubParsersAction, name: str, handler: Callable[[argparse.Namespace], int]
) -> argparse.ArgumentParser:
    """A subcommand ``name`` run by ``handler``, documented by the handler's docstring: its first
    paragraph (without its full stop) is the line in ``cromss --help``, the rest the command's own description."""
    summary, _, description = inspect.cleandoc(handler.__doc__ or "").partition("\n\n")
    parser = subparsers.add_parser(
        name, help=" ".join(summary.split()).rstrip("."), description=" ".join(description.split()) or None
    )
    parser.set_defaults(handler=handler)
    return parser
