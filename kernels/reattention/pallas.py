"""ReAttention as Pallas GPU kernels (Triton lowering), the same function as ``reference.py``.

Three stages per chunk of queries (README.md in this folder):

1. ``_score_kernel``: one program per (row tile of a chunk, key split, batch, kv head). Rows are
   the (query, head) pairs of a kv head (G heads packed with their queries, so each key tile is
   loaded once for all G heads). It sweeps the middle keys [sink, L0) of its split tile by tile:
   raw q . k scores (un-rotated), then a running per-row top-k kept in registers as an unordered
   (rows, K) set: while some row's best remaining score beats its current k-th, that row's best
   key (lowest position among equal scores) replaces its current minimum. Writes each row's K
   (score, position) picks per split. Chunks run latest first: their middles are the longest.
   On a Hopper GPU with 16-bit inputs the same stage runs as a warp-specialised Mosaic GPU
   kernel instead (``pallas_mgpu_score.py``, ``Config.score_lowering``).
2. Selection in XLA (``reference.select_from_picks``): merge the splits (a sort of splits * K
   candidates per row), count votes, keep the most-voted, expand spans, compact into the
   gathered list. O(C * G * K log) per chunk, independent of the context length. A chunk of at
   most 64 picks (a decode step: G * K) is selected by one kernel instead
   (``pallas_select.py``: extraction rounds and pairwise ranks, no sorts).
3. ``_attend_kernel``: one program per (row tile, batch, kv head); FlashAttention-style online
   softmax (base 2) over the gathered list (keys loaded by index), then over the contiguous tail
   [L0, c1) (local window + the chunk itself, causal on the last tiles). RoPE is applied in the
   kernel to the queries and every gathered key tile at the re-numbered positions, from cos/sin
   tables (positions 0 .. n-1) built in XLA; the head dim is split into its two rotary halves,
   so those scores are two half-width dots. The tail is read from a copy rotated once at the
   original positions (``tail_window``; same scores, as rows and tail share one re-numbering
   offset), one full-width dot per tile (``Config.tail_keys``). On a Hopper GPU with 16-bit
   inputs this stage runs as a warp-specialised Mosaic GPU kernel instead
   (``pallas_mgpu_attend.py``, ``Config.attend_lowering``): the lists are first gathered and
   rotated into contiguous blocks (``pallas_gather.py``), a group of chunks at a time.

A prefill's first chunks (start < sink + w + align) have an empty middle: they are causal
attention and run as such (``Config.full_prefix``, cuDNN on a GPU).

The Mosaic GPU kernels of a prefill read their rows from q and the rotated q in place and the
attention writes every group's queries into one (B, T, Hq, D) output, into which the prefix's
output is then copied (``Config.mgpu_rows``, ``mgpu_tokens.py``): no packed copy of q, no
concatenation of outputs. The Triton-lowered kernels read packed rows.

The Triton-lowered kernels read the KV cache in place (vector-indexed loads, clamped to the
cache), never padded; their one copy is the rotated tail window (at most T + w + align + sink
keys of each kv head). The Mosaic GPU attention also copies the values of that window and, a
group at a time, the gathered lists (``Config.gather_bytes``).
Forward only: ReAttention is training-free. On CPU the same kernels run through the Pallas
interpreter (``interpret=True``, the default off-GPU).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from jax_cca.rope import apply_rope, rope_cos_sin
from kernels.cca import pallas_mgpu
from kernels.cca.pallas_common import (LOG2E, NEG, call, cdiv, dot,  # noqa: F401
                                       exp2_for, online_softmax_update, pad_to, poison_outputs,
                                       resolve_interpret)
from kernels.reattention import (key_blocks, mgpu_tokens, pallas_block_select, pallas_combine,
                                 pallas_gather, pallas_mgpu_attend, pallas_mgpu_score,
                                 pallas_select, pallas_summaries, params, reference)
from kernels.reattention.params import (Config, Geometry, Selection, attend_splits,
                                        default_config, geometry, next_power_of_2, round_up,
                                        score_splits)

POS = -NEG  # padding columns of the running top-k set: never its minimum
INT_MAX = reference.INT_MAX


# ----------------------------------------------------------------------------- 1. scoring
def _merge_tile(s, cols, vals, idxs, *, top_k: int, kp: int):
    """Merge one score tile (BQ, BK) into the running top-k sets (BQ, KP).

    At most top_k rounds; a round runs while some row's best remaining score beats its set's
    minimum. Equal scores resolve to the lower position: a round takes the lowest column among
    equal maxima, and a set evicts, among equal minima, the entry with the highest position."""
    kcols = jnp.arange(kp, dtype=jnp.int32)

    def cond(c):
        it, _, m, _, _, thr = c
        return (it < top_k) & (jnp.max((m > thr).astype(jnp.int32)) > 0)

    def body(c):
        it, s, m, vals, idxs, thr = c
        j = jnp.min(jnp.where(s == m[:, None], cols[None, :], INT_MAX), axis=1)
        is_min = vals == thr[:, None]
        evict = jnp.max(jnp.where(is_min, idxs, -2), axis=1)
        col = jnp.min(jnp.where(is_min & (idxs == evict[:, None]), kcols[None, :], kp), axis=1)
        replace = (m > thr)[:, None] & (kcols[None, :] == col[:, None])
        vals = jnp.where(replace, m[:, None], vals)
        idxs = jnp.where(replace, j[:, None], idxs)
        s = jnp.where(cols[None, :] == j[:, None], NEG, s)
        return it + 1, s, jnp.max(s, axis=1), vals, idxs, jnp.min(vals, axis=1)

    start = (jnp.int32(0), s, jnp.max(s, axis=1), vals, idxs, jnp.min(vals, axis=1))
    _, _, _, vals, idxs, _ = lax.while_loop(cond, body, start)
    return vals, idxs


def _score_kernel(meta_ref, q_ref, k_ref, vals_ref, idx_ref, *, sink: int, top_k: int, kp: int,
                  bk: int, s_len: int, splits: int, split_len: int):
    split = pl.program_id(0) % splits
    l0 = meta_ref[2]
    lo = sink + split * split_len
    hi = jnp.minimum(l0, lo + split_len)
    q = q_ref[...]
    bq = q.shape[0]
    kcols = jnp.arange(kp, dtype=jnp.int32)
    vals = jnp.where(kcols[None, :] < top_k, jnp.full((bq, kp), NEG, jnp.float32), POS)
    idxs = jnp.full((bq, kp), -1, jnp.int32)

    def tile(kb, carry):
        cols = lo + kb * bk + jnp.arange(bk, dtype=jnp.int32)
        keys = k_ref[jnp.minimum(cols, s_len - 1), :]
        s = jnp.where(cols[None, :] < hi, dot(q, keys, trans_b=True), NEG)
        return _merge_tile(s, cols, *carry, top_k=top_k, kp=kp)

    vals, idxs = lax.fori_loop(0, cdiv(jnp.maximum(hi - lo, 0), bk), tile, (vals, idxs))
    vals_ref[...] = vals
    idx_ref[...] = idxs


def _uses_mgpu_score(q, k, sel: Selection, config: Config, interpret: bool) -> bool:
    """Whether the scoring runs the Mosaic GPU kernel (``Config.score_lowering``)."""
    fits = pallas_mgpu_score.supports(q.dtype, q.shape[-1], k.shape[1], sel.top_k,
                                      config.mgpu_block_k)
    if config.score_lowering == "auto" and q.shape[-1] > 128:  # block picks' 256-wide rows:
        fits = fits and config.mgpu_consumers == 4  # measured with 4 consumers (a prefill's)
    return pallas_mgpu.uses_mosaic_gpu(
        config.score_lowering, "score_lowering", fits,
        f"bfloat16/float16 q and k with head dim 64, 128 or 256, at least "
        f"{config.mgpu_block_k} keys (a multiple of 8) and top_k <= "
        f"{pallas_mgpu_score.MAX_TOP_K}; got {q.dtype}, head dim {q.shape[-1]}, {k.shape[1]} "
        f"keys, top_k {sel.top_k}", interpret)


@functools.partial(jax.jit, static_argnames=("sink", "top_k", "splits", "split_len", "block_k",
                                             "slots", "consumers", "merge", "tokens", "signed",
                                             "interpret"))
def _mgpu_score(q_rows, k, l0, **kwargs):
    """``pallas_mgpu_score.score`` as one jitted function, so that the layers of a model share
    one lowered kernel (as ``kernels.cca.pallas._mgpu_forward``)."""
    return pallas_mgpu_score.score(q_rows, k, l0, **kwargs)


def _merge_splits(vals, idx, top_k: int):
    """Best top_k of each row's candidates from all splits, ties to the lower position."""
    neg, idx = lax.sort((jnp.where(idx >= 0, -vals, jnp.inf), jnp.where(idx >= 0, idx, INT_MAX)),
                        dimension=-1, num_keys=2)
    vals, idx = -neg[..., :top_k], idx[..., :top_k]
    return vals, jnp.where(idx == INT_MAX, -1, idx)


