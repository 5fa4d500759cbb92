"""Launch-parameter sweep of the Pallas decode kernel (kernels/cca/pallas_decode.py), one GPU call.

    PYTHONPATH=. python bench/tune_decode.py --out $OUT/tune_decode.json      # H100/H200, ~1 min
    PYTHONPATH=. python bench/tune_decode.py --quick --out /tmp/t.json        # CPU, interpreted

LLaMA-2-7B attention shapes (32 query heads, d = 128, bf16), batch 1: the CCA kernel over the
cache of a ``--context``-token sequence (core slots + ring; g = 16, w = 1024) and the full kernel
over a ``--full-context``-token cache. Each config (block_k, num_warps, num_stages, splits; splits
0 = the default rule) is timed with back-to-back calls against the bytes it must read, and its
output is compared with the default config's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from bench.common import environment, time_pipelined
from kernels.cca import pallas_decode
from kernels.cca.pallas_decode import DecodeConfig

CONFIGS = ["64,4,3,0", "64,4,2,0", "64,8,3,0", "128,4,2,0", "128,8,3,0", "64,4,3,8", "64,4,3,32",
           "64,4,4,0", "32,4,4,0", "128,4,3,0"]


def _config(text: str) -> DecodeConfig:
    bk, nw, ns, splits = (int(x) for x in text.split(","))
    return DecodeConfig(block_k=bk, num_warps=nw, num_stages=ns, num_splits=splits or None)


def _inputs(kind: str, t: int, hkv: int, d: int, g: int, w: int, dtype, quick: bool):
    keys = jax.random.split(jax.random.PRNGKey(0), 8)
    q = jax.random.normal(keys[0], (1, 32 if not quick else 4, d), dtype)
    k_new = jax.random.normal(keys[1], (1, hkv, d), dtype)
    v_new = jax.random.normal(keys[2], (1, hkv, d), dtype)
    pos = jnp.full((1,), t, jnp.int32)
    if kind == "full":
        cache = [jax.random.normal(keys[3 + i], (1, t + 8, hkv, d), dtype) for i in range(2)]
        read = 2 * t * hkv * d * jnp.dtype(dtype).itemsize
        return (q, k_new, v_new, *cache, pos), {}, read
    n, ring = t // g, w + g
    core = [jax.random.normal(keys[3 + i], (1, n + 8, hkv, d), dtype) for i in range(2)]
    rings = [jax.random.normal(keys[5 + i], (1, ring, hkv, d), dtype) for i in range(2)]
    read = 2 * (n + ring) * hkv * d * jnp.dtype(dtype).itemsize
    return (q, k_new, v_new, *core, *rings, pos), dict(group_size=g, local_window=w), read


def sweep(kind: str, t: int, configs: list[str], quick: bool) -> dict:
    d, hkv = (32, 2) if quick else (128, 32)
    args, kw, read = _inputs(kind, t, hkv, d, 16, 64 if quick else 1024, jnp.bfloat16, quick)
    op = pallas_decode.full_decode_attention if kind == "full" else \
        pallas_decode.cca_decode_attention
    run = lambda cfg: jax.jit(lambda *a: op(*a, **kw, config=cfg))
    ref = run(None)(*args).astype(jnp.float32)
    rows = []
    for text in configs:
        try:
            f = run(_config(text))
            err = float(jnp.linalg.norm(f(*args).astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
            ms = time_pipelined(f, *args, calls=2 if quick else 50, rounds=1 if quick else 5)
            row = {"config": text, "ms": ms, "gbps": read / ms / 1e6, "rel_err_vs_default": err}
        except Exception as e:  # a config the compiler refuses (shared memory) is a result
            row = {"config": text, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return {"kind": kind, "context": t, "bytes_read": read, "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=None, help="CCA context (default 131072)")
    ap.add_argument("--full-context", type=int, default=None, help="full context (default 32768)")
    ap.add_argument("--configs", nargs="*", default=None,
                    help="block_k,num_warps,num_stages,splits (splits 0: the default rule)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, interpreted (CPU check)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    configs = args.configs or (["16,4,1,0", "16,4,1,2"] if args.quick else CONFIGS)
    cca_t = args.context or (200 if args.quick else 131072)
    full_t = args.full_context or (100 if args.quick else 32768)
    results = {"env": environment(), "cca": sweep("cca", cca_t, configs, args.quick),
               "full": sweep("full", full_t, configs, args.quick)}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
