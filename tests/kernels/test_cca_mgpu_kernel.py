"""The warp-specialised Mosaic GPU forward (``kernels/cca/pallas_mgpu.py``).

On CPU it runs through jax's Mosaic GPU interpreter (threads, barriers and TMA copies simulated;
slow, so one small shape that still reaches every loop of the kernel: unmasked and masked core
blocks, masked and unmasked raw blocks, two consumers, GQA). The interpreter fills unwritten
memory with NaN, so an output row the kernel forgot fails the comparisons. On a Hopper GPU
(``-m gpu``) the compiled kernel runs at awkward sizes, forward and gradients, against the
float32 reference and against the Triton-lowered forward.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.cca import pallas, pallas_mgpu
from kernels.cca import reference as R
from kernels.cca.pallas_common import Config, pad_to
from kernels.cca.shapes import CCAShape
from tests.kernels.conftest import TOL, export_for_cuda, forward_and_vjp, make_qkv, rel_err

ON_HOPPER = pallas_mgpu.available()
needs_hopper = pytest.mark.skipif(not ON_HOPPER,
                                  reason="needs a Hopper GPU (runs on the device machine)")
needs_interpreter = pytest.mark.skipif(pallas_mgpu.interpret_params() is None,
                                       reason="this jax has no Mosaic GPU interpreter")


def _lowering(name: str, head_dim: int = 64) -> Config:
    """The default bf16 tiles for ``head_dim``, with the forward's lowering forced to ``name``."""
    return dataclasses.replace(pallas.default_config(head_dim, 2), forward_lowering=name)


@needs_interpreter
def test_interpreted_kernel_equals_triton_lowering_and_reference(monkeypatch):
    # T = 512, g = 4, w = 128 with 64-key blocks: the last tile's first consumer sees a whole
    # core block (unmasked), every consumer a masked one, and rows 256.. an unmasked raw block.
    shape = CCAShape(1, 512, 2, 1, 64, 4, 128)
    q, k, v = make_qkv(shape, jnp.bfloat16, seed=3)
    g, w, scale = shape.group_size, shape.local_window, 1 / math.sqrt(shape.head_dim)
    small = pallas_mgpu.MgpuConfig(block_k=64)  # the default 128-key blocks need a longer T
    monkeypatch.setattr(pallas_mgpu, "forward", _with_config(pallas_mgpu.forward, small))
    o_m, (*_, lse_m) = pallas._cca_fwd(q, k, v, g, w, "cca", scale, _lowering("mosaic_gpu"), True)
    o_t, (*_, lse_t) = pallas._cca_fwd(q, k, v, g, w, "cca", scale, _lowering("triton"), True)
    assert not np.isnan(np.asarray(o_m, np.float32)).any() and not np.isnan(lse_m).any()
    # Same blocks, same float32 softmax: the two lowerings agree to float32 rounding.
    np.testing.assert_allclose(np.asarray(lse_m), np.asarray(lse_t), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(o_m, np.float32), np.asarray(o_t, np.float32),
                               rtol=0, atol=2.0 ** -7 * float(jnp.max(jnp.abs(o_t))))
    f32 = lambda x: x.astype(jnp.float32)
    ref = R.cca_attention(f32(q), f32(k), f32(v), group_size=g, local_window=w)
    assert rel_err(o_m, ref) < TOL[jnp.bfloat16]


@needs_interpreter
def test_interpreted_overlap_gives_the_same_bits():
    """The software-pipelined schedule (``MgpuConfig.overlap``: each block's softmax against the
    previous block's P V) runs the same operations in the same order as one block at a time, so
    the bits agree; so do the query tiles in order (``heavy_first=False``). The shape of the test above: every loop of the kernel, and step 0 in a
    masked core block for some rows."""
    shape = CCAShape(1, 512, 2, 1, 64, 4, 128)
    q, k, v = make_qkv(shape, jnp.bfloat16, seed=3)
    kc, vc = k[:, 3::4], v[:, 3::4]  # any (B, T / g, Hkv, D) core tokens
    outs = [pallas_mgpu.forward(q, k, v, kc, vc, g=4, w=128,
                                scale=0.125, interpret=True,
                                config=pallas_mgpu.MgpuConfig(block_k=64, overlap=overlap))
            for overlap in (False, True)]
    for changes in (dict(overlap=True, pingpong=False), dict(heavy_first=False)):
        outs.append(pallas_mgpu.forward(q, k, v, kc, vc, g=4, w=128, scale=0.125,
                                        interpret=True,
                                        config=pallas_mgpu.MgpuConfig(block_k=64, **changes)))
    for a, *others in zip(*outs):
        assert not np.isnan(np.asarray(a, np.float32)).any()
        for b in others:
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def _with_config(forward, config):
    def run(*args, **kwargs):
        kwargs.setdefault("config", config)
        return forward(*args, **kwargs)
    return run


