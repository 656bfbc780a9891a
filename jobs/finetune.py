"""A transfer run as a Ray job: the same run as ``cromss finetune``.

Submit it from the repository root, which Ray ships to the cluster and puts on the
job's ``PYTHONPATH``::

    ray job submit --working-dir . -- \
        python jobs/finetune.py --config jobs/configs/finetune_tiny.yaml --init models:/cromss-mid-13b@latest

Under ``ray job submit`` the job joins the cluster named by ``RAY_ADDRESS``; run directly,
it starts a local Ray instance on 127.0.0.1. Arguments: ``--config FILE [--init SOURCE]
[--data URI] [--tracking-uri URI] [--set key=value ...]``; exit code 2 for an invalid
config, 1 for a missing source model.
"""

from __future__ import annotations

import sys

from cromss_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
