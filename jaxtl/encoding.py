"""A data set as the model's inputs: checks that the data fits the model (its task, its
modality, its class labels), then the encoding (tokenized texts, preprocessed images, word tags,
answers, audio) every entry point trains and evaluates on.
"""

from __future__ import annotations

import numpy as np

from jaxtl.data import audio, images, labels, qa, sources, tagging, text
from jaxtl.models.base import LoadedModel
from jaxtl.models.registry import data_modality

# The data each per-token task reads, and how a user builds it (for errors).
_TOKEN_DATA = {
    "token_classification": (
        tagging.TaggedSplits,
        "word-tagged sentences (jaxtl.data.tagging: vader_tags(), from_conll(path); "
        "--data vader-tags or --data FILE.conll)",
    ),
    "question_answering": (
        qa.QASplits,
        "questions, contexts and answers (jaxtl.data.qa: vader_qa(), from_squad(path); "
        "--data vader-qa or --data FILE.json in SQuAD's layout)",
    ),
}

Splits = (
    sources.TextSplits | images.ImageSplits | tagging.TaggedSplits | qa.QASplits | audio.AudioSplits
)


def check_task_data(model: LoadedModel, data: Splits) -> None:
    """Refuse data that the model's task cannot read (tagged sentences for a sequence
    classifier, texts for a tagger ...), naming the data each needs, a tagger whose head
    has another number of tags than the data, data of another kind than the model reads, and
    class labels the head has no output for."""
    if isinstance(data, tagging.TaggedSplits) and model.task == "token_classification":
        if model.num_labels != len(data.label_names):
            raise ValueError(
                f"{data.name!r} has {len(data.label_names)} tags {data.label_names}, but the "
                f"model's head has num_labels={model.num_labels}: load it with "
                f"num_labels={len(data.label_names)} (--num-labels {len(data.label_names)})."
            )
    for task, (kind, what) in _TOKEN_DATA.items():
        if isinstance(data, kind) and model.task != task:
            raise ValueError(
                f"{data.name!r} is {what}: load the model with task={task!r} "
                f"(--task {task}), not {model.task!r}."
            )
    if model.task in _TOKEN_DATA and not isinstance(data, _TOKEN_DATA[model.task][0]):
        raise ValueError(
            f"task={model.task!r} (--task {model.task}) trains on "
            f"{_TOKEN_DATA[model.task][1]}; {data.name!r} is texts or images with one label "
            "each."
        )
    check_modality(model, data)
    if model.task == "classification" and not isinstance(data, tagging.TaggedSplits | qa.QASplits):
        check_class_labels(data, model.num_labels)


def check_modality(model: LoadedModel, data: Splits) -> None:
    """Refuse data of another kind than the model reads (text for an image model, ...),
    naming the flags and what to pass."""
    if isinstance(data, audio.AudioSplits):
        return  # audio.encode names what an audio model needs
    if "audio_preprocessing" in model.extras:
        raise ValueError(
            f"The {model.family!r} model reads audio, but {data.name!r} is not: pass "
            "jaxtl.data.audio.from_folder(DIR) / from_arrays(waveforms, labels, sampling_rate=...) "
            "(--data DIR of <class>/<clip>.wav)."
        )
    if isinstance(data, tagging.TaggedSplits | qa.QASplits):
        return
    if isinstance(data, images.ImageSplits) and "preprocessing" not in model.extras:
        reads = data_modality(model)
        raise ValueError(
            f"The {model.family!r} model (--model) reads {reads}, not the images of "
            f"{data.name!r} (--data): pass an image model, e.g. a ResNet or ViT directory, "
            f"or {reads} data."
        )
    if not isinstance(data, images.ImageSplits) and "preprocessing" in model.extras:
        raise ValueError(
            f"The {model.family!r} model (--model) reads images, but {data.name!r} (--data) is "
            "text: pass a text model, e.g. a BERT directory, or image data."
        )


