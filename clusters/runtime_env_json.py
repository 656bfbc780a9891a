"""Print clusters/runtime_env.yaml as JSON for ``ray job submit --runtime-env-json``.

The committed runtime environment holds no secrets. This adds the tracking and
object-store variables that are set in the calling shell (and only those), so a job
on a cluster without instance profiles or Kubernetes Secrets reaches MLflow and S3:

    ray job submit --runtime-env-json "$(python clusters/runtime_env_json.py)" \
        -- python jobs/pretrain.py --config jobs/configs/pretrain_paper.yaml --data s3://...

Anyone holding the cluster's token can read a job's runtime environment in the
dashboard; prefer node-level credentials where the platform offers them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Mapping

import yaml

PASSED_VARIABLES: tuple[str, ...] = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)

DEFAULT_RUNTIME_ENV = Path(__file__).with_name("runtime_env.yaml")


def runtime_env_with(path: Path, environ: Mapping[str, str]) -> dict:
    """The runtime environment in ``path`` with the set ``PASSED_VARIABLES`` added to its env_vars."""
    try:
        runtime_env = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise SystemExit(f"{path}: no such runtime environment file") from None
    except yaml.YAMLError as exc:
        raise SystemExit(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(runtime_env, dict):
        raise SystemExit(f"{path}: the top level must be a mapping of runtime_env fields")
    env_vars = dict(runtime_env.get("env_vars") or {})
    env_vars.update({name: environ[name] for name in PASSED_VARIABLES if environ.get(name)})
    runtime_env["env_vars"] = env_vars
    return runtime_env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "runtime_env",
        nargs="?",
        type=Path,
        default=DEFAULT_RUNTIME_ENV,
        help="runtime_env YAML file (default: clusters/runtime_env.yaml)",
    )
    args = parser.parse_args(argv)
    print(json.dumps(runtime_env_with(args.runtime_env, os.environ)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
