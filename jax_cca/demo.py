"""The main job: ``jax-cca`` (or ``jax-cca demo``) compares CCA with full attention on a small
random LLaMA, on the CPU, with no downloads.

It checks that CCA with a local window covering the whole prompt is exactly full attention, times
a long prefill and a short greedy generation (prefill, then cached decode steps) under both
attentions, and prints the attention FLOPs and the exact decode-cache sizes (``jax_cca.cache``) for
the tiny model and for LLaMA-2-7B at 128K tokens (the paper's setting).
Every number printed is also returned by :func:`run_demo` as a dict.
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jax_cca.cache import cache_bytes
from jax_cca.config import CCAConfig
from jax_cca.generation import run_generation
from jax_cca.model import CCALlama
from kernels.cca.reference import visible_key_counts

# LLaMA-2-7B (CCAConfig.llama2_7b: 32 layers, 32 query and 32 kv heads of dim 128) at the
# paper's 128K setting.
LONG_CONTEXT = 128 * 1024
PAPER_GROUP, PAPER_WINDOW = 16, 1024


# ------------------------------------------------------------------------------ cost model
def attention_keys(length: int, attention: str, group_size: int = 16,
                   local_window: int = 1024) -> int:
    """Keys scored, summed over the queries of one head of a length-``length`` sequence.

    Full causal attention: query t sees t + 1 keys, T(T+1)/2 in all. CCA: the visible core tokens
    plus the raw keys of each query's local window (``kernels.cca.reference.visible_key_counts``).
    """
    if attention == "full":
        return length * (length + 1) // 2
    core, raw = visible_key_counts(length, group_size, local_window)
    return core + raw


def attention_flops(length: int, attention: str, *, head_dim: int, num_heads: int,
                    num_layers: int, batch: int = 1, group_size: int = 16,
                    local_window: int = 1024) -> int:
    """Matmul FLOPs of the attention scores and the weighted sum of values (2 * D each per key,
    2 FLOPs per multiply-add): 4 * D * keys * Hq * layers * B. CCA's pooling (about 4 * D per raw
    key per kv head, once) and the softmax are left out: they are a few percent at most."""
    keys = attention_keys(length, attention, group_size, local_window)
    return 4 * head_dim * keys * num_heads * num_layers * batch


def llama2_7b_costs(length: int = LONG_CONTEXT, group_size: int = PAPER_GROUP,
                    local_window: int = PAPER_WINDOW, dtype: str = "bfloat16") -> dict:
    """Attention FLOPs and decode-cache bytes (``jax_cca.cache.cache_bytes``: the exact size of
    the arrays ``init_cache`` allocates) of LLaMA-2-7B for one sequence, full vs CCA."""
    out = {"length": length, "group_size": group_size, "local_window": local_window}
    for att in ("full", "cca"):
        hp = dict(group_size=group_size, local_window=local_window)
        config = CCAConfig.llama2_7b(attention=att, dtype=dtype, **hp)
        out[att] = {
            "attention_flops": attention_flops(length, att, head_dim=config.head_dim,
                                               num_heads=config.num_heads,
                                               num_layers=config.num_layers, **hp),
            "kv_cache_bytes": cache_bytes(config, length),
        }
    return out


# ------------------------------------------------------------------------------ measurements
def relative_error(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def _forward_fn(model: CCALlama) -> Callable:
    """A jitted ``ids -> logits`` for ``model`` (the state is an argument, not a constant)."""
    graphdef, state = nnx.split(model)
    jitted = jax.jit(lambda st, ids: nnx.merge(graphdef, st)(ids))
    return lambda ids: jitted(state, ids)


def time_prefill(model: CCALlama, ids: jax.Array, repeats: int, bar=None) -> tuple[np.ndarray,
                                                                                    float]:
    """(logits, median seconds of ``repeats`` forwards after one compile-and-run warm-up)."""
    forward = _forward_fn(model)
    logits = forward(ids).block_until_ready()
    if bar is not None:
        bar.update(1)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward(ids).block_until_ready()
        times.append(time.perf_counter() - start)
        if bar is not None:
            bar.update(1)
    return np.asarray(logits), statistics.median(times)


def time_generation(model: CCALlama, prompt: jax.Array, new_tokens: int,
                    progress: bool | str) -> tuple[np.ndarray, float]:
    """(new tokens (B, N), seconds per cached decode step), greedy.

    A first, untimed generation compiles the prefill and the decode step for this cache size;
    the second one is timed, and only its decode steps count (the prefill is timed above). With
    one new token there is no decode step: its time is the prefill's.
    """
    ids = np.asarray(prompt, np.int32)
    lengths = np.full(ids.shape[:1], ids.shape[1])
    run_generation(model, ids, lengths, new_tokens)
    tokens, stats = run_generation(model, ids, lengths, new_tokens, progress=progress)
    if stats.decode_steps == 0:
        return tokens, stats.prefill_seconds
    return tokens, stats.decode_seconds / stats.decode_steps


# ------------------------------------------------------------------------------ the demo
def run_demo(length: int = 2048, new_tokens: int = 16, *, group_size: int = 16,
             local_window: int = 256, batch: int = 1, seed: int = 0, repeats: int = 3,
             config: CCAConfig | None = None, progress: bool = True,
             verbose: bool = True) -> dict:
    """Full vs CCA attention on ``config`` (default ``CCAConfig.tiny()``), random weights.

    Returns every printed number in a dict; prints the report when ``verbose``; tqdm bars on
    stderr when ``progress``.
    """
    model_name = "CCAConfig.tiny()" if config is None else "config"
    config = config or CCAConfig.tiny()
    for name, value, low in (("length", length, 1), ("new_tokens", new_tokens, 0),
                             ("batch", batch, 1), ("repeats", repeats, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}; got {value!r}")
    if length + new_tokens > config.max_position_embeddings:
        raise ValueError(
            f"length {length} + new_tokens {new_tokens} exceeds max_position_embeddings "
            f"({config.max_position_embeddings}) of the demo model"
        )
    emit = functools.partial(print, flush=True) if verbose else (lambda *a, **k: None)
    full_model = CCALlama.from_config(config.replace(attention="full"), seed=seed)
    cca_model = full_model.with_attention(attention="cca", group_size=group_size,
                                          local_window=local_window)
    # The smallest window (a multiple of g) with w >= T + g: every query's local region is [0, t].
    wide = -(-(length + group_size) // group_size) * group_size
    wide_model = full_model.with_attention(attention="cca", group_size=group_size,
                                           local_window=wide)
    c = config
    res: dict = {
        "config": {"num_layers": c.num_layers, "num_heads": c.num_heads,
                   "num_kv_heads": c.num_kv_heads, "head_dim": c.head_dim,
                   "hidden_size": c.hidden_size, "vocab_size": c.vocab_size,
                   "dtype": c.dtype, "num_params": full_model.num_params()},
        "group_size": group_size, "local_window": local_window, "length": length,
        "batch": batch, "new_tokens": new_tokens, "backend": jax.default_backend(),
    }
    rng = np.random.default_rng(seed)
    prompt = jnp.asarray(rng.integers(0, c.vocab_size, (batch, length)), jnp.int32)

    emit("jax-cca demo: Core Context Aware attention (CCA) vs full attention")
    emit(f"  device  {res['backend'].upper()}; random weights (seed {seed}), nothing downloaded")
    emit(f"  model   {model_name}: {c.num_layers} layers, {c.num_heads} query heads, "
         f"{c.num_kv_heads} kv heads, head dim {c.head_dim},")
    emit(f"          hidden {c.hidden_size}, vocab {c.vocab_size}, "
         f"{res['config']['num_params'] / 1e6:.2f} M params, {c.dtype}")
    emit(f"  CCA     group size g = {group_size}, local window w = {local_window}: query t sees "
         "its last w to w+g-1")
    emit(f"          tokens raw (group-aligned) and one pooled core token for each earlier "
         f"group of {group_size}")
    emit(f"  prompt  {batch} x {length} random token ids")

    steps = 1 + 2 * (1 + repeats)
    with tqdm(total=steps, desc="prefill: compile + timed runs", leave=False,
              disable=not progress) as bar:
        full_logits, full_s = time_prefill(full_model, prompt, repeats, bar)
        cca_logits, cca_s = time_prefill(cca_model, prompt, repeats, bar)
        wide_logits = np.asarray(_forward_fn(wide_model)(prompt))
        bar.update(1)

    diff = np.abs(wide_logits.astype(np.float64) - full_logits)
    res["window_check"] = {"local_window": wide, "max_abs": float(diff.max()),
                           "relative_error": relative_error(wide_logits, full_logits)}
    res["window_check"]["ok"] = bool(res["window_check"]["relative_error"] < 1e-4)
    res["relative_difference"] = relative_error(cca_logits, full_logits)
    hp = dict(group_size=group_size, local_window=local_window)
    for att, logits, seconds in (("full", full_logits, full_s), ("cca", cca_logits, cca_s)):
        res[att] = {
            "logits_shape": tuple(logits.shape),
            "prefill_ms_per_token": 1e3 * seconds / (batch * length),
            "attention_keys": attention_keys(length, att, **hp),
            "attention_flops": attention_flops(length, att, head_dim=c.head_dim,
                                               num_heads=c.num_heads, num_layers=c.num_layers,
                                               batch=batch, **hp),
            "kv_cache_bytes": cache_bytes(config.replace(attention=att, **hp), length, batch),
        }
    res["llama2_7b"] = llama2_7b_costs()

    check = res["window_check"]
    emit("")
    emit(f"1. Exactness check: CCA with a window covering the whole prompt (w = {wide}) is full "
         "attention")
    emit(f"   logits max |diff| {check['max_abs']:.1e}, relative error "
         f"{check['relative_error']:.1e}  -> {'OK' if check['ok'] else 'MISMATCH'} "
         f"({c.dtype} rounding only)")
    full, cca = res["full"], res["cca"]
    emit("")
    emit(f"2. Prefill of the {length}-token prompt (median of {repeats} runs after a jit "
         "warm-up)")
    rows = [
        ("", "full attention", f"CCA (g={group_size}, w={local_window})"),
        ("logits shape", str(full["logits_shape"]), str(cca["logits_shape"])),
        ("time per token", f"{full['prefill_ms_per_token']:.3f} ms",
         f"{cca['prefill_ms_per_token']:.3f} ms"),
        ("attention FLOPs", _flops(full["attention_flops"]),
         f"{_flops(cca['attention_flops'])} "
         f"({full['attention_flops'] / cca['attention_flops']:.1f}x fewer)"),
        (f"KV cache ({c.dtype})", _bytes(full["kv_cache_bytes"]),
         f"{_bytes(cca['kv_cache_bytes'])} ({_less(cca, full)})"),
    ]
    emit(_table(rows))
    if length < local_window + group_size:  # start(t) = 0 for every query: CCA is full
        emit(f"   relative difference of CCA logits vs full: {res['relative_difference']:.1e} "
             f"(the whole prompt fits in the local window: CCA is full attention here)")
    else:
        emit(f"   relative difference of CCA logits vs full: {res['relative_difference']:.3f} "
             "(not small: CCA is a different attention;")
        emit("   the paper fine-tunes ~1,000 steps after swapping it in)")

    big = res["llama2_7b"]
    emit("")
    emit(f"3. LLaMA-2-7B shapes at {LONG_CONTEXT // 1024}K tokens, bf16, CCA g={PAPER_GROUP}, "
         f"w={PAPER_WINDOW} (the paper's setting)")
    emit(_table([
        ("", "full attention", "CCA"),
        ("KV cache", _bytes(big["full"]["kv_cache_bytes"]),
         f"{_bytes(big['cca']['kv_cache_bytes'])} ({_less(big['cca'], big['full'])})"),
        ("attention FLOPs", _flops(big["full"]["attention_flops"]),
         f"{_flops(big['cca']['attention_flops'])} "
         f"({big['full']['attention_flops'] / big['cca']['attention_flops']:.1f}x fewer)"),
    ]))

    if new_tokens:
        for att, model in (("full", full_model), ("cca", cca_model)):
            label = f"{att}: generating {new_tokens} tokens" if progress else False
            tokens, seconds = time_generation(model, prompt, new_tokens, label)
            res[att]["generated"] = tokens
            res[att]["generate_ms_per_token"] = 1e3 * seconds
        agree = int((res["full"]["generated"] == res["cca"]["generated"]).sum())
        res["generated_agreement"] = agree
        shown = min(new_tokens, 8)
        emit("")
        emit(f"4. Greedy generation of {new_tokens} tokens after the prompt")
        emit("   (the prompt is prefilled once, then each token is one decode step over the cache:")
        emit("   full attention reads every cached key, CCA its core tokens and its raw ring)")
        emit(_table([
            ("", "full attention", "CCA"),
            ("time per token", f"{res['full']['generate_ms_per_token']:.1f} ms",
             f"{res['cca']['generate_ms_per_token']:.1f} ms"),
            (f"first {shown} tokens", _ids(res["full"]["generated"][0, :shown]),
             _ids(res["cca"]["generated"][0, :shown])),
        ]))
        emit(f"   {agree} of {batch * new_tokens} generated tokens agree (random weights: "
             "tokens are meaningless)")
    return res


# ------------------------------------------------------------------------------ formatting
def _table(rows: list[tuple[str, str, str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(
        "   " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows
    )


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _flops(n: float) -> str:
    for unit, size in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} FLOP"


def _less(cca: dict, full: dict) -> str:
    saved = 1 - cca["kv_cache_bytes"] / full["kv_cache_bytes"]
    return f"{100 * saved:.0f}% less" if saved >= 0 else f"{-100 * saved:.0f}% more"


def _ids(tokens) -> str:
    return " ".join(str(int(t)) for t in tokens)

