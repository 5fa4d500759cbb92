"""CCA attention as plain Triton kernels for PyTorch tensors: the twin of the Pallas kernels.

Same tiling, loop ranges and masks as ``pallas.py`` (forward), ``pallas_vjp.py`` (backward) and
``pallas_pool.py`` (pooling), written directly in ``triton.language``:

* ``_forward_kernel``: one program per (query tile, batch, query head), query tiles heavy-first;
  one online softmax (base 2) over the visible core tiles, then the local-window tiles. Tiles
  every query of the program sees fully skip the mask; only edge tiles pay for it. Writes o and
  the base-2 log-sum-exp.
* ``_dq_kernel``: the same walk, accumulating dQ; it also computes delta = rowsum(dO * O) of its
  rows and writes it out for the dK/dV kernels.
* ``_dkdv_local_kernel`` / ``_dkdv_core_kernel``: one program per (key tile, batch, kv head),
  looping in-kernel over the G query heads sharing the kv head and over the query tiles that see
  the keys; dK, dV written once (no atomics).
* ``_pool_kernel`` / ``_pool_backward_kernel``: core key/value of ``BN`` groups per program
  (pooling query = mean of the G sharing heads' last-token queries, computed in-kernel; float32
  element-wise math: the pass is bandwidth-bound), and the gradient through the pooling weights,
  added in place to the attention backward's dQ, dK, dV (as ``pallas_pool.py`` does).

Window arithmetic is exact: ``start(t) = max(t - w + 1, 0) // g * g`` only divides non-negative
numbers, so Triton's truncating ``//`` equals the floor. Inputs are padded to tile multiples (and
the head dim to a power of two >= 16) by the wrapper. float32 runs IEEE dots (no TF32).

On a GPU the kernels are compiled; on CPU they run through the Triton interpreter, which Triton
decides when this module is imported: ``TRITON_INTERPRET=1`` must be set before the import (the
interpreter fixes this needs are in ``triton_interpret.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.cca import reference_torch
from kernels.cca.tiles import Config, default_config  # noqa: F401  (Config is public here too)
from kernels.triton_common import INTERPRET
from kernels.triton_common import dot as _dot
from kernels.triton_common import dot_mode as _dot_mode
from kernels.triton_common import output as _output
from kernels.triton_common import poison_outputs  # noqa: F401  (public here too)
from kernels.triton_common import poisoning


LOG2E = math.log2(math.e)
NEG: tl.constexpr = tl.constexpr(-0.7 * 3.4028234663852886e38)  # finite "minus infinity"
POOL_ROWS = 64  # keys per pooling program: BN groups of GP (g rounded up to a power of two)
POOL_BWD_ROWS = 32  # the same for the pooling backward (more live tiles)


# ------------------------------------------------------------------------------ shared helpers
@triton.jit
def _window_start(t, G: tl.constexpr, W: tl.constexpr):
    """max(0, floor((t - W + 1) / G) * G) dividing only non-negative numbers (exact)."""
    return tl.maximum(t - (W - 1), 0) // G * G


@triton.jit
def _cdiv(a, b: tl.constexpr):
    return (a + (b - 1)) // b


@triton.jit
def _visible(rows, starts, cols, G: tl.constexpr, CORE: tl.constexpr):
    """(queries, keys) mask. Core j visible iff j < start(t) // g; raw s iff start(t) <= s <= t."""
    if CORE:
        return cols[None, :] < (starts // G)[:, None]
    else:
        return (cols[None, :] >= starts[:, None]) & (cols[None, :] <= rows[:, None])


@triton.jit
def _visible_t(rows, starts, cols, G: tl.constexpr, CORE: tl.constexpr):
    """The same mask laid out (keys, queries), for the dK/dV kernels."""
    if CORE:
        return cols[:, None] < (starts // G)[None, :]
    else:
        return (cols[:, None] >= starts[None, :]) & (cols[:, None] <= rows[None, :])


# ------------------------------------------------------------------------------ forward
@triton.jit
def _forward_tiles(acc, m, l, q, k_base, v_base, stride_t, lo, hi, rows, starts, scale2,
                   G: tl.constexpr, BK: tl.constexpr, D: tl.constexpr, MASKED: tl.constexpr,
                   CORE: tl.constexpr, DOT: tl.constexpr):
    """Online softmax (base 2) over key tiles [lo, hi); MASKED False: every key visible."""
    offs = tl.arange(0, BK)
    dims = tl.arange(0, D)
    for kb in range(lo, hi):
        cols = kb * BK + offs
        ptrs = cols[:, None] * stride_t + dims[None, :]
        keys = tl.load(k_base + ptrs)
        values = tl.load(v_base + ptrs)
        s = _dot(q, tl.trans(keys), DOT) * scale2  # (BQ, BK), log2 units
        if MASKED:
            visible = _visible(rows, starts, cols, G, CORE)
            s = tl.where(visible, s, NEG)
            m_new = tl.maximum(m, tl.max(s, 1))
            p = tl.where(visible, tl.math.exp2(s - m_new[:, None]), 0.0)
        else:
            m_new = tl.maximum(m, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m - m_new)
        acc = acc * alpha[:, None] + _dot(p.to(values.dtype), values, DOT)
        l = l * alpha + tl.sum(p, 1)
        m = m_new
    return acc, m, l


@triton.jit
def _forward_kernel(Q, K, V, KC, VC, O, LSE,
                    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sc_b, sc_t, sc_h,
                    num_heads, heads_per_kv, t_pad, scale2,
                    G: tl.constexpr, W: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
                    D: tl.constexpr, DOT: tl.constexpr):
    tile = tl.num_programs(0) - 1 - tl.program_id(0)  # heavy first: later queries see more
    bi = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2)
    hk = h // heads_per_kv
    t0 = tile * BQ
    rows = t0 + tl.arange(0, BQ)
    dims = tl.arange(0, D)
    starts = _window_start(rows, G, W)
    first_start = _window_start(t0, G, W)
    last_start = _window_start(t0 + BQ - 1, G, W)

    q_ptrs = Q + bi * sq_b + h * sq_h + rows[:, None] * sq_t + dims[None, :]
    q = tl.load(q_ptrs)
    acc = tl.zeros((BQ, D), tl.float32)
    m = tl.full((BQ,), NEG, tl.float32)
    l = tl.zeros((BQ,), tl.float32)

    # Core tokens: query t sees core j iff j < start(t) // g.
    kc_base = KC + bi * sc_b + hk * sc_h
    vc_base = VC + bi * sc_b + hk * sc_h
    c_full = first_start // G // BK
    c_end = _cdiv(last_start // G, BK)
    acc, m, l = _forward_tiles(acc, m, l, q, kc_base, vc_base, sc_t, 0, c_full, rows, starts,
                               scale2, G, BK, D, False, True, DOT)
    acc, m, l = _forward_tiles(acc, m, l, q, kc_base, vc_base, sc_t, c_full, c_end, rows,
                               starts, scale2, G, BK, D, True, True, DOT)

    # Raw keys: query t sees key s iff start(t) <= s <= t.
    k_base = K + bi * sk_b + hk * sk_h
    v_base = V + bi * sk_b + hk * sk_h
    a0 = first_start // BK
    a1 = _cdiv(last_start, BK)  # tiles below a1 may hold keys left of some query's window
    d0 = tl.maximum(a1, (t0 + 1) // BK)  # tiles from d0 may hold keys right of some query
    end = _cdiv(t0 + BQ, BK)
    acc, m, l = _forward_tiles(acc, m, l, q, k_base, v_base, sk_t, a0, a1, rows, starts,
                               scale2, G, BK, D, True, False, DOT)
    acc, m, l = _forward_tiles(acc, m, l, q, k_base, v_base, sk_t, a1, d0, rows, starts,
                               scale2, G, BK, D, False, False, DOT)
    acc, m, l = _forward_tiles(acc, m, l, q, k_base, v_base, sk_t, d0, end, rows, starts,
                               scale2, G, BK, D, True, False, DOT)

    o_ptrs = O + bi * sq_b + h * sq_h + rows[:, None] * sq_t + dims[None, :]
    tl.store(o_ptrs, (acc / l[:, None]).to(O.dtype.element_ty))
    tl.store(LSE + (bi * num_heads + h) * t_pad + rows, m + tl.math.log2(l))


# ------------------------------------------------------------------------------ backward
@triton.jit
def _dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_t, lo, hi, rows, starts, scale2,
              G: tl.constexpr, BK: tl.constexpr, D: tl.constexpr, MASKED: tl.constexpr,
              CORE: tl.constexpr, DOT: tl.constexpr):
    offs = tl.arange(0, BK)
    dims = tl.arange(0, D)
    for kb in range(lo, hi):
        cols = kb * BK + offs
        ptrs = cols[:, None] * stride_t + dims[None, :]
        keys = tl.load(k_base + ptrs)
        values = tl.load(v_base + ptrs)
        p = tl.math.exp2(_dot(q, tl.trans(keys), DOT) * scale2 - lse[:, None])
        if MASKED:
            p = tl.where(_visible(rows, starts, cols, G, CORE), p, 0.0)
        ds = p * (_dot(do, tl.trans(values), DOT) - delta[:, None])
        dq += _dot(ds.to(keys.dtype), keys, DOT)
    return dq


@triton.jit
def _dq_kernel(Q, K, V, KC, VC, O, DO, LSE, DQ, DELTA,
               sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sc_b, sc_t, sc_h,
               num_heads, heads_per_kv, t_pad, scale, scale2,
               G: tl.constexpr, W: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
               D: tl.constexpr, DOT: tl.constexpr):
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    bi = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2)
    hk = h // heads_per_kv
    t0 = tile * BQ
    rows = t0 + tl.arange(0, BQ)
    dims = tl.arange(0, D)
    starts = _window_start(rows, G, W)
    first_start = _window_start(t0, G, W)
    last_start = _window_start(t0 + BQ - 1, G, W)

    q_offs = bi * sq_b + h * sq_h + rows[:, None] * sq_t + dims[None, :]
    q = tl.load(Q + q_offs)
    do = tl.load(DO + q_offs)
    row_offs = (bi * num_heads + h) * t_pad + rows
    lse = tl.load(LSE + row_offs)
    # delta = rowsum(dO * O) of the program's rows, written out for the dK/dV kernels.
    delta = tl.sum(tl.load(O + q_offs).to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + row_offs, delta)
    dq = tl.zeros((BQ, D), tl.float32)

    kc_base = KC + bi * sc_b + hk * sc_h
    vc_base = VC + bi * sc_b + hk * sc_h
    c_full = first_start // G // BK
    c_end = _cdiv(last_start // G, BK)
    dq = _dq_tiles(dq, q, do, lse, delta, kc_base, vc_base, sc_t, 0, c_full, rows, starts,
                   scale2, G, BK, D, False, True, DOT)
    dq = _dq_tiles(dq, q, do, lse, delta, kc_base, vc_base, sc_t, c_full, c_end, rows, starts,
                   scale2, G, BK, D, True, True, DOT)
    k_base = K + bi * sk_b + hk * sk_h
    v_base = V + bi * sk_b + hk * sk_h
    a1 = _cdiv(last_start, BK)
    d0 = tl.maximum(a1, (t0 + 1) // BK)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, sk_t, first_start // BK, a1, rows,
                   starts, scale2, G, BK, D, True, False, DOT)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, sk_t, a1, d0, rows, starts, scale2,
                   G, BK, D, False, False, DOT)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, sk_t, d0, _cdiv(t0 + BQ, BK), rows,
                   starts, scale2, G, BK, D, True, False, DOT)
    tl.store(DQ + q_offs, (dq * scale).to(DQ.dtype.element_ty))


