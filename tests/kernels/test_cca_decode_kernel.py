"""The Pallas decode kernel (kernels/cca/pallas_decode.py) against the XLA decode path
(jax_cca/decode.py ``_attend``), for both caches.

On CPU the kernel runs through the Pallas interpreter at small sizes, always with NaN-poisoned
outputs (a partial the kernel forgot to write poisons the result). Caches are filled with random
values in every slot, visible or not, so a mask that admits a wrong slot changes the result.
Each case compiles once and then runs many (batch 2) length pairs, which are dynamic inputs:
lengths across group boundaries, the window rows w..w+g-2, the ring size, 0 (empty cache) and
the last position of the cache. On the GPU (``-m gpu``): prefill + kernel decode steps at 32K
against one full forward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_cca import CCAConfig, CCALlama, decode
from jax_cca.cache import CCACache, FullCache, ring_positions, ring_size
from kernels.cca import pallas_decode, pallas_decode_pool
from kernels.cca.pallas_common import poison_outputs
from kernels.cca.reference import core_visible, local_visible
from tests.kernels.conftest import TOL, rel_err

ON_GPU = jax.default_backend() == "gpu"
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (runs on the device machine)")


def _cache_config(attention, hq, hkv, d, g, w, dtype="float32"):
    return CCAConfig.tiny(attention=attention, num_heads=hq, num_kv_heads=hkv, head_dim=d,
                          hidden_size=hq * d, group_size=g, local_window=w, dtype=dtype,
                          num_layers=1)


def _random_cache(config, batch, max_len, lengths, seed):
    """A layer cache whose every slot holds fresh random values (N(0, 1)), lengths as given."""
    dt = config.jnp_dtype
    hkv, d = config.num_kv_heads, config.head_dim
    rng = np.random.default_rng(seed)
    rand = lambda rows: jnp.asarray(rng.standard_normal((batch, rows, hkv, d), np.float32), dt)
    lengths = jnp.asarray(lengths, jnp.int32)
    if config.attention == "full":
        return FullCache(rand(max_len), rand(max_len), lengths)
    n, r = max_len // config.group_size, ring_size(config, max_len)
    return CCACache(rand(n), rand(n), rand(r), rand(r), lengths, max_len=max_len)


def _new_token(config, batch, seed):
    rng = np.random.default_rng(seed + 1000)
    hq, hkv, d, dt = config.num_heads, config.num_kv_heads, config.head_dim, config.jnp_dtype
    return tuple(jnp.asarray(rng.standard_normal((batch, 1, h, d), np.float32), dt)
                 for h in (hq, hkv, hkv))


@functools.lru_cache(maxsize=None)
def _step(config, implementation):
    """Jitted decode step of one layer with the given implementation (traced once per shape)."""
    fn = lambda cache, q, k, v: decode.extend_attention(
        cache, q, k, v, jnp.ones(q.shape[:1], jnp.int32), config, implementation=implementation)
    return jax.jit(fn)


# (attention, Hq, Hkv, D, g, w, max_len, dtype): GQA 1, 2, 4, 5; D 64 and 128; fp32 and bf16.
# CCA: R = w + g (20, 24, 20, 40) or, for max_len 10, ring_size = 12 (< 16 rows: padded); core
# slots N = 25, 12, 2, 25, 16, with max_len not a multiple of the key block.
CASES = [
    ("full", 4, 4, 64, 4, 16, 100, "float32"),
    ("full", 10, 2, 128, 4, 16, 77, "float32"),
    ("full", 8, 2, 64, 4, 16, 45, "bfloat16"),
    ("cca", 4, 2, 64, 4, 16, 100, "float32"),
    ("cca", 4, 4, 128, 8, 16, 99, "float32"),
    ("cca", 10, 2, 64, 4, 8, 10, "float32"),
    ("cca", 5, 1, 64, 4, 16, 100, "bfloat16"),
    ("cca", 8, 2, 128, 8, 32, 130, "bfloat16"),
]


def _length_pairs(g, w, max_len):
    r = w + g
    rows = [0, 1, g - 1, g, w - 1, w, w + 1, w + g - 2, w + g - 1, r, r + 1, 2 * r + 3,
            max_len - g, max_len - 2, max_len - 1]
    rows = sorted({t for t in rows if 0 <= t < max_len})
    return [(rows[i], rows[-1 - i]) for i in range(len(rows))]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_kernel_decode_step_equals_xla_decode_step(case):
    """``extend_attention`` with one new token: the same output and the same updated cache with
    implementation="pallas" (interpreted, NaN-poisoned) as with "xla". The ring and lengths match
    to the bit; the core slots to float32 rounding (the pooling kernel sums in another order),
    i.e. to the last bit of the cache's dtype."""
    attention, hq, hkv, d, g, w, max_len, dtype = case
    config = _cache_config(attention, hq, hkv, d, g, w, dtype)
    tol = TOL[jnp.float32] if dtype == "float32" else TOL[jnp.bfloat16]
    with poison_outputs():
        for i, lengths in enumerate(_length_pairs(g, w, max_len)):
            cache = _random_cache(config, 2, max_len, lengths, seed=i)
            q, k, v = _new_token(config, 2, seed=i)
            got, got_cache = _step(config, "pallas")(cache, q, k, v)
            want, want_cache = _step(config, "xla")(cache, q, k, v)
            assert got.dtype == want.dtype == config.jnp_dtype
            assert rel_err(got, want) < tol, (lengths, rel_err(got, want))
            _assert_same_cache(got_cache, want_cache)


