"""CromSS pretraining as a Ray job: the same run as ``cromss pretrain``.

Submit it from the repository root, which Ray ships to the cluster and puts on the
job's ``PYTHONPATH``::

    ray job submit --working-dir . -- \
        python jobs/pretrain.py --config jobs/configs/pretrain_tiny.yaml --data s3://bucket/noldo-s12

Under ``ray job submit`` the job joins the cluster named by ``RAY_ADDRESS``; run directly,
it starts a local Ray instance on 127.0.0.1. Arguments: ``--config FILE [--data URI]
[--tracking-uri URI] [--set key=value ...]``; exit code 2 for an invalid config.
"""

from __future__ import annotations

import sys

from cromss_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
