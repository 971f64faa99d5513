"""K-shot training subsets: K examples of every class, drawn with a seed, for small-data
protocols (``--shots K``). The validation and test splits are left as they are, so runs with
different K are scored on the same examples.

Example:
  >>> import numpy as np
  >>> from jaxtl.data.sources import TextSplits
  >>> texts = [f"t{i}" for i in range(12)]
  >>> data = TextSplits((texts, np.arange(12) % 3), (["v"], np.array([0])), (["t"], np.array([1])))
  >>> small = few_shot(data, 2, seed=0)
  >>> len(small.train[0]), np.bincount(small.train[1]).tolist()
  (6, [2, 2, 2])
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxtl.data.audio import AudioSplits
from jaxtl.data.images import ImageSplits
from jaxtl.data.sources import TextSplits

__all__ = ["few_shot"]


def few_shot(data: TextSplits | ImageSplits, shots: int, seed: int = 0):
    """``data`` with a training split of ``shots`` examples of each class, chosen at random
    with ``seed`` (the same subset for the same data, K and seed; a larger K's subset holds a
    smaller one's), kept in their original order.

    Raises:
      ValueError: ``shots`` below 1, unlabeled or regression data, or a class with fewer
        than ``shots`` training examples (named, with its count).
    """
    if isinstance(shots, bool) or not isinstance(shots, int | np.integer) or shots < 1:
        raise ValueError(f"shots (--shots) must be a whole number >= 1, got {shots!r}.")
    if not isinstance(data, TextSplits | ImageSplits | AudioSplits):  # tagged, questions
        raise ValueError(
            f"shots (--shots) draws K examples of every class; {data.name!r} has no class per "
            "example (tagged sentences or questions): drop --shots."
        )
    inputs, labels = data.train
    if (
        labels is not None
        and np.ndim(labels) > 1
        and np.issubdtype(np.asarray(labels).dtype, np.integer)
    ):
        raise ValueError(
            f"shots (--shots) draws K examples of every class; {data.name!r} has a class per "
            "pixel (segmentation masks), not per example: drop --shots."
        )
    if labels is None or not np.issubdtype(np.asarray(labels).dtype, np.integer):
        raise ValueError(
            "shots (--shots) draws K examples of every class, so it needs a classification "
            "dataset with integer class labels; this one has none (a causal LM's text, or "
            "regression targets)."
        )
    labels = np.asarray(labels)
    names = data.label_names
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))  # one draw for every class: nested across K
    counts = np.bincount(labels, minlength=len(names) if names else 0)
    short = [(c, int(n)) for c, n in enumerate(counts) if n < shots]
    if short:
        shown = ", ".join(
            f"{names[c] if names and c < len(names) else c!s} ({n})" for c, n in short
        )
        fix = (
            f"Use --shots {int(counts.min())} or less, or more data for those classes."
            if counts.min() > 0
            else "Some classes have no training example at all: add data for them, or drop "
            "them from the labels."
        )
        raise ValueError(
            f"shots={shots} (--shots {shots}) needs {shots} training examples of every class; "
            f"the training split of {data.name!r} has fewer for {shown}. {fix}"
        )
    chosen = np.sort(
        np.concatenate([order[labels[order] == c][:shots] for c in range(len(counts))])
    )
    if isinstance(inputs, list):
        subset = [inputs[i] for i in chosen]
    else:
        subset = np.asarray(inputs)[chosen]
    return dataclasses.replace(data, train=(subset, labels[chosen]))
