"""The key-split merge of a decode step (``kernels/reattention/pallas_combine.py``).

The kernel must give ``merge_partials_reference`` (the jnp softmax over the splits' base-2
log-sum-exps) up to float32 rounding, in the Pallas interpreter here: splits that saw no key
(lse ``NEG``, output 0) anywhere, including the first; rows that saw no key at all (output 0);
split counts unrolled and looped; real rows fewer than the tile's, which are the only ones read
and written. The kernel lowers for CUDA (Triton) on the CPU; on the GPU the decode steps of the
op and parity suites run it, and the test marked gpu compares it with the reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.reattention import pallas_combine as PC
from kernels.cca.pallas_common import NEG
from tests.kernels.conftest import export_for_cuda


def _partials(rng, shape, empty: float = 0.3):
    """(o, lse) of ``shape`` = (B, Hkv, NC, P, R, D): each split's normalised output and its
    base-2 log-sum-exp, a fraction of (split, row) pairs empty (lse NEG, o 0); split 0 of row 0
    always empty, row 1 empty in every split."""
    o = rng.standard_normal(shape).astype(np.float32)
    lse = (rng.standard_normal(shape[:5]) * 8).astype(np.float32)
    none = rng.random(shape[:5]) < empty
    none[:, :, :, 0, 0] = True
    none[:, :, :, :, 1] = True
    lse[none] = NEG
    o[none] = 0.0
    return jnp.asarray(o), jnp.asarray(lse)


@pytest.mark.parametrize("splits", [1, 5, 33, 70])  # unrolled up to 64, then a loop
@pytest.mark.parametrize("rows", [4, 3, 16])
def test_equals_the_reference(splits, rows):
    rng = np.random.default_rng(splits * 100 + rows)
    o, lse = _partials(rng, (2, 3, 2, splits, 16, 64))
    got = PC.merge_partials(o, lse, rows=rows, dtype=jnp.float32, interpret=True)
    want = PC.merge_partials_reference(o, lse)
    rp = got.shape[3]
    assert rp == {4: 4, 3: 4, 16: 16}[rows]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want[:, :, :, :rp]), rtol=2e-6,
                               atol=2e-6)
    np.testing.assert_array_equal(np.asarray(got[:, :, :, 1]), 0.0)  # no key seen: 0


def test_casts_to_the_attention_dtype():
    o, lse = _partials(np.random.default_rng(0), (1, 8, 1, 9, 16, 128))
    got = PC.merge_partials(o, lse, rows=4, dtype=jnp.bfloat16, interpret=True)
    want = PC.merge_partials_reference(o, lse)[:, :, :, :4].astype(jnp.bfloat16)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=8e-3, atol=1e-6)


def test_rows_past_the_real_ones_are_not_read():
    """Garbage (NaN) in the tile's padded rows must not reach the real rows."""
    o, lse = _partials(np.random.default_rng(1), (1, 2, 1, 6, 16, 64))
    want = PC.merge_partials(o, lse, rows=4, dtype=jnp.float32, interpret=True)
    o_bad, lse_bad = o.at[:, :, :, :, 4:].set(jnp.nan), lse.at[:, :, :, :, 4:].set(jnp.nan)
    got = PC.merge_partials(o_bad, lse_bad, rows=4, dtype=jnp.float32, interpret=True)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("bad", ["lse shape", "rows 0", "rows past R", "block past R",
                                 "bfloat16 partials"])
def test_bad_arguments_are_refused(bad):
    o, lse = _partials(np.random.default_rng(2), (1, 2, 1, 3, 12, 64))
    kw = dict(rows=4, dtype=jnp.float32, interpret=True)
    if bad == "lse shape":
        lse = lse[..., :8]
    elif bad == "rows 0":
        kw["rows"] = 0
    elif bad == "rows past R":
        kw["rows"] = 13
    elif bad == "block past R":
        kw["rows"] = 9  # its power-of-two block, 16 rows, is past R = 12
    else:
        o = o.astype(jnp.bfloat16)
    with pytest.raises(ValueError, match="merge_partials takes"):
        PC.merge_partials(o, lse, **kw)


def test_lowers_for_cuda():
    sds = jax.ShapeDtypeStruct
    f = jax.jit(lambda o, lse: PC.merge_partials(o, lse, rows=4, dtype=jnp.bfloat16))
    exported = export_for_cuda(f, sds((1, 8, 1, 33, 16, 128), jnp.float32),
                               sds((1, 8, 1, 33, 16), jnp.float32))
    assert [o.shape for o in exported.out_avals] == [(1, 8, 1, 4, 128)]


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="needs a CUDA GPU (runs on the device machine)")
@pytest.mark.parametrize("splits,d", [(33, 128), (32, 64), (70, 128)])
def test_gpu_compiled_equals_the_reference(splits, d):
    o, lse = _partials(np.random.default_rng(splits), (1, 8, 1, splits, 16, d))
    got = PC.merge_partials(o, lse, rows=4, dtype=jnp.float32)
    want = PC.merge_partials_reference(o, lse)[:, :, :, :4]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-6, atol=2e-6)
