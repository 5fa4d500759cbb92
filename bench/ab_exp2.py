"""A/B of the exp2 in the Pallas CCA forward, one GPU process, alternating rounds:

    PYTHONPATH=. python bench/ab_exp2.py --out $OUT/exp2_ab.json      # H100/H200, ~30 s

"libdevice": ``jnp.exp2``, which Pallas lowers to libdevice's ``__nv_exp2f``; "fast": the
kernels' ``pallas_common.fast_exp2`` (one ``ex2.approx.ftz.f32``), the shipped default. Each
variant is the whole ``cca_attention`` forward (pooling included) at 32K MHA and 128K MHA / GQA,
bf16, timed as the median of 7 rounds of back-to-back calls; ``rel_diff`` compares the outputs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from bench.common import environment, time_alternating
from kernels.cca import pallas as cca_pallas
from kernels.cca.pallas_common import exp2_for

SHAPES = [(32768, 32), (131072, 32), (131072, 8)]


def compiled(variant: str, t: int, hkv: int):
    """The jitted forward with the variant's exp2 (patched only while tracing)."""
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(ks[0], (1, t, 32, 128), jnp.bfloat16)
    k = jax.random.normal(ks[1], (1, t, hkv, 128), jnp.bfloat16)
    v = jax.random.normal(ks[2], (1, t, hkv, 128), jnp.bfloat16)
    if variant == "libdevice":
        cca_pallas.exp2_for = lambda interpret: jnp.exp2
    try:
        f = jax.jit(lambda q, k, v: cca_pallas.cca_attention(q, k, v)).lower(q, k, v).compile()
    finally:
        cca_pallas.exp2_for = exp2_for
    return f, (q, k, v)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = []
    for t, hkv in SHAPES:
        fs = {name: compiled(name, t, hkv) for name in ("libdevice", "fast")}
        out = {n: f(*a).astype(jnp.float32) for n, (f, a) in fs.items()}
        diff = float(jnp.linalg.norm(out["fast"] - out["libdevice"])
                     / jnp.linalg.norm(out["libdevice"]))
        ms = time_alternating(fs, calls=40 if t <= 32768 else 8, rounds=args.rounds)
        row = {"T": t, "hkv": hkv, "rel_diff": diff, **{f"{n}_ms": v for n, v in ms.items()}}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        Path(args.out).write_text(json.dumps({"env": environment(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
