"""report.html: every experiment directory gets one self-contained page; parsed back here."""

from __future__ import annotations

import base64
import json
import os
from html.parser import HTMLParser

import pytest
from _tiny import make_tiny_bert, read_json, write_vader_csv

from jaxtl import cli, report_html


class _Page(HTMLParser):
    """The page's images (src), external references, table header cells and text."""

    def __init__(self):
        super().__init__()
        self.images, self.external, self.headers, self.text = {}, [], [], []
        self._in_th = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images[attrs["alt"]] = attrs["src"]
        for key in ("src", "href"):
            if key in attrs and not attrs[key].startswith("data:"):
                self.external.append(attrs[key])
        self._in_th = tag == "th"

    def handle_endtag(self, tag):
        self._in_th = False

    def handle_data(self, data):
        if self._in_th:
            self.headers.append(data)
        self.text.append(data)


def _parse(path) -> _Page:
    page = _Page()
    with open(path) as f:
        page.feed(f.read())
    page.close()
    return page


def _png(src: str) -> bytes:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    return base64.b64decode(src[len(prefix) :])


def test_every_experiment_directory_gets_a_self_contained_report(tmp_path):
    model = make_tiny_bert(str(tmp_path / "bert"))
    csv = write_vader_csv(tmp_path / "words.csv", 100)
    out = str(tmp_path / "out")
    assert cli.main(["finetune", "--model", model, "--data", csv, "--text-column", "word",
                     "--label-column", "sentiment", "--recipe", "linear_probe", "--batch-size",
                     "16", "--epochs", "1", "--lr", "0.003", "--out", out]) == 0  # fmt: skip
    page = _parse(os.path.join(out, "report.html"))
    assert page.external == []  # nothing fetched from elsewhere
    runs = ["pretrained-linear_probe", "scratch-full"]
    # Every plot of the experiment and of each run, byte for byte the PNG written beside it.
    expected = {"curves of every run": os.path.join(out, "comparison.png")}
    for run in runs:
        for file, title in (("curve.png", "Training curves"), ("confusion.png", "Confusion matrix"),
                            ("reliability.png", "Calibration")):  # fmt: skip
            expected[f"{run}: {title}"] = os.path.join(out, run, file)
    assert set(page.images) == set(expected)
    for alt, path in expected.items():
        with open(path, "rb") as f:
            assert _png(page.images[alt]) == f.read(), alt
    text = "".join(page.text)
    assert {"run", "test accuracy", "best val accuracy"} <= set(page.headers)  # the comparison
    summary = read_json(os.path.join(out, "summary.json"))
    for r in summary["results"]:
        assert f"Run {os.path.basename(r['workdir'])}" in text
        assert f"{100 * r['test']['accuracy']:.1f}%" in text
    info = read_json(os.path.join(out, runs[0], "run.json"))
    assert info["plan_table"] in text  # the plan table as printed
    assert "learning_rate0.003" in text  # the configuration table: option, value
    assert "macro_f1" in text and "ece" in text  # the test metrics, calibration included


def test_a_flagged_negative_transfer_is_on_the_page(tmp_path):
    check = {"arm": "pretrained full", "against": "scratch full", "accuracy": 0.7,
             "scratch_accuracy": 0.8, "difference": -0.1, "noise": 0.05, "flagged": True,
             "rule": "the rule"}  # fmt: skip
    quiet = {**check, "arm": "pretrained linear_probe", "flagged": False}
    with open(tmp_path / "summary.json", "w") as f:
        json.dump({"results": [], "negative_transfer": [check, quiet]}, f)
    text = "".join(_parse(report_html.write_html(str(tmp_path), [], table="| t |")).text)
    assert "Negative transfer: pretrained full reached 0.7000" in text
    assert "pretrained linear_probe" not in text
    assert "| t |" in text


def _browser() -> str | None:
    import shutil

    return next(
        (shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")
         if shutil.which(b)),
        None,
    )  # fmt: skip


@pytest.mark.slow
def test_the_report_renders_in_a_headless_browser(tmp_path):
    """Rendered by Chromium (.ci/run installs it from the system's packages and sets
    JAXTL_REQUIRE_BROWSER=1, so CI never skips this): the inline plots show."""
    import subprocess

    import matplotlib.image

    browser = _browser()
    if browser is None:
        if os.environ.get("JAXTL_REQUIRE_BROWSER") == "1":
            pytest.fail("JAXTL_REQUIRE_BROWSER=1 but no chromium found: apt-get install chromium")
        pytest.skip("no headless browser (apt-get install chromium); CI installs one")
    run = tmp_path / "out" / "run"
    run.mkdir(parents=True)
    from jaxtl import report

    report.plot_confusion([[5, 1], [2, 7]], ["neg", "pos"], str(run / "confusion.png"))
    with open(run / "results.json", "w") as f:
        json.dump({"test": {"accuracy": 0.8, "loss": 0.4}}, f)
    page = report_html.write_html(str(tmp_path / "out"), [str(run)], table="| table |")
    shot = tmp_path / "shot.png"
    done = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--window-size=1000,1400", f"--screenshot={shot}", f"file://{page}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert shot.exists(), done.stderr
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (1400, 1000)
    assert (pixels.min(-1) < 0.2).mean() > 0.001  # the headings' dark text
    # Blue only comes from the confusion matrix's colormap: the inline image was drawn.
    blue = (pixels[..., 2] - pixels[..., 0]) > 0.3
    assert blue.sum() > 1000
