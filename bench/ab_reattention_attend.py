"""A/B of ReAttention's gathered-attention lowerings, one GPU process, alternating rounds:

    PYTHONPATH=. python bench/ab_reattention_attend.py --out $OUT/ab_attend.json   # H200, ~3 min

Each variant is the whole prefill op (``pallas.reattention``: cuDNN prefix, scoring, selection,
gathered attention) with the authors' defaults, bf16, 32 query heads with 32 and 8 kv heads,
d = 128; only ``Config.attend_lowering`` and the Mosaic GPU kernel's key block / ring depth,
``Config.gather_bytes``, the list gather (``mgpu_xla_gather``: XLA's instead of
``pallas_gather``'s), the rows' copies (``Config.mgpu_rows``) or the cuDNN prefix's
(``Config.prefix_keys``) differ, so the differences are the attention stage's.
``--key-block 32`` runs block picks (span 32), where ``mgpu_values_gathered`` is the list gather
of keys and values against the default's values read in place (``Config.mgpu_list_values``),
and ``mgpu_block_scatter`` / ``mgpu_block_sort`` the selection's votes counted per block or by
the sorts (``Config.block_select``), ``mgpu_signs_xla`` the scoring's signed rows made by XLA
(``Config.mgpu_signed_rows``).
``rel_vs_triton`` is each variant's output against the Triton lowering's (same selection,
different rounding).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types

import jax
import jax.numpy as jnp

from bench.common import time_alternating, write_rows
from kernels.reattention import pallas, pallas_gather, pallas_mgpu_attend
from kernels.reattention.params import default_config

VARIANTS = {
    "triton": dict(attend_lowering="triton"),
    "mgpu_bk128_s2": dict(attend_lowering="mosaic_gpu"),
    "mgpu_bk64_s4": dict(attend_lowering="mosaic_gpu", mgpu_attend_block_k=64,
                         mgpu_attend_slots=4),
    "mgpu_bk128_s3": dict(attend_lowering="mosaic_gpu", mgpu_attend_slots=3),
    "mgpu_bk192_s2": dict(attend_lowering="mosaic_gpu", mgpu_attend_block_k=192),
    "mgpu_gather256m": dict(attend_lowering="mosaic_gpu", gather_bytes=1 << 28),
    "mgpu_gather4g": dict(attend_lowering="mosaic_gpu", gather_bytes=1 << 32),
    "mgpu_xla_gather": dict(attend_lowering="mosaic_gpu", gather="xla"),
    # the rows packed and the output concatenated, and the cuDNN prefix on sliced copies (both
    # the defaults before 2026-12-05, eleventh session), each alone and together
    "mgpu_packed_rows": dict(attend_lowering="mosaic_gpu", mgpu_rows="packed"),
    "mgpu_prefix_sliced": dict(attend_lowering="mosaic_gpu", prefix_keys="sliced"),
    "mgpu_packed_sliced": dict(attend_lowering="mosaic_gpu", mgpu_rows="packed",
                               prefix_keys="sliced"),
    # block picks (--key-block): the lists' values gathered with their keys, not read in place
    "mgpu_values_gathered": dict(attend_lowering="mosaic_gpu", mgpu_list_values="gathered"),
    # block picks: votes counted per block by a scatter, one sort of the blocks; or the two
    # sorts of the picks ("auto", the default, picks the scatter where NB <= the picks)
    "mgpu_block_scatter": dict(attend_lowering="mosaic_gpu", block_select="scatter"),
    "mgpu_block_sort": dict(attend_lowering="mosaic_gpu", block_select="sort"),
    # block picks: the scoring's signed rows [q+, q-] as XLA's 2D-wide copy of q, not made by
    # the kernel
    "mgpu_signs_xla": dict(attend_lowering="mosaic_gpu", mgpu_signed_rows="xla"),
}


def _xla_gather(*args, values=True, interpret=False):
    kg, vg = pallas_mgpu_attend.gather_list(*args)
    return kg, vg if values else None


XLA_GATHER = types.SimpleNamespace(  # pallas_gather's interface, XLA's gather inside
    gather_list=_xla_gather, padded_lists=pallas_gather.padded_lists)


def inputs(t: int, hkv: int, dtype=jnp.bfloat16):
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    return (jax.random.normal(ks[0], (1, t, 32, 128), dtype),
            jax.random.normal(ks[1], (1, t, hkv, 128), dtype),
            jax.random.normal(ks[2], (1, t, hkv, 128), dtype))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="16384,32768,131072")
    ap.add_argument("--kv-heads", default="32,8")
    ap.add_argument("--variants", default="|".join(VARIANTS), help="names joined by '|'")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--key-block", type=int, default=1,
                    help="block picks of this many keys (span the same); 1: token picks")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    names = args.variants.split("|")
    picks = dict(key_block=args.key_block, span=32 if args.key_block == 1 else args.key_block)
    rows = []
    for t in map(int, args.lengths.split(",")):
        for hkv in map(int, args.kv_heads.split(",")):
            a = inputs(t, hkv)
            base = default_config(128, 2, 512 * 32 // hkv)
            fs, outs, row = {}, {}, {"T": t, "Hq": 32, "Hkv": hkv, **picks, "ms": {},
                                     "errors": {}, "temp_bytes": {}}
            for n in names:
                change = dict(VARIANTS[n])
                if change.pop("gather", None) == "xla":
                    pallas.pallas_gather = XLA_GATHER  # read when f is traced, below
                config = dataclasses.replace(base, **change)
                f = jax.jit(lambda q, k, v, c=config: pallas.reattention(q, k, v, config=c,
                                                                         **picks))
                try:
                    outs[n] = f(*a)
                    fs[n] = (f, a)
                    memory = f.lower(*a).compile().memory_analysis()
                    row["temp_bytes"][n] = getattr(memory, "temp_size_in_bytes", None)
                except Exception as e:  # a variant that does not compile is a result too
                    row["errors"][n] = f"{type(e).__name__}: {str(e)[:400]}"
                finally:
                    pallas.pallas_gather = pallas_gather
            calls = 20 if t <= 16384 else 5 if t <= 32768 else 2
            row["ms"] = time_alternating(fs, calls=calls, rounds=args.rounds)
            if "triton" in outs:
                ref = outs["triton"].astype(jnp.float32)
                row["rel_vs_triton"] = {
                    n: float(jnp.linalg.norm(o.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
                    for n, o in outs.items()}
            print(json.dumps(row), flush=True)
            rows.append(row)
            del a, fs, outs
    write_rows(rows, __doc__.splitlines()[0], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
