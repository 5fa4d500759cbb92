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
             jnp.dtype("int32"): torch.int32}[x.dtype]
    host = np.asarray(x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x)
    return torch.from_numpy(host.copy()).to(device=torch_device(), dtype=dtype)


def _triton(kernels, config, cache, q, k, v, **launch):
    args = [_torch(a) for a in (q[:, 0], k[:, 0], v[:, 0])]
    with kernels_poisoned():
        if config.attention == "full":
            out = kernels.full_decode_attention(*args, _torch(cache.k), _torch(cache.v),
                                                _torch(cache.lengths), **launch)
        else:
            out = kernels.cca_decode_attention(
                *args, *(_torch(a) for a in (cache.core_k, cache.core_v, cache.ring_k,
                                             cache.ring_v, cache.lengths)),
                group_size=config.group_size, local_window=config.local_window, **launch)
    return out.float().cpu().numpy()


def kernels_poisoned():
    from kernels.triton_common import poison_outputs as triton_poison

    return triton_poison()


def _pallas(config, cache, q, k, v):
    args = (q[:, 0], k[:, 0], v[:, 0])
    if config.attention == "full":
        return pallas_decode.full_decode_attention(*args, cache.k, cache.v, cache.lengths)
    return pallas_decode.cca_decode_attention(
        *args, cache.core_k, cache.core_v, cache.ring_k, cache.ring_v, cache.lengths,
        group_size=config.group_size, local_window=config.local_window)


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
        want = xla(cache, q, k, v)
        for name, got in (("triton", got_triton), ("pallas", got_pallas)):
            err = rel_err(np.asarray(jnp.asarray(got, jnp.float32)), np.asarray(want, np.float32))
            assert err < TOL[dtype], (name, lengths, err)
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
    for name, got in (("triton", got_triton), ("pallas", got_pallas)):
        err = rel_err(np.asarray(jnp.asarray(got, jnp.float32)), np.asarray(want, np.float32))
        assert err < TOL["bfloat16"], (name, err)
