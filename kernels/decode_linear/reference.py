"""The decode projection as the model computes it with XLA ops (``jax_cca.model``): RMSNorm
(float32 statistics, result in the input dtype, times the weight), SwiGLU in the input dtype, a
matmul with float32 accumulation rounded to the input dtype, then the residual added in that
dtype. The Pallas kernel (``pallas.py``) is checked against this."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

PROLOGUES = (None, "rmsnorm", "swiglu")


def apply_prologue(x: Float[Array, "M Kx"], prologue: str | None,
                   norm_weight: Float[Array, "K"] | None = None, eps: float = 1e-5
                   ) -> Float[Array, "M K"]:
    """The matmul's input: x itself, RMSNorm(x) * norm_weight, or silu(gate) * up with x =
    [gate ; up] along its last axis."""
    if prologue is None:
        return x
    if prologue == "rmsnorm":
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
        return norm_weight * xf.astype(x.dtype)
    if prologue == "swiglu":
        gate, up = jnp.split(x, 2, axis=-1)
        return jax.nn.silu(gate) * up
    raise ValueError(f"prologue must be one of {PROLOGUES}; got {prologue!r}")


def decode_linear(
    x: Float[Array, "M Kx"],
    w: Float[Array, "K N"],
    *,
    prologue: str | None = None,
    norm_weight: Float[Array, "K"] | None = None,
    eps: float = 1e-5,
    residual: Float[Array, "M N"] | None = None,
) -> Float[Array, "M N"]:
    """``prologue(x) @ w`` (+ ``residual``), in x's dtype."""
    y = jnp.dot(apply_prologue(x, prologue, norm_weight, eps), w,
                preferred_element_type=jnp.float32,
                precision=jax.lax.Precision.HIGHEST).astype(x.dtype)
    return y if residual is None else residual + y
