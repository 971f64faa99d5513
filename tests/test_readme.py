"""The README's Python examples run as written (they may not rot)."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def python_blocks() -> list[str]:
    with open(README) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    assert len(blocks) == 2, "README holds two Python examples: text, then vision"
    return blocks


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # its workdir lands in the test's temp directory
    exec(compile(python_blocks()[0], "README.md", "exec"), {})
    out = capsys.readouterr().out
    accuracy = float(re.search(r"test accuracy ([0-9.]+)", out).group(1))
    assert accuracy > 0.75, out  # a linear probe on MiniLM features learns the task
    assert os.path.exists(tmp_path / "runs" / "readme" / "results.json")


def test_readme_vision_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(python_blocks()[1], "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert re.search(r"top-1: (tiger cat|tabby, tabby cat|Egyptian cat)", out), out
    assert "fc/kernel: checkpoint (1280, 1000) vs model (1280, 10)" in out
    assert os.path.getsize(tmp_path / "runs" / "lite0-digits.safetensors") > 1_000_000
