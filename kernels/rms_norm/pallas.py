"""Residual add + RMSNorm as one Pallas GPU kernel (Triton lowering), for the decode step.

At batch 1 each of the two norms of a LLaMA layer costs XLA three kernels of 1.3-1.7 us on an
H200 (the residual add, the mean of squares, the scaling: ``bench/results/
anatomy_cca128k_h200_v5_profile.json``), each moving a few kilobytes. Here it is one launch of one
program per row: the row is read once, the sum written, its statistics taken in registers and the
normalised row written.

Arithmetic as ``reference.add_rms_norm``: the sum rounded to its dtype, the statistics in float32,
the normalised row rounded to x's dtype and then multiplied by the weight, rounded to the result
dtype. Only the order of the float32 sum of squares differs from XLA's. On CPU the kernel runs
through the Pallas interpreter.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from kernels.cca.pallas_common import call, resolve_interpret


def supports(hidden: int) -> bool:
    """Hidden sizes the kernel takes: powers of two >= 16 (one row is one Triton tile)."""
    return hidden >= 16 and not hidden & (hidden - 1)


def _kernel(*refs, eps: float, add: bool, sum_dtype):
    if add:
        x_ref, r_ref, w_ref, s_ref, y_ref = refs
        s = (x_ref[...].astype(jnp.float32) + r_ref[...].astype(jnp.float32)).astype(sum_dtype)
        s_ref[...] = s
    else:
        x_ref, w_ref, y_ref = refs
        s = x_ref[...]
    sf = s.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.sum(sf * sf) / sf.shape[0] + eps)
    normed = (sf * inv).astype(sum_dtype).astype(jnp.float32)
    y_ref[...] = (w_ref[...].astype(jnp.float32) * normed).astype(y_ref.dtype)


def add_rms_norm(
    x: Float[Array, "... E"],
    residual: Float[Array, "... E"] | None,
    weight: Float[Array, "E"],
    *,
    eps: float,
    interpret: bool | None = None,
) -> tuple[Float[Array, "... E"], Float[Array, "... E"]]:
    """``(s, weight * norm(s))`` with ``s = x + residual`` (``s = x`` when residual is None), as
    ``reference.add_rms_norm``. E must be a power of two >= 16 (:func:`supports`)."""
    e = x.shape[-1]
    if x.ndim < 1 or not supports(e):
        raise ValueError(f"add_rms_norm kernel: the last dim of x must be a power of two >= 16; "
                         f"got x of shape {x.shape}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual {residual.shape} must have x's shape {x.shape}")
    if weight.shape != (e,):
        raise ValueError(f"weight must be ({e},); got {weight.shape}")
    for name, a in (("x", x), ("residual", residual), ("weight", weight)):
        if a is not None and not jnp.issubdtype(a.dtype, jnp.floating):
            raise ValueError(f"{name} must be floating point; got {a.dtype}")
    add = residual is not None
    sum_dtype = jnp.result_type(x, residual) if add else x.dtype
    out_dtype = jnp.result_type(weight, sum_dtype)
    lead = x.shape[:-1]
    rows = x.reshape(-1, e)
    n = rows.shape[0]
    row_spec = pl.BlockSpec((None, e), lambda i: (i, 0))
    inputs = [rows] + ([residual.reshape(-1, e)] if add else []) + [weight]
    out_shape = [jax.ShapeDtypeStruct((n, e), out_dtype)]
    if add:
        out_shape.insert(0, jax.ShapeDtypeStruct((n, e), sum_dtype))
    kernel = functools.partial(_kernel, eps=float(eps), add=add, sum_dtype=sum_dtype)
    outs = call(
        kernel,
        grid=(n,),
        in_specs=[row_spec] * (2 if add else 1) + [pl.BlockSpec((e,), lambda i: (0,))],
        out_specs=[row_spec] * len(out_shape),
        out_shape=out_shape,
        inputs=inputs,
        num_warps=4 if e <= 4096 else 8,
        num_stages=1,
        interpret=resolve_interpret(interpret),
        name="add_rms_norm" if add else "rms_norm",
    )
    y = outs[-1].reshape(*lead, e)
    return (outs[0].reshape(*lead, e) if add else x), y
