"""What the BERT-style text families' tests (test_roberta.py, test_distilbert.py) share: padded
random batches, the transformers reference's outputs, the export round trip through
transformers, and a short real training run under a recipe."""

from __future__ import annotations

import json
import os

import numpy as np
import safetensors
import torch
import transformers
from _tiny import fit, perturbed

import jaxtl
from jaxtl import sharding
from jaxtl.run import with_adapters
from jaxtl.train.losses import mean_loss
from jaxtl.transfer.lora import LORA_A, LORA_B
from jaxtl.transfer.trees import flatten

TOL = 1e-5  # float32 end to end, as in test_bert_parity.py; never loosened to make a test pass


def random_batch(seed: int = 0, *, pad_id: int, first_id: int | None = None, vocab: int = 99):
    """Three rows of 11 random ids (never a special id below 3) with trailing padding of
    different lengths (11, 7 and 3 real tokens), ``first_id`` (``<s>`` / ``[CLS]``) first."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(3, 11)).astype(np.int64)
    if first_id is not None:
        ids[:, 0] = first_id
    mask = (np.arange(11)[None, :] < np.array([11, 7, 3])[:, None]).astype(np.int64)
    return {"input_ids": np.where(mask == 1, ids, pad_id), "attention_mask": mask}


def reference_outputs(reference: torch.nn.Module, batch: dict) -> np.ndarray:
    """transformers' logits (a task model) or last hidden state (a base model) for ``batch``."""
    with torch.no_grad():
        out = reference(**{k: torch.from_numpy(np.asarray(v, np.int64)) for k, v in batch.items()})
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy()


def max_diff(ours, theirs: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(ours) - theirs)))


def assert_matches_reference(src, reference_class: str, batch: dict, *, task: str, **extra):
    """jaxtl's ``task`` model of the checkpoint at ``src`` gives the outputs of transformers'
    ``reference_class`` loaded from ``src`` (logits, or every position of the padded rows'
    hidden states) at ``TOL``; so does ``batch`` with the ``extra`` inputs. Returns the model
    (``num_labels`` as the checkpoint's config says)."""
    reference = getattr(transformers, reference_class).from_pretrained(src).eval()
    theirs = reference_outputs(reference, batch)
    num_labels = 1 if task == "regression" else reference.config.num_labels
    model = jaxtl.load(src, task=task, num_labels=num_labels)
    for inputs in (batch, {**batch, **extra}):
        ours = model.apply(model.params, inputs)
        assert ours.shape == theirs.shape
        diff = max_diff(ours, theirs)
        print(f"random {type(reference).__name__} ({task}) max |diff| = {diff:.3g}")
        assert diff <= TOL
    return model


def assert_only_the_head_is_new(src, batch: dict, head: list[str], unexpected=()) -> None:
    """The base checkpoint at ``src`` loaded for 4-way classification: the default head's
    params (``head``) are the only new ones, and the checkpoint's ``unexpected`` ones (a pooler
    no head reads) are reported. Then ``pooling="mean"``: only a Dense ``classifier`` is new,
    and it reads the attention-mask mean of the features (computed here in numpy); a
    sentence-transformers directory that declares mean pooling gets it by default."""
    model = jaxtl.load(src, task="classification", num_labels=4)
    report = model.report
    print(report.table())
    assert sorted(report.initialized) == head
    assert sorted(report.unexpected) == list(unexpected) and not report.mismatched
    assert model.apply(model.params, batch).shape == (3, 4)

    mean = jaxtl.load(src, task="classification", num_labels=4, pooling="mean")
    assert sorted(mean.report.initialized) == ["classifier/bias", "classifier/kernel"]
    assert mean.structure.head == ("classifier",)
    features = jaxtl.load(src, task="features")
    hidden = np.asarray(features.apply(features.params, batch))
    weights = batch["attention_mask"][..., None]
    pooled = (hidden * weights).sum(1) / weights.sum(1)
    head = {k: np.asarray(v) for k, v in mean.params["classifier"].items()}
    assert max_diff(mean.apply(mean.params, batch), pooled @ head["kernel"] + head["bias"]) <= TOL

    os.makedirs(os.path.join(src, "1_Pooling"))
    with open(os.path.join(src, "1_Pooling", "config.json"), "w") as f:
        json.dump({"pooling_mode_mean_tokens": True}, f)
    assert jaxtl.load(src, num_labels=4).extras["pooling"] == "mean"


def checkpoint_names(directory) -> list[str]:
    """The tensor names in a directory's ``model.safetensors``."""
    with safetensors.safe_open(os.path.join(directory, "model.safetensors"), "np") as f:
        return list(f.keys())


def assert_both_heads_export(src, out, task_class: str, base_class: str, batch, **base_kwargs):
    """The default head of the base checkpoint at ``src`` exports as ``task_class`` (the HF
    ``...ForSequenceClassification``); the mean-pooled head, which HF has no class for, as
    ``base_class`` (transformers loads it with ``base_kwargs``), the head beside it for jaxtl.
    Each round-trips (:func:`export_round_trip`)."""
    own = jaxtl.load(src, num_labels=3)
    export_round_trip(own, os.path.join(out, "own"), task_class, batch)
    mean = jaxtl.load(src, num_labels=2, pooling="mean")
    export_round_trip(mean, os.path.join(out, "mean"), base_class, batch, **base_kwargs)


