"""The gathered attention's key splits merged into one output, as one kernel (Triton lowering).

A decode step splits each row tile's keys over ``attend_splits`` programs (flash-decoding), and
each writes its normalised partial output and base-2 log-sum-exp. Merged by XLA that was three
launches per step (the weights' exponentials, the weighted sum, the real rows' slice); here it is
one program per (batch element, kv head, chunk, 32 head-dim columns) that reads only the real
rows and writes the output in the attention's own dtype. Its loop over the splits is unrolled,
so that their loads are in flight together (a loop of 33 dependent loads took 10 us on the H200,
against 5 us for XLA's three kernels). ``merge_partials_reference`` is the same math in jnp.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from kernels.cca.pallas_common import call, exp2_for, merge_split_partials
from kernels.reattention.params import next_power_of_2

UNROLL_SPLITS = 64  # the loop over the splits is unrolled (loads issued together) up to this many
D_BLOCK = 32  # head-dim columns per program: a decode step's merge spreads over D / 32 x more SMs


def merge_partials_reference(o: Float[Array, "B Hkv NC P R D"],
                             lse: Float[Array, "B Hkv NC P R"]) -> Float[Array, "B Hkv NC R D"]:
    """The softmax over all key splits from each split's normalised output and base-2
    log-sum-exp (splits that saw no key: lse ``NEG``, weight 0), float32."""
    top = jnp.max(lse, axis=3, keepdims=True)
    w = jnp.exp2(lse - top)
    return jnp.sum(w[..., None] * o, axis=3) / jnp.sum(w, axis=3)[..., None]


def _merge_kernel(o_ref, lse_ref, out_ref, *, splits: int, exp2):
    """Program (chunk x column block, b, h): the running merge over the P splits of its first
    Rp rows and its columns, in float32. It starts from split 0's own weight 1 (lse - max with
    max = lse), so a split that saw no key (lse ``NEG``) adds exactly 0 once any split has
    seen one."""
    m, acc = lse_ref[0, :], o_ref[0, :, :]
    carry = (m, jnp.ones_like(m), acc)
    _, l, acc = merge_split_partials(carry, o_ref, lse_ref, 1, splits, UNROLL_SPLITS, exp2)
    out_ref[...] = (acc / l[:, None]).astype(out_ref.dtype)


def applies(rows: int, r: int) -> bool:
    """Whether :func:`merge_partials` takes ``rows`` real rows of R = ``r``: their power-of-two
    block must fit in R."""
    return 1 <= rows and next_power_of_2(rows) <= r


def merge_partials(o: Float[Array, "B Hkv NC P R D"], lse: Float[Array, "B Hkv NC P R"], *,
                   rows: int, dtype, interpret: bool = False) -> Float[Array, "B Hkv NC Rp D"]:
    """``merge_partials_reference`` of the first ``rows`` rows, cast to ``dtype``: (B, Hkv, NC,
    Rp, D) with Rp = ``rows`` rounded up to a power of two (rows past ``rows`` are padding)."""
    b, hkv, nc, splits, r, d = o.shape
    rp = next_power_of_2(rows)
    if lse.shape != o.shape[:5] or not applies(rows, r) or o.dtype != jnp.float32:
        raise ValueError(f"merge_partials takes float32 partial outputs (B, Hkv, NC, P, R, D), "
                         f"their (B, Hkv, NC, P, R) log-sum-exps and 1 <= rows <= R with rows "
                         f"rounded up to a power of two <= R; got o {o.shape} {o.dtype}, lse "
                         f"{lse.shape}, rows {rows}")
    if lse.dtype != jnp.float32:
        lse = lse.astype(jnp.float32)
    kernel = functools.partial(_merge_kernel, splits=splits, exp2=exp2_for(interpret))
    db = min(d, D_BLOCK)
    nd = d // db
    chunk, cols = (lambda i: lax.div(i, nd)), (lambda i: lax.rem(i, nd))
    [out] = call(
        kernel,
        grid=(nc * nd, b, hkv),
        in_specs=[pl.BlockSpec((None, None, None, splits, rp, db),
                               lambda i, bi, h: (bi, h, chunk(i), 0, 0, cols(i))),
                  pl.BlockSpec((None, None, None, splits, rp),
                               lambda i, bi, h: (bi, h, chunk(i), 0, 0))],
        out_specs=[pl.BlockSpec((None, None, None, rp, db),
                                lambda i, bi, h: (bi, h, chunk(i), 0, cols(i)))],
        out_shape=[jax.ShapeDtypeStruct((b, hkv, nc, rp, d), dtype)],
        inputs=[o, lse],
        num_warps=4,
        num_stages=1,
        interpret=interpret,
        name="reattention_merge",
    )
    return out


__all__ = ["applies", "merge_partials", "merge_partials_reference"]
