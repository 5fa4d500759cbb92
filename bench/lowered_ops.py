"""What the ReAttention op leaves to XLA, read from its lowered program on any machine (no GPU).

    PYTHONPATH=. python bench/lowered_ops.py --length 32768 --kv-heads 32          # prefill
    PYTHONPATH=. python bench/lowered_ops.py --length 16384 --kv-heads 8 --decode   # decode step

Lowers ``kernels.reattention.pallas`` for CUDA with ``jax.export`` as it runs on a Hopper GPU
(Mosaic GPU scoring and attention, Triton-lowered gather and selection; the Mosaic GPU and
Triton kernels lower on the CPU, nothing compiles). The cuDNN prefix cannot be lowered without
a GPU, so the prefill's middle-free chunks go through XLA's attention here (``full_prefix=
"xla"``: its dense ops are listed too, marked as the prefix's). Prints the counts of
StableHLO ops that XLA turns into kernels of their own or fuses (sorts, scatters, scans,
transposes, pads, concatenations, custom calls) and every op whose result has at least
``--min-mb`` MB: the copies and fusions that profiles then show as glue. bf16, 32 query heads,
d = 128, the authors' defaults.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import re
import sys

import jax
import jax.numpy as jnp

from kernels.cca import pallas_mgpu
from kernels.reattention import pallas
from kernels.reattention.params import default_config

BYTES = {"bf16": 2, "f16": 2, "f32": 4, "i32": 4, "ui32": 4, "i1": 1, "i8": 1, "i64": 8}
COUNTED = ("sort", "scatter", "reduce_window", "reduce", "transpose", "pad", "concatenate",
           "custom_call", "gather", "dynamic_update_slice")


def lower(length: int, kv_heads: int, decode: bool, key_block: int = 1) -> str:
    """The op's StableHLO text, lowered for CUDA as on a Hopper GPU."""
    available = pallas_mgpu.available
    pallas_mgpu.available = lambda: True  # lower the Mosaic GPU paths without a GPU
    try:
        return _lower(length, kv_heads, decode, key_block)
    finally:
        pallas_mgpu.available = available


def _lower(length: int, kv_heads: int, decode: bool, key_block: int) -> str:
    bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    k = bf16(1, length, kv_heads, 128)
    picks = dict(key_block=key_block, span=32 if key_block == 1 else key_block)
    if decode:
        fn = lambda q, k, v, n: pallas.reattention_decode(q, k, v, n, interpret=False, **picks)
        args = (bf16(1, 32, 128), k, k, jax.ShapeDtypeStruct((1,), jnp.int32))
    else:
        config = dataclasses.replace(default_config(128, 2, 512 * 32 // kv_heads),
                                     full_prefix="xla", score_lowering="mosaic_gpu",
                                     attend_lowering="mosaic_gpu")
        fn = lambda q, k, v: pallas.reattention(q, k, v, config=config, interpret=False,
                                                **picks)
        args = (bf16(1, length, 32, 128), k, k)
    checks = [jax.export.DisabledSafetyCheck.custom_call(name)
              for name in ("__gpu$xla.gpu.triton", "mosaic_gpu", "mosaic_gpu_v2")]
    return jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(
        *args).mlir_module()


def summarize(text: str, min_mb: float) -> dict:
    """Counts of the ``COUNTED`` ops and the ops with results of at least ``min_mb`` MB."""
    counts, big = collections.Counter(), []
    for line in text.splitlines():
        m = re.search(r"=\s*\"?stablehlo\.(\w+)\"?", line)
        if not m:
            continue
        op = m.group(1)
        if op in COUNTED:
            counts[op] += 1
        result = line.split("->")[-1] if "->" in line else line.rsplit(":", 1)[-1]
        for dims, dt in re.findall(r"tensor<([0-9x]+)x(\w+)>", result):
            mb = BYTES.get(dt, 4) * math.prod(int(x) for x in dims.split("x")) / 2**20
            if mb >= min_mb:
                big.append((round(mb, 1), op, f"{dims}x{dt}"))
    return {"counts": dict(sorted(counts.items())), "large": sorted(big, reverse=True)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--kv-heads", type=int, default=32)
    ap.add_argument("--decode", action="store_true", help="one decode step over --length keys")
    ap.add_argument("--min-mb", type=float, default=32.0)
    ap.add_argument("--key-block", type=int, default=1, help="block picks (span the same)")
    args = ap.parse_args(argv)
    summary = summarize(lower(args.length, args.kv_heads, args.decode, args.key_block),
                        args.min_mb)
    print("ops XLA launches or fuses:", summary["counts"])
    n = prefix_tokens(args.length)  # the XLA prefix's dense (n, n) ops, not ReAttention's
    for mb, op, shape in summary["large"]:
        mark = "  (prefix)" if n and f"{n}x{n}" in shape else ""
        print(f"{mb:10.1f} MB  {op:22s} {shape}{mark}")
    return 0


def prefix_tokens(length: int) -> int:
    """Tokens of a prefill's middle-free chunks (the authors' defaults), which run as causal
    attention: 0 when the call has no such chunk."""
    from kernels.reattention.params import Selection, cdiv

    sel = Selection()
    chunks = cdiv(sel.sink_tokens + sel.local_window + sel.middle_align, sel.chunk_size)
    return min(length, chunks * sel.chunk_size)


if __name__ == "__main__":
    sys.exit(main())
