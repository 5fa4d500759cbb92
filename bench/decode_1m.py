"""Whole-model decode at 1M tokens of context: a 1B-class LLaMA with ReAttention (and with full
attention over the same cache, for comparison) on one GPU.

    PYTHONPATH=. python bench/decode_1m.py --out $OUT/decode_1m.json       # H100 / H200, ~3 min
    PYTHONPATH=. python bench/decode_1m.py --quick --out /tmp/d1m.json     # tiny, CPU, < 1 min

Model: LLaMA-3.2-1B shapes (16 layers, hidden 2048, 32 query / 8 kv heads of 64, vocab 128256,
tied embeddings), random bf16 weights. Cache: ``--context`` tokens (default 2^20) of random un-
rotated keys and values in every layer (``ReAttentionCache``: the full cache is kept, 32 GiB at 1M),
without a prefill (a 1M-token prefill takes minutes; the decode step reads the same rows whatever
wrote them). ReAttention uses the authors' defaults (``CCAConfig``: sink 32, window 8192, top 4,
256 positions, spans of 32), so every position it hands out stays below the 128K pretrained range.
``reattention_blocks`` (in ``--attention``) is ReAttention picking blocks as wide as its span
(``reattention_key_block``: 32 keys with the defaults), whose cache also keeps the blocks'
summaries, computed here from the random keys as the cache's writes would have left them.
Decode ms/token as in ``bench/bench_decode.py`` (steps dispatched back to back), the compiled
step's memory, the device's peak, and whether the logits are finite.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.bench_decode import (decode_fn, device_memory, failure, graphdef_of,  # noqa: E402
                                nbytes, random_state, time_decode)
from bench.common import environment  # noqa: E402
from jax_cca import CCAConfig  # noqa: E402
from jax_cca.cache import cache_bytes, init_layer_cache  # noqa: E402
from kernels.reattention import key_blocks  # noqa: E402

METHODS = ("reattention", "reattention_blocks", "full")

ONE_B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
             num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0,
             tie_word_embeddings=True, max_position_embeddings=131072, dtype="bfloat16")
QUICK = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
             num_kv_heads=2, head_dim=32, rope_theta=10000.0, tie_word_embeddings=True,
             max_position_embeddings=1024, dtype="bfloat16", reattention_sink=4,
             reattention_window=64, reattention_top_k=2, reattention_max_selected=8,
             reattention_span=4, reattention_chunk=64, reattention_align=16)


def random_cache(config: CCAConfig, max_len: int, held: int, seed: int):
    """Per layer: random un-rotated keys and values in the first ``held`` rows, lengths = held."""
    @jax.jit
    def make(key):
        layer = init_layer_cache(config, 1, max_len)
        kk, kv = jax.random.split(key)
        shape = layer.k.shape
        rows = jnp.arange(max_len)[None, :, None, None] < held
        k = jnp.where(rows, jax.random.normal(kk, shape, jnp.float32), 0).astype(layer.k.dtype)
        v = jnp.where(rows, jax.random.normal(kv, shape, jnp.float32), 0).astype(layer.v.dtype)
        layer = layer.replace(k=k, v=v, lengths=jnp.full((1,), held, layer.lengths.dtype))
        if getattr(layer, "block_summaries", None) is not None:  # what the writes leave there
            layer = layer.replace(block_summaries=key_blocks.summaries(k, layer.selection))
        return layer

    keys = jax.random.split(jax.random.PRNGKey(seed), config.num_layers)
    return tuple(make(k) for k in keys)


def bench(method: str, config: CCAConfig, state, context: int, steps: int) -> dict:
    max_len = context + 2 * steps + 8
    row = {"method": method, "attention": config.attention,
           "key_block": config.reattention_key_block, "context": context,
           "cache_gib": cache_bytes(config, max_len) / 2**30}
    try:
        cache = random_cache(config, max_len, context, seed=1)
        tokens = jnp.zeros((1,), jnp.int32)
        t0 = time.perf_counter()
        compiled = decode_fn(graphdef_of(config)).lower(state, tokens, cache).compile()
        row["compile_s"] = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        row["step_temp_gib"] = mem.temp_size_in_bytes / 2**30 if mem else None
        ms, synced, cache = time_decode(compiled, state, tokens, cache, steps)
        row.update(decode_ms=ms, decode_ms_synced=synced, tokens_per_s=1e3 / ms, fits=True)
        del cache
    except Exception as err:  # noqa: BLE001 - out of memory is a result
        row.update(failure(err))
    gc.collect()
    row["device_memory"] = device_memory()
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=None, help="tokens held (default 2^20)")
    ap.add_argument("--attention", default="reattention,full",
                    help=f"comma-separated subset of {','.join(METHODS)}")
    ap.add_argument("--steps", type=int, default=16, help="timed decode steps")
    ap.add_argument("--quick", action="store_true", help="tiny model and context (CPU check)")
    ap.add_argument("--out", default=None, help="JSON path")
    args = ap.parse_args(argv)
    context = args.context or (2048 if args.quick else 1 << 20)
    attentions = [a for a in args.attention.split(",") if a]
    if not attentions or any(a not in METHODS for a in attentions):
        ap.error(f"--attention takes a comma-separated subset of {','.join(METHODS)}")
    base = CCAConfig(**(QUICK if args.quick else ONE_B), attention="reattention")
    state = jax.block_until_ready(random_state(base))
    results = {"env": environment(), "config": json.loads(base.to_json()),
               "weight_gib": nbytes(state) / 2**30, "rows": []}
    out = Path(args.out) if args.out else None
    for attention in attentions:
        # Full attention hands out positions up to the context: give RoPE that range.
        if attention == "full":
            config = base.replace(attention=attention, max_position_embeddings=max(
                base.max_position_embeddings, context + 2 * args.steps + 8))
        elif attention == "reattention_blocks":  # blocks must be as wide as the span
            config = base.replace(reattention_key_block=base.reattention_span)
        else:
            config = base
        row = bench(attention, config, state, context, args.steps)
        print(json.dumps(row), flush=True)
        results["rows"].append(row)
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1))
    ok = all(r.get("fits") for r in results["rows"])
    return 0 if ok and np.isfinite([r["decode_ms"] for r in results["rows"]]).all() else 1


if __name__ == "__main__":
    sys.exit(main())
