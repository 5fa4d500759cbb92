"""Long-context inference at LLaMA-2-7B shapes: CCA against full attention in the same run.

    PYTHONPATH=. python bench/bench_decode.py --out $OUT/decode.json          # 16K..128K, H100
    PYTHONPATH=. python bench/bench_decode.py --lengths 131072 --skip-batch-search
    PYTHONPATH=. python bench/bench_decode.py --quick                         # tiny, CPU, < 1 min

Random weights (``CCAConfig.llama2_7b()``: 32 layers, 32 heads of 128, vocab 32000), bf16; CCA
with g = 16, w = 1024. One process, one weight copy shared by both attentions. Per context
length T and attention, in two phases:

1. batch 1 (CCA for every T, then full attention for every T, so the process-wide peak memory
   grows and each row's peak is its own): **prefill** seconds (the model's end-to-end prefill of a
   T-token prompt, cache filled, logits of the last position only: never (T, vocab)), median over
   ``--prefill-reps`` runs after a warm-up; **decode** ms/token: the jit-compiled decode step
   (``CCALlama.cached_forward`` with one token, the Pallas decode kernel on the GPU) at context
   T: the median, over chunks of 8 steps dispatched back to back (the host dispatches step n + 1
   while the device runs step n), of the time per step, ``--decode-steps`` steps in all; and the
   median of as many single steps each waited for ("synced": host dispatch not hidden);
   **memory**: XLA's memory analysis of each compiled function (arguments + temporaries +
   outputs - aliased) and the device's ``peak_bytes_in_use`` after the row (process-wide; JAX
   cannot reset it).
2. unless ``--skip-batch-search``: decode tokens/s at the largest batch that fits. Phase 1 then
   runs in a child process and every attempt of this search in a child of its own, so that an
   attempt that runs out of memory leaves nothing behind (in one process it did: every later
   attempt failed, even batch 1). The search starts at the batch the free memory predicts
   (weights + cache bytes), steps down by ~15% while an attempt does not fit, and once one fits
   tries ~15% more to show the boundary (``MAX_ATTEMPTS`` at most); out-of-memory is recorded as
   "does not fit". These steps run on a cache whose lengths are set to T without a prefill
   (the kernel reads the same rows whatever they hold; a prefill of B x 128K tokens would take
   minutes).

Bounds next to every figure: decode = (bytes of weights read + bytes of cache read per token) /
measured bandwidth (``bench.common.measure_peaks``: the larger of a 1 GiB copy's read + write
rate and a 1 GiB sum's read rate, timed over back-to-back calls);
prefill = FLOPs (linear layers + the attention each query must do) / measured bf16 matmul rate;
memory = weights + cache bytes (``jax_cca.cache.cache_bytes``).
"""

from __future__ import annotations

import os

# JAX preallocates 75% of the GPU by default: the full-attention cache at 128K needs more.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import argparse  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench.common import (environment, json_from_child, measure_peaks,  # noqa: E402
                          save_results)
from jax_cca import CCAConfig, CCALlama, decode  # noqa: E402
from jax_cca.cache import cache_bytes, init_cache, ring_size  # noqa: E402
from kernels.cca import reference  # noqa: E402

ATTENTIONS = ("cca", "full")


# ------------------------------------------------------------------------------ model
def base_config(quick: bool, max_len: int, fused: bool = True) -> CCAConfig:
    """LLaMA-2-7B (quick: tiny) in bf16; ``fused``: the serving layout (one QKV and one gate-up
    matrix per layer, ``jax_cca/fused.py``), as a server would run it, for both attentions."""
    if quick:
        return CCAConfig.tiny(vocab_size=512, hidden_size=256, intermediate_size=512,
                              num_layers=2, num_heads=4, num_kv_heads=4, group_size=16,
                              local_window=64, max_position_embeddings=max_len,
                              dtype="bfloat16", fused_projections=fused)
    return CCAConfig.llama2_7b(group_size=16, local_window=1024, dtype="bfloat16",
                               max_position_embeddings=max_len, fused_projections=fused)