def _score(q_rows, k, meta, geo: Geometry, config: Config, interpret: bool, mgpu: bool,
           merge: bool = True, tokens: tuple[int, int, int] | None = None,
           signed: bool = False):
    """Per-row picks (vals, idx), (B, Hkv, NC, R, K) for the chunk's R = ``geo.rows`` real rows
    (the kernels score ``q_rows``' padded rows too; those are dropped before the key splits
    are merged, so a decode step sorts G rows, not 64 x consumers): unordered, idx -1 where
    none. ``mgpu``: through the Mosaic GPU kernel (``_uses_mgpu_score``). ``merge`` False: the
    candidates from every key split, unmerged and candidate-major, (B, Hkv, NC, splits x K,
    R') with R' >= R rows (the Mosaic GPU kernel's own layout: no copy). ``tokens`` = (C,
    q_offset, R'): ``q_rows`` is q itself, read in place by the Mosaic GPU kernel
    (``Config.mgpu_rows``), whose rows come back to the packed order here. ``signed``: the
    Mosaic GPU kernel makes block picks' signed rows from q's (``Config.mgpu_signed_rows``)."""
    if tokens is None:
        b, hkv, nc, r_pad = q_rows.shape[:4]
    else:
        b, hkv, nc, r_pad = q_rows.shape[0], k.shape[2], meta.shape[1], tokens[2]
    d = k.shape[3]  # the width scored
    s_len = k.shape[1]
    sel = geo.sel
    if signed and not mgpu:
        raise ValueError("only the Mosaic GPU scoring makes the signed rows itself")
    if mgpu:
        bk, rows = config.mgpu_block_k, pallas_mgpu_score.ROWS * config.mgpu_consumers
        one_wave = geo.num_queries == 1  # a decode step (ONE_WAVE_PROGRAMS)
        splits = score_splits(config, geo, nc * r_pad // rows,
                              params.ONE_WAVE_PROGRAMS if one_wave else params.TARGET_PROGRAMS)
        split_len = round_up(max(s_len - sel.sink_tokens, 1), splits * bk) // splits
        slots = config.mgpu_slots
        if d > 128:  # the ring is sized for d <= 128; block picks' 256-wide rows take fewer
            slots = pallas_mgpu_score.fitting_slots(slots, d, q_rows.dtype.itemsize, sel.top_k,
                                                    bk, config.mgpu_consumers, config.mgpu_merge)
        vals, idx = _mgpu_score(q_rows, k, meta[..., 2], sink=sel.sink_tokens, top_k=sel.top_k,
                                splits=splits, split_len=split_len, block_k=bk, slots=slots,
                                consumers=config.mgpu_consumers, merge=config.mgpu_merge,
                                tokens=tokens, signed=signed, interpret=interpret)
        if tokens is not None:  # head-major tiles -> packed rows
            vals, idx = (mgpu_tokens.to_packed(x, geo.groups) for x in (vals, idx))
        if not merge:  # (B, Hkv, NC, splits, K, R'): splits and K adjacent
            return vals.reshape(b, hkv, nc, -1, r_pad), idx.reshape(b, hkv, nc, -1, r_pad)
        rows = lambda x: x[..., : geo.rows].transpose(0, 1, 2, 5, 3, 4).reshape(
            b, hkv, nc, geo.rows, -1)
        vals, idx = rows(vals), rows(idx)
        return _merge_splits(vals, idx, sel.top_k) if splits > 1 else (vals, idx)
    bq, bk = config.score_block_q, config.score_block_k
    tiles = r_pad // bq
    splits = score_splits(config, geo, nc * tiles)
    split_len = round_up(max(s_len - sel.sink_tokens, 1), splits * bk) // splits
    kp = max(2, next_power_of_2(sel.top_k))
    kernel = functools.partial(_score_kernel, sink=sel.sink_tokens, top_k=sel.top_k, kp=kp, bk=bk,
                               s_len=s_len, splits=splits, split_len=split_len)
    chunk_of = lambda i: nc - 1 - lax.div(i, tiles * splits)  # heavy first: later chunks score
    tile_of = lambda i: lax.div(lax.rem(i, tiles * splits), splits)  # longer middles
    out_map = lambda i, bi, h: (bi, h, chunk_of(i), lax.rem(i, splits), tile_of(i), 0)
    out_shape = jax.ShapeDtypeStruct((b, hkv, nc, splits, r_pad, kp), jnp.float32)
    vals, idx = call(
        kernel,
        grid=(nc * tiles * splits, b, hkv),
        in_specs=[
            pl.BlockSpec((None, None, 8), lambda i, bi, h: (bi, chunk_of(i), 0)),
            pl.BlockSpec((None, None, None, bq, d), lambda i, bi, h: (bi, h, chunk_of(i),
                                                                      tile_of(i), 0)),
            pl.BlockSpec((None, s_len, None, d), lambda i, bi, h: (bi, 0, h, 0)),
        ],
        out_specs=[pl.BlockSpec((None, None, None, None, bq, kp), out_map)] * 2,
        out_shape=[out_shape, jax.ShapeDtypeStruct(out_shape.shape, jnp.int32)],
        inputs=[meta, q_rows, k],
        num_warps=config.score_warps,
        num_stages=config.score_stages,
        interpret=interpret,
        name="reattention_score",
    )
    if not merge:  # (B, Hkv, NC, splits, R', Kp) -> candidate-major
        cands = lambda x: x[..., : sel.top_k].transpose(0, 1, 2, 3, 5, 4).reshape(
            b, hkv, nc, -1, r_pad)
        return cands(vals), cands(idx)
    rows = lambda x: x[..., : geo.rows, : sel.top_k].transpose(0, 1, 2, 4, 3, 5).reshape(
        b, hkv, nc, geo.rows, -1)
    vals, idx = rows(vals), rows(idx)
    return _merge_splits(vals, idx, sel.top_k) if splits > 1 else (vals, idx)


