"""Text generation from causal LMs (GPT-2), with a KV cache: greedy, temperature, top-k, top-p.

:func:`generate` continues a batch of prompts. The prompts may have different lengths: pass the
padded ``input_ids`` with their ``attention_mask`` (left or right padding; rows are moved to left
padding first, as transformers expects for decoders). Each row's positions count its real
tokens only, so a padded row continues exactly as it would alone.

With the cache (the default), the prompt runs once (the *prefill*), writing every layer's keys
and values into a buffer with room for ``max_new_tokens`` more; each new token then costs one
token's forward pass over the cached keys (O(T) attention instead of O(T^2)). Without it
(``use_cache=False``), every step re-runs the whole fixed-size buffer, which is what the cache
saves (``benchmarks/generation.py`` measures both). Either way the whole loop is one jitted
``lax.while_loop``: one compile per prompt shape and settings, none per token, and the loop
stops as soon as every row has produced an end-of-sequence token.

Sampling is reproducible: the token at step ``i`` draws from ``fold_in(PRNGKey(seed), i)``.
Families opt in by putting a :class:`jaxtl.models.base.DecoderInfo` in
``extras["decoder"]``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtl.models.base import DecoderInfo, LoadedModel

__all__ = ["Sampling", "generate", "left_pad"]


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from the logits.

    ``temperature=0`` is greedy decoding (argmax; ``top_k``/``top_p`` are refused there, as they
    would change nothing). Otherwise the
    logits are divided by ``temperature``, cut to the ``top_k`` most likely tokens and then to
    the smallest set whose probability reaches ``top_p`` (nucleus), and one token is drawn.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(
                f"temperature (--temperature) must be >= 0 (0 is greedy), got {self.temperature}."
            )
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k (--top-k) must be >= 1, got {self.top_k}.")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p (--top-p) must be in (0, 1], got {self.top_p}.")
        if self.greedy and (self.top_k is not None or self.top_p is not None):
            raise ValueError(
                "top_k / top_p (--top-k / --top-p) shape sampling, and temperature=0 "
                "(--temperature, 0 by default) decodes greedily; give a temperature > 0 (e.g. "
                "--temperature 0.8) to sample, or drop them."
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def left_pad(
    input_ids: np.ndarray, attention_mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """The rows moved to left padding (pads first, real tokens in order after them).

    Example:
      >>> ids, mask = left_pad(np.array([[5, 6, 0]]), np.array([[1, 1, 0]]))
      >>> ids.tolist(), mask.tolist()
      ([[0, 5, 6]], [[0, 1, 1]])
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {ids.shape}.")
    if attention_mask is None:
        return ids.astype(np.int32), np.ones(ids.shape, np.int32)
    mask = np.asarray(attention_mask)
    if mask.shape != ids.shape:
        raise ValueError(
            f"attention_mask has shape {mask.shape} but input_ids has {ids.shape}; they must match."
        )
    if not np.isin(mask, (0, 1)).all():
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token).")
    if (mask.sum(1) == 0).any():
        raise ValueError(f"Rows {np.flatnonzero(mask.sum(1) == 0).tolist()} have no tokens.")
    order = np.argsort(mask, axis=1, kind="stable")  # zeros first, each group in order
    take = functools.partial(np.take_along_axis, indices=order, axis=1)
    return take(ids).astype(np.int32), take(mask).astype(np.int32)


