"""Parity of jaxtl's per-token heads against transformers' PyTorch classes (the independent
reference), for every BERT-style family: ``...ForTokenClassification`` (tag logits per token)
and ``...ForQuestionAnswering`` (start and end logits per token): outputs, the load report of
a checkpoint saved *with* the head and of a base checkpoint, every gradient, and the export
round trip through transformers."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import transformers
from _encoders import TOL, max_diff, random_batch
from _tiny import perturbed, tiny_config, tiny_distilbert_config, tiny_roberta_config

import jaxtl
from jaxtl.transfer.trees import flatten, unflatten

# family: (transformers class prefix, config, pad id, first id, what a base checkpoint has
# that a per-token head does not read)
FAMILIES = {
    "bert": ("Bert", tiny_config, 0, 2, ["bert/pooler/dense/bias", "bert/pooler/dense/kernel"]),
    "roberta": (
        "Roberta",
        tiny_roberta_config,
        1,
        0,
        ["roberta/pooler/dense/bias", "roberta/pooler/dense/kernel"],
    ),
    "distilbert": ("DistilBert", tiny_distilbert_config, 0, 2, []),
}
TASKS = {
    "token_classification": "ForTokenClassification",
    "question_answering": "ForQuestionAnswering",
}
HEADS = {"token_classification": "classifier", "question_answering": "qa_outputs"}


def saved(path, family: str, suffix: str, **overrides) -> str:
    prefix, config, *_ = FAMILIES[family]
    torch.manual_seed(0)
    getattr(transformers, prefix + suffix)(config(**overrides)).save_pretrained(path)
    return str(path)


def batch(family: str, seed: int = 0) -> dict:
    _, _, pad, first, _ = FAMILIES[family]
    return random_batch(seed, pad_id=pad, first_id=first)


def torch_outputs(reference, inputs: dict, **kwargs):
    """The reference's per-token logits ``[B, T, C]``: tag logits, or start and end stacked
    last, as jaxtl's question-answering head returns them."""
    out = reference(
        **{k: torch.as_tensor(np.asarray(v, np.int64)) for k, v in inputs.items()}, **kwargs
    )
    if hasattr(out, "start_logits"):
        return out, torch.stack([out.start_logits, out.end_logits], dim=-1)
    return out, out.logits


def reference(src: str, family: str, task: str):
    return getattr(transformers, FAMILIES[family][0] + TASKS[task]).from_pretrained(src)


def num_labels(task: str) -> int:
    return 2 if task == "question_answering" else 5


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("task", TASKS)
def test_a_checkpoint_saved_with_the_head_matches_pytorch(tmp_path, family, task):
    src = saved(tmp_path, family, TASKS[task], num_labels=num_labels(task))
    model = jaxtl.load(src, task=task, num_labels=num_labels(task))
    report = model.report
    assert not report.initialized and not report.unexpected and not report.mismatched
    assert model.structure.head == (HEADS[task],)
    with torch.no_grad():
        _, theirs = torch_outputs(reference(src, family, task).eval(), batch(family))
    ours = model.apply(model.params, batch(family))
    assert ours.shape == (3, 11, num_labels(task))
    diff = max_diff(ours, theirs.numpy())
    print(f"{family} {task}: max |diff| = {diff:.3g}")
    assert diff <= TOL


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("task", TASKS)
def test_a_base_checkpoint_gets_only_the_new_head(tmp_path, family, task):
    src = saved(tmp_path, family, "Model")
    model = jaxtl.load(src, task=task, num_labels=num_labels(task))
    head = HEADS[task]
    assert sorted(model.report.initialized) == [f"{head}/bias", f"{head}/kernel"]
    assert sorted(model.report.unexpected) == FAMILIES[family][4]