# ----------------------------------------------------------------------------- 3. attention
def _online_step(carry, qr1, qr2, kr1, kr2, values, scale2, mask, exp2):
    """One key tile of the online softmax (base 2) with RoPE fused as two half-width dots;
    ``mask`` None: every key visible."""
    s = dot(qr1, kr1, trans_b=True) + dot(qr2, kr2, trans_b=True)
    return online_softmax_update(carry, s, values, scale2, mask, exp2)


def _rotate(x1, x2, cos, sin, dtype):
    """RoPE of the two halves (float32 math), cast to the matmul dtype."""
    return (x1 * cos - x2 * sin).astype(dtype), (x2 * cos + x1 * sin).astype(dtype)


def _attend_kernel(meta_ref, q_ref, k_ref, v_ref, glist_ref, cos_ref, sin_ref, *refs,
                   groups: int, bk: int, s_len: int, n_pos: int, tiles: int, splits: int,
                   scale: float, exp2, rotated_tail: bool):
    """``rotated_tail``: two more inputs, the rows rotated at their ORIGINAL positions and the
    keys of the tail window rotated at theirs (window row i is key ws + i, ws = meta[4]); the
    tail is then plain attention, one full-width dot per tile with no rotation in the kernel.
    RoPE scores depend on position differences only, and the tail and the rows are re-numbered
    by the same offset n_g - L0, so this is the same function (up to the rounding of the angles,
    which are taken at the original positions).

    ``splits`` > 1: program i takes split i % splits of the row tile's key tiles (the list's,
    then the tail's, as one sequence cut into equal runs) and writes its normalised partial
    output and base-2 log-sum-exp (0 and ``NEG`` where it saw no key) for
    ``pallas_combine.merge_partials``."""
    n_in = 2 if rotated_tail else 0
    qo_ref, krot_ref = refs[:n_in] if rotated_tail else (None, None)
    o_ref, lse_ref = refs[n_in:] if splits > 1 else (refs[n_in], None)
    half = cos_ref.shape[1]
    dtype = q_ref.dtype
    bq = q_ref.shape[0]
    c0, c1, l0, n_g = meta_ref[0], meta_ref[1], meta_ref[2], meta_ref[3]
    r0 = lax.rem(lax.div(pl.program_id(0), splits), tiles) * bq
    t = c0 + lax.div(r0 + jnp.arange(bq, dtype=jnp.int32), groups)  # query position of each row
    q_pos = jnp.minimum(n_g + t - l0, n_pos - 1)
    f32 = lambda x: x.astype(jnp.float32)
    qr1, qr2 = _rotate(f32(q_ref[:, pl.ds(0, half)]), f32(q_ref[:, pl.ds(half, half)]),
                       cos_ref[q_pos, :], sin_ref[q_pos, :], dtype)
    scale2 = scale * LOG2E
    d = q_ref.shape[1]
    carry = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), NEG, jnp.float32),
             jnp.zeros((bq,), jnp.float32))

    def keys_at(rows, p0):  # rotated key halves and values of cache rows, positions p0 + i
        k1, k2 = f32(k_ref[rows, pl.ds(0, half)]), f32(k_ref[rows, pl.ds(half, half)])
        kr1, kr2 = _rotate(k1, k2, cos_ref[pl.ds(p0, bk), :], sin_ref[pl.ds(p0, bk), :], dtype)
        return kr1, kr2, v_ref[rows, :]

    def gathered(kb, carry):  # slot i of the list sits at position i
        slots = kb * bk + jnp.arange(bk, dtype=jnp.int32)
        kr1, kr2, values = keys_at(glist_ref[pl.ds(kb * bk, bk)], kb * bk)
        return _online_step(carry, qr1, qr2, kr1, kr2, values, scale2, (slots < n_g)[None, :],
                            exp2)

    unmasked, n_tail = tail_tiles(c0, c1, l0, r0, groups=groups, bk=bk, s_len=s_len)
    n_list = cdiv(n_g, bk)
    per = cdiv(n_list + n_tail, splits)
    lo = lax.rem(pl.program_id(0), splits) * per  # this split's run of key tiles [lo, lo + per)
    hi = lo + per
    carry = lax.fori_loop(jnp.minimum(lo, n_list), jnp.minimum(hi, n_list), gathered, carry)
    if rotated_tail:
        qo, ws, w_len = qo_ref[...], meta_ref[4], krot_ref.shape[0]

    def tail(masked):  # key j in [L0, c1) sits at position n_g + j - L0; row t sees j <= t
        def body(tb, carry):
            j = l0 + tb * bk + jnp.arange(bk, dtype=jnp.int32)
            mask = (j[None, :] <= t[:, None]) if masked else None
            if not rotated_tail:
                kr1, kr2, values = keys_at(jnp.minimum(j, s_len - 1), n_g + tb * bk)
                return _online_step(carry, qr1, qr2, kr1, kr2, values, scale2, mask, exp2)
            if masked:  # may run past the cache's end: clamped row indices
                keys = krot_ref[jnp.clip(j - ws, 0, w_len - 1), :]
                values = v_ref[jnp.minimum(j, s_len - 1), :]
            else:  # whole tile <= every row's t, and < S (tail_tiles): contiguous
                keys = krot_ref[pl.ds(l0 + tb * bk - ws, bk), :]
                values = v_ref[pl.ds(l0 + tb * bk, bk), :]
            return online_softmax_update(carry, dot(qo, keys, trans_b=True), values, scale2,
                                         mask, exp2)
        return body

    run = lambda a, b: (jnp.clip(lo - n_list, a, b), jnp.clip(hi - n_list, a, b))
    carry = lax.fori_loop(*run(0, unmasked), tail(False), carry)
    acc, m, l = lax.fori_loop(*run(unmasked, n_tail), tail(True), carry)
    if splits == 1:
        o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    else:
        seen = l > 0
        o_ref[...] = jnp.where(seen[:, None], acc / jnp.where(seen, l, 1.0)[:, None], 0.0)
        lse_ref[...] = jnp.where(seen, m + jnp.log2(jnp.where(seen, l, 1.0)), NEG)