def test_lowering_choice_and_errors():
    q16 = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
    assert not pallas._uses_mgpu(q16, _lowering("triton"), interpret=False)
    # "auto" takes the Mosaic GPU kernel only where it compiles: never off a Hopper GPU.
    assert pallas._uses_mgpu(q16, _lowering("auto"), interpret=False) == ON_HOPPER
    assert not pallas._uses_mgpu(q16, _lowering("auto"), interpret=True)
    assert pallas._uses_mgpu(q16, _lowering("mosaic_gpu"), interpret=True)
    with pytest.raises(ValueError, match="bfloat16/float16 inputs with head dim 64 or 128"):
        pallas._uses_mgpu(q16.astype(jnp.float32), _lowering("mosaic_gpu"), interpret=True)
    with pytest.raises(ValueError, match="head dim 64 or 128"):
        pallas._uses_mgpu(jnp.zeros((1, 256, 2, 32), jnp.bfloat16), _lowering("mosaic_gpu"),
                          interpret=True)
    if not ON_HOPPER:
        with pytest.raises(ValueError, match="Hopper"):
            pallas._uses_mgpu(q16, _lowering("mosaic_gpu"), interpret=False)
    with pytest.raises(ValueError, match="forward_lowering"):
        Config(forward_lowering="cuda")
    with pytest.raises(ValueError, match="block_k"):
        pallas_mgpu.MgpuConfig(block_k=256)
    with pytest.raises(ValueError, match="slots"):
        pallas_mgpu.MgpuConfig(slots=1)
    with pytest.raises(ValueError, match="overlap"):
        pallas_mgpu.MgpuConfig(overlap="yes")
    with pytest.raises(ValueError, match="pingpong"):
        pallas_mgpu.MgpuConfig(pingpong=1)
    with pytest.raises(ValueError, match="heavy_first"):
        pallas_mgpu.MgpuConfig(heavy_first=None)
    kc = jnp.zeros((1, 16, 1, 64), jnp.bfloat16)
    k = jnp.zeros((1, 256, 1, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="shapes disagree"):
        pallas_mgpu.forward(q16, k, k[:, :128], kc, kc, g=16, w=64, scale=0.1, interpret=True)
    with pytest.raises(ValueError, match="share one dtype"):
        pallas_mgpu.forward(q16, k, k, kc.astype(jnp.float16), kc, g=16, w=64, scale=0.1,
                            interpret=True)


def test_layers_share_one_lowered_kernel():
    """A model calls the forward once per layer. Through ``pallas._mgpu_forward`` (a jit) every
    call with the same shapes reuses one lowered kernel, so a module lowered for the GPU holds it
    once; the bare ``pallas_mgpu.forward`` lowers it per call. Lowered for CUDA here, on the CPU,
    with jax.export (Mosaic GPU lowering only; nothing compiles or runs)."""
    q = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 256, 1, 64), jnp.bfloat16)
    kc = jax.ShapeDtypeStruct((1, 16, 1, 64), jnp.bfloat16)

    def module_chars(forward, layers: int) -> int:
        def model(q, k, v, kc, vc):
            for _ in range(layers):
                q = q + forward(q, k, v, kc, vc, g=16, w=64, scale=0.125)[0]
            return q
        return len(export_for_cuda(model, q, k, k, kc, kc).mlir_module())

    one = module_chars(pallas._mgpu_forward, 1)
    assert module_chars(pallas._mgpu_forward, 3) < 1.1 * one
    assert module_chars(pallas_mgpu.forward, 3) > 2.5 * one  # what the jit saves


# ----------------------------------------------------------------------------- GPU, real sizes
@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [CCAShape(2, 4001, 8, 2, 64, 16, 256),
                                   CCAShape(1, 3001, 10, 2, 128, 64, 1024),
                                   CCAShape(1, 2000, 8, 8, 128, 8, 8),
                                   CCAShape(1, 8192, 32, 8, 128, 16, 1024)], ids=lambda s: s.id)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
def test_gpu_mosaic_forward_and_gradients(shape, dtype):
    q, k, v = make_qkv(shape, dtype, seed=11)
    kw = dict(group_size=shape.group_size, local_window=shape.local_window)
    cot = jax.random.normal(jax.random.PRNGKey(4), q.shape, dtype)
    f32 = lambda x: x.astype(jnp.float32)
    ref, *grads_ref = forward_and_vjp(lambda *a: R.cca_attention(*a, **kw), f32(q), f32(k),
                                      f32(v), f32(cot))
    outs = {}
    for lowering in ("mosaic_gpu", "triton"):
        config = _lowering(lowering, shape.head_dim)
        with pallas.poison_outputs():
            outs[lowering] = forward_and_vjp(
                lambda *a: pallas.cca_attention(*a, config=config, **kw), q, k, v, cot)
    out, *grads = outs["mosaic_gpu"]
    assert rel_err(out, ref) < TOL[jnp.bfloat16]
    for name, got, want in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert rel_err(got, want) < TOL[jnp.bfloat16], name
    # Against the Triton-lowered forward: the same function to 16-bit rounding of the output.
    assert rel_err(out, outs["triton"][0]) < 4e-3


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [CCAShape(2, 4001, 8, 2, 64, 16, 256),
                                   CCAShape(1, 2000, 8, 8, 128, 8, 8),
                                   CCAShape(1, 32768, 32, 8, 128, 16, 1024)], ids=lambda s: s.id)
@pytest.mark.parametrize("schedule", [dict(overlap=True), dict(overlap=True, pingpong=False)],
                         ids=["overlap", "overlap_free"])
def test_gpu_overlap_gives_the_same_bits(shape, schedule):
    """Compiled, the pipelined schedule (``MgpuConfig.overlap``, with and without the
    consumers' turns) equals the shipped schedule bit for bit: same wgmma accumulations, same
    softmax, only issued at other times."""
    q, k, v = make_qkv(shape, jnp.bfloat16, seed=5)
    g, w = shape.group_size, shape.local_window
    q, k, v = (pad_to(x, 1, pallas_mgpu.TILE) for x in (q, k, v))
    kc, vc = k[:, g - 1::g], v[:, g - 1::g]  # any (B, T / g, Hkv, D) core tokens
    run = lambda config: jax.jit(lambda *a: pallas_mgpu.forward(
        *a, g=g, w=w, scale=0.1, config=config))(q, k, v, kc, vc)
    pipelined = pallas_mgpu.MgpuConfig(**schedule)
    for a, b in zip(run(pallas_mgpu.MgpuConfig()), run(pipelined)):
        assert np.isfinite(np.asarray(a, np.float32)).all()
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
