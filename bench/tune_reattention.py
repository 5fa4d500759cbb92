"""Sweep the ReAttention Pallas tile configs on the GPU: the scoring kernel (with its in-register
top-k) and the whole op, per config, against the default config's output.

    PYTHONPATH=. python bench/tune_reattention.py --length 131072 [--hkv 8] \
        [--score 128,64,8,3 64,64,4,3] [--attn 128,64,8,3 64,128,8,2] [--out x.json]
    PYTHONPATH=. python bench/tune_reattention.py --quick --out /tmp/t.json   # CPU, interpreted

Each config is ``block_q,block_k,num_warps,num_stages`` (``kernels/reattention/params.Config``);
an ``--attn`` config may add ``,tail_keys[,full_prefix]`` (e.g. ``128,32,4,3,in_kernel,off``);
``--score`` configs change the scoring kernel only (timed alone: ``pallas.picks``), ``--attn``
configs the gathered-attention kernel (timed as the whole op, whose scoring stays at the default).
B = 1, 32 query heads, d = 128, bf16, the authors' selection (``params.Selection()``). A config
that does not compile (e.g. out of shared memory) is recorded with its error; every config's
output is compared with the default config's (relative error; picks: the share of equal sets).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp

from bench.common import environment, time_fn
from kernels.reattention import pallas
from kernels.reattention.params import Selection, default_config, geometry

SCORE = ["128,64,8,3", "128,64,4,3", "64,64,4,3", "128,128,8,2", "64,128,4,2", "256,64,8,2"]
ATTN = ["128,64,8,3", "128,64,4,3", "64,64,4,3", "128,128,8,2", "64,128,4,2", "128,32,4,3"]
QUICK_SEL = Selection(sink_tokens=4, local_window=64, top_k=2, max_selected=8, span=4,
                      chunk_size=64, middle_align=16)


def _cfg(text: str, modes: bool = False) -> tuple:
    """(block_q, block_k, num_warps, num_stages[, tail_keys, full_prefix]) of one config."""
    fields = text.split(",")
    if not 4 <= len(fields) <= (6 if modes else 4) or not all(x.isdigit() for x in fields[:4]):
        raise SystemExit(f"a config is block_q,block_k,num_warps,num_stages"
                         f"{'[,tail_keys[,full_prefix]]' if modes else ''}; got {text!r}")
    tiles = tuple(int(x) for x in fields[:4])
    return tiles + tuple(fields[4:]) + ("auto",) * (6 - len(fields)) if modes else tiles


def _timed(f, *args, reps: int) -> float | str:
    try:
        return time_fn(f, *args, reps=reps)["median_ms"]
    except Exception as e:  # a config that does not compile is a result of the sweep
        return f"{type(e).__name__}: {str(e)[:300]}"


def rel_err(a, b) -> float:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def same_picks(a, b) -> float:
    """Share of rows whose set of picked positions is the same (the set is unordered)."""
    return float(jnp.mean(jnp.all(jnp.sort(a, axis=-1) == jnp.sort(b, axis=-1), axis=-1)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=None, help="default 131072 (quick: 300)")
    ap.add_argument("--hkv", type=int, default=32)
    ap.add_argument("--score", nargs="*", default=None)
    ap.add_argument("--attn", nargs="*", default=None)
    ap.add_argument("--quick", action="store_true", help="tiny sizes on CPU (interpreted)")
    ap.add_argument("--out", default=None, help="JSON path")
    args = ap.parse_args(argv)
    q_heads, d = (4, 32) if args.quick else (32, 128)
    hkv = min(args.hkv, q_heads)
    t = args.length or (300 if args.quick else 131072)
    sel = QUICK_SEL if args.quick else Selection()
    dtype = jnp.float32 if args.quick else jnp.bfloat16
    small = ["32,32,4,2", "16,32,4,2"]
    scores = args.score if args.score is not None else (small if args.quick else SCORE)
    attns = args.attn if args.attn is not None else (small if args.quick else ATTN)
    reps = 1 if args.quick else 3
    interpret = True if args.quick else False
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(ks[0], (1, t, q_heads, d), dtype)
    k = jax.random.normal(ks[1], (1, t, hkv, d), dtype)
    v = jax.random.normal(ks[2], (1, t, hkv, d), dtype)
    geo = geometry(q.shape, k.shape, sel)
    base = default_config(d, jnp.dtype(dtype).itemsize, geo.rows)
    rows = {"env": environment(), "length": t, "q_heads": q_heads, "kv_heads": hkv,
            "head_dim": d, "dtype": jnp.dtype(dtype).name,
            "selection": dataclasses.asdict(sel), "default": dataclasses.asdict(base),
            "score": [], "attn": []}
    out = Path(args.out) if args.out else None

    def save():
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(rows, indent=1))

    def score_fn(cfg):
        return jax.jit(lambda q, k: pallas.picks(q, k, sel=sel, config=cfg, interpret=interpret))

    def op_fn(cfg):
        return jax.jit(lambda q, k, v: pallas.reattention_with_selection(
            q, k, v, sel=sel, config=cfg, interpret=interpret)[0])

    ref_idx = score_fn(base)(q, k)[1]
    ref_out = op_fn(base)(q, k, v)
    for text in scores:
        bq, bk, nw, ns = _cfg(text)
        cfg = dataclasses.replace(base, score_block_q=bq, score_block_k=bk, score_warps=nw,
                                  score_stages=ns)
        row = {"cfg": [bq, bk, nw, ns], "ms": _timed(score_fn(cfg), q, k, reps=reps)}
        if isinstance(row["ms"], float):
            row["same_picks"] = same_picks(score_fn(cfg)(q, k)[1], ref_idx)
        rows["score"].append(row)
        print("score", row, flush=True)
        save()
    for text in attns:
        bq, bk, nw, ns, tail_keys, full_prefix = _cfg(text, modes=True)
        try:
            cfg = dataclasses.replace(base, attn_block_q=bq, attn_block_k=bk, attn_warps=nw,
                                      attn_stages=ns, tail_keys=tail_keys,
                                      full_prefix=full_prefix)
        except ValueError as e:
            raise SystemExit(f"--attn {text!r}: {e}") from None
        row = {"cfg": [bq, bk, nw, ns], "tail_keys": tail_keys, "full_prefix": full_prefix,
               "op_ms": _timed(op_fn(cfg), q, k, v, reps=reps)}
        if isinstance(row["op_ms"], float):
            row["rel_err_vs_default"] = rel_err(op_fn(cfg)(q, k, v), ref_out)
        rows["attn"].append(row)
        print("attn", row, flush=True)
        save()
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
