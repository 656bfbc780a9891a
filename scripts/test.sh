#!/usr/bin/env bash
# Set up (or reuse) the virtual environment and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
exec .venv/bin/python -m pytest "$@"
