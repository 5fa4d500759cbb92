"""Attention with a decode cache (XLA): fill a cache from a prompt, and extend it by a chunk.

Shape letters as in ``jax_cca/cache.py``; C is the chunk of new tokens (1 when decoding), P the
groups a chunk can complete, G = Hq // Hkv query heads per kv head (GQA is a reshape).

* :func:`prefill_cache`: after the model's ordinary forward over a right-padded prompt
  ``(B, T)``, store what decoding needs: full attention every key and value (ReAttention too,
  un-rotated); CCA the core token of
  every group the prompt completes (``reference.pool_core_tokens`` over the prompt, as the
  attention op pools it) and the prompt's last R tokens in the ring. Rows past ``lengths[b]`` are
  padding and are never written.
* :func:`extend_attention`: C new tokens per sequence at positions ``t = lengths[b] + i`` attend
  to the cache and to each other, exactly as the whole-sequence op would let them:

  - full: one softmax over the cached positions ``p <= t`` (the chunk is written first);
  - CCA: first every group whose last token is in the chunk is pooled with that token's query
    (its earlier tokens may sit in the ring) and written to the core slots; then one softmax over
    [core tokens j with ``(j + 1) g <= start(t)`` ; ring slots and chunk tokens at positions
    ``start(t) <= p <= t``], ``start(t) = max(0, floor((t - w + 1) / g) g)`` computed with
    ``kernels.cca.reference``'s exact predicates. Only then do the chunk's tokens enter the ring,
    so a chunk longer than the ring is fine: the ring needs only the w + g - 2 positions before
    the chunk.
  - ReAttention (:class:`ReAttentionCache`, un-rotated keys): the chunk is written first, then
    ``ops.reattention`` runs its queries from ``q_start = lengths`` over the whole cache (rows
    past ``n_valid`` do not vote: ``q_lengths``), split into selection chunks of
    ``min(reattention_chunk, C)`` queries starting at the chunk's first token; with C = 1 it is
    ``ops.reattention_decode`` (a decode step selects for its query alone). So a chunked prefill
    equals the one-pass prefill when its chunk is a multiple of ``reattention_chunk``.

  Rows past ``n_valid[b]`` (padding) get outputs but are not written to the cache.

Decoding is ``extend_attention`` with C = 1; chunked prefill is a loop of it over the prompt.
Scores and softmax are float32 at the highest matmul precision, like the reference.

Implementations (:func:`decode_implementation`): with C = 1, ``"pallas"`` runs the split-K decode
kernel of ``kernels/cca/pallas_decode.py`` (both caches; it reads only the blocks that can hold a
visible key) and, for CCA, pools a completed group with the one-launch kernel of
``kernels/cca/pallas_decode_pool.py`` (power-of-two g and D); ``"xla"`` the masked softmax of
:func:`_attend` over every slot. Both compute the same function. Chunks of C > 1 rows always take
the XLA path.

The model's one-token steps on the Pallas path start from the UN-rotated projections
(:func:`decode_step_unrotated`): RoPE and the cache write are one more kernel,
``kernels/cca/pallas_rope_append.py``, and then the same kernels run. For CCA, by default
(``pallas_decode_fused.STEP_LAUNCHES = "all"``, :func:`step_launches`), all of it runs in the
attention's launch instead (``kernels/cca/pallas_decode_fused.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jax_cca import ops
from jax_cca.cache import CCACache, FullCache, LayerCache, ReAttentionCache
from jax_cca.config import CCAConfig
from kernels.cca import pallas_decode, pallas_decode_fused, pallas_decode_pool, pallas_rope_append
from kernels.cca.reference import (
    _einsum,
    _masked_softmax_weights,
    _scale,
    core_visible,
    local_visible,
    pool_core_tokens,
)
from kernels.rms_norm import pallas as rms_norm_pallas


def prefill_cache(
    cache: LayerCache,
    q: Float[Array, "B T Hq D"],
    k: Float[Array, "B T Hkv D"],
    v: Float[Array, "B T Hkv D"],
    lengths: Int[Array, "B"],
    config: CCAConfig,
) -> LayerCache:
    """The cache of a prompt at positions 0..T-1 (``lengths[b]`` valid tokens of row b).

    Whatever the cache held before is dropped (its lengths restart at 0).
    """
    cache = cache.replace(lengths=jnp.zeros_like(cache.lengths))
    if isinstance(cache, CCACache) and cache.num_core:
        g = config.group_size
        k_core, v_core = pool_core_tokens(q, k, v, group_size=g, pooling=config.pooling)
        group = jnp.arange(k_core.shape[1])[None, :]
        cache = cache.set_cores(k_core, v_core, group, (group + 1) * g <= lengths[:, None])
    return cache.append(k, v, lengths)


DECODE_IMPLEMENTATIONS = ("pallas", "xla")
# config.implementation (the attention op's backend) -> decode implementation; None: default.
_FROM_CONFIG = {"pallas": "pallas", "xla": "xla", "chunked": "xla", "cudnn": None, None: None}


def decode_implementation(config: CCAConfig, implementation: str | None = None) -> str:
    """The implementation of one-token decode steps: ``implementation`` if given ("pallas" or
    "xla"), else from ``config.implementation`` ("pallas" -> "pallas"; "xla" or "chunked" ->
    "xla"), else the default: "pallas" on GPU (head dims the kernel takes: powers of two >= 16),
    "xla" elsewhere (CPU, TPU).

    "pallas" off the GPU runs the kernel through the Pallas interpreter (tests). The model picks
    its decode path through its config: ``model.with_attention(implementation="pallas")``.
    """
    if implementation is not None:
        if implementation not in DECODE_IMPLEMENTATIONS:
            raise ValueError(f"unknown decode implementation {implementation!r}; choose from "
                             f"{DECODE_IMPLEMENTATIONS} or None")
        return implementation
    name = _FROM_CONFIG.get(config.implementation)
    if name is None:
        gpu = jax.default_backend() == "gpu"
        name = "pallas" if gpu and pallas_decode.supports(config.head_dim) else "xla"
    return name


def extend_attention(
    cache: LayerCache,
    q: Float[Array, "B C Hq D"],
    k: Float[Array, "B C Hkv D"],
    v: Float[Array, "B C Hkv D"],
    n_valid: Int[Array, "B"],
    config: CCAConfig,
    *,
    implementation: str | None = None,
) -> tuple[Float[Array, "B C Hq D"], LayerCache]:
    """Attention of a chunk of new tokens over cache + chunk; returns (output, updated cache).

    ``implementation``: see :func:`decode_implementation` (used when C = 1; for ReAttention
    it names the op's implementation, "pallas" or "xla", for every C)."""
    if isinstance(cache, ReAttentionCache):
        return _reattention_extend(cache, q, k, v, n_valid, config, implementation)
    kernel = q.shape[1] == 1 and decode_implementation(config, implementation) == "pallas"
    first = cache.lengths  # (B,): position of the chunk's first row
    positions = first[:, None] + jnp.arange(q.shape[1])  # (B, C)
    if isinstance(cache, FullCache):
        cache = cache.append(k, v, n_valid)
        if kernel:
            out, cache = _kernel_step(cache, q[:, 0], k[:, 0], v[:, 0], first, n_valid, config)
            return out[:, None], cache
        mask = jnp.arange(cache.max_len)[None, None, :] <= positions[:, :, None]
        return _attend(q, [(cache.k, cache.v, mask)]), cache

    g, w = config.group_size, config.local_window
    if kernel and pallas_decode_pool.supports(g, config.head_dim, cache.ring):
        out, cache = _kernel_step(cache.append(k, v, n_valid), q[:, 0], k[:, 0], v[:, 0], first,
                                  n_valid, config)
        return out[:, None], cache
    if cache.num_core:
        cache = _pool_completed_groups(cache, q, k, v, n_valid, config)
    if kernel:
        # Written first, so the cache is read after its update (no copy to keep the old ring):
        # the new token's slot holds t or t - R, neither of which the kernel's mask admits.
        cache = cache.append(k, v, n_valid)
        out = pallas_decode.cca_decode_attention(
            q[:, 0], k[:, 0], v[:, 0], cache.core_k, cache.core_v, cache.ring_k, cache.ring_v,
            first, group_size=g, local_window=w)
        return out[:, None], cache
    rows = positions[:, :, None]  # (B, C, 1): the query positions
    core_mask = core_visible(rows, jnp.arange(cache.num_core)[None, None, :], g, w)
    slots = cache.ring_positions()[:, None, :]  # (B, 1, R)
    ring_mask = (slots >= 0) & local_visible(rows, slots, g, w)
    chunk_mask = local_visible(rows, positions[:, None, :], g, w)
    out = _attend(q, [(cache.core_k, cache.core_v, core_mask),
                      (cache.ring_k, cache.ring_v, ring_mask),
                      (k, v, chunk_mask)])
    return out, cache.append(k, v, n_valid)


def _kernel_step(
    cache: FullCache | CCACache,
    q: Float[Array, "B Hq D"],
    k: Float[Array, "B Hkv D"],
    v: Float[Array, "B Hkv D"],
    first: Int[Array, "B"],
    n_valid: Int[Array, "B"],
    config: CCAConfig,
) -> tuple[Float[Array, "B Hq D"], FullCache | CCACache]:
    """The Pallas decode step of one token at position ``first[b]`` over a cache it has already
    been written to (rotated k). Full attention: the kernel reads rows < t and takes the new
    token from k, v. CCA: the pooling finds a completed group whole in the ring (instead of the
    XLA path's gather, pool and masked write) and the attention reads the cores and the ring,
    whose slot of the new token holds t (or, unwritten, t - R), neither of which its mask
    admits. With ``pallas_decode.POOL_IN_ATTENTION`` (on) both run in one launch
    (``pallas_decode.cca_decode_step``: the pooled slot is not visible to this step) where core
    and ring hold at least a key block; otherwise the pooling kernel runs first, as its own."""
    if isinstance(cache, FullCache):
        return pallas_decode.full_decode_attention(q, k, v, cache.k, cache.v, first), cache
    g = config.group_size
    if cache.num_core and pallas_decode.POOL_IN_ATTENTION and pallas_decode.fuses_pooling(
            cache.num_core, cache.ring, config.head_dim, q.dtype.itemsize):
        out, core_k, core_v = pallas_decode.cca_decode_step(  # pooling in the same launch
            q, k, v, cache.core_k, cache.core_v, cache.ring_k, cache.ring_v, first, n_valid,
            group_size=g, local_window=config.local_window, pooling=config.pooling)
        return out, cache.replace(core_k=core_k, core_v=core_v)
    if cache.num_core:
        core_k, core_v = pallas_decode_pool.pool_decode_step(
            q, cache.ring_k, cache.ring_v, cache.core_k, cache.core_v, first, n_valid,
            group_size=g, pooling=config.pooling)
        cache = cache.replace(core_k=core_k, core_v=core_v)
    out = pallas_decode.cca_decode_attention(
        q, k, v, cache.core_k, cache.core_v, cache.ring_k, cache.ring_v, first, group_size=g,
        local_window=config.local_window)
    return out, cache


def rotates_in_kernel(cache: LayerCache, chunk: int, config: CCAConfig,
                      implementation: str | None = None) -> bool:
    """Whether a chunk of ``chunk`` tokens takes :func:`decode_step_unrotated` (one token, the
    Pallas decode path, a full or CCA cache the kernels take)."""
    if chunk != 1 or decode_implementation(config, implementation) != "pallas":
        return False
    if not pallas_rope_append.supports(config.head_dim):
        return False
    if isinstance(cache, FullCache):
        return True
    return isinstance(cache, CCACache) and pallas_decode_pool.supports(
        config.group_size, config.head_dim, cache.ring)


def norms_in_kernel(chunk: int, config: CCAConfig, implementation: str | None = None) -> bool:
    """Whether a chunk's residual adds and RMSNorms run as one Pallas kernel each
    (``kernels/rms_norm/pallas.py``): one-token steps on the Pallas decode path, hidden sizes the
    kernel takes. Everything else (prefill, training, CPU, TPU) leaves them to XLA, which fuses
    them with their neighbours there."""
    return (chunk == 1 and decode_implementation(config, implementation) == "pallas"
            and rms_norm_pallas.supports(config.hidden_size))


class SplitCounters:
    """The split counters (B, Hkv) int32 of a step's one-launch CCA decode kernels
    (``pallas_decode_fused``, ``STEP_LAUNCHES = "all"``), threaded through the step's layers:
    each layer's kernel takes them zero and leaves them zero, so one zero array per step serves
    every layer, updated in place. A mutable holder: a model creates one per traced step and
    passes it to every layer, whose call replaces ``value``."""

    def __init__(self):
        self.value = None

    def take(self, batch: int, kv_heads: int) -> Int[Array, "B Hkv"]:
        if self.value is None:
            self.value = jnp.zeros((batch, kv_heads), jnp.int32)
        return self.value


def step_launches(cache: LayerCache, config: CCAConfig) -> str | None:
    """How :func:`decode_step_unrotated` runs a CCA layer: ``pallas_decode_fused.STEP_LAUNCHES``
    ("rope": RoPE, ring write, pooling and attention in one launch, the combine apart; "all":
    one launch) where the cache suits it (``pallas_decode_fused.applies``), else None (RoPE
    and ring write, attention with pooling, combine: three launches)."""
    mode = pallas_decode_fused.STEP_LAUNCHES
    pallas_decode_fused.check_mode(mode)
    if mode is None or not isinstance(cache, CCACache):
        return None
    itemsize = jnp.dtype(config.jnp_dtype).itemsize
    fits = pallas_decode_fused.applies(cache.num_core, cache.ring, config.head_dim, itemsize)
    return mode if fits else None


def decode_step_unrotated(
    cache: FullCache | CCACache,
    qkv: Float[Array, "B H3 D"],
    cos: Float[Array, "B D"],
    sin: Float[Array, "B D"],
    n_valid: Int[Array, "B"],
    config: CCAConfig,
    positions: Int[Array, "B"] | None = None,
    counters: SplitCounters | None = None,
) -> tuple[Float[Array, "B Hq D"], FullCache | CCACache]:
    """:func:`extend_attention` of one token per sequence on the Pallas path, from the
    UN-rotated projections ``qkv`` (B, Hq + 2 Hkv, D) and the step's ``rope_cos_sin`` (B, D):
    RoPE, the cache write and the lengths' update are one kernel
    (``kernels/cca/pallas_rope_append.py``) instead of about ten XLA kernels, or, for CCA with
    :func:`step_launches`, part of the attention's launch. Same result and cache as rotating
    first and calling :func:`extend_attention` (see :func:`rotates_in_kernel` for when it
    applies).

    ``positions``: the step's positions, equal to ``cache.lengths`` (default: that array). A
    model passes one array for all its layers (layer 0's lengths), so that each layer's own
    lengths are only written, in place, and XLA copies none of them. ``counters``: the step's
    :class:`SplitCounters` (None: a new zero array for this call)."""
    first = cache.lengths if positions is None else positions
    mode = step_launches(cache, config)
    if mode is not None:
        count = None
        if mode == "all":
            counters = SplitCounters() if counters is None else counters
            count = counters.take(qkv.shape[0], config.num_kv_heads)
        out, *arrays = pallas_decode_fused.cca_decode_step_rotating(
            qkv, cos, sin, cache.core_k, cache.core_v, cache.ring_k, cache.ring_v, first,
            n_valid, cache.lengths, count, num_heads=config.num_heads,
            group_size=config.group_size, local_window=config.local_window,
            max_len=cache.max_len, pooling=config.pooling)
        if mode == "all":
            counters.value = arrays.pop()
        core_k, core_v, ring_k, ring_v, lengths = arrays
        return out, cache.replace(core_k=core_k, core_v=core_v, ring_k=ring_k, ring_v=ring_v,
                                  lengths=lengths)
    if isinstance(cache, FullCache):
        k_buf, v_buf, modulus, limit = cache.k, cache.v, cache.max_len, cache.max_len
    else:
        k_buf, v_buf, modulus, limit = cache.ring_k, cache.ring_v, cache.ring, cache.max_len
    q, k, v, k_buf, v_buf, lengths = pallas_rope_append.rope_append(
        qkv, cos, sin, k_buf, v_buf, first, n_valid, cache.lengths, num_heads=config.num_heads,
        modulus=modulus, limit=limit)
    if isinstance(cache, FullCache):
        cache = FullCache(k_buf, v_buf, lengths)
    else:
        cache = cache.replace(ring_k=k_buf, ring_v=v_buf, lengths=lengths)
    return _kernel_step(cache, q, k, v, first, n_valid, config)


def reattention_implementation(config: CCAConfig) -> str:
    """The ``ops.reattention`` implementation of a model: ``config.implementation`` ("pallas" or
    "xla"), or by default "pallas" on GPU when the head dim suits the kernels (a power of two
    >= 32) and "xla" otherwise. Full attention's backends ("cudnn", "chunked") are refused."""
    name = config.implementation
    if name is None:
        d = config.head_dim
        fits = d >= 32 and not d & (d - 1)
        return ops.default_reattention_implementation() if fits else "xla"
    if name not in ops.REATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"implementation {name!r} does not run ReAttention; choose from "
                         f"{sorted(ops.REATTENTION_IMPLEMENTATIONS)} or None")
    return name


