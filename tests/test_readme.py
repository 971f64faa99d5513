"""The README's Python example runs as written (it may not rot)."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    with open(README) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    assert len(blocks) == 1, "README should hold exactly one Python example"
    monkeypatch.chdir(tmp_path)  # its workdir lands in the test's temp directory
    exec(compile(blocks[0], "README.md", "exec"), {})
    out = capsys.readouterr().out
    accuracy = float(re.search(r"test accuracy ([0-9.]+)", out).group(1))
    assert accuracy > 0.75, out  # a linear probe on MiniLM features learns the task
    assert os.path.exists(tmp_path / "runs" / "readme" / "results.json")
