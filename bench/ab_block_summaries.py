"""A/B of block picks' summaries: XLA's reduce (``key_blocks.summaries``) against the kernel
(``pallas_summaries``), one GPU process, alternating rounds:

    PYTHONPATH=. python bench/ab_block_summaries.py --out $OUT/ab_summaries.json   # ~30 s

bf16 caches (1, T, Hkv, 128) at the given lengths and kv heads, blocks of 32 after a sink of 32
(the op's block picks with the authors' sink). Checks that both give the same bits and reports
each one's ms and read rate (the keys' bytes over the time).
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import time_alternating, write_rows
from kernels.reattention import key_blocks, pallas_summaries
from kernels.reattention.params import Selection


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="32768,131072")
    ap.add_argument("--kv-heads", default="32,8")
    ap.add_argument("--key-block", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    sel = Selection(key_block=args.key_block, span=args.key_block)
    rows = []
    for t in map(int, args.lengths.split(",")):
        for hkv in map(int, args.kv_heads.split(",")):
            k = jax.random.normal(jax.random.PRNGKey(t + hkv), (1, t, hkv, 128), jnp.bfloat16)
            fns = {"xla": (jax.jit(lambda k: key_blocks.summaries(k, sel)), (k,)),
                   "kernel": (jax.jit(lambda k: pallas_summaries.summaries(k, sel)), (k,))}
            outs = {n: np.asarray(f(*a), np.float32) for n, (f, a) in fns.items()}
            ms = time_alternating(fns, calls=20, rounds=args.rounds)
            row = {"T": t, "Hkv": hkv, "key_block": args.key_block, "ms": ms,
                   "read_tb_s": {n: k.nbytes / (v * 1e-3) / 1e12 for n, v in ms.items()},
                   "same_bits": bool((outs["xla"] == outs["kernel"]).all())}
            print(row, flush=True)
            rows.append(row)
    write_rows(rows, __doc__.splitlines()[0], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
