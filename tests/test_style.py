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


def test_docs_architecture_names_every_module():
    """docs/architecture.md says where each concept lives: every module of the package is
    named there (its path under jaxtl/, or its file name in a row of its folder's files, in
    backticks); a model family's file by the ``models/<family>.py`` row, and the CLI's entry
    point by the ``cli/`` row."""
    import re

    from jaxtl.models.registry import FAMILIES

    with open(os.path.join(ROOT, "docs", "architecture.md")) as f:
        doc = re.sub(r"```.*?```", "", f.read(), flags=re.S)  # code blocks hold diagrams
    named = set(re.findall(r"`([^`\n]+)`", doc))
    assert {"models/<family>.py", "cli/"} <= named
    package = os.path.join(ROOT, "jaxtl")
    missing = []
    for folder, _, files in os.walk(package):
        for name in files:
            rel = os.path.relpath(os.path.join(folder, name), package).replace(os.sep, "/")
            if not name.endswith(".py") or name == "__init__.py" or rel == "cli/__main__.py":
                continue
            family = rel.startswith("models/") and name[:-3] in FAMILIES
            if rel not in named and name not in named and not family:
                missing.append(rel)
    assert missing == [], f"docs/architecture.md does not say where these are: {missing}"
