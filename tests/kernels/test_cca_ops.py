"""One suite that every CCA implementation runs through ``jax_cca.ops.cca_attention``: forward and
all three gradients against the reference, at awkward sizes, GQA, batch 2, fp32 and bf16.

On CPU the Pallas kernels run through the interpreter at small sizes (with small tiles, so that
several tiles and every masked/unmasked loop are exercised); with a GPU the same checks run at
real sizes (``-m gpu``)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_cca import ops
from kernels.cca import reference as R
from kernels.cca.shapes import CCAShape, gpu_shapes
from tests.kernels.conftest import TOL, forward_and_vjp, make_qkv, rel_err

ON_GPU = jax.default_backend() == "gpu"
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (runs on the device machine)")
IMPLEMENTATIONS = ops.available_cca_implementations()

# (shape, pallas tile) pairs: g in {8, 16, 64}, w in {g, 4g, 1024}, GQA ratios 1, 2, 4, 5.
SHAPES = [
    CCAShape(2, 63, 4, 4, 64, 8, 8),
    CCAShape(2, 111, 4, 2, 64, 8, 32),
    CCAShape(1, 150, 8, 2, 128, 16, 16),
    CCAShape(2, 97, 5, 1, 64, 16, 64),
    CCAShape(1, 200, 4, 1, 64, 64, 64),
    CCAShape(1, 130, 2, 1, 64, 16, 1024),
]


def _call(impl, q, k, v, shape, **extra):
    kw = dict(group_size=shape.group_size, local_window=shape.local_window)
    if impl == "pallas" and not ON_GPU:
        from kernels.cca import pallas
        from kernels.cca.pallas_common import Config

        # The dK/dV kernels get tiles of their own (shape swapped against dQ's); the core dK/dV
        # kernel splits G over 2 programs where G is even (GQA ratios 2 and 4 below).
        small = Config(block_q=16, block_k=16, bwd_block_q=16, bwd_block_k=32, dkdv_block_q=32,
                       dkdv_block_k=16, dkdv_core_splits=2)
        with pallas.poison_outputs():
            return pallas.cca_attention(q, k, v, config=small, **kw, **extra)
    return ops.cca_attention(q, k, v, implementation=impl, **kw, **extra)


def _inputs(shape):
    q, k, v = make_qkv(shape, seed=100 + shape.length)
    return q, k, v, jax.random.normal(jax.random.PRNGKey(shape.length), q.shape)


@functools.lru_cache(maxsize=None)
def _naive(shape):
    """The naive reference's (out, dq, dk, dv) of a shape's inputs: computed once for all the
    implementations."""
    kw = dict(group_size=shape.group_size, local_window=shape.local_window)
    return forward_and_vjp(lambda *a: R.cca_attention_naive(*a, **kw), *_inputs(shape))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.id)
def test_forward_and_gradients_match_reference(impl, shape):
    got = forward_and_vjp(lambda *a: _call(impl, *a, shape), *_inputs(shape))
    for name, x, want in zip(("out", "dq", "dk", "dv"), got, _naive(shape)):
        assert rel_err(x, want) < TOL[jnp.float32], name


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_bf16(impl):
    shape = CCAShape(2, 111, 8, 2, 64, 16, 32)
    q, k, v = make_qkv(shape, seed=5)
    kw = dict(group_size=16, local_window=32)
    bf = lambda x: x.astype(jnp.bfloat16)
    cot = jax.random.normal(jax.random.PRNGKey(9), q.shape)
    got = forward_and_vjp(lambda *a: _call(impl, *a, shape), bf(q), bf(k), bf(v), bf(cot))
    assert got[0].dtype == jnp.bfloat16
    want = forward_and_vjp(lambda *a: R.cca_attention(*a, **kw), q, k, v, cot)
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
        assert rel_err(x, y) < TOL[jnp.bfloat16], name


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_jit_and_softmax_scale(impl):
    shape = CCAShape(1, 70, 4, 2, 64, 8, 16)
    q, k, v = make_qkv(shape, seed=21)
    f = jax.jit(lambda *a: _call(impl, *a, shape, softmax_scale=0.3))
    ref = R.cca_attention_naive(q, k, v, group_size=8, local_window=16, softmax_scale=0.3)
    assert rel_err(f(q, k, v), ref) < TOL[jnp.float32]


def test_default_implementation_runs_here():
    shape = CCAShape(1, 40, 2, 1, 64, 8, 8)
    q, k, v = make_qkv(shape, seed=1)
    out = ops.cca_attention(q, k, v, group_size=8, local_window=8)
    assert rel_err(out, R.cca_attention_naive(q, k, v, group_size=8, local_window=8)) < 1e-5
    assert ops.default_cca_implementation() == ("pallas" if ON_GPU else "xla")


@pytest.mark.parametrize("bad,match", [
    (dict(local_window=20), "multiple of group_size"),
    (dict(group_size=0), "group_size"),
    (dict(pooling="sum"), "pooling"),
    (dict(implementation="cuda"), "unknown implementation"),
])
def test_bad_arguments_name_the_problem(bad, match):
    q, k, v = make_qkv(CCAShape(1, 16, 2, 1, 64, 8, 8))
    kw = dict(group_size=8, local_window=16)
    with pytest.raises(ValueError, match=match):
        ops.cca_attention(q, k, v, **{**kw, **bad})


def test_bad_shapes_name_the_problem():
    q, k, v = make_qkv(CCAShape(1, 16, 3, 2, 64, 8, 8))
    with pytest.raises(ValueError, match="multiple of kv heads"):
        ops.cca_attention(q, k, v, group_size=8, local_window=8)
    with pytest.raises(ValueError, match="expects q"):
        ops.cca_attention(q[0], k[0], v[0], group_size=8, local_window=8)
    q, k, v = make_qkv(CCAShape(1, 16, 4, 2, 64, 8, 8))
    with pytest.raises(ValueError, match="dtype"):
        ops.cca_attention(q, k.astype(jnp.bfloat16), v, group_size=8, local_window=8)
    with pytest.raises(ValueError, match="disagree"):
        ops.cca_attention(q, k[:, :8], v[:, :8], group_size=8, local_window=8)


def test_poisoned_outputs_catch_a_skipped_write():
    """The NaN poison used by the kernel tests really reaches kernel outputs."""
    from jax.experimental import pallas as pl

    from kernels.cca.pallas_common import call, poison_outputs

    def half_kernel(x_ref, o_ref):
        o_ref[pl.ds(0, 8), :] = x_ref[pl.ds(0, 8), :]  # forgets rows 8..15

    x = jnp.ones((16, 16), jnp.float32)
    run = lambda: call(half_kernel, grid=(1,), in_specs=[pl.BlockSpec((16, 16), lambda i: (0, 0))],
                       out_specs=[pl.BlockSpec((16, 16), lambda i: (0, 0))],
                       out_shape=[jax.ShapeDtypeStruct((16, 16), jnp.float32)], inputs=[x],
                       num_warps=4, num_stages=1, interpret=not ON_GPU, name="half")[0]
    with poison_outputs():
        out = np.asarray(run())
    assert np.isnan(out[8:]).all() and (out[:8] == 1).all()


# ----------------------------------------------------------------------------- GPU, real sizes
@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("shape", gpu_shapes(32768), ids=lambda s: s.id)
def test_gpu_32k_bf16_forward_and_gradients(shape):
    from kernels.cca import pallas

    q, k, v = make_qkv(shape, jnp.bfloat16, seed=32)
    kw = dict(group_size=shape.group_size, local_window=shape.local_window)
    cot = jax.random.normal(jax.random.PRNGKey(1), q.shape, jnp.bfloat16)
    with pallas.poison_outputs():
        out, vjp = jax.vjp(lambda *a: ops.cca_attention(*a, implementation="pallas", **kw), q, k, v)
        grads = vjp(cot)
    f32 = lambda x: x.astype(jnp.float32)
    ref, vjp_ref = jax.vjp(lambda *a: R.cca_attention(*a, **kw), f32(q), f32(k), f32(v))
    assert rel_err(out, ref) < TOL[jnp.bfloat16]
    for name, got, want in zip(("dq", "dk", "dv"), grads, vjp_ref(f32(cot))):
        assert rel_err(got, want) < TOL[jnp.bfloat16], name


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [CCAShape(2, 4001, 8, 2, 64, 16, 256),
                                   CCAShape(1, 3001, 10, 2, 128, 64, 1024),
                                   CCAShape(1, 2000, 8, 8, 128, 8, 8),
                                   # float32 pooling kernel with d = 128, g = 16 (256-row tiles)
                                   CCAShape(1, 4001, 32, 8, 128, 16, 1024)], ids=lambda s: s.id)
def test_gpu_fp32_forward_and_gradients(shape):
    q, k, v = make_qkv(shape, seed=7)
    kw = dict(group_size=shape.group_size, local_window=shape.local_window)
    cot = jax.random.normal(jax.random.PRNGKey(2), q.shape)
    out, vjp = jax.vjp(lambda *a: ops.cca_attention(*a, implementation="pallas", **kw), q, k, v)
    ref, vjp_ref = jax.vjp(lambda *a: R.cca_attention(*a, **kw), q, k, v)
    assert rel_err(out, ref) < TOL[jnp.float32]
    for name, got, want in zip(("dq", "dk", "dv"), vjp(cot), vjp_ref(cot)):
        assert rel_err(got, want) < TOL[jnp.float32], name
