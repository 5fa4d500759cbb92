"""Globality-aware pooling as a Pallas kernel: core keys/values of every complete group.

One program pools ``POOL_GROUPS`` (16) consecutive groups of one kv head. With R = 16 * g rows of
keys in the tile, the pooling queries (16, D) score all R keys in one matmul; a block-diagonal
mask keeps each group's own g keys, a row-wise softmax gives the weights, and two more matmuls
produce the core keys and values. K and V are read once. Only for power-of-two g <= 64 (R must
be a power of two and fit on chip); other g use the XLA pooling. The pooling queries (mean over
the G sharing query heads of each group's last-token query) are a 1/g-sized gather done by XLA.

The gradient is JAX autodiff of ``reference.pool_core_tokens`` (a cheap, bandwidth-bound pass).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.cca import reference
from kernels.cca.pallas_common import call, dot

POOL_GROUPS = 16


def kernel_supports(group_size: int, pooling: str) -> bool:
    g = group_size
    return pooling == "cca" and g >= 1 and g & (g - 1) == 0 and g <= 64


def _pool_kernel(qp_ref, k_ref, v_ref, kc_ref, vc_ref, *, g: int, scale: float):
    rows = POOL_GROUPS * g
    qp, keys, values = qp_ref[...], k_ref[...], v_ref[...]
    s = dot(qp, keys, trans_b=True) * scale  # (16, R)
    own = (jnp.arange(rows)[None, :] // g) == jnp.arange(POOL_GROUPS)[:, None]
    s = jnp.where(own, s, -jnp.inf)
    p = jnp.exp(s - jnp.max(s, axis=1, keepdims=True))
    p = p / jnp.sum(p, axis=1, keepdims=True)
    kc_ref[...] = dot(p.astype(keys.dtype), keys).astype(kc_ref.dtype)
    vc_ref[...] = dot(p.astype(values.dtype), values).astype(vc_ref.dtype)


def _pool_forward(q, k, v, g, scale, num_warps, interpret):
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    n = t // g
    n_pad = -(-max(n, 1) // POOL_GROUPS) * POOL_GROUPS
    q_last = q[:, g - 1 : n * g : g].astype(jnp.float32)
    q_pool = q_last.reshape(b, n, hkv, hq // hkv, d).mean(axis=3).astype(k.dtype)
    q_pool = jnp.pad(q_pool, ((0, 0), (0, n_pad - n), (0, 0), (0, 0)))
    rows = n_pad * g
    k_p = jnp.pad(k, ((0, 0), (0, max(0, rows - t)), (0, 0), (0, 0)))[:, :rows]
    v_p = jnp.pad(v, ((0, 0), (0, max(0, rows - t)), (0, 0), (0, 0)))[:, :rows]
    tile = lambda r: pl.BlockSpec((None, r, None, d), lambda i, bi, h: (bi, i, h, 0))
    kc, vc = call(
        functools.partial(_pool_kernel, g=g, scale=scale),
        grid=(n_pad // POOL_GROUPS, b, hkv),
        in_specs=[tile(POOL_GROUPS), tile(POOL_GROUPS * g), tile(POOL_GROUPS * g)],
        out_specs=[tile(POOL_GROUPS), tile(POOL_GROUPS)],
        out_shape=[jax.ShapeDtypeStruct((b, n_pad, hkv, d), k.dtype)] * 2,
        inputs=[q_pool, k_p, v_p], num_warps=num_warps, num_stages=1, interpret=interpret,
        name="cca_pool")
    return kc[:, :n], vc[:, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def pool_core_tokens(q, k, v, g, scale, num_warps, interpret):
    """(kc, vc) in the input dtype, shape (B, T // g, Hkv, D)."""
    return _pool_forward(q, k, v, g, scale, num_warps, interpret)


def _pool_fwd(q, k, v, g, scale, num_warps, interpret):
    return _pool_forward(q, k, v, g, scale, num_warps, interpret), (q, k, v)


def _pool_bwd(g, scale, num_warps, interpret, residuals, cotangents):
    q, k, v = residuals
    f = lambda q, k, v: reference.pool_core_tokens(q, k, v, group_size=g, softmax_scale=scale)
    _, vjp = jax.vjp(f, q, k, v)
    dkc, dvc = cotangents
    return vjp((dkc.astype(jnp.float32), dvc.astype(jnp.float32)))


pool_core_tokens.defvjp(_pool_fwd, _pool_bwd)
