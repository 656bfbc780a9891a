"""The console script answers --help and --version without starting anything."""

import subprocess
import sys

from cromss_ray import __version__
from cromss_ray.cli import main


def test_version_and_help_from_the_console_script():
    done = subprocess.run([sys.executable, "-m", "cromss_ray.cli", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == f"cromss-ray {__version__}"
    done = subprocess.run([sys.executable, "-m", "cromss_ray.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "usage: cromss" in done.stdout


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: cromss" in capsys.readouterr().out
