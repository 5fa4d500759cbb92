"""Plain jax.numpy reference for Core Context Aware attention (CCA) and causal full attention.

Shape letters: B batch, T tokens, Hq query heads, Hkv key/value heads, G = Hq // Hkv query heads
per kv head, D head dim, N = T // g complete groups (core tokens), C query chunk, L local keys.

The math (SPEC.md section 1, kernels/cca/README.md), per kv head:

* Pooling: group j = tokens [j*g, (j+1)*g). Its pooling query is the mean, over the G query heads
  that share the kv head, of the query of the group's last token. ``s_j = softmax(q_pool K_j^T *
  scale)``; the core key/value are ``s_j K_j`` and ``s_j V_j``. Only complete groups are pooled.
* Locality: query t sees raw keys ``[start(t), t]`` with ``start(t) = max(0, floor((t - w + 1) /
  g) * g)`` and the core tokens of groups j with ``(j + 1) * g <= start(t)``.
* Fusion: one softmax over [visible core keys ; local raw keys].

Everything is computed in float32 and returned in the query dtype. Two formulations live here:
``cca_attention`` (chunked over queries, memory linear in T, used by ``jax_cca.ops``) and
``cca_attention_naive`` (dense T x (N + T) masks, only for tests that check the chunked one).
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

Pooling = Literal["cca", "mean", "max"]
POOLINGS = ("cca", "mean", "max")
DEFAULT_CHUNK = 256


def local_window_start(
    t: Int[Array, "*S"], group_size: int, local_window: int
) -> Int[Array, "*S"]:
    """First raw key visible to query ``t``: ``max(0, floor((t - w + 1) / g) * g)``.

    ``jnp.floor_divide`` rounds toward minus infinity, so the result is exact for every t,
    including t in [w, w + g - 2] where a truncating division would give the wrong group.
    """
    return jnp.maximum(0, jnp.floor_divide(t - local_window + 1, group_size) * group_size)


def core_visible(
    t: Int[Array, "*S"], j: Int[Array, "*S"], group_size: int, local_window: int
) -> jax.Array:
    """True where query ``t`` sees the core token of group ``j`` (the group ends before start(t))."""
    return (j + 1) * group_size <= local_window_start(t, group_size, local_window)


def local_visible(
    t: Int[Array, "*S"], s: Int[Array, "*S"], group_size: int, local_window: int
) -> jax.Array:
    """True where query ``t`` sees raw key ``s`` (``start(t) <= s <= t``)."""
    return (local_window_start(t, group_size, local_window) <= s) & (s <= t)


def check_cca_args(q, k, v, group_size: int, local_window: int, pooling: str = "cca") -> None:
    """Raises ValueError naming the problem for inputs the CCA math does not define."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            "cca_attention expects q (B, T, Hq, D) and k, v (B, T, Hkv, D); got shapes "
            f"q={tuple(q.shape)}, k={tuple(k.shape)}, v={tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got k={k.shape}, v={v.shape}")
    b, t, hq, d = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (b, t, d):
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch, length or head dim"
        )
    if hq % k.shape[2]:
        raise ValueError(
            f"number of query heads ({hq}) must be a multiple of kv heads ({k.shape[2]})"
        )
    if not (jnp.issubdtype(q.dtype, jnp.floating) and q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    check_cca_hparams(group_size, local_window, pooling)


def check_cca_hparams(group_size: int, local_window: int, pooling: str = "cca") -> None:
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int; got {group_size!r}")
    if not isinstance(local_window, int) or local_window < 1:
        raise ValueError(f"local_window must be a positive int; got {local_window!r}")
    if local_window % group_size:
        raise ValueError(
            f"local_window ({local_window}) must be a multiple of group_size ({group_size})"
        )
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}; got {pooling!r}")


def _scale(d: int, softmax_scale: float | None) -> float:
    return 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)