def tail_tiles(c0, c1, l0, r0, *, groups: int, bk: int, s_len: int):
    """(unmasked, n_tail): the tail [L0, c1) of the row tile starting at packed row r0 is
    n_tail key tiles, of which the first ``unmasked`` precede every row's query AND the cache's
    end: the kernel reads those as contiguous, unclamped tiles. Rows past c1 (padding) or past
    the cache (a chunk written past S, whose rows are not stored) count as c1 - 1 and S - 1."""
    t_min = jnp.minimum(c0 + lax.div(r0, groups), jnp.minimum(c1, s_len) - 1)
    n_tail = cdiv(c1 - l0, bk)
    return jnp.clip(lax.div(t_min - l0 + 1, bk), 0, n_tail), n_tail


def rope_tables(n_pos: int, inv_freq: np.ndarray):
    """cos, sin (n_pos, D/2) float32 of positions 0 .. n_pos - 1 (the angles of jax_cca.rope)."""
    angles = jnp.arange(n_pos).astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]
    return jnp.cos(angles), jnp.sin(angles)


def rotate_at(x: Float[Array, "B N H D"], positions, inv_freq) -> Float[Array, "B N H D"]:
    """RoPE of x at positions (B, N), float32 math (as the kernel's), cast back to x's dtype.

    The (B, N, D) cos and sin are materialised first (``optimization_barrier``): fused into the
    rotation, XLA evaluated them once per element of x, i.e. again for every head, and float32
    sin / cos of large angles take the slow argument-reduction path."""
    cos, sin = lax.optimization_barrier(rope_cos_sin(positions, inv_freq))
    return apply_rope(x.astype(jnp.float32), cos, sin).astype(x.dtype)


def window_length(geo: Geometry) -> int:
    """W: keys of ``tail_window``: T + w + align + sink, 7 more so that the window can start at
    a multiple of 8, and then enough that S - W is one; at most S. (The Mosaic GPU attention
    copies tail blocks into 8-row tiles from the window and from the cache at the same rows
    relative to ws, so ws must be a multiple of 8: Mosaic GPU splits a copy's first row into
    tile and row within the tile, and a start inside a tile cannot be copied.)"""
    sel = geo.sel
    w_len = geo.num_queries + sel.local_window + sel.middle_align + sel.sink_tokens + 7
    if w_len >= geo.num_keys:
        return geo.num_keys
    return w_len + (geo.num_keys - w_len) % 8


def window_rows(x: Float[Array, "B S H D"], ws, w_len: int) -> Float[Array, "B W H D"]:
    """Rows ws[b] .. ws[b] + w_len - 1 of each batch element."""
    return jax.vmap(lambda xb, s: lax.dynamic_slice_in_dim(xb, s, w_len, axis=0))(x, ws)


def tail_window(k, q0, geo: Geometry, inv_freq):
    """Keys every chunk's tail [L0, c1) can touch, rotated at their original positions:
    (rotated window (B, W, Hkv, D), its first key ws (B,), a multiple of 8). The window
    (``window_length``) covers [L0, c1) of every chunk of a call: L0 >= q_start - w - align,
    ws at most 7 keys before that, and ws = S - W (a multiple of 8) where the window reaches
    the cache's end."""
    sel = geo.sel
    w_len = window_length(geo)
    ws = jnp.clip(q0 - sel.local_window - sel.middle_align - sel.sink_tokens, 0,
                  geo.num_keys - w_len) // 8 * 8
    window = window_rows(k, ws, w_len)
    positions = ws[:, None] + jnp.arange(w_len, dtype=jnp.int32)[None, :]
    return rotate_at(window, positions, inv_freq), ws


