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
from jaxtyping import Array, Float

from kernels.cca import reference

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
