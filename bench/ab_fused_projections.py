"""A/B of the decode step's projections at batch 1: separate q, k, v and gate, up matrices (the
model's layout) against one stored QKV and one gate-up matrix, LLaMA-2-7B shapes, bf16, 32
layers of RMSNorm + projections + SwiGLU + residuals (no attention: it is the same in both):

    PYTHONPATH=. python bench/ab_fused_projections.py --out $OUT/ab_fused.json     # ~1 min

Reports ms per step of each layout and the bytes-over-bandwidth bound of the weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from bench.common import environment, time_alternating

E, F, HQ, HKV, D, LAYERS = 4096, 11008, 32, 32, 128, 32


def _norm(x, w):
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + 1e-5)
    return w * xf.astype(x.dtype)


def layer_separate(x, p):
    h = _norm(x, p["n1"])
    q, k, v = h @ p["q"], h @ p["k"], h @ p["v"]
    x = x + (q + k + v) @ p["o"]  # stands in for attention: uses all three
    h = _norm(x, p["n2"])
    return x + (jax.nn.silu(h @ p["gate"]) * (h @ p["up"])) @ p["down"]


def layer_fused(x, p):
    h = _norm(x, p["n1"])
    qkv = h @ p["qkv"]
    q, k, v = jnp.split(qkv, [HQ * D, (HQ + HKV) * D], axis=-1)
    x = x + (q + k + v) @ p["o"]
    h = _norm(x, p["n2"])
    gu = h @ p["gate_up"]
    return x + (jax.nn.silu(gu[..., :F]) * gu[..., F:]) @ p["down"]


def weights(fused: bool, key):
    layers = []
    for i in range(LAYERS):
        ks = jax.random.split(jax.random.fold_in(key, i), 7)
        w = lambda k, shape: (jax.random.normal(k, shape, jnp.float32) * 0.02).astype(jnp.bfloat16)
        p = {"n1": jnp.ones((E,), jnp.bfloat16), "n2": jnp.ones((E,), jnp.bfloat16),
             "o": w(ks[3], (HQ * D, E)), "down": w(ks[6], (F, E))}
        if fused:
            p["qkv"] = w(ks[0], (E, (HQ + 2 * HKV) * D))
            p["gate_up"] = w(ks[4], (E, 2 * F))
        else:
            p.update(q=w(ks[0], (E, HQ * D)), k=w(ks[1], (E, HKV * D)),
                     v=w(ks[2], (E, HKV * D)), gate=w(ks[4], (E, F)), up=w(ks[5], (E, F)))
        layers.append(p)
    return layers


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    x = jnp.ones((1, E), jnp.bfloat16)
    fns = {}
    for name, layer, fused in (("separate", layer_separate, False), ("fused", layer_fused, True)):
        ps = weights(fused, jax.random.PRNGKey(0))

        def step(x, ps, layer=layer):
            for p in ps:
                x = layer(x, p)
            return x

        fns[name] = (jax.jit(step), ps)
    ms = time_alternating({n: (f, (x, ps)) for n, (f, ps) in fns.items()}, calls=50,
                          rounds=args.rounds)
    nbytes = sum(a.nbytes for a in jax.tree_util.tree_leaves(fns["separate"][1]))
    row = {"weight_bytes": nbytes, **{f"{n}_ms": v for n, v in ms.items()}}
    print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"env": environment(), "row": row}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
