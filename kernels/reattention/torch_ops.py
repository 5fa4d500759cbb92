"""The torch-side ReAttention op: ``reattention`` / ``reattention_decode`` on torch tensors with
``implementation=`` "torch" (the float32 reference, ``reference_torch.py``) or "triton" (the plain
Triton kernels, ``triton.py``); the twin of ``jax_cca.ops.reattention``.

``implementation=None`` picks "triton" for CUDA tensors when triton is installed and "torch"
otherwise. Nothing falls back silently: a named implementation that cannot run raises (Triton on
CPU tensors runs only through the interpreter, switched on with ``TRITON_INTERPRET=1`` before
``kernels.reattention.triton`` is first imported).
"""

from __future__ import annotations

import importlib.util

IMPLEMENTATIONS = ("torch", "triton")


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def default_implementation(q) -> str:
    return "triton" if q.is_cuda and triton_installed() else "torch"


def _module(q, implementation: str | None):
    name = default_implementation(q) if implementation is None else implementation
    if name == "torch":
        from kernels.reattention import reference_torch

        return reference_torch
    if name == "triton":
        if not triton_installed():
            raise NotImplementedError("implementation='triton' needs the triton package; "
                                      "implementation='torch' runs anywhere")
        from kernels.reattention import triton as reattention_triton

        return reattention_triton
    raise ValueError(f"unknown implementation {name!r}; choose from {IMPLEMENTATIONS} or None")


def _position_arg(x):
    """A position argument (int, array or tensor) described for ``params``' checks; the values
    of a tensor only when it is on the CPU (reading a CUDA tensor would wait for the GPU)."""
    import torch

    from kernels.reattention.params import PositionArg

    if torch.is_tensor(x):
        is_int = not (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool)
        values = x.reshape(-1).tolist() if x.device.type == "cpu" else None
        return PositionArg(tuple(x.shape), str(x.dtype), is_int, values)
    return PositionArg.on_host(x)


def reattention(q, k, v, *, sink_tokens: int = 32, local_window: int = 8192, top_k: int = 4,
                max_selected: int = 256, span: int = 32, chunk_size: int = 512,
                middle_align: int = 128, key_block: int = 1, q_start=None,
                rope_theta: float = 10000.0, inv_freq=None, softmax_scale: float | None = None,
                implementation: str | None = None, q_lengths=None):
    """ReAttention over un-rotated q (B, T, Hq, D) (the last T positions of the cache, or from
    ``q_start``) and k, v (B, S, Hkv, D) -> (B, T, Hq, D) in q's dtype. Parameters as in
    ``jax_cca.ops.reattention`` (``q_lengths``: real queries per element, the rest is right
    padding that does not vote)."""
    from kernels.reattention import params, reference_torch

    reference_torch.check_args(q, k, v)
    params.Selection(sink_tokens, local_window, top_k, max_selected, span, chunk_size,
                     middle_align, key_block)
    params.check_positions(q.shape[0], q.shape[1], k.shape[1],
                           q_start=None if q_start is None else _position_arg(q_start),
                           q_lengths=None if q_lengths is None else _position_arg(q_lengths))
    return _module(q, implementation).reattention(
        q, k, v, sink_tokens=sink_tokens, local_window=local_window, top_k=top_k,
        max_selected=max_selected, span=span, chunk_size=chunk_size, middle_align=middle_align,
        key_block=key_block, q_start=q_start, rope_theta=rope_theta, inv_freq=inv_freq,
        softmax_scale=softmax_scale, q_lengths=q_lengths)


def reattention_decode(q, k_cache, v_cache, lengths, *, implementation: str | None = None,
                       **kwargs):
    """One decode step: q (B, Hq, D) at position lengths - 1 over the caches (B, L, Hkv, D)."""
    from kernels.reattention import params, reference_torch

    reference_torch.check_args(q[:, None], k_cache, v_cache)
    params.check_lengths(q.shape[0], k_cache.shape[1], _position_arg(lengths))
    return _module(q, implementation).reattention_decode(q, k_cache, v_cache, lengths, **kwargs)
