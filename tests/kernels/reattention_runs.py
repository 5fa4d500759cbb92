"""Jitted ReAttention runs shared by the kernel and parity suites. One compiled function per
(implementation, selection, tiles), so suites that run the same shapes in one
process compile once. Kernel outputs are NaN-poisoned (the poison is baked in at trace time, so
these functions are only ever traced poisoned)."""

from __future__ import annotations

import functools

import jax


@functools.lru_cache(maxsize=None)
def pallas_fn(sel, config):
    """jit(q, k, v[, q_start]) -> (out, gathered lists, lengths) of the Pallas kernels."""
    from kernels.reattention import pallas

    def fn(q, k, v, q_start=None):
        with pallas.poison_outputs():
            return pallas.reattention_with_selection(q, k, v, sel=sel, q_start=q_start,
                                                     config=config)

    return jax.jit(fn)


@functools.lru_cache(maxsize=None)
def reference_fn(sel):
    """jit(q, k, v[, q_start]) -> (out, gathered lists, lengths) of the jnp reference."""
    from kernels.reattention import reference

    def fn(q, k, v, q_start=None):
        return reference.reattention_with_selection(q, k, v, sel=sel, q_start=q_start)

    return jax.jit(fn)
