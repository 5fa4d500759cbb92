"""``torch_bridge.cca_attention``: CCA attention on PyTorch tensors, the twin of
``jax_cca.ops.cca_attention`` (same signature, same function, forward and gradient).

Two implementations:

* ``"triton"``: the plain Triton kernels of ``kernels/cca/triton.py`` (torch autograd Function).
  On CUDA tensors they are compiled; on CPU tensors they run through the Triton interpreter only
  when ``TRITON_INTERPRET=1`` was set before ``kernels.cca.triton`` was imported, and otherwise
  raise a RuntimeError saying so.
* ``"reference"``: the float32 torch reference (``kernels/cca/reference_torch.py``), chunked over
  queries, plain autograd.

``implementation=None`` picks ``"triton"`` for CUDA tensors when the triton package is installed
and ``"reference"`` otherwise (CPU tensors, or no triton). Nothing falls back silently: a named
implementation that cannot run raises. Every ``pooling`` ("cca", "mean", "max") runs on both;
with Triton, "cca" pools with a Triton kernel and "mean"/"max" pool with torch ops before the
same Triton attention kernels.
"""

from __future__ import annotations

import importlib.util

IMPLEMENTATIONS = ("triton", "reference")


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def default_implementation(q) -> str:
    return "triton" if q.is_cuda and triton_installed() else "reference"


def cca_attention(q, k, v, *, group_size: int = 16, local_window: int = 1024,
                  pooling: str = "cca", softmax_scale: float | None = None,
                  implementation: str | None = None):
    """Core Context Aware attention (arXiv 2412.12465) over rotated torch tensors.

    q (B, T, Hq, D), k and v (B, T, Hkv, D) -> (B, T, Hq, D) in q's dtype. Query t attends, in one
    softmax, to the raw keys of its group-aligned local window ``[max(0, floor((t - w + 1) / g) *
    g), t]`` and to the pooled core token of every earlier group that ends before that window.
    GQA: query head h uses kv head h // (Hq // Hkv). Any T works; a trailing partial group is only
    seen raw. ``implementation``: None, "triton" or "reference" (see the module docstring).
    """
    from kernels.cca import reference_torch

    reference_torch.check_cca_args(q, k, v, group_size, local_window, pooling)
    name = default_implementation(q) if implementation is None else implementation
    kw = dict(group_size=group_size, local_window=local_window, pooling=pooling,
              softmax_scale=softmax_scale)
    if name == "reference":
        return reference_torch.cca_attention(q, k, v, **kw)
    if name == "triton":
        if not triton_installed():
            raise NotImplementedError(
                "implementation='triton' needs the triton package (pip install 'jax-cca[torch]' "
                "on Linux); implementation='reference' runs anywhere")
        from kernels.cca import triton as cca_triton

        return cca_triton.cca_attention(q, k, v, **kw)
    raise ValueError(f"unknown implementation {name!r}; choose from {IMPLEMENTATIONS} or None")
