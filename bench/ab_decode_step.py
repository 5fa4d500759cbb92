"""A/B of decode-step variants in one process: the residual add + RMSNorm kernel
(``decode.norms_in_kernel``) on or off, the decode kernel's launch rule (the default
``DecodeConfig``, 3 stages / about 256 programs, or 2 stages / about 384 programs, the best of
an isolated H200 sweep, ``tune_decode_h200.json``), "XLA lengths" (the three-launch step with
the write predicate and the lengths' update back in XLA, as before a03e6ff: two one-thread
kernels per layer more), "pool apart" (the pooling kernel as its own launch), "pool fused"
(the pooling in the first attention program of each sequence and kv head: the three-launch
step, the default until the thirteenth session) and "XLA lengths, pool apart" (the step as it
was before the ninth session), "rope in attention" and "one launch"
(``pallas_decode_fused.STEP_LAUNCHES`` "rope" and "all": the RoPE and ring write, and the
combine too, inside the attention's launch; "one launch" is the shipped step),
LLaMA-2-7B shapes, bf16, batch 1, CCA at
``--context`` tokens (synthetic cache), random weights. ``--xla NAME=OPTION=VALUE,...`` adds a
variant of the shipped step compiled with XLA options (``Lowered.compile(compiler_options=)``,
e.g. ``pdl-on=xla_gpu_enable_pdl=true``); ``--variants`` picks which built-in ones run. Every
variant sets ``STEP_LAUNCHES`` itself (None but for the last two).

    PYTHONPATH=. python bench/ab_decode_step.py --out $OUT/ab_decode_step.json    # ~2 min, GPU
    PYTHONPATH=. python bench/ab_decode_step.py --quick                           # CPU check

Every round runs PIPELINE steps of each variant back to back in turn (drift hits all alike);
reports the median ms per step of each variant over the rounds and the bytes-over-bandwidth
bound.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import re
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
from kernels.cca import pallas_decode, pallas_decode_fused, pallas_rope_append


def _xla_lengths(rope_append):
    """``rope_append`` as it was called before the kernel took the lengths over (a03e6ff): the
    write predicate and the new lengths as XLA ops on the layer's own lengths, two one-thread
    kernels per layer. (The attention kernels after it still get the step's positions, layer
    0's lengths, as in the shipped step: equal values, so only buffer sharing could differ.)"""
    def call(qkv, cos, sin, k_buf, v_buf, positions, n_valid, lengths=None, *, num_heads,
             modulus=None, limit=None, interpret=None):
        own = positions if lengths is None else lengths
        limit = k_buf.shape[1] if limit is None else limit
        write = ((n_valid > 0) & (own < limit)).astype(jnp.int32)
        q, k, v, k_buf, v_buf, _ = rope_append(
            qkv, cos, sin, k_buf, v_buf, own, write, None, num_heads=num_heads, modulus=modulus,
            limit=jnp.iinfo(jnp.int32).max, interpret=interpret)
        return q, k, v, k_buf, v_buf, own + n_valid
    return call


@contextlib.contextmanager
def variant(norm_kernel: bool, sweep_launch: bool, xla_lengths: bool = False,
            pool_apart: bool = False, pool_fused: bool = False, step_launches: str | None = None):
    """Patches what the step reads at trace time; restores it after compiling."""
    saved = (decode.norms_in_kernel, pallas_decode.TARGET_PROGRAMS,
             pallas_decode.default_decode_config, pallas_rope_append.rope_append,
             pallas_decode.fuses_pooling, pallas_decode.POOL_IN_ATTENTION,
             pallas_decode_fused.STEP_LAUNCHES)
    pallas_decode_fused.STEP_LAUNCHES = step_launches
    if pool_fused:  # the pooling in the first attention program of each (sequence, kv head)
        pallas_decode.POOL_IN_ATTENTION = True
    if xla_lengths:
        pallas_rope_append.rope_append = _xla_lengths(pallas_rope_append.rope_append)
    if pool_apart:  # the pooling kernel as its own launch, before the attention's
        pallas_decode.fuses_pooling = lambda *a, **k: False
    if not norm_kernel:
        decode.norms_in_kernel = lambda *a, **k: False
    if sweep_launch:
        pallas_decode.TARGET_PROGRAMS = 384
        pallas_decode.default_decode_config = lambda d, itemsize: (
            pallas_decode.DecodeConfig(block_k=32, num_warps=4, num_stages=2) if itemsize >= 4
            else pallas_decode.DecodeConfig(block_k=64, num_warps=4, num_stages=2))
    try:
        yield
    finally:
        (decode.norms_in_kernel, pallas_decode.TARGET_PROGRAMS,
         pallas_decode.default_decode_config, pallas_rope_append.rope_append,
         pallas_decode.fuses_pooling, pallas_decode.POOL_IN_ATTENTION,
         pallas_decode_fused.STEP_LAUNCHES) = saved


def kernel_counts(hlo: str) -> dict:
    """What a compiled step launches, read off its optimized HLO's entry computation: fusions
    by kind (kLoop, kInput: XLA's own kernels, e.g. split-K reductions; kCustom: GEMMs and the
    like), custom calls (the Pallas kernels) and copies."""
    starts = [m.start() for m in re.finditer(r"^ENTRY ", hlo, re.M)]
    entry = hlo[starts[-1]:] if starts else ""
    counts = collections.Counter(re.findall(r" fusion\(.*?kind=(k\w+)", entry))
    counts["custom-call"] = len(re.findall(r" custom-call\(", entry))
    counts["copy"] = len(re.findall(r" copy\(", entry))
    return dict(counts)


VARIANTS = {"norm kernel, 3 stages/256": (True, False), "XLA norms, 3 stages/256": (False, False),
            "norm kernel, 2 stages/384": (True, True), "XLA norms, 2 stages/384": (False, True),
            "XLA lengths": (True, False, True), "pool apart": (True, False, False, True),
            "XLA lengths, pool apart": (True, False, True, True),
            "pool fused": (True, False, False, False, True),
            "rope in attention": (True, False, False, False, True, "rope"),
            "one launch": (True, False, False, False, True, "all")}


def _option(text: str) -> tuple[str, object]:
    """'name=value' -> (name, value), with true/false and integers converted."""
    name, _, value = text.partition("=")
    if not name or not value:
        raise SystemExit(f"--xla options are NAME=VALUE pairs; got {text!r}")
    low = value.lower()
    if low in ("true", "false"):
        return name, low == "true"
    return name, int(value) if value.lstrip("-").isdigit() else value


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=None, help="tokens held (default 131072)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="tiny model, CPU, interpreted kernels")
    ap.add_argument("--variants", default=";".join(VARIANTS),
                    help="built-in variants to run, separated by ';' ('' for none)")
    ap.add_argument("--xla", action="append", default=[], metavar="NAME=OPTION=VALUE,...",
                    help="a variant of the shipped step compiled with these XLA options")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    names = list(filter(None, args.variants.split(";")))
    if unknown := set(names) - set(VARIANTS):
        raise SystemExit(f"unknown variants {sorted(unknown)}; built-in: {list(VARIANTS)}")
    chosen = {n: (VARIANTS[n], None) for n in names}
    for spec in args.xla:
        name, _, opts = spec.partition("=")
        chosen[name] = (VARIANTS["one launch"],  # the shipped step
                        dict(_option(o) for o in opts.split(",") if o))
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
    for name, (flags, options) in chosen.items():
        with variant(*flags):
            t0 = time.perf_counter()
            steps[name] = decode_fn(graphdef).lower(state, tokens, cache).compile(options)
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
    rows = {n: {"ms": statistics.median(v[1:]), "runs_ms": v[1:],
                "kernels": kernel_counts(steps[n].as_text())} for n, v in times.items()}
    result = {"env": environment(), "peaks": peaks, "context": t, "bytes_read": read,
              "xla_options": {n: o for n, (_, o) in chosen.items() if o},
              "bound_ms": read / bw / 1e6 if bw else None, "variants": rows}
    for n, r in rows.items():
        bound = result["bound_ms"]
        frac = f"  {bound / r['ms']:.1%} of the {bound:.2f} ms bound" if bound else ""
        print(f"{n:28s} {r['ms']:.3f} ms{frac}  kernels {r['kernels']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
