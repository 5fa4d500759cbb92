"""Globality-aware pooling as Pallas kernels: core keys/values of every group, and its gradient.

One program pools ``POOL_GROUPS`` (16) consecutive groups of one kv head. With R = 16 * g key rows
in the tile, the 16 pooling queries score all R keys in one matmul; a block-diagonal mask keeps
each group's own g keys and a row-wise softmax gives the weights P (16, R). Then
``kc = P K`` and ``vc = P V``. K and V are read once.

The backward recomputes P and, given dkc, dvc, adds ``P^T dkc + scale dS^T q_pool`` to dK and
``P^T dvc`` to dV in place (the attention backward's buffers, aliased), and returns
``dq_pool = scale dS K`` with ``dS = P * (dP - rowsum(P * dP))``, ``dP = dkc K^T + dvc V^T``.

Works on inputs padded to a multiple of 16 * g tokens: every group is pooled, including groups
past T, which only padded query rows can see. Power-of-two g <= 16 and 16-bit inputs only (R must
be a power of two and the R x D tiles of K, V, dK, dV must fit on chip: ``kernel_supports``); ``pallas.py`` uses the XLA pooling otherwise. The pooling queries (mean over
the G sharing query heads of each group's last-token query) are a 1/g-sized gather done by XLA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.cca.pallas_common import call, dot

POOL_GROUPS = 16


def kernel_supports(group_size: int, pooling: str, head_dim: int, dtype, interpret: bool) -> bool:
    """Where the kernels run: power-of-two g with 16-bit tiles of at most 16 g x D = 256 x 128.

    A float32 K tile of 256 x 128 asks the H100 for 272 KB of shared memory (over its 227 KB), so
    on the GPU float32 inputs use the XLA pooling. The interpreter has no such limit and runs the
    kernels in float32 too, so that CPU tests check their math at float32 tolerance."""
    g = group_size
    small_tile = POOL_GROUPS * g * head_dim <= 256 * 128
    fits = interpret or jnp.dtype(dtype).itemsize == 2
    return pooling == "cca" and g & (g - 1) == 0 and 1 <= g <= 16 and small_tile and fits


def pooling_queries(q, g: int, hkv: int):
    """(B, T // g, Hkv, D): mean over each kv head's query heads of every group's last query."""
    b, t, hq, d = q.shape
    n = t // g
    q_last = q[:, g - 1 : n * g : g].astype(jnp.float32)
    return q_last.reshape(b, n, hkv, hq // hkv, d).mean(axis=3).astype(q.dtype)


def _weights(qp, keys, g: int, scale: float):
    rows = POOL_GROUPS * g
    s = dot(qp, keys, trans_b=True) * scale  # (16, R)
    own = (jnp.arange(rows)[None, :] // g) == jnp.arange(POOL_GROUPS)[:, None]
    s = jnp.where(own, s, -jnp.inf)
    p = jnp.exp(s - jnp.max(s, axis=1, keepdims=True))
    return p / jnp.sum(p, axis=1, keepdims=True)


def _pool_kernel(qp_ref, k_ref, v_ref, kc_ref, vc_ref, *, g: int, scale: float):
    keys, values = k_ref[...], v_ref[...]
    p = _weights(qp_ref[...], keys, g, scale)
    kc_ref[...] = dot(p.astype(keys.dtype), keys).astype(kc_ref.dtype)
    vc_ref[...] = dot(p.astype(values.dtype), values).astype(vc_ref.dtype)


def _pool_bwd_kernel(qp_ref, k_ref, v_ref, dkc_ref, dvc_ref, dk_in, dv_in, dk_ref, dv_ref,
                     dqp_ref, *, g: int, scale: float):
    del dk_in, dv_in  # the same buffers as dk_ref, dv_ref (aliased)
    qp, keys, values = qp_ref[...], k_ref[...], v_ref[...]
    dkc, dvc = dkc_ref[...], dvc_ref[...]
    p = _weights(qp, keys, g, scale)  # (16, R), zero off the block diagonal
    dp = dot(dkc, keys, trans_b=True) + dot(dvc, values, trans_b=True)
    ds = p * (dp - jnp.sum(p * dp, axis=1, keepdims=True))
    dqp_ref[...] = (dot(ds.astype(keys.dtype), keys) * scale).astype(dqp_ref.dtype)
    pt = p.astype(keys.dtype)
    dk = dot(pt, dkc, trans_a=True) + dot(ds.astype(qp.dtype), qp, trans_a=True) * scale
    dk_ref[...] = (dk_ref[...].astype(jnp.float32) + dk).astype(dk_ref.dtype)
    dv_ref[...] = (dv_ref[...].astype(jnp.float32) + dot(pt, dvc, trans_a=True)).astype(
        dv_ref.dtype)


def _specs(d: int, g: int):
    tile = lambda r: pl.BlockSpec((None, r, None, d), lambda i, bi, h: (bi, i, h, 0))
    return tile(POOL_GROUPS), tile(POOL_GROUPS * g)


def pool_forward(q, k, v, *, g: int, scale: float, num_warps: int, interpret: bool):
    """(kc, vc) of shape (B, T // g, Hkv, D) for T a multiple of 16 g."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    n = t // g
    small, big = _specs(d, g)
    return call(
        functools.partial(_pool_kernel, g=g, scale=scale),
        grid=(n // POOL_GROUPS, b, hkv),
        in_specs=[small, big, big], out_specs=[small, small],
        out_shape=[jax.ShapeDtypeStruct((b, n, hkv, d), k.dtype)] * 2,
        inputs=[pooling_queries(q, g, hkv), k, v], num_warps=num_warps, num_stages=1,
        interpret=interpret, name="cca_pool")


def pool_backward(q, k, v, dkc, dvc, dq, dk, dv, *, g: int, scale: float, num_warps: int,
                  interpret: bool):
    """(dq, dk, dv) with the pooling's share added: dk and dv in place inside the kernel, dq on
    each group's last-token rows (a strided in-place update of 1/g of the rows)."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    n = t // g
    small, big = _specs(d, g)
    dk, dv, dqp = call(
        functools.partial(_pool_bwd_kernel, g=g, scale=scale),
        grid=(n // POOL_GROUPS, b, hkv),
        in_specs=[small, big, big, small, small, big, big], out_specs=[big, big, small],
        out_shape=[jax.ShapeDtypeStruct(dk.shape, dk.dtype),
                   jax.ShapeDtypeStruct(dv.shape, dv.dtype),
                   jax.ShapeDtypeStruct((b, n, hkv, d), jnp.float32)],
        inputs=[pooling_queries(q, g, hkv), k, v, dkc.astype(k.dtype), dvc.astype(k.dtype),
                dk, dv],
        aliases={5: 0, 6: 1}, num_warps=num_warps, num_stages=1, interpret=interpret,
        name="cca_pool_backward")
    grp = hq // hkv
    share = jnp.repeat(dqp / grp, grp, axis=2).astype(q.dtype)  # (B, N, Hq, D)
    dq = dq.at[:, g - 1 : n * g : g].add(share)
    return dq, dk, dv
