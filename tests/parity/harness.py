"""The four CCA implementations behind one call, for the parity suite.

``run(impl, inputs, hparams, dtype)`` returns the output and the gradients (dq, dk, dv) of
``sum(out * ct)`` as float32 numpy arrays, for impl in

* ``jnp_reference``: kernels/cca/reference.py (jax.vjp), always float32;
* ``pallas``: kernels/cca/pallas.py (small tiles, interpreted off-GPU; default tiles with --gpu);
* ``torch_reference``: kernels/cca/reference_torch.py (torch autograd), always float32;
* ``triton``: kernels/cca/triton.py (small tiles, interpreted; compiled, default tiles, --gpu);
* ``pallas_mosaic_gpu`` (not in IMPLEMENTATIONS; 16-bit only): the Pallas op with its forward
  forced to the Mosaic GPU kernel (kernels/cca/pallas_mgpu.py; its interpreter off-GPU) and the
  shared backward, default tiles.

Inputs are fresh float32 numpy arrays; each framework casts them itself (float32 -> bfloat16 rounds
to nearest even in both, so the kernels see identical bits). Kernel outputs are NaN-poisoned before
each launch, so a tile a kernel forgot to write fails every comparison.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from kernels.cca.shapes import CCAShape

IMPLEMENTATIONS = ("jnp_reference", "pallas", "torch_reference", "triton")
REFERENCES = ("jnp_reference", "torch_reference")
TOL = {"float32": 1e-5, "bfloat16": 2e-2}

_STATE: dict = {"gpu": False, "triton": None}


def configure(*, gpu: bool, triton_module) -> None:
    _STATE.update(gpu=gpu, triton=triton_module)


def on_gpu() -> bool:
    return _STATE["gpu"]


def triton_kernels():
    """kernels.cca.triton as imported by conftest.py (interpreted unless --gpu)."""
    if _STATE["triton"] is None:
        pytest.skip("triton is not installed (or tests/parity/conftest.py did not run)")
    return _STATE["triton"]


def reattention_triton_kernels():
    """kernels.reattention.triton, as :func:`triton_module` imports it."""
    return triton_module("kernels.reattention.triton")


def triton_module(name: str):
    """A Triton kernel module, imported (once) interpreted unless the suite runs with --gpu:
    ``TRITON_INTERPRET=1`` is set only around that import. Skips when triton is missing."""
    import importlib
    import importlib.util
    import os
    import sys

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if on_gpu() or name in sys.modules:
        module = importlib.import_module(name)
    else:
        previous = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            module = importlib.import_module(name)
        finally:
            if previous is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = previous
    if module.INTERPRET == on_gpu():
        raise pytest.UsageError(f"{name} was imported {'in' if module.INTERPRET else 'without'} "
                                "interpreter mode before the parity suite could choose")
    return module


def torch_device() -> str:
    return "cuda" if on_gpu() else "cpu"


def needs_gpu(test):
    """Skip unless the suite runs with --gpu on a CUDA GPU (decided before test modules import)."""
    reason = "needs --gpu and a CUDA GPU (real sizes, compiled kernels)"
    return pytest.mark.gpu(pytest.mark.skipif(not on_gpu(), reason=reason)(test))


@dataclasses.dataclass(frozen=True)
class Inputs:
    shape: CCAShape
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    ct: np.ndarray  # cotangent of the output


def make_inputs(shape: CCAShape, seed: int) -> Inputs:
    """Fresh standard-normal q, k, v and output cotangent (never zeros, never a reused seed)."""
    rng = np.random.default_rng(seed)
    b, t, d = shape.batch, shape.length, shape.head_dim
    draw = lambda heads: rng.standard_normal((b, t, heads, d), dtype=np.float32)
    return Inputs(shape, draw(shape.q_heads), draw(shape.kv_heads), draw(shape.kv_heads),
                  draw(shape.q_heads))


def hparams(shape: CCAShape, **extra) -> dict:
    return dict(group_size=shape.group_size, local_window=shape.local_window, **extra)


def rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    """||out - ref|| / ||ref|| in float64; NaN or Inf anywhere fails."""
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert np.isfinite(ref).all(), "reference has NaN or Inf"
    assert np.isfinite(out).all(), "output has NaN or Inf"
    denom = np.linalg.norm(ref)
    assert denom > 0, "reference is all zeros"
    return float(np.linalg.norm(out - ref) / denom)


# ----------------------------------------------------------------------------- the four sides
def _jax(fn, inputs: Inputs, dtype: str, jit: bool = True):
    import jax
    import jax.numpy as jnp

    from tests.kernels.conftest import forward_and_vjp

    cast = lambda x: jnp.asarray(x).astype(jnp.dtype(dtype))
    q, k, v, ct = (cast(x) for x in (inputs.q, inputs.k, inputs.v, inputs.ct))
    if jit:
        results = forward_and_vjp(fn, q, k, v, ct)
    else:
        out, vjp = jax.vjp(fn, q, k, v)
        results = (out, *vjp(ct))
    assert results[0].dtype == q.dtype
    return [np.asarray(x.astype(jnp.float32)) for x in results]


def _torch(fn, inputs: Inputs, dtype: str):
    import torch

    cast = lambda x: torch.as_tensor(x).to(device=torch_device(), dtype=getattr(torch, dtype))
    q, k, v = (cast(x).requires_grad_() for x in (inputs.q, inputs.k, inputs.v))
    out = fn(q, k, v)
    assert out.dtype == q.dtype and out.shape == q.shape
    grads = torch.autograd.grad(out, (q, k, v), cast(inputs.ct))
    results = [x.detach().float().cpu().numpy() for x in (out, *grads)]
    if on_gpu():
        del out, grads
        torch.cuda.empty_cache()
    return results


def pallas_config():
    from kernels.cca.pallas_common import Config

    # Small tiles on CPU so that several tiles and every masked/unmasked loop run.
    return None if on_gpu() else Config(block_q=16, block_k=16, bwd_block_q=16, bwd_block_k=32)


def triton_config():
    # 16-key backward tiles (Pallas uses 32): at these lengths the unmasked core-tile loops of
    # both the forward and the dK/dV kernels run too; the dK/dV kernels get 32-query tiles.
    config_cls = triton_kernels().Config
    return None if on_gpu() else config_cls(block_q=16, block_k=16, bwd_block_q=16,
                                            bwd_block_k=16, dkdv_block_q=32, num_warps=4)


def run(impl: str, inputs: Inputs, hp: dict, dtype: str = "float32") -> list[np.ndarray]:
    """[out, dq, dk, dv] as float32 numpy. References always compute from the float32 inputs."""
    if impl == "jnp_reference":
        from kernels.cca import reference

        return _jax(lambda q, k, v: reference.cca_attention(q, k, v, **hp), inputs, "float32")
    if impl == "pallas":
        from kernels.cca import pallas

        def fn(q, k, v):
            return pallas.cca_attention(q, k, v, config=pallas_config(), **hp)

        with pallas.poison_outputs():
            return _jax(fn, inputs, dtype)
    if impl == "pallas_mosaic_gpu":
        from kernels.cca import pallas

        config = dataclasses.replace(pallas.default_config(inputs.q.shape[-1], 2),
                                     forward_lowering="mosaic_gpu")
        # Eager off-GPU: jax's Mosaic GPU interpreter hangs inside a jitted gradient (its
        # simulated threads block on each other); a jitted forward alone runs.
        with pallas.poison_outputs():
            return _jax(lambda q, k, v: pallas.cca_attention(q, k, v, config=config, **hp),
                        inputs, dtype, jit=on_gpu())
    if impl == "torch_reference":
        from kernels.cca import reference_torch

        chunk = None if on_gpu() else 32  # several chunks even at small T
        return _torch(lambda q, k, v: reference_torch.cca_attention(q, k, v, chunk_size=chunk,
                                                                    **hp), inputs, "float32")
    if impl == "triton":
        kernels = triton_kernels()
        with kernels.poison_outputs():
            return _torch(lambda q, k, v: kernels.cca_attention(q, k, v, config=triton_config(),
                                                                **hp), inputs, dtype)
    raise ValueError(impl)


def assert_all_pairs_agree(results: dict[str, list[np.ndarray]], dtype: str) -> dict:
    """Every pair of implementations agrees on out, dq, dk, dv. A pair with a kernel run in
    ``dtype`` gets that dtype's tolerance; the two float32 references always get float32's.
    Returns {(a, b, name): rel err} for reporting."""
    errors = {}
    for a, b in itertools.combinations(results, 2):
        tol = TOL["float32"] if {a, b} <= set(REFERENCES) else TOL[dtype]
        for name, x, y in zip(("out", "dq", "dk", "dv"), results[a], results[b]):
            errors[(a, b, name)] = err = rel_err(x, y)
            assert err < tol, f"{a} vs {b}: {name} rel err {err:.3g} >= {tol}"
    return errors
