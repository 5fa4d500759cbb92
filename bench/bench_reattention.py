"""ReAttention (Pallas kernels) against cuDNN full attention, in the same run on the same GPU.

    PYTHONPATH=. python bench/bench_reattention.py --out $OUT/reatt.json     # H100, < 8 min
    PYTHONPATH=. python bench/bench_reattention.py --quick --out /tmp/r.json # CPU smoke run

Prefill, bf16, batch 1, 32 query heads with 32 and with 8 kv heads, d = 128, T = 8K .. 128K, the
authors' defaults (sink 32, window 8192, top 4, 256 most-voted picks, spans of 32, chunks of 512):

* ``reattention``: scoring + top-k kernel, XLA selection, gathered-attention kernel (all of it);
  at some lengths also the cumulative stages (``score``, ``score+select``), and with
  ``--profile`` its device time op by op (``profile``).
* ``cudnn_causal``: ``jax.nn.dot_product_attention(is_causal=True, implementation="cudnn")`` over
  the same T: the full attention ReAttention stands in for.
* ``cudnn_causal_rope``: the same with RoPE applied to q and k first (positions 0 .. T-1, float32
  math, the kernels' rotation). ReAttention takes UN-rotated q and k and rotates them itself, so
  this is the full-attention layer's work between the same two points of a model.
* ``cudnn_attended``: cuDNN at equal attended length: T queries over ``attended`` keys (the keys
  the last query of the ReAttention prefill attends: sink + picks + local window + own chunk),
  causal when that is all of T. ``overhead_vs_attended`` = reattention / cudnn_attended - 1.

Decode: one step at each T (ReAttention vs cuDNN / XLA attention of one query over T keys), timed
one call at a time and back to back (``pipelined_ms``), and a 1M-token decode step for a 1B-class
layer (32 q / 8 kv heads, d = 64). Memory: XLA temp bytes of
each compiled function, device peak bytes, and the KV cache of a LLaMA-3.2-1B-shaped model at 1M
tokens (ReAttention keeps the whole un-rotated cache, like full attention).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp

from bench.common import environment, measure_peaks, time_fn, time_pipelined
from bench.device_trace import op_table
from kernels.reattention import key_blocks, pallas, reference
from kernels.reattention.params import Selection, default_config
from kernels.reattention.shapes import Case, gpu_cases

ONE_B = dict(layers=16, kv_heads=8, head_dim=64)  # LLaMA-3.2-1B attention layout
QUICK_SEL = Selection(sink_tokens=4, local_window=64, top_k=4, max_selected=8, span=4,
                      chunk_size=64, middle_align=16)


def make_inputs(case: Case, dtype, seed=0, num_keys=None):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    s = num_keys or case.length
    q = jax.random.normal(kq, (case.batch, case.length, case.q_heads, case.head_dim), dtype)
    k = jax.random.normal(kk, (case.batch, s, case.kv_heads, case.head_dim), dtype)
    v = jax.random.normal(kv, (case.batch, s, case.kv_heads, case.head_dim), dtype)
    return q, k, v


def temp_bytes(fn, *args) -> int | None:
    try:
        return int(fn.lower(*args).compile().memory_analysis().temp_size_in_bytes)
    except Exception:
        return None


def peak_bytes() -> int | None:
    try:
        return int(jax.devices()[0].memory_stats()["peak_bytes_in_use"])
    except Exception:
        return None


def full_attention(implementation, causal):
    return jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, implementation=implementation))


def full_attention_with_rope(implementation, head_dim: int):
    inv_freq = reference.default_inv_freq(head_dim)

    def fn(q, k, v):
        rot = lambda x: pallas.rotate_at(x, jnp.arange(x.shape[1])[None, :], inv_freq)
        return jax.nn.dot_product_attention(rot(q), rot(k), v, is_causal=True,
                                            implementation=implementation)
    return jax.jit(fn)


def timed(fn, *args, reps, pipelined: int = 0) -> dict:
    """Median/min ms of single calls (a wait after each: launch and sync included), first-call
    seconds and XLA temp bytes; ``pipelined`` > 0: also ``pipelined_ms``, the best ms per call
    over 3-5 rounds of that many back-to-back calls (the rate in a model, where one layer's
    launches overlap the previous one's work)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))  # compile + first run
    first = time.perf_counter() - t0
    res = time_fn(fn, *args, warmup=1, reps=reps)
    if pipelined:
        res["pipelined_ms"] = time_pipelined(fn, *args, calls=pipelined,
                                             rounds=5 if pipelined >= 20 else 3)
    res["first_call_s"] = first
    res["temp_bytes"] = temp_bytes(fn, *args)
    return res


def rel_err(a, b) -> float:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def bench_prefill(case: Case, dtype, baseline: str, interpret, breakdown: bool,
                  check: bool, profile: bool = False, timing: tuple[int, int] | None = None
                  ) -> dict:
    """``timing``: (reps, back-to-back calls) instead of the length's defaults (--quick)."""
    sel = case.sel
    q, k, v = make_inputs(case, dtype)
    reps = 20 if case.length <= 16384 else 5 if case.length <= 32768 else 3  # short runs: noisy
    calls = 20 if case.length <= 16384 else 8 if case.length <= 32768 else 3
    reps, calls = timing or (reps, calls)
    attended = reference.attended_keys(case.length, sel)
    row = {"case": case.id, "T": case.length, "Hq": case.q_heads, "Hkv": case.kv_heads,
           "attended": attended}
    reatt = jax.jit(lambda q, k, v: pallas.reattention_with_selection(
        q, k, v, sel=sel, interpret=interpret))
    res = timed(reatt, q, k, v, reps=reps, pipelined=calls)
    out, _, n_g = reatt(q, k, v)
    # Attended (query, key) pairs, exactly: per chunk n_g + (c1 - L0) keys for the chunk's last
    # query, rows before it see fewer of the chunk's own tokens.
    geo = reference.geometry(q.shape, k.shape, sel)
    c0, c1, l0 = reference.chunk_bounds(reference.query_starts(None, 1, case.length,
                                                               case.length), geo)
    rows = (c1 - c0).astype(jnp.float32)
    pairs = jnp.sum(n_g.astype(jnp.float32).mean(axis=1) * rows
                    + (c0 - l0) * rows + rows * (rows + 1) / 2)
    res["attended_pairs"] = float(pairs)
    row["reattention"] = res
    if profile:  # device time op by op (kernels, sorts, gathers, cuDNN prefix); one traced step
        # under --quick's timing (interpreted kernels: the table's shape is what is checked)
        row["profile"] = op_table(lambda: reatt(q, k, v), steps=1 if timing else 5, top=25)
    if breakdown:  # the op's own stages: the chunks it runs on cuDNN are not scored
        config = default_config(case.head_dim, jnp.dtype(dtype).itemsize, geo.rows)
        mode, _ = pallas._resolve_modes(config, geo, dtype, pallas.resolve_interpret(interpret))
        skip = pallas.full_prefix_chunks(geo, None, mode)

        def score(q, k):
            return pallas.picks(q, k, sel=sel, interpret=interpret, skip=skip)

        def score_select(q, k):
            vals, idx = pallas.picks(q, k, sel=sel, interpret=interpret, skip=skip)
            b, hkv, nc = idx.shape[:3]
            c0b = jnp.broadcast_to(c0[:, None, skip:], (b, hkv, nc)).reshape(-1)
            l0b = jnp.broadcast_to(l0[:, None, skip:], (b, hkv, nc)).reshape(-1)
            return reference.select_from_picks(idx.reshape(b * hkv * nc, -1),
                                               vals.reshape(b * hkv * nc, -1), c0b, l0b, sel)

        row["score"] = timed(jax.jit(score), q, k, reps=reps)
        row["score+select"] = timed(jax.jit(score_select), q, k, reps=reps)
    row["cudnn_causal"] = timed(full_attention(baseline, True), q, k, v, reps=reps,
                                pipelined=calls)
    row["cudnn_causal_rope"] = timed(full_attention_with_rope(baseline, case.head_dim), q, k, v,
                                     reps=reps, pipelined=calls)
    if attended < case.length:
        row["cudnn_attended"] = timed(full_attention(baseline, False), q, k[:, :attended],
                                      v[:, :attended], reps=reps, pipelined=calls)
    else:
        row["cudnn_attended"] = row["cudnn_causal"]
    t = row["reattention"]["median_ms"]
    row["ratio_vs_causal"] = t / row["cudnn_causal"]["median_ms"]
    row["ratio_vs_causal_rope"] = t / row["cudnn_causal_rope"]["median_ms"]
    row["overhead_vs_attended"] = t / row["cudnn_attended"]["median_ms"] - 1
    # The same from back-to-back calls: a model runs the op layer after layer, so the launch and
    # sync of one call (more of them in ReAttention's many kernels) overlap the work before.
    tp = row["reattention"]["pipelined_ms"]
    row["pipelined_ratio_vs_causal"] = tp / row["cudnn_causal"]["pipelined_ms"]
    row["pipelined_ratio_vs_causal_rope"] = tp / row["cudnn_causal_rope"]["pipelined_ms"]
    row["pipelined_overhead_vs_attended"] = tp / row["cudnn_attended"]["pipelined_ms"] - 1
    if check:
        f32 = lambda x: x.astype(jnp.float32)
        ref = jax.jit(lambda q, k, v: reference.reattention_with_selection(q, k, v, sel=sel))(
            f32(q), f32(k), f32(v))
        row["check_rel_err"] = rel_err(out, ref[0])
        row["check_same_selection"] = float(jnp.mean(n_g == ref[2]))
    del q, k, v, out
    return row


def bench_decode(case: Case, dtype, baseline: str, interpret, num_keys: int,
                 timing: tuple[int, int] | None = None) -> dict:
    """One decode step at context num_keys: the query of position num_keys - 1. ``timing``:
    (reps, back-to-back calls) instead of (10, 20) (--quick)."""
    reps, calls = timing or (10, 20)
    q, k, v = make_inputs(dataclasses.replace(case, length=1), dtype, seed=1, num_keys=num_keys)
    lengths = jnp.full((case.batch,), num_keys, jnp.int32)
    sel = case.sel
    kw = {f.name: getattr(sel, f.name) for f in dataclasses.fields(sel) if f.name != "chunk_size"}
    row = {"case": case.id, "context": num_keys, "Hq": case.q_heads, "Hkv": case.kv_heads,
           "D": case.head_dim,
           "kv_cache_bytes_one_layer": 2 * k.size * k.dtype.itemsize}
    step = jax.jit(lambda q, k, v, n, s: pallas.reattention_decode(
        q, k, v, n, interpret=interpret, block_summaries=s, **kw))
    # Block picks: the step reads the summaries the model's cache keeps (ReAttentionCache);
    # "reattention_recomputed" recomputes them from the keys, as the op alone does.
    summaries = key_blocks.summaries(k, sel) if sel.key_block > 1 else None
    row["reattention"] = timed(step, q[:, 0], k, v, lengths, summaries, reps=reps,
                               pipelined=calls)
    if summaries is not None:
        row["reattention_recomputed"] = timed(step, q[:, 0], k, v, lengths, None, reps=reps,
                                              pipelined=calls)
    for name in dict.fromkeys([baseline, "xla"]):
        try:
            row[f"{name}_full"] = timed(full_attention(name, False), q, k, v, reps=reps,
                                        pipelined=calls)
        except Exception as e:  # cuDNN may refuse a one-query shape: that is a result too
            row[f"{name}_full"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    row["peak_bytes"] = peak_bytes()
    del q, k, v
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/...)")
    ap.add_argument("--lengths", default="8192,16384,32768,65536,131072")
    ap.add_argument("--breakdown", default="32768,131072", help="lengths with stage timings")
    ap.add_argument("--profile", default="", help="lengths whose ReAttention prefill is "
                    "also traced op by op (bench/device_trace.py)")
    ap.add_argument("--decode-1m", type=int, default=1 << 20, help="context of the 1B decode")
    ap.add_argument("--key-block", type=int, default=1, help="Selection.key_block: 1 picks "
                    "tokens (the authors'); b > 1 picks blocks of b keys (needs span == b: 32 "
                    "with the defaults, 4 with --quick)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes on CPU (interpreted "
                    "kernels, XLA baseline): checks that the script runs")
    args = ap.parse_args(argv)
    blocks = lambda sel: dataclasses.replace(sel, key_block=args.key_block)
    on_gpu = jax.default_backend() == "gpu"
    env = environment()
    if args.quick:
        lengths, breakdown_at, profile_at, one_m = [256, 520], {520}, {520}, 2048
        cases = lambda t: [Case(1, t, 4, 4, 64, blocks(QUICK_SEL)),
                           Case(1, t, 4, 2, 64, blocks(QUICK_SEL))]
        dtype, baseline, interpret = jnp.float32, "xla", None
        peaks, timing = None, (2, 2)  # interpreted kernels: a smoke run, not a timing
    else:
        lengths = [int(x) for x in args.lengths.split(",")]
        breakdown_at = {int(x) for x in args.breakdown.split(",") if x}
        profile_at = {int(x) for x in args.profile.split(",") if x}
        one_m = args.decode_1m
        cases = lambda t: [dataclasses.replace(c, sel=blocks(c.sel)) for c in gpu_cases(t)]
        dtype, baseline, interpret = jnp.bfloat16, "cudnn", None
        peaks, timing = (measure_peaks() if on_gpu else None), None
    print(env, peaks, flush=True)
    results = {"env": env, "peaks": peaks,
               "selection": dataclasses.asdict(blocks(QUICK_SEL if args.quick else Selection())),
               "prefill": [], "decode": [], "memory": {}}
    started = time.perf_counter()
    out = Path(args.out) if args.out else (
        Path(__file__).parent / "results" / f"reattention_{env['device'].replace(' ', '_')}.json")

    def save():  # after every row, so a run cut short keeps what it measured
        results["wall_s"] = time.perf_counter() - started
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))

    for t in lengths:
        for case in cases(t):
            try:
                row = bench_prefill(case, dtype, baseline, interpret, t in breakdown_at,
                                    check=(t == lengths[0]), profile=t in profile_at,
                                    timing=timing)
            except Exception:
                row = {"case": case.id, "error": traceback.format_exc()[-2000:]}
            print(json.dumps(row), flush=True)
            results["prefill"].append(row)
            save()
        for case in cases(t)[1:]:  # decode at the same context, GQA layout
            try:
                row = bench_decode(case, dtype, baseline, interpret, t, timing=timing)
            except Exception:
                row = {"case": case.id, "error": traceback.format_exc()[-2000:]}
            print(json.dumps(row), flush=True)
            results["decode"].append(row)
            save()
    one_b = Case(1, 1, 32, ONE_B["kv_heads"], ONE_B["head_dim"],
                 blocks(QUICK_SEL if args.quick else Selection()))
    try:
        row = bench_decode(one_b, dtype, baseline, interpret, one_m, timing=timing)
        row["model"] = "1B-class layer (LLaMA-3.2-1B layout: 32 q / 8 kv heads, d = 64)"
    except Exception:
        row = {"case": one_b.id, "context": one_m, "error": traceback.format_exc()[-2000:]}
    print(json.dumps(row), flush=True)
    results["decode"].append(row)
    per_token = 2 * ONE_B["layers"] * ONE_B["kv_heads"] * ONE_B["head_dim"] * 2  # bf16 k and v
    results["memory"] = {
        "llama_3_2_1b_kv_cache_bytes_per_token": per_token,
        "llama_3_2_1b_kv_cache_gib_at_1m": per_token * (1 << 20) / 2**30,
        "note": "ReAttention keeps the full un-rotated cache (like full attention); the decode "
                "row above measures one layer's step over it, temp bytes included",
    }
    save()
    print("saved", out)
    print(f"{'case':60s} {'attended':>8s} {'reatt ms':>9s} {'causal ms':>9s} {'x':>6s} "
          f"{'attnd ms':>9s} {'overhead':>8s}   back to back: {'reatt':>7s} {'causal':>7s} "
          f"{'x':>5s} {'overhead':>8s}")
    for r in results["prefill"]:
        if "reattention" in r:
            pipe = lambda name: r[name]["pipelined_ms"]
            print(f"{r['case']:60s} {r['attended']:8d} {r['reattention']['median_ms']:9.2f} "
                  f"{r['cudnn_causal']['median_ms']:9.2f} {r['ratio_vs_causal']:6.2f} "
                  f"{r['cudnn_attended']['median_ms']:9.2f} {r['overhead_vs_attended']:8.2%}"
                  f"   {'':14s}{pipe('reattention'):7.2f} {pipe('cudnn_causal'):7.2f} "
                  f"{r['pipelined_ratio_vs_causal']:5.2f} "
                  f"{r['pipelined_overhead_vs_attended']:8.2%}")
        else:
            print(r["case"], "ERROR", str(r)[:300])
    for r in results["decode"]:
        if "reattention" in r:
            print("decode", r["case"], r["context"], f"{r['reattention']['median_ms']:.3f} ms",
                  {k: v.get("median_ms") for k, v in r.items() if k.endswith("_full")})
        else:
            print("decode", r.get("case"), "ERROR", str(r)[:300])
    return 0


if __name__ == "__main__":
    sys.exit(main())