@triton.jit
def _dkdv_tiles(dk, dv, keys, values, cols, q_base, do_base, row_base, stride_t, lo, hi,
                scale2, G: tl.constexpr, W: tl.constexpr, BQ: tl.constexpr, D: tl.constexpr,
                MASKED: tl.constexpr, CORE: tl.constexpr, DOT: tl.constexpr, LSE, DELTA):
    """Accumulate dK, dV (BK, D) of one key tile over the query tiles [lo, hi) of one head.
    Scores are computed transposed, (keys, queries), so no register transpose is needed."""
    offs = tl.arange(0, BQ)
    dims = tl.arange(0, D)
    for qb in range(lo, hi):
        rows = qb * BQ + offs
        ptrs = rows[:, None] * stride_t + dims[None, :]
        q = tl.load(q_base + ptrs)
        do = tl.load(do_base + ptrs)
        lse = tl.load(LSE + row_base + rows)
        delta = tl.load(DELTA + row_base + rows)
        p_t = tl.math.exp2(_dot(keys, tl.trans(q), DOT) * scale2 - lse[None, :])  # (BK, BQ)
        if MASKED:
            starts = _window_start(rows, G, W)
            p_t = tl.where(_visible_t(rows, starts, cols, G, CORE), p_t, 0.0)
        dv += _dot(p_t.to(do.dtype), do, DOT)
        ds_t = p_t * (_dot(values, tl.trans(do), DOT) - delta[None, :])
        dk += _dot(ds_t.to(q.dtype), q, DOT)
    return dk, dv


