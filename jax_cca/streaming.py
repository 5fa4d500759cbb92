"""StreamingLLM-style attention (attention sinks + a sliding window), the baseline of the CCA paper,
as an attention variant of CCALlama that can be evaluated like the others (``jax_cca.eval``).

The math (Xiao et al., "Efficient Streaming Language Models with Attention Sinks", 2023), per
query position t, with S sink tokens and a window of W tokens:

* visible keys: the first S positions (the sinks) and the last W positions up to t,
  ``p <= t and (p < S or p > t - W)``; everything in between is dropped.
* positions: StreamingLLM numbers the tokens by their slot in its cache ([sinks ; window]), so a
  query never sees a relative distance beyond S + W - 1. Window keys keep their distance t - p.
  A sink key s is seen at distance ``min(t, S + W - 1) - s``: it sits right before the window.
  With RoPE the score depends only on the distance, so the sink scores use the query rotated at
  position ``min(t, S + W - 1)`` (``q_sink``) and the ordinary rotated keys; nothing else changes.
  Until the window reaches the sinks (t <= S + W - 1) this is plain causal attention.

Here it is a masked attention in XLA, exact and simple rather than fast: prefill runs
:func:`streaming_attention` (chunked over queries: memory linear in T), decoding reads the full KV
cache (``jax_cca/cache.py``'s FullCache) through the same mask (:func:`streaming_extend_attention`).
The method itself needs only S + W cached tokens; this implementation keeps the full cache, so
its decode speed and memory are full attention's, not StreamingLLM's
(:func:`streaming_cache_bytes` gives the method's own size).

A streaming model is a CCALlama whose attention modules are :class:`StreamingAttention`:
``streaming_model(model, sink_tokens=4, local_window=1024)`` (same weights; config.attention
stays "full", which selects the full decode cache).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from jax_cca import decode
from jax_cca.cache import FullCache
from jax_cca.config import CCAConfig
from jax_cca.model import Attention, CCALlama
from jax_cca.rope import apply_rope, default_positions, inverse_frequencies, rope_cos_sin
from kernels.cca.reference import (
    _chunk_len,
    _einsum,
    _masked_softmax_weights,
    _scale,
    check_attention_args,
)


def check_streaming_hparams(sink_tokens: int, local_window: int) -> None:
    for name, value, low in (("sink_tokens", sink_tokens, 0), ("local_window", local_window, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"streaming {name} must be an int >= {low}; got {value!r}")


def streaming_visible(t: Int[Array, "*S"], p: Int[Array, "*S"], sink_tokens: int,
                      local_window: int) -> jax.Array:
    """True where query position ``t`` sees key position ``p``."""
    return (p <= t) & ((p < sink_tokens) | (p > t - local_window))


def sink_query_positions(positions: Int[Array, "*S"], sink_tokens: int,
                         local_window: int) -> Int[Array, "*S"]:
    """Where a query at ``positions`` stands when it scores the sink keys: min(t, S + W - 1)."""
    return jnp.minimum(positions, sink_tokens + local_window - 1)


def streaming_attention(
    q: Float[Array, "B T Hq D"],
    k: Float[Array, "B T Hkv D"],
    v: Float[Array, "B T Hkv D"],
    *,
    sink_tokens: int,
    local_window: int,
    q_sink: Float[Array, "B T Hq D"] | None = None,
    softmax_scale: float | None = None,
    chunk_size: int | None = None,
) -> Float[Array, "B T Hq D"]:
    """Causal attention of positions 0..T-1 restricted to the sinks and the window (module doc).

    ``q_sink``: the queries used for the scores against the sink keys (None: ``q``). GQA: query
    head h uses kv head h // (Hq // Hkv). Float32 inside, returned in q's dtype. Chunked over
    queries: a chunk of C queries reads the S sinks and a slice of W + C - 1 keys.
    """
    check_attention_args(q, k, v)
    check_streaming_hparams(sink_tokens, local_window)
    if q_sink is None:
        q_sink = q
    if q_sink.shape != q.shape:
        raise ValueError(f"q_sink must have q's shape {q.shape}; got {q_sink.shape}")
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    scale = _scale(d, softmax_scale)
    c = _chunk_len(t, 1, chunk_size)
    num_chunks = -(-t // c)
    t_pad = num_chunks * c
    span = min(local_window + c - 1, t_pad)
    n_sink = min(sink_tokens, t)

    def prepare(x):
        return jnp.pad(x.astype(jnp.float32), ((0, 0), (0, t_pad - t), (0, 0), (0, 0)))

    qf = prepare(q).reshape(b, t_pad, hkv, hq // hkv, d)
    qsf = prepare(q_sink).reshape(b, t_pad, hkv, hq // hkv, d)
    kf, vf = prepare(k), prepare(v)
    sink_cols = jnp.arange(n_sink)

    @jax.checkpoint
    def one_chunk(c0):
        rows = c0 + jnp.arange(c)
        k0 = jnp.clip(c0 - local_window + 1, 0, t_pad - span)
        cols = k0 + jnp.arange(span)
        q_chunk = jax.lax.dynamic_slice_in_dim(qf, c0, c, axis=1)  # (B, C, Hkv, G, D)
        k_loc = jax.lax.dynamic_slice_in_dim(kf, k0, span, axis=1)  # (B, L, Hkv, D)
        v_loc = jax.lax.dynamic_slice_in_dim(vf, k0, span, axis=1)
        scores = [_einsum("bchgd,blhd->bhgcl", q_chunk, k_loc) * scale]
        # Sinks are scored in their own block; the window block leaves them out (p >= S).
        masks = [streaming_visible(rows[:, None], cols[None, :], 0, local_window)
                 & (cols[None, :] >= n_sink)]
        if n_sink:
            qs_chunk = jax.lax.dynamic_slice_in_dim(qsf, c0, c, axis=1)
            scores.append(_einsum("bchgd,bshd->bhgcs", qs_chunk, kf[:, :n_sink]) * scale)
            masks.append(sink_cols[None, :] <= rows[:, None])
        p = _masked_softmax_weights(jnp.concatenate(scores, -1), jnp.concatenate(masks, -1))
        out = _einsum("bhgcl,blhd->bchgd", p[..., :span], v_loc)
        if n_sink:
            out = out + _einsum("bhgcs,bshd->bchgd", p[..., span:], vf[:, :n_sink])
        return out

    out = jax.lax.map(one_chunk, jnp.arange(num_chunks) * c)  # (chunks, B, C, Hkv, G, D)
    out = jnp.moveaxis(out, 0, 1).reshape(b, t_pad, hq, d)[:, :t]
    return out.astype(q.dtype)


def streaming_extend_attention(
    cache: FullCache,
    q: Float[Array, "B C Hq D"],
    q_sink: Float[Array, "B C Hq D"],
    k: Float[Array, "B C Hkv D"],
    v: Float[Array, "B C Hkv D"],
    n_valid: Int[Array, "B"],
    *,
    sink_tokens: int,
    local_window: int,
) -> tuple[Float[Array, "B C Hq D"], FullCache]:
    """C new tokens per sequence (positions ``lengths[b] + i``) attend to the full KV cache and to
    each other through the streaming mask; returns (output, cache with the valid rows added)."""
    if not isinstance(cache, FullCache):
        raise TypeError(f"streaming attention decodes from a FullCache; got {type(cache).__name__}")
    positions = cache.lengths[:, None] + jnp.arange(q.shape[1])  # (B, C)
    cache = cache.append(k, v, n_valid)
    b, c, hq, d = q.shape
    hkv = k.shape[2]
    slots = jnp.arange(cache.max_len)[None, None, :]
    rows = positions[:, :, None]
    window = streaming_visible(rows, slots, 0, local_window) & (slots >= sink_tokens)
    sinks = (slots < sink_tokens) & (slots <= rows)
    scale = _scale(d, None)
    keys = cache.k.astype(jnp.float32)
    qf = q.astype(jnp.float32).reshape(b, c, hkv, hq // hkv, d)
    qsf = q_sink.astype(jnp.float32).reshape(b, c, hkv, hq // hkv, d)
    s_window = _einsum("bchgd,bshd->bhgcs", qf, keys) * scale
    s_sinks = _einsum("bchgd,bshd->bhgcs", qsf, keys) * scale
    # One softmax over all slots: each slot is scored by the window query or the sink query.
    scores = jnp.where(sinks[:, None, None], s_sinks, s_window)
    p = _masked_softmax_weights(scores, (window | sinks)[:, None, None])
    out = _einsum("bhgcs,bshd->bchgd", p, cache.v.astype(jnp.float32))
    return out.reshape(b, c, hq, d).astype(q.dtype), cache


def streaming_cache_bytes(config: CCAConfig, batch: int = 1, *, sink_tokens: int,
                          local_window: int, max_len: int | None = None) -> int:
    """Bytes of the keys and values StreamingLLM itself keeps: S + W tokens per layer and
    sequence, or ``max_len`` when fewer (this module's implementation keeps the full cache)."""
    itemsize = jnp.dtype(config.jnp_dtype).itemsize
    tokens = sink_tokens + local_window
    tokens = tokens if max_len is None else min(tokens, max_len)
    return config.num_layers * 2 * batch * tokens * config.num_kv_heads * config.head_dim * itemsize


class StreamingAttention(Attention):
    """A LLaMA attention layer (same parameters as :class:`jax_cca.model.Attention`) that attends
    to S sink tokens and a window of W tokens, StreamingLLM-style (module docstring)."""

    def __init__(self, config: CCAConfig, *, sink_tokens: int, local_window: int,
                 rngs: nnx.Rngs):
        if config.attention != "full":
            raise ValueError("a streaming layer runs on the full decode cache: build it from a "
                             f"config with attention='full', not {config.attention!r}")
        check_streaming_hparams(sink_tokens, local_window)
        super().__init__(config, rngs=rngs)
        self.sink_tokens = sink_tokens
        self.local_window = local_window

    def _streaming_qkv(self, x: Float[Array, "B T E"], positions: Int[Array, "B T"]):
        """Projections, rotated at ``positions`` (q, k) and, for the sink scores, q rotated at
        ``min(t, S + W - 1)``."""
        c = self.config
        q, k, v = self.qkv(x)
        inv_freq = inverse_frequencies(c)
        cos, sin = rope_cos_sin(positions, inv_freq)
        cos_s, sin_s = rope_cos_sin(
            sink_query_positions(positions, self.sink_tokens, self.local_window), inv_freq)
        return apply_rope(q, cos, sin), apply_rope(q, cos_s, sin_s), apply_rope(k, cos, sin), v

    def _streaming(self, q, q_sink, k, v):
        return streaming_attention(q, k, v, q_sink=q_sink, sink_tokens=self.sink_tokens,
                                   local_window=self.local_window)

    def __call__(self, x: Float[Array, "B T E"], cos, sin) -> Float[Array, "B T E"]:
        # Positions 0..T-1 (StreamingLlama rejects other positions): cos / sin are recomputed.
        del cos, sin
        q, q_sink, k, v = self._streaming_qkv(x, default_positions(*x.shape[:2]))
        return self._output(self._streaming(q, q_sink, k, v))

    def with_cache(self, x, cos, sin, cache: FullCache, n_valid, *, prefill: bool,
                   positions=None, counters=None):
        del cos, sin, positions, counters  # positions from its own cache, cos, sin recomputed
        first = 0 if prefill else cache.lengths[:, None]
        positions = jnp.broadcast_to(first + jnp.arange(x.shape[1], dtype=jnp.int32),
                                     x.shape[:2])
        q, q_sink, k, v = self._streaming_qkv(x, positions)
        if prefill:
            o = self._streaming(q, q_sink, k, v)
            cache = decode.prefill_cache(cache, q, k, v, n_valid, self.config)
        else:
            o, cache = streaming_extend_attention(cache, q, q_sink, k, v, n_valid,
                                                  sink_tokens=self.sink_tokens,
                                                  local_window=self.local_window)
        return self._output(o), cache


class StreamingLlama(CCALlama):
    """CCALlama with :class:`StreamingAttention` layers. Build one from a model with
    :func:`streaming_model`. ``with_attention(...)`` returns an ordinary CCALlama."""

    def __init__(self, config: CCAConfig, *, sink_tokens: int, local_window: int,
                 rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs)
        for layer in self.layers:
            layer.self_attn = StreamingAttention(config, sink_tokens=sink_tokens,
                                                 local_window=local_window, rngs=rngs)
        self.sink_tokens = sink_tokens
        self.local_window = local_window

    def hidden_states(self, input_ids, positions=None, *, remat: bool = False):
        if positions is not None:
            raise ValueError("a streaming model numbers tokens 0..T-1 itself (its sink tokens are "
                             "placed by position); explicit positions are not supported")
        return super().hidden_states(input_ids, None, remat=remat)


def streaming_model(model: CCALlama, *, sink_tokens: int = 4,
                    local_window: int = 1024) -> StreamingLlama:
    """``model``'s weights under StreamingLLM attention (S sinks, window W). The weights are
    shared, not copied; a CCA (or other) model is first viewed as a full-attention one."""
    check_streaming_hparams(sink_tokens, local_window)
    base = model if model.config.attention == "full" else model.with_attention(attention="full")
    _, state = nnx.split(base)
    abstract = nnx.eval_shape(lambda: StreamingLlama(
        base.config, sink_tokens=sink_tokens, local_window=local_window, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract)
    return nnx.merge(graphdef, state)


__all__ = ["StreamingAttention", "StreamingLlama",
           "check_streaming_hparams", "sink_query_positions", "streaming_attention",
           "streaming_cache_bytes", "streaming_extend_attention", "streaming_model",
           "streaming_visible"]
