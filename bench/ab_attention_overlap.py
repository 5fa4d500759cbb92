"""A/B of the Mosaic GPU attention schedule: one block at a time against the software pipeline
(each block's softmax against the previous block's P V), one GPU process, alternating rounds:

    PYTHONPATH=. python bench/ab_attention_overlap.py --out $OUT/ab_overlap.json  # H100, ~4 min

* CCA: the forward kernel alone (``pallas_mgpu.forward``, ``MgpuConfig.overlap``; and
  ``overlap_free``: pipelined without the consumers' turns, ``MgpuConfig.pingpong``), g = 16,
  w = 1024, 32 query heads, d = 128, bf16, at 32K MHA and 128K MHA / GQA; ``tflops`` counts
  CCA's work (``bench.bench_cca``'s count). ``same_bits``: each variant's outputs against
  ``block``'s, exactly.
* ReAttention: the whole prefill op with block picks (``key_block`` = span = 32, the authors'
  other values) as ``RE_VARIANTS`` (``--re-variants``): ``Config.mgpu_attend_overlap``, and
  the selection's former paths (``select_scatter``, ``select_sort``: ``Config.block_select``;
  the default keeps the blocks by the threshold kernel), ``same_bits`` against ``block``'s,
  and against cuDNN at equal attended length (T
  queries over the keys the last query attends, as ``bench_reattention``), at 32K-128K with 32
  and 8 kv heads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import jax
import numpy as np

from bench.ab_reattention_attend import inputs
from bench.common import time_alternating, write_rows
from kernels.cca import pallas_mgpu
from kernels.cca import reference as cca_reference
from kernels.cca.pallas_common import pad_to
from kernels.reattention import pallas as re_pallas
from kernels.reattention import reference as re_reference
from kernels.reattention.params import Selection, default_config


def cca_flops(t: int, hq: int, d: int, g: int, w: int) -> float:
    """4 d per attended (query, key) pair, core tokens and raw keys (``bench_cca``'s count
    without the pooling, which this kernel does not do)."""
    core, raw = cca_reference.visible_key_counts(t, g, w)
    return 4.0 * hq * d * (core + raw)


def bench_cca(t: int, hkv: int, rounds: int, g: int = 16, w: int = 1024) -> dict:
    q, k, v = (pad_to(x, 1, pallas_mgpu.TILE) for x in inputs(t, hkv))
    kc, vc = k[:, g - 1::g], v[:, g - 1::g]
    fns, outs = {}, {}
    variants = {"block": pallas_mgpu.MgpuConfig(),
                "overlap": pallas_mgpu.MgpuConfig(overlap=True),
                "overlap_free": pallas_mgpu.MgpuConfig(overlap=True, pingpong=False)}
    for name, config in variants.items():
        f = jax.jit(lambda *a, c=config: pallas_mgpu.forward(*a, g=g, w=w, scale=128**-0.5,
                                                              config=c))
        outs[name] = f(q, k, v, kc, vc)
        fns[name] = (f, (q, k, v, kc, vc))
    ms = time_alternating(fns, calls=20 if t <= 32768 else 4, rounds=rounds)
    flops = cca_flops(t, 32, 128, g, w)
    same = {n: all(np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
                   for a, b in zip(outs["block"], outs[n])) for n in variants if n != "block"}
    return {"op": "cca_forward_kernel", "T": t, "Hkv": hkv, "ms": ms, "same_bits": same,
            "tflops": {n: flops / (m * 1e9) for n, m in ms.items()}}


RE_VARIANTS = {"block": {}, "overlap": dict(mgpu_attend_overlap=True),
               "select_scatter": dict(block_select="scatter"),
               "select_sort": dict(block_select="sort")}


def bench_reattention(t: int, hkv: int, rounds: int, names=tuple(RE_VARIANTS)) -> dict:
    q, k, v = inputs(t, hkv)
    sel = Selection(key_block=32, span=32)
    base = default_config(128, 2, 512 * 32 // hkv)
    fns, outs = {}, {}
    unknown = set(names) - set(RE_VARIANTS)
    if unknown:
        raise SystemExit(f"unknown ReAttention variants {sorted(unknown)}: {list(RE_VARIANTS)}")
    variants = {n: RE_VARIANTS[n] for n in ("block", *names)}
    for name, changes in variants.items():
        config = dataclasses.replace(base, **changes)
        f = jax.jit(lambda q, k, v, c=config: re_pallas.reattention(q, k, v, config=c,
                                                                    key_block=32, span=32))
        outs[name] = f(q, k, v)
        fns[name] = (f, (q, k, v))
    attended = re_reference.attended_keys(t, sel)
    cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
        q, k[:, :attended], v[:, :attended], implementation="cudnn"))
    fns["cudnn_attended"] = (cudnn, (q, k, v))
    ms = time_alternating(fns, calls=5 if t <= 32768 else 2, rounds=rounds)
    same = {n: np.array_equal(np.asarray(outs["block"], np.float32),
                              np.asarray(outs[n], np.float32)) for n in variants if n != "block"}
    return {"op": "reattention_kb32", "T": t, "Hkv": hkv, "attended": attended, "ms": ms,
            "same_bits": same,
            "ratio_vs_cudnn_attended": {n: ms[n] / ms["cudnn_attended"] for n in variants}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cca", default="32768:32,131072:32,131072:8", help="T:Hkv,...")
    ap.add_argument("--reattention", default="32768:8,65536:8,65536:32,131072:8,131072:32")
    ap.add_argument("--re-variants", default=",".join(RE_VARIANTS),
                    help="ReAttention variants (block always runs)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    pairs = lambda s: [tuple(map(int, p.split(":"))) for p in s.split(",") if p]
    rows = []
    for t, hkv in pairs(args.cca):
        rows.append(bench_cca(t, hkv, args.rounds))
        print(json.dumps(rows[-1]), flush=True)
    for t, hkv in pairs(args.reattention):
        rows.append(bench_reattention(t, hkv, args.rounds, args.re_variants.split(",")))
        print(json.dumps(rows[-1]), flush=True)
    write_rows(rows, __doc__.splitlines()[0], args.out, peaks=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
