"""StreamingLLM-style attention (jax_cca/streaming.py): the op against a brute-force StreamingLLM
built literally (a per-query cache of [sinks ; window] with positions re-numbered by cache slot,
RoPE applied at those positions, in float64 numpy), against full attention when the window covers
everything, the cached decode against the prefill, and the model wrapper."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_cca import CCAConfig, CCALlama
from jax_cca.rope import apply_rope, rope_cos_sin
from jax_cca.streaming import (
    StreamingLlama,
    sink_query_positions,
    streaming_attention,
    streaming_cache_bytes,
    streaming_extend_attention,
    streaming_model,
)
from kernels.cca.reference import full_attention_naive

THETA = 10000.0


def _inv_freq(d: int) -> np.ndarray:
    return 1.0 / THETA ** (np.arange(0, d, 2) / d)


def _rotate_np(x: np.ndarray, pos: float) -> np.ndarray:
    """RoPE (rotate-half layout) of vectors x (..., D) at one position, float64."""
    angles = pos * _inv_freq(x.shape[-1])
    cos, sin = np.cos(np.r_[angles, angles]), np.sin(np.r_[angles, angles])
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def streamingllm_brute_force(q_raw, k_raw, v, sink: int, window: int) -> np.ndarray:
    """Un-rotated q, k (B, T, H, D): for each query, the StreamingLLM cache [sinks ; last W
    tokens], each cached token rotated at its slot index (original positions while nothing has
    been evicted), the query at the last slot."""
    b, t, hq, d = q_raw.shape
    hkv = k_raw.shape[2]
    out = np.zeros((b, t, hq, d))
    for i in range(t):
        kept = [p for p in range(i + 1) if p < sink or p > i - window]
        evicted = len(kept) < i + 1
        slot = {p: (n if evicted else p) for n, p in enumerate(kept)}
        for bi in range(b):
            for h in range(hq):
                kv = h // (hq // hkv)
                q = _rotate_np(q_raw[bi, i, h], slot[i])
                keys = np.stack([_rotate_np(k_raw[bi, p, kv], slot[p]) for p in kept])
                s = keys @ q / np.sqrt(d)
                w = np.exp(s - s.max())
                out[bi, i, h] = (w / w.sum()) @ v[bi, kept, kv]
    return out


def _rotated_inputs(q_raw, k_raw, sink, window):
    """The op's inputs: q and k rotated at their positions, q_sink at min(t, S + W - 1)."""
    b, t = q_raw.shape[:2]
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    inv = _inv_freq(q_raw.shape[-1]).astype(np.float32)
    cos, sin = rope_cos_sin(pos, inv)
    cos_s, sin_s = rope_cos_sin(sink_query_positions(pos, sink, window), inv)
    q, k = jnp.asarray(q_raw, jnp.float32), jnp.asarray(k_raw, jnp.float32)
    return apply_rope(q, cos, sin), apply_rope(q, cos_s, sin_s), apply_rope(k, cos, sin)


def _random(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape)


@pytest.mark.parametrize("t,sink,window,hq,hkv,d,chunk", [
    (37, 4, 8, 4, 2, 16, 8),     # GQA 2, chunks not dividing T
    (45, 1, 13, 5, 1, 8, 16),    # GQA 5, one sink, odd window
    (29, 0, 7, 2, 2, 8, None),   # no sinks: a plain sliding window
    (23, 3, 40, 2, 1, 8, 4),     # window longer than the sequence
])
def test_matches_streamingllm_brute_force(t, sink, window, hq, hkv, d, chunk, rel_err):
    q_raw, k_raw = _random((2, t, hq, d), 0), _random((2, t, hkv, d), 1)
    v = _random((2, t, hkv, d), 2)
    q, q_sink, k = _rotated_inputs(q_raw, k_raw, sink, window)
    out = streaming_attention(q, k, jnp.asarray(v, jnp.float32), q_sink=q_sink,
                              sink_tokens=sink, local_window=window, chunk_size=chunk)
    ref = streamingllm_brute_force(q_raw, k_raw, v, sink, window)
    assert rel_err(out, ref) < 1e-5