def check_class_labels(data: Splits, num_labels: int) -> None:
    """Every split's labels are integer class ids in ``[0, num_labels)``, and the data names no
    more classes than the head has outputs: else a label past the head would train to NaN
    and score nonsense. (:func:`jaxtl.data.from_arrays` and ``from_table`` map class names to
    ids; data built otherwise may hold names or fractions.)"""
    names = data.label_names
    if names is not None and len(names) > num_labels:
        labels.check_label_count(names, num_labels, f"{data.name!r}")
    for split in sources.SPLITS:
        ids = getattr(data, split)[1]
        if ids is None:
            raise ValueError(
                f"{data.name!r} has no labels in its {split} split, and a classifier trains on "
                "them; give labels (jaxtl.data.from_arrays(inputs, labels)), or load a causal "
                "LM (task='causal_lm', --task causal_lm) for unlabeled text."
            )
        ids = np.asarray(ids)
        where = f"in the {split} split of {data.name!r}"
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(
                f"Labels {where} are {ids.dtype} (e.g. {ids.flat[0]!r}), not integer class "
                "ids; build the splits with jaxtl.data.from_arrays or from_table, which map "
                "class names to ids (or task='regression', --task regression, for real-valued "
                "targets)."
            )
        labels.check_ids(ids, num_labels, where)


def encode_splits(
    model: LoadedModel,
    data: Splits,
    long_texts: str = "truncate",
) -> tuple[dict, dict]:
    """The model's inputs for every split: images through the model's preprocessing, or texts
    tokenized to one padded length (the longest text, within the model's limit): word-tagged
    sentences with one label per word's first token (:mod:`jaxtl.data.tagging`), question
    and context pairs with the answer's tokens (:mod:`jaxtl.data.qa`).

    Texts longer than the model's positions are cut (and counted), or with
    ``long_texts="error"`` refused before anything compiles.

    Returns ``{split: arrays with 'label'}`` (no labels for a causal LM: its targets are the
    next tokens) and facts worth logging (sizes, length, truncations).
    """
    check_task_data(model, data)
    if isinstance(data, audio.AudioSplits):
        return audio.encode(model.extras, data)
    if isinstance(data, tagging.TaggedSplits | qa.QASplits):
        source = tagging if isinstance(data, tagging.TaggedSplits) else qa
        max_length = int(model.extras.get("max_length", 512))
        return source.encode_splits(_tokenizer(model), data, max_length=max_length)
    if isinstance(data, images.ImageSplits):
        return images.encode(model.extras["preprocessing"], data, task=model.task)
    tokenizer = _tokenizer(model)
    max_length = int(model.extras.get("max_length", 512))
    for s in sources.SPLITS:
        if len(getattr(data, s)[0]) == 0:
            raise ValueError(f"The {s} split of {data.name!r} is empty.")
    # One pass over every text: the shared padded length comes from all splits together.
    all_texts = [t for s in sources.SPLITS for t in getattr(data, s)[0]]
    if long_texts not in ("truncate", "error"):
        raise ValueError(f"long_texts must be 'truncate' or 'error', got {long_texts!r}.")
    encoded, truncated = text.encode(
        tokenizer, all_texts, max_length=max_length, on_long=long_texts
    )
    length = encoded["input_ids"].shape[1]
    out = text.split_back(encoded, [(s, len(getattr(data, s)[0])) for s in sources.SPLITS])
    for s in sources.SPLITS:
        ids = getattr(data, s)[1]
        if ids is not None and model.task != "causal_lm":  # an LM's targets are its inputs
            out[s]["label"] = np.asarray(ids)
    return out, {"length": int(length), "truncated": truncated, "sizes": data.sizes()}


def _tokenizer(model: LoadedModel):
    if "preprocessing" in model.extras:
        raise ValueError(f"The {model.family!r} model reads images, not text.")
    tokenizer = model.extras.get("tokenizer")
    if tokenizer is None:
        raise ValueError(
            f"The model at {model.path!r} has no tokenizer (tokenizer.json or vocab.txt)."
        )
    return tokenizer


def references(data: Splits, split: str) -> list | None:
    """What the text metrics of ``split`` read beside the predictions: question answering's
    ``(context, answer)`` per example; ``None`` for other data."""
    return data.references(split) if isinstance(data, qa.QASplits) else None
