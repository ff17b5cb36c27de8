"""The `mlxsup` entry point when the server commands cannot be imported: run from a source
checkout without installing, it says what failed to import and how to install, instead of
argparse's "invalid choice: 'start'"."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_uninstalled(*args):
    # -S: no site-packages, so none of the install's import hooks: `python -m mlxsup` from the
    # repository root finds only the mlxsup/ folder, as in a fresh clone.
    return subprocess.run([sys.executable, "-S", "-m", "mlxsup", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})


def test_start_from_a_source_checkout_says_what_failed_and_how_to_install():
    out = run_uninstalled("start", "--model", "whatever")
    assert out.returncode == 2
    assert "invalid choice" not in out.stderr
    assert "No module named 'mlxsup.supervisor'" in out.stderr
    assert f"pip install -e '{ROOT}" in out.stderr


def test_help_names_the_missing_commands_and_version_still_answers():
    out = run_uninstalled("--help")
    assert out.returncode == 0 and "demo-model" in out.stdout and "could not be loaded" in out.stdout
    assert run_uninstalled("--version").stdout.startswith("mlxsup ")


def test_installed_the_server_commands_are_there():
    out = subprocess.run([sys.executable, "-m", "mlxsup", "start", "--help"], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 0 and "--model" in out.stdout and "could not be loaded" not in out.stdout + out.stderr