def pool_core_tokens(
    q: Float[Array, "B T Hq D"],
    k: Float[Array, "B T Hkv D"],
    v: Float[Array, "B T Hkv D"],
    *,
    group_size: int,
    pooling: Pooling = "cca",
    softmax_scale: float | None = None,
) -> tuple[Float[Array, "B N Hkv D"], Float[Array, "B N Hkv D"]]:
    """Core key/value of every complete group, per kv head, in float32.

    ``pooling="cca"`` is the paper's globality-aware pooling; ``"mean"`` and ``"max"`` are the
    paper's ablations (plain mean / element-wise max over the group's keys and values).
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    g = group_size
    n = t // g
    k_groups = k[:, : n * g].astype(jnp.float32).reshape(b, n, g, hkv, d)
    v_groups = v[:, : n * g].astype(jnp.float32).reshape(b, n, g, hkv, d)
    if pooling == "mean":
        return k_groups.mean(axis=2), v_groups.mean(axis=2)
    if pooling == "max":
        return k_groups.max(axis=2), v_groups.max(axis=2)
    q_last = q[:, g - 1 : n * g : g].astype(jnp.float32)  # (B, N, Hq, D)
    q_pool = q_last.reshape(b, n, hkv, hq // hkv, d).mean(axis=3)  # (B, N, Hkv, D)
    scores = jnp.einsum(
        "bnhd,bnghd->bnhg", q_pool, k_groups, precision=jax.lax.Precision.HIGHEST
    ) * _scale(d, softmax_scale)
    weights = jax.nn.softmax(scores, axis=-1)
    k_core = jnp.einsum("bnhg,bnghd->bnhd", weights, k_groups, precision=jax.lax.Precision.HIGHEST)
    v_core = jnp.einsum("bnhg,bnghd->bnhd", weights, v_groups, precision=jax.lax.Precision.HIGHEST)
    return k_core, v_core


def _masked_softmax_weights(scores: jax.Array, mask: jax.Array) -> jax.Array:
    scores = jnp.where(mask, scores, -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(scores - m), 0.0)
    return p / jnp.sum(p, axis=-1, keepdims=True)


def _einsum(spec, *args):
    return jnp.einsum(spec, *args, precision=jax.lax.Precision.HIGHEST)


def _chunk_len(t: int, multiple: int, chunk_size: int | None) -> int:
    c = chunk_size or DEFAULT_CHUNK
    c = max(multiple, (c // multiple) * multiple)
    return min(c, -(-t // multiple) * multiple)


def cca_attention(
    q: Float[Array, "B T Hq D"],
    k: Float[Array, "B T Hkv D"],
    v: Float[Array, "B T Hkv D"],
    *,
    group_size: int = 16,
    local_window: int = 1024,
    pooling: Pooling = "cca",
    softmax_scale: float | None = None,
    chunk_size: int | None = None,
) -> Float[Array, "B T Hq D"]:
    """CCA attention, chunked over queries so memory grows linearly with T.

    Each chunk of C queries (C a multiple of g) reads a contiguous slice of L = C + w + g - 1 raw
    keys starting at start(first query of the chunk) and all N core tokens; the chunk body is
    rematerialised in the backward pass, so gradients are linear in T too.
    """
    check_cca_args(q, k, v, group_size, local_window, pooling)
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    g, w = group_size, local_window
    scale = _scale(d, softmax_scale)
    k_core, v_core = pool_core_tokens(
        q, k, v, group_size=g, pooling=pooling, softmax_scale=softmax_scale
    )
    n = k_core.shape[1]
    c = _chunk_len(t, g, chunk_size)
    num_chunks = -(-t // c)
    l = min(c + w + g - 1, num_chunks * c)
    t_pad = num_chunks * c
    qf = jnp.pad(q.astype(jnp.float32), ((0, 0), (0, t_pad - t), (0, 0), (0, 0)))
    qf = qf.reshape(b, t_pad, hkv, hq // hkv, d)
    kf = jnp.pad(k.astype(jnp.float32), ((0, 0), (0, t_pad - t), (0, 0), (0, 0)))
    vf = jnp.pad(v.astype(jnp.float32), ((0, 0), (0, t_pad - t), (0, 0), (0, 0)))
    j = jnp.arange(n)

    @jax.checkpoint
    def one_chunk(c0):
        q_chunk = jax.lax.dynamic_slice_in_dim(qf, c0, c, axis=1)  # (B, C, Hkv, G, D)
        rows = c0 + jnp.arange(c)
        k0 = jnp.clip(local_window_start(c0, g, w), 0, t_pad - l)
        cols = k0 + jnp.arange(l)
        k_loc = jax.lax.dynamic_slice_in_dim(kf, k0, l, axis=1)  # (B, L, Hkv, D)
        v_loc = jax.lax.dynamic_slice_in_dim(vf, k0, l, axis=1)
        s_core = _einsum("bchgd,bnhd->bhgcn", q_chunk, k_core) * scale
        s_loc = _einsum("bchgd,blhd->bhgcl", q_chunk, k_loc) * scale
        mask_core = core_visible(rows[:, None], j[None, :], g, w)
        mask_loc = local_visible(rows[:, None], cols[None, :], g, w)
        p = _masked_softmax_weights(
            jnp.concatenate([s_core, s_loc], axis=-1),
            jnp.concatenate([mask_core, mask_loc], axis=-1),
        )
        out = _einsum("bhgcn,bnhd->bchgd", p[..., :n], v_core)
        return out + _einsum("bhgcl,blhd->bchgd", p[..., n:], v_loc)

    out = jax.lax.map(one_chunk, jnp.arange(num_chunks) * c)  # (chunks, B, C, Hkv, G, D)
    out = jnp.moveaxis(out, 0, 1).reshape(b, t_pad, hq, d)[:, :t]
    return out.astype(q.dtype)


def cca_attention_naive(
    q: Float[Array, "B T Hq D"],
    k: Float[Array, "B T Hkv D"],
    v: Float[Array, "B T Hkv D"],
    *,
    group_size: int = 16,
    local_window: int = 1024,
    pooling: Pooling = "cca",
    softmax_scale: float | None = None,
) -> Float[Array, "B T Hq D"]:
    """Dense O(T^2) formulation with explicit T x N and T x T masks. For tests only."""
    check_cca_args(q, k, v, group_size, local_window, pooling)
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    k_core, v_core = pool_core_tokens(
        q, k, v, group_size=group_size, pooling=pooling, softmax_scale=softmax_scale
    )
    n = k_core.shape[1]
    qf = q.astype(jnp.float32).reshape(b, t, hkv, hq // hkv, d)
    kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
    rows = jnp.arange(t)[:, None]
    mask = jnp.concatenate(
        [
            core_visible(rows, jnp.arange(n)[None, :], group_size, local_window),
            local_visible(rows, jnp.arange(t)[None, :], group_size, local_window),
        ],
        axis=-1,
    )
    keys = jnp.concatenate([k_core, kf], axis=1)  # (B, N + T, Hkv, D)
    values = jnp.concatenate([v_core, vf], axis=1)
    scores = _einsum("bthgd,bshd->bhgts", qf, keys) * _scale(d, softmax_scale)
    p = _masked_softmax_weights(scores, mask)
    return _einsum("bhgts,bshd->bthgd", p, values).reshape(b, t, hq, d).astype(q.dtype)


def check_attention_args(q, k, v) -> None:
    check_cca_args(q, k, v, group_size=1, local_window=1)


def full_attention(
    q: Float[Array, "B T Hq D"],
    k: Float[Array, "B T Hkv D"],
    v: Float[Array, "B T Hkv D"],
    *,
    softmax_scale: float | None = None,
    chunk_size: int | None = None,
) -> Float[Array, "B T Hq D"]:
    """Causal full attention, chunked over queries (C x T scores live at a time)."""
    check_attention_args(q, k, v)
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    c = _chunk_len(t, 1, chunk_size)
    num_chunks = -(-t // c)
    t_pad = num_chunks * c
    qf = jnp.pad(q.astype(jnp.float32), ((0, 0), (0, t_pad - t), (0, 0), (0, 0)))
    qf = qf.reshape(b, t_pad, hkv, hq // hkv, d)
    kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
    cols = jnp.arange(t)
    scale = _scale(d, softmax_scale)

    @jax.checkpoint
    def one_chunk(c0):
        q_chunk = jax.lax.dynamic_slice_in_dim(qf, c0, c, axis=1)
        rows = c0 + jnp.arange(c)
        s = _einsum("bchgd,bshd->bhgcs", q_chunk, kf) * scale
        # Padded query rows (>= T) see every key; they are cut off below.
        p = _masked_softmax_weights(s, cols[None, :] <= rows[:, None])
        return _einsum("bhgcs,bshd->bchgd", p, vf)

    out = jax.lax.map(one_chunk, jnp.arange(num_chunks) * c)
    out = jnp.moveaxis(out, 0, 1).reshape(b, t_pad, hq, d)[:, :t]
    return out.astype(q.dtype)


def full_attention_naive(
    q: Float[Array, "B T Hq D"],
    k: Float[Array, "B T Hkv D"],
    v: Float[Array, "B T Hkv D"],
    *,
    softmax_scale: float | None = None,
) -> Float[Array, "B T Hq D"]:
    """Dense causal attention with a T x T mask. For tests only."""
    check_attention_args(q, k, v)
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    qf = q.astype(jnp.float32).reshape(b, t, hkv, hq // hkv, d)
    s = _einsum("bthgd,bshd->bhgts", qf, k.astype(jnp.float32)) * _scale(d, softmax_scale)
    p = _masked_softmax_weights(s, jnp.tril(jnp.ones((t, t), bool)))
    out = _einsum("bhgts,bshd->bthgd", p, v.astype(jnp.float32))
    return out.reshape(b, t, hq, d).astype(q.dtype)


@functools.lru_cache(maxsize=None)
def visible_key_counts(t: int, group_size: int, local_window: int) -> tuple[int, int]:
    """(core keys, raw keys) summed over all queries of a length-t sequence: the work CCA does."""
    core = raw = 0
    for i in range(t):
        start = max(0, ((i - local_window + 1) // group_size) * group_size)
        core += start // group_size
        raw += i - start + 1
    return core, raw
