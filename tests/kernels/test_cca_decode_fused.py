"""The CCA decode step in one or two launches (kernels/cca/pallas_decode_fused.py) against the
three-launch step it replaces (``pallas_rope_append.rope_append``, then
``pallas_decode.cca_decode_step`` and its combine): the output, both cores, both rings and the
lengths to the bit in 16-bit dtypes. In float32 the rotation's products and sum are not rounded
in between, so a compiler may fuse them into a multiply-add in one kernel and not in the other
(jax 0.11's interpreter does): there the float arrays agree to within 1e-6.

On CPU the kernels run through the Pallas interpreter with NaN-poisoned outputs (a partial or
an output tile that no program wrote poisons the result), with random values in every cache
slot, visible or not. Lengths cover a completed group (pooling), rows with n_valid 0, the last
core slot, a position past the cache's capacity and the ring's wrap; MHA, GQA 3 (padded rows)
and GQA 4 in bf16. On the GPU (``-m gpu``) the same comparison at LLaMA-2-7B shapes at 32K and
128K, where the P programs of a (sequence, kv head) run concurrently and the last to finish
merges the splits: a race in that hand-off would show as a difference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_cca import CCAConfig, CCALlama, decode
from kernels.cca import pallas_decode, pallas_decode_fused, pallas_rope_append
from kernels.cca.pallas_common import poison_outputs
from tests.kernels.conftest import export_for_cuda
from tests.kernels.test_cca_decode_kernel import _cache_config, _random_cache
from tests.kernels.test_rope_append_kernel import _cos_sin

ON_GPU = jax.default_backend() == "gpu"
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (runs on the device machine)")


def _three_launches(config, cache, qkv, cos, sin, positions, n_valid, launch=None):
    """The step as the model runs it with ``STEP_LAUNCHES = None``."""
    r, kw = cache.ring, dict(group_size=config.group_size, local_window=config.local_window,
                             config=launch)
    q, k, v, ring_k, ring_v, lengths = pallas_rope_append.rope_append(
        qkv, cos, sin, cache.ring_k, cache.ring_v, positions, n_valid, cache.lengths,
        num_heads=config.num_heads, modulus=r, limit=cache.max_len)
    out, core_k, core_v = pallas_decode.cca_decode_step(
        q, k, v, cache.core_k, cache.core_v, ring_k, ring_v, positions, n_valid,
        pooling=config.pooling, **kw)
    return out, core_k, core_v, ring_k, ring_v, lengths


def _fused(config, cache, qkv, cos, sin, positions, n_valid, combine, launch=None):
    counters = jnp.zeros((qkv.shape[0], config.num_kv_heads), jnp.int32) if combine else None
    return pallas_decode_fused.cca_decode_step_rotating(
        qkv, cos, sin, cache.core_k, cache.core_v, cache.ring_k, cache.ring_v, positions,
        n_valid, cache.lengths, counters, num_heads=config.num_heads,
        group_size=config.group_size, local_window=config.local_window, max_len=cache.max_len,
        pooling=config.pooling, config=launch)


def _compare(config, cache, qkv, cos, sin, positions, n_valid, launch=None):
    want = jax.jit(_three_launches, static_argnums=(0, 7))(config, cache, qkv, cos, sin,
                                                           positions, n_valid, launch)
    names = ("out", "core_k", "core_v", "ring_k", "ring_v", "lengths")
    for combine in (False, True):
        got = jax.jit(_fused, static_argnums=(0, 7, 8))(config, cache, qkv, cos, sin, positions,
                                                        n_valid, combine, launch)
        if combine:
            np.testing.assert_array_equal(np.asarray(got[-1]), 0, err_msg="counters left")
            got = got[:-1]
        for name, a, b in zip(names, got, want, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            msg = f"{name}, combine={combine}"
            if a.dtype == jnp.float32:
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6,
                                           err_msg=msg)
            else:
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=msg)


@pytest.mark.parametrize("pooling,hq,dtype", [("cca", 2, "float32"), ("cca", 6, "float32"),
                                              ("mean", 2, "float32"), ("cca", 8, "bfloat16")])
def test_one_launch_equals_three_launches(pooling, hq, dtype):
    hkv, d, g, max_len = 2, 64, 4, 256  # N = 64 core slots
    w = 32 if dtype == "float32" else 64  # R = w + g: at least a key block (32 / 64 rows)
    config = _cache_config("cca", hq, hkv, d, g, w, dtype).replace(pooling=pooling)
    rng = np.random.default_rng(hq)
    n = max_len // g
    cases = (([g * 5 - 1, 2 * w + 2, g * 9 - 1, n * g + 3], [1, 1, 0, 1]),  # pool / not / n_valid
             ([w + g - 1, g * 20 - 1, 1, n * g - 1], [1, 1, 0, 1]),  # 0 / past the capacity
             ([0, 3 * (w + g) + 5, max_len - 2, g - 1], [1, 1, 1, 1]))  # ring wrapped; last slot
    for seed, (lengths, valid) in enumerate(cases):
        cache = _random_cache(config, 4, max_len, lengths, seed)
        qkv = jnp.asarray(rng.standard_normal((4, hq + 2 * hkv, d), np.float32), dtype)
        positions = jnp.asarray(lengths, jnp.int32)
        cos, sin = _cos_sin(positions, d)
        with poison_outputs():
            _compare(config, cache, qkv, cos, sin, positions, jnp.asarray(valid, jnp.int32))


def test_many_splits_merge_in_a_loop():
    """36 splits: past ``pallas_decode.UNROLL_SPLITS`` (32), the merge of the last program
    loops over the partials instead of unrolling; most shares are empty (lse -huge)."""
    config = _cache_config("cca", 2, 2, 64, 4, 32)
    launch = pallas_decode.DecodeConfig(block_k=32, num_warps=4, num_stages=2, num_splits=36)
    assert launch.num_splits > pallas_decode.UNROLL_SPLITS
    lengths = [4 * 9 - 1, 200]
    cache = _random_cache(config, 2, 256, lengths, 11)
    qkv = jnp.asarray(np.random.default_rng(11).standard_normal((2, 6, 64), np.float32))
    positions = jnp.asarray(lengths, jnp.int32)
    cos, sin = _cos_sin(positions, 64)
    with poison_outputs():
        _compare(config, cache, qkv, cos, sin, positions, jnp.ones((2,), jnp.int32), launch)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2), (8, 2)])
def test_lowers_for_cuda(hq, hkv, monkeypatch):
    """Both modes lower to Triton for CUDA (jax.export on the CPU) for MHA and GQA, padded or
    not: the interpreter accepts loads that the Triton lowering refuses (a first version's
    swapped-halves load of a query tile passed every CPU test and failed to lower for GQA)."""
    config = _cache_config("cca", hq, hkv, 64, 4, 64, "bfloat16")
    cache = jax.eval_shape(lambda: _random_cache(config, 2, 256, [5, 9], 0))
    spec = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt)
    qkv = spec((2, hq + 2 * hkv, 64), jnp.bfloat16)
    vec, cs = spec((2,), jnp.int32), spec((2, 64), jnp.float32)
    for combine in (False, True):
        step = jax.jit(lambda *a, combine=combine: _fused(config, *a, combine))
        with monkeypatch.context() as m:
            m.setattr(jax, "default_backend", lambda: "gpu")  # lower the GPU kernels
            text = export_for_cuda(step, cache, qkv, cs, cs, vec, vec).mlir_module()
        assert "cca_decode_step" in text
        assert ("decode_combine" in text) != combine


def test_bad_inputs_raise_clear_errors():
    config = _cache_config("cca", 4, 2, 64, 4, 32)
    cache = _random_cache(config, 2, 256, [5, 9], 0)
    qkv = jnp.ones((2, 8, 64))
    cos = sin = jnp.ones((2, 64))
    t = jnp.asarray([5, 9], jnp.int32)
    step = pallas_decode_fused.cca_decode_step_rotating
    args = (cache.core_k, cache.core_v, cache.ring_k, cache.ring_v, t, t, t)
    kw = dict(num_heads=4, group_size=4, local_window=32, max_len=256)
    with pytest.raises(ValueError, match="qkv has 7 heads"):
        step(qkv[:, :7], cos, sin, *args, **kw)
    with pytest.raises(ValueError, match="cos and sin must be"):
        step(qkv, cos[:, :32], sin, *args, **kw)
    with pytest.raises(ValueError, match="counters must be"):
        step(qkv, cos, sin, *args, jnp.zeros((2, 2), jnp.float32), **kw)
    with pytest.raises(ValueError, match="at least a key block"):
        step(qkv, cos, sin, cache.core_k[:, :8], cache.core_v[:, :8], *args[2:], **kw)
    with pytest.raises(ValueError, match="multiple of group_size"):
        step(qkv, cos, sin, *args, **{**kw, "local_window": 30})
    with pytest.raises(ValueError, match="ring of 36 slots cannot hold"):
        step(qkv, cos, sin, *args, **{**kw, "local_window": 64})
    with pytest.raises(ValueError, match="STEP_LAUNCHES must be"):
        pallas_decode_fused.check_mode("one")


@pytest.mark.parametrize("mode", ["rope", "all"])
def test_model_decode_in_fewer_launches_equals_three(mode, monkeypatch):
    """A 2-layer bf16 model's prefill + 12 decode steps (groups completing, batch 2 of
    different lengths) with the fused step equal the three-launch steps' logits and caches to
    the bit; the split counters are threaded through the layers (a counter left nonzero by
    layer 0 would leave layer 1's output unwritten)."""
    config = CCAConfig.tiny(attention="cca", num_layers=2, num_heads=4, num_kv_heads=2,
                            head_dim=64, hidden_size=128, group_size=4, local_window=64,
                            implementation="pallas", dtype="bfloat16")
    model = CCALlama.from_config(config, seed=1)
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 9)))
    lengths = jnp.asarray([9, 6], jnp.int32)

    def run():
        cache = model.init_cache(2, 256)
        logits, cache = model.prefill(prompt, lengths, cache)
        out = [logits]
        token = jnp.argmax(logits, axis=-1)
        for _ in range(12):
            logits, cache = model.extend(token[:, None], jnp.ones((2,), jnp.int32), cache)
            token = jnp.argmax(logits, axis=-1)
            out.append(logits)
        return jnp.stack(out), cache

    monkeypatch.setattr(pallas_decode_fused, "STEP_LAUNCHES", None)
    want, want_cache = run()
    monkeypatch.setattr(pallas_decode_fused, "STEP_LAUNCHES", mode)
    layer_cache = model.init_cache(2, 256)[0]
    assert decode.rotates_in_kernel(layer_cache, 1, config)
    assert decode.step_launches(layer_cache, config) == mode
    got, got_cache = run()
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    for a, b in zip(jax.tree_util.tree_leaves(got_cache), jax.tree_util.tree_leaves(want_cache),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("context,hkv,batch,repeats", [
    (32768, 32, 2, 3), (131072, 32, 2, 3), (32768, 8, 2, 3),
    (4096, 4, 1, 30)])  # 64 splits (past the merge's unrolling), short: programs end together
def test_gpu_one_launch_equals_three_launches(context, hkv, batch, repeats):
    """LLaMA-2-7B attention shapes (32 query heads, d = 128, bf16, g = 16, w = 1024), GQA 32/8
    and 32/4: positions that complete a group and not, n_valid 0, compiled; run several times,
    since a race in the last program's hand-off would not show every time."""
    config = _cache_config("cca", 32, hkv, 128, 16, 1024, "bfloat16")
    rng = np.random.default_rng(context + hkv)
    lengths = [context - 1, context - 6][:batch]  # the first completes a group (pooling)
    cache = _random_cache(config, batch, context + 64, lengths, 7)
    positions = jnp.asarray(lengths, jnp.int32)
    cos, sin = _cos_sin(positions, 128)
    valid = jnp.asarray([1, 0][:batch], jnp.int32)
    for _ in range(repeats):
        qkv = jnp.asarray(rng.standard_normal((batch, 32 + 2 * hkv, 128), np.float32),
                          "bfloat16")
        _compare(config, cache, qkv, cos, sin, positions, valid)
