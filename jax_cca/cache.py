"""Decode caches of CCALlama, one per layer: preallocated, static shapes, per-sequence lengths.

Shape letters: B batch, S max_len (the most tokens a sequence may hold), Hkv kv heads, D head dim,
g group size, w local window, N = S // g core slots, R ring slots.

* :class:`FullCache` (``attention="full"``): the rotated keys and the values of every position,
  ``k, v (B, S, Hkv, D)``; position p of sequence b lives at ``[b, p]``.
* :class:`CCACache` (``attention="cca"``): what CCA decoding can still read.

  - ``core_k, core_v (B, N, Hkv, D)``: the core token of group j at ``[b, j]``, written when the
    group's last token arrives (its query is the pooling query, so it is pooled then and there).
  - ``ring_k, ring_v (B, R, Hkv, D)``: the raw rotated keys / values of the last R positions,
    position p in slot ``p % R``. ``R = w + g``, a multiple of g, so every group occupies g
    aligned, contiguous slots; a query's local region ``[start(t), t]`` holds at most w + g - 1
    tokens, so the ring always holds it. When ``max_len`` is below w + g, ``R`` shrinks to
    ``max_len`` rounded up to a multiple of g (every position then has its own slot).
    Slots store no positions: slot s of a sequence of length L holds position
    ``L - 1 - ((L - 1 - s) mod R)`` when that is >= 0 (:func:`ring_positions`), and is empty
    otherwise.
  - ``max_len`` (static): the capacity it was made for (N and R alone do not determine it).

* :class:`ReAttentionCache` (``attention="reattention"``): the UN-rotated keys and the values of
  every position, ``k, v (B, S, Hkv, D)``, laid out like :class:`FullCache`. ReAttention scores
  keys without position and re-numbers the ones it attends to at every step, so keys are stored
  before RoPE; like the method, it keeps the whole cache (it bounds positions, not memory).
  With block picks (``reattention_key_block`` b > 1) it also keeps ``block_summaries (B,
  round_up(sink + S // b, 8), Hkv, 2D)``, what ``kernels.reattention.key_blocks.summaries`` gives
  for ``k`` (each block's per-dim max and min), so that a decode step scores the blocks
  without reading every key: every write recomputes the summaries of the blocks it touched.

All keep ``lengths (B,) int32``: tokens written so far per sequence, so a batch of prompts of
different lengths decodes in lockstep. Writes go through :func:`_scatter_rows`, whose rows with an
out-of-range index are dropped: nothing past a sequence's valid tokens is ever written, so in a
fresh cache every slot beyond what a sequence holds stays zero.

A model's cache is a tuple with one of these per layer (:func:`init_cache`); the layers' lengths
agree. The attention that reads and writes them is ``jax_cca/decode.py``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Float, Int

from jax_cca.config import CCAConfig

LENGTHS_DTYPE = jnp.int32


def _scatter_rows(buffer: Float[Array, "B S H D"], index: Int[Array, "B C"],
                  rows: Float[Array, "B C H D"]) -> Float[Array, "B S H D"]:
    """``buffer[b, index[b, i]] = rows[b, i]``; an index outside [0, S) skips that row."""
    batch = jnp.arange(buffer.shape[0])[:, None]
    return buffer.at[batch, index].set(rows.astype(buffer.dtype), mode="drop")


def _valid_rows(n_valid: Int[Array, "B"], chunk: int) -> jax.Array:
    """(B, C) mask of the first ``n_valid[b]`` rows of a chunk of C rows."""
    return jnp.arange(chunk)[None, :] < n_valid[:, None]


def _append_positions(k_buf, v_buf, lengths, k, v, n_valid):
    """(k_buf, v_buf, lengths) with the first ``n_valid[b]`` rows of the chunk written at
    positions ``lengths[b] + i``; positions at or past the buffer's length are dropped."""
    chunk, max_len = k.shape[1], k_buf.shape[1]
    pos = lengths[:, None] + jnp.arange(chunk)
    index = jnp.where(_valid_rows(n_valid, chunk), pos, max_len)
    return _scatter_rows(k_buf, index, k), _scatter_rows(v_buf, index, v), lengths + n_valid


