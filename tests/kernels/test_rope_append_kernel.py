"""The RoPE + cache-append kernel of a decode step (kernels/cca/pallas_rope_append.py) against
the XLA ops it replaces: ``jax_cca.rope.apply_rope`` and the caches' ``append``.

On CPU the kernel runs through the Pallas interpreter with NaN-poisoned outputs (a head it
forgot to write poisons the result); on the GPU (``-m gpu``) compiled, at LLaMA-2-7B and GQA
shapes. v and every buffer row the step does not write must equal the XLA ops' to the bit;
rotated q and k (and the written key rows) agree to within two units in the last place of their
dtype: the kernel rounds each product and the sum to the input dtype as ``apply_rope`` does, but
XLA may contract a product and the sum into one fused multiply-add.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_cca import CCAConfig, CCALlama, decode
from jax_cca.rope import apply_rope, inverse_frequencies, rope_cos_sin
from kernels.cca import pallas_rope_append
from kernels.cca.pallas_common import poison_outputs
from tests.kernels.conftest import export_for_cuda
from tests.kernels.test_cca_decode_kernel import _random_cache

ON_GPU = jax.default_backend() == "gpu"
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (runs on the device machine)")


def _inputs(b, hq, hkv, d, rows, dtype, seed):
    rng = np.random.default_rng(seed)
    rand = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
    return rand(b, hq + 2 * hkv, d), rand(b, rows, hkv, d), rand(b, rows, hkv, d)


def _xla(qkv, k_buf, v_buf, positions, n_valid, hq, modulus, limit, cos, sin):
    """apply_rope on q and k, the write of k and v to row positions % modulus where n_valid > 0
    and positions < limit (what the decode step did in XLA), and the lengths' sum."""
    hkv = k_buf.shape[2]
    q, k, v = qkv[:, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:]
    q = apply_rope(q[:, None], cos[:, None], sin[:, None])[:, 0]
    k = apply_rope(k[:, None], cos[:, None], sin[:, None])[:, 0]
    write = (n_valid > 0) & (positions < limit)
    index = jnp.where(write, positions % modulus, k_buf.shape[1])[:, None]
    batch = jnp.arange(qkv.shape[0])[:, None]
    k_buf = k_buf.at[batch, index].set(k[:, None], mode="drop")
    v_buf = v_buf.at[batch, index].set(v[:, None], mode="drop")
    return q, k, v, k_buf, v_buf, positions + n_valid


def _cos_sin(positions, d, theta=10000.0):
    config = CCAConfig.tiny(head_dim=d, num_heads=1, num_kv_heads=1, hidden_size=d,
                            rope_theta=theta)
    cos, sin = rope_cos_sin(positions[:, None], inverse_frequencies(config))
    return cos[:, 0], sin[:, 0]