def layout_args(args) -> list[str]:
    """The command-line flag that keeps the parameter layout in child processes."""
    return ["--separate-projections"] if args.separate_projections else []


@functools.partial(jax.jit, static_argnums=(1, 2))
def _random_array(key, shape, dtype):
    """N(0, 1 / shape[0]) for matrices (Linear kernels are (in, out)), ones for norm weights."""
    if len(shape) == 1:
        return jnp.ones(shape, dtype)
    return (jax.random.normal(key, shape, jnp.float32) * shape[0] ** -0.5).astype(dtype)


def random_state(config: CCAConfig, seed: int = 0):
    """Random parameters of a CCALlama, array by array (one small program per distinct shape:
    tracing the whole model's initialiser takes minutes to compile at 7B)."""
    abstract = nnx.split(CCALlama.abstract(config))[1]
    leaves, treedef = jax.tree_util.tree_flatten(abstract)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    arrays = [_random_array(k, tuple(x.shape), jnp.dtype(x.dtype)) for k, x in zip(keys, leaves)]
    return jax.tree_util.tree_unflatten(treedef, arrays)


def graphdef_of(config: CCAConfig):
    return nnx.split(CCALlama.abstract(config))[0]


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


# ------------------------------------------------------------------------------ bounds
def weight_bytes_read(config: CCAConfig, state, batch: int) -> int:
    """Parameter bytes a decode step reads: all but the embedding table, of which it reads one
    row per sequence (the LM head is a separate matrix in LLaMA-2)."""
    itemsize = jnp.dtype(config.jnp_dtype).itemsize
    table = config.vocab_size * config.hidden_size * itemsize
    if config.tie_word_embeddings:
        return nbytes(state)
    return nbytes(state) - table + batch * config.hidden_size * itemsize