def reattention_kwargs(config: CCAConfig) -> dict:
    """Keyword arguments of ``ops.reattention`` for a model: the selection, the model's RoPE
    (``inverse_frequencies``, so linear and llama3 scaling hold) and the implementation."""
    from jax_cca.rope import inverse_frequencies

    sel = config.selection()
    return dict(sink_tokens=sel.sink_tokens, local_window=sel.local_window, top_k=sel.top_k,
                max_selected=sel.max_selected, span=sel.span, chunk_size=sel.chunk_size,
                middle_align=sel.middle_align, key_block=sel.key_block,
                rope_theta=config.rope_theta, inv_freq=inverse_frequencies(config),
                implementation=reattention_implementation(config))


def _cached_summaries(cache: ReAttentionCache, config: CCAConfig):
    """The cache's block summaries where they are the blocks this model picks (a cache made for
    another sink or block size still holds valid keys: the op then recomputes them)."""
    sel, made_for = config.selection(), cache.selection
    if cache.block_summaries is None or made_for is None or (
            (made_for.sink_tokens, made_for.key_block) != (sel.sink_tokens, sel.key_block)):
        return None
    return cache.block_summaries


def _reattention_extend(
    cache: ReAttentionCache,
    q: Float[Array, "B C Hq D"],
    k: Float[Array, "B C Hkv D"],
    v: Float[Array, "B C Hkv D"],
    n_valid: Int[Array, "B"],
    config: CCAConfig,
    implementation: str | None,
) -> tuple[Float[Array, "B C Hq D"], ReAttentionCache]:
    """ReAttention of C new un-rotated queries at positions ``lengths[b] + i`` over the cache,
    after the chunk's un-rotated keys are written into it."""
    first = cache.lengths
    cache = cache.append(k, v, n_valid)
    kw = reattention_kwargs(config)
    if implementation is not None:
        kw["implementation"] = implementation
    chunk = q.shape[1]
    if chunk == 1:
        kw.pop("chunk_size")
        out = ops.reattention_decode(q[:, 0], cache.k, cache.v, first + 1,
                                     block_summaries=_cached_summaries(cache, config), **kw)
        return out[:, None], cache
    keys, values = cache.k, cache.v
    summaries = _cached_summaries(cache, config)  # (the write above brought them up to date)
    if chunk > cache.max_len:  # the op wants at least C keys; rows past max_len are not stored
        pad = ((0, 0), (0, chunk - cache.max_len), (0, 0), (0, 0))
        keys, values, summaries = jnp.pad(keys, pad), jnp.pad(values, pad), None
    out = ops.reattention(q, keys, values, q_start=first, q_lengths=n_valid,
                          block_summaries=summaries, **kw)
    return out, cache


