"""RMSNorm and the residual add before it, in jax.numpy: the math every implementation matches.

Shapes: ``... E`` (any leading dims), weight ``(E,)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def rms_norm(x: Float[Array, "... E"], weight: Float[Array, "E"], eps: float
             ) -> Float[Array, "... E"]:
    """``weight * (x / sqrt(mean(x^2) + eps))``: the statistics in float32, the normalised x
    rounded to x's dtype before the weight multiplies it (the Hugging Face LLaMA order)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def add_rms_norm(x: Float[Array, "... E"], residual: Float[Array, "... E"] | None,
                 weight: Float[Array, "E"], eps: float
                 ) -> tuple[Float[Array, "... E"], Float[Array, "... E"]]:
    """``(s, rms_norm(s))`` with ``s = x + residual`` (``s = x`` when residual is None)."""
    s = x if residual is None else x + residual
    return s, rms_norm(s, weight, eps)

