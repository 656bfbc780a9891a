#!/usr/bin/env bash
# Create (or reuse) .venv and install cromss-ray into it, editable, with the extras named in $1 (e.g. test).
#
# The environment is ~7 GB, most of it torch's CUDA libraries. pip unpacks every wheel one
# after the other on each install (~2.7 min on a 2-core machine); uv, installed into the venv by
# pip, unpacks them in parallel into its cache and links them from there (~30 s the first time,
# ~10 s after), resolving the same versions from the same sources (scripts/pip_sources.py).
# Bytecode is compiled on all cores by compileall (the packages' own test folders left out);
# like pip, it skips the few modules written for newer Pythons (quiet=2: no listing).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-compile "uv>=0.9" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
mapfile -t sources < <(.venv/bin/python scripts/pip_sources.py)
.venv/bin/uv pip install --quiet --python .venv/bin/python "${sources[@]}" -e ".${1:+[$1]}"
.venv/bin/python -c 'import compileall, re, sysconfig
compileall.compile_dir(sysconfig.get_paths()["purelib"], quiet=2, workers=0, rx=re.compile(r"/tests?/"))'
