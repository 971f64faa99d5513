"""The tools that decide formatting pass on the whole tree (ruff, configured in pyproject.toml:
lint rules, import order, line length 100, formatting), so a style slip fails CI like a bug."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
PATHS = ["jaxtl", "tests", "benchmarks", "examples", "scripts"]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]])
def test_ruff(command):
    done = subprocess.run(
        [sys.executable, "-m", "ruff", *command, *PATHS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
