"""Residual add + RMSNorm as a plain Triton kernel for PyTorch tensors: the twin of
``pallas.py``, with the arithmetic of ``reference.add_rms_norm`` (the sum rounded to its dtype,
float32 statistics, the normalised row rounded to that dtype before the weight multiplies it).

Written separately from the Pallas kernel and checked against it (tests/parity): any hidden size
(the row is loaded with a mask up to the next power of two), the residual optional. On CPU the
kernel runs through the Triton interpreter, which must be switched on (``TRITON_INTERPRET=1``)
before this module is imported.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.cca.triton import check_runnable
from kernels.triton_common import INTERPRET  # noqa: F401  (whether the kernel is interpreted)
from kernels.triton_common import output as _output
from kernels.triton_common import poison_outputs  # noqa: F401  (public here too)


@triton.jit
def _kernel(X, R, W, S, Y, e, eps, ADD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < e
    x = tl.load(X + row * e + cols, mask=ok, other=0.0)
    if ADD:
        r = tl.load(R + row * e + cols, mask=ok, other=0.0)
        s = (x.to(tl.float32) + r.to(tl.float32)).to(S.dtype.element_ty)
        tl.store(S + row * e + cols, s, mask=ok)
    else:
        s = x
    sf = s.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(sf * sf, axis=0) / e + eps)
    normed = (sf * inv).to(s.dtype).to(tl.float32)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + row * e + cols, (w * normed).to(Y.dtype.element_ty), mask=ok)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, *,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, weight * norm(s))`` with ``s = x + residual`` (``s = x`` when residual is None)."""
    e = x.shape[-1]
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} must have x's shape {tuple(x.shape)}")
    if tuple(weight.shape) != (e,):
        raise ValueError(f"weight must be ({e},); got {tuple(weight.shape)}")
    if not all(t.dtype.is_floating_point for t in (x, weight) + (() if residual is None
                                                                 else (residual,))):
        raise ValueError("x, residual and weight must be floating point")
    check_runnable(x)
    add = residual is not None
    sum_dtype = torch.promote_types(x.dtype, residual.dtype) if add else x.dtype
    rows = x.reshape(-1, e).contiguous()
    s = _output(rows.shape, sum_dtype, x.device) if add else rows
    y = _output(rows.shape, torch.promote_types(weight.dtype, sum_dtype), x.device)
    r = residual.reshape(-1, e).contiguous() if add else rows
    _kernel[(rows.shape[0],)](rows, r, weight.contiguous(), s, y, e, float(eps), ADD=add,
                              BLOCK=triton.next_power_of_2(e), num_warps=4)
    return (s.reshape(x.shape) if add else x), y.reshape(x.shape)