@triton.jit
def _dkdv_heads(K, V, DK, DV, Q, DO, LSE, DELTA, offs, cols, bi, hk, sq_b, sq_t, sq_h,
                num_heads, heads_per_kv, t_pad, scale, scale2, r0, r1, r2, r3,
                G: tl.constexpr, W: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
                D: tl.constexpr, CORE: tl.constexpr, DOT: tl.constexpr):
    """dK, dV of one key tile (rows ``offs``) over the G query heads of kv head ``hk``: query
    tiles [r0, r1) masked, [r1, r2) unmasked, [r2, r3) masked. Written once (no atomics)."""
    keys = tl.load(K + offs)
    values = tl.load(V + offs)
    dk = tl.zeros((BK, D), tl.float32)
    dv = tl.zeros((BK, D), tl.float32)
    for gi in range(0, heads_per_kv):
        h = hk * heads_per_kv + gi
        q_base = Q + bi * sq_b + h * sq_h
        do_base = DO + bi * sq_b + h * sq_h
        row_base = (bi * num_heads + h) * t_pad
        dk, dv = _dkdv_tiles(dk, dv, keys, values, cols, q_base, do_base, row_base, sq_t, r0,
                             r1, scale2, G, W, BQ, D, True, CORE, DOT, LSE, DELTA)
        dk, dv = _dkdv_tiles(dk, dv, keys, values, cols, q_base, do_base, row_base, sq_t, r1,
                             r2, scale2, G, W, BQ, D, False, CORE, DOT, LSE, DELTA)
        dk, dv = _dkdv_tiles(dk, dv, keys, values, cols, q_base, do_base, row_base, sq_t, r2,
                             r3, scale2, G, W, BQ, D, True, CORE, DOT, LSE, DELTA)
    tl.store(DK + offs, (dk * scale).to(DK.dtype.element_ty))
    tl.store(DV + offs, dv.to(DV.dtype.element_ty))


