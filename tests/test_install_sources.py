"""scripts/pip_sources.py: pip's package sources, as `pip config list` prints them, become uv's flags."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "pip_sources.py"
spec = importlib.util.spec_from_file_location("pip_sources", SCRIPT)
pip_sources = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pip_sources)

LISTING = """\
:env:.cert='/etc/ssl/certs/ca-certificates.crt'
:env:.find-links='/opt/wheels'
:env:.index-url='https://mirror.example/simple'
global.constraint='/etc/pip/constraints.txt'
global.extra-index-url='file:///opt/a/simple file:///opt/b/simple'
global.find-links='/opt/wheels'
global.index-url='https://files.example/simple'
site.timeout='60'
"""


def test_every_source_becomes_a_uv_flag_once_and_the_environment_overrides_the_index():
    assert pip_sources.uv_arguments(pip_sources.pip_settings(LISTING)) == [
        "--index-strategy", "unsafe-best-match",
        "--default-index", "https://mirror.example/simple",
        "--index", "file:///opt/a/simple",
        "--index", "file:///opt/b/simple",
        "--find-links", "/opt/wheels",
        "--constraints", "/etc/pip/constraints.txt",
    ]  # fmt: skip


def test_without_pip_configuration_uv_keeps_its_defaults():
    assert pip_sources.uv_arguments(pip_sources.pip_settings("")) == ["--index-strategy", "unsafe-best-match"]
