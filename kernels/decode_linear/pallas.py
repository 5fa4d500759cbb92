"""The decode projection as one Pallas GPU kernel (Triton lowering), batch 1.

Why: at batch 1 a LLaMA-2-7B decode step on an H200 spends, per layer, about 104 us in XLA's
four matrix-vector products (qkv, o, gate-up, down; 94 us is their weights over the 4.3 TB/s
read rate) and about 13 us in seven small kernels around them (two RMSNorms of two kernels each,
two residual adds, the SwiGLU product), each a launch of a few kilobytes. Here each projection is
one launch that reads its weight once and does its neighbours' work on the side:

* grid: N / BN programs, program j owning output columns ``j BN .. j BN + BN - 1``; no split
  over K, so the epilogue sees whole sums (XLA splits the narrow products over K and adds the
  partial sums in the next kernel).
* loop over K in blocks of BK: the prologue's input block (RMSNorm: scaled by the row's
  ``rsqrt(mean(x^2) + eps)``, computed by a first pass over x, which every program repeats: x is
  8-44 KB against the program's 0.3-1.4 MB of weights; SwiGLU: ``silu(gate) * up`` of the two
  halves), then a ``pl.dot`` of the block, broadcast to 16 rows of which only the first is
  kept, with the (BK, BN) weight tile: the tensor cores' minimum tile, and Triton pipelines the
  weight loads that feed a dot.
* epilogue: the sum rounded to x's dtype, plus the residual in that dtype.

Rounding follows ``reference.py`` (the model's XLA ops): each bfloat16 operation's result is
rounded to bfloat16, but for the SwiGLU's ``silu`` (XLA's logistic is its own approximation, which
differs between CPU and GPU; the last bit of about a third of the products differs). Float32 operands use IEEE products (no TF32). On CPU the kernel runs through
the Pallas interpreter.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from kernels.cca.pallas_common import call, dot, resolve_interpret
from kernels.decode_linear.reference import PROLOGUES

ROWS = 16  # the dot's row tile: the one real row and 15 zero rows


@dataclasses.dataclass(frozen=True)
class Config:
    """Tile sizes: BN output columns per program, BK rows of the weight per loop step."""

    block_n: int = 32
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 4


def default_config(k: int, n: int) -> Config:
    """Defaults for an H200 (``bench/tune_decode_linear.py``): enough programs to cover the
    SMs several times over with 32 or 64 columns each, the largest BK that divides K."""
    block_n = 64 if n >= 16384 else 32
    block_k = next(b for b in (256, 128, 64, 32, 16) if k % b == 0)
    return Config(block_n=block_n, block_k=block_k)


def supports(x_shape: tuple[int, ...], w_shape: tuple[int, ...], prologue: str | None) -> bool:
    """Shapes the kernel takes: one row, K a multiple of 16, N a multiple of 32."""
    if len(x_shape) != 2 or len(w_shape) != 2 or x_shape[0] != 1:
        return False
    k, n = w_shape
    kx = 2 * k if prologue == "swiglu" else k
    return x_shape[1] == kx and k % 16 == 0 and n % 32 == 0


def _rnd(y, dt):
    """Rounded to ``dt`` and back to float32: one operation of the reference in ``dt``."""
    return y.astype(dt).astype(jnp.float32)


def _kernel(x_ref, w_ref, *refs, k: int, bk: int, prologue: str | None, eps: float,
            residual: bool):
    norm_ref = refs[0] if prologue == "rmsnorm" else None
    res_ref = refs[-2] if residual else None
    o_ref = refs[-1]
    dt = x_ref.dtype
    steps = k // bk
    if prologue == "rmsnorm":
        def squares(i, acc):
            xb = x_ref[pl.ds(i * bk, bk)].astype(jnp.float32)
            return acc + xb * xb

        total = jnp.sum(lax.fori_loop(0, steps, squares, jnp.zeros((bk,), jnp.float32)))
        inv = lax.rsqrt(total / k + eps)

    def body(i, acc):
        cols = pl.ds(i * bk, bk)
        if prologue == "rmsnorm":
            xb = _rnd(x_ref[cols].astype(jnp.float32) * inv, dt)
            xb = _rnd(norm_ref[cols].astype(jnp.float32) * xb, dt)
        elif prologue == "swiglu":
            gate = x_ref[cols].astype(jnp.float32)
            up = x_ref[pl.ds(k + i * bk, bk)].astype(jnp.float32)
            silu = _rnd(gate / (1.0 + jnp.exp(-gate)), dt)
            xb = _rnd(silu * up, dt)
        else:
            xb = x_ref[cols].astype(jnp.float32)
        first = lax.broadcasted_iota(jnp.int32, (ROWS, bk), 0) == 0
        x16 = jnp.where(first, xb[None, :], 0.0).astype(w_ref.dtype)
        return acc + dot(x16, w_ref[cols, :])

    acc = lax.fori_loop(0, steps, body, jnp.zeros((ROWS, o_ref.shape[0]), jnp.float32))
    first = lax.broadcasted_iota(jnp.int32, acc.shape, 0) == 0
    y = _rnd(jnp.sum(jnp.where(first, acc, 0.0), axis=0), dt)
    if residual:
        y = res_ref[...].astype(jnp.float32) + y
    o_ref[...] = y.astype(o_ref.dtype)


def decode_linear(
    x: Float[Array, "1 Kx"],
    w: Float[Array, "K N"],
    *,
    prologue: str | None = None,
    norm_weight: Float[Array, "K"] | None = None,
    eps: float = 1e-5,
    residual: Float[Array, "1 N"] | None = None,
    config: Config | None = None,
    interpret: bool | None = None,
) -> Float[Array, "1 N"]:
    """``prologue(x) @ w`` (+ ``residual``) of one row, in x's dtype; see ``reference.py``."""
    if prologue not in PROLOGUES:
        raise ValueError(f"prologue must be one of {PROLOGUES}; got {prologue!r}")
    k, n = w.shape
    if not supports(x.shape, w.shape, prologue):
        raise ValueError(f"decode_linear takes one row x (1, {'2 x ' if prologue == 'swiglu' else ''}"
                         f"K) and w (K, N) with K % 16 == 0 and N % 32 == 0; got x {x.shape}, "
                         f"w {w.shape}")
    if x.dtype != w.dtype:
        raise ValueError(f"x and w must share a dtype; got {x.dtype} and {w.dtype}")
    if (prologue == "rmsnorm") != (norm_weight is not None):
        raise ValueError("norm_weight is needed by, and only by, prologue='rmsnorm'")
    if norm_weight is not None and norm_weight.shape != (k,):
        raise ValueError(f"norm_weight must be ({k},); got {norm_weight.shape}")
    if residual is not None and residual.shape != (1, n):
        raise ValueError(f"residual must be (1, {n}); got {residual.shape}")
    cfg = config or default_config(k, n)
    if n % cfg.block_n or k % cfg.block_k:
        raise ValueError(f"tiles {cfg} must divide K = {k} and N = {n}")
    kernel = functools.partial(_kernel, k=k, bk=cfg.block_k, prologue=prologue, eps=float(eps),
                               residual=residual is not None)
    row = lambda m: pl.BlockSpec((None, m), lambda j: (0, 0))
    columns = pl.BlockSpec((None, cfg.block_n), lambda j: (0, j))
    in_specs = [row(x.shape[1]), pl.BlockSpec((k, cfg.block_n), lambda j: (0, j))]
    inputs = [x, w]
    if norm_weight is not None:
        in_specs.append(pl.BlockSpec((k,), lambda j: (0,)))
        inputs.append(norm_weight.astype(x.dtype))
    if residual is not None:
        in_specs.append(columns)
        inputs.append(residual.astype(x.dtype))
    return call(
        kernel,
        grid=(n // cfg.block_n,),
        in_specs=in_specs,
        out_specs=[columns],
        out_shape=[jax.ShapeDtypeStruct((1, n), x.dtype)],
        inputs=inputs,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        interpret=resolve_interpret(interpret),
        name=f"decode_linear_{prologue or 'plain'}{'_residual' if residual is not None else ''}",
    )[0]
