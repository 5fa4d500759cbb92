"""A/B of decode-step variants in one process, LLaMA-2-7B shapes, bf16, batch 1, CCA at
``--context`` tokens (synthetic cache), random weights. Two sets (``--set``):

* ``launches`` (default): the CCA step's attention launches. Shipped: two (the attention kernel
  rotates q and writes the ring; the combine rotates again and pools,
  ``pallas_decode.cca_decode_step_unrotated``); three (RoPE + append as its own kernel, then
  attention and combine + pooling, ``cca_decode_step``); four (the pooling as its own kernel too,
  the layout before 2026-12-04).
* ``norms``: the residual add + RMSNorm kernel (``decode.norms_in_kernel``) on or off, and the
  decode kernel's launch rule (the default ``DecodeConfig``, 3 stages / about 256 programs, or 2
  stages / about 384 programs, the best of an isolated H200 sweep, ``tune_decode_h200.json``);
  ``ab_decode_step_h200.json`` is this set.

    PYTHONPATH=. python bench/ab_decode_step.py --out $OUT/ab_decode_step.json    # ~2 min, GPU
    PYTHONPATH=. python bench/ab_decode_step.py --quick                           # CPU check

One process compiles every variant, so XLA's GEMM autotuning (cached per process) is the same
for all of them; across processes its choices vary by more than these differences. Every round
runs PIPELINE steps of each variant back to back in turn (drift hits all alike); reports the
median ms per step of each variant over the rounds and the bytes-over-bandwidth bound.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from bench.bench_decode import (PIPELINE, base_config, cache_bytes_read, decode_fn, graphdef_of,
                                random_state, synthetic_cache, weight_bytes_read)
from bench.common import environment, measure_peaks
from jax_cca import decode
from kernels.cca import pallas_decode, pallas_decode_pool


@contextlib.contextmanager
def patched(module, **attrs):
    """Sets module attributes for the duration (the step reads them at trace time)."""
    saved = {name: getattr(module, name) for name in attrs}
    for name, value in attrs.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def _pool_then_attend(q, k, v, core_k, core_v, ring_k, ring_v, positions, n_valid, *,
                      group_size, local_window, pooling):
    """``cca_decode_step`` as the pooling kernel, then the attention kernel (four launches)."""
    core_k, core_v = pallas_decode_pool.pool_decode_step(
        q, ring_k, ring_v, core_k, core_v, positions, n_valid, group_size=group_size,
        pooling=pooling)
    out = pallas_decode.cca_decode_attention(q, k, v, core_k, core_v, ring_k, ring_v, positions,
                                             group_size=group_size, local_window=local_window)
    return out, core_k, core_v


def _sweep_launch(d, itemsize):
    return pallas_decode.DecodeConfig(block_k=32 if itemsize >= 4 else 64, num_warps=4,
                                      num_stages=2)


def _variant(rope_in_attention=True, pool_in_combine=True, norm_kernel=True, sweep=False):
    stack = contextlib.ExitStack()
    if not rope_in_attention:
        stack.enter_context(patched(pallas_decode, rope_in_kernel_supported=lambda *a: False))
    if not pool_in_combine:
        stack.enter_context(patched(pallas_decode, cca_decode_step=_pool_then_attend))
    if not norm_kernel:
        stack.enter_context(patched(decode, norms_in_kernel=lambda *a, **k: False))
    if sweep:
        stack.enter_context(patched(pallas_decode, TARGET_PROGRAMS=384,
                                    default_decode_config=_sweep_launch))
    return stack


VARIANT_SETS = {
    "launches": {
        "2 launches (shipped)": {},
        "3 launches (RoPE + append apart)": dict(rope_in_attention=False),
        "4 launches (pooling apart too)": dict(rope_in_attention=False, pool_in_combine=False),
    },
    "norms": {
        "norm kernel, 3 stages/256": {}, "XLA norms, 3 stages/256": dict(norm_kernel=False),
        "norm kernel, 2 stages/384": dict(sweep=True),
        "XLA norms, 2 stages/384": dict(norm_kernel=False, sweep=True),
    },
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=None, help="tokens held (default 131072)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--set", default="launches", choices=sorted(VARIANT_SETS))
    ap.add_argument("--quick", action="store_true", help="tiny model, CPU, interpreted kernels")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    t = args.context or (100 if args.quick else 131072)
    rounds = args.rounds or (1 if args.quick else 15)
    max_len = t + 64
    config = base_config(args.quick, max_len).replace(attention="cca")
    if args.quick:
        config = config.replace(implementation="pallas")
    graphdef, state = graphdef_of(config), random_state(config)
    cache = synthetic_cache(config, 1, max_len, t)
    tokens = jnp.zeros((1,), jnp.int32)
    steps = {}
    for name, options in VARIANT_SETS[args.set].items():
        with _variant(**options):
            t0 = time.perf_counter()
            steps[name] = decode_fn(graphdef).lower(state, tokens, cache).compile()
            print(f"{name}: compiled in {time.perf_counter() - t0:.1f} s", flush=True)
    times = {n: [] for n in steps}
    per_round = 1 if args.quick else PIPELINE
    for _ in range(rounds + 1):  # the first round warms up
        for name, step in steps.items():
            logits, cache = step(state, tokens, cache)
            jax.block_until_ready(logits)
            t0 = time.perf_counter()
            for _ in range(per_round):
                logits, cache = step(state, tokens, cache)
            jax.block_until_ready((logits, cache))
            times[name].append((time.perf_counter() - t0) * 1e3 / per_round)
    peaks = {} if args.quick else measure_peaks()
    bw = peaks.get("bandwidth_gbps")
    read = weight_bytes_read(config, state, 1) + cache_bytes_read(config, t, max_len)
    rows = {n: {"ms": statistics.median(v[1:]), "runs_ms": v[1:]} for n, v in times.items()}
    result = {"env": environment(), "peaks": peaks, "set": args.set, "context": t,
              "bytes_read": read,
              "bound_ms": read / bw / 1e6 if bw else None, "variants": rows}
    for n, r in rows.items():
        bound = result["bound_ms"]
        frac = f"  {bound / r['ms']:.1%} of the {bound:.2f} ms bound" if bound else ""
        print(f"{n:28s} {r['ms']:.3f} ms{frac}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
