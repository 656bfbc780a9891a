"""Print clusters/runtime_env.yaml as JSON for ``ray job submit --runtime-env-json``.

The committed runtime environment holds no secrets. This adds the non-secret tracking
and object-store variables that are set in the calling shell (server URIs, endpoints,
regions), so a job finds MLflow and S3:

    ray job submit --runtime-env-json "$(python clusters/runtime_env_json.py)" \
        -- python jobs/pretrain.py --config jobs/configs/pretrain_paper.yaml --data s3://...

Credentials never go into a runtime environment: Ray's runtime-env agent writes every
job's ``env_vars`` to its log on each node, and the dashboard shows them. Those set in
the shell are left out and named on stderr; nodes get them from instance profiles,
Kubernetes Secrets or the environment ``ray start`` runs in (clusters/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit

import yaml

PASSED_VARIABLES: tuple[str, ...] = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)
"""Where the services are: passed to the job when set."""

CREDENTIAL_VARIABLES: tuple[str, ...] = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)
"""Never passed: named on stderr when set, so nobody expects them to reach the job."""

DEFAULT_RUNTIME_ENV = Path(__file__).with_name("runtime_env.yaml")


def runtime_env_with(path: Path, environ: Mapping[str, str]) -> dict:
    """The runtime environment in ``path`` with the set ``PASSED_VARIABLES`` added to its env_vars.

    Refuses a file whose env_vars name a credential variable, and a passed URI holding
    ``user:password@`` (the value is not repeated in the message)."""
    try:
        runtime_env = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise SystemExit(f"{path}: no such runtime environment file") from None
    except yaml.YAMLError as exc:
        raise SystemExit(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(runtime_env, dict):
        raise SystemExit(f"{path}: the top level must be a mapping of runtime_env fields")
    env_vars = dict(runtime_env.get("env_vars") or {})
    committed_secrets = sorted(set(env_vars) & set(CREDENTIAL_VARIABLES))
    if committed_secrets:
        raise SystemExit(f"{path}: env_vars must not hold credentials: {', '.join(committed_secrets)}")
    passed = {name: environ[name] for name in PASSED_VARIABLES if environ.get(name)}
    with_userinfo = [name for name, value in passed.items() if "@" in urlsplit(value).netloc]
    if with_userinfo:
        raise SystemExit(
            f"{', '.join(with_userinfo)}: holds user:password@; give credentials to the nodes' environment "
            "(MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD) instead"
        )
    runtime_env["env_vars"] = {**env_vars, **passed}
    return runtime_env


def left_out(environ: Mapping[str, str]) -> list[str]:
    """The credential variables set in ``environ``, none of which the runtime environment carries."""
    return [name for name in CREDENTIAL_VARIABLES if environ.get(name)]


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
    secrets = left_out(os.environ)
    if secrets:
        print(
            f"left out of the runtime environment (Ray logs its env_vars on every node): {', '.join(secrets)}; "
            "give nodes credentials through an instance profile, a Kubernetes Secret or the environment of "
            "`ray start` (clusters/README.md, Credentials)",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
