"""A/B of ReAttention decode-step configurations, one GPU process, alternating rounds:

    PYTHONPATH=. python bench/ab_reattention_decode.py --out $OUT/ab_decode.json   # H200, ~1 min

One decode step (``pallas.reattention_decode``, bf16, the authors' defaults) of a 32 q / 8 kv
head layer: d = 128 at 16K-128K (LLaMA-3-8B layout) and d = 64 at 64K and 1M (a 1B-class layer).
Only the ``Config`` differs between variants. ``ms`` is the median per step of back-to-back calls
(one wait per round: a serving loop's view); ``gpu_us`` the kernels' summed device time per step
from the profiler (``bench/device_trace.py``), so ``ms`` minus it is time the GPU waited for the
host; ``kernels`` each variant's kernels by device time; ``rel_vs_first`` each variant's output
against the first variant's. ``--baselines xla|cudnn`` times full attention's decode over the
same cache in the same rounds (``jax.nn.dot_product_attention``, one query).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from unittest import mock

import jax
import jax.numpy as jnp

from bench.common import time_alternating, write_rows
from bench.device_trace import op_table
from kernels.reattention import pallas, pallas_combine
from kernels.reattention.params import Selection, default_config

VARIANTS = {
    "default": {},
    # The key splits merged by XLA (three launches) instead of ``pallas_combine``'s kernel.
    "xla_merge": {"_patch": (pallas_combine, "applies", lambda rows, r: False)},
    "attn_splits_1": dict(attn_splits=1),
    "score_c2": dict(mgpu_consumers=2),
    "score_splits_16": dict(score_splits=16),
    "score_splits_32": dict(score_splits=32),
    "score_splits_64": dict(score_splits=64),
    "attn_bk64": dict(attn_block_k=64),
    "attn_bk64_s2": dict(attn_block_k=64, attn_stages=2),
    "attn_splits_64": dict(attn_splits=64),
    "score_triton": dict(score_lowering="triton"),
}
LAYERS = {"16k_d128": (16384, 128), "32k_d128": (32768, 128), "128k_d128": (131072, 128),
          "64k_d64": (65536, 64), "1m_d64": (1 << 20, 64)}


def patched(patch):
    """``unittest.mock.patch.object(module, name, value)`` of a variant's ``_patch`` for the
    block (its step is traced inside it; later calls reuse that trace); None: nothing."""
    return contextlib.nullcontext() if patch is None else mock.patch.object(*patch)


def full_decode(implementation: str):
    """Full attention's decode step: the one query against every cached key."""
    return jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
        q[:, None], k, v, implementation=implementation)[:, 0])


def measure(name: str, variants: list, rounds: int, baselines: tuple = ()) -> dict:
    context, d = LAYERS[name]
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(ks[0], (1, 32, d), jnp.bfloat16)
    k = jax.random.normal(ks[1], (1, context, 8, d), jnp.bfloat16)
    v = jax.random.normal(ks[2], (1, context, 8, d), jnp.bfloat16)
    lengths = jnp.full((1,), context, jnp.int32)
    sel = dataclasses.asdict(Selection())
    del sel["chunk_size"]
    base = default_config(d, 2, 4)
    row = {"layer": name, "context": context, "head_dim": d, "errors": {}, "gpu_us": {},
           "kernels": {}}
    fs, outs = {}, {}
    for n in variants:
        fields = dict(VARIANTS[n])
        patch = fields.pop("_patch", None)  # (module, name, value) while the step is traced
        config = dataclasses.replace(base, **fields)
        f = jax.jit(lambda q, k, v, n_, c=config: pallas.reattention_decode(q, k, v, n_,
                                                                            config=c, **sel))
        try:
            with patched(patch):
                outs[n] = jax.block_until_ready(f(q, k, v, lengths))
            fs[n] = (f, (q, k, v, lengths))
        except Exception as e:  # a variant that does not compile is a result too
            row["errors"][n] = f"{type(e).__name__}: {str(e)[:400]}"
    for impl in baselines:
        f = full_decode(impl)
        try:
            jax.block_until_ready(f(q, k, v))
            fs[f"full_{impl}"] = (f, (q, k, v))
        except Exception as e:
            row["errors"][f"full_{impl}"] = f"{type(e).__name__}: {str(e)[:400]}"
    row["ms"] = time_alternating(fs, calls=50, rounds=rounds)
    for n, (f, a) in fs.items():
        lines = [x for key, x in op_table(lambda f=f, a=a: f(*a), steps=20)["lines"].items()
                 if "Stream" in key]
        busiest = max(lines, key=lambda x: x["us_per_step"], default=None)
        row["gpu_us"][n] = busiest and busiest["us_per_step"]
        row["kernels"][n] = busiest and [(x["name"][:60], x["calls_per_step"],
                                          round(x["us_per_step"], 2)) for x in busiest["top"]]
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
    ap.add_argument("--baselines", default="", help="full attention's decode too: xla|cudnn")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    baselines = tuple(b for b in args.baselines.split("|") if b)
    rows = [measure(n, args.variants.split("|"), args.rounds, baselines)
            for n in args.layers.split("|")]
    write_rows(rows, __doc__.splitlines()[0], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