def export_round_trip(model, out, reference_class: str, batch: dict, **reference_kwargs) -> None:
    """Exports ``model`` with every param moved as ``reference_class`` (config.json's
    ``architectures``); transformers' class loads the export and gives jaxtl's outputs, and
    jaxtl reads the export back to the same tree.

    A task class is compared with the model's logits; a base class (the export of a
    features model, or of a head HF has no class for) with the features jaxtl reads from the
    export, on real tokens (padded positions are ill-conditioned: test_bert_parity.py)."""
    tuned = perturbed(model.params)
    jaxtl.export(model, out, tuned)
    config = transformers.AutoConfig.from_pretrained(out)
    assert config.architectures == [reference_class]
    if model.task != "features":
        assert config.num_labels == model.num_labels
    reference = getattr(transformers, reference_class).from_pretrained(out, **reference_kwargs)
    theirs = reference_outputs(reference.eval(), batch)
    if theirs.ndim == 3:
        features = jaxtl.load(out, task="features")
        real = batch["attention_mask"].astype(bool)
        ours = np.asarray(features.apply(features.params, batch))
        assert max_diff(ours[real], theirs[real]) <= TOL
    else:
        assert max_diff(model.apply(tuned, batch), theirs) <= TOL

    pooling = model.extras["pooling"]
    again = jaxtl.load(out, task=model.task, num_labels=model.num_labels, pooling=pooling)
    assert again.report.initialized == [] and again.report.mismatched == []
    for path, value in flatten(again.params).items():
        np.testing.assert_array_equal(np.asarray(value), flatten(tuned)[path])


def assert_megatron_split(model, column: tuple[str, ...], row: tuple[str, ...]) -> None:
    """A ``tensor`` axis of 2 splits exactly the ``column`` layers of every block by output
    column and the ``row`` layers by input row (layer paths under a block): the family's
    Megatron declarations resolved against its real param paths."""
    specs = sharding.param_specs(
        model.params, {"tensor": 2}, structure=model.structure, min_shard_size=0
    )
    split = {
        p: tuple(s)
        for p, s in flatten(specs).items()
        if p.endswith("/kernel") and "tensor" in tuple(s)
    }
    blocks = model.structure.blocks
    want = {f"{b}/{layer}/kernel": ("fsdp", "tensor") for b in blocks for layer in column}
    want |= {f"{b}/{layer}/kernel": ("tensor", "fsdp") for b in blocks for layer in row}
    assert split == want


def labelled(seed: int, *, pad_id: int, first_id: int | None, n: int = 64) -> dict:
    """``n`` padded rows whose label says which half of the vocabulary their tokens come from:
    a task a tiny encoder learns in a few steps."""
    rows = [random_batch(seed + i, pad_id=pad_id, first_id=first_id) for i in range(n // 3 + 1)]
    arrays = {k: np.concatenate([r[k] for r in rows])[:n].astype(np.int32) for k in rows[0]}
    ids, label = arrays["input_ids"], np.random.default_rng(seed).integers(0, 2, n)
    # Real tokens after first_id move into their label's half: ids 3..50 or 51..98.
    after_first = np.arange(ids.shape[1]) >= (0 if first_id is None else 1)
    body = (arrays["attention_mask"] == 1) & after_first
    ids[body] = (ids % 48 + 3 + 48 * label[:, None])[body]
    arrays["label"] = label.astype(np.int32)
    return arrays


def assert_finetune_lowers_the_loss(model, recipe: str, arrays: dict, lora_targets=()) -> None:
    """64 steps of a real :class:`jaxtl.Trainer` under ``recipe`` lower the training loss by a
    margin; under LoRA the adapters sit on the ``lora_targets`` of every block (layer paths
    under a block), and only they and the head (``structure.head``) moved. (Compiling the step
    takes nearly all the time: 64 steps cost about what 16 do.)"""
    plan = jaxtl.make_plan(recipe, model.structure)
    model = with_adapters(model, plan, seed=0)
    config = jaxtl.TrainConfig(batch_size=16, max_steps=64, learning_rate=1e-2, progress=False)
    params = fit(jaxtl.Trainer(model, plan, config), arrays).state.params
    inputs = {k: v for k, v in arrays.items() if k != "label"}

    def loss(params) -> float:
        return float(mean_loss(model.apply(params, inputs), arrays, "classification"))

    before, after = loss(model.params), loss(params)
    print(f"{recipe}: training loss {before:.4f} -> {after:.4f}")
    assert after < before - 0.15
    if plan.adapters is None:
        return
    adapted = {p.rsplit("/", 1)[0] for p in flatten(params) if p.endswith(LORA_A)}
    assert adapted == {f"{b}/{layer}" for b in model.structure.blocks for layer in lora_targets}
    start = flatten(model.params)
    moved = {p for p, v in flatten(params).items() if not np.array_equal(v, start[p])}
    assert any(LORA_B in p for p in moved) and any(LORA_A in p for p in moved)
    head = model.structure.head
    assert all(p.startswith(head) or LORA_A in p or LORA_B in p for p in moved), moved