def cache_bytes_read(config: CCAConfig, t: int, max_len: int) -> int:
    """Cache bytes one decode step of one sequence at position t reads, all layers: full
    attention the t earlier rows; CCA the visible core slots and the occupied ring slots."""
    if config.attention == "full":
        rows = t
    else:
        g, w = config.group_size, config.local_window
        start = max(0, (t - w + 1) // g * g)
        rows = start // g + min(t, ring_size(config, max_len))
    per_row = 2 * config.num_kv_heads * config.head_dim * jnp.dtype(config.jnp_dtype).itemsize
    return config.num_layers * rows * per_row


def prefill_flops(config: CCAConfig, t: int) -> float:
    """Matmul FLOPs of a prefill: linear layers over t tokens, attention over the keys each query
    sees (full: the causal triangle; CCA: visible core + local keys, plus pooling)."""
    e, f, h, hkv, d = (config.hidden_size, config.intermediate_size, config.num_heads,
                       config.num_kv_heads, config.head_dim)
    per_token = e * h * d * 2 + e * hkv * d * 2 + 3 * e * f  # q, o, k, v, gate, up, down
    flops = 2.0 * config.num_layers * per_token * t + 2.0 * e * config.vocab_size
    if config.attention == "full":
        keys = t * (t + 1) / 2
        pool = 0.0
    else:
        core, raw = reference.visible_key_counts(t, config.group_size, config.local_window)
        keys = core + raw
        pool = 6.0 * hkv * d * (t // config.group_size) * config.group_size
    return flops + config.num_layers * (4.0 * h * d * keys + pool)


# ------------------------------------------------------------------------------ memory
def device_memory() -> dict | None:
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:
        return None
    if not stats:
        return None
    return {k: int(stats[k]) for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")
            if k in stats}


def compiled_memory(compiled) -> dict | None:
    try:
        m = compiled.memory_analysis()
        out = {"argument_bytes": int(m.argument_size_in_bytes),
               "output_bytes": int(m.output_size_in_bytes),
               "temp_bytes": int(m.temp_size_in_bytes),
               "alias_bytes": int(m.alias_size_in_bytes)}
    except Exception:
        return None
    out["peak_estimate_bytes"] = (out["argument_bytes"] + out["temp_bytes"]
                                  + out["output_bytes"] - out["alias_bytes"])
    return out


def is_oom(err: BaseException) -> bool:
    text = f"{type(err).__name__} {err}".lower()
    return "resource_exhausted" in text or "out of memory" in text or "oom" in text.split()


def failure(err: BaseException) -> dict:
    if is_oom(err):
        return {"fits": False, "error": f"does not fit: {str(err).splitlines()[0][:300]}"}
    return {"fits": None, "error": traceback.format_exc()[-1500:]}


# ------------------------------------------------------------------------------ functions
def prefill_fn(graphdef):
    def run(state, ids, lengths, cache):
        return nnx.merge(graphdef, state).cached_forward(ids, lengths, cache, prefill=True)
    return jax.jit(run, donate_argnums=3)


def decode_fn(graphdef):
    def run(state, tokens, cache):
        n_valid = jnp.ones(tokens.shape, jnp.int32)
        return nnx.merge(graphdef, state).cached_forward(tokens[:, None], n_valid, cache,
                                                         prefill=False)
    return jax.jit(run, donate_argnums=2)


def synthetic_cache(config: CCAConfig, batch: int, max_len: int, t: int):
    """A zero cache of ``batch`` sequences whose lengths say t tokens are held."""
    def make():
        cache = init_cache(config, batch, max_len)
        return tuple(c.replace(lengths=jnp.full((batch,), t, jnp.int32)) for c in cache)
    return jax.jit(make)()


PIPELINE = 8  # steps dispatched back to back per timed chunk
MAX_ATTEMPTS = 5  # batch sizes tried per (attention, T)


def time_decode(compiled, state, tokens, cache, steps: int, warmup: int = 2):
    """(ms per step, ms per synchronised step, cache).

    ms per step: the median over chunks of PIPELINE steps dispatched back to back (the host
    prepares step n + 1 while the device runs step n, as a serving loop does) of the chunk's
    time / PIPELINE. Synchronised: the median of single steps, each waited for (adds the host's
    dispatch of the whole step, about a thousand kernels, to each step)."""
    for _ in range(warmup):
        logits, cache = compiled(state, tokens, cache)
    jax.block_until_ready(logits)
    chunks = []
    for _ in range(max(1, steps // PIPELINE)):
        t0 = time.perf_counter()
        for _ in range(PIPELINE):
            logits, cache = compiled(state, tokens, cache)
        jax.block_until_ready((logits, cache))
        chunks.append((time.perf_counter() - t0) * 1e3 / PIPELINE)
    synced = []
    for _ in range(steps):
        t0 = time.perf_counter()
        logits, cache = compiled(state, tokens, cache)
        jax.block_until_ready(logits)
        synced.append((time.perf_counter() - t0) * 1e3)
    if not np.isfinite(np.asarray(logits, np.float32)).all():
        raise FloatingPointError("decode produced non-finite logits")
    return statistics.median(chunks), statistics.median(synced), cache


# ------------------------------------------------------------------------------ phase 1
def bench_batch1(config, graphdef, state, t: int, args, peaks) -> dict:
    max_len = t + 2 * args.decode_steps + 8
    bw = peaks.get("bandwidth_gbps", peaks["copy_gbps"]) * 1e9
    row = {"attention": config.attention, "T": t, "max_len": max_len,
           "decode_implementation": decode.decode_implementation(config),
           "cache_bytes": cache_bytes(config, max_len), "weight_bytes": nbytes(state)}
    row["memory_bound_bytes"] = row["cache_bytes"] + row["weight_bytes"]
    rng = np.random.default_rng(t)
    ids = jnp.asarray(rng.integers(0, config.vocab_size, (1, t)), jnp.int32)
    lengths = jnp.full((1,), t, jnp.int32)
    try:
        cache = jax.block_until_ready(init_cache(config, 1, max_len))
    except Exception as err:  # noqa: BLE001 - out of memory is a result
        res = failure(err)  # no cache of one sequence fits: neither prefill nor decode can run
        row.update(prefill=res, decode=res, prefill_fits=res["fits"], decode_fits=res["fits"])
        gc.collect()
        row["device_memory_after"] = device_memory()
        return row
    # Prefill.
    try:
        t0 = time.perf_counter()
        compiled = prefill_fn(graphdef).lower(state, ids, lengths, cache).compile()
        row["prefill_compile_s"] = time.perf_counter() - t0
        row["prefill_memory"] = compiled_memory(compiled)
        times = []
        for rep in range(args.prefill_reps + 1):  # the first run is the warm-up
            t0 = time.perf_counter()
            logits, cache = compiled(state, ids, lengths, cache)
            jax.block_until_ready((logits, cache))
            if rep:
                times.append(time.perf_counter() - t0)
        if not np.isfinite(np.asarray(logits, np.float32)).all():
            raise FloatingPointError("prefill produced non-finite logits")
        row["prefill_s"] = statistics.median(times)
        row["prefill_runs_s"] = times
        row["prefill_flops"] = prefill_flops(config, t)
        row["prefill_floor_s"] = row["prefill_flops"] / (peaks["matmul_tflops"] * 1e12)
        row["prefill_fits"] = True
    except Exception as err:  # noqa: BLE001 - out of memory is a result
        row["prefill"] = failure(err)
        row["prefill_fits"] = row["prefill"]["fits"]
        cache = None  # it may have been donated to the failed run
        gc.collect()
    # Decode at batch 1 (on the prefilled cache when there is one).
    try:
        row["decode_cache"] = "prefilled" if cache is not None else "synthetic"
        if cache is None:
            cache = synthetic_cache(config, 1, max_len, t)
        tokens = jnp.asarray(rng.integers(0, config.vocab_size, (1,)), jnp.int32)
        t0 = time.perf_counter()
        compiled = decode_fn(graphdef).lower(state, tokens, cache).compile()
        row["decode_compile_s"] = time.perf_counter() - t0
        row["decode_memory"] = compiled_memory(compiled)
        ms, synced, cache = time_decode(compiled, state, tokens, cache, args.decode_steps)
        read = weight_bytes_read(config, state, 1) + cache_bytes_read(config, t, max_len)
        row.update(decode_ms=ms, decode_ms_synced=synced, decode_bytes_read=read,
                   decode_bound_ms=read / bw * 1e3, decode_fits=True)
        row["decode_fraction_of_bound"] = row["decode_bound_ms"] / ms
    except Exception as err:  # noqa: BLE001
        row["decode"] = failure(err)
        row["decode_fits"] = row["decode"]["fits"]
    del cache
    gc.collect()
    row["device_memory_after"] = device_memory()
    return row


# ------------------------------------------------------------------------------ phase 2
def try_batch(config, graphdef, state, t: int, batch: int, args, peaks) -> dict:
    max_len = t + 2 * args.decode_steps + 8
    res = {"batch": batch, "cache_bytes": cache_bytes(config, max_len, batch)}
    cache = None
    try:
        cache = synthetic_cache(config, batch, max_len, t)
        tokens = jnp.asarray(np.random.default_rng(batch).integers(0, config.vocab_size,
                                                                   (batch,)), jnp.int32)
        compiled = decode_fn(graphdef).lower(state, tokens, cache).compile()
        ms, synced, cache = time_decode(compiled, state, tokens, cache, args.batch_steps)
        read = (weight_bytes_read(config, state, batch)
                + batch * cache_bytes_read(config, t, max_len))
        bound_ms = read / (peaks.get("bandwidth_gbps", peaks["copy_gbps"]) * 1e9) * 1e3
        res.update(fits=True, decode_ms=ms, decode_ms_synced=synced,
                   tokens_per_s=batch * 1e3 / ms, bound_ms=bound_ms,
                   bound_tokens_per_s=batch * 1e3 / bound_ms)
    except Exception as err:  # noqa: BLE001
        res.update(failure(err))
    del cache
    gc.collect()
    return res


def attempt_in_child(attention: str, t: int, batch: int, args, bandwidth_gbps: float) -> dict:
    """One try_batch in a fresh process: an out-of-memory attempt cannot leave memory behind
    for the next one (in one process it did: every later attempt failed, even batch 1)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--try-batch",
           f"{attention},{t},{batch}", "--bandwidth-gbps", str(bandwidth_gbps),
           "--batch-steps", str(args.batch_steps), "--decode-steps", str(args.decode_steps)
           ] + (["--quick"] if args.quick else []) + layout_args(args)
    res = json_from_child(cmd, timeout=args.attempt_timeout_s)
    return res if "batch" in res else {"batch": batch, "fits": None, **res}


def batch_search(config: CCAConfig, t: int, args, free_bytes: int | None,
                 bandwidth_gbps: float) -> dict:
    """The largest batch that fits, each attempt in its own process: start from the batch the
    free memory predicts, step down by ~15% while an attempt runs out of memory, and once one
    fits try ~15% more to show the boundary (at most ``MAX_ATTEMPTS`` attempts)."""
    max_len = t + 2 * args.decode_steps + 8
    per_seq = cache_bytes(config, max_len, 1)
    predicted = max(1, int(free_bytes * 0.97) // per_seq) if free_bytes else args.max_batch
    batch = min(predicted, args.max_batch)
    tried: dict[int, dict] = {}
    while 1 <= batch <= args.max_batch and batch not in tried and len(tried) < MAX_ATTEMPTS:
        res = attempt_in_child(config.attention, t, batch, args, bandwidth_gbps)
        tried[batch] = res
        print(f"  {config.attention} T={t} batch {batch}: "
              f"{'fits' if res['fits'] else res.get('error', '')[:120]}"
              + (f" {res['tokens_per_s']:.1f} tok/s" if res.get("fits") else ""), flush=True)
        if res["fits"] is None:  # an error other than out of memory: stop searching
            break
        fits = [b for b, r in tried.items() if r["fits"]]
        if res["fits"]:
            if any(b > batch for b in tried):  # the next size up was tried and failed
                break
            batch = max(batch + 1, int(batch * 1.15))
        else:
            if fits:  # a smaller one fits already: the boundary is found
                break
            batch = min(batch - 1, int(batch * 0.85))
    fits = [b for b, r in tried.items() if r["fits"]]
    best = max(fits) if fits else None
    return {"attention": config.attention, "T": t, "predicted_batch": predicted,
            "largest_batch": best, "capped": bool(best and best >= args.max_batch),
            "tokens_per_s": tried[best]["tokens_per_s"] if best else None,
            "tried": [tried[b] for b in sorted(tried)]}


def child_attempt(args) -> int:
    """--try-batch ATT,T,B: build the model, run one try_batch, write its JSON to --out."""
    attention, t, batch = args.try_batch.split(",")
    t, batch = int(t), int(batch)
    config = base_config(args.quick, t + 2 * args.decode_steps + 8,
                         not args.separate_projections).replace(attention=attention)
    state = jax.block_until_ready(random_state(config))
    peaks = {"bandwidth_gbps": args.bandwidth_gbps, "copy_gbps": args.bandwidth_gbps}
    res = try_batch(config, graphdef_of(config), state, t, batch, args, peaks)
    res["device_memory"] = device_memory()
    Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


# ------------------------------------------------------------------------------ main
def summary(results) -> str:
    lines = [f"{'att':4s} {'T':>7s} {'prefill s':>10s} {'floor s':>8s} {'decode ms':>10s} "
             f"{'synced ms':>10s} {'bound ms':>9s} {'peak GiB':>9s}"]
    for r in results["batch1"]:
        pre = f"{r['prefill_s']:10.3f}" if "prefill_s" in r else f"{'no fit':>10s}"
        floor = f"{r['prefill_floor_s']:8.3f}" if "prefill_floor_s" in r else f"{'':8s}"
        dec = (f"{r['decode_ms']:10.2f} {r['decode_ms_synced']:10.2f} "
               f"{r['decode_bound_ms']:9.2f}") if "decode_ms" in r else f"{'no fit':>10s}"
        mem = r.get("device_memory_after") or {}
        peak = f"{mem['peak_bytes_in_use'] / 2**30:9.1f}" if "peak_bytes_in_use" in mem else ""
        lines.append(f"{r['attention']:4s} {r['T']:7d} {pre} {floor} {dec} {peak}")
    for r in results["batch_search"]:
        tps = f"{r['tokens_per_s']:.1f} tok/s" if r["tokens_per_s"] else "none fits"
        lines.append(f"{r['attention']:4s} {r['T']:7d} largest batch {r['largest_batch']}: {tps}")
    by = {(r["attention"], r["T"]): r for r in results["batch1"]}
    for t in sorted({r["T"] for r in results["batch1"]}):
        c, f = by.get(("cca", t), {}), by.get(("full", t), {})
        if "decode_ms" in c and "decode_ms" in f:
            lines.append(f"T={t}: decode speed-up {f['decode_ms'] / c['decode_ms']:.2f}x"
                         + (f", prefill speed-up {f['prefill_s'] / c['prefill_s']:.2f}x"
                            if "prefill_s" in c and "prefill_s" in f else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default=None,
                    help="comma-separated context lengths (default 16384,32768,65536,131072; "
                         "--quick: 256,512)")
    ap.add_argument("--attention", default="cca,full", help="which of cca,full to run")
    ap.add_argument("--quick", action="store_true", help="tiny model and lengths (CPU check)")
    ap.add_argument("--skip-batch-search", action="store_true")
    ap.add_argument("--separate-projections", action="store_true",
                    help="q, k, v and gate, up as separate matrices (the training layout) instead "
                         "of the fused serving layout")
    ap.add_argument("--prefill-reps", type=int, default=None, help="timed prefills (default 2)")
    ap.add_argument("--decode-steps", type=int, default=None, help="timed steps (default 32)")
    ap.add_argument("--batch-steps", type=int, default=None,
                    help="timed steps per batch size of the search (default 10)")
    ap.add_argument("--max-batch", type=int, default=None, help="largest batch tried (256)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/ or $OUT)")
    ap.add_argument("--attempt-timeout-s", type=float, default=300.0,
                    help="limit of one batch-search attempt (each runs in its own process)")
    ap.add_argument("--try-batch", default=None, help=argparse.SUPPRESS)  # ATT,T,B: child mode
    ap.add_argument("--bandwidth-gbps", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    q = args.quick
    lengths = [int(x) for x in (args.lengths or ("256,512" if q else
                                                 "16384,32768,65536,131072")).split(",")]
    attentions = [a for a in args.attention.split(",") if a]
    if any(a not in ATTENTIONS for a in attentions) or not attentions:
        ap.error(f"--attention takes a comma-separated subset of {ATTENTIONS}")
    if any(t < 2 for t in lengths):
        ap.error("--lengths must be integers >= 2")
    args.prefill_reps = args.prefill_reps or (1 if q else 2)
    args.decode_steps = args.decode_steps or (4 if q else 32)
    args.batch_steps = args.batch_steps or (3 if q else 10)
    args.max_batch = args.max_batch or (4 if q else 256)

    if args.try_batch:
        return child_attempt(args)
    if not args.skip_batch_search:
        return phase1_then_search(args, lengths, attentions)
    t_start = time.perf_counter()
    env = environment()
    peaks = measure_peaks(size=512, copy_bytes=2**24) if q else measure_peaks()
    print(env, peaks, flush=True)
    config = base_config(q, max(lengths) + 2 * args.decode_steps + 8,
                         not args.separate_projections)
    t0 = time.perf_counter()
    state = jax.block_until_ready(random_state(config))
    init_s = time.perf_counter() - t0
    configs = {a: config.replace(attention=a) for a in attentions}
    graphdefs = {a: graphdef_of(c) for a, c in configs.items()}
    results = {"env": env, "peaks": peaks, "quick": q, "config": json.loads(config.to_json()),
               "params": int(sum(x.size for x in jax.tree_util.tree_leaves(state))),
               "weight_bytes": nbytes(state), "init_s": init_s,
               "device_memory_after_init": device_memory(), "batch1": [], "batch_search": []}
    print(f"weights {results['weight_bytes'] / 2**30:.2f} GiB, init {init_s:.1f} s", flush=True)
    for a in attentions:  # CCA first, lengths ascending: the process-wide peak grows row by row
        for t in lengths:
            row = bench_batch1(configs[a], graphdefs[a], state, t, args, peaks)
            print({k: v for k, v in row.items() if not isinstance(v, dict)}, flush=True)
            results["batch1"].append(row)
            write(results, args, t_start)  # after every row: a run cut short keeps its rows
    path = write(results, args, t_start)
    print(summary(results))
    print(f"saved {path} ({results['total_s']:.0f} s)")
    return 0


def write(results: dict, args, t_start: float) -> Path:
    results["total_s"] = time.perf_counter() - t_start
    if not args.out:
        name = "decode_quick" if results["quick"] else \
            "decode_" + results["env"]["device"].replace(" ", "_")
        return save_results(name, results)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    return path


def phase1_then_search(args, lengths: list[int], attentions: list[str]) -> int:
    """Phase 1 in one child process, then every batch-search attempt in a child of its own.
    This process never touches the device: the memory JAX takes up front in a process stays
    taken until it exits, and each child needs all of it."""
    t_start = time.perf_counter()
    common = ["--lengths", ",".join(map(str, lengths)), "--attention", ",".join(attentions),
              "--prefill-reps", str(args.prefill_reps), "--decode-steps", str(args.decode_steps),
              "--batch-steps", str(args.batch_steps), "--max-batch", str(args.max_batch),
              *layout_args(args)]
    with tempfile.TemporaryDirectory() as tmp:
        # Straight into --out when given, so that phase 1's rows survive a run cut short.
        phase1 = Path(args.out) if args.out else Path(tmp) / "phase1.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *common, "--skip-batch-search",
               "--out", str(phase1)] + (["--quick"] if args.quick else [])
        proc = subprocess.run(cmd)  # its output streams through
        if not phase1.exists():
            print(f"phase 1 wrote no results (exit {proc.returncode})", file=sys.stderr)
            return 1
        results = json.loads(phase1.read_text())
    mem = results.get("device_memory_after_init") or {}
    free = mem["bytes_limit"] - mem["bytes_in_use"] if "bytes_limit" in mem else None
    peaks = results["peaks"]
    bandwidth = peaks.get("bandwidth_gbps", peaks["copy_gbps"])
    config = base_config(args.quick, max(lengths) + 2 * args.decode_steps + 8,
                         not args.separate_projections)
    for a in attentions:
        for t in lengths:
            results["batch_search"].append(
                batch_search(config.replace(attention=a), t, args, free, bandwidth))
            write(results, args, t_start)
    path = write(results, args, t_start)  # total_s: phase 1 and the search
    print(summary(results))
    print(f"saved {path} ({results['total_s']:.0f} s)")
    return 0 if proc.returncode == 0 else proc.returncode


if __name__ == "__main__":
    sys.exit(main())
