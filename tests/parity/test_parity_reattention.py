"""Cross-framework parity of the ReAttention implementations: every pair among {jnp reference,
Pallas, torch reference, Triton} agrees on the output, and all four build the same gathered lists,
on the same fresh inputs.

Default: small awkward sizes through the interpreters (``kernels.reattention.triton`` is imported
here with ``TRITON_INTERPRET=1``, like conftest.py does for the CCA kernels). With ``--gpu``: the
same sizes compiled, plus T = 32K bf16 with the authors' defaults (MHA 32/32 and GQA 32/8,
d = 128) and float32 at T = 4001.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from kernels.reattention.params import Config, Selection
from kernels.reattention.shapes import BLOCK_CASES, CPU_CASES, Case, gpu_cases, small
from tests.parity import harness
from tests.parity.harness import needs_gpu, rel_err

REPO = Path(__file__).resolve().parents[2]
IMPLEMENTATIONS = ("jnp_reference", "pallas", "torch_reference", "triton")
REFERENCES = ("jnp_reference", "torch_reference")
TOL = {"float32": 1e-5, "bfloat16": 2e-2}
SMALL = Config(score_block_q=16, score_block_k=16, score_stages=1, attn_block_q=16,
               attn_block_k=16, attn_stages=1)


def kernel_config() -> Config | None:
    """The kernels' tiles: their own defaults on a GPU, ``SMALL`` in the interpreters."""
    return None if harness.on_gpu() else SMALL


def triton_kernels():
    """kernels.reattention.triton, interpreted unless the suite runs with --gpu."""
    return harness.reattention_triton_kernels()


if importlib.util.find_spec("triton") is not None:
    harness.reattention_triton_kernels()  # import it now, before anything else can


