"""Print, one per line, the uv arguments that make `uv pip install` look where pip looks.

uv reads no pip configuration; this reads pip's own (`pip config list`: its files and PIP_*
variables) and turns its package sources into uv flags: the index, the extra indexes, the
find-links locations and the constraint files. pip picks the best version across all its
indexes, so uv is told to do the same (`--index-strategy unsafe-best-match`).
"""

from __future__ import annotations

import ast
import subprocess
import sys

FLAGS = {
    "index-url": "--default-index",
    "extra-index-url": "--index",
    "find-links": "--find-links",
    "constraint": "--constraints",
}
SECTIONS = (":env:", "global", "install")


def pip_settings(listing: str) -> dict[str, list[str]]:
    """Values per setting of ``pip config list`` output (``section.name='value'`` lines): the
    configuration files' in the order listed, then the environment's, which pip lets override them."""
    lines = listing.splitlines()
    from_environment = [line for line in lines if line.startswith(":env:.")]
    settings: dict[str, list[str]] = {}
    for line in [line for line in lines if line not in from_environment] + from_environment:
        key, separator, literal = line.partition("=")
        section, _, name = key.rpartition(".")
        if not separator or section not in SECTIONS or name not in FLAGS:
            continue
        for value in str(ast.literal_eval(literal)).split():
            if value not in settings.setdefault(name, []):
                settings[name].append(value)
    return settings


def uv_arguments(settings: dict[str, list[str]]) -> list[str]:
    """uv flags for pip's sources; of several index URLs the last one read wins, as in pip."""
    arguments = ["--index-strategy", "unsafe-best-match"]
    for name, flag in FLAGS.items():
        values = settings.get(name, [])
        for value in values[-1:] if name == "index-url" else values:
            arguments += [flag, value]
    return arguments


def main() -> None:
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True
    ).stdout
    print("\n".join(uv_arguments(pip_settings(listing))))


if __name__ == "__main__":
    main()