def test_sinks_matter_when_evicting(rel_err):
    """Guards the brute force itself: dropping the middle changes the output, and the sink
    re-numbering changes it too (so both are really exercised above)."""
    t, sink, window = 33, 2, 6
    q_raw, k_raw, v = _random((1, t, 2, 8), 3), _random((1, t, 2, 8), 4), _random((1, t, 2, 8), 5)
    q, q_sink, k = _rotated_inputs(q_raw, k_raw, sink, window)
    vj = jnp.asarray(v, jnp.float32)
    full = full_attention_naive(q, k, vj)
    renumbered = streaming_attention(q, k, vj, q_sink=q_sink, sink_tokens=sink,
                                     local_window=window)
    original = streaming_attention(q, k, vj, sink_tokens=sink, local_window=window)
    assert rel_err(renumbered, full) > 1e-2
    assert rel_err(renumbered, original) > 1e-3
    np.testing.assert_allclose(np.asarray(renumbered)[:, : sink + window],
                               np.asarray(full)[:, : sink + window], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sink,window", [(4, 60), (0, 61), (64, 1)])
def test_window_covering_everything_is_full_attention(sink, window, rel_err):
    t = 61
    q_raw, k_raw = _random((2, t, 4, 16), 6), _random((2, t, 2, 16), 7)
    v = _random((2, t, 2, 16), 8)
    q, q_sink, k = _rotated_inputs(q_raw, k_raw, sink, window)
    vj = jnp.asarray(v, jnp.float32)
    out = streaming_attention(q, k, vj, q_sink=q_sink, sink_tokens=sink, local_window=window,
                              chunk_size=16)
    assert rel_err(out, full_attention_naive(q, k, vj)) < 1e-5


def test_extend_matches_whole_sequence(rel_err):
    """Prompt into a FullCache, then one token at a time and a chunk of 5: each row equals the
    whole-sequence op's row (positions past the window included)."""
    from jax_cca.cache import FullCache

    t, t0, sink, window = 40, 17, 3, 9
    q_raw, k_raw = _random((2, t, 4, 16), 9), _random((2, t, 2, 16), 10)
    v = _random((2, t, 2, 16), 11)
    q, q_sink, k = _rotated_inputs(q_raw, k_raw, sink, window)
    vj = jnp.asarray(v, jnp.float32)
    ref = streaming_attention(q, k, vj, q_sink=q_sink, sink_tokens=sink, local_window=window)
    zeros = jnp.zeros((2, t, 2, 16), jnp.float32)
    cache = FullCache(zeros, zeros, jnp.zeros((2,), jnp.int32))
    cache = cache.append(k[:, :t0], vj[:, :t0], jnp.full((2,), t0, jnp.int32))
    step = jax.jit(functools.partial(streaming_extend_attention, sink_tokens=sink,
                                     local_window=window))
    rows, pos = [], t0
    for size in (1, 1, 5, 1, 15):
        sl = slice(pos, pos + size)
        o, cache = step(cache, q[:, sl], q_sink[:, sl], k[:, sl], vj[:, sl],
                        jnp.full((2,), size, jnp.int32))
        rows.append(o)
        pos += size
    assert pos == t and np.all(np.asarray(cache.lengths) == t)
    assert rel_err(jnp.concatenate(rows, axis=1), ref[:, t0:]) < 1e-5


def test_bad_arguments():
    x = jnp.ones((1, 5, 2, 8))
    with pytest.raises(ValueError, match="sink_tokens"):
        streaming_attention(x, x, x, sink_tokens=-1, local_window=4)
    with pytest.raises(ValueError, match="local_window"):
        streaming_attention(x, x, x, sink_tokens=2, local_window=0)
    with pytest.raises(ValueError, match="q_sink"):
        streaming_attention(x, x, x, sink_tokens=2, local_window=4, q_sink=x[:, :3])


# ------------------------------------------------------------------------------ the model
CONFIG = CCAConfig.tiny(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2,
                        num_heads=4, num_kv_heads=2, group_size=4, local_window=8)


@pytest.fixture(scope="module")
def base_model():
    return CCALlama.from_config(CONFIG, seed=1)


def test_model_decode_matches_forward(base_model, rel_err):
    """Prefill 13 tokens, then decode 14 more one by one (teacher-forced): each step's logits
    equal the whole-sequence forward's at that position. The window (6) and sinks (2) are far
    shorter than the 27 tokens, so eviction and sink re-numbering happen in both paths."""
    model = streaming_model(base_model, sink_tokens=2, local_window=6)
    ids = np.random.default_rng(0).integers(3, CONFIG.vocab_size, (2, 27))
    ref = np.asarray(model(jnp.asarray(ids)))
    cache = model.init_cache(2, 27)
    logits, cache = model.prefill(ids[:, :13], None, cache)
    steps = [logits]
    for i in range(13, 26):
        logits, cache = model.decode_step(ids[:, i], cache)
        steps.append(logits)
    assert rel_err(jnp.stack(steps, axis=1), ref[:, 12:26]) < 1e-4
    chunked, _ = model.prefill(ids[:, :13], None, model.init_cache(2, 27), chunk_size=5)
    assert rel_err(chunked, ref[:, 12]) < 1e-4
    # and the whole model really differs from full attention at this length
    assert rel_err(ref, base_model(jnp.asarray(ids))) > 1e-2


def test_model_with_wide_window_is_the_full_model(base_model, rel_err):
    ids = jnp.asarray(np.random.default_rng(1).integers(3, CONFIG.vocab_size, (2, 30)))
    model = streaming_model(base_model, sink_tokens=4, local_window=26)
    assert isinstance(model, StreamingLlama) and model.config.attention == "full"
    assert rel_err(model(ids), base_model(ids)) < 1e-5


def test_model_from_cca_weights_and_back(base_model, rel_err):
    cca = base_model.with_attention(attention="cca")
    model = streaming_model(cca, sink_tokens=1, local_window=3)
    ids = jnp.asarray(np.random.default_rng(2).integers(3, CONFIG.vocab_size, (1, 11)))
    back = model.with_attention(attention="full")
    assert type(back) is CCALlama
    assert rel_err(back(ids), base_model(ids)) < 1e-6
    with pytest.raises(ValueError, match="positions"):
        model(ids, positions=jnp.arange(11)[None])
    with pytest.raises(ValueError, match="local_window"):
        streaming_model(base_model, sink_tokens=2, local_window=0)


def test_cache_bytes():
    b = streaming_cache_bytes(CONFIG, 3, sink_tokens=4, local_window=12)
    assert b == CONFIG.num_layers * 2 * 3 * 16 * CONFIG.num_kv_heads * CONFIG.head_dim * 4
