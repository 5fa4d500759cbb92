"""Public attention ops. One function per op; ``implementation=`` picks the backend.

``implementation=None`` picks the fastest one available on the default device: the Pallas kernels
on GPU once they are installed (``kernels/cca/pallas.py``), the chunked XLA reference elsewhere
(CPU, TPU). Naming a backend that cannot run here raises NotImplementedError: nothing falls back
silently.
"""

from __future__ import annotations

import importlib
from typing import Callable

import jax
import numpy as np
from jaxtyping import Array, Float

from kernels.cca import reference
from kernels.reattention import params as reattention_params

# name -> "module:function"; a backend is available when its module imports.
CCA_IMPLEMENTATIONS: dict[str, str] = {
    "xla": "kernels.cca.reference:cca_attention",
    "pallas": "kernels.cca.pallas:cca_attention",
}


def _load(table: dict[str, str], name: str) -> Callable:
    if name not in table:
        raise ValueError(f"unknown implementation {name!r}; choose from {sorted(table)} or None")
    module_name, fn_name = table[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        raise NotImplementedError(
            f"implementation {name!r} is not available in this installation ({module_name} "
            "does not exist yet)"
        ) from None
    return getattr(module, fn_name)


def available_cca_implementations() -> list[str]:
    names = []
    for name in CCA_IMPLEMENTATIONS:
        try:
            _load(CCA_IMPLEMENTATIONS, name)
        except NotImplementedError:
            continue
        names.append(name)
    return names


def default_cca_implementation() -> str:
    if jax.default_backend() == "gpu" and "pallas" in available_cca_implementations():
        return "pallas"
    return "xla"


def cca_attention(
    q: Float[Array, "B T Hq D"],
    k: Float[Array, "B T Hkv D"],
    v: Float[Array, "B T Hkv D"],
    *,
    group_size: int = 16,
    local_window: int = 1024,
    pooling: str = "cca",
    softmax_scale: float | None = None,
    implementation: str | None = None,
) -> Float[Array, "B T Hq D"]:
    """Core Context Aware attention (arXiv 2412.12465) over rotated q, k, v.

    Query t attends, in one softmax, to the raw keys of its group-aligned local window
    ``[max(0, floor((t - w + 1) / g) * g), t]`` and to the pooled core token of every earlier
    group that ends before that window. GQA: Hq must be a multiple of Hkv; query head h uses kv
    head h // (Hq // Hkv). Any T works; a trailing partial group is only seen raw.
    """
    reference.check_cca_args(q, k, v, group_size, local_window, pooling)
    name = implementation or default_cca_implementation()
    fn = _load(CCA_IMPLEMENTATIONS, name)
    return fn(q, k, v, group_size=group_size, local_window=local_window, pooling=pooling,
              softmax_scale=softmax_scale)


FULL_IMPLEMENTATIONS = ("xla", "cudnn", "chunked")


def full_attention(
    q: Float[Array, "B T Hq D"],
    k: Float[Array, "B T Hkv D"],
    v: Float[Array, "B T Hkv D"],
    *,
    softmax_scale: float | None = None,
    implementation: str | None = None,
) -> Float[Array, "B T Hq D"]:
    """Causal full attention: the baseline CCA replaces.

    "xla" and "cudnn" go through ``jax.nn.dot_product_attention``; "chunked" is the jax.numpy
    reference with memory linear in T. None: cuDNN on GPU for 16-bit inputs, XLA otherwise.
    """
    reference.check_attention_args(q, k, v)
    if implementation is None:
        half = q.dtype.itemsize == 2
        implementation = "cudnn" if jax.default_backend() == "gpu" and half else "xla"
    if implementation == "chunked":
        return reference.full_attention(q, k, v, softmax_scale=softmax_scale)
    if implementation not in FULL_IMPLEMENTATIONS:
        raise ValueError(
            f"unknown implementation {implementation!r}; choose from {FULL_IMPLEMENTATIONS}"
        )
    return jax.nn.dot_product_attention(
        q, k, v, scale=softmax_scale, is_causal=True, implementation=implementation
    )


# ----------------------------------------------------------------------------- ReAttention
# name -> module with ``reattention`` and ``reattention_decode`` (kernels/reattention/).
REATTENTION_IMPLEMENTATIONS: dict[str, str] = {
    "xla": "kernels.reattention.reference",
    "pallas": "kernels.reattention.pallas",
}


def _reattention_fn(name: str | None, fn_name: str = "reattention") -> Callable:
    name = name or default_reattention_implementation()
    table = {key: f"{module}:{fn_name}" for key, module in REATTENTION_IMPLEMENTATIONS.items()}
    return _load(table, name)


def available_reattention_implementations() -> list[str]:
    names = []
    for name in REATTENTION_IMPLEMENTATIONS:
        try:
            _reattention_fn(name)
        except NotImplementedError:
            continue
        names.append(name)
    return names


def default_reattention_implementation() -> str:
    if jax.default_backend() == "gpu" and "pallas" in available_reattention_implementations():
        return "pallas"
    return "xla"


def _position_arg(x) -> reattention_params.PositionArg:
    """A position argument (int or array) described for ``reattention_params``' checks; its
    values only when they are concrete (inside jit they are traced: shape and dtype only)."""
    if isinstance(x, jax.core.Tracer):
        return reattention_params.PositionArg(tuple(x.shape), str(x.dtype),
                                              bool(np.issubdtype(x.dtype, np.integer)), None)
    return reattention_params.PositionArg.on_host(x)


def _reattention_kwargs(sink_tokens, local_window, top_k, max_selected, span, chunk_size,
                        middle_align, key_block) -> dict:
    from kernels.reattention.params import Selection

    sel = Selection(sink_tokens, local_window, top_k, max_selected, span, chunk_size, middle_align,
                    key_block)
    return dict(sink_tokens=sel.sink_tokens, local_window=sel.local_window, top_k=sel.top_k,
                max_selected=sel.max_selected, span=sel.span, chunk_size=sel.chunk_size,
                middle_align=sel.middle_align, key_block=sel.key_block)


def reattention(
    q: Float[Array, "B T Hq D"],
    k: Float[Array, "B S Hkv D"],
    v: Float[Array, "B S Hkv D"],
    *,
    sink_tokens: int = 32,
    local_window: int = 8192,
    top_k: int = 4,
    max_selected: int = 256,
    span: int = 32,
    chunk_size: int = 512,
    middle_align: int = 128,
    key_block: int = 1,
    q_start=None,
    rope_theta: float = 10000.0,
    inv_freq=None,
    softmax_scale: float | None = None,
    implementation: str | None = None,
    q_lengths=None,
    block_summaries: Float[Array, "B S2 Hkv D2"] | None = None,
) -> Float[Array, "B T Hq D"]:
    """ReAttention (arXiv 2407.15176) over UN-rotated q and the un-rotated k, v cache.

    q (B, T, Hq, D) are the queries of positions q_start .. q_start + T - 1 (default S - T: a
    prefill, or its continuation), k, v (B, S, Hkv, D) the keys and values of positions 0 .. S-1
    (those past the last query are ignored). Queries run in chunks of ``chunk_size`` sharing one
    selection: each (query, head) picks its ``top_k`` keys of the middle region by raw q . k, the
    ``max_selected`` most-voted picks of a kv head each bring ``span`` neighbours, and the chunk
    attends causally to [``sink_tokens`` first keys ; picks ; local window of ``local_window``
    (+ up to ``middle_align`` - 1) keys ; itself] re-numbered 0 .. n-1 with RoPE applied at those
    positions (``rope_theta`` or explicit ``inv_freq`` (D/2,)). GQA: query head h uses kv head
    h // (Hq // Hkv). Forward only. "pallas" needs a power-of-two head dim >= 32.

    ``key_block`` b > 1 picks whole aligned blocks of b middle keys instead of tokens, ranked by
    a Quest-style upper bound of q . k over the block (from its per-dim key maxima and minima);
    ``span`` must equal b and b must divide ``middle_align``. 1 (the default): token picks.
    ``block_summaries``: those blocks' summaries of ``k`` when the caller keeps them (as
    :func:`reattention_decode`'s; ``jax_cca.cache.ReAttentionCache``), else computed here.

    ``q_lengths`` (B,) ints in [0, T] (optional): element b has q_lengths[b] real queries, the
    rest of its T rows is right padding, which gets outputs but does not vote in the selection
    (so each element selects what its unpadded sequence would). Default: every query is real.
    ``q_start`` (a scalar or (B,) ints): every real query needs its own key in the cache, so
    0 <= q_start and q_start + (q_lengths or T) <= S (padding rows may run past it). Wrong
    shapes or dtypes raise ValueError; so do out-of-range values when they are concrete (under
    jit they are traced and not read).
    """
    from kernels.reattention import reference as reattention_reference

    reattention_reference.check_args(q, k, v)
    reattention_params.check_positions(
        q.shape[0], q.shape[1], k.shape[1],
        q_start=None if q_start is None else _position_arg(q_start),
        q_lengths=None if q_lengths is None else _position_arg(q_lengths))
    kw = _reattention_kwargs(sink_tokens, local_window, top_k, max_selected, span, chunk_size,
                             middle_align, key_block)
    if q_lengths is not None:
        kw["q_lengths"] = q_lengths
    if block_summaries is not None:
        kw["block_summaries"] = block_summaries
    return _reattention_fn(implementation)(
        q, k, v, q_start=q_start, rope_theta=rope_theta, inv_freq=inv_freq,
        softmax_scale=softmax_scale, **kw)


def reattention_decode(
    q: Float[Array, "B Hq D"],
    k_cache: Float[Array, "B L Hkv D"],
    v_cache: Float[Array, "B L Hkv D"],
    lengths,
    *,
    sink_tokens: int = 32,
    local_window: int = 8192,
    top_k: int = 4,
    max_selected: int = 256,
    span: int = 32,
    middle_align: int = 128,
    key_block: int = 1,
    rope_theta: float = 10000.0,
    inv_freq=None,
    softmax_scale: float | None = None,
    implementation: str | None = None,
    block_summaries: Float[Array, "B S2 Hkv D2"] | None = None,
) -> Float[Array, "B Hq D"]:
    """One ReAttention decode step: q (B, Hq, D) is the un-rotated query of position
    lengths - 1, whose key and value are already in the caches; slots from ``lengths`` (B,) on
    are ignored. Equals the last row of ``reattention`` run with ``chunk_size=1``. ``lengths``:
    a scalar or (B,) ints in [1, L] (checked as ``q_start`` in ``reattention``). ``key_block``
    as in ``reattention``; with block picks, ``block_summaries`` may give the blocks' summaries
    of ``k_cache`` (``kernels.reattention.key_blocks.summaries``, which ``jax_cca.cache.
    ReAttentionCache`` keeps up to date), so that the step does not recompute them from every
    key. Their shape and dtype are checked, their values are the caller's."""
    from kernels.reattention import reference as reattention_reference

    reattention_reference.check_args(q[:, None], k_cache, v_cache)
    reattention_params.check_lengths(q.shape[0], k_cache.shape[1], _position_arg(lengths))
    kw = _reattention_kwargs(sink_tokens, local_window, top_k, max_selected, span, 1,
                             middle_align, key_block)
    kw.pop("chunk_size")
    return _reattention_fn(implementation, "reattention_decode")(
        q, k_cache, v_cache, lengths, rope_theta=rope_theta, inv_freq=inv_freq,
        softmax_scale=softmax_scale, block_summaries=block_summaries, **kw)
