"""The suite's local Ray instance, started with the environment a cluster node gives its workers.

Workers resolve object-store credentials from their own environment when they read
(clusters/README.md, "Credentials"), never from what the driver pickles. Ray's worker
processes inherit the environment of the process that starts the instance, so the
dummy credentials of the suite's loopback S3 servers are set while it starts, as an
instance profile or a node's environment would provide them, and nowhere else.
"""

from __future__ import annotations

from typing import Any

import pytest

from cromss_ray.train.cluster import start_local_ray

NODE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "cromss-test-node-key",
    "AWS_SECRET_ACCESS_KEY": "cromss-test-node-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def start_test_ray(**options: Any) -> None:
    """:func:`start_local_ray` with :data:`NODE_CREDENTIALS` in the environment its processes inherit."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in NODE_CREDENTIALS.items():
            patch.setenv(name, value)
        patch.delenv("AWS_SESSION_TOKEN", raising=False)
        start_local_ray(**options)
