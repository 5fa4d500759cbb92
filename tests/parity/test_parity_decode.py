"""Parity of the decode kernels: the Pallas kernel (kernels/cca/pallas_decode.py), its Triton twin
(kernels/cca/triton_decode.py) and the XLA decode path (``decode.extend_attention`` with
implementation="xla") agree on the new token's output, on the same caches.

Default: six of the CASES of tests/kernels/test_cca_decode_kernel.py (full and CCA; GQA 1, 2, 4,
5; D 64 and 128; float32 and bfloat16; a ring shorter than a key block) through the
interpreters, with every cache slot filled with fresh random values (a mask that admits a wrong
slot changes the result) and NaN-poisoned kernel outputs, at every other pair of its lengths
(group ends, the window rows w..w+g-2, the ring size, 0 and the cache's last position; that
suite runs the Pallas kernel at all of them). With ``--gpu``: compiled, LLaMA-2-7B
and LLaMA-3-8B attention shapes at 128K (CCA) and 32K (full), bf16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_cca import decode
from kernels.cca import pallas_decode
from kernels.cca.pallas_common import poison_outputs
from tests.kernels.test_cca_decode_kernel import (CASES, _cache_config, _length_pairs,
                                                  _new_token, _random_cache)
from tests.parity.harness import needs_gpu, rel_err, torch_device, triton_module

TOL = {"float32": 1e-5, "bfloat16": 2e-2}
# The Triton interpreter takes about 0.7 s per launch: six cases, not eight. Left out: full GQA 5
# at d = 128 and CCA GQA 5 in bf16 (GQA 5 stays covered by the CCA case with the short ring).
PARITY_CASES = [c for c in CASES if c[:3] not in (("full", 10, 2), ("cca", 5, 1))]


def _torch(x):
    """A jax array as a torch tensor of the same dtype (bf16 through float32: exact)."""
    import torch

    dtype = {jnp.dtype("float32"): torch.float32, jnp.dtype("bfloat16"): torch.bfloat16,
             jnp.dtype("int32"): torch.int32, jnp.dtype("bool"): torch.bool}[x.dtype]
    host = np.asarray(x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x)
    return torch.from_numpy(host.copy()).to(device=torch_device(), dtype=dtype)


def _triton(kernels, config, cache, q, k, v, **launch):
    args = [_torch(a) for a in (q[:, 0], k[:, 0], v[:, 0])]
    with kernels.poison_outputs():
        if config.attention == "full":
            out = kernels.full_decode_attention(*args, _torch(cache.k), _torch(cache.v),
                                                _torch(cache.lengths), **launch)
        else:
            out = kernels.cca_decode_attention(
                *args, *(_torch(a) for a in (cache.core_k, cache.core_v, cache.ring_k,
                                             cache.ring_v, cache.lengths)),
                group_size=config.group_size, local_window=config.local_window, **launch)
    return out.float().cpu().numpy()


def _pallas(config, cache, q, k, v):
    args = (q[:, 0], k[:, 0], v[:, 0])
    if config.attention == "full":
        return pallas_decode.full_decode_attention(*args, cache.k, cache.v, cache.lengths)
    return pallas_decode.cca_decode_attention(
        *args, cache.core_k, cache.core_v, cache.ring_k, cache.ring_v, cache.lengths,
        group_size=config.group_size, local_window=config.local_window)


def _assert_both_agree(got_triton, got_pallas, want, dtype, context):
    """Triton and Pallas each within the dtype's tolerance of the XLA path."""
    for name, got in (("triton", got_triton), ("pallas", got_pallas)):
        err = rel_err(np.asarray(jnp.asarray(got, jnp.float32)), np.asarray(want, np.float32))
        assert err < TOL[dtype], (name, context, err)


def _xla(config, cache, q, k, v):
    out, _ = decode.extend_attention(cache, q, k, v, jnp.ones(q.shape[:1], jnp.int32), config,
                                     implementation="xla")
    return out[:, 0]


@pytest.mark.parametrize("case", PARITY_CASES, ids=lambda c: "-".join(map(str, c)))
def test_triton_pallas_and_xla_decode_agree(case):
    attention, hq, hkv, d, g, w, max_len, dtype = case
    kernels = triton_module("kernels.cca.triton_decode")
    config = _cache_config(attention, hq, hkv, d, g, w, dtype)
    pallas, xla = jax.jit(lambda *a: _pallas(config, *a)), jax.jit(lambda *a: _xla(config, *a))
    for i, lengths in enumerate(_length_pairs(g, w, max_len)[::2]):
        cache = _random_cache(config, 2, max_len, lengths, seed=100 + i)
        q, k, v = _new_token(config, 2, seed=100 + i)
        with poison_outputs():
            got_pallas = pallas(cache, q, k, v)
        launch = {"num_splits": 1 + i % 3, "block_k": 16}  # one, two and three splits
        got_triton = _triton(kernels, config, cache, q, k, v, **launch)
        _assert_both_agree(got_triton, got_pallas, xla(cache, q, k, v), dtype, lengths)
        assert rel_err(got_triton, np.asarray(got_pallas, np.float32)) < TOL[dtype], lengths


