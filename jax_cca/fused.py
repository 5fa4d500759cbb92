"""The serving layout: q, k, v as one matrix and gate, up as one (``config.fused_projections``).

A decode step reads every weight once; with separate matrices XLA runs five small GEMMs (and
split-K reductions) where two larger ones do the same work. On an H200, 32 LLaMA-2-7B layers of
projections at batch 1 took 3.60 ms fused against 3.90 ms separate
(``bench/ab_fused_projections.py``). The function is the same: the fused kernel is the
column-wise concatenation ``[q | k | v]`` (``[gate | up]``) of the (in, out) kernels, biases
likewise, and its output is split back in the same order.

``fuse`` / ``unfuse`` convert a flat parameter state (``nnx.to_flat_state``: path -> array)
between the layouts; ``CCALlama.with_attention(fused_projections=...)`` uses them, and the
Hugging Face export unfuses first.
"""

from __future__ import annotations

import jax.numpy as jnp

QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")
FUSED = {"qkv_proj": QKV, "gate_up_proj": GATE_UP}


def split_sizes(config) -> dict[str, tuple[int, ...]]:
    """Output features of each part of the fused matrices, in order."""
    d = config.head_dim
    return {"qkv_proj": (config.num_heads * d, config.num_kv_heads * d, config.num_kv_heads * d),
            "gate_up_proj": (config.intermediate_size, config.intermediate_size)}


def split_output(y, sizes: tuple[int, ...]):
    """The parts of a fused projection's output (last axis), in order."""
    cuts, total = [], 0
    for n in sizes[:-1]:
        total += n
        cuts.append(total)
    return jnp.split(y, cuts, axis=-1)


def fuse(flat: dict[tuple, object], config) -> dict[tuple, object]:
    """Separate layout -> fused: every (..., q_proj | k_proj | v_proj, leaf) triple becomes
    (..., qkv_proj, leaf), gate/up likewise. Kernels are (in, out): parts join on the last axis."""
    out = dict(flat)
    for fused_name, parts in FUSED.items():
        for path in [p for p in flat if len(p) >= 2 and p[-2] == parts[0]]:
            prefix, leaf = path[:-2], path[-1]
            arrays = [out.pop(prefix + (name, leaf)) for name in parts]
            out[prefix + (fused_name, leaf)] = jnp.concatenate(arrays, axis=-1)
    return out


def unfuse(flat: dict[tuple, object], config) -> dict[tuple, object]:
    """Fused layout -> separate (the inverse of :func:`fuse`)."""
    sizes = split_sizes(config)
    out = dict(flat)
    for fused_name, parts in FUSED.items():
        for path in [p for p in flat if len(p) >= 2 and p[-2] == fused_name]:
            prefix, leaf = path[:-2], path[-1]
            pieces = split_output(out.pop(path), sizes[fused_name])
            for name, piece in zip(parts, pieces):
                out[prefix + (name, leaf)] = piece
    return out
