"""Sweep the CCA Pallas tile configs on the GPU: forward and backward kernels timed separately.

    PYTHONPATH=. python bench/tune_cca.py --length 32768 [--hkv 32]
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp

from bench.common import environment, save_results, time_fn
from kernels.cca import pallas, pallas_vjp, reference
from kernels.cca.pallas_common import Config

FWD = [(128, 128, 8, 3), (128, 128, 8, 4), (256, 64, 8, 3), (256, 128, 8, 2), (128, 64, 8, 4),
       (256, 32, 8, 4), (64, 64, 4, 4), (128, 64, 8, 3)]
BWD = [(64, 64, 4, 2), (64, 32, 4, 2), (128, 64, 4, 2), (64, 128, 4, 2), (128, 32, 4, 2),
       (32, 32, 2, 2), (64, 64, 4, 1), (32, 64, 2, 2), (128, 64, 8, 1)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--hkv", type=int, default=32)
    ap.add_argument("--g", type=int, default=16)
    ap.add_argument("--w", type=int, default=1024)
    args = ap.parse_args()
    t, hq, hkv, d, g, w = args.length, 32, args.hkv, 128, args.g, args.w
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(ks[0], (1, t, hq, d), jnp.bfloat16)
    k = jax.random.normal(ks[1], (1, t, hkv, d), jnp.bfloat16)
    v = jax.random.normal(ks[2], (1, t, hkv, d), jnp.bfloat16)
    do = jax.random.normal(ks[3], q.shape, jnp.bfloat16)
    kc, vc = reference.pool_core_tokens(q, k, v, group_size=g)
    kc = pallas.pad_to(kc.astype(q.dtype), 1, 128)
    vc = pallas.pad_to(vc.astype(q.dtype), 1, 128)
    scale = 1 / math.sqrt(d)
    pool = jax.jit(lambda q, k, v: reference.pool_core_tokens(q, k, v, group_size=g))
    rows = {"env": environment(), "length": t, "hkv": hkv,
            "pool_ms": time_fn(pool, q, k, v)["median_ms"], "fwd": [], "bwd": []}
    from kernels.cca import pallas_pool
    pool_k = jax.jit(lambda q, k, v: pallas_pool.pool_core_tokens(q, k, v, g, scale, 8, False))
    rows["pool_pallas_ms"] = {nw: time_fn(jax.jit(
        lambda q, k, v, nw=nw: pallas_pool.pool_core_tokens(q, k, v, g, scale, nw, False)),
        q, k, v)["median_ms"] for nw in (4, 8)}
    err = [float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))
           for a, b in zip(pool_k(q, k, v), pool(q, k, v))]
    print("pool xla", rows["pool_ms"], "pallas", rows["pool_pallas_ms"], "rel err", err, flush=True)
    for bq, bk, nw, ns in FWD:
        cfg = Config(block_q=bq, block_k=bk, num_warps=nw, num_stages=ns)
        f = jax.jit(lambda *a: pallas._forward(*a, g=g, w=w, scale=scale, config=cfg,
                                               interpret=False))
        try:
            ms = time_fn(f, q, k, v, kc, vc)["median_ms"]
        except Exception as e:
            ms = f"{type(e).__name__}: {str(e)[:200]}"
        rows["fwd"].append({"cfg": [bq, bk, nw, ns], "ms": ms})
        print("fwd", bq, bk, nw, ns, ms, flush=True)
    o, lse = pallas._forward(q, k, v, kc, vc, g=g, w=w, scale=scale, config=Config(),
                             interpret=False)
    for bq, bk, nw, ns in BWD:
        cfg = Config(bwd_block_q=bq, bwd_block_k=bk, bwd_num_warps=nw, bwd_num_stages=ns)
        kw = dict(g=g, w=w, scale=scale, config=cfg, interpret=False)
        parts = {
            "dq": jax.jit(lambda *a: pallas_vjp.backward_dq(*a, **kw)),
            "dkdv_local": jax.jit(lambda q, k, v, kc, vc, o, lse, do: pallas_vjp.backward_dkdv(
                q, k, v, o, lse, do, core=False, **kw)),
            "dkdv_core": jax.jit(lambda q, k, v, kc, vc, o, lse, do: pallas_vjp.backward_dkdv(
                q, kc, vc, o, lse, do, core=True, **kw)),
        }
        row = {"cfg": [bq, bk, nw, ns]}
        for name, f in parts.items():
            try:
                row[name] = time_fn(f, q, k, v, kc, vc, o, lse, do)["median_ms"]
            except Exception as e:
                row[name] = f"{type(e).__name__}: {str(e)[:200]}"
        rows["bwd"].append(row)
        print("bwd", row, flush=True)
    save_results(f"tune_cca_T{t}_hkv{hkv}", rows)


if __name__ == "__main__":
    main()
