"""``report.html``: one self-contained page per experiment directory.

It holds what a reviewer asks for, read back from the files the runs wrote: the comparison
table (or the per-arm seed statistics) and any negative-transfer warning from ``summary.json``,
the comparison and seed plots, and for every run its configuration and data facts
(``run.json``), its plan table, its test metrics (``results.json``: the headline metrics, the
per-class table, calibration) and its curves, confusion matrix and reliability diagram. Images
are inlined as base64 ``data:`` URIs, so the file can be mailed or attached alone; nothing is
fetched from elsewhere.
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Sequence

from jaxtl import report

__all__ = ["write_html"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.8em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; }
pre { background: #f7f7f7; padding: 0.6em; overflow-x: auto; font-size: 0.85em; }
img { max-width: 100%; margin: 0.5em 0; }
.warning { background: #fff1f0; border-left: 4px solid #d4380d; padding: 0.5em 1em; }
section.run { border-top: 2px solid #ddd; margin-top: 2em; }
"""


def _image(path: str, alt: str) -> str:
    if not os.path.exists(path):
        return ""
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(headers: Sequence, rows: Sequence[Sequence]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(report._fmt(c))}</td>" for c in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _read(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _config_rows(config: dict, prefix: str = "") -> list[list]:
    rows = []
    for key, value in config.items():
        if isinstance(value, dict):
            rows += _config_rows(value, f"{prefix}{key}.")
        else:
            rows.append([f"{prefix}{key}", json.dumps(value)])
    return rows


def _metrics_rows(test: dict) -> list[list]:
    return [[k, v] for k, v in test.items() if isinstance(v, int | float)]


def _run_section(run_dir: str) -> str:
    name = os.path.basename(os.path.normpath(run_dir))
    info = _read(os.path.join(run_dir, "run.json")) or {}
    results = _read(os.path.join(run_dir, "results.json"))
    parts = [f'<section class="run"><h2>Run {html.escape(name)}</h2>']
    if results is None:
        parts.append("<p>Unfinished: no results.json (resume with --resume).</p>")
    else:
        parts.append("<h3>Test metrics</h3>" + _table(["metric", "value"],
                                                       _metrics_rows(results["test"])))  # fmt: skip
        details = report.detail_table(results["test"])
        if details:
            parts.append(f"<pre>{html.escape(details)}</pre>")
    for file, title in (("curve.png", "Training curves"), ("confusion.png", "Confusion matrix"),
                        ("reliability.png", "Calibration")):  # fmt: skip
        image = _image(os.path.join(run_dir, file), f"{name}: {title}")
        if image:
            parts.append(f"<h3>{title}</h3>{image}")
    if info.get("plan_table"):
        parts.append(f"<h3>Plan</h3><pre>{html.escape(info['plan_table'])}</pre>")
    if info.get("config"):
        parts.append("<h3>Configuration</h3>" + _table(["option", "value"],
                                                        _config_rows(info["config"])))  # fmt: skip
    facts = {k: info[k] for k in ("recipe", "model", "data", "data_facts") if k in info}
    if facts:
        parts.append(
            f"<h3>Model and data</h3><pre>{html.escape(json.dumps(facts, indent=2))}</pre>"
        )
    return "\n".join(parts) + "</section>"


def write_html(out: str, run_dirs: Sequence[str], table: str | None = None) -> str:
    """Writes ``out/report.html`` from ``out``'s ``summary.json`` and plots and each of
    ``run_dirs``; returns its path.

    Args:
      out: the experiment directory.
      run_dirs: its run directories, in the comparison's order.
      table: the comparison table as printed (used when ``summary.json`` has no results).
    """
    summary = _read(os.path.join(out, "summary.json")) or {}
    results = summary.get("results") or []
    title = f"jaxtl experiment {os.path.basename(os.path.normpath(out))}"
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if results:
        seeded = len({r["name"] for r in results}) < len(results)
        if seeded:
            headers, rows = report.seed_rows(results)
        else:
            headers, rows = report.comparison_rows(results, summary.get("reference"))
        parts.append("<h2>Comparison</h2>" + _table(headers, rows))
    elif table:
        parts.append(f"<h2>Comparison</h2><pre>{html.escape(table)}</pre>")
    for check in summary.get("negative_transfer") or []:
        if check["flagged"]:
            parts.append(
                f'<p class="warning">Negative transfer: {html.escape(check["arm"])} reached '
                f"{check['accuracy']:.4f} test accuracy against {check['scratch_accuracy']:.4f} "
                f"for {html.escape(check['against'])}, beyond the noise ({check['noise']:.4f}; "
                f"{html.escape(check['rule'])}).</p>"
            )
    for file, alt in (("comparison.png", "curves of every run"), ("seeds.png", "seeds")):
        parts.append(_image(os.path.join(out, file), alt))
    env = next((_read(os.path.join(d, "run.json")) or {} for d in run_dirs), {}).get("environment")
    if env:
        parts.append(f"<h2>Environment</h2><pre>{html.escape(json.dumps(env, indent=2))}</pre>")
    parts += [_run_section(d) for d in run_dirs]
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n<body>\n"
        + "\n".join(p for p in parts if p)
        + "\n</body></html>\n"
    )
    path = os.path.join(out, "report.html")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(page)
    os.replace(tmp, path)
    return path
