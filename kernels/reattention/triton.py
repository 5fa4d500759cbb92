"""ReAttention as plain Triton kernels for PyTorch tensors: the twin of ``pallas.py``.

Same stages, tiles, loop ranges and masks as the Pallas kernels (README.md in this folder):

* ``_score_kernel``: one program per (row tile of a chunk x key split, batch, kv head); raw
  q . k over the middle keys [sink, L0) of its split; a running per-row top-k set (rows, KP)
  merged tile by tile (``_merge_tile``: rounds while some row's best remaining score beats its
  set's minimum; ties to the lower position).
* selection in torch (``reference_torch.select_from_picks``): splits merged, votes, spans,
  gathered list.
* ``_attend_kernel``: one program per (row tile, batch, kv head); online softmax (base 2) over
  the gathered list (keys loaded by index) then the tail [L0, c1) (causal on the last tiles),
  RoPE applied in the kernel from cos/sin tables at the re-numbered positions.

The KV cache is read in place through clamped index vectors. Forward only. On a GPU the kernels
are compiled; on CPU they run through the Triton interpreter, which Triton decides when this
module is imported: ``TRITON_INTERPRET=1`` must be set before the import (the interpreter fixes
of ``kernels/cca/triton_interpret.py`` are applied then).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from kernels.reattention import reference_torch
from kernels.reattention.params import (Config, Geometry, Selection, attend_splits, cdiv,
                                        default_config, geometry, next_power_of_2, round_up,
                                        score_splits)
from kernels.triton_common import INTERPRET
from kernels.triton_common import dot as _dot
from kernels.triton_common import dot_mode as _dot_mode
from kernels.triton_common import output as _output
from kernels.triton_common import poison_outputs  # noqa: F401  (public here too)


LOG2E = 1.4426950408889634
NEG: tl.constexpr = tl.constexpr(-0.7 * 3.4028234663852886e38)  # finite "minus infinity"
POS: tl.constexpr = tl.constexpr(0.7 * 3.4028234663852886e38)  # padding columns of a top-k set
INT_MAX: tl.constexpr = tl.constexpr(reference_torch.INT_MAX)


# ----------------------------------------------------------------------------- 1. scoring
@triton.jit
def _merge_tile(s, cols, vals, idxs, TOP_K: tl.constexpr, KP: tl.constexpr):
    """Merge a score tile (BQ, BK) into the running top-k sets (BQ, KP); see pallas.py."""
    kcols = tl.arange(0, KP)
    m = tl.max(s, 1)
    thr = tl.min(vals, 1)
    it = tl.full((), 0, tl.int32)
    go = tl.max((m > thr).to(tl.int32), 0) > 0
    while go:
        j = tl.min(tl.where(s == m[:, None], cols[None, :], INT_MAX), 1)
        is_min = vals == thr[:, None]
        evict = tl.max(tl.where(is_min, idxs, -2), 1)
        col = tl.min(tl.where(is_min & (idxs == evict[:, None]), kcols[None, :], KP), 1)
        replace = (m > thr)[:, None] & (kcols[None, :] == col[:, None])
        vals = tl.where(replace, m[:, None], vals)
        idxs = tl.where(replace, j[:, None], idxs)
        s = tl.where(cols[None, :] == j[:, None], NEG, s)
        m = tl.max(s, 1)
        thr = tl.min(vals, 1)
        it += 1
        go = (it < TOP_K) & (tl.max((m > thr).to(tl.int32), 0) > 0)
    return vals, idxs


@triton.jit
def _score_kernel(META, Q, K, VALS, IDX,
                  sm_b, sm_c, sq_b, sq_h, sq_c, sq_r, sk_b, sk_t, sk_h,
                  so_b, so_h, so_c, so_s, so_r,
                  s_len, num_chunks, tiles, splits, split_len,
                  SINK: tl.constexpr, TOP_K: tl.constexpr, KP: tl.constexpr, BQ: tl.constexpr,
                  BK: tl.constexpr, D: tl.constexpr, DOT: tl.constexpr):
    pid = tl.program_id(0)
    bi = tl.program_id(1).to(tl.int64)
    hk = tl.program_id(2).to(tl.int64)  # 64-bit offsets: a 1M-token prefill has > 2**31 q elements
    chunk = (num_chunks - 1 - pid // (tiles * splits)).to(tl.int64)  # heavy (late chunks) first
    rest = pid % (tiles * splits)
    tile = rest // splits
    split = rest % splits
    l0 = tl.load(META + bi * sm_b + chunk * sm_c + 2)
    lo = SINK + split * split_len
    hi = tl.minimum(l0, lo + split_len)
    rows = tile * BQ + tl.arange(0, BQ)
    dims = tl.arange(0, D)
    q = tl.load(Q + bi * sq_b + hk * sq_h + chunk * sq_c + rows[:, None] * sq_r + dims[None, :])
    kcols = tl.arange(0, KP)
    vals = tl.where(kcols[None, :] < TOP_K, tl.full((BQ, KP), NEG, tl.float32), POS)
    idxs = tl.full((BQ, KP), -1, tl.int32)
    k_base = K + bi * sk_b + hk * sk_h
    for kb in range(0, tl.cdiv(tl.maximum(hi - lo, 0), BK)):
        cols = lo + kb * BK + tl.arange(0, BK)
        at = tl.minimum(cols, s_len - 1).to(tl.int64)
        keys = tl.load(k_base + at[:, None] * sk_t + dims[None, :])
        s = tl.where(cols[None, :] < hi, _dot(q, tl.trans(keys), DOT), NEG)
        vals, idxs = _merge_tile(s, cols, vals, idxs, TOP_K, KP)
    out = bi * so_b + hk * so_h + chunk * so_c + split * so_s + rows[:, None] * so_r
    tl.store(VALS + out + kcols[None, :], vals)
    tl.store(IDX + out + kcols[None, :], idxs)


# ----------------------------------------------------------------------------- 3. attention
@triton.jit
def _attend_tile(acc, m, l, qr1, qr2, k_base, v_base, krows, p0, COS, SIN, stride_t, mask,
                 scale2, MASKED: tl.constexpr, BK: tl.constexpr, D: tl.constexpr,
                 HALF: tl.constexpr, DOT: tl.constexpr):
    """One key tile: cache rows ``krows`` at positions p0 .. p0 + BK - 1, RoPE, online softmax."""
    hd = tl.arange(0, HALF)
    dims = tl.arange(0, D)
    rows = krows.to(tl.int64)[:, None] * stride_t
    k1 = tl.load(k_base + rows + hd[None, :]).to(tl.float32)
    k2 = tl.load(k_base + rows + HALF + hd[None, :]).to(tl.float32)
    pos = (p0 + tl.arange(0, BK))[:, None] * HALF + hd[None, :]
    cos = tl.load(COS + pos)
    sin = tl.load(SIN + pos)
    kr1 = (k1 * cos - k2 * sin).to(qr1.dtype)
    kr2 = (k2 * cos + k1 * sin).to(qr1.dtype)
    values = tl.load(v_base + rows + dims[None, :])
    s = _dot(qr1, tl.trans(kr1), DOT) + _dot(qr2, tl.trans(kr2), DOT)
    if MASKED:
        s = tl.where(mask, s, NEG)
    m_new = tl.maximum(m, tl.max(s, 1) * scale2)
    p = tl.math.exp2(s * scale2 - m_new[:, None])
    if MASKED:
        p = tl.where(mask, p, 0.0)
    alpha = tl.math.exp2(m - m_new)
    acc = acc * alpha[:, None] + _dot(p.to(values.dtype), values, DOT)
    return acc, m_new, l * alpha + tl.sum(p, 1)


@triton.jit
def _attend_kernel(META, Q, K, V, GLIST, COS, SIN, O, LSE,
                   sm_b, sm_h, sm_c, sq_b, sq_h, sq_c, sq_r, sk_b, sk_t, sk_h, sg_b, sg_h, sg_c,
                   so_b, so_h, so_c, so_p, so_r, sl_b, sl_h, sl_c, sl_p,
                   s_len, n_pos, tiles, splits, groups, scale2,
                   BQ: tl.constexpr, BK: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
                   DOT: tl.constexpr, PARTIAL: tl.constexpr):
    """Program (chunk, row tile, split): the row tile's key tiles, the list's then the tail's,
    form one sequence cut into ``splits`` equal runs. PARTIAL: write this run's normalised
    output (float32, 0 where it saw no key) and base-2 log-sum-exp (NEG there) to O / LSE at
    split index p; otherwise the output itself (one split)."""
    pid = tl.program_id(0)
    bi = tl.program_id(1).to(tl.int64)
    hk = tl.program_id(2).to(tl.int64)
    chunk = (pid // (tiles * splits)).to(tl.int64)
    r0 = ((pid // splits) % tiles) * BQ
    part = pid % splits
    meta = META + bi * sm_b + hk * sm_h + chunk * sm_c
    c0 = tl.load(meta)
    c1 = tl.load(meta + 1)
    l0 = tl.load(meta + 2)
    n_g = tl.load(meta + 3)
    r = r0 + tl.arange(0, BQ)
    t = c0 + r // groups  # query position of each row
    q_pos = tl.minimum(n_g + t - l0, n_pos - 1)
    hd = tl.arange(0, HALF)
    q_base = Q + bi * sq_b + hk * sq_h + chunk * sq_c + r[:, None] * sq_r
    q1 = tl.load(q_base + hd[None, :]).to(tl.float32)
    q2 = tl.load(q_base + HALF + hd[None, :]).to(tl.float32)
    cq = tl.load(COS + q_pos[:, None] * HALF + hd[None, :])
    sq = tl.load(SIN + q_pos[:, None] * HALF + hd[None, :])
    qr1 = (q1 * cq - q2 * sq).to(Q.dtype.element_ty)
    qr2 = (q2 * cq + q1 * sq).to(Q.dtype.element_ty)
    acc = tl.zeros((BQ, D), tl.float32)
    m = tl.full((BQ,), NEG, tl.float32)
    l = tl.zeros((BQ,), tl.float32)
    k_base = K + bi * sk_b + hk * sk_h
    v_base = V + bi * sk_b + hk * sk_h
    g_base = GLIST + bi * sg_b + hk * sg_h + chunk * sg_c

    # This program's run [first, last) of the sequence: n_list list tiles, then n_tail tail
    # tiles, of which the first ``unmasked`` precede every row's query.
    t_min = c0 + r0 // groups
    n_tail = tl.cdiv(c1 - l0, BK)
    unmasked = tl.minimum((t_min - l0 + 1) // BK, n_tail)
    n_list = tl.cdiv(n_g, BK)
    per = tl.cdiv(n_list + n_tail, splits)
    first = part * per
    last = first + per

    # The gathered list: slot i sits at position i.
    for kb in range(tl.minimum(first, n_list), tl.minimum(last, n_list)):
        slots = kb * BK + tl.arange(0, BK)
        krows = tl.load(g_base + slots)
        acc, m, l = _attend_tile(acc, m, l, qr1, qr2, k_base, v_base, krows, kb * BK, COS, SIN,
                                 sk_t, (slots < n_g)[None, :], scale2, True, BK, D, HALF, DOT)

    # The tail: key j in [L0, c1) sits at position n_g + j - L0; row t sees j <= t.
    lo_t = first - n_list
    hi_t = last - n_list
    for tb in range(tl.maximum(lo_t, 0), tl.minimum(hi_t, unmasked)):
        j = l0 + tb * BK + tl.arange(0, BK)
        acc, m, l = _attend_tile(acc, m, l, qr1, qr2, k_base, v_base, tl.minimum(j, s_len - 1),
                                 n_g + tb * BK, COS, SIN, sk_t, j[None, :], scale2, False, BK, D,
                                 HALF, DOT)
    for tb in range(tl.maximum(lo_t, unmasked), tl.minimum(hi_t, n_tail)):
        j = l0 + tb * BK + tl.arange(0, BK)
        acc, m, l = _attend_tile(acc, m, l, qr1, qr2, k_base, v_base, tl.minimum(j, s_len - 1),
                                 n_g + tb * BK, COS, SIN, sk_t, j[None, :] <= t[:, None], scale2,
                                 True, BK, D, HALF, DOT)
    o_base = (O + bi * so_b + hk * so_h + chunk * so_c + part.to(tl.int64) * so_p
              + r[:, None] * so_r)
    if PARTIAL:
        seen = l > 0
        safe = tl.where(seen, l, 1.0)
        tl.store(o_base + tl.arange(0, D)[None, :], tl.where(seen[:, None], acc / safe[:, None],
                                                             0.0))
        lse = LSE + bi * sl_b + hk * sl_h + chunk * sl_c + part.to(tl.int64) * sl_p + r
        tl.store(lse, tl.where(seen, m + tl.math.log2(safe), NEG))
    else:
        tl.store(o_base + tl.arange(0, D)[None, :], (acc / l[:, None]).to(O.dtype.element_ty))


# ----------------------------------------------------------------------------- launchers
def _meta(*fields) -> torch.Tensor:
    m = torch.stack(fields, dim=-1).to(torch.int32)
    return torch.nn.functional.pad(m, (0, 8 - m.shape[-1])).contiguous()


def _pad_dim(x: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    extra = round_up(x.shape[dim], multiple) - x.shape[dim]
    if extra == 0:
        return x.contiguous()
    widths = [0, 0] * (x.ndim - 1 - dim) + [0, extra]
    return torch.nn.functional.pad(x, widths).contiguous()


def score(q_rows, k, meta, geo: Geometry, config: Config):
    """Per-row picks (vals, idx), (B, Hkv, NC, R_pad, K): unordered, idx -1 where none."""
    b, hkv, nc, r_pad, d = q_rows.shape
    s_len = k.shape[1]
    sel = geo.sel
    bq, bk = config.score_block_q, config.score_block_k
    tiles = r_pad // bq
    splits = score_splits(config, geo, nc * tiles)
    split_len = round_up(max(s_len - sel.sink_tokens, 1), splits * bk) // splits
    kp = max(2, next_power_of_2(sel.top_k))
    vals = _output((b, hkv, nc, splits, r_pad, kp), torch.float32, q_rows.device)
    idx = _output(vals.shape, torch.int32, q_rows.device)
    _score_kernel[(nc * tiles * splits, b, hkv)](
        meta, q_rows, k, vals, idx, *meta.stride()[:2], *q_rows.stride()[:4], *k.stride()[:3],
        *vals.stride()[:5], s_len, nc, tiles, splits, split_len,
        SINK=sel.sink_tokens, TOP_K=sel.top_k, KP=kp, BQ=bq, BK=bk, D=d, DOT=_dot_mode(q_rows),
        num_warps=config.score_warps, num_stages=config.score_stages)
    vals = vals[..., : sel.top_k].permute(0, 1, 2, 4, 3, 5).reshape(b, hkv, nc, r_pad, -1)
    idx = idx[..., : sel.top_k].permute(0, 1, 2, 4, 3, 5).reshape(b, hkv, nc, r_pad, -1).long()
    if splits > 1:  # best top_k of the splits' candidates, ties to the lower position
        ok = idx >= 0
        key_v = torch.where(ok, -vals, float("inf"))
        key_i = torch.where(ok, idx, reference_torch.INT_MAX)
        key_v, key_i = reference_torch._sort_by([key_v, key_i])
        vals, idx = -key_v[..., : sel.top_k], key_i[..., : sel.top_k]
        idx = torch.where(idx == reference_torch.INT_MAX, -1, idx)
    return vals, idx


def rope_tables(n_pos: int, inv_freq, device):
    """cos, sin (n_pos, D/2) float32 of positions 0 .. n_pos - 1."""
    inv = torch.as_tensor(inv_freq, dtype=torch.float32, device=device)
    angles = torch.arange(n_pos, device=device).float()[:, None] * inv[None, :]
    return angles.cos().contiguous(), angles.sin().contiguous()


def attend(q_rows, k, v, glist, meta, inv_freq, scale: float, geo: Geometry, config: Config):
    b, hkv, nc, r_pad, d = q_rows.shape
    bq, bk = config.attn_block_q, config.attn_block_k
    tiles = r_pad // bq
    glist = _pad_dim(glist.to(torch.int32), 3, bk)
    n_pos = glist.shape[3] + round_up(geo.tail, bk)
    cos, sin = rope_tables(n_pos, inv_freq, q_rows.device)
    splits = attend_splits(config, geo, nc * tiles * b * hkv, cdiv(n_pos, bk))
    if splits == 1:
        o = _output(q_rows.shape, q_rows.dtype, q_rows.device)
        lse, o_strides, lse_strides = o, (*o.stride()[:3], 0, o.stride()[3]), (0, 0, 0, 0)
    else:  # partial outputs and log-sum-exps of the splits, merged below
        o = _output((b, hkv, nc, splits, r_pad, d), torch.float32, q_rows.device)
        lse = _output((b, hkv, nc, splits, r_pad), torch.float32, q_rows.device)
        o_strides, lse_strides = o.stride()[:5], lse.stride()[:4]
    _attend_kernel[(nc * tiles * splits, b, hkv)](
        meta, q_rows, k, v, glist, cos, sin, o, lse, *meta.stride()[:3], *q_rows.stride()[:4],
        *k.stride()[:3], *glist.stride()[:3], *o_strides, *lse_strides, k.shape[1], n_pos,
        tiles, splits, geo.groups, scale * LOG2E, BQ=bq, BK=bk, D=d, HALF=d // 2,
        DOT=_dot_mode(q_rows), PARTIAL=splits > 1, num_warps=config.attn_warps,
        num_stages=config.attn_stages)
    if splits == 1:
        return o
    weights = torch.exp2(lse - lse.amax(dim=3, keepdim=True))
    merged = (weights[..., None] * o).sum(dim=3) / weights.sum(dim=3)[..., None]
    return merged.to(q_rows.dtype)


# ----------------------------------------------------------------------------- public
def check_runnable(x: torch.Tensor) -> None:
    """Raises RuntimeError unless the kernels can run on ``x``'s device."""
    if x.is_cuda or (INTERPRET and x.device.type == "cpu"):
        return
    if x.device.type == "cpu":
        raise RuntimeError(
            "the Triton ReAttention kernels need CUDA tensors; on CPU they run only through the "
            "Triton interpreter, which must be switched on with TRITON_INTERPRET=1 before "
            "kernels.reattention.triton is imported (or use implementation='torch')")
    raise RuntimeError(f"the Triton ReAttention kernels cannot run on device {x.device}")