def _pool_completed_groups(
    cache: CCACache,
    q: Float[Array, "B C Hq D"],
    k: Float[Array, "B C Hkv D"],
    v: Float[Array, "B C Hkv D"],
    n_valid: Int[Array, "B"],
    config: CCAConfig,
) -> CCACache:
    """Pools every group whose last token is among the chunk's valid rows into the core slots.

    Candidate groups of row b: ``j = lengths[b] // g + i``, i < P = ceil(C / g); group j is
    complete when its last position ``(j + 1) g - 1`` is below ``lengths[b] + n_valid[b]``. Its
    tokens before the chunk come from the ring (they are within the last g - 1 positions), the
    others from the chunk; its pooling query is the chunk's query at its last position.
    """
    g = config.group_size
    b, c, hq, d = q.shape
    start = cache.lengths[:, None]  # (B, 1): position of the chunk's first row
    num = -(-c // g)
    group = start // g + jnp.arange(num)[None, :]  # (B, P)
    last = (group + 1) * g - 1
    valid = last < start + n_valid[:, None]
    pos = (group[:, :, None] * g + jnp.arange(g)).reshape(b, num * g)  # (B, P*g)
    in_chunk = (pos >= start)[:, :, None, None]

    def take(x, index):  # x (B, S, H, D), index (B, K) -> (B, K, H, D)
        return jnp.take_along_axis(x, index[:, :, None, None], axis=1)

    chunk_index = jnp.clip(pos - start, 0, c - 1)
    k_group = jnp.where(in_chunk, take(k, chunk_index), take(cache.ring_k, pos % cache.ring))
    v_group = jnp.where(in_chunk, take(v, chunk_index), take(cache.ring_v, pos % cache.ring))
    q_last = take(q, jnp.clip(last - start, 0, c - 1))  # (B, P, Hq, D)
    # pool_core_tokens reads the query of each group's last row; the other rows are unused.
    q_group = jnp.zeros((b, num, g, hq, d), q.dtype).at[:, :, g - 1].set(q_last)
    k_core, v_core = pool_core_tokens(q_group.reshape(b, num * g, hq, d), k_group, v_group,
                                      group_size=g, pooling=config.pooling)
    return cache.set_cores(k_core, v_core, group, valid)


def _attend(
    q: Float[Array, "B C Hq D"],
    parts: list[tuple[Float[Array, "B S Hkv D"], Float[Array, "B S Hkv D"], jax.Array]],
) -> Float[Array, "B C Hq D"]:
    """One softmax over the keys of all ``parts`` (keys, values, mask (B, C, S) of visible keys)."""
    b, c, hq, d = q.shape
    hkv = parts[0][0].shape[2]
    qf = q.astype(jnp.float32).reshape(b, c, hkv, hq // hkv, d)
    scale = _scale(d, None)
    scores = [_einsum("bchgd,bshd->bhgcs", qf, keys.astype(jnp.float32)) * scale
              for keys, _, _ in parts]
    masks = [mask[:, None, None] for _, _, mask in parts]  # broadcast over (Hkv, G)
    p = _masked_softmax_weights(jnp.concatenate(scores, -1), jnp.concatenate(masks, -1))
    out, offset = 0.0, 0
    for keys, values, _ in parts:
        size = keys.shape[1]
        out = out + _einsum("bhgcs,bshd->bchgd", p[..., offset : offset + size],
                            values.astype(jnp.float32))
        offset += size
    return out.reshape(b, c, hq, d).astype(q.dtype)
