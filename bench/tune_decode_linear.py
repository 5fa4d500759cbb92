"""Tile sweep of the batch-1 decode projection kernel (kernels/decode_linear/pallas.py) against
the XLA ops it replaces, at LLaMA-2-7B's four projection shapes, bf16:

    PYTHONPATH=. python bench/tune_decode_linear.py --out $OUT/tune_decode_linear.json  # ~3 min

Each candidate runs the projection of 32 layers (32 distinct weight matrices, 0.9-5.8 GB: none
stays in the 50 MB L2 between calls), all candidates of a shape timed in alternating rounds.
Reports ms per matrix, the weights' read rate, and the best tiles per shape.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from bench.common import environment, time_alternating
from kernels.decode_linear import pallas, reference

LAYERS = 32
SHAPES = {  # name: (K, N, prologue, residual)
    "qkv": (4096, 12288, "rmsnorm", False),
    "o": (4096, 4096, None, True),
    "gate_up": (4096, 22016, "rmsnorm", False),
    "down": (11008, 4096, "swiglu", True),
}
SMEM_BYTES = 200 * 1024  # leave configs whose pipelined weight tiles exceed this


def candidates(k: int, quick: bool) -> list[pallas.Config]:
    if quick:
        return [pallas.Config(block_n=32, block_k=64, num_warps=4, num_stages=2)]
    out = []
    for bn, bk, warps, stages in itertools.product((16, 32, 64, 128), (128, 256, 512), (4, 8),
                                                   (3, 5)):
        if k % bk == 0 and bk * bn * 2 * stages <= SMEM_BYTES:
            out.append(pallas.Config(block_n=bn, block_k=bk, num_warps=warps, num_stages=stages))
    return out


def run_shape(name: str, k: int, n: int, prologue, residual: bool, layers: int, quick: bool,
              rounds: int) -> dict:
    keys = jax.random.split(jax.random.PRNGKey(list(SHAPES).index(name)), 4)
    kx = 2 * k if prologue == "swiglu" else k
    dt = jnp.bfloat16 if not quick else jnp.float32
    ws = [jax.random.normal(jax.random.fold_in(keys[0], i), (k, n), dt) * k ** -0.5
          for i in range(layers)]
    x = jax.random.normal(keys[1], (1, kx), dt)
    kw = {"norm_weight": jnp.ones((k,), dt) if prologue == "rmsnorm" else None,
          "residual": jax.random.normal(keys[2], (1, n), dt) if residual else None}

    def chain(linear):
        @jax.jit
        def run(x, ws, kw):
            return sum(linear(x, w, prologue=prologue, **kw).astype(jnp.float32) for w in ws)
        return run

    fns = {"xla": (chain(reference.decode_linear), (x, ws, kw))}
    errors = {}
    want = fns["xla"][0](*fns["xla"][1])
    for cfg in candidates(k, quick):
        label = f"{cfg.block_n}x{cfg.block_k}_w{cfg.num_warps}_s{cfg.num_stages}"
        fn = chain(lambda *a, cfg=cfg, **kw_: pallas.decode_linear(*a, config=cfg, **kw_))
        try:
            got = fn(x, ws, kw)
        except Exception as e:  # noqa: BLE001 - a tile Triton cannot compile: skip it, say why
            errors[label] = f"{type(e).__name__}: {str(e)[:200]}"
            continue
        err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
        if not err < 2e-2:
            errors[label] = f"rel err {err:.3g}"
            continue
        fns[label] = (fn, (x, ws, kw))
    ms = time_alternating(fns, calls=3 if quick else 10, rounds=rounds)
    bytes_per = k * n * jnp.dtype(dt).itemsize
    rows = {label: {"ms_per_matrix": t / layers, "tb_s": bytes_per * layers / (t * 1e-3) / 1e12}
            for label, t in ms.items()}
    best = min((lbl for lbl in rows if lbl != "xla"), key=lambda lbl: rows[lbl]["ms_per_matrix"],
               default=None)
    return {"K": k, "N": n, "prologue": prologue, "residual": residual, "bytes": bytes_per,
            "results": rows, "best": best, "errors": errors}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, one tile (CPU check)")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    out = {"env": environment(), "layers": LAYERS, "shapes": {}}
    for name in args.shapes.split(","):
        k, n, prologue, residual = SHAPES[name]
        if args.quick:
            k, n = 64, 96  # every shape's logic at a size the interpreter runs fast
        res = run_shape(name, k, n, prologue, residual, 2 if args.quick else LAYERS, args.quick,
                        1 if args.quick else args.rounds)
        out["shapes"][name] = res
        xla = res["results"]["xla"]
        line = f"{name:8s} K={k:6d} N={n:6d} xla {xla['ms_per_matrix'] * 1e3:7.2f} us " \
               f"({xla['tb_s']:.2f} TB/s)"
        if res["best"]:
            b = res["results"][res["best"]]
            line += f"  best {res['best']} {b['ms_per_matrix'] * 1e3:7.2f} us ({b['tb_s']:.2f} TB/s)"
        print(line, flush=True)
    text = json.dumps(out, indent=1)
    if args.out:
        Path(args.out).write_text(text)
        print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
