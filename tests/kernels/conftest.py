"""Helpers shared by the kernel suites: fresh random inputs and the error measure of SPEC.md."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.cca.shapes import CCAShape


def make_qkv(shape: CCAShape, dtype=jnp.float32, seed: int = 0):
    """Fresh random q (B, T, Hq, D), k, v (B, T, Hkv, D): never zeros, never a reused seed."""
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    b, t, d = shape.batch, shape.length, shape.head_dim
    q = jax.random.normal(kq, (b, t, shape.q_heads, d), jnp.float32)
    k = jax.random.normal(kk, (b, t, shape.kv_heads, d), jnp.float32)
    v = jax.random.normal(kv, (b, t, shape.kv_heads, d), jnp.float32)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def rel_err(out, ref) -> float:
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert np.isfinite(out).all(), "output has NaN or Inf"
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def forward_and_vjp(fn, q, k, v, cot):
    """(out, dq, dk, dv) of ``fn(q, k, v)`` with cotangent ``cot``, as one jitted program: on a
    CPU the op-by-op dispatch of an eager vjp takes several times as long as compiling it."""

    @jax.jit
    def run(q, k, v, cot):
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(cot))

    return run(q, k, v, cot)


def export_for_cuda(fn, *args):
    """``fn`` (jitted here if it is not) lowered for CUDA on any host with ``jax.export``: the
    GPU lowering of its Pallas kernels runs (Triton and Mosaic GPU) and nothing compiles. Pallas
    Triton kernels lower to a custom call that export does not list as stable, so that check is
    off. Returns the ``jax.export.Exported``. Kernels that pick their GPU path from
    ``jax.default_backend()`` need that patched to "gpu" around the call as well."""
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    return jax.export.export(jitted, platforms=["cuda"], disabled_checks=checks)(*args)


@pytest.fixture
def qkv_factory():
    return make_qkv
