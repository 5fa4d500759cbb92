"""Pieces shared by the CCA Pallas forward (pallas.py) and backward (pallas_vjp.py) kernels:
exact in-kernel window arithmetic, padding and the pallas_call wrapper (tiles: tiles.py)."""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels.cca.tiles import Config, default_config  # noqa: F401  (re-exported)

LOG2E = math.log2(math.e)
NEG = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite "minus infinity" for masked scores


def window_start(t, g: int, w: int):
    """max(0, floor((t - w + 1) / g) * g) using only non-negative integer division, which is
    exact whether the lowering truncates or floors (Triton's // truncates toward zero)."""
    return lax.div(jnp.maximum(t - (w - 1), 0), g) * g


def heavy_first(i):
    """Query tiles run last-first: later queries see more core tokens, so the longest programs
    start first and the grid's tail is short. Use in the kernel and in its BlockSpec maps."""
    return pl.num_programs(0) - 1 - i


def cdiv(a, b: int):
    return lax.div(a + (b - 1), b)


def dot(a, b, *, trans_a=False, trans_b=False):
    """Matmul in float32 accumulation; float32 operands stay IEEE (no TF32)."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return pltriton.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision)


def fast_exp2(x):
    """2 ** x of a float32 array in a Triton-lowered kernel as one ``ex2.approx.ftz.f32``, the
    instruction Triton's own ``tl.math.exp2`` emits. Pallas lowers ``jnp.exp2`` to libdevice's
    ``__nv_exp2f``, which wraps that instruction in a fix-up for subnormal results (a compare and
    two predicated multiplies per element). Results below 2 ** -126 flush to 0; softmax weights
    that small (relative to the row maximum) vanish in the float32 sums either way. On the H100 the
    CCA forward ran 4-8% faster with it, with the same outputs to the bit (docs/perf-notes.md).
    Not for the interpreter: use :func:`exp2_for`."""
    [y] = pltriton.elementwise_inline_asm(
        "ex2.approx.ftz.f32 $0, $1;", args=[x], constraints="=f,f", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])
    return y


def exp2_for(interpret: bool):
    """The kernels' exp2: :func:`fast_exp2` when lowered for the GPU, ``jnp.exp2`` interpreted."""
    return jnp.exp2 if interpret else fast_exp2


def online_softmax_update(carry, s, values, scale2: float, mask, exp2=jnp.exp2):
    """One key tile of a base-2 online softmax, given the tile's unscaled scores ``s`` (BQ, BK):
    carry (acc (BQ, D), row max m, row sum l) float32; ``mask`` None means every key is visible;
    ``exp2``: :func:`exp2_for` the kernel's mode.

    The scale is applied inside the exponent (one fused multiply-add per score) and to the row
    maximum, instead of scaling the whole score tile first."""
    acc, m, l = carry
    if mask is not None:
        s = jnp.where(mask, s, NEG)
    m_new = jnp.maximum(m, jnp.max(s, axis=1) * scale2)
    p = exp2(s * scale2 - m_new[:, None])
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    alpha = exp2(m - m_new)
    acc = acc * alpha[:, None] + dot(p.astype(values.dtype), values)
    return acc, m_new, l * alpha + jnp.sum(p, axis=1)


def merge_split_partials(carry, o_ref, lse_ref, start: int, stop: int, unroll: int, exp2,
                         rows: int | None = None):
    """Folds partial softmaxes ``start`` .. ``stop`` - 1 of a split-K decode (each a normalised
    output ``o_ref[p]`` (R, D) and its base-2 log-sum-exp ``lse_ref[p]`` (R,), float32) into the
    running (max, sum, acc); only their first ``rows`` rows when given. Unrolled up to
    ``unroll`` partials, so that their loads are in flight together; a loop past that."""
    sl = slice(None) if rows is None else pl.ds(0, rows)

    def merge(p, carry):
        m, l, acc = carry
        lse = lse_ref[p, sl]
        m_new = jnp.maximum(m, lse)
        a, w = exp2(m - m_new), exp2(lse - m_new)
        return m_new, l * a + w, acc * a[:, None] + o_ref[p, sl, :] * w[:, None]

    if stop - start <= unroll:
        for p in range(start, stop):
            carry = merge(p, carry)
        return carry
    return lax.fori_loop(start, stop, merge, carry)


def pad_to(x, axis: int, multiple: int):
    size = x.shape[axis]
    padded = -(-max(size, 1) // multiple) * multiple
    if padded == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, padded - size)
    return jnp.pad(x, widths)


_POISON = [False]


@contextlib.contextmanager
def poison_outputs():
    """Within this context every kernel output buffer starts filled with NaN (integer outputs:
    their most negative value), so a tile the kernel forgot to write fails any comparison. For
    tests."""
    _POISON.append(True)
    try:
        yield
    finally:
        _POISON.pop()


def _poison_value(dtype):
    """NaN for float outputs; the most negative value for integer ones (never a valid index)."""
    dtype = jnp.dtype(dtype)
    return jnp.iinfo(dtype).min if jnp.issubdtype(dtype, jnp.integer) else jnp.nan


def call(kernel, *, grid, in_specs, out_specs, out_shape, inputs, num_warps, num_stages,
         interpret: bool, name: str, aliases: dict[int, int] | None = None):
    """pallas_call with the Triton compiler params (SPEC.md 5) and optional NaN-poisoned outputs.

    ``aliases`` maps input index -> output index for outputs updated in place (read-modify-write);
    those are never poisoned. Every other output starts as NaN inside ``poison_outputs()``.
    """
    out_shape, out_specs = list(out_shape), list(out_specs)
    inputs, in_specs = list(inputs), list(in_specs)
    aliases = dict(aliases or {})
    n_in = len(inputs)
    if _POISON[-1]:
        for i, (shape, spec) in enumerate(zip(out_shape, out_specs)):
            if i in aliases.values():
                continue
            aliases[len(inputs)] = i
            inputs.append(jnp.full(shape.shape, _poison_value(shape.dtype), shape.dtype))
            in_specs.append(spec)
        inner, n_all = kernel, len(inputs)

        def kernel(*refs):  # drop the aliased poison inputs from the kernel's view
            return inner(*refs[:n_in], *refs[n_all:])

    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=name,
    )(*inputs)


def resolve_interpret(interpret: bool | None) -> bool:
    return jax.default_backend() != "gpu" if interpret is None else interpret