def _assert_same_cache(got, want):
    """Equal caches: every array to the bit but the core slots, float32 sums taken in another
    order: elementwise within 1e-5 (float32 caches) or one unit in the last place (bfloat16)."""
    for name in got.__dataclass_fields__:
        a, b = getattr(got, name), getattr(want, name)
        if not isinstance(a, jax.Array):
            assert a == b, name
        elif name.startswith("core_"):
            tol = 1e-5 if a.dtype == jnp.float32 else float(jnp.finfo(a.dtype).eps)
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                       rtol=tol, atol=tol / 10, err_msg=name)
        else:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def _xla_reference(q, k_new, v_new, parts):
    """``decode._attend`` over the given (keys, values, mask) parts plus the new token."""
    b = q.shape[0]
    new = (k_new[:, None], v_new[:, None], jnp.ones((b, 1, 1), bool))
    return decode._attend(q[:, None], parts + [new])[:, 0]


@pytest.mark.parametrize("block_k, splits", [(16, 1), (16, 3), (32, 64)])
def test_kernel_tiles_and_splits(block_k, splits):
    """The kernel called directly (interpreted off the GPU), fp32, with one split, several splits
    of several blocks each, and more splits than blocks (most shares empty): full and CCA against
    the XLA softmax."""
    b, hq, hkv, d, g, w, s = 2, 6, 2, 64, 8, 16, 90
    n, ring = s // g, w + g
    rng = np.random.default_rng(block_k * 100 + splits)
    q, k_new, v_new, k_c, v_c, core_k, core_v, ring_k, ring_v = (
        jnp.asarray(rng.standard_normal(shape, np.float32)) for shape in
        [(b, hq, d)] + [(b, hkv, d)] * 2 + [(b, s, hkv, d)] * 2 + [(b, n, hkv, d)] * 2
        + [(b, ring, hkv, d)] * 2)
    config = pallas_decode.DecodeConfig(block_k=block_k, num_splits=splits)

    @jax.jit
    def kernels(t):
        full = pallas_decode.full_decode_attention(q, k_new, v_new, k_c, v_c, t, config=config)
        cca = pallas_decode.cca_decode_attention(
            q, k_new, v_new, core_k, core_v, ring_k, ring_v, t, group_size=g, local_window=w,
            config=config)
        return full, cca

    for pos in ([0, 89], [31, 16], [23, 24], [71, 40], [8, 55]):
        t = jnp.asarray(pos, jnp.int32)
        with poison_outputs():
            full, cca = kernels(t)
        rows = t[:, None, None]
        want_full = _xla_reference(q, k_new, v_new,
                                   [(k_c, v_c, jnp.arange(s)[None, None, :] < rows)])
        slots = ring_positions(t, ring)[:, None, :]
        want_cca = _xla_reference(q, k_new, v_new, [
            (core_k, core_v, core_visible(rows, jnp.arange(n)[None, None, :], g, w)),
            (ring_k, ring_v, (slots >= 0) & local_visible(rows, slots, g, w))])
        assert rel_err(full, want_full) < TOL[jnp.float32], pos
        assert rel_err(cca, want_cca) < TOL[jnp.float32], pos