@triton.jit
def _dkdv_local_kernel(Q, DO, LSE, DELTA, K, V, DK, DV,
                       sq_b, sq_t, sq_h, sk_b, sk_t, sk_h,
                       num_heads, heads_per_kv, t_pad, scale, scale2,
                       G: tl.constexpr, W: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
                       D: tl.constexpr, DOT: tl.constexpr):
    k0 = tl.program_id(0) * BK
    bi = tl.program_id(1).to(tl.int64)
    hk = tl.program_id(2)
    cols = k0 + tl.arange(0, BK)
    offs = bi * sk_b + hk * sk_h + cols[:, None] * sk_t + tl.arange(0, D)[None, :]
    nq = t_pad // BQ
    q_lo = k0 // BQ
    t_hi = (k0 + BK - 1) // G * G + G + W - 2  # last query that sees the tile's last key
    q_hi = tl.minimum(nq, t_hi // BQ + 1)
    # Query tiles whose every query sees every key: t0 >= k0 + BK - 1, start(t0 + BQ - 1) <= k0.
    m0 = tl.minimum(tl.maximum(_cdiv(k0 + BK - 1, BQ), q_lo), q_hi)
    m1 = tl.minimum(tl.maximum((k0 // G * G + G + W - 1) // BQ, m0), q_hi)
    _dkdv_heads(K, V, DK, DV, Q, DO, LSE, DELTA, offs, cols, bi, hk, sq_b, sq_t, sq_h,
                num_heads, heads_per_kv, t_pad, scale, scale2, q_lo, m0, m1, q_hi,
                G, W, BQ, BK, D, False, DOT)


@triton.jit
def _dkdv_core_kernel(Q, DO, LSE, DELTA, KC, VC, DKC, DVC,
                      sq_b, sq_t, sq_h, sc_b, sc_t, sc_h,
                      num_heads, heads_per_kv, t_pad, scale, scale2,
                      G: tl.constexpr, W: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
                      D: tl.constexpr, DOT: tl.constexpr):
    j0 = tl.program_id(0) * BK
    bi = tl.program_id(1).to(tl.int64)
    hk = tl.program_id(2)
    js = j0 + tl.arange(0, BK)
    offs = bi * sc_b + hk * sc_h + js[:, None] * sc_t + tl.arange(0, D)[None, :]
    nq = t_pad // BQ
    # Core j is seen by every query t >= (j + 1) * g + w - 1; from m0 on by the whole tile.
    q_lo = tl.minimum(nq, ((j0 + 1) * G + W - 1) // BQ)
    m0 = tl.minimum(tl.maximum(_cdiv((j0 + BK) * G + W - 1, BQ), q_lo), nq)
    _dkdv_heads(KC, VC, DKC, DVC, Q, DO, LSE, DELTA, offs, js, bi, hk, sq_b, sq_t, sq_h,
                num_heads, heads_per_kv, t_pad, scale, scale2, q_lo, m0, nq, nq,
                G, W, BQ, BK, D, True, DOT)


# ------------------------------------------------------------------------------ pooling
@triton.jit
def _pool_weights(Q, K, bi, hk, js, sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, n_groups,
                  heads_per_kv, scale, G: tl.constexpr, GP: tl.constexpr, BN: tl.constexpr,
                  D: tl.constexpr):
    """For the groups ``js`` (BN,) of one kv head: the pooling queries qp (BN, D), the keys
    (BN, GP, D), the softmax weights p (BN, GP) (all float32), the key offsets and their mask."""
    offs = tl.arange(0, GP)  # position inside the group (GP = g rounded up to a power of two)
    dims = tl.arange(0, D)
    real = js < n_groups
    # Pooling query: mean over the sharing query heads of the group's last-token query.
    last = (js + 1) * G - 1
    qp = tl.full((BN, D), 0.0, tl.float32)
    for gi in range(0, heads_per_kv):
        ptrs = Q + bi * sq_b + (hk * heads_per_kv + gi) * sq_h + last[:, None] * sq_t
        qp += tl.load(ptrs + dims[None, :], mask=real[:, None], other=0.0).to(tl.float32)
    qp = qp / heads_per_kv
    tokens = js[:, None] * G + offs[None, :]  # (BN, GP)
    inside = real[:, None] & (offs[None, :] < G)
    kv_offs = bi * sk_b + hk * sk_h + tokens[:, :, None] * sk_t + dims[None, None, :]
    keys = tl.load(K + kv_offs, mask=inside[:, :, None], other=0.0).to(tl.float32)
    s = tl.where(inside, tl.sum(qp[:, None, :] * keys, 2) * scale, NEG)  # (BN, GP)
    p = tl.where(inside, tl.exp(s - tl.max(s, 1)[:, None]), 0.0)
    p = p / tl.where(real, tl.sum(p, 1), 1.0)[:, None]  # groups past the end: never stored
    return qp, keys, p, kv_offs, inside


@triton.jit
def _pool_kernel(Q, K, V, KC, VC,
                 sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sc_b, sc_t, sc_h,
                 n_groups, heads_per_kv, scale,
                 G: tl.constexpr, GP: tl.constexpr, BN: tl.constexpr, D: tl.constexpr):
    """kc = p K, vc = p V for BN consecutive groups of one (batch, kv head)."""
    bi = tl.program_id(1).to(tl.int64)
    hk = tl.program_id(2)
    js = tl.program_id(0) * BN + tl.arange(0, BN)
    qp, keys, p, kv_offs, inside = _pool_weights(
        Q, K, bi, hk, js, sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, n_groups, heads_per_kv, scale,
        G, GP, BN, D)
    real = js < n_groups
    c_offs = bi * sc_b + hk * sc_h + js[:, None] * sc_t + tl.arange(0, D)[None, :]
    tl.store(KC + c_offs, tl.sum(p[:, :, None] * keys, 1).to(KC.dtype.element_ty),
             mask=real[:, None])
    values = tl.load(V + kv_offs, mask=inside[:, :, None], other=0.0).to(tl.float32)
    tl.store(VC + c_offs, tl.sum(p[:, :, None] * values, 1).to(VC.dtype.element_ty),
             mask=real[:, None])


@triton.jit
def _pool_backward_kernel(Q, K, V, DKC, DVC, DQ, DK, DV,
                          sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sc_b, sc_t, sc_h,
                          n_groups, heads_per_kv, scale,
                          G: tl.constexpr, GP: tl.constexpr, BN: tl.constexpr, D: tl.constexpr):
    """Adds the pooling's share of the gradient in place to dQ, dK, dV (the attention backward's
    buffers; each program owns its groups' rows, so no atomics). With dP = dkc K^T + dvc V^T and
    dS = p * (dP - rowsum(p * dP)): dK += p^T dkc + scale dS^T qp, dV += p^T dvc, and every query
    head sharing the kv head gets scale dS K / G at the group's last token."""
    bi = tl.program_id(1).to(tl.int64)
    hk = tl.program_id(2)
    js = tl.program_id(0) * BN + tl.arange(0, BN)
    dims = tl.arange(0, D)
    qp, keys, p, kv_offs, inside = _pool_weights(
        Q, K, bi, hk, js, sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, n_groups, heads_per_kv, scale,
        G, GP, BN, D)
    real = js < n_groups
    c_offs = bi * sc_b + hk * sc_h + js[:, None] * sc_t + dims[None, :]
    dkc = tl.load(DKC + c_offs, mask=real[:, None], other=0.0).to(tl.float32)
    dvc = tl.load(DVC + c_offs, mask=real[:, None], other=0.0).to(tl.float32)
    values = tl.load(V + kv_offs, mask=inside[:, :, None], other=0.0).to(tl.float32)
    dp = tl.sum(dkc[:, None, :] * keys, 2) + tl.sum(dvc[:, None, :] * values, 2)  # (BN, GP)
    ds = p * (dp - tl.sum(p * dp, 1)[:, None])
    mask3 = inside[:, :, None]
    dk = tl.load(DK + kv_offs, mask=mask3, other=0.0).to(tl.float32)
    dk += p[:, :, None] * dkc[:, None, :] + scale * ds[:, :, None] * qp[:, None, :]
    tl.store(DK + kv_offs, dk.to(DK.dtype.element_ty), mask=mask3)
    dv = tl.load(DV + kv_offs, mask=mask3, other=0.0).to(tl.float32)
    tl.store(DV + kv_offs, (dv + p[:, :, None] * dvc[:, None, :]).to(DV.dtype.element_ty),
             mask=mask3)
    dq_pool = tl.sum(ds[:, :, None] * keys, 1) * (scale / heads_per_kv)  # (BN, D)
    last = (js + 1) * G - 1
    for gi in range(0, heads_per_kv):
        ptrs = DQ + bi * sq_b + (hk * heads_per_kv + gi) * sq_h + last[:, None] * sq_t
        ptrs += dims[None, :]
        dq = tl.load(ptrs, mask=real[:, None], other=0.0).to(tl.float32)
        tl.store(ptrs, (dq + dq_pool).to(DQ.dtype.element_ty), mask=real[:, None])


# ------------------------------------------------------------------------------ launchers
def _pool_grid(n: int, b: int, hkv: int, g: int, rows: int):
    gp = triton.next_power_of_2(g)
    bn = max(1, rows // gp)
    return (triton.cdiv(n, bn), b, hkv), dict(G=g, GP=gp, BN=bn)


def pool_forward(q, k, v, *, n: int, g: int, scale: float, n_pad: int):
    """Core tokens (kc, vc), (B, n_pad, Hkv, D) in the input dtype, of the first ``n`` groups
    (``n = T // g`` of the unpadded length); rows from ``n`` on are zero."""
    b, _, hq, d = q.shape
    hkv = k.shape[2]
    kc = torch.zeros((b, n_pad, hkv, d), dtype=k.dtype, device=k.device)
    vc = torch.zeros_like(kc)
    if poisoning():  # only the rows the kernel must write
        kc[:, :n] = float("nan")
        vc[:, :n] = float("nan")
    if n > 0:
        grid, blocks = _pool_grid(n, b, hkv, g, POOL_ROWS)
        _pool_kernel[grid](q, k, v, kc, vc, *q.stride()[:3], *k.stride()[:3], *kc.stride()[:3],
                           n, hq // hkv, scale, D=d, **blocks, num_warps=4, num_stages=1)
    return kc, vc


def pool_backward(q, k, v, dkc, dvc, dq, dk, dv, *, n: int, g: int, scale: float) -> None:
    """Adds the gradient through the pooling of the first ``n`` groups to dq, dk, dv in place."""
    b, _, hq, d = q.shape
    hkv = k.shape[2]
    if n > 0:
        grid, blocks = _pool_grid(n, b, hkv, g, POOL_BWD_ROWS)
        _pool_backward_kernel[grid](
            q, k, v, dkc, dvc, dq, dk, dv, *q.stride()[:3], *k.stride()[:3], *dkc.stride()[:3],
            n, hq // hkv, scale, D=d, **blocks, num_warps=4, num_stages=1)


def attention_forward(q, k, v, kc, vc, *, g: int, w: int, scale: float, config: Config):
    """Padded contiguous inputs (T_pad a multiple of every tile, N_pad of the key tiles)
    -> (o, lse2) with lse2 (B, Hq, T_pad) float32, the base-2 log-sum-exp of the scaled scores."""
    b, t_pad, hq, d = q.shape
    hkv = k.shape[2]
    o = _output(q.shape, q.dtype, q.device)
    lse = _output((b, hq, t_pad), torch.float32, q.device)
    _forward_kernel[(t_pad // config.block_q, b, hq)](
        q, k, v, kc, vc, o, lse, *q.stride()[:3], *k.stride()[:3], *kc.stride()[:3],
        hq, hq // hkv, t_pad, scale * LOG2E,
        G=g, W=w, BQ=config.block_q, BK=config.block_k, D=d, DOT=_dot_mode(q),
        num_warps=config.num_warps, num_stages=config.num_stages)
    return o, lse


def attention_backward(q, k, v, kc, vc, o, lse, do, *, g: int, w: int, scale: float,
                       config: Config):
    """(dq, dk, dv, dkc, dvc) for padded inputs of the fused attention."""
    b, t_pad, hq, d = q.shape
    hkv = k.shape[2]
    do = do.to(q.dtype).contiguous()
    delta = _output((b, hq, t_pad), torch.float32, q.device)
    bq, bk = config.bwd_block_q, config.bwd_block_k
    common = dict(G=g, W=w, BQ=bq, BK=bk, D=d, DOT=_dot_mode(q), num_warps=config.bwd_num_warps,
                  num_stages=config.bwd_num_stages)
    dq = _output(q.shape, q.dtype, q.device)
    _dq_kernel[(t_pad // bq, b, hq)](
        q, k, v, kc, vc, o, do, lse, dq, delta, *q.stride()[:3], *k.stride()[:3],
        *kc.stride()[:3],
        hq, hq // hkv, t_pad, scale, scale * LOG2E, **common)
    bq, bk, num_warps, num_stages = config.dkdv
    common = dict(G=g, W=w, BQ=bq, BK=bk, D=d, DOT=_dot_mode(q), num_warps=num_warps,
                  num_stages=num_stages)
    dk, dv = _output(k.shape, k.dtype, k.device), _output(v.shape, v.dtype, v.device)
    _dkdv_local_kernel[(t_pad // bk, b, hkv)](
        q, do, lse, delta, k, v, dk, dv, *q.stride()[:3], *k.stride()[:3],
        hq, hq // hkv, t_pad, scale, scale * LOG2E, **common)
    dkc, dvc = _output(kc.shape, kc.dtype, kc.device), _output(vc.shape, vc.dtype, vc.device)
    _dkdv_core_kernel[(kc.shape[1] // bk, b, hkv)](
        q, do, lse, delta, kc, vc, dkc, dvc, *q.stride()[:3], *kc.stride()[:3],
        hq, hq // hkv, t_pad, scale, scale * LOG2E, **common)
    return dq, dk, dv, dkc, dvc


# ------------------------------------------------------------------------------ autograd
class _CCA(torch.autograd.Function):
    """CCA with the Triton pooling ("cca") for padded inputs. The backward runs the attention
    backward kernels, then the pooling backward kernel adds its share into their dq, dk, dv."""

    @staticmethod
    def forward(ctx, q, k, v, n, n_pad, g, w, scale, config):
        kc, vc = pool_forward(q, k, v, n=n, g=g, scale=scale, n_pad=n_pad)
        o, lse = attention_forward(q, k, v, kc, vc, g=g, w=w, scale=scale, config=config)
        ctx.save_for_backward(q, k, v, kc, vc, o, lse)
        ctx.hparams = dict(g=g, w=w, scale=scale, config=config)
        ctx.n = n
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, kc, vc, o, lse = ctx.saved_tensors
        dq, dk, dv, dkc, dvc = attention_backward(q, k, v, kc, vc, o, lse, do, **ctx.hparams)
        pool_backward(q, k, v, dkc, dvc, dq, dk, dv, n=ctx.n, g=ctx.hparams["g"],
                      scale=ctx.hparams["scale"])
        return dq, dk, dv, None, None, None, None, None, None


class _FusedAttention(torch.autograd.Function):
    """Attention over given [core ; local] keys for padded inputs, differentiable in all five
    tensors: the "mean"/"max" poolings run in torch (autograd) before it."""

    @staticmethod
    def forward(ctx, q, k, v, kc, vc, g, w, scale, config):
        o, lse = attention_forward(q, k, v, kc, vc, g=g, w=w, scale=scale, config=config)
        ctx.save_for_backward(q, k, v, kc, vc, o, lse)
        ctx.hparams = dict(g=g, w=w, scale=scale, config=config)
        return o

    @staticmethod
    def backward(ctx, do):
        grads = attention_backward(*ctx.saved_tensors, do, **ctx.hparams)
        return (*grads, None, None, None, None)


# ------------------------------------------------------------------------------ public
def check_runnable(x: torch.Tensor) -> None:
    """Raises RuntimeError unless the kernels can run on ``x``'s device."""
    if x.is_cuda or (INTERPRET and x.device.type == "cpu"):
        return
    if x.device.type == "cpu":
        raise RuntimeError(
            "the Triton CCA kernels need CUDA tensors; on CPU they run only through the Triton "
            "interpreter, which must be switched on with TRITON_INTERPRET=1 before "
            "kernels.cca.triton is imported (or use implementation='reference')")
    raise RuntimeError(f"the Triton CCA kernels cannot run on device {x.device}")


def _pad_to(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    extra = size - x.shape[dim]
    if extra == 0:
        return x.contiguous()
    widths = [0, 0] * (x.ndim - 1 - dim) + [0, extra]
    return F.pad(x, widths).contiguous()


def cca_attention(
    q: torch.Tensor,  # (B, T, Hq, D)
    k: torch.Tensor,  # (B, T, Hkv, D)
    v: torch.Tensor,  # (B, T, Hkv, D)
    *,
    group_size: int = 16,
    local_window: int = 1024,
    pooling: str = "cca",
    softmax_scale: float | None = None,
    config: Config | None = None,
) -> torch.Tensor:
    """CCA attention (B, T, Hq, D) with Triton kernels: the same function as
    ``reference_torch.cca_attention``, forward and gradient in q, k, v (through the pooling too).

    ``pooling="cca"`` pools with the Triton kernel; ``"mean"``/``"max"`` pool with the torch
    reference, and the fused attention (forward and backward) runs the Triton kernels either way.
    Any head dim works (padded to a power of two >= 16); float32 (IEEE dots), bfloat16, float16.
    """
    reference_torch.check_cca_args(q, k, v, group_size, local_window, pooling)
    check_runnable(q)
    b, t, hq, d = q.shape
    g, w = group_size, local_window
    scale = reference_torch.softmax_scale_or_default(d, softmax_scale)
    config = config or default_config(d, q.dtype.itemsize)
    d_pad = max(16, triton.next_power_of_2(d))
    q, k, v = (_pad_to(x, 3, d_pad) for x in (q, k, v))
    tile = config.seq_tile
    t_pad = triton.cdiv(max(t, 1), tile) * tile
    if t_pad * hq * d_pad >= 2**31:  # in-kernel offsets within one batch element are int32
        raise ValueError(f"T * Hq * D = {t_pad} * {hq} * {d_pad} is too large for the Triton "
                         "CCA kernels (must stay below 2**31 per batch element)")
    # Padded query rows (t >= T, cut off below) may see core tokens past T // g: allocate them
    # (zeros) so that no kernel reads outside a buffer.
    n_need = max(t // g, (t_pad - w) // g)
    n_pad = triton.cdiv(max(n_need, 1), config.core_tile) * config.core_tile
    if pooling == "cca":
        q, k, v = (_pad_to(x, 1, t_pad) for x in (q, k, v))
        o = _CCA.apply(q, k, v, t // g, n_pad, g, w, scale, config)
    else:
        kc, vc = reference_torch.pool_core_tokens(q, k, v, group_size=g, pooling=pooling)
        kc, vc = (_pad_to(x.to(q.dtype), 1, n_pad) for x in (kc, vc))
        q, k, v = (_pad_to(x, 1, t_pad) for x in (q, k, v))
        o = _FusedAttention.apply(q, k, v, kc, vc, g, w, scale, config)
    return o[:, :t, :, :d]