@struct.dataclass
class FullCache:
    """Keys (rotated) and values of every position: full attention's decode cache."""

    k: Float[Array, "B S Hkv D"]
    v: Float[Array, "B S Hkv D"]
    lengths: Int[Array, "B"]

    @property
    def max_len(self) -> int:
        return self.k.shape[1]

    def append(self, k: Float[Array, "B C Hkv D"], v: Float[Array, "B C Hkv D"],
               n_valid: Int[Array, "B"]) -> "FullCache":
        """Writes the first ``n_valid[b]`` rows of the chunk at positions ``lengths[b] + i``.

        Positions at or past ``max_len`` are dropped (size the cache for prompt + new tokens).
        """
        return FullCache(*_append_positions(self.k, self.v, self.lengths, k, v, n_valid))


@struct.dataclass
class ReAttentionCache:
    """Un-rotated keys and values of every position: ReAttention's decode cache; with block
    picks (``selection.key_block`` > 1) also the blocks' summaries of ``k``."""

    k: Float[Array, "B S Hkv D"]
    v: Float[Array, "B S Hkv D"]
    lengths: Int[Array, "B"]
    block_summaries: Float[Array, "B S2 Hkv D2"] | None = None
    selection: object = struct.field(pytree_node=False, default=None)  # params.Selection

    @property
    def max_len(self) -> int:
        return self.k.shape[1]

    def append(self, k: Float[Array, "B C Hkv D"], v: Float[Array, "B C Hkv D"],
               n_valid: Int[Array, "B"]) -> "ReAttentionCache":
        """As :meth:`FullCache.append`, with un-rotated keys; then the summaries of the blocks
        the chunk wrote into are recomputed from the keys."""
        keys, values, lengths = _append_positions(self.k, self.v, self.lengths, k, v, n_valid)
        summaries = self.block_summaries
        if summaries is not None:
            if self.selection is None:
                raise ValueError("a ReAttentionCache with block_summaries needs the selection "
                                 "they summarise (init_cache sets it from the config)")
            summaries = _update_summaries(summaries, keys, self.lengths, k.shape[1],
                                          self.selection)
        return self.replace(k=keys, v=values, lengths=lengths, block_summaries=summaries)