# ----------------------------------------------------------------------------- the four sides
def make_inputs(case: Case, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    b, t, d = case.batch, case.length, case.head_dim
    draw = lambda heads: rng.standard_normal((b, t, heads, d), dtype=np.float32)
    return dict(q=draw(case.q_heads), k=draw(case.kv_heads), v=draw(case.kv_heads))


def run(impl: str, case: Case, inputs: dict, dtype: str = "float32", decode_lengths=None,
        config: Config | None = None):
    """[out, gathered lists, lengths] as numpy (out float32). References compute in float32 from
    the inputs rounded to ``dtype`` (the bits the kernels see). ``decode_lengths``: one decode
    step per batch element at those lengths instead of a prefill. ``config``: the kernels'
    (default: their own on a GPU, ``SMALL`` tiles in the interpreters)."""
    config = config or kernel_config()
    kernel = impl in ("pallas", "triton")
    sel = _sel(case, decode_lengths)
    if impl in ("jnp_reference", "pallas"):
        import jax.numpy as jnp

        from tests.kernels import reattention_runs as runs

        q, k, v = (jnp.asarray(inputs[n]).astype(dtype) for n in "qkv")
        if not kernel:
            q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
        args = (q, k, v)
        if decode_lengths is not None:
            lengths = jnp.asarray(decode_lengths)
            args = (q[jnp.arange(q.shape[0]), lengths - 1][:, None], k, v, lengths - 1)
        if kernel:
            out, gl, n = runs.pallas_fn(sel, config)(*args)
        else:
            out, gl, n = runs.reference_fn(sel)(*args)
        assert out.dtype == args[0].dtype
        return [np.asarray(out.astype(jnp.float32)), np.asarray(gl), np.asarray(n)]
    import torch

    from kernels.reattention import reference_torch

    device = harness.torch_device()
    cast = lambda x: torch.as_tensor(x).to(device=device, dtype=getattr(torch, dtype))
    q, k, v = (cast(inputs[n]) for n in "qkv")
    if not kernel:
        q, k, v = q.float(), k.float(), v.float()
    q_start = None
    if decode_lengths is not None:
        lengths = torch.as_tensor(decode_lengths, device=device)
        q, q_start = q[torch.arange(q.shape[0], device=device), lengths - 1][:, None], lengths - 1
    if kernel:
        kernels = triton_kernels()
        with kernels.poison_outputs():
            out, gl, n = kernels.reattention_with_selection(q, k, v, sel=sel, q_start=q_start,
                                                            config=config)
    else:
        out, gl, n = reference_torch.reattention_with_selection(q, k, v, sel=sel,
                                                                q_start=q_start)
    assert out.dtype == q.dtype
    results = [out.float().cpu().numpy(), gl.cpu().numpy(), n.cpu().numpy()]
    if harness.on_gpu():
        del out, gl, n
        torch.cuda.empty_cache()
    return results


def _sel(case: Case, decode_lengths):
    import dataclasses

    return dataclasses.replace(case.sel, chunk_size=1) if decode_lengths is not None else case.sel


def _live(gl, n):
    return np.where(np.arange(gl.shape[-1]) < n[..., None], gl, -1)


def assert_all_pairs_agree(results: dict, dtype: str, same_selection: bool = True) -> dict:
    """Every pair agrees on the output (float32 tolerance between the two references, the
    dtype's otherwise) and, if asked, on the gathered lists. Returns {(a, b): rel err}."""
    errors = {}
    for a, b in itertools.combinations(results, 2):
        tol = TOL["float32"] if {a, b} <= set(REFERENCES) else TOL[dtype]
        errors[(a, b)] = err = rel_err(results[a][0], results[b][0])
        assert err < tol, f"{a} vs {b}: out rel err {err:.3g} >= {tol}"
        if same_selection:
            np.testing.assert_array_equal(results[a][2], results[b][2], err_msg=f"{a} vs {b}")
            np.testing.assert_array_equal(_live(*results[a][1:]), _live(*results[b][1:]),
                                          err_msg=f"{a} vs {b}")
    return errors


def _all(case, inputs, dtype="float32", **kw):
    return {impl: run(impl, case, inputs, dtype, **kw) for impl in IMPLEMENTATIONS}


# ----------------------------------------------------------------------------- CPU (and GPU)
@pytest.mark.parametrize("case", CPU_CASES + BLOCK_CASES, ids=lambda c: c.id)
def test_every_pair_agrees_fp32(case):
    inputs = make_inputs(case, seed=3000 + case.length * 7 + case.q_heads)
    assert_all_pairs_agree(_all(case, inputs), "float32")


def test_every_pair_agrees_bf16():
    """bf16 Pallas and Triton against each other and the float32 references (on the rounded
    inputs): same selection, outputs within 2e-2, really computed in bf16."""
    case = Case(2, 70, 8, 2, 64, small(3, 16, 2, 6, 4, 16, 8))
    results = _all(case, make_inputs(case, seed=2025), "bfloat16")
    errors = assert_all_pairs_agree(results, "bfloat16")
    assert errors[("pallas", "torch_reference")] > 1e-4
    assert errors[("jnp_reference", "triton")] > 1e-4


def test_decode_every_pair_agrees():
    """One decode step per batch element, at different lengths of one cache."""
    case = Case(2, 77, 4, 1, 128, small(2, 16, 3, 5, 4, 1, 4))
    results = _all(case, make_inputs(case, seed=77), decode_lengths=[52, 77])
    assert_all_pairs_agree(results, "float32")


def test_decode_block_picks_every_pair_agrees():
    """Block picks (``key_block``) in decode steps at different lengths of one cache."""
    case = Case(2, 90, 4, 2, 64, Selection(3, 8, 2, 4, 4, 1, 8, key_block=4))
    results = _all(case, make_inputs(case, seed=90), decode_lengths=[61, 90])
    assert_all_pairs_agree(results, "float32")


@pytest.mark.parametrize("decode", [False, True])
def test_attention_key_splits_every_pair_agrees(decode):
    """``Config.attn_splits`` = 3 in both kernels (Pallas and Triton each cut the row tile's
    key tiles into runs and merge the partial softmaxes their own way), for a prefill and for
    decode steps; against the references and each other."""
    import dataclasses

    case = Case(2, 77, 4, 2, 64, small(2, 16, 3, 5, 4, 1 if decode else 16, 4))
    config = dataclasses.replace(kernel_config() or Config(), attn_splits=3)
    kw = dict(decode_lengths=[52, 77]) if decode else {}
    results = _all(case, make_inputs(case, seed=78), config=config, **kw)
    assert_all_pairs_agree(results, "float32")


def _padded_runner(impl: str, sel):
    """f(q, k, v, q_lengths (list of ints)) -> output (float32 numpy) of one implementation;
    the JAX sides are jitted once for all calls of one shape."""
    if impl in ("jnp_reference", "pallas"):
        import jax
        import jax.numpy as jnp

        from kernels.reattention import pallas, reference

        def fn(q, k, v, lengths):
            if impl == "jnp_reference":
                return reference.reattention_with_selection(q, k, v, sel=sel, q_lengths=lengths)
            with pallas.poison_outputs():
                return pallas.reattention_with_selection(
                    q, k, v, sel=sel, q_lengths=lengths,
                    config=kernel_config())

        jitted = jax.jit(fn)
        return lambda q, k, v, lengths: np.asarray(
            jitted(q, k, v, jnp.asarray(lengths, jnp.int32))[0])
    import torch

    from kernels.reattention import reference_torch

    def run_torch(q, k, v, lengths):
        device = harness.torch_device()
        q, k, v = (torch.as_tensor(x).to(device) for x in (q, k, v))
        lengths = torch.as_tensor(lengths, device=device)
        if impl == "triton":
            kernels = triton_kernels()
            with kernels.poison_outputs():
                out = kernels.reattention_with_selection(
                    q, k, v, sel=sel, q_lengths=lengths,
                    config=kernel_config())[0]
        else:
            out = reference_torch.reattention_with_selection(q, k, v, sel=sel,
                                                             q_lengths=lengths)[0]
        return out.float().cpu().numpy()

    return run_torch


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_padding_rows_do_not_vote(impl):
    """``q_lengths``: in a right-padded batch, the real queries of each element get exactly the
    output of that element alone, whatever the padding holds (its 11 rows in the last real
    chunk of element 1 would otherwise outvote the 5 real ones under a cap of 2 keys)."""
    case = Case(2, 61, 4, 2, 64, small(2, 8, 2, 2, 3, 16, 4))
    inputs = make_inputs(case, seed=61)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    other = make_inputs(case, seed=62)  # different padding
    pad = (np.arange(2)[:, None] == 1) & (np.arange(61)[None, :] >= 37)  # element 1's padding
    q2, k2, v2 = (np.where(pad[:, :, None, None], other[n], x) for n, x in zip("qkv", (q, k, v)))
    lengths = [61, 37]
    run = _padded_runner(impl, case.sel)
    out = run(q, k, v, lengths)
    assert np.isfinite(out).all()  # the padding rows get (meaningless) finite outputs
    repadded = run(q2, k2, v2, lengths)
    voting = run(q, k, v, [61, 61])  # no q_lengths: the padding votes
    ref = _padded_runner("torch_reference", case.sel)
    for b, n in enumerate(lengths):
        alone = ref(q[b:b + 1, :n], k[b:b + 1, :n], v[b:b + 1, :n], [n])[0]
        assert rel_err(out[b, :n], alone) < TOL["float32"], f"{impl}: element {b}"
        assert rel_err(repadded[b, :n], alone) < TOL["float32"], f"{impl}: element {b}"
    assert rel_err(voting[1, :37], out[1, :37]) > 1e-3
    np.testing.assert_array_equal(voting[0], out[0])


def test_torch_rope_matches_jax_rope():
    import jax.numpy as jnp
    import torch

    from jax_cca import rope
    from kernels.reattention import reference, reference_torch

    inv = reference.default_inv_freq(64, 500000.0)
    pos = np.array([[0, 1, 7, 1000, 123456]])
    x = np.random.default_rng(0).standard_normal((1, 5, 3, 64), dtype=np.float32)
    cos, sin = rope.rope_cos_sin(jnp.asarray(pos), inv)
    want = rope.apply_rope(jnp.asarray(x), cos, sin)
    tcos, tsin = reference_torch.rope_cos_sin(torch.as_tensor(pos), inv)
    got = reference_torch.apply_rope(torch.as_tensor(x).transpose(1, 2), tcos[:, None],
                                     tsin[:, None]).transpose(1, 2)
    assert rel_err(got.numpy(), np.asarray(want)) < 1e-6
    np.testing.assert_array_equal(reference_torch.default_inv_freq(64, 500000.0), inv)


def test_torch_dispatch_and_errors():
    """kernels.reattention.torch_ops: None picks the reference on CPU tensors (Triton on CUDA);
    named implementations run what they say; bad arguments name the problem."""
    import torch

    from kernels.reattention import reference_torch, torch_ops

    case = Case(1, 40, 4, 2, 64)
    inputs = make_inputs(case, seed=5)
    q, k, v = (torch.as_tensor(inputs[n]).to(harness.torch_device()) for n in "qkv")
    kw = dict(sink_tokens=2, local_window=8, top_k=2, max_selected=3, span=3, chunk_size=16,
              middle_align=4)
    ref = reference_torch.reattention(q, k, v, **kw)
    auto = torch_ops.reattention(q, k, v, **kw)
    if not harness.on_gpu():
        assert torch.equal(auto, ref)  # the reference itself, not a kernel
    with triton_kernels().poison_outputs():
        out = torch_ops.reattention(q, k, v, implementation="triton", **kw)
        step = torch_ops.reattention_decode(q[:, -1], k, v, torch.tensor([40]),
                                            implementation="triton", **kw)
    assert rel_err(out.cpu().numpy(), ref.cpu().numpy()) < 1e-5
    ref_step = torch_ops.reattention_decode(q[:, -1], k, v, torch.tensor([40]),
                                            implementation="torch", **kw)
    assert rel_err(step.cpu().numpy(), ref_step.cpu().numpy()) < 1e-5
    for bad, match in [(dict(top_k=0), "top_k"), (dict(implementation="cuda"),
                                                  "unknown implementation")]:
        with pytest.raises(ValueError, match=match):
            torch_ops.reattention(q, k, v, **{**kw, **bad})
    with pytest.raises(ValueError, match="multiple of kv heads"):
        torch_ops.reattention(q[:, :, :3], k, v)
    with pytest.raises(ValueError, match="a query past the cache"):
        torch_ops.reattention(q, k, v, q_start=torch.tensor([k.shape[1] - q.shape[1] + 1]))
    with pytest.raises(ValueError, match="q_lengths must be integers"):
        torch_ops.reattention(q, k, v, q_lengths=torch.tensor([1.5]))
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, "):
        torch_ops.reattention_decode(q[:, -1], k, v, torch.tensor([0]))
    with pytest.raises(ValueError, match="dtype"):
        torch_ops.reattention(q, k.bfloat16(), v)
    with pytest.raises(ValueError, match="power-of-two head dim"):
        torch_ops.reattention(q[..., :48], k[..., :48], v[..., :48], implementation="triton")


def test_triton_on_cpu_without_the_interpreter_says_so():
    """Without TRITON_INTERPRET=1 at import, CPU tensors get a RuntimeError that says how to run
    (never a silent fallback); implementation=None still runs the reference."""
    script = textwrap.dedent("""
        import json, os
        os.environ.pop("TRITON_INTERPRET", None)
        import torch
        from kernels.reattention import torch_ops
        q = torch.randn(1, 20, 2, 64); k = torch.randn(1, 20, 1, 64)
        kw = dict(sink_tokens=2, local_window=4, chunk_size=8, middle_align=1)
        auto = torch_ops.reattention(q, k, k, **kw)
        try:
            torch_ops.reattention(q, k, k, implementation="triton", **kw)
            error = None
        except RuntimeError as e:
            error = str(e)
        print(json.dumps({"error": error, "finite": bool(torch.isfinite(auto).all())}))
    """)
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["finite"]
    assert out["error"] and "TRITON_INTERPRET=1" in out["error"]


# ----------------------------------------------------------------------------- GPU, real sizes
@needs_gpu
@pytest.mark.parametrize("case", gpu_cases(32768), ids=lambda c: c.id)
def test_gpu_32k_bf16_every_pair(case):
    """The authors' defaults at 32K. bf16 kernels sum bf16 products in another order than the
    float32 references, so a near-tied pick may flip: outputs must agree, selections nearly."""
    results = _all(case, make_inputs(case, seed=32768 + case.kv_heads), "bfloat16")
    errors = assert_all_pairs_agree(results, "bfloat16", same_selection=False)
    for a, b in itertools.combinations(results, 2):
        same = (results[a][2] == results[b][2]).mean()
        assert same > 0.95, f"{a} vs {b}: only {same:.3f} of the chunks select alike"
    print(json.dumps({"-".join(k): round(v, 7) for k, v in errors.items()}))


@needs_gpu
@pytest.mark.parametrize("case", [Case(1, 32768, 32, 8, 128, Selection(key_block=32)),
                                  Case(1, 32768, 32, 8, 64, Selection(key_block=32))],
                         ids=lambda c: c.id)
def test_gpu_32k_bf16_block_picks_every_pair(case):
    """Block picks of 32 keys (span 32, the authors' other defaults) at 32K: head dim 128
    scores 256-wide signed rows with the Triton-lowered kernel, 64 with the Mosaic GPU one."""
    results = _all(case, make_inputs(case, seed=32768 + case.head_dim), "bfloat16")
    errors = assert_all_pairs_agree(results, "bfloat16", same_selection=False)
    for a, b in itertools.combinations(results, 2):  # whole lists (n_g is mostly the cap here)
        same = (_live(*results[a][1:]) == _live(*results[b][1:])).all(axis=-1).mean()
        assert same > 0.95, f"{a} vs {b}: only {same:.3f} of the chunks select alike"
    print(json.dumps({"-".join(k): round(v, 7) for k, v in errors.items()}))


@needs_gpu
@pytest.mark.parametrize("case", [Case(2, 4001, 8, 2, 64, small(16, 512, 4, 32, 8, 256, 64)),
                                  Case(1, 3001, 32, 8, 128, small(32, 1024, 4, 64, 32, 512, 128))],
                         ids=lambda c: c.id)
def test_gpu_fp32_every_pair(case):
    results = _all(case, make_inputs(case, seed=4001 + case.q_heads))
    assert_all_pairs_agree(results, "float32")
