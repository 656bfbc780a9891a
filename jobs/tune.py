"""A CromSS sweep as a Ray job: the same sweep as ``cromss tune``.

Submit it from the repository root, which Ray ships to the cluster and puts on the
job's ``PYTHONPATH``::

    ray job submit --working-dir . -- \
        python jobs/tune.py --config jobs/configs/tune_tiny.yaml --data s3://bucket/noldo-s12

Under ``ray job submit`` the job joins the cluster named by ``RAY_ADDRESS``; run directly,
it starts a local Ray instance on 127.0.0.1. Arguments: ``--config FILE [--data URI]
[--tracking-uri URI] [--set key=value ...]``, or ``report NAME`` to print a sweep's table
again. Exit code 2 for an invalid config, 130 for an interrupted sweep (submitting the
same job again resumes it). On a multi-node cluster, ``run.storage_path`` must be shared
storage (``s3://...`` or NFS) so every node sees the sweep and its trials' checkpoints.
"""

from __future__ import annotations

import sys

from cromss_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
