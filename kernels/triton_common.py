"""Plumbing shared by the plain Triton kernels (``kernels/*/triton.py``): whether ``triton.jit``
builds interpreted kernels in this process, the interpreter fixes, the float32-accumulated dot
with its three modes, and the output buffers that tests can have poisoned. Imports torch and triton: import it only from those Triton modules."""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from kernels.cca import triton_interpret


def interpret_flag() -> bool:
    """Whether Triton runs kernels through its interpreter (``TRITON_INTERPRET=1``)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# triton.jit builds interpreted kernels iff TRITON_INTERPRET was set when it ran, i.e. when the
# kernel modules (which import this one first) were imported.
INTERPRET = interpret_flag()
if INTERPRET:
    triton_interpret.patch_interpreter()


@triton.jit
def dot(a, b, DOT: tl.constexpr):
    """float32-accumulated matmul. DOT (see :func:`dot_mode`): 0 native 16-bit tensor-core dot,
    1 float32 IEEE (no TF32), 2 16-bit operands upcast to float32 (Triton interpreter only)."""
    if DOT == 1:
        return tl.dot(a, b, input_precision="ieee")
    elif DOT == 2:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


def dot_mode(x: torch.Tensor) -> int:
    """1: float32 inputs, IEEE dots. 0: 16-bit inputs, native dots. 2: 16-bit inputs in the
    interpreter, whose Triton 3.6 dot multiplies bfloat16 bit patterns as integers; upcasting the
    operands is exact (products of 16-bit floats fit float32), accumulation is float32 as on the
    GPU."""
    if x.dtype == torch.float32:
        return 1
    return 2 if INTERPRET else 0


_POISON = [False]


@contextlib.contextmanager
def poison_outputs():
    """Within this context every kernel output buffer starts filled with NaN (integer outputs:
    their most negative value, never a valid index), so a tile a kernel forgot to write fails any
    comparison. For tests."""
    _POISON.append(True)
    try:
        yield
    finally:
        _POISON.pop()


def poisoning() -> bool:
    return _POISON[-1]


def output(shape, dtype, device) -> torch.Tensor:
    """An uninitialised kernel output, or a poisoned one inside :func:`poison_outputs`."""
    if not _POISON[-1]:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min
    return torch.full(shape, fill, dtype=dtype, device=device)
