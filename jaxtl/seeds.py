"""Several seeds of each arm (``--seeds 0,1,2``): mean, standard deviation and a 95% interval
per arm, and whether two arms differ by more than their seed noise.

A run's test metric varies with its seed (the new head's init, dropout, data order); one run
per arm cannot tell a real difference from that spread. With ``n`` seeds an arm's mean comes
with ``std`` (sample standard deviation, ``ddof=1``) and the 95% interval ``mean ± t(0.975,
n-1) · std / sqrt(n)`` (Student's t). Two arms' means are *within seed noise* when they differ
by less than :data:`NOISE_SE` standard errors of the difference, ``sqrt(s1²/n1 + s2²/n2)``
(about a 95% band, as the negative-transfer rule uses for the test set's own noise).

Example:
  >>> rs = [{"name": "a", "seed": s, "test": {"accuracy": x}}
  ...       for s, x in enumerate([0.90, 0.92, 0.91])]
  >>> st = aggregate(rs, "accuracy")["a"]
  >>> st["n"], round(st["mean"], 4), round(st["std"], 4), [round(v, 4) for v in st["ci95"]]
  (3, 0.91, 0.01, [0.8852, 0.9348])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["NOISE_SE", "aggregate", "difference", "parse_seeds"]

NOISE_SE = 2.0


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``.

    Raises:
      ValueError: not comma-separated whole numbers, a negative seed, or one given twice.

    Example:
      >>> parse_seeds("0, 1,2")
      [0, 1, 2]
    """
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(
            f"seeds (--seeds) takes comma-separated whole numbers, e.g. 0,1,2; got {text!r}."
        ) from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"seeds (--seeds) needs distinct seeds >= 0, e.g. 0,1,2; got {text!r}.")
    return seeds


def aggregate(results: Sequence[dict], metric: str) -> dict[str, dict]:
    """Per arm name (in order of first appearance): ``values`` (by seed), ``seeds``, ``n``,
    ``mean``, ``std`` (``None`` for one seed) and ``ci95`` (``None`` for one seed) of
    ``test[metric]``."""
    from scipy import stats

    groups: dict[str, list[dict]] = {}
    for r in results:
        if metric in r["test"]:
            groups.setdefault(r["name"], []).append(r)
    out = {}
    for name, rs in groups.items():
        values = [float(r["test"][metric]) for r in rs]
        n = len(values)
        mean = sum(values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
        ci = None
        if std is not None:
            half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
            ci = [mean - half, mean + half]
        out[name] = {
            "seeds": [r.get("seed") for r in rs],
            "values": values,
            "n": n,
            "mean": mean,
            "std": std,
            "ci95": ci,
        }
    return out


def difference(a: dict, b: dict) -> dict:
    """``a``'s mean minus ``b``'s (two :func:`aggregate` entries), the seed noise of that
    difference (:data:`NOISE_SE` standard errors; ``None`` unless both have 2+ seeds) and
    whether the difference is within it.

    Example:
      >>> a = {"mean": 0.91, "std": 0.01, "n": 3}
      >>> b = {"mean": 0.90, "std": 0.02, "n": 3}
      >>> d = difference(a, b)
      >>> round(d["difference"], 4), round(d["noise"], 4), d["within_noise"]
      (0.01, 0.0258, True)
    """
    diff = a["mean"] - b["mean"]
    if a["std"] is None or b["std"] is None:
        return {"difference": diff, "noise": None, "within_noise": None}
    noise = NOISE_SE * math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
    return {"difference": diff, "noise": noise, "within_noise": abs(diff) < noise}
