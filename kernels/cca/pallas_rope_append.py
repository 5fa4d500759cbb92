"""The front of a decode step as one Pallas GPU kernel (Triton lowering): rotary embedding of the
new token's query and key, and the key and value written to the layer's cache, in place.

Shape letters as in ``pallas_decode.py``: B batch, Hq query heads, Hkv kv heads, D head dim, S
rows of the cache buffer (full attention: every position; CCA: the ring).

As XLA ops (``jax_cca.rope.apply_rope`` and ``jax_cca.cache`` ``append``) this is about eight
kernels per layer and step on an H200 (RoPE of q, RoPE of k twice, the v slice, the ring's
write predicate, two dynamic-update-slices and a select), 15-17 us of a 175 us layer at 128K,
where each of them moves a few kilobytes: XLA fuses the cos/sin of the large rotation angles into
every consumer. Here it is one launch of B x (Hq + Hkv) programs that takes cos and sin computed
once per step: program i < Hq rotates query head i; program Hq + h rotates key head h, copies
value head h, and writes both to row ``slot(t)`` of the buffers.

The input is the projection's output as one (B, Hq + 2 Hkv, D) array (q heads, then k, then v,
the fused QKV layout), so no slice of it is copied before the kernel reads it. Arithmetic as
``apply_rope``: ``x * cos + rotate_half(x) * sin`` with cos, sin cast to x's dtype and each
product and the sum rounded to x's dtype. On CPU the kernel runs through the Pallas interpreter.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from kernels.cca.pallas_common import call, resolve_interpret


def supports(head_dim: int) -> bool:
    """Head dims the kernel takes: even powers of two (each half of D is a Triton tile)."""
    return head_dim >= 2 and not head_dim & (head_dim - 1)


def _rotate(x_ref, cos_ref, sin_ref, half: int):
    """The two halves of ``x * cos + rotate_half(x) * sin`` in x's dtype (apply_rope's rounding:
    each product and the sum rounded to that dtype)."""
    dt = x_ref.dtype
    lo, hi = pl.ds(0, half), pl.ds(half, half)
    x1, x2 = x_ref[lo].astype(jnp.float32), x_ref[hi].astype(jnp.float32)
    c1, c2 = (cos_ref[s].astype(dt).astype(jnp.float32) for s in (lo, hi))
    s1, s2 = (sin_ref[s].astype(dt).astype(jnp.float32) for s in (lo, hi))
    rnd = lambda y: y.astype(dt).astype(jnp.float32)
    out1 = rnd(x1 * c1) + rnd(-x2 * s1)
    out2 = rnd(x2 * c2) + rnd(x1 * s2)
    return out1.astype(dt), out2.astype(dt)


def _kernel(pos_ref, valid_ref, cos_ref, sin_ref, x_ref, v_ref, k_buf_in, v_buf_in, *refs,
            hq: int, half: int, modulus: int, limit: int):
    # refs: [old lengths (aliased to len_out, never read)], q_out, k_out, v_out, k_buf, v_buf,
    # len_out; k_buf_in, v_buf_in are aliased to k_buf, v_buf: only row slot(t) changes
    del k_buf_in, v_buf_in
    q_out, k_out, v_out, k_buf, v_buf, len_out = refs[-6:]
    i = pl.program_id(1)
    pos, valid = pos_ref[()], valid_ref[()]
    len_out[()] = pos + valid  # every program of the row writes the same value
    out1, out2 = _rotate(x_ref, cos_ref, sin_ref, half)
    lo, hi = pl.ds(0, half), pl.ds(half, half)

    @pl.when(i < hq)
    def _():
        q_out[lo] = out1
        q_out[hi] = out2

    @pl.when(i >= hq)
    def _():
        k_out[lo] = out1
        k_out[hi] = out2
        value = v_ref[...]
        v_out[...] = value

        @pl.when((valid > 0) & (pos < limit))
        def _():
            row = pl.ds(jax.lax.rem(pos, modulus), 1)
            k_buf[row, lo] = out1[None, :].astype(k_buf.dtype)
            k_buf[row, hi] = out2[None, :].astype(k_buf.dtype)
            v_buf[row, :] = value[None, :].astype(v_buf.dtype)


def check_projections(qkv, cos, sin, num_heads: int, kv_heads: int) -> None:
    """Raises ValueError unless qkv is (B, Hq + 2 Hkv, D) and cos, sin are (B, D)."""
    b, h3, d = qkv.shape
    if h3 != num_heads + 2 * kv_heads:
        raise ValueError(f"qkv has {h3} heads; expected num_heads + 2 x kv heads = "
                         f"{num_heads} + 2 x {kv_heads}")
    if cos.shape != (b, d) or sin.shape != (b, d):
        raise ValueError(f"cos and sin must be (batch, head_dim) = {(b, d)}; got {cos.shape} "
                         f"and {sin.shape}")


def rope_append(
    qkv: Float[Array, "B H3 D"],
    cos: Float[Array, "B D"],
    sin: Float[Array, "B D"],
    k_buf: Float[Array, "B S Hkv D"],
    v_buf: Float[Array, "B S Hkv D"],
    positions: Int[Array, "B"],
    n_valid: Int[Array, "B"],
    lengths: Int[Array, "B"] | None = None,
    *,
    num_heads: int,
    modulus: int | None = None,
    limit: int | None = None,
    interpret: bool | None = None,
) -> tuple[Float[Array, "B Hq D"], Float[Array, "B Hkv D"], Float[Array, "B Hkv D"],
           Float[Array, "B S Hkv D"], Float[Array, "B S Hkv D"], Int[Array, "B"]]:
    """(q, k, v, k_buf, v_buf, lengths) of one new token per sequence at ``positions``: q and k
    rotated; where ``n_valid[b] > 0`` and ``positions[b] < limit`` (default limit: S, the
    buffer's rows) the rotated key and the value stored in row ``positions[b] % modulus`` of the
    buffers (default modulus: S), every other row unchanged; and the cache's new lengths,
    positions + n_valid, written over ``lengths`` (the layer's old lengths, never read; None: a
    new array). In a decode step this replaces two one-thread XLA kernels per layer (the write
    predicate and the lengths' sum).

    ``qkv``: the un-rotated projections, query heads first, then ``Hkv`` key and ``Hkv`` value
    heads. ``cos``, ``sin``: ``jax_cca.rope.rope_cos_sin`` at ``positions`` (float32). The
    buffers and ``lengths`` are updated in place when the caller donates them (a jitted decode
    step); ``positions`` must then be another array than ``lengths`` (e.g. the step's positions,
    not the layer's own lengths), or XLA copies ``lengths`` first. With ``lengths`` None the new
    lengths are a new output (nothing to alias)."""
    b, _, d = qkv.shape
    _, s, hkv, _ = k_buf.shape
    hq = num_heads
    modulus = s if modulus is None else modulus
    limit = s if limit is None else limit
    if not supports(d):
        raise ValueError(f"the RoPE + append kernel needs an even power-of-two head dim; got {d}")
    check_projections(qkv, cos, sin, hq, hkv)
    if v_buf.shape != k_buf.shape or k_buf.shape[0] != b or k_buf.shape[3] != d:
        raise ValueError(f"buffers must both be (batch, rows, kv heads, head_dim) with batch {b} "
                         f"and head_dim {d}; got {k_buf.shape} and {v_buf.shape}")
    if not 0 < modulus <= s:
        raise ValueError(f"modulus must be in [1, {s}] (the buffer's rows); got {modulus}")
    old = [] if lengths is None else [lengths.astype(jnp.int32)]
    if positions.shape != (b,) or n_valid.shape != (b,) or any(x.shape != (b,) for x in old):
        raise ValueError(f"positions, n_valid and lengths must be ({b},); got {positions.shape}, "
                         f"{n_valid.shape} and {None if lengths is None else lengths.shape}")
    kernel = functools.partial(_kernel, hq=hq, half=d // 2, modulus=modulus, limit=limit)
    kv_head = lambda i: jnp.maximum(i - hq, 0)
    scalar = pl.BlockSpec((None,), lambda bi, i: (bi,))
    vector = pl.BlockSpec((None, d), lambda bi, i: (bi, 0))
    head = lambda index: pl.BlockSpec((None, None, d), index)
    buffer = pl.BlockSpec((None, s, None, d), lambda bi, i: (bi, 0, kv_head(i), 0))
    return call(
        kernel,
        grid=(b, hq + hkv),
        in_specs=[scalar, scalar, vector, vector,
                  head(lambda bi, i: (bi, i, 0)),  # q head i or k head i - Hq
                  head(lambda bi, i: (bi, i + hkv, 0)),  # v head i - Hq (unused for i < Hq)
                  buffer, buffer] + [scalar] * len(old),
        out_specs=[head(lambda bi, i: (bi, jnp.minimum(i, hq - 1), 0)),
                   head(lambda bi, i: (bi, kv_head(i), 0)),
                   head(lambda bi, i: (bi, kv_head(i), 0)),
                   buffer, buffer, scalar],
        out_shape=[jax.ShapeDtypeStruct((b, hq, d), qkv.dtype),
                   jax.ShapeDtypeStruct((b, hkv, d), qkv.dtype),
                   jax.ShapeDtypeStruct((b, hkv, d), qkv.dtype),
                   jax.ShapeDtypeStruct(k_buf.shape, k_buf.dtype),
                   jax.ShapeDtypeStruct(v_buf.shape, v_buf.dtype),
                   jax.ShapeDtypeStruct((b,), jnp.int32)],
        inputs=[positions.astype(jnp.int32), n_valid.astype(jnp.int32), cos.astype(jnp.float32),
                sin.astype(jnp.float32), qkv, qkv, k_buf, v_buf, *old],
        aliases={6: 3, 7: 4, **({8: 5} if old else {})},
        num_warps=1,
        num_stages=1,
        interpret=resolve_interpret(interpret),
        name="rope_append",
    )
