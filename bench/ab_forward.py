"""A/B of CCA forward variants (tiles, pipeline depth, the precision of the softmax exponential),
one GPU process, alternating rounds:

    PYTHONPATH=. python bench/ab_forward.py --out $OUT/ab_forward.json     # H100/H200, ~2 min

Each variant is the whole ``cca_attention`` forward (pooling included) at 32K MHA and 128K MHA /
GQA, bf16, g = 16, w = 1024, timed as the median of ``--rounds`` rounds of back-to-back calls.
The exponential variants ("exp=...") replace the f32 ``ex2.approx.ftz.f32`` of the online
softmax by a packed 16-bit one (two exponentials per instruction): the argument is rounded to
bf16 or f16 first, and P comes out in 16 bits (P is rounded to bf16 for the PV matmul anyway).
``err`` is the relative error of each variant's output at 16K against the float32 kernel on the
same (upcast) inputs, next to the shipped variant's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as pltriton

from bench.common import environment, time_alternating
from kernels.cca import pallas as cca_pallas
from kernels.cca import pallas_common
from kernels.cca.pallas_common import NEG, Config, dot

SHAPES = [(32768, 32), (131072, 32), (131072, 8)]


def _packed_exp2(x, dtype, instruction):
    [y] = pltriton.elementwise_inline_asm(
        f"{instruction} $0, $1;", args=[x.astype(dtype)], constraints="=r,r", pack=2,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, dtype)])
    return y


def _update_16bit(dtype, instruction):
    """online_softmax_update with a packed 16-bit exponential for P (alpha stays float32)."""

    def update(carry, s, values, scale2, mask, exp2=jnp.exp2):
        acc, m, l = carry
        if mask is not None:
            s = jnp.where(mask, s, NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1) * scale2)
        p = _packed_exp2(s * scale2 - m_new[:, None], dtype, instruction).astype(values.dtype)
        if mask is not None:
            p = jnp.where(mask, p, jnp.zeros_like(p))
        alpha = exp2(m - m_new)
        acc = acc * alpha[:, None] + dot(p, values)
        return acc, m_new, l * alpha + jnp.sum(p.astype(jnp.float32), axis=1)

    return update


UPDATES = {
    "f32": pallas_common.online_softmax_update,
    "bf16x2": _update_16bit(jnp.bfloat16, "ex2.approx.ftz.bf16x2"),
    "f16x2": _update_16bit(jnp.float16, "ex2.approx.f16x2"),
}

BASE = Config()
VARIANTS = {
    "shipped": (BASE, "f32"),
    "stages4": (dataclasses.replace(BASE, num_stages=4), "f32"),
    "exp=bf16x2": (BASE, "bf16x2"),
    "exp=f16x2": (BASE, "f16x2"),
    "exp=bf16x2,stages4": (dataclasses.replace(BASE, num_stages=4), "bf16x2"),
    "exp=bf16x2,128x128x8w": (dataclasses.replace(BASE, block_k=128, num_stages=2), "bf16x2"),
    "exp=bf16x2,256x64x8w": (dataclasses.replace(BASE, block_q=256, num_stages=2), "bf16x2"),
    "exp=bf16x2,4w": (dataclasses.replace(BASE, num_warps=4), "bf16x2"),
}


def compiled(name: str, q, k, v):
    config, update = VARIANTS[name]
    cca_pallas.online_softmax_update = UPDATES[update]
    try:
        f = jax.jit(lambda q, k, v: cca_pallas.cca_attention(q, k, v, config=config))
        return f.lower(q, k, v).compile()
    finally:
        cca_pallas.online_softmax_update = pallas_common.online_softmax_update


def inputs(t: int, hkv: int, dtype=jnp.bfloat16):
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    return (jax.random.normal(ks[0], (1, t, 32, 128), dtype),
            jax.random.normal(ks[1], (1, t, hkv, 128), dtype),
            jax.random.normal(ks[2], (1, t, hkv, 128), dtype))


def errors(names, t: int = 16384) -> dict:
    a = inputs(t, 8)
    ref = jax.jit(lambda *x: cca_pallas.cca_attention(*x))(*(x.astype(jnp.float32) for x in a))
    out = {}
    for n in names:
        o = compiled(n, *a)(*a).astype(jnp.float32)
        out[n] = float(jnp.linalg.norm(o - ref) / jnp.linalg.norm(ref))
        print(json.dumps({"err": n, "rel": out[n]}), flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--variants", default="|".join(VARIANTS), help="names joined by '|'")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    names = args.variants.split("|")
    rows, failed = [], {}
    for t, hkv in SHAPES:
        a = inputs(t, hkv)
        fs = {}
        for n in names:
            try:
                fs[n] = compiled(n, *a)
            except Exception as e:  # a variant that does not compile is a result, not a crash
                failed[n] = f"{type(e).__name__}: {str(e)[:300]}"
        pool = jax.jit(lambda q, k, v: cca_pallas._pool(
            q, k, v, g=16, pooling="cca", scale=128**-0.5, config=BASE, interpret=False))
        runs = {n: (f, a) for n, f in fs.items()} | {"pooling": (pool, a)}
        ms = time_alternating(runs, calls=40 if t <= 32768 else 8, rounds=args.rounds)
        row = {"T": t, "hkv": hkv, **{f"{n}_ms": v for n, v in ms.items()}}
        print(json.dumps(row), flush=True)
        rows.append(row)
    payload = {"env": environment(), "rows": rows, "failed": failed,
               "err_16k_gqa": errors([n for n in names if n not in failed])}
    if args.out:
        Path(args.out).write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