def _assert_equal(got, want):
    """v and the value buffer to the bit; q, k and the key buffer within 2 ulp (see above)."""
    for name, a, b in zip(("q", "k", "v", "k_buf", "v_buf", "lengths"), got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        if name.startswith("v") or name == "lengths":
            np.testing.assert_array_equal(a, b, err_msg=name)
        else:
            eps = float(jnp.finfo(got[0].dtype).eps)
            np.testing.assert_allclose(a, b, rtol=2 * eps, atol=4 * eps, err_msg=name)


# (Hq, Hkv, D, rows, modulus, dtype): MHA, GQA 4 and 3 (24/8: G not a power of two), D 64 and
# 128, a ring smaller than its buffer's rows is not used by the caches but is allowed.
CASES = [
    (4, 4, 64, 40, 40, "float32"),
    (8, 2, 128, 24, 20, "float32"),
    (6, 2, 64, 33, 33, "bfloat16"),
    (4, 1, 128, 17, 16, "bfloat16"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_rope_append_equals_xla_ops(case):
    """Batch 3 at positions inside the buffer, past the modulus (wrapping), one row with no
    valid token and positions at or past ``limit`` (not written): every output equal as above,
    the new lengths exact; the old lengths (garbage here) are overwritten, not read."""
    hq, hkv, d, rows, modulus, dtype = case
    limit = 2 * modulus + 1
    run = jax.jit(lambda *a: pallas_rope_append.rope_append(*a, num_heads=hq, modulus=modulus,
                                                            limit=limit))
    n_valid = jnp.asarray([1, 0, 1], jnp.int32)
    with poison_outputs():
        for seed, pos in enumerate([(0, 5, modulus - 1), (modulus, 3 * modulus + 2, 77777)]):
            qkv, k_buf, v_buf = _inputs(3, hq, hkv, d, rows, dtype, seed)
            positions = jnp.asarray(pos, jnp.int32)
            cos, sin = _cos_sin(positions, d)
            got = run(qkv, cos, sin, k_buf, v_buf, positions, n_valid, jnp.full((3,), -7))
            _assert_equal(got, _xla(qkv, k_buf, v_buf, positions, n_valid, hq, modulus, limit,
                                    cos, sin))
            # Rows other than the written ones keep their values, to the bit.
            written = np.zeros(k_buf.shape[:2], bool)
            for b, (p, n) in enumerate(zip(pos, [1, 0, 1])):
                written[b, p % modulus] = n > 0 and p < limit
            assert written.sum() == 2 - seed  # rows without a token, then also one past limit
            np.testing.assert_array_equal(np.asarray(got[3])[~written], np.asarray(k_buf)[~written])


def test_rope_append_refuses_bad_inputs():
    qkv, k_buf, v_buf = _inputs(2, 4, 2, 64, 8, "float32", 0)
    pos = jnp.zeros((2,), jnp.int32)
    cos = sin = jnp.zeros((2, 64))
    call = pallas_rope_append.rope_append
    with pytest.raises(ValueError, match="num_heads"):
        call(qkv, cos, sin, k_buf, v_buf, pos, pos, num_heads=6)
    with pytest.raises(ValueError, match="cos and sin"):
        call(qkv, cos[:, :32], sin, k_buf, v_buf, pos, pos, num_heads=4)
    with pytest.raises(ValueError, match="modulus"):
        call(qkv, cos, sin, k_buf, v_buf, pos, pos, num_heads=4, modulus=9)
    with pytest.raises(ValueError, match="buffers"):
        call(qkv, cos, sin, k_buf, v_buf[:, :4], pos, pos, num_heads=4)
    with pytest.raises(ValueError, match="lengths must be"):
        call(qkv, cos, sin, k_buf, v_buf, pos, pos, pos[:1], num_heads=4)
    with pytest.raises(ValueError, match="power-of-two head dim"):
        call(qkv[..., :48], cos[:, :48], sin[:, :48], k_buf[..., :48], v_buf[..., :48], pos, pos,
             num_heads=4)
    assert pallas_rope_append.supports(128) and not pallas_rope_append.supports(96)


@pytest.mark.parametrize("attention", ["full", "cca"])
def test_decode_step_unrotated_equals_rotate_then_extend(attention):
    """``decode.decode_step_unrotated`` (the model's one-token Pallas path) against rotating in
    XLA and calling ``extend_attention`` with the same kernels: same output and cache (float32
    rounding: one bit of the rotated key), for
    lengths at a group end (pooling), past the ring and at the cache's last position."""
    config = CCAConfig.tiny(attention=attention, num_heads=4, num_kv_heads=2, head_dim=64,
                            hidden_size=256, group_size=4, local_window=8, num_layers=1,
                            implementation="pallas")
    hq, hkv, max_len = 4, 2, 48
    assert decode.rotates_in_kernel(_random_cache(config, 2, max_len, [0, 0], 0), 1, config)
    new = jax.jit(lambda c, qkv, cos, sin, pos: decode.decode_step_unrotated(
        c, qkv, cos, sin, jnp.ones((2,), jnp.int32), config, positions=pos))

    def old(cache, qkv, cos, sin):
        q, k, v = qkv[:, None, :hq], qkv[:, None, hq:hq + hkv], qkv[:, None, hq + hkv:]
        q, k = apply_rope(q, cos[:, None], sin[:, None]), apply_rope(k, cos[:, None], sin[:, None])
        out, cache = decode.extend_attention(cache, q, k, v, jnp.ones((2,), jnp.int32), config)
        return out[:, 0], cache

    with poison_outputs():
        for seed, lengths in enumerate([(3, 11), (15, 30), (47, 0)]):
            cache = _random_cache(config, 2, max_len, lengths, seed)
            qkv = _inputs(2, hq, hkv, 64, 1, "float32", seed + 50)[0]
            cos, sin = _cos_sin(jnp.asarray(lengths, jnp.int32), 64)
            # the step's positions as a separate array (a model's layer 0 lengths), or None
            pos = None if seed % 2 else jnp.asarray(lengths, jnp.int32)
            got, got_cache = new(cache, qkv, cos, sin, pos)
            want, want_cache = jax.jit(old)(cache, qkv, cos, sin)
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
            for a, b in zip(jax.tree_util.tree_leaves(got_cache),
                            jax.tree_util.tree_leaves(want_cache), strict=True):
                if a.dtype == jnp.int32:
                    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
                else:  # the rotated key may differ in its last bit (see the module docstring)
                    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6,
                                               atol=1e-6)


def test_model_decode_step_leaves_no_lengths_arithmetic_to_xla(monkeypatch):
    """The model's one-token step lowered for CUDA (jax.export, on the CPU): the write
    predicate and the new lengths of every layer are computed inside ``rope_append``, so no
    per-layer compare, convert or add on the (B,) lengths is left to XLA. Each of those was a
    one-thread kernel of its own, twice per layer (64 launches of a 7B step)."""
    import re
    from flax import nnx

    config = CCAConfig.tiny(attention="cca", num_layers=3, num_heads=4, num_kv_heads=2,
                            head_dim=64, hidden_size=128, group_size=4, local_window=8,
                            implementation="pallas")
    model = CCALlama.from_config(config)
    graphdef, state = nnx.split(model)
    cache = model.init_cache(2, 64)

    def step(state, tokens, cache):
        return nnx.merge(graphdef, state).cached_forward(
            tokens[:, None], jnp.ones((2,), jnp.int32), cache, prefill=False)

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # lower the Pallas GPU path
    text = export_for_cuda(step, state, jnp.zeros((2,), jnp.int32), cache).mlir_module()
    monkeypatch.undo()
    scalar_ops = re.findall(r"stablehlo\.(compare|convert|add|and)\b[^\n]*tensor<2xi(?:32|1)>"
                            r"(?: loc\([^)]*\))?\s*$", text, re.M)
    assert scalar_ops == [], scalar_ops
    assert len(re.findall(r'"?rope_append"?', text)) >= 3  # the kernel path was lowered


def test_model_takes_the_kernel_path_only_for_one_token_pallas_steps():
    config = CCAConfig.tiny(attention="cca", group_size=4, local_window=8)
    cache = CCALlama.from_config(config).init_cache(1, 32)[0]
    pallas = config.replace(implementation="pallas")
    assert decode.rotates_in_kernel(cache, 1, pallas)
    assert not decode.rotates_in_kernel(cache, 2, pallas)
    assert not decode.rotates_in_kernel(cache, 1, config.replace(implementation="xla"))
    reatt = CCALlama.from_config(config.replace(attention="reattention")).init_cache(1, 32)[0]
    assert not decode.rotates_in_kernel(reatt, 1, pallas)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("hq, hkv, rows, modulus", [(32, 32, 1040, 1040), (32, 8, 131144, 131144),
                                                    (24, 8, 1040, 1040)])
def test_gpu_rope_append_equals_xla_ops(hq, hkv, rows, modulus):
    """Compiled at LLaMA-2-7B (32/32, ring of 1,040), LLaMA-3-8B (32/8, a full 128K cache) and
    LLaMA-3.2-3B (24/8) shapes, bf16, batch 2, positions near 128K: equal as above."""
    d = 128
    qkv, k_buf, v_buf = _inputs(2, hq, hkv, d, rows, "bfloat16", 7)
    positions = jnp.asarray([131071, rows - 1], jnp.int32)
    n_valid = jnp.asarray([1, 1], jnp.int32)
    cos, sin = _cos_sin(positions, d, theta=500000.0)
    got = jax.jit(lambda *a: pallas_rope_append.rope_append(*a, num_heads=hq, modulus=modulus,
                                                            limit=131144))(
        qkv, cos, sin, k_buf, v_buf, positions, n_valid)
    want = jax.jit(lambda *a: _xla(*a, hq, modulus, 131144, cos, sin))(
        qkv, k_buf, v_buf, positions, n_valid)
    _assert_equal(got, want)
