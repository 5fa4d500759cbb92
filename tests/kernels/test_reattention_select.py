"""The small-selection kernel (``kernels/reattention/pallas_select.py``): the selection of chunks
with at most 64 picks (a decode step) as one Pallas kernel with pairwise ranks.

It must equal ``reference.select_from_picks`` (three sorts, two scans, a scatter) bit for bit, in
the Pallas interpreter here: positions picked several times (votes), equal best scores, -0 and
+0 (equal to the sorts), empty picks (-1), caps that cut the distinct positions, spans that
overlap, merge and clip at the sink and at L0, chunks that start inside the sink, pick counts
that are not powers of two. On the GPU it runs in every ReAttention decode step of the op and
parity suites, and the tests marked gpu compare the compiled kernels with the sorts. The kernel
lowers for CUDA (Triton) on the CPU.
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
from tests.kernels.conftest import export_for_cuda

ON_GPU = jax.default_backend() == "gpu"
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (runs on the device machine)")

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
    exported = export_for_cuda(f, sds((8, p), jnp.int32), sds((8, p), jnp.float32),
                               sds((8,), jnp.int32), sds((8,), jnp.int32))
    assert [o.shape for o in exported.out_avals] == [(8, Selection().num_gathered()), (8,)]


# ------------------------------------------------------------------ with the split merge fused
def _candidates(rng, n: int, rows: int, c: int, sel: Selection, padded: int = 0):
    """(idx, val, c0, l0): each row's candidates from all key splits, candidate-major (N, C,
    rows + padded) as the scoring writes them: tie-heavy integer scores with -0.0 and +0.0,
    empty candidates (-1, as a split with fewer than top_k keys leaves), crowded positions
    (votes), chunks anywhere; ``padded`` more rows of valid-looking candidates (the scoring's
    padded query rows), which must not be read."""
    idx, val, c0, l0 = _picks(rng, n, (rows + padded) * c, sel, crowded=bool(rng.integers(2)))
    cm = lambda x: x.reshape(n, rows + padded, c).transpose(0, 2, 1)
    if padded:
        idx.reshape(n, rows + padded, c)[:, rows:] = sel.sink_tokens + 5  # would be picked
    return cm(idx), cm(val), c0, l0


def _merged_then_selected(idx, val, c0, l0, sel, rows):
    from kernels.reattention import pallas as P

    n = idx.shape[0]
    rm = lambda x: x[:, :, :rows].transpose(0, 2, 1)  # (N, rows, C)
    v, i = P._merge_splits(rm(val), rm(idx), sel.top_k)  # the XLA path: sort each row
    return R.select_from_picks(i.reshape(n, -1), v.reshape(n, -1), c0, l0, sel)


@pytest.mark.parametrize("name", ["defaults", "cap 3, span 3", "cap 5, span 4"])
@pytest.mark.parametrize("rows,c,padded", [(4, 128, 124), (1, 8, 0), (3, 20, 2), (8, 64, 0)])
def test_candidates_merged_in_the_kernel_equal_the_sort_bit_for_bit(name, rows, c, padded):
    """``select_from_candidates`` (each row's best top_k by rounds of extraction, then the
    selection)
    against ``pallas._merge_splits`` (XLA's sort) then ``reference.select_from_picks``: the
    same lists and lengths, with ties in score (lower position first), -0 against +0, rows
    and candidate counts that are not powers of two, more empty candidates than top_k, and
    padded rows (a decode step: 4 real of 128) whose candidates are not read."""
    sel = SELECTIONS[name]
    if not PS.merges(rows, c, sel.top_k):
        pytest.skip(f"{rows} rows x top_k {sel.top_k} picks exceed the kernel's table")
    rng = np.random.default_rng(rows * 1000 + c)
    for _ in range(2):
        idx, val, c0, l0 = (jnp.asarray(x) for x in _candidates(rng, 6, rows, c, sel, padded))
        want = _merged_then_selected(idx, val, c0, l0, sel, rows)
        got = PS.select_from_candidates(idx, val, c0, l0, sel, rows=rows, interpret=True)
        np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))


def test_candidate_ranks_keep_the_lower_position_among_equal_scores():
    """One row, equal scores everywhere: the kept picks are the top_k lowest positions (and so
    are their spans), as the sort's second key does; with a cap of 1 only the lowest survives
    (equal votes and scores). A rank that broke ties the other way would keep the highest."""
    sel = small(2, 16, 2, 1, 1, 8, 4)  # top_k 2, max_selected 1, span 1
    idx = jnp.asarray([[[40], [12], [33], [7], [25], [18]]], jnp.int32)  # (N, C, R) = (1, 6, 1)
    val = jnp.full((1, 6, 1), 1.5, jnp.float32)
    c0, l0 = jnp.asarray([100], jnp.int32), jnp.asarray([60], jnp.int32)
    glist, n_g = PS.select_from_candidates(idx, val, c0, l0, sel, interpret=True)
    assert int(n_g[0]) == 3 and np.asarray(glist)[0, :3].tolist() == [0, 1, 7]


def test_candidate_merge_refuses_what_it_cannot_rank():
    sel = Selection()  # top_k 4: 16 rows x 4 = 64 picks at most
    assert PS.merges(16, 256, 4) and not PS.merges(17, 8, 4) and not PS.merges(4, 257, 4)
    idx = jnp.zeros((2, PS.MAX_CANDIDATES + 1, 4), jnp.int32)
    with pytest.raises(ValueError, match="candidate-merging"):
        PS.select_from_candidates(idx, idx.astype(jnp.float32), jnp.zeros(2, jnp.int32),
                                  jnp.zeros(2, jnp.int32), sel)


def test_candidate_merge_lowers_for_cuda():
    sds = jax.ShapeDtypeStruct
    f = jax.jit(lambda i, v, c, l: PS.select_from_candidates(i, v, c, l, Selection(), rows=4))
    exported = export_for_cuda(f, sds((8, 128, 128), jnp.int32),
                               sds((8, 128, 128), jnp.float32), sds((8,), jnp.int32),
                               sds((8,), jnp.int32))
    assert [o.shape for o in exported.out_avals] == [(8, Selection().num_gathered()), (8,)]


def test_the_wide_list_is_the_list_then_zeros():
    """``wide=True`` (the attention reads the list in place): the kernel's whole list, its first
    NG slots those of the narrow one, every slot from n_g on 0."""
    sel = SELECTIONS["cap 5, span 4"]
    rng = np.random.default_rng(7)
    idx, val, c0, l0 = (jnp.asarray(x) for x in _candidates(rng, 6, 4, 24, sel, 4))
    narrow, n_g = PS.select_from_candidates(idx, val, c0, l0, sel, rows=4, interpret=True)
    wide, n_g2 = PS.select_from_candidates(idx, val, c0, l0, sel, rows=4, interpret=True,
                                           wide=True)
    ng = sel.num_gathered()
    assert wide.shape[1] > ng and wide.shape[1] == PS.list_width(ng)[1]
    np.testing.assert_array_equal(np.asarray(n_g2), np.asarray(n_g))
    np.testing.assert_array_equal(np.asarray(wide[:, :ng]), np.asarray(narrow))
    past = np.arange(wide.shape[1])[None, :] >= np.asarray(n_g)[:, None]
    assert (np.asarray(wide)[past] == 0).all()


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", ["defaults", "cap 5, span 4"])
def test_gpu_compiled_kernels_equal_the_sorts_bit_for_bit(name):
    """The compiled kernels (Triton) against the sorts: picks (16 and 64) and a decode step's
    candidates (4 real rows of 128, 128 candidates), tie-heavy, with the wide list's tail 0."""
    sel = SELECTIONS[name]
    rng = np.random.default_rng(11)
    for p in (16, 64):
        idx, val, c0, l0 = (jnp.asarray(x) for x in _picks(rng, 64, p, sel, bool(p == 16)))
        want = R.select_from_picks(idx, val, c0, l0, sel)
        got = PS.select_from_picks(idx, val, c0, l0, sel)
        np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    idx, val, c0, l0 = (jnp.asarray(x) for x in _candidates(rng, 64, 4, 128, sel, 124))
    want = _merged_then_selected(idx, val, c0, l0, sel, 4)
    got, n_g = PS.select_from_candidates(idx, val, c0, l0, sel, rows=4, wide=True)
    ng = sel.num_gathered()
    np.testing.assert_array_equal(np.asarray(n_g), np.asarray(want[1]))
    np.testing.assert_array_equal(np.asarray(got[:, :ng]), np.asarray(want[0]))
    assert (np.asarray(got)[:, ng:] == 0).all()
