"""A/B of ReAttention's scoring kernels, one GPU process, alternating rounds:

    PYTHONPATH=. python bench/ab_reattention_score.py --out $OUT/ab_score.json   # H200, ~3 min

Each variant is ``pallas.picks`` (the scoring kernel over every chunk's middle, then the merge
of its key splits) with the authors' defaults, bf16, 32 query heads with 32 and 8 kv heads,
d = 128 (``--key-block 32``: block picks, whose signed rows are 256 wide); only
``Config.score_lowering`` and the Mosaic GPU kernel's tile, ring, consumer
count and merge (``*_rows``: ``Config.mgpu_merge="rows"``) differ. ``--old NAME=FILE`` adds a
variant that runs another version of ``pallas_mgpu_score.py`` (e.g. one taken from git) in
its place. ``--probes`` adds two variants of the default kernel that give wrong picks on
purpose, to split its time: ``probe_votes_only`` keeps the per-tile max and warp vote of the
merge but never takes the pops (the branch also asks for a negative tile position);
``probe_no_merge`` keeps only each row's running max, folded into the lists so that the
wgmmas stay live (the sweep: TMA ring, wgmmas and a row max). ``same_picks`` is the fraction
of (row, pick) entries equal to the Triton lowering's (or, without it, the first variant's:
``same_picks_as``) as sets per row;
``tflops`` counts the q . k products of the scoring alone (2 d per query-key pair of every
middle).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import time_alternating, write_rows
from kernels.reattention import pallas, pallas_mgpu_score, reference
from kernels.reattention.params import Selection, default_config, geometry

VARIANTS = {
    "triton": dict(score_lowering="triton"),
    "mgpu_c4_bk64": dict(score_lowering="mosaic_gpu"),
    "mgpu_c2_bk64": dict(score_lowering="mosaic_gpu", mgpu_consumers=2),
    "mgpu_c4_bk128": dict(score_lowering="mosaic_gpu", mgpu_block_k=128, mgpu_slots=3),
    "mgpu_c2_bk128": dict(score_lowering="mosaic_gpu", mgpu_consumers=2, mgpu_block_k=128,
                          mgpu_slots=3),
    "mgpu_c4_bk64_s6": dict(score_lowering="mosaic_gpu", mgpu_slots=6),
    "mgpu_c4_bk64_s2": dict(score_lowering="mosaic_gpu", mgpu_slots=2),
    "mgpu_c2_bk64_s3": dict(score_lowering="mosaic_gpu", mgpu_consumers=2, mgpu_slots=3),
    "mgpu_c4_bk128_s4": dict(score_lowering="mosaic_gpu", mgpu_block_k=128, mgpu_slots=4),
    "mgpu_c4_bk64_rows": dict(score_lowering="mosaic_gpu", mgpu_merge="rows"),
    "mgpu_c2_bk64_rows": dict(score_lowering="mosaic_gpu", mgpu_consumers=2, mgpu_merge="rows"),
    "mgpu_c4_bk128_rows": dict(score_lowering="mosaic_gpu", mgpu_block_k=128, mgpu_slots=3,
                               mgpu_merge="rows"),
}


# Probes: (line of pallas_mgpu_score.py, its replacement). Each variant loads a patched copy.
PROBES = {
    "probe_votes_only": (
        "out = branch(warp_any(gt(tree_max(xs), thr)), tile",
        "out = branch(arith.andi(warp_any(gt(tree_max(xs), thr)), arith.cmpi("
        "arith.CmpIPredicate.slt, take(b_regs[h], 0), const(0))), tile"),
    "probe_no_merge": (
        "return lane_merge(scores, base_row, *carry)",
        "return (carry[0], jnp.maximum(carry[1], lax.broadcast_in_dim(scores.max(axis=1), "
        "carry[1].shape, [0])), carry[2])"),
}


def probe_module(name: str, directory: str):
    """The default kernel with probe ``name``'s line replaced, loaded from ``directory``."""
    line, new = PROBES[name]
    src = Path(pallas_mgpu_score.__file__).read_text()
    if src.count(line) != 1:
        raise SystemExit(f"probe {name}: its line is not in pallas_mgpu_score.py once; update "
                         f"PROBES")
    path = Path(directory) / f"{name}.py"
    path.write_text(src.replace(line, new))
    return load_module(str(path))


