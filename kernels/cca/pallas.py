"""CCA attention as Pallas GPU kernels (Triton lowering), FlashAttention style.

Each program owns ``block_q`` queries of one query head and runs one online softmax over the
fused key set of those queries: first the visible core tokens, then the raw keys of the
group-aligned local window. Scores never leave registers/shared memory. Key blocks that every
query of the tile sees fully skip the mask; only edge blocks pay for it. On Hopper GPUs with
16-bit inputs the forward runs the same plan as a warp-specialised Mosaic GPU kernel instead
(``pallas_mgpu.py``, ``Config.forward_lowering``); the backward is shared.

Pooling (core keys/values from the last-token queries of each group) is a bandwidth-bound
O(T * g * D) pass: Pallas kernels (``pallas_pool.py``) for power-of-two g <= 16
(``pallas_pool.kernel_supports``), XLA otherwise.
Its gradient (``pallas_pool.pool_backward``, or JAX autodiff of the XLA pooling) is fed by the
dK/dV of the core tokens that the backward kernels return.

The backward kernels live in ``pallas_vjp.py``. On CPU the same kernels run through the Pallas
interpreter (``interpret=True``, the default off-GPU).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from kernels.cca import pallas_mgpu, pallas_pool, pallas_vjp, reference
from kernels.cca.pallas_common import (
    LOG2E, NEG, Config, call, cdiv, default_config, dot, exp2_for, heavy_first,
    online_softmax_update, pad_to, poison_outputs, resolve_interpret, window_start)


def _forward_kernel(q_ref, k_ref, v_ref, kc_ref, vc_ref, o_ref, lse_ref, *,
                    g: int, w: int, bq: int, bk: int, scale: float, exp2):
    t0 = heavy_first(pl.program_id(0)) * bq
    rows = t0 + jnp.arange(bq)
    starts = window_start(rows, g, w)  # (BQ,) first raw key of each query
    first_start = window_start(t0, g, w)
    last_start = window_start(t0 + bq - 1, g, w)
    q = q_ref[...]
    scale2 = scale * LOG2E
    d = q.shape[-1]
    carry = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), NEG, jnp.float32),
             jnp.zeros((bq,), jnp.float32))

    def tile(keys_ref, values_ref, masked, visible):
        def body(kb, carry):
            sl = pl.ds(kb * bk, bk)
            cols = kb * bk + jnp.arange(bk)
            mask = visible(cols) if masked else None
            scores = dot(q, keys_ref[sl, :], trans_b=True)
            return online_softmax_update(carry, scores, values_ref[sl, :], scale2, mask, exp2)
        return body

    # Core tokens: query t sees core j iff (j + 1) * g <= start(t), i.e. j < start(t) // g.
    core_visible = lambda j: j[None, :] < lax.div(starts, g)[:, None]
    n_first, n_last = lax.div(first_start, g), lax.div(last_start, g)
    c_full = lax.div(n_first, bk)
    carry = lax.fori_loop(0, c_full, tile(kc_ref, vc_ref, False, core_visible), carry)
    carry = lax.fori_loop(c_full, cdiv(n_last, bk), tile(kc_ref, vc_ref, True, core_visible), carry)

    # Raw keys: query t sees key s iff start(t) <= s <= t.
    local_visible = lambda s: (s[None, :] >= starts[:, None]) & (s[None, :] <= rows[:, None])
    a0 = lax.div(first_start, bk)
    a1 = cdiv(last_start, bk)  # blocks below a1 may hold keys left of some query's window
    d0 = jnp.maximum(a1, lax.div(t0 + 1, bk))  # blocks from d0 may hold keys right of a query
    end = cdiv(t0 + bq, bk)
    carry = lax.fori_loop(a0, a1, tile(k_ref, v_ref, True, local_visible), carry)
    carry = lax.fori_loop(a1, d0, tile(k_ref, v_ref, False, local_visible), carry)
    acc, m, l = lax.fori_loop(d0, end, tile(k_ref, v_ref, True, local_visible), carry)

    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log2(l)  # base-2 log-sum-exp of the scaled scores


def _forward(q, k, v, kc, vc, *, g, w, scale, config: Config, interpret: bool):
    """Padded inputs (T_pad multiple of both blocks, N_pad multiple of block_k) -> (o, lse2)."""
    b, t_pad, hq, d = q.shape
    hkv = k.shape[2]
    grp = hq // hkv
    n_pad = kc.shape[1]
    bq, bk = config.block_q, config.block_k
    kv_map = lambda i, bi, h: (bi, 0, lax.div(h, grp), 0)
    kernel = functools.partial(_forward_kernel, g=g, w=w, bq=bq, bk=bk, scale=scale,
                               exp2=exp2_for(interpret))
    return call(
        kernel,
        grid=(t_pad // bq, b, hq),
        in_specs=[
            pl.BlockSpec((None, bq, None, d), lambda i, bi, h: (bi, heavy_first(i), h, 0)),
            pl.BlockSpec((None, t_pad, None, d), kv_map),
            pl.BlockSpec((None, t_pad, None, d), kv_map),
            pl.BlockSpec((None, n_pad, None, d), kv_map),
            pl.BlockSpec((None, n_pad, None, d), kv_map),
        ],
        out_specs=[
            pl.BlockSpec((None, bq, None, d), lambda i, bi, h: (bi, heavy_first(i), h, 0)),
            pl.BlockSpec((None, None, bq), lambda i, bi, h: (bi, h, heavy_first(i))),
        ],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, hq, t_pad), jnp.float32)],
        inputs=[q, k, v, kc, vc],
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        interpret=interpret,
        name="cca_forward",
    )


def _uses_mgpu(q, config: Config, interpret: bool) -> bool:
    """Whether the forward runs the Mosaic GPU kernel (``Config.forward_lowering``)."""
    return pallas_mgpu.uses_mosaic_gpu(
        config.forward_lowering, "forward_lowering", pallas_mgpu.supports(q),
        f"bfloat16/float16 inputs with head dim 64 or 128 (and T padded to {pallas_mgpu.TILE}); "
        f"got {q.dtype}, shape {tuple(q.shape)}", interpret)


@functools.partial(jax.jit, static_argnames=("g", "w", "scale"))
def _mgpu_forward(q, k, v, kc, vc, *, g, w, scale):
    """``pallas_mgpu.forward`` (compiled) as one jitted function: the layers of a model that
    call it with the same shapes share one lowered kernel (a jit inside a jit lowers once per
    signature). A Mosaic GPU kernel takes about a second to lower and 0.8 MB of module text, so
    the 32 layers of a 7B prefill lowered one by one cost half a minute before XLA compiles."""
    return pallas_mgpu.forward(q, k, v, kc, vc, g=g, w=w, scale=scale)


def _forward_any(q, k, v, kc, vc, *, g, w, scale, config: Config, interpret: bool):
    if _uses_mgpu(q, config, interpret):
        if interpret:  # jax's interpreter, left un-jitted: it hangs inside jitted gradients
            return pallas_mgpu.forward(q, k, v, kc, vc, g=g, w=w, scale=scale, interpret=True)
        return _mgpu_forward(q, k, v, kc, vc, g=g, w=w, scale=scale)
    return _forward(q, k, v, kc, vc, g=g, w=w, scale=scale, config=config, interpret=interpret)


def _pool(q, k, v, *, g, pooling, scale, config: Config, interpret: bool):
    """Core tokens of every group of the padded input, padded to the key tile; input dtype."""
    if pallas_pool.kernel_supports(g, pooling):
        kc, vc = pallas_pool.pool_forward(q, k, v, g=g, scale=scale,
                                          num_warps=config.num_warps, interpret=interpret)
    else:
        kc, vc = reference.pool_core_tokens(q, k, v, group_size=g, pooling=pooling,
                                            softmax_scale=scale)
    tile = config.core_tile
    return pad_to(kc.astype(q.dtype), 1, tile), pad_to(vc.astype(q.dtype), 1, tile)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7, 8))
def _cca_padded(q, k, v, g, w, pooling, scale, config, interpret):
    """CCA on inputs padded to the tiles (and to 16 g tokens when the pooling kernel runs)."""
    return _cca_fwd(q, k, v, g, w, pooling, scale, config, interpret)[0]


def _cca_fwd(q, k, v, g, w, pooling, scale, config, interpret):
    kc, vc = _pool(q, k, v, g=g, pooling=pooling, scale=scale, config=config,
                   interpret=interpret)
    o, lse = _forward_any(q, k, v, kc, vc, g=g, w=w, scale=scale, config=config,
                          interpret=interpret)
    return o, (q, k, v, kc, vc, o, lse)


def _cca_bwd(g, w, pooling, scale, config, interpret, residuals, do):
    q, k, v, kc, vc, o, lse = residuals
    dq, dk, dv, dkc, dvc = pallas_vjp.backward(q, k, v, kc, vc, o, lse, do, g=g, w=w,
                                               scale=scale, config=config, interpret=interpret)
    n = q.shape[1] // g
    dkc, dvc = dkc[:, :n], dvc[:, :n]
    if pallas_pool.kernel_supports(g, pooling):
        return pallas_pool.pool_backward(q, k, v, dkc, dvc, dq, dk, dv, g=g, scale=scale,
                                         num_warps=config.num_warps, interpret=interpret)
    pool = lambda *a: reference.pool_core_tokens(*a, group_size=g, pooling=pooling,
                                                 softmax_scale=scale)
    _, vjp = jax.vjp(pool, q, k, v)
    dq_p, dk_p, dv_p = vjp((dkc.astype(jnp.float32), dvc.astype(jnp.float32)))
    return dq + dq_p.astype(dq.dtype), dk + dk_p.astype(dk.dtype), dv + dv_p.astype(dv.dtype)


_cca_padded.defvjp(_cca_fwd, _cca_bwd)


def cca_attention(
    q: Float[Array, "B T Hq D"],
    k: Float[Array, "B T Hkv D"],
    v: Float[Array, "B T Hkv D"],
    *,
    group_size: int = 16,
    local_window: int = 1024,
    pooling: str = "cca",
    softmax_scale: float | None = None,
    config: Config | None = None,
    interpret: bool | None = None,
) -> Float[Array, "B T Hq D"]:
    """CCA attention (same function as ``reference.cca_attention``) with Pallas kernels.

    Forward and gradient in q, k, v (including through the pooling weights). ``interpret=None``
    runs the Triton-lowered kernel on GPU and the Pallas interpreter elsewhere.

    Padding: T is padded with zeros to a multiple of the tiles (and of 16 g for the pooling
    kernel). Padded keys and the core tokens of groups past T are visible only to padded query
    rows (every query's keys lie at or before it), which are cut off, and their zero cotangents
    give the real inputs no gradient.
    """
    reference.check_cca_args(q, k, v, group_size, local_window, pooling)
    t, d = q.shape[1], q.shape[3]
    if d % 16 or d & (d - 1):
        raise ValueError(f"the Pallas CCA kernels need a power-of-two head dim >= 16; got {d}")
    config = config or default_config(d, jnp.dtype(q.dtype).itemsize)
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    tile = config.seq_tile
    interpret = resolve_interpret(interpret)
    if pallas_pool.kernel_supports(group_size, pooling):
        tile = max(tile, pallas_pool.POOL_GROUPS * group_size)  # both powers of two
    q_p, k_p, v_p = (pad_to(x, 1, tile) for x in (q, k, v))
    o = _cca_padded(q_p, k_p, v_p, group_size, local_window, pooling, scale, config, interpret)
    return o[:, :t]
