"""The small-selection kernel (``kernels/reattention/pallas_select.py``): the selection of chunks
with at most 64 picks (a decode step) as one Pallas kernel with pairwise ranks.

It must equal ``reference.select_from_picks`` (three sorts, two scans, a scatter) bit for bit, in
the Pallas interpreter here: positions picked several times (votes), equal best scores, -0 and
+0 (equal to the sorts), empty picks (-1), caps that cut the distinct positions, spans that
overlap, merge and clip at the sink and at L0, chunks that start inside the sink, pick counts
that are not powers of two. On the GPU it runs in every ReAttention decode step of the op and
parity suites. The kernel lowers for CUDA (Triton) on the CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.reattention import pallas_select as PS
from kernels.reattention import reference as R
from kernels.reattention.params import Selection
from kernels.reattention.shapes import small

SELECTIONS = {
    "defaults": Selection(),
    "cap 3, span 3": small(4, 32, 2, 3, 3, 64, 8),
    "cap 5, span 4": small(2, 16, 4, 5, 4, 8, 4),
    "no sink, cap 2, span 1": small(0, 8, 1, 2, 1, 8, 4),
}


def _picks(rng, n: int, p: int, sel: Selection, crowded: bool):
    """(idx, val, c0, l0): positions in the middle [sink, L0), crowded ones (a dozen positions:
    many votes and overlapping spans) or spread; integer-valued scores (ties) with some -0.0,
    a fifth of the picks empty; chunks that start anywhere, some inside the sink."""
    s_len = 3000
    c0 = rng.integers(0, s_len, n).astype(np.int32)
    c0[0] = min(sel.sink_tokens, 1)  # a chunk that starts inside the sink
    l0 = np.maximum(np.minimum(c0, rng.integers(0, s_len, n)), sel.sink_tokens + 1).astype(np.int32)
    top = sel.sink_tokens + 12 if crowded else int(l0.max())
    idx = rng.integers(sel.sink_tokens, max(top, sel.sink_tokens + 1), (n, p)).astype(np.int32)
    idx[rng.random((n, p)) < 0.2] = -1
    val = (rng.integers(-2, 3, (n, p)) * 0.5).astype(np.float32)
    val[rng.random((n, p)) < 0.1] = -0.0
    return idx, val, c0, l0


@pytest.mark.parametrize("name", SELECTIONS)
@pytest.mark.parametrize("p", [1, 16, 20, 64])
def test_equals_the_sorts_bit_for_bit(name, p):
    sel = SELECTIONS[name]
    rng = np.random.default_rng(p)
    for crowded in (True, False):
        idx, val, c0, l0 = (jnp.asarray(x) for x in _picks(rng, 5, p, sel, crowded))
        want = R.select_from_picks(idx, val, c0, l0, sel)
        got = PS.select_from_picks(idx, val, c0, l0, sel, interpret=True)
        np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))


def test_the_cap_keeps_the_most_voted_then_the_best_then_the_lowest():
    """Cap 2 over positions 40 (2 votes), 50 and 60 (1 vote each, 60 with the higher score),
    70 (1 vote, the same score as 60): 40 and 60 stay; spans of 3 around them."""
    sel = small(4, 32, 2, 2, 3, 64, 8)
    idx = jnp.asarray([[50, 40, 60, 40, 70, -1]], jnp.int32)
    val = jnp.asarray([[1.0, 0.5, 2.0, 0.25, 2.0, 9.0]], jnp.float32)
    glist, n_g = PS.select_from_picks(idx, val, jnp.asarray([100]), jnp.asarray([90]), sel,
                                      interpret=True)
    assert int(n_g[0]) == 4 + 6
    assert np.asarray(glist)[0, :10].tolist() == [0, 1, 2, 3, 39, 40, 41, 59, 60, 61]
    assert (np.asarray(glist)[0, 10:] == 0).all()


def test_too_many_picks_are_refused():
    sel = Selection()
    idx = jnp.zeros((2, PS.MAX_PICKS + 1), jnp.int32)
    with pytest.raises(ValueError, match="1 <= P <= 64"):
        PS.select_from_picks(idx, idx.astype(jnp.float32), jnp.zeros(2, jnp.int32),
                             jnp.zeros(2, jnp.int32), sel)
    assert PS.applies(16) and not PS.applies(65) and not PS.applies(0)


@pytest.mark.parametrize("p", [16, 64])
def test_lowers_for_cuda(p):
    sds = jax.ShapeDtypeStruct
    f = jax.jit(lambda i, v, c, l: PS.select_from_picks(i, v, c, l, Selection()))
    exported = jax.export.export(f, platforms=["cuda"], disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
        sds((8, p), jnp.int32), sds((8, p), jnp.float32), sds((8,), jnp.int32),
        sds((8,), jnp.int32))
    assert [o.shape for o in exported.out_avals] == [(8, Selection().num_gathered()), (8,)]