def _update_summaries(summaries, keys, first, chunk: int, sel):
    """``key_blocks.summaries(keys, sel)``, given that it held for the keys before a chunk of
    ``chunk`` rows was written at positions ``first[b] ..``: only the blocks holding those
    positions are recomputed (all of them when the chunk spans at least as many blocks)."""
    from kernels.reattention import key_blocks, pallas_summaries

    b = sel.key_block
    nb = key_blocks.num_blocks(keys.shape[1], sel)
    span = (chunk - 1) // b + 2  # blocks a chunk of C rows can touch
    if span >= nb:  # all of them; on a GPU by the kernel (XLA's reduce is about 2x slower)
        if jax.default_backend() == "gpu":
            return pallas_summaries.block_summaries(keys, sel)
        return key_blocks.summaries(keys, sel)
    j = (jnp.maximum(first - sel.sink_tokens, 0) // b)[:, None] + jnp.arange(span)  # (B, n)
    rows = sel.sink_tokens + j[..., None] * b + jnp.arange(b)  # (B, n, b)
    batch = jnp.arange(keys.shape[0])[:, None, None]
    blocks = keys[batch, jnp.minimum(rows, keys.shape[1] - 1)]  # (B, n, b, Hkv, D)
    new = key_blocks.block_extremes(blocks)
    index = jnp.where(j < nb, sel.sink_tokens + j, summaries.shape[1])  # past the blocks: drop
    return _scatter_rows(summaries, index, new)


@struct.dataclass
class CCACache:
    """CCA's decode cache: the core token of every completed group and a ring of raw tokens."""

    core_k: Float[Array, "B N Hkv D"]
    core_v: Float[Array, "B N Hkv D"]
    ring_k: Float[Array, "B R Hkv D"]
    ring_v: Float[Array, "B R Hkv D"]
    lengths: Int[Array, "B"]
    max_len: int = struct.field(pytree_node=False)  # tokens a sequence may hold

    @property
    def num_core(self) -> int:
        return self.core_k.shape[1]

    @property
    def ring(self) -> int:
        return self.ring_k.shape[1]

    def ring_positions(self) -> Int[Array, "B R"]:
        return ring_positions(self.lengths, self.ring)

    def append(self, k: Float[Array, "B C Hkv D"], v: Float[Array, "B C Hkv D"],
               n_valid: Int[Array, "B"]) -> "CCACache":
        """Puts the first ``n_valid[b]`` rows of the chunk (positions ``lengths[b] + i``) in the
        ring. A chunk longer than the ring keeps only its last R valid rows (the earlier ones
        would be overwritten anyway), so no two rows target the same slot. As in
        :meth:`FullCache.append`, positions at or past ``max_len`` are dropped."""
        chunk = k.shape[1]
        i = jnp.arange(chunk)[None, :]
        pos = self.lengths[:, None] + i
        keep = _valid_rows(n_valid, chunk) & (i >= n_valid[:, None] - self.ring)
        index = jnp.where(keep & (pos < self.max_len), pos % self.ring, self.ring)
        return self.replace(ring_k=_scatter_rows(self.ring_k, index, k),
                            ring_v=_scatter_rows(self.ring_v, index, v),
                            lengths=self.lengths + n_valid)

    def set_cores(self, k_core: Float[Array, "B P Hkv D"], v_core: Float[Array, "B P Hkv D"],
                  group: Int[Array, "B P"], valid: jax.Array) -> "CCACache":
        """Stores core token ``p`` of sequence b as the core of group ``group[b, p]`` where
        ``valid[b, p]``."""
        index = jnp.where(valid, group, self.num_core)
        return self.replace(core_k=_scatter_rows(self.core_k, index, k_core),
                            core_v=_scatter_rows(self.core_v, index, v_core))


LayerCache = FullCache | CCACache | ReAttentionCache


def ring_positions(lengths: Int[Array, "B"], ring: int) -> Int[Array, "B R"]:
    """Position held by each ring slot of sequences of ``lengths`` tokens (negative: empty).

    Slot s holds the latest position p < L with p = s (mod R): ``L - 1 - ((L - 1 - s) mod R)``.
    """
    last = lengths[:, None] - 1
    return last - jnp.mod(last - jnp.arange(ring)[None, :], ring)


def ring_size(config: CCAConfig, max_len: int) -> int:
    """R = w + g ring slots, or ``max_len`` rounded up to a multiple of g when that is fewer."""
    g = config.group_size
    return min(config.local_window + g, -(-max_len // g) * g)


def _check(config: CCAConfig, batch: int, max_len: int) -> None:
    for name, value in (("batch", batch), ("max_len", max_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    if config.attention not in ("full", "cca", "reattention"):
        raise NotImplementedError(
            f"no decode cache for attention={config.attention!r}; use 'full', 'cca' or "
            "'reattention'"
        )


def _layer_shapes(config: CCAConfig, batch: int, max_len: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every array of one layer's cache (the single source of the layout)."""
    kv = (config.num_kv_heads, config.head_dim)
    lengths = (batch,)
    if config.attention == "full" or (config.attention == "reattention"
                                      and config.reattention_key_block == 1):
        return {"k": (batch, max_len, *kv), "v": (batch, max_len, *kv), "lengths": lengths}
    if config.attention == "reattention":  # block picks: the blocks' summaries too
        from kernels.reattention import key_blocks

        rows = key_blocks.summary_rows(max_len, config.selection())
        return {"k": (batch, max_len, *kv), "v": (batch, max_len, *kv), "lengths": lengths,
                "block_summaries": (batch, rows, config.num_kv_heads, 2 * config.head_dim)}
    n, r = max_len // config.group_size, ring_size(config, max_len)
    return {"core_k": (batch, n, *kv), "core_v": (batch, n, *kv), "ring_k": (batch, r, *kv),
            "ring_v": (batch, r, *kv), "lengths": lengths}


def init_layer_cache(config: CCAConfig, batch: int, max_len: int) -> LayerCache:
    """An empty (zero) cache of one layer for ``batch`` sequences of up to ``max_len`` tokens."""
    _check(config, batch, max_len)
    arrays = {name: jnp.zeros(shape, LENGTHS_DTYPE if name == "lengths" else config.jnp_dtype)
              for name, shape in _layer_shapes(config, batch, max_len).items()}
    if config.attention == "full":
        return FullCache(**arrays)
    if config.attention == "reattention":
        return ReAttentionCache(**arrays, selection=config.selection())
    return CCACache(**arrays, max_len=max_len)


def init_cache(config: CCAConfig, batch: int, max_len: int) -> tuple[LayerCache, ...]:
    """One empty layer cache per decoder layer."""
    return tuple(init_layer_cache(config, batch, max_len) for _ in range(config.num_layers))


def cache_bytes(config: CCAConfig, max_len: int, batch: int = 1) -> int:
    """Exact bytes of :func:`init_cache` ``(config, batch, max_len)``: every array, lengths too.

    Full and ReAttention: ``layers * (2 * B * S * Hkv * D * itemsize + 4 B)``; ReAttention
    with block picks adds ``layers * B * S2 * Hkv * 2D * itemsize`` for the block summaries,
    ``S2 = round_up(sink + S // b, 8)``. CCA: ``layers * (2 * B * (S // g + R) * Hkv * D *
    itemsize + 4 B)`` with R from :func:`ring_size`.
    """
    _check(config, batch, max_len)
    itemsize = jnp.dtype(config.jnp_dtype).itemsize
    per_layer = sum(
        math.prod(shape) * (jnp.dtype(LENGTHS_DTYPE).itemsize if name == "lengths" else itemsize)
        for name, shape in _layer_shapes(config, batch, max_len).items()
    )
    return config.num_layers * per_layer


def cache_lengths(cache: tuple[LayerCache, ...]) -> Int[Array, "B"]:
    """Tokens held per sequence (every layer holds the same)."""
    return cache[0].lengths


def reset_lengths(cache: tuple[LayerCache, ...]) -> tuple[LayerCache, ...]:
    """The same buffers with every sequence emptied (old contents become unreachable)."""
    return tuple(layer.replace(lengths=jnp.zeros_like(layer.lengths)) for layer in cache)


def cache_shardings(cache: tuple[LayerCache, ...], mesh: jax.sharding.Mesh,
                    batch_axis: str | None = "data", head_axis: str | None = None):
    """NamedShardings for a model's cache: every (B, S, Hkv, D) buffer split over ``batch_axis``
    along B and, when given, over ``head_axis`` along the kv heads; ``lengths`` (B,) along B.

    Sequences never interact in attention, and a kv head only with its own query heads, so a
    decode step on a cache placed this way computes the same as on one device (tested with
    forced host devices in tests/test_cache_sharding.py)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    kv_heads = next(x for x in jax.tree.leaves(cache) if x.ndim == 4).shape[2]
    for axis, dim, what in ((batch_axis, cache_lengths(cache).shape[0], "batch"),
                            (head_axis, kv_heads, "kv heads")):
        if axis is not None and dim % mesh.shape[axis]:
            raise ValueError(f"cannot split {what} = {dim} over mesh axis {axis!r} of size "
                             f"{mesh.shape[axis]}")

    def spec(x):
        if x.ndim == 1:
            return NamedSharding(mesh, P(batch_axis))
        return NamedSharding(mesh, P(batch_axis, None, head_axis, None))

    return jax.tree.map(spec, cache)


def shard_cache(cache: tuple[LayerCache, ...], mesh: jax.sharding.Mesh,
                batch_axis: str | None = "data", head_axis: str | None = None):
    """``cache`` placed on ``mesh`` with :func:`cache_shardings`."""
    return jax.device_put(cache, cache_shardings(cache, mesh, batch_axis, head_axis))
