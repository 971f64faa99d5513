"""A data source as a JSON spec: what a run directory records so that ``jaxtl evaluate`` can
rebuild the very splits a run trained and was scored on.

:func:`describe` turns the user's options (a name or path, and where to find columns and
splits) into a spec; :func:`resolve` turns a spec back into splits.

Example:
  >>> describe("vader")
  {'kind': 'vader'}
  >>> describe("tfds:mnist", splits="train[:90%],train[90%:],test")["splits"]
  ['train[:90%]', 'train[90%:]', 'test']
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from jaxtl.data.images import ImageSplits, digits, digits_segmentation, from_folder
from jaxtl.data.shots import few_shot
from jaxtl.data.sources import TextSplits, from_table, vader

__all__ = ["describe", "resolve", "with_shots"]


# The embedded token-level tasks: --data name -> spec kind.
_EMBEDDED_TASKS = {"vader-tags": "vader_tags", "vader-qa": "vader_qa"}


def describe(
    data: str,
    *,
    data_dir: str | None = None,
    splits: str | Sequence[str] | None = None,
    input_column: str | None = None,
    label_column: str | None = None,
    skip_corrupt: bool = False,
    modality: str = "text",
    strict: bool = True,
) -> dict:
    """The JSON spec of a data source (see :func:`resolve`).

    Args:
      data: ``"vader"`` (embedded texts), ``"digits"`` (scikit-learn's 8x8 images), a .csv /
        .jsonl file, an image folder ``DIR/<class>/<images>``, ``"tfds:NAME[/CONFIG][:VERSION]"``
        or ``"hf:DIR"`` (a Hugging Face dataset saved with ``save_to_disk``) (``--data``);
        for token classification ``"vader-tags"`` or a CoNLL file (``FILE.conll`` or
        ``"conll:FILE"``), for question answering ``"vader-qa"`` or ``"squad:FILE.json"``,
        for segmentation ``"digits-segmentation"``.
      data_dir: where a TFDS dataset is prepared (``--data-dir``; tfds only).
      splits: train, validation and test split expressions, as a list or one comma-separated
        string (``--splits``; tfds and hf only).
      input_column: the text (or image) column (``--text-column``; csv / jsonl, tfds and hf
        only).
      label_column: the label column (``--label-column``; the same).
      skip_corrupt: image and audio folders only: skip undecodable files instead of stopping
        (``--skip-corrupt``).
      modality: what the model reads, ``"text"``, ``"image"`` or ``"audio"`` (a folder of
        WAV class folders).
      strict: refuse the options this kind of source does not read. False: leave them out (for
        two sources that share options, as ``jaxtl adapt``'s ``--data`` and ``--target-data``:
        check them together with :func:`refuse_unread`).

    Raises:
      ValueError: an option given that this kind of source does not read (naming it and its
        flag), or a directory given to a text model.
    """
    spec = _describe(data, data_dir, _split_list(splits), input_column, label_column,
                     skip_corrupt, modality)  # fmt: skip
    if strict:
        given = {"data_dir": data_dir, "splits": splits, "input_column": input_column,
                 "label_column": label_column, "skip_corrupt": skip_corrupt}  # fmt: skip
        refuse_unread(given, {f"--data {data}": spec})
    return spec


def refuse_unread(given: Mapping[str, object], sources: Mapping[str, dict]) -> None:
    """Refuse each option of :func:`describe` set in ``given`` (argument name -> value) that
    none of ``sources`` (a name for the message, e.g. ``"--data vader"`` -> its spec) reads.

    Raises:
      ValueError: naming the argument, its flag, the kinds of source that read it, and the
        sources that do not.
    """
    for arg, flag, kinds in _READ_BY:
        if given.get(arg) and not any(spec["kind"] in kinds for spec in sources.values()):
            readers = " or ".join(_SOURCE_NAMES[k] for k in kinds)
            names = " and ".join(sources)
            verb = "does" if len(sources) == 1 else "do"
            raise ValueError(
                f"{arg} / {flag} applies to {readers} only; {names} {verb} not read it: "
                f"drop {flag}."
            )


# The options of describe() that only some kinds of source read: (argument, flag, kinds).
_READ_BY = (
    ("data_dir", "--data-dir", ("tfds",)),
    ("splits", "--splits", ("tfds", "hf")),
    ("input_column", "--text-column", ("table", "tfds", "hf")),
    ("label_column", "--label-column", ("table", "tfds", "hf")),
    ("skip_corrupt", "--skip-corrupt", ("folder", "audio_folder")),
)
_SOURCE_NAMES = {"tfds": "tfds:NAME", "hf": "hf:DIR", "table": "a .csv / .jsonl file",
                 "folder": "an image folder", "audio_folder": "an audio folder"}  # fmt: skip


def _describe(data, data_dir, split_list, input_column, label_column, skip_corrupt, modality):
    if modality == "audio":
        if not os.path.isdir(data):
            raise ValueError(
                f"--data {data}: an audio model reads a folder of WAV files, "
                "DIR/<class>/<clip>.wav (--data DIR); from Python, "
                "jaxtl.data.audio.from_arrays(waveforms, labels, sampling_rate=...)."
            )
        return {
            "kind": "audio_folder",
            "path": os.path.abspath(data),
            "seed": 0,
            "skip_corrupt": skip_corrupt,
            "sampling_rate": None,
            "max_seconds": None,
        }
    if data == "vader":
        return {"kind": "vader"}
    if data in _EMBEDDED_TASKS:
        return {"kind": _EMBEDDED_TASKS[data], "seed": 0}
    for prefix, kind in (("conll:", "conll"), ("squad:", "squad")):
        if data.startswith(prefix) or (kind == "conll" and data.endswith(".conll")):
            path = data.removeprefix(prefix)
            if not os.path.isfile(path):
                raise ValueError(
                    f"--data {data}: no file {path!r}; {prefix}FILE names a "
                    f"{'CoNLL (a word and its tag per line)' if kind == 'conll' else 'SQuAD JSON'} "
                    "file."
                )
            return {"kind": kind, "path": os.path.abspath(path), "seed": 0}
    if data == "digits":
        return {"kind": "digits", "per_class": None, "seed": 0}
    if data == "digits-segmentation":
        return {"kind": "digits_segmentation", "canvas": 32, "digits_per_canvas": 1,
                "scale": 2, "threshold": 4, "seed": 0}  # fmt: skip
    if data.startswith("tfds:"):
        return {
            "kind": "tfds",
            "name": data,
            "data_dir": os.path.abspath(data_dir) if data_dir else None,
            "splits": split_list,
            "input_key": input_column,
            "label_key": label_column,
            "modality": modality,
        }
    if data.startswith("hf:"):
        path = data[len("hf:") :]
        if not path:
            raise ValueError(
                "--data hf:DIR names the directory that Dataset.save_to_disk or "
                "DatasetDict.save_to_disk wrote (data='hf:DIR')."
            )
        return {
            "kind": "hf",
            "path": os.path.abspath(path),
            "splits": split_list,
            "input_column": input_column,
            "label_column": label_column,
            "seed": 0,
            "modality": modality,
        }
    if os.path.isdir(data):
        if modality != "image":
            raise ValueError(
                f"{data!r} is a directory (an image or audio folder), but the model reads text; "
                "pass an image or audio model (--model), or a .csv / .jsonl file (--data)."
            )
        return {
            "kind": "folder",
            "path": os.path.abspath(data),
            "seed": 0,
            "skip_corrupt": skip_corrupt,
        }
    return {
        "kind": "table",
        "path": os.path.abspath(data),
        "text_column": input_column or "text",
        "label_column": label_column or "label",
        "seed": 0,
    }


def _split_list(splits: str | Sequence[str] | None) -> list[str] | None:
    if not splits:
        return None
    out = [s.strip() for s in splits.split(",")] if isinstance(splits, str) else list(splits)
    if len(out) != 3:
        raise ValueError(
            f"splits (--splits) takes three comma-separated split expressions "
            f"(train, validation, test); got {splits!r}."
        )
    return out


def resolve(spec: dict, *, num_labels: int, task: str) -> TextSplits | ImageSplits:
    """Rebuild a dataset from the JSON spec that a run directory records.

    ``{"kind": "vader"}``, ``{"kind": "digits", "per_class": 10 or None, "seed": 0}``,
    ``{"kind": "digits_segmentation", "canvas": 32, ...}`` (digits on a canvas with masks),
    ``{"kind": "vader_tags" | "vader_qa", "seed": 0}``,
    ``{"kind": "conll" | "squad", "path": ..., "seed": 0}``,
    ``{"kind": "audio_folder", "path": ..., "seed": 0, "sampling_rate": ..., ...}`` or
    ``{"kind": "table", "path": ..., "text_column": ..., "label_column": ..., "seed": 0}`` or
    ``{"kind": "tfds", "name": "tfds:NAME", "data_dir": ..., "splits": [...] or None, ...}`` or
    ``{"kind": "folder", "path": ..., "seed": 0, "skip_corrupt": False}`` or
    ``{"kind": "hf", "path": ..., "splits": [...] or None, "input_column": ..., "seed": 0, ...}``
    (a Hugging Face dataset saved with ``save_to_disk``). Any of them may add
    ``"shots": K, "shots_seed": S``: a K-per-class training subset (:func:`with_shots`).
    """
    data = _source(spec, num_labels=num_labels, task=task)
    if spec.get("shots"):
        data = few_shot(data, spec["shots"], seed=spec.get("shots_seed", 0))
    return data


def with_shots(spec: dict, shots: int | None, seed: int = 0) -> dict:
    """``spec`` whose training split is ``shots`` examples of each class, drawn with ``seed``
    (:func:`jaxtl.data.shots.few_shot`; ``--shots K`` with ``--seed``); ``None``: unchanged.

    Example:
      >>> with_shots({"kind": "vader"}, 16, seed=1)
      {'kind': 'vader', 'shots': 16, 'shots_seed': 1}
    """
    if shots is None:
        return spec
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise ValueError(f"shots (--shots) must be a whole number >= 1, got {shots!r}.")
    return {**spec, "shots": shots, "shots_seed": seed}


def _source(spec: dict, *, num_labels: int, task: str) -> TextSplits | ImageSplits:
    kind = spec.get("kind")
    if kind == "audio_folder":
        from jaxtl.data import audio

        return audio.from_folder(
            spec["path"],
            seed=spec.get("seed", 0),
            sampling_rate=spec.get("sampling_rate"),
            max_seconds=spec.get("max_seconds"),
            skip_corrupt=spec.get("skip_corrupt", False),
        )
    if kind in ("vader_tags", "conll"):
        from jaxtl.data import tagging

        if kind == "conll":
            return tagging.from_conll(spec["path"], seed=spec.get("seed", 0))
        return tagging.vader_tags(seed=spec.get("seed", 0))
    if kind in ("vader_qa", "squad"):
        from jaxtl.data import qa

        if kind == "squad":
            return qa.from_squad(spec["path"], seed=spec.get("seed", 0))
        return qa.vader_qa(seed=spec.get("seed", 0))
    if kind == "digits":
        return digits(spec.get("per_class"), seed=spec.get("seed", 0))
    if kind == "digits_segmentation":
        return digits_segmentation(
            spec.get("canvas", 32),
            digits_per_canvas=spec.get("digits_per_canvas", 1),
            scale=spec.get("scale", 2),
            threshold=spec.get("threshold", 4),
            seed=spec.get("seed", 0),
        )
    if kind == "vader":
        return vader(spec.get("path"))
    if kind == "table":
        return from_table(
            spec["path"],
            text_column=spec.get("text_column", "text"),
            label_column=spec.get("label_column", "label"),
            num_labels=num_labels,
            task=task,
            seed=spec.get("seed", 0),
        )
    if kind == "folder":
        return from_folder(
            spec["path"], seed=spec.get("seed", 0), skip_corrupt=spec.get("skip_corrupt", False)
        )
    if kind == "tfds":
        from jaxtl.data import tfds_source

        return tfds_source.load(
            spec["name"],
            data_dir=spec.get("data_dir"),
            splits=spec.get("splits"),
            input_key=spec.get("input_key"),
            label_key=spec.get("label_key"),
            task=task,
            modality=spec.get("modality"),
        )
    if kind == "hf":
        from jaxtl.data import hf_source

        return hf_source.load_from_disk(
            spec["path"],
            input_column=spec.get("input_column"),
            label_column=spec.get("label_column"),
            splits=spec.get("splits"),
            seed=spec.get("seed", 0),
            task=task,
            num_labels=num_labels,
            modality=spec.get("modality"),
        )
    raise ValueError(
        f"Unknown data kind {kind!r}: expected 'vader', 'digits', 'table', 'folder', 'tfds', "
        "'hf', 'vader_tags', 'conll', 'vader_qa', 'squad', 'digits_segmentation' or 'audio_folder'."
    )