def test_triton_decode_refuses_bad_inputs():
    import torch

    kernels = triton_module("kernels.cca.triton_decode")
    q, kv = torch.zeros(1, 4, 64), torch.zeros(1, 2, 64)
    cache, pos = torch.zeros(1, 8, 2, 64), torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="head dim"):
        kernels.full_decode_attention(q[..., :48], kv[..., :48], kv[..., :48],
                                      cache[..., :48], cache[..., :48], pos)
    with pytest.raises(ValueError, match="dtype"):
        kernels.full_decode_attention(q, kv, kv, cache.half(), cache, pos)
    with pytest.raises(ValueError, match="positions"):
        kernels.full_decode_attention(q, kv, kv, cache, cache, pos.float())
    with pytest.raises(ValueError, match="multiple of group_size"):
        kernels.cca_decode_attention(q, kv, kv, cache, cache, cache, cache, pos, group_size=4,
                                     local_window=6)


@needs_gpu
@pytest.mark.parametrize("attention, hq, hkv, t", [("cca", 32, 32, 131072), ("cca", 32, 8, 131072),
                                                   ("full", 32, 32, 32768), ("full", 32, 8, 32768)])
def test_gpu_decode_parity_at_real_sizes(attention, hq, hkv, t):
    """Compiled, bf16, batch 2 at positions t - 1 and t - 5 (CCA: 8K core slots and a 1,040-row
    ring; full: a 32K cache), the kernels' default launch settings."""
    kernels = triton_module("kernels.cca.triton_decode")
    config = _cache_config(attention, hq, hkv, 128, 16, 1024, "bfloat16")
    cache = _random_cache(config, 2, t, [t - 1, t - 5], seed=7)
    q, k, v = _new_token(config, 2, seed=7)
    got_pallas = jax.jit(lambda *a: _pallas(config, *a))(cache, q, k, v)
    got_triton = _triton(kernels, config, cache, q, k, v, num_splits=8, block_k=64)
    want = jax.jit(lambda *a: _xla(config, *a))(cache, q, k, v)
    _assert_both_agree(got_triton, got_pallas, want, "bfloat16", t)


# ---------------------------------------------------------------------------- the small kernels
def _rand(rng, shape, dtype):
    return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)


def _close(got, want, dtype, ulps, atol_ulps=0):
    """Elementwise within ``ulps`` units in the last place of ``dtype`` (0: to the bit), plus
    ``atol_ulps`` units of 1.0 for results that cancel terms of magnitude about 1."""
    got = np.asarray(jnp.asarray(got, jnp.float32))
    want = np.asarray(jnp.asarray(want, jnp.float32))
    assert np.isfinite(got).all()
    eps = float(jnp.finfo(dtype).eps)
    if ulps == 0:
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=ulps * eps, atol=atol_ulps * eps)


ROPE_CASES = [(4, 4, 64, 24, 24, "float32"), (6, 2, 32, 17, 17, "bfloat16"),
              (4, 1, 64, 40, 40, "bfloat16")]


def _rope_case(hq, hkv, d, rows, modulus, dtype, seed, positions):
    from tests.kernels.test_rope_append_kernel import _cos_sin

    rng = np.random.default_rng(seed)
    b = len(positions)
    qkv = _rand(rng, (b, hq + 2 * hkv, d), dtype)
    k_buf, v_buf = _rand(rng, (b, rows, hkv, d), dtype), _rand(rng, (b, rows, hkv, d), dtype)
    positions = jnp.asarray(positions, jnp.int32)
    cos, sin = _cos_sin(positions, d, theta=500000.0)
    n_valid = jnp.asarray([int(i % 3 != 2) for i in range(b)], jnp.int32)
    return qkv, cos, sin, k_buf, v_buf, positions, n_valid