def generate(
    model: LoadedModel,
    params: Mapping[str, Any] | None,
    input_ids: np.ndarray | Sequence[Sequence[int]],
    attention_mask: np.ndarray | None = None,
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    seed: int = 0,
    eos_token_id: int | Sequence[int] | None | str = "config",
    pad_token_id: int | None = None,
    use_cache: bool = True,
) -> np.ndarray:
    """Continues each prompt by up to ``max_new_tokens`` tokens.

    Args:
      model: a causal LM from ``jaxtl.load(..., task="causal_lm")``.
      params: its params (e.g. a fine-tuned ``state.params``); default ``model.params``. A
        LoRA model's adapters are merged into their kernels first.
      input_ids: ``[B, T]`` prompt tokens, padded where ``attention_mask`` is 0.
      attention_mask: ``[B, T]`` 1 for tokens, 0 for padding; ``None`` when nothing is padded.
      max_new_tokens: how many tokens to append at most.
      sampling: greedy (the default) or how to sample (:class:`Sampling`).
      seed: the sampling seed (unused when greedy).
      eos_token_id: a row stops after producing this token (or any of these); ``"config"``
        (the default): the model's config.json value; ``None``: never stop early.
      pad_token_id: written after a row has stopped; default the config's pad id, else the
        (first) eos id, else 0.
      use_cache: keep every layer's keys and values (fast); ``False`` re-runs the whole
        sequence for each token (for comparison).

    Returns:
      ``[B, T + max_new_tokens]`` int32: the left-padded prompts (see :func:`left_pad`), then
      the new tokens, then ``pad_token_id`` after a row's end-of-sequence token.
    """
    info = model.extras.get("decoder")
    if not isinstance(info, DecoderInfo):
        raise ValueError(
            f"generate needs a causal LM: load it with task='causal_lm' (--task causal_lm); "
            f"this {model.family} model was loaded with task={model.task!r}."
        )
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens (--max-new-tokens) must be >= 1, got {max_new_tokens}.")
    try:
        ids = np.asarray(input_ids)
    except ValueError as e:  # numpy's "inhomogeneous shape": rows of different lengths
        raise ValueError(
            "input_ids rows have different lengths; pad them to one length and pass "
            "attention_mask (1 for a token, 0 for padding), e.g. a tokenizer's "
            "padding=True output."
        ) from e
    ids, mask = left_pad(ids, attention_mask)
    total = ids.shape[1] + max_new_tokens
    if info.max_length is not None and total > info.max_length:
        raise ValueError(
            f"prompt length {ids.shape[1]} + max_new_tokens {max_new_tokens} = {total} exceeds "
            f"the model's {info.max_length} positions; shorten the prompt or max_new_tokens "
            "(--max-new-tokens)."
        )
    if isinstance(eos_token_id, str) and eos_token_id != "config":
        raise ValueError(
            f"eos_token_id: an id, a list of ids, None or 'config', not {eos_token_id!r}."
        )
    eos = info.eos_token_id if isinstance(eos_token_id, str) else eos_token_id
    eos = () if eos is None else tuple(np.atleast_1d(eos).astype(int).tolist())
    if pad_token_id is None:
        pad_token_id = info.pad_token_id if info.pad_token_id is not None else (eos or (0,))[0]
    _check_vocabulary(ids, mask, int(pad_token_id), getattr(model.config, "vocab_size", None))
    params = model.params if params is None else params
    if "lora" in model.extras:  # a LoRA model decodes with its adapters folded into the kernels
        from jaxtl.transfer import lora as tl

        params = tl.merged(params, model.extras["lora"])
    key = jax.random.PRNGKey(seed)
    out = _generate(
        model.module,
        info.init_cache,
        params,
        jnp.asarray(ids),
        jnp.asarray(mask),
        key,
        jnp.float32(max(sampling.temperature, 1e-6)),
        jnp.float32(sampling.top_p or 1.0),
        max_new_tokens=max_new_tokens,
        greedy=sampling.greedy,
        top_k=sampling.top_k,
        eos=eos,
        pad=int(pad_token_id),
        use_cache=use_cache,
    )
    return np.asarray(out)


def _check_vocabulary(ids: np.ndarray, mask: np.ndarray, pad: int, vocab: int | None) -> None:
    """Every prompt token and the pad id have a row in the embedding table: an id past it
    would be clamped to another token's row (XLA's gather), and the output be silently wrong."""
    if vocab is None:
        return
    real = ids[mask == 1]
    bad = np.unique(real[(real < 0) | (real >= vocab)])
    if bad.size:
        raise ValueError(
            f"input_ids (--token-ids) hold {bad[:5].tolist()}, outside the model's {vocab} token "
            f"ids [0, {vocab}); tokenize the prompts with the model's own tokenizer "
            "(model.extras['tokenizer'], or --prompt TEXT)."
        )
    if not 0 <= pad < vocab:
        raise ValueError(
            f"pad_token_id={pad} is outside the model's {vocab} token ids [0, {vocab}); pass "
            "one of its ids (e.g. its eos id), or leave it to the config's."
        )


