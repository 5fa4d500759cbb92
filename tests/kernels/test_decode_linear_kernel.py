"""The batch-1 decode projection kernel (kernels/decode_linear/pallas.py) against the model's
XLA ops (kernels/decode_linear/reference.py), and the model's batch-1 decode step that uses it.

On CPU the kernel runs through the Pallas interpreter with NaN-poisoned outputs at small sizes;
on the GPU (``-m gpu``) compiled at LLaMA-2-7B shapes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_cca import CCAConfig, CCALlama, decode
from kernels.cca.pallas_common import poison_outputs
from kernels.decode_linear import pallas, reference
from tests.kernels.conftest import TOL, rel_err

ON_GPU = jax.default_backend() == "gpu"
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (runs on the device machine)")


def _operands(k, n, prologue, residual, dtype, seed):
    rng = np.random.default_rng(seed)
    rand = lambda *shape, scale=1.0: jnp.asarray(rng.standard_normal(shape) * scale, dtype)
    x = rand(1, 2 * k if prologue == "swiglu" else k)
    w = rand(k, n, scale=k ** -0.5)
    norm = rand(k) if prologue == "rmsnorm" else None
    res = rand(1, n) if residual else None
    return x, w, dict(norm_weight=norm, residual=res)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("prologue", [None, "rmsnorm", "swiglu"])
@pytest.mark.parametrize("residual", [False, True])
def test_kernel_equals_reference(prologue, residual, dtype):
    """Every prologue, with and without the residual, float32 and bfloat16, K over several loop
    steps: within SPEC.md's tolerance (float32 1e-5, bfloat16 2e-2), and bfloat16 without a
    prologue or with RMSNorm to the bit (the same roundings)."""
    seed = [None, "rmsnorm", "swiglu"].index(prologue) * 2 + residual
    x, w, kw = _operands(256, 96, prologue, residual, dtype, seed)
    config = pallas.Config(block_n=32, block_k=64)
    with poison_outputs():
        got = jax.jit(lambda x, w, kw: pallas.decode_linear(x, w, prologue=prologue,
                                                            config=config, **kw))(x, w, kw)
    want = reference.decode_linear(x, w, prologue=prologue, **kw)
    assert got.dtype == want.dtype == jnp.dtype(dtype) and got.shape == want.shape
    assert rel_err(got, want) < TOL[jnp.dtype(dtype).type]
    if dtype == "bfloat16" and prologue != "swiglu":
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_default_tiles_divide_llama_shapes():
    for k, n in [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096), (3072, 5120)]:
        cfg = pallas.default_config(k, n)
        assert k % cfg.block_k == 0 and n % cfg.block_n == 0


def test_bad_inputs_raise_clear_errors():
    x, w, _ = _operands(64, 32, None, False, "float32", 0)
    with pytest.raises(ValueError, match="one row"):
        pallas.decode_linear(jnp.concatenate([x, x]), w)
    with pytest.raises(ValueError, match="one row"):
        pallas.decode_linear(x, w, prologue="swiglu")  # x must be (1, 2K)
    with pytest.raises(ValueError, match="prologue"):
        pallas.decode_linear(x, w, prologue="gelu")
    with pytest.raises(ValueError, match="norm_weight"):
        pallas.decode_linear(x, w, prologue="rmsnorm")
    with pytest.raises(ValueError, match="norm_weight"):
        pallas.decode_linear(x, w, norm_weight=jnp.ones((64,)))
    with pytest.raises(ValueError, match="residual"):
        pallas.decode_linear(x, w, residual=jnp.ones((1, 16)))
    with pytest.raises(ValueError, match="dtype"):
        pallas.decode_linear(x.astype(jnp.bfloat16), w)
    with pytest.raises(ValueError, match="tiles"):
        pallas.decode_linear(x, w, config=pallas.Config(block_n=64))
    assert not pallas.supports((1, 60), (60, 32), None) and not pallas.supports((1, 64), (64, 48),
                                                                               None)


def _model(fused: bool, attention: str):
    config = CCAConfig.tiny(vocab_size=97, hidden_size=128, intermediate_size=96, num_layers=2,
                            num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=64,
                            group_size=4, local_window=8, attention=attention,
                            implementation="pallas")
    model = CCALlama.from_config(config, seed=11)
    return model.with_fused_projections(fused)


@pytest.mark.parametrize("attention", ["cca", "full"])
def test_model_batch1_kernel_step_equals_xla_step(attention):
    """Batch 1, fused layout, implementation="pallas" (interpreted) for the decode steps: the
    layers take the projection-kernel path, and an XLA prompt pass + 20 decode steps (group ends and the window's edge) give
    the logits of the XLA decode step and of the full forward (float32)."""
    kern = _model(True, attention)
    xla = kern.with_attention(implementation="xla")
    cache = kern.init_cache(1, 40)
    assert decode.fuses_projections(cache[0], (1, 1), kern.config)
    assert not decode.fuses_projections(cache[0], (1, 1), xla.config)
    assert not decode.fuses_projections(kern.init_cache(2, 40)[0], (2, 1), kern.config)
    ids = np.random.default_rng(3).integers(0, 97, (1, 31)).astype(np.int32)
    graphdef, state = nnx.split(xla)
    ref = np.asarray(jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))(state, ids))[0]
    lengths = np.array([11])
    got = {}
    prefilled = xla.prefill(ids, lengths, xla.init_cache(1, 40))  # the XLA prompt pass for both
    for name, model in (("pallas", kern), ("xla", xla)):
        logits, c = jax.tree_util.tree_map(jnp.copy, prefilled)
        rows = [np.asarray(logits)[0]]
        for t in range(11, 31):
            logits, c = model.decode_step(ids[:, t], c)
            rows.append(np.asarray(logits)[0])
        got[name] = np.stack(rows)
    assert rel_err(got["pallas"], got["xla"]) < 1e-5
    assert rel_err(got["pallas"], ref[10:31]) < 1e-4


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("k, n, prologue, residual", [(4096, 12288, "rmsnorm", False),
                                                      (4096, 4096, None, True),
                                                      (4096, 22016, "rmsnorm", False),
                                                      (11008, 4096, "swiglu", True)])
def test_gpu_llama7b_projections(k, n, prologue, residual):
    """Compiled at LLaMA-2-7B's four projection shapes, bfloat16: within 1e-2 of the XLA ops
    (the only differences are the order of the float32 sums and the last bit of silu)."""
    x, w, kw = _operands(k, n, prologue, residual, "bfloat16", seed=k + n)
    got = jax.jit(lambda x, w, kw: pallas.decode_linear(x, w, prologue=prologue, **kw))(x, w, kw)
    want = jax.jit(lambda x, w, kw: reference.decode_linear(x, w, prologue=prologue, **kw))(
        x, w, kw)
    assert rel_err(got, want) < 1e-2