def check_head_dim(d: int) -> None:
    if d < 32 or d & (d - 1):
        raise ValueError(f"the Triton ReAttention kernels need a power-of-two head dim >= 32 "
                         f"(two rotary halves of >= 16 for the matmuls); got {d}")


def picks(q, k, *, sel: Selection, q_start=None, config: Config | None = None, q_lengths=None):
    """The scoring kernel's per-row picks (vals, idx) (B, Hkv, NC, R, K), unordered (idx -1:
    none; rows of queries past the end or past ``q_lengths``: -1), in the row order of
    ``reference_torch.pack_rows``."""
    return _picks(q, k, sel=sel, q_start=q_start, config=config, q_lengths=q_lengths)[:2]


def _picks(q, k, *, sel: Selection, q_start, config: Config | None, q_lengths=None):
    geo = geometry(tuple(q.shape), tuple(k.shape), sel)
    config = config or default_config(geo.head_dim, q.element_size(), geo.rows)
    q0 = reference_torch.query_starts(q_start, geo.batch, geo.num_keys, geo.num_queries,
                                      q.device)
    c0, c1, l0 = reference_torch.chunk_bounds(q0, geo)
    tile = max(config.score_block_q, config.attn_block_q)
    q_rows = _pad_dim(reference_torch.pack_rows(q, geo), 3, tile)
    if sel.key_block > 1:  # the same kernel scores [q+, q-] against the blocks' [max, min]
        q_s, k_s, end = reference_torch.block_scoring_inputs(q, k, l0, sel)
        geo_s = dataclasses.replace(geo, num_keys=k_s.shape[1], head_dim=q_s.shape[3])
        s_rows = _pad_dim(reference_torch.pack_rows(q_s, geo_s), 3, tile)
        vals, idx = score(s_rows, k_s.contiguous(), _meta(c0, c1, end), geo_s, config)
        idx = reference_torch.block_centres(idx, sel)
    else:
        vals, idx = score(q_rows, k.contiguous(), _meta(c0, c1, l0), geo, config)
    vals, idx = vals[:, :, :, : geo.rows], idx[:, :, :, : geo.rows]
    vote_end = reference_torch.voting_ends(c1, q0, q_lengths)  # the kernels still get c1
    live = reference_torch.row_positions(c0, geo.rows, geo.groups) < vote_end[..., None]
    return vals, torch.where(live[:, None, :, :, None], idx, -1), (q_rows, c0, c1, l0, geo)


