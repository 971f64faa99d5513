"""Tokenize texts into fixed-shape integer arrays with the model's own fast tokenizer."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# What :func:`encode` returns: one int32 ``[N, T]`` array each.
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def encode(
    tokenizer,
    texts: Sequence[str],
    *,
    max_length: int,
    length: int | None = None,
    pad_multiple: int = 8,
    on_long: str = "truncate",
) -> tuple[dict[str, np.ndarray], int]:
    """Batch-encode ``texts`` -> ``input_ids``, ``attention_mask``, ``token_type_ids`` (int32).

    Every row is padded to one length, so jit compiles one shape: ``length`` if given, else the
    longest encoded text rounded up to ``pad_multiple``, never above ``max_length`` (the model's
    position limit). Returns the arrays and the number of texts that had to be truncated.

    Args:
      tokenizer: a ``tokenizers.Tokenizer`` (the directory's ``tokenizer.json``).
      texts: the strings to encode.
      max_length: the model's maximum number of positions.
      length: a fixed padded length (e.g. the one the training split chose).
      pad_multiple: round the automatic length up to a multiple of this.
      on_long: ``"truncate"`` texts longer than ``max_length`` (and count them) or ``"error"``.
    """
    if len(texts) == 0:
        raise ValueError("No texts to encode: the split is empty.")
    tok = tokenizer
    tok.no_padding()
    tok.no_truncation()
    encs = tok.encode_batch(list(texts))
    longest = max(len(e.ids) for e in encs)
    if on_long == "error" and longest > max_length:
        over = [i for i, e in enumerate(encs) if len(e.ids) > max_length]
        example = texts[over[0]][:60]
        raise ValueError(
            f"{len(over)} text(s) exceed the model's {max_length} positions (the longest has "
            f"{longest} tokens), e.g. text {over[0]}: {example!r}... Shorten them, or let jaxtl "
            "truncate them (counted): long_texts='truncate' (--long-texts truncate)."
        )
    if length is None:
        length = min(max_length, -(-longest // pad_multiple) * pad_multiple)
    length = min(length, max_length)
    pad = pad_id(tok)
    n = len(encs)
    ids = np.full((n, length), pad, np.int32)
    mask = np.zeros((n, length), np.int32)
    types = np.zeros((n, length), np.int32)
    truncated = 0
    for i, e in enumerate(encs):
        k = len(e.ids)
        if k > length:
            truncated += 1
            # Keep the leading tokens and the closing special token ([SEP]).
            row_ids = e.ids[: length - 1] + e.ids[-1:]
            row_types = e.type_ids[: length - 1] + e.type_ids[-1:]
            k = length
        else:
            row_ids, row_types = e.ids, e.type_ids
        ids[i, :k] = row_ids
        mask[i, :k] = 1
        types[i, :k] = row_types
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}, truncated


def pad_id(tokenizer) -> int:
    """The id that fills padded positions: the tokenizer's ``[PAD]`` (BERT's vocabularies) or
    ``<pad>`` (RoBERTa's byte-level BPE), else 0. Padded positions are masked, so the id only
    has to be the one the checkpoint's own tokenizer pads with."""
    for token in ("[PAD]", "<pad>"):
        found = tokenizer.token_to_id(token)
        if found is not None:
            return found
    return 0


def bucket_lengths(max_length: int, smallest: int = 8) -> tuple[int, ...]:
    """The padded lengths batches may have: ``smallest``, doubling, then ``max_length``.

    Example:
      >>> bucket_lengths(100)
      (8, 16, 32, 64, 100)
    """
    out, n = [], smallest
    while n < max_length:
        out.append(n)
        n *= 2
    return (*out, max_length)


def bucket_for(length: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds ``length`` tokens."""
    for b in buckets:
        if b >= length:
            return b
    raise ValueError(f"{length} tokens exceed the largest bucket {buckets[-1]}.")


def padding_waste(lengths: np.ndarray, widths: np.ndarray) -> float:
    """Fraction of fed token slots that are padding: ``lengths [batches, rows]`` real tokens per
    row, ``widths [batches]`` each batch's padded length."""
    lengths = np.asarray(lengths)
    fed = float(np.sum(widths) * lengths.shape[1])
    return 1.0 - float(lengths.sum()) / fed if fed else 0.0


def token_arrays(arrays: dict[str, np.ndarray]) -> tuple[str, ...]:
    """The per-token arrays of a text batch, what a length bucket cuts: the tokenizer's arrays
    (:data:`TOKEN_KEYS`), an audio batch's samples (``input_values``), per-token labels (a
    tagger's integer ``label [B, T]``) and per-token arrays ``[B, T, ...]`` (a feature cache's
    activations, question answering's character offsets). Empty for a batch without text.
    Another ``[B, H]`` array (soft labels) is never cut, even when ``H == T``."""
    mask = arrays.get("attention_mask")
    if mask is None:
        return ()

    def per_token(k, v) -> bool:
        tags = k == "label" and np.issubdtype(np.asarray(v).dtype, np.integer)
        waveform = k == "input_values"  # audio: the mask counts its samples
        return k in TOKEN_KEYS or tags or waveform or np.ndim(v) > np.ndim(mask)

    return tuple(
        k
        for k, v in arrays.items()
        if np.shape(v)[: np.ndim(mask)] == np.shape(mask) and per_token(k, v)
    )


def split_back(
    encoded: dict[str, np.ndarray], sizes: Sequence[tuple[str, int]]
) -> dict[str, dict[str, np.ndarray]]:
    """Arrays encoded for several splits at once (one shared padded length), cut back into
    ``{split: arrays}`` by ``sizes``: ``(split, rows)`` in the order they were concatenated."""
    out, start = {}, 0
    for split, rows in sizes:
        out[split] = {k: v[start : start + rows] for k, v in encoded.items()}
        start += rows
    return out
