"""The list gather of the Mosaic GPU attention (``kernels/reattention/pallas_gather.py``) against
its XLA twin ``pallas_mgpu_attend.gather_list`` in the slots the attention reads (below
round_up(n_g, block_k); the others are left unwritten): values equal bit for bit, rotated keys
within one unit in the last place of their dtype, plus a few float32 ulps of the keys' size near
zero (the two compilers may contract the rotation's multiply-adds differently). On CPU through
the Pallas interpreter at small sizes (random lists with repeated rows, padding slots, an
L0 - n_g offset of thousands of positions, an empty list); on a GPU (``-m gpu``) compiled, at a
32K prefill's list sizes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.cca.pallas_common import poison_outputs
from kernels.reattention import pallas_gather, pallas_mgpu_attend, reference

ON_GPU = jax.default_backend() == "gpu"


def _inputs(b, s, hkv, nc, ng, d, dtype, seed):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    k = jax.random.normal(ks[0], (b, s, hkv, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[1], (b, s, hkv, d), jnp.float32).astype(dtype)
    glist = jax.random.randint(ks[2], (b, hkv, nc, ng), 0, s)
    l0 = jax.random.randint(ks[3], (b, hkv, nc), 100, 9000)
    n_g = jax.random.randint(ks[4], (b, hkv, nc), 0, ng + 1).at[0, 0, 0].set(0)  # one empty
    return k, v, glist, l0, n_g, reference.resolve_inv_freq(d, 10000.0, None)


def _check(args, block_k, interpret):
    """Equal where the attention reads (slots below round_up(n_g, block_k)); the rest is not
    written: under NaN poisoning it stays NaN, which shows the kernel skipped it."""
    with poison_outputs():
        kg, vg = pallas_gather.gather_list(*args, block_k, interpret=interpret)
    kr, vr = pallas_mgpu_attend.gather_list(*args, block_k)
    assert kg.shape == kr.shape and vg.shape == vr.shape and kg.dtype == kr.dtype
    n_g = np.asarray(args[4])
    read = np.arange(kg.shape[3]) < (-(-n_g // block_k) * block_k)[..., None]  # (B, Hkv, NC, NGp)
    assert np.isnan(np.asarray(vg.astype(jnp.float32))[~read]).all()
    assert (~read).any() and read.any()
    keep = lambda x: np.where(read[..., None], np.asarray(x.astype(jnp.float32)), 0)
    kg, vg, kr, vr = (jnp.asarray(keep(x)) for x in (kg, vg, kr, vr))
    np.testing.assert_array_equal(np.asarray(vg.astype(jnp.float32)),
                                  np.asarray(vr.astype(jnp.float32)))
    a = np.asarray(kg.astype(jnp.float32), np.float64)
    r = np.asarray(kr.astype(jnp.float32), np.float64)
    assert np.isfinite(a).all()
    eps = float(jnp.finfo(kg.dtype).eps)
    ulp = eps * 2.0 ** np.floor(np.log2(np.maximum(np.maximum(np.abs(a), np.abs(r)), 1e-30)))
    # Near zero the two rotations' float32 rounding (multiply-adds contracted or not) decides
    # the cast: allow a few float32 ulps of the key's own size there.
    size = np.max(np.abs(np.asarray(args[0].astype(jnp.float32), np.float64)))
    bad = np.abs(a - r) > ulp + 4 * float(jnp.finfo(jnp.float32).eps) * size
    assert not bad.any(), f"{bad.sum()} keys differ by more than one ulp, max {np.abs(a - r).max()}"


@pytest.mark.parametrize("dtype,d,block_k", [(jnp.bfloat16, 64, 64), (jnp.bfloat16, 128, 128),
                                             (jnp.float32, 32, 64)])
def test_gather_matches_xla_twin(dtype, d, block_k):
    _check(_inputs(2, 300, 3, 2, 70, d, dtype, seed=d + block_k), block_k, interpret=True)


def test_gather_rejects_bad_shapes():
    k, v, glist, l0, n_g, inv = _inputs(1, 40, 2, 1, 8, 64, jnp.bfloat16, seed=3)
    with pytest.raises(ValueError, match="one shape"):
        pallas_gather.gather_list(k, v[:, :30], glist, l0, n_g, inv, 64, interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        pallas_gather.gather_list(k[..., :48], v[..., :48], glist, l0, n_g, inv[:24], 64,
                                  interpret=True)
    with pytest.raises(ValueError, match="dtype"):
        pallas_gather.gather_list(k, v.astype(jnp.float32), glist, l0, n_g, inv, 64,
                                  interpret=True)
    with pytest.raises(ValueError, match="l0 and n_g"):
        pallas_gather.gather_list(k, v, glist, l0[:, :1], n_g, inv, 64, interpret=True)


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (runs on the device machine)")
@pytest.mark.gpu
def test_gpu_gather_at_32k_sizes():
    """47 chunks' lists of 8192 slots over a 32K cache, GQA (8 kv heads), compiled."""
    _check(_inputs(1, 32768, 8, 47, 8192, 128, jnp.bfloat16, seed=11), 128, interpret=False)