def test_cca_kernel_ignores_a_new_token_already_in_the_ring():
    """The model writes the new token to slot t mod R before the kernel reads the ring; the slot's
    old position t - R is outside the window too, so the result must be the same either way."""
    b, hq, hkv, d, g, w = 2, 4, 2, 64, 4, 16
    ring = w + g
    rng = np.random.default_rng(3)
    q, k_new, v_new, core_k, core_v, ring_k, ring_v = (
        jnp.asarray(rng.standard_normal(shape, np.float32)) for shape in
        [(b, hq, d)] + [(b, hkv, d)] * 2 + [(b, 16, hkv, d)] * 2 + [(b, ring, hkv, d)] * 2)
    t = jnp.asarray([45, 19], jnp.int32)
    slot = t % ring
    written_k = ring_k.at[jnp.arange(b), slot].set(k_new)
    written_v = ring_v.at[jnp.arange(b), slot].set(v_new)
    run = jax.jit(lambda rk, rv: pallas_decode.cca_decode_attention(
        q, k_new, v_new, core_k, core_v, rk, rv, t, group_size=g, local_window=w))
    before, after = run(ring_k, ring_v), run(written_k, written_v)
    assert rel_err(after, before) < 1e-6


@pytest.mark.parametrize("pooling", ["cca", "mean", "max"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pool_kernel_equals_xla_pooling(pooling, dtype):
    """``pool_decode_step`` after the new token is in the ring writes the same core slots as
    the XLA path's ``_pool_completed_groups`` (gather from ring + chunk, pool, masked write), for a
    batch where one row completes a group, one does not, one completes one but holds no new token
    (n_valid 0) and one completes the group past the last core slot; GQA with G = 3 (padded)."""
    hq, hkv, d, g, w, max_len = 6, 2, 64, 4, 8, 30  # N = 7 core slots, R = 12
    config = _cache_config("cca", hq, hkv, d, g, w, dtype).replace(pooling=pooling)
    # New token at 11 (completes group 2), 12, 19 (completes group 4 but n_valid 0), 31 (past
    # max_len: would complete group 7, which has no slot).
    lengths = [11, 12, 19, 31]
    n_valid = jnp.asarray([1, 1, 0, 1], jnp.int32)
    cache = _random_cache(config, 4, max_len, lengths, seed=3)
    q, k, v = _new_token(config, 4, seed=3)
    want = decode._pool_completed_groups(cache, q, k, v, n_valid, config)
    ring = cache.append(k, v, n_valid)
    with poison_outputs():
        core_k, core_v = pallas_decode_pool.pool_decode_step(
            q[:, 0], ring.ring_k, ring.ring_v, cache.core_k, cache.core_v, cache.lengths, n_valid,
            group_size=g, pooling=pooling)
    _assert_same_cache(ring.replace(core_k=core_k, core_v=core_v),
                       ring.replace(core_k=want.core_k, core_v=want.core_v))
    changed = np.any(np.asarray(core_k != cache.core_k), axis=(2, 3))  # (B, N)
    assert changed.sum() == 1 and changed[0, 2], changed


@pytest.mark.parametrize("pooling,hq,dtype", [("cca", 6, "float32"), ("mean", 2, "float32"),
                                              ("cca", 8, "bfloat16")])
def test_decode_step_pools_in_the_attention_launch(pooling, hq, dtype):
    """``cca_decode_step`` (pooling as program 0 of each (sequence, kv head) of the attention's
    grid) equals ``pool_decode_step`` then ``cca_decode_attention`` (two launches) to the bit:
    the output and both core arrays, for rows that complete a group (pooled), that do not, that
    complete one with n_valid 0, and that complete one past the last core slot; GQA 3 (padded),
    MHA and GQA 4 in bf16. Every slot holds random values, so a pooled slot that the attention
    read (or a partial the pooling program overwrote) would show."""
    hkv, d, g, max_len = 2, 64, 4, 256  # N = 64 core slots
    w = 32 if dtype == "float32" else 64  # R = w + g: at least a key block (32 / 64 rows)
    config = _cache_config("cca", hq, hkv, d, g, w, dtype).replace(pooling=pooling)
    cache = _random_cache(config, 4, max_len, [0, 0, 0, 0], seed=5)
    assert pallas_decode.fuses_pooling(cache.num_core, cache.ring, d,
                                       jnp.dtype(config.jnp_dtype).itemsize)
    assert not pallas_decode.fuses_pooling(16, cache.ring, d, 4)  # too few core slots
    q, k, v = (x[:, 0] for x in _new_token(config, 4, seed=5))
    n_valid = jnp.asarray([1, 1, 0, 1], jnp.int32)
    kw = dict(group_size=g, local_window=w)

    def two_launches(cache, t):
        ring = cache.append(k[:, None], v[:, None], n_valid)
        core_k, core_v = pallas_decode_pool.pool_decode_step(
            q, ring.ring_k, ring.ring_v, ring.core_k, ring.core_v, t, n_valid, group_size=g,
            pooling=pooling)
        out = pallas_decode.cca_decode_attention(q, k, v, core_k, core_v, ring.ring_k,
                                                 ring.ring_v, t, **kw)
        return out, core_k, core_v

    def one_launch(cache, t):
        ring = cache.append(k[:, None], v[:, None], n_valid)
        return pallas_decode.cca_decode_step(q, k, v, ring.core_k, ring.core_v, ring.ring_k,
                                             ring.ring_v, t, n_valid, pooling=pooling, **kw)

    n = cache.num_core
    # rows pooled: completes a group / not / completes one, n_valid 0 / past the last slot;
    # then three that complete one (the last core slot among them) and one with n_valid 0
    for lengths, expect in (([g * 5 - 1, 2 * w + 2, g * 9 - 1, n * g + 3], [1, 0, 0, 0]),
                            ([w + g - 1, g * 20 - 1, 1, n * g - 1], [1, 1, 0, 1])):
        t = jnp.asarray(lengths, jnp.int32)
        c = cache.replace(lengths=t)
        with poison_outputs():
            want = jax.jit(two_launches)(c, t)
            got = jax.jit(one_launch)(c, t)
        for name, a, b in zip(("out", "core_k", "core_v"), got, want, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
        pooled = np.any(np.asarray(got[1] != cache.core_k), axis=(2, 3))  # (B, N)
        assert pooled.sum(axis=1).tolist() == expect


def test_pool_kernel_refuses_shapes_it_cannot_tile():
    q, ring, core = jnp.ones((1, 2, 64)), jnp.ones((1, 12, 2, 64)), jnp.ones((1, 4, 2, 64))
    t = jnp.zeros((1,), jnp.int32)
    with pytest.raises(ValueError, match="power-of-two group size"):
        pallas_decode_pool.pool_decode_step(q, ring, ring, core, core, t, t, group_size=6)
    with pytest.raises(ValueError, match="pooling must be"):
        pallas_decode_pool.pool_decode_step(q, ring, ring, core, core, t, t, group_size=4,
                                            pooling="sum")
    assert pallas_decode_pool.supports(16, 128, 1040)
    assert not pallas_decode_pool.supports(16, 128, 1032) and not pallas_decode_pool.supports(
        12, 128, 1032)


def test_bad_inputs_raise_clear_errors():
    b, hq, hkv, d = 2, 4, 2, 64
    q = jnp.ones((b, hq, d))
    kn = jnp.ones((b, hkv, d))
    cache = jnp.ones((b, 32, hkv, d))
    t = jnp.zeros((b,), jnp.int32)
    full = pallas_decode.full_decode_attention
    with pytest.raises(ValueError, match="expects q"):
        full(q[:, None], kn, kn, cache, cache, t)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        full(jnp.ones((b, 3, d)), kn, kn, cache, cache, t)
    with pytest.raises(ValueError, match="power-of-two head dim"):
        full(jnp.ones((b, hq, 48)), jnp.ones((b, hkv, 48)), jnp.ones((b, hkv, 48)),
             jnp.ones((b, 8, hkv, 48)), jnp.ones((b, 8, hkv, 48)), t)
    with pytest.raises(ValueError, match="share one dtype"):
        full(q, kn, kn, cache.astype(jnp.bfloat16), cache, t)
    with pytest.raises(ValueError, match=r"k_cache must be \(B=2, S, Hkv=2, D=64\)"):
        full(q, kn, kn, jnp.ones((b, 32, 4, d)), cache, t)
    with pytest.raises(ValueError, match="positions must be"):
        full(q, kn, kn, cache, cache, jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="multiple of group_size"):
        pallas_decode.cca_decode_attention(q, kn, kn, cache, cache, cache, cache, t,
                                           group_size=16, local_window=24)
    with pytest.raises(ValueError, match="block_k must be a power of two"):
        pallas_decode.DecodeConfig(block_k=48)
    with pytest.raises(ValueError, match="unknown decode implementation 'triton'"):
        decode.decode_implementation(_cache_config("cca", 4, 2, 64, 4, 16), "triton")


def test_implementation_choice():
    cfg = _cache_config("cca", 4, 2, 64, 4, 16)
    default = "pallas" if ON_GPU else "xla"
    assert decode.decode_implementation(cfg) == default
    assert decode.decode_implementation(cfg.replace(implementation="pallas")) == "pallas"
    assert decode.decode_implementation(cfg.replace(implementation="xla")) == "xla"
    assert decode.decode_implementation(cfg.replace(implementation="chunked")) == "xla"
    assert decode.decode_implementation(cfg.replace(implementation="cudnn")) == default
    assert decode.decode_implementation(cfg.replace(implementation="xla"), "pallas") == "pallas"
    odd = _cache_config("cca", 4, 2, 80, 4, 16)  # head dim 80: not a kernel shape
    assert decode.decode_implementation(odd) == "xla"
    assert pallas_decode.supports(64) and pallas_decode.supports(128)
    assert not pallas_decode.supports(80) and not pallas_decode.supports(8)


# ---------------------------------------------------------------------------- model level
VOCAB, SEQ = 97, 44


def _tiny_model_config(attention, **overrides):
    base = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=96, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=128,
                group_size=4, local_window=8, attention=attention)
    return CCAConfig.tiny(**{**base, **overrides})


@pytest.mark.parametrize("attention", ["full", "cca"])
def test_model_decode_with_the_kernel_equals_xla_decode(attention, rel_err):
    """Prompts of 5 and 14 tokens prefilled once (XLA), then decoded to 44 tokens by the same
    weights with implementation="xla" and with "pallas" (interpreted: the RoPE/append, pooling,
    decode and add + RMSNorm kernels): the logits of every step agree and the caches are
    identical; both equal the full forward's rows."""
    xla = CCALlama.from_config(_tiny_model_config(attention, implementation="xla"), seed=3)
    kern = xla.with_attention(implementation="pallas")
    assert decode.norms_in_kernel(1, kern.config) and not decode.norms_in_kernel(1, xla.config)
    ids = np.random.default_rng(17).integers(0, VOCAB, (2, SEQ)).astype(np.int32)
    graphdef, state = nnx.split(xla)
    ref = np.asarray(jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))(state, ids))
    lengths = np.array([5, 14])
    logits, cache = xla.prefill(ids, lengths, xla.init_cache(2, SEQ))
    caches = {"xla": cache, "pallas": jax.tree_util.tree_map(jnp.copy, cache)}
    got = {name: [np.asarray(logits)] for name in caches}
    for step in range(SEQ - lengths.max()):
        tokens = ids[np.arange(2), lengths + step]
        for name, model in (("xla", xla), ("pallas", kern)):
            out, caches[name] = model.decode_step(tokens, caches[name])
            got[name].append(np.asarray(out))
    a, b = np.stack(got["pallas"], 1), np.stack(got["xla"], 1)
    assert rel_err(a, b) < 1e-5
    # Layer 0 writes the same k, v; later layers' inputs differ by float32 rounding.
    for x, y in zip(jax.tree_util.tree_leaves(caches["pallas"]),
                    jax.tree_util.tree_leaves(caches["xla"]), strict=True):
        if x.dtype == jnp.int32:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        elif np.any(np.asarray(y)):
            assert rel_err(x, y) < 1e-5
    for row in range(2):
        n = a.shape[1]
        assert rel_err(a[row], ref[row, lengths[row] - 1 : lengths[row] - 1 + n]) < 1e-4