def _rope_twins(case, args):
    from kernels.cca import pallas_rope_append

    hq, _, _, rows, modulus, dtype = case
    limit = rows + 5  # the second of the positions below is not written
    with poison_outputs():
        pallas = jax.jit(lambda *a: pallas_rope_append.rope_append(
            *a, num_heads=hq, modulus=modulus, limit=limit))(*args)
    kernels = triton_module("kernels.cca.triton_decode_step")
    with kernels.poison_outputs():
        triton = kernels.rope_append(*(_torch(a) for a in args), num_heads=hq, modulus=modulus,
                                     limit=limit)
    for name, a, b in zip(("q", "k", "v", "k_buf", "v_buf", "lengths"), triton, pallas,
                          strict=True):
        # v is a copy, lengths a sum: to the bit. The rotated rows may differ where a compiler
        # contracts a product and the sum into one FMA: the tolerance of tests/kernels/
        # test_rope_append_kernel.py (2 ulp, and 4 ulp of the N(0, 1) inputs' scale).
        if name == "lengths":
            np.testing.assert_array_equal(a.cpu().numpy(), np.asarray(b))
        elif name.startswith("v"):
            _close(a.float().cpu().numpy(), b, dtype, 0)
        else:
            _close(a.float().cpu().numpy(), b, dtype, 2, atol_ulps=4)


