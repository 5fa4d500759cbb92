"""Rotary position embeddings (LLaMA "rotate half" layout), with linear and llama3 scaling."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jax_cca.config import CCAConfig


@functools.lru_cache(maxsize=32)
def inverse_frequencies(config: CCAConfig) -> np.ndarray:
    """The D/2 rotary inverse frequencies in float32, as transformers computes them."""
    d = config.head_dim
    exponents = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d)
    inv_freq = (1.0 / (np.float32(config.rope_theta) ** exponents)).astype(np.float32)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
    # llama3: long wavelengths divided by `factor`, short ones kept, a smooth blend in between.
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return np.where(medium, blended, scaled).astype(np.float32)


def rope_cos_sin(
    positions: Int[Array, "*B T"], inv_freq: np.ndarray
) -> tuple[Float[Array, "*B T D"], Float[Array, "*B T D"]]:
    """cos and sin of the rotation angles (float32), duplicated over both halves of D."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(
    x: Float[Array, "B T H D"], cos: Float[Array, "B T D"], sin: Float[Array, "B T D"]
) -> Float[Array, "B T H D"]:
    """Rotate x by the angles: x * cos + rotate_half(x) * sin, in x's dtype."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def default_positions(batch: int, length: int) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
