"""Attention core forward+backward on CPU: jaxtl's formulation against alternatives, one run.

    python benchmarks/attention_variants.py [--batch 32 --seq 128 --heads 12 --head-dim 32]

Prints the median time of ``jax.grad`` through each variant for one layer at MiniLM's shape,
and its ratio to jaxtl's current formulation (einsum on [B, T, H, D], where-mask, float32
softmax, attention dropout 0.1). Used to decide where the step-time gap to PyTorch comes from
(see benchmarks/README.md).
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args()
    b, t, h, d = a.batch, a.seq, a.heads, a.head_dim
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, d), np.float32)) for _ in range(3))
    mask = jnp.asarray(rng.random((b, t)) > 0.2)
    key = jax.random.PRNGKey(0)

    def scores(q, k, spec):
        s = jnp.einsum(spec, q, k) * d**-0.5
        return jnp.where(mask[:, None, None, :], s, jnp.finfo(s.dtype).min)

    def dropout(p):
        keep = jax.random.bernoulli(key, 0.9, p.shape)
        return jnp.where(keep, p / 0.9, 0.0)

    def current(q, k, v):  # jaxtl.models.bert.BertSelfAttention, train mode
        p = dropout(jax.nn.softmax(scores(q, k, "bqhd,bkhd->bhqk"), -1))
        return jnp.einsum("bhqk,bkhd->bqhd", p, v)

    def head_major(q, k, v):  # transpose to [B, H, T, D] first
        q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
        p = dropout(jax.nn.softmax(scores(q, k, "bhqd,bhkd->bhqk"), -1))
        return jnp.einsum("bhqk,bhkd->bhqd", p, v).transpose(0, 2, 1, 3)

    def no_dropout(q, k, v):  # eval mode / attention_probs_dropout_prob = 0
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores(q, k, "bqhd,bkhd->bhqk"), -1), v)

    def fused(q, k, v):  # jax.nn.dot_product_attention (has no dropout)
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :])

    times = {}
    for name, f in [
        ("current (dropout 0.1)", current),
        ("head-major (dropout 0.1)", head_major),
        ("current, no dropout", no_dropout),
        ("dot_product_attention, no dropout", fused),
    ]:
        g = jax.jit(jax.grad(lambda q, k, v, f=f: f(q, k, v).sum(), argnums=(0, 1, 2)))
        jax.block_until_ready(g(q, k, v))
        ts = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(g(q, k, v))
            ts.append(time.perf_counter() - t0)
        times[name] = float(np.median(ts))
    base = times["current (dropout 0.1)"]
    print(f"attention fwd+bwd, one layer, B={b} T={t} H={h} D={d}, {jax.devices()[0].platform}")
    for name, s in times.items():
        print(f"  {name:36s} {1000 * s:8.1f} ms   current / this = {base / s:.2f}")


if __name__ == "__main__":
    main()
