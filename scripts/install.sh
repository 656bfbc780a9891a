#!/usr/bin/env bash
# Create (or reuse) .venv and install cromss-ray into it, editable, with the extras named in $1 (e.g. test).
#
# pip would compile every installed module to bytecode on one core (about two minutes for torch
# and its neighbours on a 2-core machine); it is told not to, and compileall does it on all cores.
# Like pip, compileall skips the few modules written for newer Pythons (quiet=2: no listing).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-compile -e ".${1:+[$1]}" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
.venv/bin/python -c 'import compileall, sysconfig; compileall.compile_dir(sysconfig.get_paths()["purelib"], quiet=2, workers=0)'