def reattention_with_selection(q, k, v, *, sel: Selection = Selection(), q_start=None,
                               rope_theta: float = 10000.0, inv_freq=None,
                               softmax_scale: float | None = None, config: Config | None = None,
                               q_lengths=None):
    """(out, gathered lists (B, Hkv, NC, NG), lengths (B, Hkv, NC)), like the reference's."""
    reference_torch.check_args(q, k, v)
    check_runnable(q)
    check_head_dim(q.shape[3])
    config = config or default_config(q.shape[3], q.element_size(),
                                      geometry(tuple(q.shape), tuple(k.shape), sel).rows)
    k, v = k.contiguous(), v.contiguous()
    vals, idx, (q_rows, c0, c1, l0, geo) = _picks(q, k, sel=sel, q_start=q_start, config=config,
                                                 q_lengths=q_lengths)
    b, hkv, nc = geo.batch, geo.kv_heads, geo.num_chunks
    rep = lambda x: x[:, None].expand(b, hkv, nc).reshape(-1)
    glist, n_g = reference_torch.select_from_picks(idx.reshape(b * hkv * nc, -1),
                                                   vals.reshape(b * hkv * nc, -1), rep(c0),
                                                   rep(l0), sel)
    glist, n_g = glist.reshape(b, hkv, nc, -1), n_g.reshape(b, hkv, nc)
    meta = _meta(*(x[:, None].expand(b, hkv, nc) for x in (c0, c1, l0)), n_g)
    inv_freq = reference_torch.resolve_inv_freq(geo.head_dim, rope_theta, inv_freq)
    scale = reference_torch.softmax_scale_or_default(geo.head_dim, softmax_scale)
    o = attend(q_rows, k, v, glist, meta, inv_freq, scale, geo, config)
    return reference_torch.unpack_rows(o, geo), glist, n_g