# ---------------------------------------------------------------------------- GPU, 32K
@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["full", "cca"])
def test_gpu_32k_prefill_and_kernel_decode_equal_one_forward(attention, rel_err):
    """The issue's GPU consistency check: a tiny-width fp32 model (d = 64, GQA 4/2, g = 16,
    w = 1024), batch 2 prefilled to 32768 - 21 and 32768 - 7 tokens, then decoded to 32768 with the
    Pallas decode kernel (the GPU default); every logits row equals the full forward's row
    (fp32 rel err < 1e-4). The decode steps cross group ends (pooling) at 32751 and 32767."""
    t = 32768
    cfg = _tiny_model_config(attention, hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=64,
                             intermediate_size=256, max_position_embeddings=t, group_size=16,
                             local_window=1024)
    model = CCALlama.from_config(cfg, seed=5)
    assert decode.decode_implementation(model.config) == "pallas"
    # The full forward of the reference: memory-linear chunked attention for "full" (fp32).
    ref_model = model.with_attention(implementation="chunked") if attention == "full" else model
    ids = np.random.default_rng(23).integers(0, VOCAB, (2, t)).astype(np.int32)
    graphdef, state = nnx.split(ref_model)
    ref = np.asarray(jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))(state, ids))
    lengths = np.array([t - 21, t - 7])
    logits, cache = ref_model.prefill(ids, lengths, ref_model.init_cache(2, t))
    got = [[row] for row in np.asarray(logits)]
    for step in range(21):
        pos = lengths + step
        tokens = np.where(pos < t, ids[np.arange(2), np.minimum(pos, t - 1)], 0)
        # a full sequence gets no valid token (extend refuses tokens past max_len)
        logits, cache = model.extend(tokens[:, None], (pos < t).astype(np.int32), cache)
        for b, row in enumerate(np.asarray(logits)):
            if pos[b] < t:
                got[b].append(row)
    for b in range(2):
        err = rel_err(np.stack(got[b]), ref[b, lengths[b] - 1 :])
        assert err < 1e-4, (b, err)
