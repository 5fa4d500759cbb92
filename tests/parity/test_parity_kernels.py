"""Cross-framework parity of the CCA implementations: every pair among {jnp reference, Pallas,
torch reference, Triton} agrees on the output and on dq, dk, dv, on the same fresh inputs.

Default: small awkward sizes through the interpreters (T = 63, 97, 111, 130: never a multiple of
a tile or of g; GQA ratios 1, 2, 4, 5; batch 2; d 64 and 128; g 4, 8, 16; w = g and 4g, so the
boundary rows t in [w, w + g - 2] exist). With ``--gpu``: the same sizes compiled, plus T = 32K
bf16 (MHA 32/32 and GQA 32/8, d = 128, g = 16, w = 1024) and float32 at T = 4001 / 3001.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from kernels.cca.shapes import CCAShape, gpu_shapes
from tests.parity import harness
from tests.parity.harness import (IMPLEMENTATIONS, assert_all_pairs_agree, hparams, make_inputs,
                                  needs_gpu, rel_err, run)

REPO = Path(__file__).resolve().parents[2]

SMALL = [
    CCAShape(2, 63, 4, 4, 64, 8, 8),      # MHA, w = g
    CCAShape(2, 111, 4, 2, 64, 4, 16),    # GQA 2, w = 4g
    CCAShape(1, 111, 4, 1, 128, 16, 16),  # GQA 4, d 128, w = g
    CCAShape(1, 97, 5, 1, 64, 8, 32),     # GQA 5, w = 4g
    CCAShape(2, 130, 2, 1, 128, 16, 64),  # batch 2, d 128, w = 4g
    CCAShape(1, 200, 2, 1, 64, 4, 16),    # many core tokens: unmasked core tiles everywhere
]


def _all(inputs, hp, dtype="float32", impls=IMPLEMENTATIONS):
    return {impl: run(impl, inputs, hp, dtype) for impl in impls}


@pytest.mark.parametrize("shape", SMALL, ids=lambda s: s.id)
def test_every_pair_agrees_fp32(shape):
    inputs = make_inputs(shape, seed=1000 + shape.length * 7 + shape.q_heads)
    assert_all_pairs_agree(_all(inputs, hparams(shape)), "float32")


def test_every_pair_agrees_bf16():
    """bf16 Triton and Pallas against each other and against the float32 references."""
    shape = CCAShape(2, 111, 8, 2, 64, 16, 32)
    inputs = make_inputs(shape, seed=2024)
    results = _all(inputs, hparams(shape), "bfloat16")
    errors = assert_all_pairs_agree(results, "bfloat16")
    # Not vacuous: bf16 kernels really ran in bf16 (error well above float32 round-off).
    assert errors[("pallas", "torch_reference", "out")] > 1e-4
    assert errors[("jnp_reference", "triton", "out")] > 1e-4


def test_mosaic_gpu_forward_agrees_with_the_twin_bf16():
    """The Pallas op with the Mosaic GPU forward (its interpreter on CPU: slow, so one small
    shape; compiled on a Hopper GPU) against the Triton twin and the float32 reference: out, dq,
    dk, dv. T = 250 is padded to 256, GQA 2."""
    from kernels.cca import pallas_mgpu

    if pallas_mgpu.interpret_params() is None and not pallas_mgpu.available():
        pytest.skip("this jax has no Mosaic GPU interpreter and this is not a Hopper GPU")
    shape = CCAShape(1, 250, 2, 1, 64, 16, 64)
    inputs = make_inputs(shape, seed=4242)
    results = _all(inputs, hparams(shape), "bfloat16",
                   impls=("jnp_reference", "pallas_mosaic_gpu", "triton"))
    errors = assert_all_pairs_agree(results, "bfloat16")
    assert errors[("jnp_reference", "pallas_mosaic_gpu", "out")] > 1e-4  # really ran in bf16


@pytest.mark.parametrize("pooling", ["cca", "mean", "max"])
def test_poolings_and_softmax_scale(pooling):
    """The ablation poolings and an explicit softmax scale: both references and Triton (which
    pools "mean"/"max" with torch ops and attends with its kernels) agree."""
    shape = CCAShape(1, 70, 4, 2, 64, 8, 16)
    inputs = make_inputs(shape, seed={"cca": 11, "mean": 12, "max": 13}[pooling])
    hp = hparams(shape, pooling=pooling, softmax_scale=0.3)
    impls = ("jnp_reference", "torch_reference", "triton")
    assert_all_pairs_agree(_all(inputs, hp, impls=impls), "float32")


def test_odd_group_size_and_head_dim():
    """g = 12 (pooling tile padded to 16) and D = 80 (padded to 128 in the Triton wrapper); the
    Pallas kernels take power-of-two head dims only, so three implementations here."""
    shape = CCAShape(1, 150, 3, 1, 80, 12, 24)
    inputs = make_inputs(shape, seed=1280)
    impls = ("jnp_reference", "torch_reference", "triton")
    assert_all_pairs_agree(_all(inputs, hparams(shape), impls=impls), "float32")


def test_window_start_is_exact_on_both_sides():
    """start(t) = max(0, floor((t - w + 1) / g) * g) for every t, including t in [w, w + g - 2]
    where a truncating division is wrong, in the torch reference and the jnp reference."""
    import jax.numpy as jnp
    import torch

    from kernels.cca import reference, reference_torch

    t = np.arange(0, 400)
    for g, w in [(4, 4), (4, 16), (8, 8), (8, 32), (16, 16), (16, 64)]:
        want = np.maximum(0, np.floor((t - w + 1) / g) * g).astype(np.int64)
        got_torch = reference_torch.local_window_start(torch.as_tensor(t), g, w).numpy()
        got_jax = np.asarray(reference.local_window_start(jnp.asarray(t), g, w))
        np.testing.assert_array_equal(got_torch, want)
        np.testing.assert_array_equal(got_jax, want)
        # Every earlier token is seen exactly once: raw or through its group's core token.
        rows = torch.as_tensor(t)[:, None]
        s = torch.arange(400)[None, :]
        raw = reference_torch.local_visible(rows, s, g, w)
        core = reference_torch.core_visible(rows, s // g, g, w)
        assert torch.equal((raw ^ core) | (s > rows), torch.ones_like(raw))


def test_poisoned_outputs_catch_a_skipped_tile():
    """NaN poison reaches the Triton outputs: a launch that skips one query tile leaves NaN rows
    that any comparison rejects."""
    import torch

    kernels = harness.triton_kernels()
    shape = CCAShape(1, 64, 2, 1, 64, 8, 16)
    inputs = make_inputs(shape, seed=77)
    cast = lambda x: torch.as_tensor(x).to(harness.torch_device())
    q, k, v = cast(inputs.q), cast(inputs.k), cast(inputs.v)
    kc, vc = kernels.pool_forward(q, k, v, n=8, g=8, scale=0.125, n_pad=16)
    with kernels.poison_outputs():
        o = kernels._output(q.shape, q.dtype, q.device)
        lse = kernels._output((1, 2, 64), torch.float32, q.device)
        assert torch.isnan(o).all()
    bq = 16
    # Heavy-first order: program i runs tile num_programs - 1 - i, so a grid one tile short
    # never writes tile 3 (rows 48..63).
    kernels._forward_kernel[(64 // bq - 1, 1, 2)](
        q, k, v, kc, vc, o, lse, *q.stride()[:3], *k.stride()[:3], *kc.stride()[:3], 2, 2, 64,
        0.125 * kernels.LOG2E, G=8, W=16, BQ=bq, BK=16, D=64, DOT=kernels._dot_mode(q))
    o = o.cpu().numpy()
    assert np.isnan(o[:, 48:]).all() and np.isfinite(o[:, :48]).all()
    ref = run("torch_reference", inputs, hparams(shape))[0]
    with pytest.raises(AssertionError, match="NaN"):
        rel_err(o, ref)


def test_bridge_dispatch_and_errors():
    """torch_bridge.cca_attention: None picks the reference on CPU tensors and Triton on CUDA;
    named backends run what they say; bad arguments name the problem like the JAX side."""
    import torch

    from kernels.cca import reference_torch
    from torch_bridge import cca_attention

    shape = CCAShape(1, 40, 2, 1, 64, 8, 8)
    inputs = make_inputs(shape, seed=5)
    q, k, v = (torch.as_tensor(x).to(harness.torch_device()) for x in
               (inputs.q, inputs.k, inputs.v))
    hp = hparams(shape)
    ref = reference_torch.cca_attention(q, k, v, **hp)
    auto = cca_attention(q, k, v, **hp)
    if harness.on_gpu():
        with harness.triton_kernels().poison_outputs():
            assert torch.equal(auto, cca_attention(q, k, v, implementation="triton", **hp))
    else:
        assert torch.equal(auto, ref)  # the reference itself, not a kernel
    out = cca_attention(q, k, v, implementation="triton", **hp)
    assert rel_err(out.cpu().numpy(), ref.cpu().numpy()) < 1e-5
    for bad, match in [(dict(local_window=20), "multiple of group_size"),
                       (dict(group_size=0), "group_size"), (dict(pooling="sum"), "pooling"),
                       (dict(implementation="cuda"), "unknown implementation")]:
        with pytest.raises(ValueError, match=match):
            cca_attention(q, k, v, **{**hp, **bad})
    with pytest.raises(ValueError, match="multiple of kv heads"):
        cca_attention(q[:, :, :1].expand(-1, -1, 3, -1), k.expand(-1, -1, 2, -1),
                      v.expand(-1, -1, 2, -1), **hp)
    with pytest.raises(ValueError, match="dtype"):
        cca_attention(q, k.bfloat16(), v, **hp)


def test_triton_on_cpu_without_the_interpreter_says_so():
    """Without TRITON_INTERPRET=1 at import, CPU tensors get a RuntimeError that says how to run
    (never a silent fallback); implementation=None still runs the reference."""
    script = textwrap.dedent("""
        import json, os
        os.environ.pop("TRITON_INTERPRET", None)
        import torch
        from torch_bridge import cca_attention
        q = torch.randn(1, 20, 2, 64); k = torch.randn(1, 20, 1, 64); v = torch.randn(1, 20, 1, 64)
        auto = cca_attention(q, k, v, group_size=4, local_window=8)
        try:
            cca_attention(q, k, v, group_size=4, local_window=8, implementation="triton")
            error = None
        except RuntimeError as e:
            error = str(e)
        print(json.dumps({"error": error, "finite": bool(torch.isfinite(auto).all())}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["finite"]
    assert out["error"] and "TRITON_INTERPRET=1" in out["error"]


# ----------------------------------------------------------------------------- GPU, real sizes
@needs_gpu
@pytest.mark.parametrize("shape", gpu_shapes(32768), ids=lambda s: s.id)
def test_gpu_32k_bf16_every_pair(shape):
    inputs = make_inputs(shape, seed=32768 + shape.kv_heads)
    results = _all(inputs, hparams(shape), "bfloat16")
    errors = assert_all_pairs_agree(results, "bfloat16")
    print(json.dumps({"-".join(k): round(v, 7) for k, v in errors.items()}))


@needs_gpu
@pytest.mark.parametrize("shape", [CCAShape(2, 4001, 8, 2, 64, 16, 256),
                                   CCAShape(1, 3001, 10, 2, 128, 8, 32),
                                   CCAShape(1, 4001, 32, 8, 128, 16, 1024)], ids=lambda s: s.id)
def test_gpu_fp32_every_pair(shape):
    inputs = make_inputs(shape, seed=4001 + shape.q_heads)
    assert_all_pairs_agree(_all(inputs, hparams(shape)), "float32")
