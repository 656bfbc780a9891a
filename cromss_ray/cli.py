"""The ``cromss`` command line: one subcommand per task, each defined next to its task.

Each module in ``COMMAND_MODULES`` exposes ``register(subparsers)``, which adds its
subcommands and sets ``handler`` on them; a handler takes the parsed arguments and
returns the exit code. Heavy imports (Ray, torch, MLflow) happen inside handlers so
that ``cromss --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cromss_ray import __version__
from cromss_ray.config import ConfigError

COMMAND_MODULES: tuple[str, ...] = (
    "cromss_ray.data.cli",
    "cromss_ray.train.cli",
    "cromss_ray.tune.cli",
    "cromss_ray.inference.cli",
    "cromss_ray.tracking.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cromss",
        description="CromSS on Ray: multimodal noisy-label pretraining, tuning and transfer, tracked in MLflow.",
    )
    parser.add_argument("--version", action="version", version=f"cromss-ray {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 0
    try:
        return int(handler(args) or 0)
    except ConfigError as exc:
        print(f"cromss: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
