"""Plain jax.numpy reference for ReAttention (arXiv 2407.15176): position-agnostic top-k selection,
then ordinary causal attention over the gathered keys with re-numbered positions.

Shape letters: B batch, S cached keys, T queries, Hq / Hkv query / kv heads, G = Hq // Hkv, D head
dim, C chunk, NC chunks, R = C * G rows (query, head) of one kv head and chunk, K = top_k,
NG gathered slots (sink + selected spans), TAIL the longest local window + chunk. The math is in
README.md in this folder; per (batch element, kv head, chunk of queries [c0, c1)):

1. Scoring: every row (query t, head h of the kv head) scores the middle keys [sink, L0) with the
   raw q . k of un-rotated vectors and picks its top_k (``score_topk``); or, with
   ``Selection.key_block`` > 1, whole blocks by an upper bound (``key_blocks.py``).
2. Selection (``select_from_picks``): votes = how many rows picked a key; the max_selected most
   voted keys (ties: higher best score, then lower position) each bring a span of neighbours;
   the gathered list is [sink tokens ; union of the spans] in original order.
3. Attention (``attend_gathered``): keys [gathered list ; L0 .. c1 - 1] get positions 0 .. n-1
   (the chunk's own tokens last), RoPE at those positions on keys and queries (query t sits at
   n_g + t - L0), ordinary causal softmax attention.

Everything is computed in float32 and returned in the query dtype. Static shapes everywhere
(dynamic lengths are masks), so it runs under jit, for prefill and for decode (``q_start``).
``select_sorted`` and ``reattention_naive`` are a second, dense formulation (argsort of every
score; a keep-mask over the whole sequence with positions from its cumulative sum) used by tests.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jax_cca.rope import apply_rope, rope_cos_sin
from kernels.cca.reference import _masked_softmax_weights
from kernels.reattention import key_blocks
from kernels.reattention.params import Geometry, Selection, geometry

HIGHEST = jax.lax.Precision.HIGHEST
KEY_BLOCK = 512  # keys scored at a time by the blocked top-k (memory O(C * G * KEY_BLOCK))
INT_MAX = int(np.iinfo(np.int32).max)


# ----------------------------------------------------------------------------- arguments
def check_args(q, k, v) -> None:
    """Raises ValueError naming the problem for inputs ReAttention does not define."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            "reattention expects q (B, T, Hq, D) and k, v (B, S, Hkv, D); got shapes "
            f"q={tuple(q.shape)}, k={tuple(k.shape)}, v={tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got k={k.shape}, v={v.shape}")
    b, t, hq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head dim")
    if t < 1 or k.shape[1] < t:
        raise ValueError(f"need 1 <= T <= S (queries are the last T positions); got T={t}, "
                         f"S={k.shape[1]}")
    if k.shape[2] == 0 or hq % k.shape[2]:
        raise ValueError(
            f"number of query heads ({hq}) must be a multiple of kv heads ({k.shape[2]})")
    if d % 2:
        raise ValueError(f"head dim must be even for rotary embeddings; got {d}")
    if not (jnp.issubdtype(q.dtype, jnp.floating) and q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")


def default_inv_freq(head_dim: int, rope_theta: float = 10000.0) -> np.ndarray:
    """The D/2 rotary inverse frequencies in float32 (LLaMA default, no scaling)."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (1.0 / (np.float32(rope_theta) ** exponents)).astype(np.float32)


def resolve_inv_freq(head_dim: int, rope_theta: float, inv_freq) -> np.ndarray:
    if inv_freq is None:
        return default_inv_freq(head_dim, rope_theta)
    inv_freq = np.asarray(inv_freq, np.float32)
    if inv_freq.shape != (head_dim // 2,):
        raise ValueError(f"inv_freq must have shape ({head_dim // 2},); got {inv_freq.shape}")
    return inv_freq


def softmax_scale_or_default(head_dim: int, softmax_scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)


def query_starts(q_start, batch: int, num_keys: int, num_queries: int) -> jax.Array:
    """(B,) int32 position of each batch element's first query (default S - T: prefill or the
    continuation of a prefill; decode passes lengths - 1)."""
    if q_start is None:
        return jnp.full((batch,), num_keys - num_queries, jnp.int32)
    return jnp.broadcast_to(jnp.asarray(q_start, jnp.int32), (batch,))


def voting_ends(c1, q_start, q_lengths):
    """(B, NC) end of the voting queries of each chunk: ``c1``, cut at ``q_start + q_lengths``
    when ``q_lengths`` (B,) is given. Queries at or past it (right padding of a batch of
    sequences of different lengths) still get outputs but do not vote in the selection, so a
    padded row selects exactly what its unpadded sequence would."""
    if q_lengths is None:
        return c1
    q_lengths = jnp.broadcast_to(jnp.asarray(q_lengths, jnp.int32), q_start.shape)
    return jnp.minimum(c1, (q_start + q_lengths)[:, None])


# ----------------------------------------------------------------------------- geometry
def chunk_bounds(q_start: Int[Array, "B"], geo: Geometry):
    """(c0, c1, L0), each (B, NC) int32: chunk [c0, c1) and its local window start L0.

    L0 = min(sink, c0) + floor(max(c0 - w - sink, 0) / align) * align: the middle [sink, L0) is
    a multiple of ``align`` long and the local window [L0, c0) holds at least min(w, c0 - sink).
    """
    sel = geo.sel
    c0 = q_start[:, None] + jnp.arange(geo.num_chunks, dtype=jnp.int32)[None, :] * geo.chunk
    c1 = jnp.minimum(c0 + geo.chunk, q_start[:, None] + geo.num_queries)
    middle = jnp.maximum(c0 - sel.local_window - sel.sink_tokens, 0)
    l0 = jnp.minimum(sel.sink_tokens, c0) + middle // sel.middle_align * sel.middle_align
    return c0, c1, l0


def pack_rows(q: Float[Array, "B T Hq D"], geo: Geometry) -> Float[Array, "B Hkv NC R D"]:
    """Rows of one (kv head, chunk) in (query, head) order: row r is query c0 + r // G, head
    hk * G + r % G. T is zero-padded to NC * C."""
    b, t, hq, d = q.shape
    pad = geo.num_chunks * geo.chunk - t
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    q = q.reshape(b, geo.num_chunks, geo.chunk, geo.kv_heads, geo.groups, d)
    return q.transpose(0, 3, 1, 2, 4, 5).reshape(b, geo.kv_heads, geo.num_chunks, geo.rows, d)


def unpack_rows(o: Float[Array, "B Hkv NC R D"], geo: Geometry) -> Float[Array, "B T Hq D"]:
    b, d = o.shape[0], o.shape[-1]
    o = o[:, :, :, : geo.rows].reshape(b, geo.kv_heads, geo.num_chunks, geo.chunk, geo.groups, d)
    o = o.transpose(0, 2, 3, 1, 4, 5).reshape(b, geo.num_chunks * geo.chunk, geo.q_heads, d)
    return o[:, : geo.num_queries]


def row_positions(c0: Int[Array, "*N"], rows: int, groups: int) -> Int[Array, "*N R"]:
    """Query position of every packed row of a chunk starting at c0."""
    return c0[..., None] + jnp.arange(rows, dtype=jnp.int32) // groups


# ----------------------------------------------------------------------------- 1. scoring
def score_topk(
    q_rows: Float[Array, "B Hkv R D"],
    k_heads: Float[Array, "B Hkv S D"],
    l0: Int[Array, "B"],
    sel: Selection,
    key_block: int = KEY_BLOCK,
) -> tuple[Float[Array, "B Hkv R K"], Int[Array, "B Hkv R K"]]:
    """Each row's top_k middle keys [sink, L0) by raw q . k: (values, positions), best first,
    ties to the lower position; position -1 (value -inf) where the middle has fewer keys.

    Keys are scored ``key_block`` at a time with a running top-k (memory O(R * key_block))."""
    b, hkv, r, d = q_rows.shape
    s_len = k_heads.shape[2]
    kk = sel.top_k
    run_v = jnp.full((b, hkv, r, kk), -jnp.inf, jnp.float32)
    run_i = jnp.full((b, hkv, r, kk), -1, jnp.int32)
    middle = s_len - sel.sink_tokens
    if middle <= 0:
        return run_v, run_i
    kb_len = min(key_block, middle)

    def block(carry, kb):
        run_v, run_i = carry
        cols = sel.sink_tokens + kb * kb_len + jnp.arange(kb_len, dtype=jnp.int32)
        keys = jnp.take(k_heads, jnp.minimum(cols, s_len - 1), axis=2)  # (B, Hkv, KB, D)
        s = jnp.einsum("bhrd,bhkd->bhrk", q_rows, keys, precision=HIGHEST)
        s = jnp.where(cols[None, None, None, :] < l0[:, None, None, None], s, -jnp.inf)
        merged_v = jnp.concatenate([run_v, s], axis=-1)
        merged_i = jnp.concatenate([run_i, jnp.broadcast_to(cols, s.shape)], axis=-1)
        top_v, at = jax.lax.top_k(merged_v, kk)  # ties: lower index (earlier position) first
        return (top_v, jnp.take_along_axis(merged_i, at, axis=-1)), None

    nblocks = -(-middle // kb_len)
    (vals, idx), _ = jax.lax.scan(block, (run_v, run_i), jnp.arange(nblocks, dtype=jnp.int32))
    return vals, jnp.where(jnp.isfinite(vals), idx, -1)


def block_scoring_inputs(q: Float[Array, "B T Hq D"], k: Float[Array, "B S Hkv D"],
                         geo: Geometry, block_summaries=None):
    """What ``score_topk`` scores for block picks (``key_block`` > 1, ``key_blocks.py``), in
    float32: (signed rows (NC, B, Hkv, R, 2D), summary keys (B, Hkv, S', 2D), L0 -> the
    middle's end in those keys, picks -> token positions). ``block_summaries``: the summaries
    of k when the caller has them (a decode cache), else computed."""
    sel = geo.sel
    rows = jnp.moveaxis(pack_rows(key_blocks.signed_queries(q).astype(jnp.float32), geo), 2, 0)
    if block_summaries is None:
        block_summaries = key_blocks.summaries(k, sel)
    keys = block_summaries.astype(jnp.float32).transpose(0, 2, 1, 3)
    return (rows, keys, lambda l0: key_blocks.summary_end(l0, geo.num_keys, sel),
            lambda idx: key_blocks.centres(idx, sel))


# ----------------------------------------------------------------------------- 2. selection
def select_from_picks(
    idx: Int[Array, "N P"],
    val: Float[Array, "N P"],
    c0: Int[Array, "N"],
    l0: Int[Array, "N"],
    sel: Selection,
) -> tuple[Int[Array, "N NG"], Int[Array, "N"]]:
    """Union of picks -> (gathered list, its length n_g).

    ``idx`` holds every pick of one (batch element, kv head, chunk) per leading row (-1: none),
    ``val`` the pick's score. Votes = number of picks of a key. The ``max_selected`` keys with the
    most votes (ties: higher best score, then lower position) are kept; each brings its span,
    clipped to the middle [sink, L0). The list is [0 .. min(sink, c0) - 1 ; union of the spans]
    ascending; slots from n_g on hold 0. Cost O(P log P), independent of the sequence length.
    """
    n, p = idx.shape
    valid = idx >= 0
    # Sort picks by position, best score first within a position.
    s_idx, s_neg = jax.lax.sort(
        (jnp.where(valid, idx, INT_MAX), jnp.where(valid, -val, 0.0)), dimension=1, num_keys=2)
    ar = jnp.arange(p, dtype=jnp.int32)
    boundary = jnp.concatenate([jnp.ones((n, 1), bool), s_idx[:, 1:] != s_idx[:, :-1]], axis=1)
    first = boundary & (s_idx != INT_MAX)
    # votes = distance to the next boundary (the next position, or the first empty pick).
    b_pos = jnp.where(boundary, ar, p)
    after = jnp.concatenate([b_pos[:, 1:], jnp.full((n, 1), p, jnp.int32)], axis=1)
    votes = jax.lax.cummin(after, axis=1, reverse=True) - ar
    # Rank distinct keys: most votes, then best score, then lower position.
    k1 = jnp.where(first, -votes, 1)
    k2 = jnp.where(first, s_neg, 0.0)
    k1, _, k3 = jax.lax.sort((k1, k2, s_idx), dimension=1, num_keys=3)
    return lists_from_centres(_kept_from_ranks(k1, k3, sel), c0, l0, sel)


def select_from_block_picks(
    idx: Int[Array, "N P"],
    val: Float[Array, "N P"],
    c0: Int[Array, "N"],
    l0: Int[Array, "N"],
    sel: Selection,
    num_keys: int,
) -> tuple[Int[Array, "N NG"], Int[Array, "N"]]:
    """:func:`select_from_picks` of block picks (``key_block`` b > 1: every pick is a block's
    centre, ``key_blocks.centres``) with the votes counted per block instead: a scatter-add of
    the picks into NB = ``key_blocks.num_blocks(num_keys)`` counters and a scatter-max of their
    scores, then one sort of NB entries per row instead of two sorts of the P picks. Same lists
    for finite scores (the ranking's keys are the same: votes, best score, position; a NaN
    score, which only NaN inputs give, may rank differently)."""
    votes, best = block_votes(idx, val, sel, num_keys)
    return lists_from_centres(kept_centres_by_sort(votes, best, sel), c0, l0, sel)


def kept_centres_by_sort(votes: Int[Array, "N NB"], best: Float[Array, "N NB"],
                         sel: Selection) -> Int[Array, "N K"]:
    """The centres of each row's ``max_selected`` best blocks (:func:`block_votes`: most
    votes, then the best score, then the lower block), ascending, INT_MAX past the last; K =
    max_selected. One 3-key sort of the NB blocks (``pallas_block_select`` finds the same cut
    without it)."""
    n, nb = votes.shape
    picked = votes > 0
    k1 = jnp.where(picked, -votes, 1)
    k2 = jnp.where(picked, -best, 0.0)
    sink, b = sel.sink_tokens, sel.key_block
    centres = jnp.broadcast_to(sink + jnp.arange(nb, dtype=jnp.int32) * b + b // 2, (n, nb))
    k1, _, k3 = jax.lax.sort((k1, k2, centres), dimension=1, num_keys=3)
    return _kept_from_ranks(k1, jnp.where(k1 < 0, k3, INT_MAX), sel)


def block_votes(idx: Int[Array, "N P"], val: Float[Array, "N P"], sel: Selection,
                num_keys: int) -> tuple[Int[Array, "N NB"], Float[Array, "N NB"]]:
    """Each block's votes (picks of its centre) and best score (-inf where it has none), from
    block picks (:func:`select_from_block_picks`): a scatter-add and a scatter-max into NB =
    ``key_blocks.num_blocks(num_keys)`` counters per row."""
    n, _ = idx.shape
    b, sink = sel.key_block, sel.sink_tokens
    nb = key_blocks.num_blocks(num_keys, sel)
    block = jnp.where(idx >= 0, (idx - sink - b // 2) // b, nb)  # none: past the counters
    rows = jnp.broadcast_to(jnp.arange(n)[:, None], idx.shape)
    votes = jnp.zeros((n, nb), jnp.int32).at[rows, block].add(1, mode="drop")
    best = jnp.full((n, nb), -jnp.inf, jnp.float32).at[rows, block].max(
        val.astype(jnp.float32), mode="drop")
    return votes, best


def _kept_from_ranks(k1, k3, sel: Selection):
    """The first ``max_selected`` of the ranked distinct keys (``k1`` minus their votes, >= 0:
    not a key; ``k3`` their positions; best first), their positions ascending, INT_MAX past
    the last: (N, max_selected)."""
    p = k1.shape[1]
    cap = sel.max_selected
    if p < cap:
        k1 = jnp.pad(k1, ((0, 0), (0, cap - p)), constant_values=1)
        k3 = jnp.pad(k3, ((0, 0), (0, cap - p)), constant_values=INT_MAX)
    kept = k1[:, :cap] < 0
    return jnp.sort(jnp.where(kept, k3[:, :cap], INT_MAX), axis=1)


def lists_from_centres(centers: Int[Array, "N K"], c0: Int[Array, "N"], l0: Int[Array, "N"],
                       sel: Selection) -> tuple[Int[Array, "N NG"], Int[Array, "N"]]:
    """The lists from the kept keys' positions ``centers``, ascending (INT_MAX: none; K <=
    ``max_selected``), as :func:`select_from_picks` returns them."""
    n = centers.shape[0]
    ng = sel.num_gathered()
    kept = centers != INT_MAX
    c = jnp.where(kept, centers, 0)
    # Spans [c - left, c + right] clipped to the middle; with sorted centers and equal widths the
    # ends are non-decreasing, so span i adds exactly [max(a_i, b_(i-1) + 1), b_i].
    a = jnp.maximum(c - sel.span_left, sel.sink_tokens)
    bnd = jnp.minimum(c + sel.span_right, l0[:, None] - 1)
    prev = jnp.concatenate([jnp.full((n, 1), -1, jnp.int32), bnd[:, :-1]], axis=1)
    start = jnp.maximum(a, prev + 1)
    count = jnp.where(kept, jnp.maximum(bnd - start + 1, 0), 0)
    sink = jnp.minimum(sel.sink_tokens, c0)
    offset = sink[:, None] + jnp.cumsum(count, axis=1) - count
    o = jnp.arange(sel.span, dtype=jnp.int32)
    tokens = start[:, :, None] + o
    dest = jnp.where(o < count[:, :, None], offset[:, :, None] + o, ng)  # ng: dropped
    slots = jnp.arange(ng, dtype=jnp.int32)
    glist = jnp.where(slots[None, :] < sink[:, None], slots[None, :], 0)
    rows = jnp.broadcast_to(jnp.arange(n)[:, None, None], dest.shape)
    glist = glist.at[rows, dest].set(tokens, mode="drop")
    return glist, sink + count.sum(axis=1)


# ----------------------------------------------------------------------------- 3. attention
def rotate(x: Float[Array, "B H N D"], positions: Int[Array, "B H N"], inv_freq) -> jax.Array:
    """RoPE (``jax_cca.rope``) of x at per-(batch, head) positions."""
    b, h, n, d = x.shape
    cos, sin = rope_cos_sin(positions.reshape(b * h, n), inv_freq)
    return apply_rope(x.reshape(b * h, n, 1, d), cos, sin).reshape(b, h, n, d)


def attend_gathered(
    q_rows: Float[Array, "B Hkv R D"],
    t_rows: Int[Array, "B R"],
    k_heads: Float[Array, "B Hkv S D"],
    v_heads: Float[Array, "B Hkv S D"],
    glist: Int[Array, "B Hkv NG"],
    n_g: Int[Array, "B Hkv"],
    l0: Int[Array, "B"],
    tail: int,
    inv_freq: np.ndarray,
    scale: float,
) -> Float[Array, "B Hkv R D"]:
    """Causal attention of un-rotated rows over [gathered list ; keys L0 .. t], positions 0..n-1.

    Slot i of the list sits at position i; key j >= L0 at n_g + j - L0; query t at n_g + t - L0.
    Row r sees the list slots below n_g and the keys L0 <= j <= t_r."""
    s_len = k_heads.shape[2]
    ng = glist.shape[-1]
    j = l0[:, None] + jnp.arange(tail, dtype=jnp.int32)  # (B, TAIL)
    jc = jnp.minimum(j, s_len - 1)[:, None, :, None]
    take = lambda x, i: jnp.take_along_axis(x, i, axis=2)
    keys = jnp.concatenate([take(k_heads, glist[..., None]), take(k_heads, jc)], axis=2)
    values = jnp.concatenate([take(v_heads, glist[..., None]), take(v_heads, jc)], axis=2)
    slots = jnp.arange(ng, dtype=jnp.int32)
    b, hkv = glist.shape[:2]
    k_pos = jnp.concatenate(
        [jnp.broadcast_to(slots, (b, hkv, ng)), n_g[..., None] + jnp.arange(tail, dtype=jnp.int32)],
        axis=-1)
    q_pos = n_g[..., None] + (t_rows - l0[:, None])[:, None, :]
    keys = rotate(keys, k_pos, inv_freq)
    q_rot = rotate(q_rows, q_pos, inv_freq)
    scores = jnp.einsum("bhrd,bhnd->bhrn", q_rot, keys, precision=HIGHEST) * scale
    mask = jnp.concatenate([
        jnp.broadcast_to((slots[None, None, :] < n_g[..., None])[:, :, None, :],
                         (b, hkv, t_rows.shape[1], ng)),
        jnp.broadcast_to((j[:, None, :] <= t_rows[:, :, None])[:, None],
                         (b, hkv, t_rows.shape[1], tail)),
    ], axis=-1)
    weights = _masked_softmax_weights(scores, mask)
    return jnp.einsum("bhrn,bhnd->bhrd", weights, values, precision=HIGHEST)


# ----------------------------------------------------------------------------- the op
def _prepare(q, k, v, sel, q_start, rope_theta, inv_freq, softmax_scale):
    check_args(q, k, v)
    geo = geometry(q.shape, k.shape, sel)
    q0 = query_starts(q_start, geo.batch, geo.num_keys, geo.num_queries)
    return (geo, q0, resolve_inv_freq(geo.head_dim, rope_theta, inv_freq),
            softmax_scale_or_default(geo.head_dim, softmax_scale))


def reattention_with_selection(
    q: Float[Array, "B T Hq D"],
    k: Float[Array, "B S Hkv D"],
    v: Float[Array, "B S Hkv D"],
    *,
    sel: Selection = Selection(),
    q_start=None,
    rope_theta: float = 10000.0,
    inv_freq=None,
    softmax_scale: float | None = None,
    q_lengths=None,
    block_summaries=None,
):
    """(out (B, T, Hq, D), gathered lists (B, Hkv, NC, NG), their lengths (B, Hkv, NC)).
    ``q_lengths`` (B,): valid queries per batch element (``voting_ends``).
    ``block_summaries``: ``key_blocks.summaries(k, sel)`` when the caller keeps them."""
    geo, q0, inv_freq, scale = _prepare(q, k, v, sel, q_start, rope_theta, inv_freq,
                                        softmax_scale)
    if block_summaries is not None:
        key_blocks.check_summaries(block_summaries, k.shape, k.dtype, sel)
    c0, c1, l0 = chunk_bounds(q0, geo)
    c1 = voting_ends(c1, q0, q_lengths)  # only the voting uses c1 here
    q_rows = jnp.moveaxis(pack_rows(q.astype(jnp.float32), geo), 2, 0)  # (NC, B, Hkv, R, D)
    k_heads = k.astype(jnp.float32).transpose(0, 2, 1, 3)  # (B, Hkv, S, D)
    v_heads = v.astype(jnp.float32).transpose(0, 2, 1, 3)
    b, hkv, r = geo.batch, geo.kv_heads, geo.rows
    if sel.key_block == 1:  # token picks score the rows and keys the attention reads
        s_rows, s_keys, s_end, s_picks = q_rows, k_heads, lambda l0: l0, lambda idx: idx
    else:
        s_rows, s_keys, s_end, s_picks = block_scoring_inputs(q, k, geo, block_summaries)

    def one_chunk(args):
        q_c, s_c, c0_c, c1_c, l0_c = args
        t_rows = row_positions(c0_c, r, geo.groups)  # (B, R)
        vals, idx = score_topk(s_c, s_keys, s_end(l0_c), sel)
        idx = jnp.where((t_rows < c1_c[:, None])[:, None, :, None], s_picks(idx), -1)
        rep = lambda x: jnp.repeat(x, hkv)
        glist, n_g = select_from_picks(idx.reshape(b * hkv, -1), vals.reshape(b * hkv, -1),
                                       rep(c0_c), rep(l0_c), sel)
        glist, n_g = glist.reshape(b, hkv, -1), n_g.reshape(b, hkv)
        out = attend_gathered(q_c, t_rows, k_heads, v_heads, glist, n_g, l0_c, geo.tail,
                              inv_freq, scale)
        return out, glist, n_g

    out, glist, n_g = jax.lax.map(one_chunk, (q_rows, s_rows, c0.T, c1.T, l0.T))
    out = unpack_rows(jnp.moveaxis(out, 0, 2), geo).astype(q.dtype)
    return out, jnp.moveaxis(glist, 0, 2), jnp.moveaxis(n_g, 0, 2)


def reattention(
    q: Float[Array, "B T Hq D"],
    k: Float[Array, "B S Hkv D"],
    v: Float[Array, "B S Hkv D"],
    *,
    sink_tokens: int = 32,
    local_window: int = 8192,
    top_k: int = 4,
    max_selected: int = 256,
    span: int = 32,
    chunk_size: int = 512,
    middle_align: int = 128,
    key_block: int = 1,
    q_start=None,
    rope_theta: float = 10000.0,
    inv_freq=None,
    softmax_scale: float | None = None,
    q_lengths=None,
    block_summaries=None,
) -> Float[Array, "B T Hq D"]:
    """ReAttention over un-rotated q (the last T positions, or from ``q_start``) and k, v caches.

    Queries run in chunks of ``chunk_size`` that share one selection; see the module docstring
    and README.md. ``inv_freq`` (D/2,) overrides the RoPE frequencies of ``rope_theta``.
    ``q_lengths`` (B,) in [0, T]: only the first q_lengths[b] queries of element b vote (the
    rest is right padding: it gets outputs, which are meaningless). ``block_summaries``: with
    block picks, ``key_blocks.summaries(k, ...)`` kept by the caller (a decode cache)."""
    sel = Selection(sink_tokens, local_window, top_k, max_selected, span, chunk_size, middle_align,
                    key_block)
    return reattention_with_selection(q, k, v, sel=sel, q_start=q_start, rope_theta=rope_theta,
                                      inv_freq=inv_freq, softmax_scale=softmax_scale,
                                      q_lengths=q_lengths, block_summaries=block_summaries)[0]


def reattention_decode(
    q: Float[Array, "B Hq D"],
    k_cache: Float[Array, "B L Hkv D"],
    v_cache: Float[Array, "B L Hkv D"],
    lengths: Int[Array, "B"],
    **kwargs,
) -> Float[Array, "B Hq D"]:
    """One decode step: q is the query of position lengths - 1, whose key and value are already
    in the cache; cache slots from ``lengths`` on are ignored. A chunk of one query."""
    kwargs = {**kwargs, "chunk_size": 1}
    out = reattention(q[:, None], k_cache, v_cache, q_start=jnp.asarray(lengths) - 1, **kwargs)
    return out[:, 0]


# ----------------------------------------------------------------------------- dense oracles
def select_sorted(
    q: Float[Array, "B T Hq D"],
    k: Float[Array, "B S Hkv D"],
    *,
    sel: Selection,
    q_start=None,
):
    """The selection by brute force (tests): every score of a chunk, each row's argsort, votes
    and best scores counted over the whole sequence, a lexicographic sort of all S positions and
    a dense span mask. Returns (gathered lists (B, Hkv, NC, NG), lengths (B, Hkv, NC)) like
    ``reattention_with_selection``."""
    geo = geometry(q.shape, k.shape, sel)
    q0 = query_starts(q_start, geo.batch, geo.num_keys, geo.num_queries)
    c0, c1, l0 = chunk_bounds(q0, geo)
    q_rows = pack_rows(q.astype(jnp.float32), geo)  # (B, Hkv, NC, R, D)
    k_heads = k.astype(jnp.float32).transpose(0, 2, 1, 3)
    s_len, ng = geo.num_keys, sel.num_gathered()
    pos = jnp.arange(s_len, dtype=jnp.int32)

    kb = sel.key_block
    starts = sel.sink_tokens + kb * jnp.arange(key_blocks.num_blocks(s_len, sel), dtype=jnp.int32)
    # Candidates: every middle key, or (key_block > 1) every block, at its centre position.
    centre = pos if kb == 1 else starts + kb // 2

    def scores(q_c, keys):
        if kb == 1:
            return jnp.einsum("rd,sd->rs", q_c, keys, precision=HIGHEST)
        blocks = keys[sel.sink_tokens: sel.sink_tokens + kb * starts.shape[0]].reshape(
            -1, kb, keys.shape[-1])  # the bound, element by element: sum_d max(q M, q m)
        hi, lo = blocks.max(axis=1), blocks.min(axis=1)
        return jnp.maximum(q_c[:, None] * hi[None], q_c[:, None] * lo[None]).sum(-1)

    def one(q_c, keys, c0_c, c1_c, l0_c):  # (R, D), (S, D), scalars
        first, last = (pos, pos) if kb == 1 else (starts, starts + kb - 1)
        s = jnp.where((first >= sel.sink_tokens) & (last < l0_c), scores(q_c, keys), -jnp.inf)
        order = jnp.argsort(-s, axis=1, stable=True)[:, : sel.top_k]
        best = jnp.take_along_axis(s, order, axis=1)
        order = centre[order]
        row_ok = row_positions(c0_c, geo.rows, geo.groups) < c1_c
        ok = jnp.isfinite(best) & row_ok[:, None]
        target = jnp.where(ok, order, s_len).ravel()  # s_len: dropped
        votes = jnp.zeros(s_len, jnp.int32).at[target].add(1, mode="drop")
        best_s = jnp.full(s_len, -jnp.inf).at[target].max(best.ravel(), mode="drop")
        rank = jnp.lexsort((pos, -best_s, -votes))[: sel.max_selected]
        kept = votes[rank] > 0
        near = (pos[:, None] >= rank[None, :] - sel.span_left) & (
            pos[:, None] <= rank[None, :] + sel.span_right)
        mask = jnp.any(near & kept[None, :], axis=1) & (pos >= sel.sink_tokens) & (pos < l0_c)
        mask = mask | (pos < jnp.minimum(sel.sink_tokens, c0_c))
        return jnp.nonzero(mask, size=ng, fill_value=0)[0].astype(jnp.int32), mask.sum()

    over_chunks = jax.vmap(one, in_axes=(0, None, 0, 0, 0))
    over_heads = jax.vmap(over_chunks, in_axes=(0, 0, None, None, None))
    return jax.vmap(over_heads)(q_rows, k_heads, c0, c1, l0)


def reattention_naive(
    q: Float[Array, "B T Hq D"],
    k: Float[Array, "B S Hkv D"],
    v: Float[Array, "B S Hkv D"],
    *,
    sel: Selection,
    q_start=None,
    rope_theta: float = 10000.0,
    inv_freq=None,
    softmax_scale: float | None = None,
) -> Float[Array, "B T Hq D"]:
    """Dense formulation (tests): the selection of ``select_sorted`` as a keep-mask over all S
    keys; a kept key's position is the number of kept keys before it; row t attends to kept keys
    j <= t with RoPE at those positions."""
    geo, q0, inv_freq, scale = _prepare(q, k, v, sel, q_start, rope_theta, inv_freq,
                                        softmax_scale)
    glist, n_g = select_sorted(q, k, sel=sel, q_start=q0)
    c0, c1, l0 = chunk_bounds(q0, geo)
    q_rows = pack_rows(q.astype(jnp.float32), geo)
    k_heads = k.astype(jnp.float32).transpose(0, 2, 1, 3)
    v_heads = v.astype(jnp.float32).transpose(0, 2, 1, 3)
    pos = jnp.arange(geo.num_keys, dtype=jnp.int32)
    ng = glist.shape[-1]

    def one(q_c, keys, values, gl, n, c0_c, c1_c, l0_c):
        listed_at = jnp.where(jnp.arange(ng) < n, gl, geo.num_keys)  # num_keys: dropped
        listed = jnp.zeros(geo.num_keys, bool).at[listed_at].set(True, mode="drop")
        kept = listed | ((pos >= l0_c) & (pos < c1_c))
        new_pos = jnp.cumsum(kept) - 1
        t = row_positions(c0_c, geo.rows, geo.groups)
        t_pos = new_pos[jnp.minimum(t, geo.num_keys - 1)]
        k_rot = rotate(keys[None, None], new_pos[None, None], inv_freq)[0, 0]
        q_rot = rotate(q_c[None, None], t_pos[None, None], inv_freq)[0, 0]
        s = jnp.einsum("rd,sd->rs", q_rot, k_rot, precision=HIGHEST) * scale
        mask = kept[None, :] & (pos[None, :] <= t[:, None])
        return jnp.einsum("rs,sd->rd", _masked_softmax_weights(s, mask), values, precision=HIGHEST)

    over_chunks = jax.vmap(one, in_axes=(0, None, None, 0, 0, 0, 0, 0))
    over_heads = jax.vmap(over_chunks, in_axes=(0, 0, 0, 0, 0, None, None, None))
    out = jax.vmap(over_heads)(q_rows, k_heads, v_heads, glist, n_g, c0, c1, l0)
    return unpack_rows(out, geo).astype(q.dtype)


@functools.lru_cache(maxsize=None)
def attended_keys(num_keys: int, sel: Selection) -> int:
    """Keys the last query of a prefill of ``num_keys`` tokens attends (upper bound: spans
    assumed disjoint): the attended length a full attention baseline is compared at."""
    t = num_keys - 1
    c0 = t // sel.chunk_size * sel.chunk_size
    middle = max(c0 - sel.local_window - sel.sink_tokens, 0) // sel.middle_align * sel.middle_align
    l0 = min(sel.sink_tokens, c0) + middle
    return min(sel.sink_tokens, c0) + min(middle, sel.max_selected * sel.span) + (t + 1 - l0)