def inputs(t: int, hkv: int, dtype=jnp.bfloat16):
    ks = jax.random.split(jax.random.PRNGKey(0), 2)
    return (jax.random.normal(ks[0], (1, t, 32, 128), dtype),
            jax.random.normal(ks[1], (1, t, hkv, 128), dtype))


def scoring_flop(t: int, sel: Selection, heads: int = 32, d: int = 128) -> float:
    """2 d per (query, head, middle key): the middle of chunk [c0, c1) is [sink, L0). Block
    picks (``key_block`` b): 2 (2 d) per (query, head, middle block)."""
    geo = geometry((1, t, heads, d), (1, t, heads, d), sel)
    c0, c1, l0 = (np.asarray(x)[0] for x in reference.chunk_bounds(jnp.zeros((1,), jnp.int32),
                                                                     geo))
    pairs = np.sum((c1 - c0) * np.maximum(l0 - sel.sink_tokens, 0))
    b = sel.key_block
    return float(2 * d * heads * pairs) if b == 1 else float(4 * d * heads * pairs / b)


def load_module(path: str):
    spec = importlib.util.spec_from_file_location(f"score_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure(t: int, hkv: int, variants: dict, rounds: int, key_block: int = 1) -> dict:
    """One (length, kv heads) row: every variant compiled, then timed alternating."""
    sel, current = Selection(key_block=key_block), pallas.pallas_mgpu_score
    a = inputs(t, hkv)
    base = default_config(128, 2, 512 * 32 // hkv)
    fs, outs = {}, {}
    row = {"T": t, "Hq": 32, "Hkv": hkv, "key_block": key_block,
           "scoring_flop": scoring_flop(t, sel), "errors": {}}
    for n, (change, module) in variants.items():
        config = dataclasses.replace(base, **change)
        f = jax.jit(lambda q, k, c=config: pallas.picks(q, k, sel=sel, config=c))
        pallas.pallas_mgpu_score = module or current  # read when f is traced
        pallas._mgpu_score.clear_cache()
        try:
            outs[n] = jax.block_until_ready(f(*a))
            fs[n] = (f, a)
        except Exception as e:  # a variant that does not compile is a result too
            row["errors"][n] = f"{type(e).__name__}: {str(e)[:400]}"
        finally:
            pallas.pallas_mgpu_score = current
    row["ms"] = time_alternating(fs, calls=10 if t <= 32768 else 2, rounds=rounds)
    row["tflops"] = {n: row["scoring_flop"] / ms / 1e9 for n, ms in row["ms"].items()}
    if outs:  # against the Triton lowering, or else the first variant that ran
        ref = "triton" if "triton" in outs else next(iter(outs))
        idx_t = np.sort(np.asarray(outs[ref][1]), -1)
        row["same_picks_as"] = ref
        row["same_picks"] = {n: float(np.mean(np.sort(np.asarray(o[1]), -1) == idx_t))
                             for n, o in outs.items()}
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="32768,131072")
    ap.add_argument("--kv-heads", default="32,8")
    ap.add_argument("--variants", default="|".join(VARIANTS), help="names joined by '|'")
    ap.add_argument("--old", action="append", default=[],
                    help="NAME=FILE: a variant running FILE as pallas_mgpu_score (4 consumers)")
    ap.add_argument("--probes", action="store_true",
                    help="add probe_votes_only and probe_no_merge (wrong picks on purpose)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--key-block", type=int, default=1, help="Selection.key_block (block picks:"
                    " 256-wide signed rows at d = 128; the span stays 32, so 1 or 32)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    variants = {n: (VARIANTS[n], None) for n in args.variants.split("|")}
    for spec in args.old:
        name, path = spec.split("=", 1)
        variants[name] = (dict(score_lowering="mosaic_gpu"), load_module(path))
    if args.probes:  # the patched copies live until the run ends
        probes = tempfile.TemporaryDirectory(prefix="score_probes_")
        for name in PROBES:
            variants[name] = (dict(score_lowering="mosaic_gpu"),
                              probe_module(name, probes.name))
    rows = [measure(t, hkv, variants, args.rounds, args.key_block)
            for t in map(int, args.lengths.split(","))
            for hkv in map(int, args.kv_heads.split(","))]
    write_rows(rows, __doc__.splitlines()[0], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
