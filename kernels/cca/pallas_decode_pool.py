"""The pooling of a decode step as one Pallas GPU kernel (Triton lowering): when the new token
completes its group, the group's core key and value are pooled from the ring and written to the
group's core slot, in place.

Shape letters as in ``pallas_decode.py``: B batch, Hkv kv heads, G = Hq / Hkv, Gp = G padded to a
power of two, N core slots, R ring slots, D head dim, g group size.

A decode step of one token at position ``t`` completes group ``j = t // g`` when ``t + 1`` is a
multiple of g. The XLA path (``jax_cca.decode._pool_completed_groups``) gathers the group's rows
from the ring and the chunk and pools them at every step, masked by whether a group completed:
about ten small kernels per layer and step. This kernel is one launch of B x Hkv programs; a
program whose sequence completes no group returns at once. It runs after the new token has been
written to the ring, so all g rows of the group are ring slots ``(j g) mod R .. + g - 1``
(contiguous: R is a multiple of g, as ``jax_cca.cache.ring_size`` makes it).

Pooling as ``kernels.cca.reference.pool_core_tokens``, in float32: "cca" weights the group's keys
and values by the softmax over the group of (mean over the G query heads of the new token's
query) . key x scale; "mean" and "max" are the plain reductions. Scores are elementwise products
summed over D (a g x 1 product is too small for a ``pl.dot``). On CPU the kernel runs through the
Pallas interpreter.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from kernels.cca import pallas_decode
from kernels.cca.pallas_common import call, resolve_interpret


def supports(group_size: int, head_dim: int, ring: int) -> bool:
    """Group sizes and head dims the kernel takes: powers of two (Triton tile shapes), and a
    ring of whole groups."""
    pow2 = lambda n: n >= 1 and not n & (n - 1)
    return pow2(group_size) and pow2(head_dim) and ring % group_size == 0


def check_pooling(group_size: int, head_dim: int, ring: int, pooling: str) -> None:
    """Raises ValueError for what the pooling (this kernel, or ``pool_group`` inside
    ``pallas_decode.cca_decode_step``) cannot take."""
    if not supports(group_size, head_dim, ring):
        raise ValueError(f"the decode pooling kernel needs power-of-two group size ({group_size})"
                         f" and head dim ({head_dim}) and a ring of whole groups (R = {ring})")
    if pooling not in ("cca", "mean", "max"):
        raise ValueError(f"pooling must be 'cca', 'mean' or 'max'; got {pooling!r}")


def _kernel(pos_ref, valid_ref, q_ref, ring_k_ref, ring_v_ref, core_k_in, core_v_in,
            core_k_ref, core_v_ref, **static):
    del core_k_in, core_v_in  # aliased to the outputs: only the completed group's row changes
    pool_group(pos_ref[()], valid_ref[()], lambda: q_ref[...], ring_k_ref, ring_v_ref, core_k_ref,
               core_v_ref, **static)


def pool_group(t, valid, query, ring_k_ref, ring_v_ref, core_k_ref, core_v_ref, *, g: int,
               n: int, ring: int, heads: int, scale: float, pooling: str):
    """The body of one (sequence, kv head) program: pools group ``t // g`` from the ring into
    its core row if the token at t (valid) completes it and the slot exists. ``query``: () ->
    the rows (rows, D) of the new token's query for this kv head (its G heads, any zero pad rows),
    called only where "cca" pooling needs it. Also run by the CCA decode attention's pooling
    programs (``pallas_decode.cca_decode_step``, ``pallas_decode_fused``)."""
    j = lax.div(t, g)
    done = (valid > 0) & (lax.rem(t + 1, g) == 0) & (j < n)

    @pl.when(done)
    def _():
        slot = lax.rem(j * g, ring)
        keys = ring_k_ref[pl.ds(slot, g), :].astype(jnp.float32)  # (g, D)
        values = ring_v_ref[pl.ds(slot, g), :].astype(jnp.float32)
        if pooling == "mean":
            k_core, v_core = jnp.sum(keys, axis=0) / g, jnp.sum(values, axis=0) / g
        elif pooling == "max":
            k_core, v_core = jnp.max(keys, axis=0), jnp.max(values, axis=0)
        else:
            q_pool = jnp.sum(query().astype(jnp.float32), axis=0) / heads  # (D,); pad rows 0
            s = jnp.sum(keys * q_pool[None, :], axis=1) * scale  # (g,)
            p = jnp.exp(s - jnp.max(s))
            p = p / jnp.sum(p)
            k_core = jnp.sum(p[:, None] * keys, axis=0)
            v_core = jnp.sum(p[:, None] * values, axis=0)
        core_k_ref[pl.ds(j, 1), :] = k_core[None, :].astype(core_k_ref.dtype)
        core_v_ref[pl.ds(j, 1), :] = v_core[None, :].astype(core_v_ref.dtype)


def pool_decode_step(
    q: Float[Array, "B Hq D"],
    ring_k: Float[Array, "B R Hkv D"],
    ring_v: Float[Array, "B R Hkv D"],
    core_k: Float[Array, "B N Hkv D"],
    core_v: Float[Array, "B N Hkv D"],
    positions: Int[Array, "B"],
    n_valid: Int[Array, "B"],
    *,
    group_size: int,
    pooling: str = "cca",
    softmax_scale: float | None = None,
    interpret: bool | None = None,
) -> tuple[Float[Array, "B N Hkv D"], Float[Array, "B N Hkv D"]]:
    """(core_k, core_v) with the core token of group ``positions[b] // g`` written for every
    sequence b whose new token (at ``positions[b]``, already in the ring, ``n_valid[b] > 0``)
    completes that group and whose slot exists (j < N); every other row unchanged.

    The core arrays are updated in place when the caller donates them (a jitted decode step)."""
    b, hq, d = q.shape
    _, r, hkv, _ = ring_k.shape
    n = core_k.shape[1]
    g = group_size
    check_pooling(g, d, r, pooling)
    if n == 0:
        return core_k, core_v
    grp = hq // hkv
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    # The attention kernel's query tile (the same XLA value: one pad); zero rows add nothing to
    # the mean over the G heads.
    q_tile = pallas_decode.query_tile(q, hkv)
    kernel = functools.partial(_kernel, g=g, n=n, ring=r, heads=grp, scale=scale,
                               pooling=pooling)
    scalar = pl.BlockSpec((None,), lambda bi, h: (bi,))
    rows = lambda m: pl.BlockSpec((None, m, None, d), lambda bi, h: (bi, 0, h, 0))
    heads = pl.BlockSpec((None, None, q_tile.shape[2], d), lambda bi, h: (bi, h, 0, 0))
    return call(
        kernel,
        grid=(b, hkv),
        in_specs=[scalar, scalar, heads, rows(r), rows(r), rows(n), rows(n)],
        out_specs=[rows(n), rows(n)],
        out_shape=[jax.ShapeDtypeStruct(core_k.shape, core_k.dtype),
                   jax.ShapeDtypeStruct(core_v.shape, core_v.dtype)],
        inputs=[positions.astype(jnp.int32), n_valid.astype(jnp.int32), q_tile, ring_k, ring_v,
                core_k, core_v],
        aliases={5: 0, 6: 1},
        num_warps=4,
        num_stages=1,
        interpret=resolve_interpret(interpret),
        name="cca_decode_pool",
    )
