"""A/B of ReAttention decode-step configurations, one GPU process, alternating rounds:

    PYTHONPATH=. python bench/ab_reattention_decode.py --out $OUT/ab_decode.json   # H200, ~1 min

One decode step (``pallas.reattention_decode``, bf16, the authors' defaults) of a 32 q / 8 kv
head layer: d = 128 at 128K (LLaMA-3-8B layout) and d = 64 at 1M (a 1B-class layer). Only the
``Config`` differs between variants. ``ms`` is the median per step of back-to-back calls (one
wait per round: a serving loop's view); ``gpu_us`` the kernels' summed device time per step from
the profiler (``bench/device_trace.py``), so ``ms`` minus it is time the GPU waited for the
host; ``rel_vs_first`` each variant's output against the first variant's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import jax
import jax.numpy as jnp

from bench.common import time_alternating, write_rows
from bench.device_trace import op_table
from kernels.reattention import pallas
from kernels.reattention.params import Selection, default_config

VARIANTS = {
    "default": {},
    "attn_splits_1": dict(attn_splits=1),
    "score_c2": dict(mgpu_consumers=2),
    "score_triton": dict(score_lowering="triton"),
}
LAYERS = {"128k_d128": (131072, 128), "1m_d64": (1 << 20, 64)}


def measure(name: str, variants: dict, rounds: int) -> dict:
    context, d = LAYERS[name]
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(ks[0], (1, 32, d), jnp.bfloat16)
    k = jax.random.normal(ks[1], (1, context, 8, d), jnp.bfloat16)
    v = jax.random.normal(ks[2], (1, context, 8, d), jnp.bfloat16)
    lengths = jnp.full((1,), context, jnp.int32)
    sel = dataclasses.asdict(Selection())
    del sel["chunk_size"]
    base = default_config(d, 2, 4)
    row = {"layer": name, "context": context, "head_dim": d, "errors": {}, "gpu_us": {}}
    fs, outs = {}, {}
    for n in variants:
        config = dataclasses.replace(base, **VARIANTS[n])
        f = jax.jit(lambda q, k, v, n_, c=config: pallas.reattention_decode(q, k, v, n_,
                                                                            config=c, **sel))
        try:
            outs[n] = jax.block_until_ready(f(q, k, v, lengths))
            fs[n] = (f, (q, k, v, lengths))
        except Exception as e:  # a variant that does not compile is a result too
            row["errors"][n] = f"{type(e).__name__}: {str(e)[:400]}"
    row["ms"] = time_alternating(fs, calls=50, rounds=rounds)
    for n, (f, a) in fs.items():
        lines = op_table(lambda f=f, a=a: f(*a), steps=20)["lines"].items()
        row["gpu_us"][n] = max((x["us_per_step"] for key, x in lines if "Stream" in key),
                               default=None)
    first = outs[next(iter(outs))].astype(jnp.float32)
    row["rel_vs_first"] = {n: float(jnp.linalg.norm(o.astype(jnp.float32) - first)
                                    / jnp.linalg.norm(first)) for n, o in outs.items()}
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="|".join(LAYERS))
    ap.add_argument("--variants", default="|".join(VARIANTS), help="names joined by '|'")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = [measure(n, args.variants.split("|"), args.rounds) for n in args.layers.split("|")]
    write_rows(rows, __doc__.splitlines()[0], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
