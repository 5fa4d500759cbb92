"""Globality-aware pooling as Pallas kernels: core keys/values of every group, and its gradient.

One program pools ``POOL_GROUPS`` (16) consecutive groups of one kv head: R = 16 g key rows,
walked in chunks of ``CHUNK_ROWS`` (64) rows so the loads are software-pipelined and several
programs share an SM (the pass is bandwidth-bound: K and V are read once). Per chunk, the 16
pooling queries score the chunk's keys in one matmul; a block-diagonal mask keeps each group's
own g keys and a row softmax gives the weights P (16, CH) (a group never straddles two chunks).
Then ``kc += P K`` and ``vc += P V``.

The backward recomputes P chunk by chunk and, given dkc, dvc, adds ``P^T dkc + scale dS^T q_pool``
to dK and ``P^T dvc`` to dV in place (the attention backward's buffers, aliased), and returns
``dq_pool = scale dS K`` with ``dS = P * (dP - rowsum(P * dP))``, ``dP = dkc K^T + dvc V^T``.

Works on inputs padded to a multiple of 16 g tokens: every group is pooled, including groups
past T, which only padded query rows can see. Power-of-two g <= 16 only (``kernel_supports``);
``pallas.py`` uses the XLA pooling otherwise. The pooling queries (mean over the G sharing query
heads of each group's last-token query) are a 1/g-sized gather done by XLA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels.cca.pallas_common import NEG, call, dot

POOL_GROUPS = 16
CHUNK_ROWS = 64  # key rows per loop step: small tiles, software-pipelined loads


def kernel_supports(group_size: int, pooling: str) -> bool:
    """Where the kernels run: CCA pooling with a power-of-two g <= 16 (R = 16 g rows, a power of
    two, walked in chunks that each hold whole groups)."""
    g = group_size
    return pooling == "cca" and g & (g - 1) == 0 and 1 <= g <= 16


def _stages(dtype) -> int:
    """Pipeline depth: three chunks of K and V in flight for 16-bit inputs (96 KB of shared
    memory), two for float32 (128 KB)."""
    return 3 if jnp.dtype(dtype).itemsize <= 2 else 2


def pooling_queries(q, g: int, hkv: int):
    """(B, T // g, Hkv, D): mean over each kv head's query heads of every group's last query."""
    b, t, hq, d = q.shape
    n = t // g
    q_last = q[:, g - 1 : n * g : g].astype(jnp.float32)
    return q_last.reshape(b, n, hkv, hq // hkv, d).mean(axis=3).astype(q.dtype)


def _chunk_weights(qp, keys, c, g: int, scale: float):
    """Pooling weights (16, CH) of the keys in chunk c of the program's 16 g rows.

    Each group lies inside one chunk (CH is a multiple of g), so the row softmax over the chunk
    is the group's whole softmax; rows of groups outside the chunk are all zero."""
    rows = keys.shape[0]
    s = dot(qp, keys, trans_b=True) * scale  # (16, CH)
    own = lax.div(c * rows + jnp.arange(rows), g)[None, :] == jnp.arange(POOL_GROUPS)[:, None]
    s = jnp.where(own, s, NEG)
    p = jnp.where(own, jnp.exp(s - jnp.max(s, axis=1, keepdims=True)), 0.0)
    total = jnp.sum(p, axis=1, keepdims=True)
    return p / jnp.where(total > 0.0, total, 1.0)


def _pool_kernel(qp_ref, k_ref, v_ref, kc_ref, vc_ref, *, g: int, scale: float, chunk: int):
    qp = qp_ref[...]

    def body(c, carry):
        kc, vc = carry
        sl = pl.ds(c * chunk, chunk)
        keys, values = k_ref[sl, :], v_ref[sl, :]
        p = _chunk_weights(qp, keys, c, g, scale)
        return kc + dot(p.astype(keys.dtype), keys), vc + dot(p.astype(values.dtype), values)

    zeros = jnp.zeros(kc_ref.shape, jnp.float32)
    kc, vc = lax.fori_loop(0, POOL_GROUPS * g // chunk, body, (zeros, zeros))
    kc_ref[...] = kc.astype(kc_ref.dtype)
    vc_ref[...] = vc.astype(vc_ref.dtype)


def _pool_bwd_kernel(qp_ref, k_ref, v_ref, dkc_ref, dvc_ref, dk_in, dv_in, dk_ref, dv_ref,
                     dqp_ref, *, g: int, scale: float, chunk: int):
    del dk_in, dv_in  # the same buffers as dk_ref, dv_ref (aliased)
    qp, dkc, dvc = qp_ref[...], dkc_ref[...], dvc_ref[...]

    def body(c, dqp):
        sl = pl.ds(c * chunk, chunk)
        keys, values = k_ref[sl, :], v_ref[sl, :]
        p = _chunk_weights(qp, keys, c, g, scale)  # (16, CH), zero off the block diagonal
        dp = dot(dkc, keys, trans_b=True) + dot(dvc, values, trans_b=True)
        ds = p * (dp - jnp.sum(p * dp, axis=1, keepdims=True))
        pt = p.astype(keys.dtype)
        dk = dot(pt, dkc, trans_a=True) + dot(ds.astype(qp.dtype), qp, trans_a=True) * scale
        dk_ref[sl, :] = (dk_ref[sl, :].astype(jnp.float32) + dk).astype(dk_ref.dtype)
        dv_ref[sl, :] = (dv_ref[sl, :].astype(jnp.float32) + dot(pt, dvc, trans_a=True)).astype(
            dv_ref.dtype)
        return dqp + dot(ds.astype(keys.dtype), keys)

    dqp = lax.fori_loop(0, POOL_GROUPS * g // chunk, body,
                        jnp.zeros(dqp_ref.shape, jnp.float32))
    dqp_ref[...] = (dqp * scale).astype(dqp_ref.dtype)


def _chunk(g: int) -> int:
    return min(CHUNK_ROWS, POOL_GROUPS * g)


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
        functools.partial(_pool_kernel, g=g, scale=scale, chunk=_chunk(g)),
        grid=(n // POOL_GROUPS, b, hkv),
        in_specs=[small, big, big], out_specs=[small, small],
        out_shape=[jax.ShapeDtypeStruct((b, n, hkv, d), k.dtype)] * 2,
        inputs=[pooling_queries(q, g, hkv), k, v], num_warps=num_warps, num_stages=_stages(k.dtype),
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
        functools.partial(_pool_bwd_kernel, g=g, scale=scale, chunk=_chunk(g)),
        grid=(n // POOL_GROUPS, b, hkv),
        in_specs=[small, big, big, small, small, big, big], out_specs=[big, big, small],
        out_shape=[jax.ShapeDtypeStruct(dk.shape, dk.dtype),
                   jax.ShapeDtypeStruct(dv.shape, dv.dtype),
                   jax.ShapeDtypeStruct((b, n, hkv, d), jnp.float32)],
        inputs=[pooling_queries(q, g, hkv), k, v, dkc.astype(k.dtype), dvc.astype(k.dtype),
                dk, dv],
        aliases={5: 0, 6: 1}, num_warps=num_warps, num_stages=_stages(k.dtype), interpret=interpret,
        name="cca_pool_backward")
    grp = hq // hkv
    share = jnp.repeat(dqp / grp, grp, axis=2).astype(q.dtype)  # (B, N, Hq, D)
    dq = dq.at[:, g - 1 : n * g : g].add(share)
    return dq, dk, dv