def _attend(q_rows, k, v, glist, meta, inv_freq, scale, geo: Geometry, config: Config,
            interpret: bool, rotated=None, r_att: int | None = None):
    """``rotated``: None (RoPE of every key tile in the kernel) or (qo_rows, window), the rows
    rotated at their original positions and ``tail_window``'s keys (its ws in meta[..., 4]).
    ``r_att``: the first rows of q_rows attended, a multiple of ``attn_block_q`` (default all;
    q_rows is read in place, so a decode step's rows padded for the scoring are not copied)."""
    b, hkv, nc, _, d = q_rows.shape
    r_pad = r_att or q_rows.shape[3]
    s_len = k.shape[1]
    bq, bk = config.attn_block_q, config.attn_block_k
    tiles = r_pad // bq
    glist = pad_to(glist, 3, bk)  # NG slots or more, read in place
    ng_pad = glist.shape[3]
    n_pos = round_up(geo.num_gathered, bk) + round_up(geo.tail, bk)
    tables = jnp.stack(rope_tables(n_pos, inv_freq))  # cos, sin: one XLA kernel, not two
    splits = attend_splits(config, geo, nc * tiles * b * hkv, params.cdiv(n_pos, bk))
    kernel = functools.partial(_attend_kernel, groups=geo.groups, bk=bk, s_len=s_len,
                               n_pos=n_pos, tiles=tiles, splits=splits, scale=scale,
                               exp2=exp2_for(interpret), rotated_tail=rotated is not None)
    chunk_of = lambda i: lax.div(i, tiles * splits)
    tile_of = lambda i: lax.rem(lax.div(i, splits), tiles)
    row_map = lambda i, bi, h: (bi, h, chunk_of(i), tile_of(i), 0)
    kv_spec = pl.BlockSpec((None, s_len, None, d), lambda i, bi, h: (bi, 0, h, 0))
    table_spec = lambda j: pl.BlockSpec((None, n_pos, d // 2), lambda i, bi, h: (j, 0, 0))
    in_specs = [
        pl.BlockSpec((None, None, None, 8), lambda i, bi, h: (bi, h, chunk_of(i), 0)),
        pl.BlockSpec((None, None, None, bq, d), row_map),
        kv_spec, kv_spec,
        pl.BlockSpec((None, None, None, ng_pad), lambda i, bi, h: (bi, h, chunk_of(i), 0)),
        table_spec(0), table_spec(1),
    ]
    inputs = [meta, q_rows, k, v, glist, tables, tables]
    if rotated is not None:
        qo_rows, window = rotated
        in_specs += [pl.BlockSpec((None, None, None, bq, d), row_map),
                     pl.BlockSpec((None, window.shape[1], None, d),
                                  lambda i, bi, h: (bi, 0, h, 0))]
        inputs += [qo_rows, window]
    if splits == 1:
        out_specs = [pl.BlockSpec((None, None, None, bq, d), row_map)]
        out_shape = [jax.ShapeDtypeStruct((b, hkv, nc, r_pad, d), q_rows.dtype)]
    else:  # per split: normalised partial output (float32) and base-2 log-sum-exp
        split_map = lambda i, bi, h: (bi, h, chunk_of(i), lax.rem(i, splits), tile_of(i))
        out_specs = [pl.BlockSpec((None, None, None, None, bq, d), lambda *g: (*split_map(*g), 0)),
                     pl.BlockSpec((None, None, None, None, bq), split_map)]
        out_shape = [jax.ShapeDtypeStruct((b, hkv, nc, splits, r_pad, d), jnp.float32),
                     jax.ShapeDtypeStruct((b, hkv, nc, splits, r_pad), jnp.float32)]
    outs = call(
        kernel,
        grid=(nc * tiles * splits, b, hkv),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        inputs=inputs,
        num_warps=config.attn_warps,
        num_stages=config.attn_stages,
        interpret=interpret,
        name="reattention_attend",
    )
    if splits == 1:
        return outs[0]
    if pallas_combine.applies(geo.rows, r_pad):  # one launch; rows past geo.rows: padding
        return pallas_combine.merge_partials(*outs, rows=geo.rows, dtype=q_rows.dtype,
                                             interpret=interpret)
    return pallas_combine.merge_partials_reference(*outs).astype(q_rows.dtype)


def _rows_in_place(geo: Geometry, config: Config) -> bool:
    """Whether the Mosaic GPU kernels read and write a prefill's rows in place
    (``Config.mgpu_rows``, ``mgpu_tokens``): T must be a multiple of 8 as well, as the TMA
    descriptors of q and of the output tile their query dimension by 8."""
    return (config.mgpu_rows == "in_place" and geo.num_queries > 1
            and mgpu_tokens.applies(geo.groups, geo.chunk, geo.num_queries))


def _tokens(qo, geo: Geometry, p: int, r_att: int, interpret: bool):
    """(``pallas_mgpu_attend.Tokens``, the rotated queries past the prefix) for the attention
    with its rows in place: output (B, T, Hq, D), its queries from p on written by the kernel.
    The interpreter raises on copies past an array's end, which the GPU fills or drops: there
    the queries are padded as far as a padding tile reads and the output reaches NC * C."""
    out_len = geo.num_queries
    if interpret:
        qo = mgpu_tokens.pad_for_interpreter(qo, geo.num_chunks - p // geo.chunk, geo.chunk,
                                             r_att, geo.groups)
        out_len = geo.num_chunks * geo.chunk
    return pallas_mgpu_attend.Tokens(geo.chunk, r_att, 0, p, out_len), qo


def _uses_mgpu_attend(q, geo: Geometry, config: Config, rotated: bool, interpret: bool) -> bool:
    """Whether the gathered attention runs the Mosaic GPU kernel (``Config.attend_lowering``)."""
    fits = (pallas_mgpu_attend.supports(q.dtype, geo.head_dim) and rotated
            and geo.num_queries > 1)
    return pallas_mgpu.uses_mosaic_gpu(
        config.attend_lowering, "attend_lowering", fits,
        f"bfloat16/float16 inputs with head dim 64 or 128, the rotated tail (Config.tail_keys) "
        f"and more than one query; got {q.dtype}, head dim {geo.head_dim}, tail "
        f"{'rotated' if rotated else 'rotated in the kernel'}, {geo.num_queries} queries",
        interpret)


@functools.partial(jax.jit, static_argnames=("groups", "num_keys", "scale", "block_k", "slots",
                                             "tokens", "piece", "overlap", "interpret"),
                   donate_argnames=("out",))
def _mgpu_attend(qo_rows, kg, vg, k_window, v, meta, out=None, list_rows=None, **kwargs):
    """``pallas_mgpu_attend.attend`` as one jitted function (one lowered kernel for all layers;
    ``out``, written in place, is donated: called op by op, it is not copied)."""
    return pallas_mgpu_attend.attend(qo_rows, kg, vg, k_window, v, meta, out=out,
                                     list_rows=list_rows, **kwargs)


def _attend_mgpu(qo_rows, k, v, glist, meta, window, inv_freq, scale, geo: Geometry,
                 config: Config, interpret: bool, tokens=None):
    """The gathered attention through ``pallas_mgpu_attend``: chunks in groups whose gathered
    lists (keys and values) fit in ``Config.gather_bytes``, one after the other, each group's
    lists gathered and rotated (``pallas_gather``), then attended by the kernel, which reads the
    group's rows in place (meta's row shift: the groups' kernels differ at most in the last
    group's size, so at most two are compiled). The groups are unrolled, not a loop: a while
    loop's condition is read back by the host every trip, and stacking the groups for
    ``lax.map`` cost a transpose of the rows, a zeroed output and a transpose back. Each group's
    lists wait for the previous group's output (``optimization_barrier``), so that one group's
    lists are alive at a time.

    With ``tokens`` (``pallas_mgpu_attend.Tokens``), ``qo_rows`` is the rotated queries
    (B, T', Hq, D) and every group writes its queries into one output (B, ``tokens.out_len``,
    Hq, D) in place; its queries before ``tokens.o_offset`` are left for the caller. (jax 0.10's
    interpreter cannot write in place: there each group's output is merged in by a copy.)"""
    b, hkv, ncr, _ = glist.shape
    d = k.shape[3]
    bk = config.mgpu_attend_block_k
    k_window, v_rows = pallas_mgpu_attend.tail_sources(
        window, v, block_k=bk, num_queries=geo.num_queries, interpret=interpret)
    piece = 0  # > 0: the lists' values read in place (``Config.mgpu_list_values``)
    if config.mgpu_list_values == "in_place" or (config.mgpu_list_values == "auto"
                                                 and geo.groups == 1):
        piece = pallas_mgpu_attend.values_piece(geo.sel, bk)
        if not piece and config.mgpu_list_values == "in_place":
            raise ValueError(f"Config.mgpu_list_values='in_place' needs lists made of runs of "
                             f"cache rows (block picks) whose sink_tokens, key_block and "
                             f"mgpu_attend_block_k={bk} share a factor that is a multiple of 8; "
                             f"got {geo.sel}")
    per_chunk = (b * hkv * round_up(glist.shape[3], bk) * d * jnp.dtype(k.dtype).itemsize
                 * (1 if piece else 2))
    n_groups = params.cdiv(ncr, max(1, min(ncr, config.gather_bytes // per_chunk)))
    per_group = params.cdiv(ncr, n_groups)
    in_place = tokens is not None and mgpu_tokens.in_place_supported(interpret)
    outs = []
    for lo in range(0, ncr, per_group):
        gl = glist[:, :, lo:lo + per_group]
        mt = meta[:, :, lo:lo + per_group].at[..., 5].set(lo)  # rows: chunk c + lo
        if outs:
            outs[-1], gl = lax.optimization_barrier((outs[-1], gl))
        kg, vg = pallas_gather.gather_list(k, v, gl, mt[..., 2], mt[..., 3], inv_freq, bk,
                                           values=not piece, interpret=interpret)
        into = outs[-1] if in_place and outs else None
        rows = pallas_gather.padded_lists(gl, bk) if piece else None
        o = _mgpu_attend(qo_rows, kg, vg, k_window, v_rows, mt, into, rows, groups=geo.groups,
                         num_keys=geo.num_keys, scale=scale, block_k=bk,
                         slots=config.mgpu_attend_slots, tokens=tokens, piece=piece,
                         overlap=config.mgpu_attend_overlap, interpret=interpret)
        if interpret and not isinstance(o, jax.core.Tracer):
            # Op by op, jax 0.10's Mosaic GPU interpreter can deadlock when the next kernel is
            # dispatched while the threads of the previous one still run: one at a time.
            o.block_until_ready()
        if tokens is not None and outs and not in_place:  # the group's queries, copied in
            first = tokens.o_offset + lo * tokens.chunk
            last = min(first + gl.shape[2] * tokens.chunk, tokens.out_len)
            o = lax.dynamic_update_slice_in_dim(outs[-1], o[:, first:last], first, axis=1)
        outs = [o] if tokens is not None else [*outs, o]  # in place: one output
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)


# ----------------------------------------------------------------------------- the op
def check_head_dim(d: int) -> None:
    if d < 32 or d & (d - 1):
        raise ValueError(f"the Pallas ReAttention kernels need a power-of-two head dim >= 32 "
                         f"(two rotary halves of >= 16 for the matmuls); got {d}")


def _meta(*fields):
    """int32 (..., 8) rows of per-chunk scalars for the kernels (padded to 8 for the block)."""
    m = jnp.stack(fields, axis=-1).astype(jnp.int32)
    return jnp.pad(m, [(0, 0)] * (m.ndim - 1) + [(0, 8 - m.shape[-1])])


def picks(q, k, *, sel: Selection, q_start=None, config: Config | None = None,
          interpret: bool | None = None, q_lengths=None, skip: int = 0):
    """The scoring kernel's per-row picks as (vals, idx) (B, Hkv, NC, R, K), unordered (idx -1:
    none; rows of queries past the end or past ``q_lengths``: -1), in the row order of
    ``reference.pack_rows``. ``skip``: of chunks ``skip`` .. NC - 1 only (the op skips the chunks
    it runs as full attention, ``full_prefix_chunks``)."""
    return _picks(q, k, sel=sel, q_start=q_start, config=config, interpret=interpret,
                  q_lengths=q_lengths, skip=skip)[:2]


def _packed_rows(q, geo: Geometry, p: int, tile: int):
    """q's queries from p on as packed rows (``reference.pack_rows``), R padded to ``tile``."""
    geo_rows = dataclasses.replace(geo, num_queries=geo.num_queries - p)
    return pad_to(reference.pack_rows(q[:, p:], geo_rows), 3, tile)


def _picks(q, k, *, sel: Selection, q_start, config: Config | None, interpret: bool | None,
           q_lengths=None, skip: int = 0, merge: bool = True, block_summaries=None):
    """``picks`` and the packed rows it scored (None where the scoring read q in place,
    ``Config.mgpu_rows``), of chunks ``skip`` .. NC - 1 only: a prefill's first chunks have
    empty middles (``full_prefix_chunks``), so their picks would all be -1. ``merge`` False:
    every key split's candidates, unmerged and candidate-major (``_score``)."""
    geo = geometry(q.shape, k.shape, sel)
    config = config or default_config(geo.head_dim, jnp.dtype(q.dtype).itemsize, geo.rows)
    interpret = resolve_interpret(interpret)
    q0 = reference.query_starts(q_start, geo.batch, geo.num_keys, geo.num_queries)
    c0, c1, l0 = (x[:, skip:] for x in reference.chunk_bounds(q0, geo))
    blocks = sel.key_block > 1
    signed = False
    if blocks:  # the same kernels score [q+, q-] against the blocks' [max, min] rows
        if block_summaries is None:  # (a decode cache keeps them)
            block_summaries = pallas_summaries.block_summaries(k, sel, interpret=interpret)
        k = block_summaries
        rows_2d = jax.ShapeDtypeStruct((*q.shape[:3], 2 * q.shape[3]), q.dtype)
        geo_s = dataclasses.replace(geo, num_keys=k.shape[1], head_dim=rows_2d.shape[3])
        meta = _meta(c0, c1, key_blocks.summary_end(l0, geo.num_keys, sel))
        mgpu = _uses_mgpu_score(rows_2d, k, sel, config, interpret)
        # The Mosaic GPU kernel can make the signed rows from q's (head dim 64 or 128); else
        # they are a 2D-wide copy of q.
        signed = (mgpu and config.mgpu_signed_rows == "in_kernel"
                  and pallas_mgpu.wgmma_inputs(q.dtype, q.shape[3]))
        q = q if signed else key_blocks.signed_queries(q)
    else:
        geo_s, meta = geo, _meta(c0, c1, l0)
        mgpu = _uses_mgpu_score(q, k, sel, config, interpret)
    tile = max(config.score_block_q, config.attn_block_q)
    if mgpu:  # its programs take 64 x consumers rows
        tile = max(tile, pallas_mgpu_score.ROWS * config.mgpu_consumers)
    p = skip * geo.chunk
    if mgpu and _rows_in_place(geo_s, config):  # q read in place; no packed rows
        r_pad = round_up(geo.rows, tile)
        if interpret:
            q = mgpu_tokens.pad_for_interpreter(q, geo.num_chunks, geo.chunk, r_pad, geo.groups)
        vals, idx = _score(q, k, meta, geo_s, config, interpret, mgpu, merge,
                           tokens=(geo.chunk, p, r_pad), signed=signed)
        q_rows = None
    else:
        q_rows = _packed_rows(q, geo_s, p, tile)
        vals, idx = _score(q_rows, k, meta, geo_s, config, interpret, mgpu, merge,
                           signed=signed)
    if blocks:  # summary rows -> the token positions whose spans are the blocks; the signed
        idx, q_rows = key_blocks.centres(idx, sel), None  # rows are not the attention's
    if q_lengths is None and geo.num_queries % geo.chunk == 0:  # every row votes (decode)
        return vals, idx, (q_rows, c0, c1, l0, geo)
    vote_end = reference.voting_ends(c1, q0, q_lengths)  # the kernels still get c1
    rows = idx.shape[3] if merge else idx.shape[4]  # R, or the candidates' R' (rows last)
    live = reference.row_positions(c0, rows, geo.groups) < vote_end[..., None]  # (B, NC, R)
    live = live[:, None, :, :, None] if merge else live[:, None, :, None, :]
    return vals, jnp.where(live, idx, -1), (q_rows, c0, c1, l0, geo)


def full_prefix_chunks(geo: Geometry, q_start, mode: str) -> int:
    """Chunks of a call run as plain causal attention: 0 unless the call starts at position 0
    (``q_start`` None with S = T, or the int 0) and ``mode`` is "cudnn" or "xla". A chunk with
    c0 < sink + w + align has an empty middle, so it keeps every earlier key at its own
    position: ReAttention there IS causal attention (nothing to score, select or re-number)."""
    starts_at_zero = (q_start is None and geo.num_keys == geo.num_queries) or (
        isinstance(q_start, int) and not isinstance(q_start, bool) and q_start == 0)
    if mode == "off" or not starts_at_zero:
        return 0
    sel = geo.sel
    return min(geo.num_chunks, params.cdiv(sel.sink_tokens + sel.local_window
                                           + sel.middle_align, geo.chunk))


def _resolve_modes(config: Config, geo: Geometry, dtype, interpret: bool) -> tuple[str, bool]:
    """(full-prefix mode, rotated tail?) of ``config`` for this call (``Config`` says what
    "auto" means)."""
    prefix = config.full_prefix
    on_gpu = not interpret and jax.default_backend() == "gpu"
    if prefix == "auto":
        cudnn_fits = (on_gpu and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
                      and geo.head_dim <= 128 and geo.head_dim % 8 == 0)
        prefix = "cudnn" if cudnn_fits else "off"
    elif prefix == "cudnn" and not on_gpu:
        raise ValueError("Config.full_prefix='cudnn' needs a CUDA GPU and compiled kernels "
                         "(interpret=False); use 'xla' or 'off' here")
    fits = window_length(geo) >= config.attn_block_k  # whole tiles exist (W <= S)
    if config.tail_keys == "rotated" and not fits:
        raise ValueError(f"Config.tail_keys='rotated' reads the tail in whole key tiles, but the "
                         f"tail window holds {window_length(geo)} keys, fewer than "
                         f"attn_block_k={config.attn_block_k}; use 'auto' or 'in_kernel'")
    rotated = config.tail_keys == "rotated" or (config.tail_keys == "auto" and fits
                                                and geo.num_queries > 1)
    return prefix, rotated


def _select(idx, vals, c0, l0, sel: Selection, interpret: bool, rows: int,
            blocks_of: int | None, block_select: str):
    """``reference.select_from_picks`` of each of the first ``rows`` rows' best top_k
    candidates, from candidate-major (N, C, R') candidates (C = key splits x top_k; C = top_k:
    one split, nothing to merge). Where a chunk has few picks (a decode step) one kernel merges
    and selects (``pallas_select``); otherwise XLA sorts the candidates (``_merge_splits``) and,
    for many picks, selects with its sorts. The lists may be wider than NG (the kernel's own
    width, ``select_from_candidates(wide=True)``); their slots from n_g on hold 0.
    ``blocks_of``: the cache length S of block picks, which count their votes per block and
    keep the best by the block-selection kernel (``pallas_block_select``) or by XLA's sorts
    (``reference.select_from_block_picks``), as ``block_select`` says
    (``Config.block_select``)."""
    n, c, _ = idx.shape
    if c > sel.top_k and pallas_select.merges(rows, c, sel.top_k):
        return pallas_select.select_from_candidates(idx, vals, c0, l0, sel, rows=rows,
                                                    interpret=interpret, wide=True)
    nb = None if blocks_of is None else key_blocks.num_blocks(blocks_of, sel)
    by_kernel = (nb is not None and block_select in ("kernel", "auto")
                 and pallas_block_select.applies(nb))

    def kept_blocks(idx, vals):  # the votes per block, the kept blocks by thresholds
        votes, best = reference.block_votes(idx, vals, sel, blocks_of)
        centres = pallas_block_select.kept_centres(votes, best, sel, idx.shape[1],
                                                   interpret=interpret)
        return reference.lists_from_centres(centres, c0, l0, sel)

    if by_kernel and c == sel.top_k and not pallas_select.applies(rows * c):
        # Votes are counts and maxima, which do not depend on the picks' order: the
        # candidate-major picks as they are, without the transposes to rows.
        return kept_blocks(*(x[:, :, :rows].reshape(n, -1) for x in (idx, vals)))
    idx, vals = (x[:, :, :rows].transpose(0, 2, 1) for x in (idx, vals))  # (N, R, C)
    if c > sel.top_k:
        vals, idx = _merge_splits(vals, idx, sel.top_k)
    idx, vals = idx.reshape(n, -1), vals.reshape(n, -1)
    if pallas_select.applies(idx.shape[1]):
        return pallas_select.select_from_picks(idx, vals, c0, l0, sel, interpret=interpret)
    if by_kernel:
        return kept_blocks(idx, vals)
    if nb is not None and (block_select in ("scatter", "kernel") or (
            block_select == "auto" and nb <= idx.shape[1])):
        return reference.select_from_block_picks(idx, vals, c0, l0, sel, blocks_of)
    return reference.select_from_picks(idx, vals, c0, l0, sel)


def _sink_lists(c0, geo: Geometry):
    """The selection of the chunks starting at c0 (B, N) whose middles are empty: the list is
    the sink, n_g = min(sink, c0)."""
    n_g = jnp.broadcast_to(jnp.minimum(c0, geo.sel.sink_tokens)[:, None],
                           (geo.batch, geo.kv_heads, c0.shape[1]))
    slots = jnp.arange(geo.num_gathered, dtype=jnp.int32)
    glist = jnp.where(slots < n_g[..., None], slots, 0)  # unused slots 0, as select_from_picks
    return glist, n_g.astype(jnp.int32)


def reattention_with_selection(q, k, v, *, sel: Selection = Selection(), q_start=None,
                               rope_theta: float = 10000.0, inv_freq=None,
                               softmax_scale: float | None = None, config: Config | None = None,
                               interpret: bool | None = None, q_lengths=None,
                               block_summaries=None):
    """(out, gathered lists (B, Hkv, NC, NG), lengths (B, Hkv, NC)), like the reference's.

    Chunks whose middle is empty (a prefill's first sink + w + align tokens) are causal
    attention: with ``Config.full_prefix`` they run as such (cuDNN on a GPU), the others through
    the scoring, selection and gathered-attention kernels."""
    reference.check_args(q, k, v)
    check_head_dim(q.shape[3])
    geo = geometry(q.shape, k.shape, sel)
    if block_summaries is not None:
        key_blocks.check_summaries(block_summaries, k.shape, k.dtype, sel)
    config = config or default_config(geo.head_dim, jnp.dtype(q.dtype).itemsize, geo.rows)
    interpret = resolve_interpret(interpret)
    prefix_mode, rotated = _resolve_modes(config, geo, q.dtype, interpret)
    mgpu_attend = _uses_mgpu_attend(q, geo, config, rotated, interpret)
    n_free = full_prefix_chunks(geo, q_start, prefix_mode)
    b, hkv, nc, t = geo.batch, geo.kv_heads, geo.num_chunks, geo.num_queries
    inv_freq = reference.resolve_inv_freq(geo.head_dim, rope_theta, inv_freq)
    scale = reference.softmax_scale_or_default(geo.head_dim, softmax_scale)
    q0 = reference.query_starts(q_start, b, geo.num_keys, t)
    c0, c1, l0 = reference.chunk_bounds(q0, geo)
    # The chunks run as full attention are neither scored nor selected: their lists are the
    # sink, as the selection from no picks would give.
    glist, n_g = _sink_lists(c0[:, :n_free], geo)
    if n_free < nc:
        vals, idx, (q_rows, *_) = _picks(q, k, sel=sel, q_start=q_start, config=config,
                                         interpret=interpret, q_lengths=q_lengths, skip=n_free,
                                         merge=False, block_summaries=block_summaries)
        n_sel = nc - n_free
        rep = lambda x: jnp.broadcast_to(x[:, None, n_free:], (b, hkv, n_sel)).reshape(-1)
        cands = lambda x: x.reshape(b * hkv * n_sel, *x.shape[3:])  # (N, C, R')
        blocks_of = geo.num_keys if sel.key_block > 1 else None
        picked, n_picked = _select(cands(idx), cands(vals), rep(c0), rep(l0), sel, interpret,
                                   geo.rows, blocks_of, config.block_select)
        picked = picked.reshape(b, hkv, n_sel, -1)  # NG or more slots (the kernel's width)
        wider = [(0, 0)] * 3 + [(0, picked.shape[3] - glist.shape[3])]
        glist = jnp.concatenate([jnp.pad(glist, wider), picked], axis=2)
        n_g = jnp.concatenate([n_g, n_picked.reshape(b, hkv, n_sel)], axis=2)
    window, ws = tail_window(k, q0, geo, inv_freq) if rotated else (None, jnp.zeros((b,),
                                                                                  jnp.int32))
    p = min(t, n_free * geo.chunk)
    prefix = rest_out = tokens = None
    if n_free:  # the call starts at 0: query i and key i sit at position i
        at_own = lambda x: rotate_at(x[:, :p], jnp.arange(p, dtype=jnp.int32)[None, :],
                                     inv_freq)
        keys, values = (window[:, :p] if rotated else at_own(k)), v[:, :p]  # window from key 0
        if (prefix_mode == "cudnn" and config.prefix_keys == "whole" and rotated
                and window.shape[1] == geo.num_keys == t):  # causal: keys past p are masked;
            keys, values = window, v  # S = T: all of them written (a block past p is read)
        with jax.default_matmul_precision("highest" if q.dtype == jnp.float32 else None):
            prefix = jax.nn.dot_product_attention(at_own(q), keys, values, scale=scale,
                                                  is_causal=True, implementation=prefix_mode)
    if n_free < nc:
        rest = slice(n_free, nc)
        per_chunk = lambda x: jnp.broadcast_to(x[:, None], (b, hkv, nc))
        meta = _meta(*(per_chunk(x) for x in (c0, c1, l0)), n_g,
                     jnp.broadcast_to(ws[:, None, None], (b, hkv, nc)))
        geo_rest = dataclasses.replace(geo, num_queries=t - p)  # p is a multiple of C
        # The attention's rows, padded for its own tiles only (q_rows may hold more: the
        # Mosaic GPU scoring pads a decode step's G rows to 64 x consumers).
        r_att = round_up(geo.rows, pallas_mgpu_attend.TILE if mgpu_attend else
                         config.attn_block_q)
        extra = None
        if rotated:  # the rows past the prefix, rotated at their own positions
            at_own = q0[:, None] + jnp.arange(p, t, dtype=jnp.int32)[None, :]
            qo = rotate_at(q[:, p:], at_own, inv_freq)
            if mgpu_attend and _rows_in_place(geo, config):
                tokens, qo = _tokens(qo, geo, p, r_att, interpret)
            else:  # packed like q_rows
                qo = pad_to(reference.pack_rows(qo, geo_rest), 3, r_att)
            extra = (qo, window)
        if mgpu_attend:
            rest_out = _attend_mgpu(extra[0], k, v, glist[:, :, rest, :geo.num_gathered],
                                    meta[:, :, rest], window, inv_freq, scale, geo, config,
                                    interpret, tokens)
        else:
            if q_rows is None:  # the scoring read q in place
                q_rows = _packed_rows(q, geo, p, r_att)
            rest_out = _attend(q_rows, k, v, glist[:, :, rest], meta[:, :, rest], inv_freq,
                               scale, geo, config, interpret, extra, r_att)
        if tokens is None:
            rest_out = reference.unpack_rows(rest_out, geo_rest)
    if tokens is not None:  # every query past the prefix written in place; the prefix copied in
        out = rest_out[:, :t]
        if prefix is not None:  # (not fused with cuDNN's call: XLA's dynamic-slice fusion
            # of a custom call into an update fails when the target is another custom call's)
            out, prefix = lax.optimization_barrier((out, prefix.astype(out.dtype)))
            out = lax.dynamic_update_slice_in_dim(out, prefix, 0, axis=1)
    else:
        outs = [x for x in (prefix, rest_out) if x is not None]
        out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
    return out, glist[..., :geo.num_gathered], n_g


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
    config: Config | None = None,
    interpret: bool | None = None,
    q_lengths=None,
    block_summaries=None,
) -> Float[Array, "B T Hq D"]:
    """ReAttention (same function as ``reference.reattention``) with Pallas kernels.

    Forward only. The head dim must be a power of two >= 32. ``interpret=None`` runs the
    Triton-lowered kernels on GPU and the Pallas interpreter elsewhere."""
    sel = Selection(sink_tokens, local_window, top_k, max_selected, span, chunk_size, middle_align,
                    key_block)
    return reattention_with_selection(q, k, v, sel=sel, q_start=q_start, rope_theta=rope_theta,
                                      inv_freq=inv_freq, softmax_scale=softmax_scale,
                                      config=config, interpret=interpret, q_lengths=q_lengths,
                                      block_summaries=block_summaries)[0]


def reattention_decode(q: Float[Array, "B Hq D"], k_cache, v_cache, lengths, **kwargs):
    """One decode step (see ``reference.reattention_decode``) with the Pallas kernels."""
    kwargs = {**kwargs, "chunk_size": 1}
    out = reattention(q[:, None], k_cache, v_cache, q_start=jnp.asarray(lengths) - 1, **kwargs)
    return out[:, 0]
