"""Sweep the CCA Pallas tile configs on the GPU: pooling, forward and backward kernels timed
separately (B = 1, 32 query heads, d = 128, bf16).

    PYTHONPATH=. python bench/tune_cca.py --length 131072 [--hkv 8] \
        [--fwd 128,64,8,3 128,128,8,2] [--dq 64,64,4,2] [--dkdv 32,128,4,3] \
        [--core-splits 1 2 4] [--out x.json]

Each config is ``block_q,block_k,num_warps,num_stages``; a config that fails to compile (e.g. out
of shared memory) is recorded with its error.
"""

from __future__ import annotations

import argparse
import functools
import json
import math

import jax
import jax.numpy as jnp

from bench.common import environment, save_results, time_fn
from kernels.cca import pallas, pallas_pool, pallas_vjp, reference
from kernels.cca.pallas_common import Config, pad_to

FWD = ["128,64,8,3", "128,128,8,2", "128,64,4,3", "128,64,8,2", "64,64,4,3", "256,64,8,2"]
DQ = ["64,64,4,2", "128,32,4,3", "128,64,8,2", "64,32,4,3"]
DKDV = ["64,64,4,2", "32,128,4,3", "32,128,4,5", "32,128,8,3", "64,128,8,2", "32,64,4,3",
        "16,128,4,4"]


def _cfg(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def _timed(f, *args) -> float | str:
    try:
        return time_fn(f, *args)["median_ms"]
    except Exception as e:  # a config that does not compile is a result of the sweep
        return f"{type(e).__name__}: {str(e)[:200]}"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--hkv", type=int, default=32)
    ap.add_argument("--g", type=int, default=16)
    ap.add_argument("--w", type=int, default=1024)
    ap.add_argument("--fwd", nargs="*", default=FWD)
    ap.add_argument("--dq", nargs="*", default=DQ)
    ap.add_argument("--dkdv", nargs="*", default=DKDV)
    ap.add_argument("--core-splits", nargs="*", type=int, default=[1],
                    help="GQA: also time the core dK/dV kernel with G split over programs")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/tune_...)")
    args = ap.parse_args(argv)
    t, hq, hkv, d, g, w = args.length, 32, args.hkv, 128, args.g, args.w
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(ks[0], (1, t, hq, d), jnp.bfloat16)
    k = jax.random.normal(ks[1], (1, t, hkv, d), jnp.bfloat16)
    v = jax.random.normal(ks[2], (1, t, hkv, d), jnp.bfloat16)
    do = jax.random.normal(ks[3], q.shape, jnp.bfloat16)
    scale = 1 / math.sqrt(d)
    rows = {"env": environment(), "length": t, "hkv": hkv, "fwd": [], "dq": [], "dkdv": []}

    pool_xla = jax.jit(lambda q, k, v: reference.pool_core_tokens(q, k, v, group_size=g))
    pool = lambda q, k, v, nw=8: pallas_pool.pool_forward(q, k, v, g=g, scale=scale,
                                                          num_warps=nw, interpret=False)
    pool_k = jax.jit(pool)
    rows["pool_xla_ms"] = _timed(pool_xla, q, k, v)
    rows["pool_pallas_ms"] = {nw: _timed(jax.jit(functools.partial(pool, nw=nw)), q, k, v)
                              for nw in (4, 8)}
    err = [float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))
           for a, b in zip(pool_k(q, k, v), pool_xla(q, k, v))]
    rows["pool_rel_err"] = err
    print("pool xla", rows["pool_xla_ms"], "pallas", rows["pool_pallas_ms"], "rel err", err,
          flush=True)
    kc, vc = (pad_to(x.astype(q.dtype), 1, 128) for x in pool_k(q, k, v))

    for text in args.fwd:
        bq, bk, nw, ns = _cfg(text)
        cfg = Config(block_q=bq, block_k=bk, num_warps=nw, num_stages=ns)
        f = jax.jit(lambda *a, cfg=cfg: pallas._forward(*a, g=g, w=w, scale=scale, config=cfg,
                                                        interpret=False))
        ms = _timed(f, q, k, v, kc, vc)
        rows["fwd"].append({"cfg": [bq, bk, nw, ns], "ms": ms})
        print("fwd", text, ms, flush=True)

    o, lse = pallas._forward(q, k, v, kc, vc, g=g, w=w, scale=scale, config=Config(),
                             interpret=False)
    _, delta = pallas_vjp.backward_dq(q, k, v, kc, vc, o, lse, do, g=g, w=w, scale=scale,
                                      config=Config(), interpret=False)
    for text in args.dq:
        bq, bk, nw, ns = _cfg(text)
        cfg = Config(bwd_block_q=bq, bwd_block_k=bk, bwd_num_warps=nw, bwd_num_stages=ns)
        f = jax.jit(lambda *a, cfg=cfg: pallas_vjp.backward_dq(
            *a, g=g, w=w, scale=scale, config=cfg, interpret=False))
        rows["dq"].append({"cfg": [bq, bk, nw, ns], "ms": _timed(f, q, k, v, kc, vc, o, lse, do)})
        print("dq", rows["dq"][-1], flush=True)
    for text in args.dkdv:
        bq, bk, nw, ns = _cfg(text)
        cfg = Config(dkdv_block_q=bq, dkdv_block_k=bk, dkdv_num_warps=nw, dkdv_num_stages=ns)
        row = {"cfg": [bq, bk, nw, ns]}
        parts = [("local", k, v, False, 1)] + [
            ("core" if s == 1 else f"core_splits{s}", kc, vc, True, s) for s in args.core_splits]
        for name, keys, values, core, splits in parts:
            f = jax.jit(lambda q, kk, vv, lse, do, delta, cfg=cfg, core=core, splits=splits:
                        pallas_vjp.backward_dkdv(q, kk, vv, lse, do, delta, core=core, g=g, w=w,
                                                 scale=scale, config=cfg, interpret=False,
                                                 splits=splits))
            row[name] = _timed(f, q, keys, values, lse, do, delta)
        rows["dkdv"].append(row)
        print("dkdv", row, flush=True)

    n = t // g
    rows["pool_bwd_ms"] = {}
    for nw in (4, 8):
        pool_b = jax.jit(lambda q, k, v, dkc, dvc, dq, dk, dv, nw=nw: pallas_pool.pool_backward(
            q, k, v, dkc, dvc, dq, dk, dv, g=g, scale=scale, num_warps=nw, interpret=False))
        rows["pool_bwd_ms"][nw] = _timed(pool_b, q, k, v, kc[:, :n], vc[:, :n], q, k, v)
    print("pool bwd", rows["pool_bwd_ms"], flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)
    else:
        save_results(f"tune_cca_T{t}_hkv{hkv}", rows)


if __name__ == "__main__":
    main()