def filter_logits(logits, temperature, top_p, *, top_k: int | None) -> jax.Array:
    """Logits ``[B, V]`` scaled by ``1 / temperature``, with the tokens outside the ``top_k`` and
    then outside the nucleus of probability ``top_p`` set to the lowest float (never drawn):
    transformers' temperature, top-k and top-p warpers, in that order."""
    logits = logits.astype(jnp.float32) / temperature
    low = jnp.finfo(jnp.float32).min
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, low, logits)
    # Nucleus: the most likely tokens until their probability reaches top_p (the token that
    # crosses it included; the most likely token always). top_p=1 keeps everything.
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    kept = jnp.sum(jnp.cumsum(probs, axis=-1) - probs < top_p, axis=-1, keepdims=True)  # >= 1
    cutoff = jnp.take_along_axis(ordered, kept - 1, axis=-1)
    return jnp.where((logits < cutoff) & (top_p < 1), low, logits)


def choose(logits, key, temperature, top_p, *, greedy: bool, top_k: int | None) -> jax.Array:
    """The next token of each row from its logits ``[B, V]`` (see :class:`Sampling`)."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits, temperature, top_p, top_k=top_k)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _positions(mask: jax.Array) -> jax.Array:
    """Each token's position among its row's real tokens (0 for pads, which nothing sees)."""
    return jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)


def _stop(token, done, eos, pad):
    """``token`` where the row is still going, ``pad`` where it stopped; the new ``done``."""
    token = jnp.where(done, pad, token)
    if eos:
        done = done | jnp.isin(token, jnp.asarray(eos))
    return token, done


@functools.partial(
    jax.jit,
    static_argnums=(0, 1),
    static_argnames=("max_new_tokens", "greedy", "top_k", "eos", "pad", "use_cache"),
)
def _generate(
    module,
    init_cache,
    params,
    ids,
    mask,
    key,
    temperature,
    top_p,
    *,
    max_new_tokens: int,
    greedy: bool,
    top_k: int | None,
    eos: tuple[int, ...],
    pad: int,
    use_cache: bool,
):
    batch, length = ids.shape
    n = max_new_tokens
    # The buffer: the prompts, then the new tokens; each slot's key is valid from when it is
    # written (causal attention keeps the later slots out), and its position follows its row's
    # real tokens.
    slots = jnp.concatenate([mask, jnp.ones((batch, n), mask.dtype)], axis=1)
    positions = _positions(slots)
    out = jnp.concatenate([ids, jnp.full((batch, n), pad, jnp.int32)], axis=1)

    def decode(tokens, start, cache):
        """Logits ``[B, V]`` after ``tokens``, written to the cache at slot ``start``."""
        width = tokens.shape[1]
        logits, cache = module.apply(
            {"params": params},
            tokens,
            slots,
            positions=jax.lax.dynamic_slice_in_dim(positions, start, width, 1),
            cache=cache,
            cache_index=start,
            logits_at=width - 1,
        )
        return logits[:, -1], cache

    def recompute(buffer, slot):
        """Logits ``[B, V]`` after slot ``slot``, from the whole buffer (no cache)."""
        logits, _ = module.apply(
            {"params": params}, buffer, slots, positions=positions, logits_at=slot
        )
        return logits[:, -1]

    def pick(i, logits, done):
        key_i = jax.random.fold_in(key, i)
        token = choose(logits, key_i, temperature, top_p, greedy=greedy, top_k=top_k)
        return _stop(token, done, eos, pad)

    if use_cache:  # prefill: every prompt token's keys and values into the cache at once
        cache = init_cache(batch, length + n, getattr(module, "dtype", jnp.float32))
        logits, cache = decode(ids, 0, cache)
    else:
        cache, logits = None, recompute(out, length - 1)
    token, done = pick(0, logits, jnp.zeros(batch, bool))
    out = out.at[:, length].set(token)

    def more(carry):
        i, done = carry[:2]
        return (i < n) & ~jnp.all(done)

    def step(carry):
        i, done, out, cache = carry
        if use_cache:
            previous = jax.lax.dynamic_slice_in_dim(out, length + i - 1, 1, axis=1)
            logits, cache = decode(previous, length + i - 1, cache)
        else:
            logits = recompute(out, length + i - 1)
        token, done = pick(i, logits, done)
        out = jax.lax.dynamic_update_index_in_dim(out, token, length + i, axis=1)
        return i + 1, done, out, cache

    return jax.lax.while_loop(more, step, (jnp.int32(1), done, out, cache))[2]
