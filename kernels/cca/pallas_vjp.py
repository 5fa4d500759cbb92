"""Backward of the fused CCA attention (pallas.py) as three Pallas kernels (Triton lowering).

Given dO and the forward's O and base-2 log-sum-exp:

* ``_dq_kernel``: one program per (query tile, query head); computes delta = rowsum(dO * O) of
  its rows (written out for the other two kernels), walks the same key tiles as the forward
  (core, then local) and accumulates dQ.
* ``_dkdv_local_kernel``: one program per (raw key tile, kv head); loops over the G query heads
  sharing the kv head and over the query tiles that see the keys: t in
  [s, (s // g + 1) * g + w - 2]. Writes dK, dV once per kv head (no atomics).
* ``_dkdv_core_kernel``: the same for core-token tiles: core j is seen by every t with
  t >= (j + 1) * g + w - 1.

Only edge tiles are masked. The gradient through the pooling weights is added by the caller
(``pallas.py``: the ``pallas_pool`` backward kernel, or JAX autodiff of the XLA pooling) from the
dK_core, dV_core returned here.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels.cca.pallas_common import (LOG2E, Config, call, cdiv, dot, exp2_for, heavy_first,
                                       window_start)


def _probabilities(q, keys, lse, scale2, mask, exp2):
    p = exp2(dot(q, keys, trans_b=True) * scale2 - lse[:, None])
    return p if mask is None else jnp.where(mask, p, 0.0)


def _dq_kernel(q_ref, k_ref, v_ref, kc_ref, vc_ref, o_ref, do_ref, lse_ref, dq_ref, delta_ref,
               *, g: int, w: int, bq: int, bk: int, scale: float, exp2):
    t0 = heavy_first(pl.program_id(0)) * bq
    rows = t0 + jnp.arange(bq)
    starts = window_start(rows, g, w)
    first_start = window_start(t0, g, w)
    last_start = window_start(t0 + bq - 1, g, w)
    q, do, lse = q_ref[...], do_ref[...], lse_ref[...]
    # delta = rowsum(dO * O): computed here from the tiles the program loads anyway, and written
    # out for the dK/dV kernels (saves a separate pass over O and dO).
    delta = jnp.sum(o_ref[...].astype(jnp.float32) * do.astype(jnp.float32), axis=1)
    delta_ref[...] = delta
    scale2 = scale * LOG2E

    def tile(keys_ref, values_ref, masked, visible):
        def body(kb, dq):
            sl = pl.ds(kb * bk, bk)
            keys, values = keys_ref[sl, :], values_ref[sl, :]
            mask = visible(kb * bk + jnp.arange(bk)) if masked else None
            p = _probabilities(q, keys, lse, scale2, mask, exp2)
            ds = p * (dot(do, values, trans_b=True) - delta[:, None])
            return dq + dot(ds.astype(keys.dtype), keys)
        return body

    dq = jnp.zeros(q.shape, jnp.float32)
    core_visible = lambda j: j[None, :] < lax.div(starts, g)[:, None]
    c_full = lax.div(lax.div(first_start, g), bk)
    dq = lax.fori_loop(0, c_full, tile(kc_ref, vc_ref, False, core_visible), dq)
    dq = lax.fori_loop(c_full, cdiv(lax.div(last_start, g), bk),
                       tile(kc_ref, vc_ref, True, core_visible), dq)
    local_visible = lambda s: (s[None, :] >= starts[:, None]) & (s[None, :] <= rows[:, None])
    a1 = cdiv(last_start, bk)
    d0 = jnp.maximum(a1, lax.div(t0 + 1, bk))
    dq = lax.fori_loop(lax.div(first_start, bk), a1, tile(k_ref, v_ref, True, local_visible), dq)
    dq = lax.fori_loop(a1, d0, tile(k_ref, v_ref, False, local_visible), dq)
    dq = lax.fori_loop(d0, cdiv(t0 + bq, bk), tile(k_ref, v_ref, True, local_visible), dq)
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkdv_tiles(q_ref, do_ref, lse_ref, delta_ref, keys, values, *, grp, bq, scale, ranges,
                visible, exp2):
    """Accumulate dK, dV of one key tile over G heads and the given query-tile ranges.

    ``ranges``: list of (first, end, masked) query-tile ranges; ``visible(rows)`` -> mask.
    """
    scale2 = scale * LOG2E

    def tile(gi, masked):
        def body(qb, carry):
            dk, dv = carry
            sl = pl.ds(qb * bq, bq)
            q, do = q_ref[sl, gi, :], do_ref[sl, gi, :]
            lse, delta = lse_ref[gi, sl], delta_ref[gi, sl]
            mask = visible(qb * bq + jnp.arange(bq)) if masked else None
            p = _probabilities(q, keys, lse, scale2, mask, exp2)  # (BQ, BK)
            dv = dv + dot(p.astype(do.dtype), do, trans_a=True)
            ds = p * (dot(do, values, trans_b=True) - delta[:, None])
            return dk + dot(ds.astype(q.dtype), q, trans_a=True), dv
        return body

    def head(gi, carry):
        for first, end, masked in ranges:
            carry = lax.fori_loop(first, end, tile(gi, masked), carry)
        return carry

    zeros = jnp.zeros(keys.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, grp, head, (zeros, zeros))
    return dk * scale, dv


def _dkdv_local_kernel(q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, dk_ref, dv_ref, *,
                       g: int, w: int, bq: int, bk: int, scale: float, grp: int, nq: int,
                       exp2):
    k0 = pl.program_id(0) * bk
    cols = k0 + jnp.arange(bk)
    q_lo = lax.div(k0, bq)
    t_hi = (lax.div(k0 + bk - 1, g) + 1) * g + w - 2  # last query that sees the tile's last key
    q_hi = jnp.minimum(nq, lax.div(t_hi, bq) + 1)
    # Tiles whose every query sees every key: t0 >= k0 + bk - 1 and start(t0 + bq - 1) <= k0.
    m0 = jnp.clip(cdiv(k0 + bk - 1, bq), q_lo, q_hi)
    m1 = jnp.clip(lax.div((lax.div(k0, g) + 1) * g + w - 1, bq), m0, q_hi)

    def visible(rows):
        starts = window_start(rows, g, w)
        return (cols[None, :] >= starts[:, None]) & (cols[None, :] <= rows[:, None])

    dk, dv = _dkdv_tiles(q_ref, do_ref, lse_ref, delta_ref, k_ref[...], v_ref[...], grp=grp,
                         bq=bq, scale=scale, visible=visible, exp2=exp2,
                         ranges=[(q_lo, m0, True), (m0, m1, False), (m1, q_hi, True)])
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dkdv_core_kernel(q_ref, do_ref, lse_ref, delta_ref, kc_ref, vc_ref, dkc_ref, dvc_ref, *,
                      g: int, w: int, bq: int, bk: int, scale: float, grp: int, nq: int,
                       exp2):
    j0 = pl.program_id(0) * bk
    js = j0 + jnp.arange(bk)
    q_lo = jnp.minimum(nq, lax.div((j0 + 1) * g + w - 1, bq))
    m0 = jnp.clip(cdiv((j0 + bk) * g + w - 1, bq), q_lo, nq)  # from here all cores visible

    def visible(rows):
        return js[None, :] < lax.div(window_start(rows, g, w), g)[:, None]

    dk, dv = _dkdv_tiles(q_ref, do_ref, lse_ref, delta_ref, kc_ref[...], vc_ref[...], grp=grp,
                         bq=bq, scale=scale, visible=visible, exp2=exp2,
                         ranges=[(q_lo, m0, True), (m0, nq, False)])
    dkc_ref[...] = dk.astype(dkc_ref.dtype)
    dvc_ref[...] = dv.astype(dvc_ref.dtype)


def _prepare(q, k, do):
    b, t_pad, hq, d = q.shape
    return b, t_pad, hq, k.shape[2], d, hq // k.shape[2], do.astype(q.dtype)


def backward_dq(q, k, v, kc, vc, o, lse, do, *, g: int, w: int, scale: float, config: Config,
                interpret: bool):
    """(dq, delta): delta = rowsum(dO * O) (B, Hq, T_pad) float32, which the dK/dV kernels use."""
    b, t_pad, hq, hkv, d, grp, do = _prepare(q, k, do)
    bq, bk = config.bwd_block_q, config.bwd_block_k
    params = dict(num_warps=config.bwd_num_warps, num_stages=config.bwd_num_stages)
    kv_full = lambda length: pl.BlockSpec((None, length, None, d),
                                          lambda i, bi, h: (bi, 0, lax.div(h, grp), 0))
    q_tile = pl.BlockSpec((None, bq, None, d), lambda i, bi, h: (bi, heavy_first(i), h, 0))
    row_tile = pl.BlockSpec((None, None, bq), lambda i, bi, h: (bi, h, heavy_first(i)))
    return call(
        functools.partial(_dq_kernel, g=g, w=w, bq=bq, bk=bk, scale=scale,
                          exp2=exp2_for(interpret)),
        grid=(t_pad // bq, b, hq),
        in_specs=[q_tile, kv_full(t_pad), kv_full(t_pad), kv_full(kc.shape[1]),
                  kv_full(kc.shape[1]), q_tile, q_tile, row_tile],
        out_specs=[q_tile, row_tile],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, hq, t_pad), jnp.float32)],
        inputs=[q, k, v, kc, vc, o, do, lse],
        interpret=interpret, name="cca_backward_dq", **params)


def backward_dkdv(q, keys, values, lse, do, delta, *, core: bool, g: int, w: int, scale: float,
                  config: Config, interpret: bool, splits: int = 1):
    """dK, dV of the raw keys (core=False) or of the core tokens (core=True).

    ``splits`` (a divisor of G = Hq / Hkv) splits each kv head's G query heads over that many
    programs, each writing float32 partial dK, dV that are summed afterwards: more, shorter
    programs (GQA has G times fewer kv heads to spread over the GPU) for a small extra pass."""
    b, t_pad, hq, hkv, d, grp, do = _prepare(q, keys, do)
    if splits < 1 or grp % splits:
        raise ValueError(f"splits must divide Hq / Hkv = {grp}; got {splits}")
    bq, bk, num_warps, num_stages = config.dkdv
    params = dict(num_warps=num_warps, num_stages=num_stages)
    # Query-side inputs grouped by program: (B, T, Hkv * S, G / S, D) and (B, Hkv * S, G / S, T)
    # (query head h * G + i is row i % (G / S) of program head h * S + i // (G / S)).
    heads, per = hkv * splits, grp // splits
    q_all = pl.BlockSpec((None, t_pad, None, per, d), lambda i, bi, h: (bi, 0, h, 0, 0))
    row_all = pl.BlockSpec((None, None, per, t_pad), lambda i, bi, h: (bi, h, 0, 0))
    k_tile = pl.BlockSpec((None, bk, None, d), lambda i, bi, h: (bi, i, lax.div(h, splits), 0))
    out_tile = pl.BlockSpec((None, bk, None, d), lambda i, bi, h: (bi, i, h, 0))
    out_dtype = keys.dtype if splits == 1 else jnp.float32
    n = keys.shape[1]
    kernel = _dkdv_core_kernel if core else _dkdv_local_kernel
    dk, dv = call(
        functools.partial(kernel, g=g, w=w, bq=bq, bk=bk, scale=scale, grp=per,
                          nq=t_pad // bq, exp2=exp2_for(interpret)),
        grid=(n // bk, b, heads),
        in_specs=[q_all, q_all, row_all, row_all, k_tile, k_tile],
        out_specs=[out_tile, out_tile],
        out_shape=[jax.ShapeDtypeStruct((b, n, heads, d), out_dtype)] * 2,
        inputs=[q.reshape(b, t_pad, heads, per, d), do.reshape(b, t_pad, heads, per, d),
                lse.reshape(b, heads, per, t_pad), delta.reshape(b, heads, per, t_pad),
                keys, values],
        interpret=interpret, name="cca_backward_dkdv_core" if core else "cca_backward_dkdv",
        **params)
    if splits == 1:
        return dk, dv
    total = lambda x: x.reshape(b, n, hkv, splits, d).sum(axis=3).astype(keys.dtype)
    return total(dk), total(dv)


def backward(q, k, v, kc, vc, o, lse, do, *, g: int, w: int, scale: float, config: Config,
             interpret: bool):
    """(dq, dk, dv, dkc, dvc) for padded inputs of the fused attention."""
    kw = dict(g=g, w=w, scale=scale, config=config, interpret=interpret)
    dq, delta = backward_dq(q, k, v, kc, vc, o, lse, do, **kw)
    dk, dv = backward_dkdv(q, k, v, lse, do, delta, core=False, **kw)
    splits = math.gcd(config.dkdv_core_splits, q.shape[2] // k.shape[2])
    dkc, dvc = backward_dkdv(q, kc, vc, lse, do, delta, core=True, splits=splits, **kw)
    return dq, dk, dv, dkc, dvc