@pytest.mark.parametrize("case", ROPE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_rope_append_twins_agree(case):
    """Triton and Pallas RoPE + cache write: MHA and GQA, positions past the modulus (wrapping),
    a row without a valid token and one at the write limit (both left unwritten), buffer rows
    not a power of two; the new lengths."""
    hq, hkv, d, rows, modulus, dtype = case
    args = _rope_case(*case, seed=rows, positions=[3, rows + 5, 2 * rows - 1, 0])
    _rope_twins(case, args)


POOL_CASES = [("cca", 4, 2, 64, 4, 24, "float32"), ("mean", 4, 4, 32, 8, 24, "float32"),
              ("max", 6, 2, 32, 4, 12, "float32"), ("cca", 8, 2, 64, 16, 32, "bfloat16")]


def _pool_case(g, hq, hkv, d, ring, dtype, seed, n):
    rng = np.random.default_rng(seed)
    # Sequences: completes group 1; completes group R / g + 1 (its rows wrapped around the ring;
    # needs n > R / g + 1); does not complete one; completes one but is not valid; completes
    # group n (no slot).
    positions = jnp.asarray([2 * g - 1, ring + 2 * g - 1, 2 * g, g - 1, (n + 1) * g - 1],
                            jnp.int32)
    n_valid = jnp.asarray([1, 1, 1, 0, 1], jnp.int32)
    b = positions.shape[0]
    return (_rand(rng, (b, hq, d), dtype), _rand(rng, (b, ring, hkv, d), dtype),
            _rand(rng, (b, ring, hkv, d), dtype), _rand(rng, (b, n, hkv, d), dtype),
            _rand(rng, (b, n, hkv, d), dtype), positions, n_valid)


def _pool_twins(pooling, g, dtype, args):
    from kernels.cca import pallas_decode_pool

    with poison_outputs():
        pallas = jax.jit(lambda *a: pallas_decode_pool.pool_decode_step(
            *a, group_size=g, pooling=pooling))(*args)
    kernels = triton_module("kernels.cca.triton_decode_step")
    triton = kernels.pool_decode_step(*(_torch(a) for a in args), group_size=g, pooling=pooling)
    for a, b, old in zip(triton, pallas, args[3:5], strict=True):
        a = a.float().cpu().numpy()
        changed = np.any(np.asarray(b, np.float32) != np.asarray(old, np.float32), axis=(2, 3))
        assert changed[:2].any(axis=1).all() and not changed[2:].any(), changed
        # The tolerance of the core slots in tests/kernels/test_cca_decode_kernel.py: float32
        # sums in another order (1e-5 relative, 1e-6 absolute); one bf16 unit in the last place.
        if dtype == "float32":
            np.testing.assert_allclose(a, np.asarray(b), rtol=1e-5, atol=1e-6)
        else:
            _close(a, b, dtype, 1, atol_ulps=0.1)


@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: "-".join(map(str, c)))
def test_pool_decode_step_twins_agree(case):
    """Triton and Pallas pooling of the group a decode step completes ("cca", "mean", "max";
    GQA 1, 2, 3, 4): the completed groups' slots agree to float32 rounding, every other slot is
    untouched in both."""
    pooling, hq, hkv, d, g, ring, dtype = case
    args = _pool_case(g, hq, hkv, d, ring, dtype, seed=hq * g, n=ring // g + 3)
    _pool_twins(pooling, g, dtype, args)


@pytest.mark.parametrize("pooling,dtype", [("cca", "float32"), ("max", "bfloat16")])
def test_pooling_in_the_attention_launch_against_the_triton_twins(pooling, dtype):
    """Pallas ``cca_decode_step`` (the pooling as programs of the attention's launch) against
    the Triton twins run one after the other (``pool_decode_step``, then
    ``cca_decode_attention`` over the pooled core): the output within the decode tolerance, the
    pooled core slots as in the pooling parity above; rows that complete a group, one that does
    not and one with n_valid 0. Core and ring of at least a key block, as the fusion needs."""
    hq, hkv, d, g, max_len = 4, 2, 64, 4, 256
    w = 32 if dtype == "float32" else 64
    config = _cache_config("cca", hq, hkv, d, g, w, dtype).replace(pooling=pooling)
    lengths = [g * 5 - 1, 2 * w + 2, g * 20 - 1, g * 9 - 1]
    n_valid = jnp.asarray([1, 1, 1, 0], jnp.int32)
    cache = _random_cache(config, 4, max_len, lengths, seed=11)
    q, k, v = (x[:, 0] for x in _new_token(config, 4, seed=11))
    ring = cache.append(k[:, None], v[:, None], n_valid)
    t = cache.lengths  # the new token's position (append advanced ring.lengths past it)
    args = (q, k, v, ring.core_k, ring.core_v, ring.ring_k, ring.ring_v, t)
    with poison_outputs():
        got = jax.jit(lambda *a: pallas_decode.cca_decode_step(
            *a, n_valid, group_size=g, local_window=w, pooling=pooling))(*args)
    step, attend = (triton_module(f"kernels.cca.{m}") for m in ("triton_decode_step",
                                                               "triton_decode"))
    core_k, core_v = step.pool_decode_step(
        *(_torch(a) for a in (q, ring.ring_k, ring.ring_v, ring.core_k, ring.core_v, t,
                              n_valid)), group_size=g, pooling=pooling)
    with attend.poison_outputs():
        out = attend.cca_decode_attention(
            *(_torch(a) for a in (q, k, v)), core_k, core_v,
            *(_torch(a) for a in (ring.ring_k, ring.ring_v, t)), group_size=g,
            local_window=w)
    assert rel_err(out.float().cpu().numpy(), np.asarray(got[0], np.float32)) < TOL[dtype]
    for a, b in zip((core_k, core_v), got[1:], strict=True):
        a = a.float().cpu().numpy()
        if dtype == "float32":
            np.testing.assert_allclose(a, np.asarray(b), rtol=1e-5, atol=1e-6)
        else:
            _close(a, b, dtype, 1, atol_ulps=0.1)
    pooled = np.any(np.asarray(got[1] != ring.core_k), axis=(2, 3))
    assert pooled.sum(axis=1).tolist() == [1, 0, 1, 0]


NORM_CASES = [((3, 1, 64), "float32", True), ((2, 256), "bfloat16", True),
              ((4, 128), "bfloat16", False), ((2, 96), "float32", True)]


@pytest.mark.parametrize("shape, dtype, with_residual", NORM_CASES, ids=str)
def test_add_rms_norm_twins_agree(shape, dtype, with_residual):
    """Triton (any width: 96 too) and Pallas (powers of two) add + RMSNorm against the model's
    math: the sum to the bit, the normalised row within 2 ulp (see test_rms_norm_kernel.py)."""
    from kernels.rms_norm import pallas as norm_pallas
    from kernels.rms_norm import reference as norm_reference

    rng = np.random.default_rng(shape[-1])
    x, r = _rand(rng, shape, dtype), _rand(rng, shape, dtype)
    w = jnp.asarray(1 + 0.2 * rng.standard_normal(shape[-1:], np.float32), dtype)
    r = r if with_residual else None
    want = norm_reference.add_rms_norm(x, r, w, 1e-5)
    kernels = triton_module("kernels.rms_norm.triton")
    with kernels.poison_outputs():
        got = kernels.add_rms_norm(_torch(x), None if r is None else _torch(r), _torch(w),
                                   eps=1e-5)
    sides = [("triton", tuple(a.float().cpu().numpy() for a in got))]
    if norm_pallas.supports(shape[-1]):
        with poison_outputs():
            sides.append(("pallas", jax.jit(lambda x, r, w: norm_pallas.add_rms_norm(
                x, r, w, eps=1e-5))(x, r, w)))
    for _, (s, y) in sides:
        _close(s, want[0], dtype, 0)
        _close(y, want[1], dtype, 2)


@needs_gpu
def test_gpu_small_kernel_twins_at_real_sizes():
    """Compiled, bf16, LLaMA-2-7B shapes: RoPE/append into a 1,040-row ring at positions near
    128K, pooling of 32/32 and 32/8 heads with g = 16 into 8K core slots, add + RMSNorm of 25
    rows of 4,096."""
    _rope_twins((32, 32, 128, 1040, 1040, "bfloat16"),
                _rope_case(32, 32, 128, 1040, 1040, "bfloat16", 3, [131071, 131070, 70000]))
    for hkv in (32, 8):
        args = _pool_case(16, 32, hkv, 128, 1040, "bfloat16", seed=hkv, n=8192)
        _pool_twins("cca", 16, "bfloat16", args)
    test_add_rms_norm_twins_agree((25, 1, 4096), "bfloat16", True)
