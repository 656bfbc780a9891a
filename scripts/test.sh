#!/usr/bin/env bash
# Set up (or reuse) the virtual environment and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]' 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
exec .venv/bin/python -m pytest "$@"