def test_question_answering_takes_no_num_labels_but_two():
    # The head is start and end: whatever num_labels says.
    from jaxtl.weights.loading import _check_task

    assert _check_task("question_answering", 7) == 2


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("task", TASKS)
def test_loss_gradients_match_pytorch(tmp_path, family, task):
    """transformers' own loss (labels -100 ignored; start/end positions) and every param's
    gradient, against jaxtl's loss for the task (jaxtl.train.losses) on the same batch."""
    from jaxtl.train.losses import mean_loss

    src = saved(tmp_path, family, TASKS[task], num_labels=num_labels(task))
    inputs = batch(family, seed=3)
    rng = np.random.default_rng(0)
    mask = inputs["attention_mask"]
    if task == "token_classification":
        tags = rng.integers(0, 5, mask.shape)
        tags = np.where((mask == 1) & (rng.random(mask.shape) < 0.7), tags, -100)
        labels, kwargs = tags, {"labels": torch.as_tensor(tags)}
    else:
        starts = np.array([2, 1, 0])
        ends = np.array([5, 4, 2])
        labels = np.stack([starts, ends], axis=1)
        kwargs = {
            "start_positions": torch.as_tensor(starts),
            "end_positions": torch.as_tensor(ends),
        }
    ref = reference(src, family, task).eval()
    out, _ = torch_outputs(ref, inputs, **kwargs)
    out.loss.backward()

    model = jaxtl.load(src, task=task, num_labels=num_labels(task))

    def loss_fn(params):
        return mean_loss(model.apply(params, inputs), {**inputs, "label": labels}, task)

    loss, grads = jax.value_and_grad(loss_fn)(model.params)
    assert abs(float(loss) - out.loss.item()) <= TOL
    theirs = {n: p.grad.numpy() for n, p in ref.named_parameters() if p.grad is not None}
    # The family's exporter names and lays out a gradient tree as transformers' params.
    ours, _ = model.export_fn(jax.device_get(grads), {})
    assert sorted(ours) == sorted(theirs)
    for name, grad in theirs.items():
        assert max_diff(ours[name], grad) <= 1e-5, name


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("task", TASKS)
def test_export_round_trip_through_transformers(tmp_path, family, task):
    src = saved(tmp_path / "src", family, "Model")
    model = jaxtl.load(src, task=task, num_labels=num_labels(task))
    tuned = perturbed(model.params)
    out = str(tmp_path / "out")
    jaxtl.export(model, out, tuned)
    config = transformers.AutoConfig.from_pretrained(out)
    assert config.architectures == [FAMILIES[family][0] + TASKS[task]]
    assert config.num_labels == num_labels(task)
    with torch.no_grad():
        _, theirs = torch_outputs(reference(out, family, task).eval(), batch(family, 2))
    assert max_diff(model.apply(tuned, batch(family, 2)), theirs.numpy()) <= TOL
    again = jaxtl.load(out, task=task, num_labels=num_labels(task))
    assert again.report.initialized == [] and again.report.unexpected == []
    for path, value in flatten(again.params).items():
        np.testing.assert_array_equal(np.asarray(value), flatten(tuned)[path])


@pytest.mark.parametrize("task", TASKS)
def test_peft_loads_lora_adapters_of_a_per_token_head_with_jaxtls_outputs(tmp_path, task):
    """lora(4) on BERT for each per-token task: the exported adapters and head (PEFT's
    TOKEN_CLS / QUESTION_ANS task types) load with peft onto transformers' class and give
    jaxtl's outputs; the merged export gives them too."""
    import peft

    from jaxtl.transfer import lora as tl

    src = saved(tmp_path / "src", "bert", "Model")
    model = jaxtl.load(src, task=task, num_labels=num_labels(task))
    adapted = jaxtl.lora.adapt(model, tl.LoRA(4, alpha=8), seed=0)
    # lora_b starts at zero: move every adapter and head leaf (the base stays: PEFT's file
    # holds adapters and head only).
    moved = flatten(perturbed(adapted.params))
    params = unflatten(
        {
            p: moved[p] if p.endswith((tl.LORA_A, tl.LORA_B)) or p.startswith(HEADS[task]) else v
            for p, v in flatten(adapted.params).items()
        }
    )
    inputs = batch("bert", 4)
    ours = np.asarray(adapted.apply(params, inputs))
    out = jaxtl.lora.export_adapters(adapted, tmp_path / "adapter", params)
    base = transformers.BertForTokenClassification if task == "token_classification" else None
    base = (base or transformers.BertForQuestionAnswering).from_pretrained(
        src, num_labels=num_labels(task)
    )
    theirs = peft.PeftModel.from_pretrained(base, str(out)).eval()
    assert (
        theirs.peft_config["default"].task_type
        == {
            "token_classification": "TOKEN_CLS",
            "question_answering": "QUESTION_ANS",
        }[task]
    )
    with torch.no_grad():
        _, logits = torch_outputs(theirs, inputs)
    assert max_diff(ours, logits.numpy()) <= TOL
    merged = jaxtl.export(adapted, tmp_path / "merged", params)
    with torch.no_grad():
        _, logits = torch_outputs(reference(merged, "bert", task).eval(), inputs)
    assert max_diff(ours, logits.numpy()) <= TOL