def reattention(q, k, v, *, sink_tokens: int = 32, local_window: int = 8192, top_k: int = 4,
                max_selected: int = 256, span: int = 32, chunk_size: int = 512,
                middle_align: int = 128, key_block: int = 1, q_start=None,
                rope_theta: float = 10000.0, inv_freq=None, softmax_scale: float | None = None,
                config: Config | None = None, q_lengths=None) -> torch.Tensor:
    """ReAttention with Triton kernels: the same function as ``reference_torch.reattention``.
    Forward only; the head dim must be a power of two >= 32; float32, bfloat16, float16."""
    sel = Selection(sink_tokens, local_window, top_k, max_selected, span, chunk_size, middle_align,
                    key_block)
    return reattention_with_selection(q, k, v, sel=sel, q_start=q_start, rope_theta=rope_theta,
                                      inv_freq=inv_freq, softmax_scale=softmax_scale,
                                      config=config, q_lengths=q_lengths)[0]


def reattention_decode(q, k_cache, v_cache, lengths, **kwargs) -> torch.Tensor:
    """One decode step (see ``reference_torch.reattention_decode``) with the Triton kernels."""
    kwargs = {**kwargs, "chunk_size": 1}
    q_start = torch.as_tensor(lengths, device=q.device) - 1
    return reattention(q[:, None], k_cache, v_cache, q_start=q_start, **kwargs)[:, 0]
