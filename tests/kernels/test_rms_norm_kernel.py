"""The residual add + RMSNorm kernel of the decode step (kernels/rms_norm/pallas.py) against the
model's math (kernels/rms_norm/reference.py).

On CPU the kernel runs through the Pallas interpreter with NaN-poisoned outputs (a row it forgot
to write poisons the result); on the GPU (``-m gpu``) compiled at LLaMA-2-7B / 70B widths. The sum
must equal the reference's to the bit; the normalised row may differ by two units in the last
place of its dtype: the float32 sum of squares is added up in another order, which can move the
row normalised and rounded to x's dtype by one unit, and the product with the weight, rounded
again, by one more.

The model's one-token Pallas path, which runs these kernels between the others, is checked
against its XLA path and the full forward in
``tests/kernels/test_cca_decode_kernel.py::test_model_decode_with_the_kernel_equals_xla_decode``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_cca import CCAConfig, decode
from kernels.cca.pallas_common import poison_outputs
from kernels.rms_norm import pallas, reference

ON_GPU = jax.default_backend() == "gpu"
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (runs on the device machine)")


def _inputs(shape, dtype, weight_dtype, seed):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(3 * rng.standard_normal(shape, np.float32), dtype)
    r = jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
    w = jnp.asarray(1 + 0.2 * rng.standard_normal(shape[-1:], np.float32), weight_dtype)
    return x, r, w


def _check(got, want):
    (s, y), (s_ref, y_ref) = got, want
    assert s.dtype == s_ref.dtype and y.dtype == y_ref.dtype and y.shape == y_ref.shape
    np.testing.assert_array_equal(np.asarray(s, np.float32), np.asarray(s_ref, np.float32))
    ulp = float(jnp.finfo(y.dtype).eps)
    y, y_ref = np.asarray(y, np.float32), np.asarray(y_ref, np.float32)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, y_ref, rtol=2 * ulp, atol=0)


CASES = [((1, 1, 64), "bfloat16", "bfloat16"), ((2, 3, 256), "float32", "float32"),
         ((5, 16), "bfloat16", "float32"), ((3, 1, 1024), "float16", "float16")]


@pytest.mark.parametrize("shape, dtype, weight_dtype", CASES)
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rms_norm_equals_reference(shape, dtype, weight_dtype, with_residual):
    x, r, w = _inputs(shape, dtype, weight_dtype, seed=len(shape) + shape[-1])
    r = r if with_residual else None
    with poison_outputs():
        got = jax.jit(lambda x, r, w: pallas.add_rms_norm(x, r, w, eps=1e-5))(x, r, w)
    _check(got, reference.add_rms_norm(x, r, w, 1e-5))


def test_add_rms_norm_refuses_bad_inputs():
    x, r, w = _inputs((2, 64), "float32", "float32", 0)
    call = lambda *a: pallas.add_rms_norm(*a, eps=1e-6)
    with pytest.raises(ValueError, match="power of two"):
        call(x[:, :48], r[:, :48], w[:48])
    with pytest.raises(ValueError, match="residual"):
        call(x, r[:1], w)
    with pytest.raises(ValueError, match="weight"):
        call(x, r, w[:32])
    with pytest.raises(ValueError, match="floating point"):
        call(x.astype(jnp.int32), None, w)
    assert pallas.supports(4096) and not pallas.supports(3072) and not pallas.supports(8)


def test_model_uses_the_kernel_only_on_one_token_pallas_steps():
    config = CCAConfig.tiny(attention="cca", group_size=4, local_window=8)
    pallas_config = config.replace(implementation="pallas")
    assert decode.norms_in_kernel(1, pallas_config)
    assert not decode.norms_in_kernel(2, pallas_config)
    assert not decode.norms_in_kernel(1, config.replace(implementation="xla"))
    assert not decode.norms_in_kernel(1, pallas_config.replace(hidden_size=96, num_heads=3,
                                                                   num_kv_heads=1))


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("rows, width", [(1, 4096), (25, 4096), (2, 8192)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_gpu_add_rms_norm_equals_reference(rows, width, with_residual):
    """Compiled, bf16, at the decode step's shapes: batch 1 and 25 of LLaMA-2-7B, batch 2 of a
    70B-wide row."""
    x, r, w = _inputs((rows, 1, width), "bfloat16", "bfloat16", rows + width)
    r = r if with_residual else None
    got = jax.jit(lambda x, r, w: pallas.add_rms_norm(x, r, w, eps=1e-5))(x, r, w)
    want = jax.jit(lambda x, r, w: reference.add_rms_norm(x, r, w, 1e-5))(x, r, w)
    _check(got, want)
