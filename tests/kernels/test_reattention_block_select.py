"""The block-selection kernel (``kernels/reattention/pallas_block_select.py``): the kept blocks of
block picks by thresholds, in place of XLA's sort of each row's NB blocks
(``reference.select_from_block_picks``).

It must keep the same blocks as the sort, bit for bit, in the Pallas interpreter here: votes
that tie at the cut, scores that tie among the tied votes (and -0 against +0), the lowest blocks
among full ties, rows with fewer voted blocks than the cap, NB below the cap and not a power of
two. The whole selection through ``pallas._select`` with ``block_select="kernel"`` equals the
sorts' lists. The compiled kernel is compared at the 128K prefill's size on the GPU, and lowers
for CUDA on the CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.reattention import pallas as P
from kernels.reattention import pallas_block_select as BS
from kernels.reattention import reference as R
from kernels.reattention.params import Config, Selection
from tests.kernels.conftest import export_for_cuda

ON_GPU = jax.default_backend() == "gpu"
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (runs on the device machine)")


def _votes(rng, n: int, nb: int, kind: str):
    """(votes, best): "ties" few vote counts and a few score values with -0.0 and +0.0, two
    denormals (zeros to XLA's CPU, not to the GPU: the kernel follows the device's compare, as
    the sort does) and the infinities (ties at every cut); "spread" many counts, normal
    scores; "sparse" most blocks without a vote."""
    if kind == "ties":
        votes = rng.integers(0, 4, (n, nb))
        best = rng.choice(np.array([-np.inf, -1.5, -1e-45, -0.0, 0.0, 1e-45, 0.25, 2.0, np.inf],
                                   np.float32), (n, nb))
    elif kind == "spread":
        votes = rng.integers(0, 60, (n, nb))
        best = rng.standard_normal((n, nb)).astype(np.float32)
    else:
        votes = np.where(rng.random((n, nb)) < 0.05, rng.integers(1, 3, (n, nb)), 0)
        best = rng.standard_normal((n, nb)).astype(np.float32)
    best = np.where(votes > 0, best, -np.inf).astype(np.float32)  # as block_votes leaves them
    return jnp.asarray(votes, jnp.int32), jnp.asarray(best)


@pytest.mark.parametrize("cap,nb", [(16, 100), (8, 5), (32, 256), (1, 33), (200, 1000)])
@pytest.mark.parametrize("kind", ["ties", "spread", "sparse"])
def test_keeps_the_sorts_blocks_bit_for_bit(cap, nb, kind):
    sel = Selection(max_selected=cap, key_block=32, span=32)
    rng = np.random.default_rng(cap * 1000 + nb)
    votes, best = _votes(rng, 6, nb, kind)
    got = BS.kept_centres(votes, best, sel, picks=60, interpret=True)
    want = R.kept_centres_by_sort(votes, best, sel)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_the_cut_keeps_the_most_voted_then_the_best_then_the_lowest():
    """Cap 3 over blocks 0-5 with votes (1, 2, 1, 1, 2, 1) and best scores (5, 0, 7, 7, 1, 7):
    blocks 1 and 4 (2 votes), then the lowest of the 7s among 1 vote: block 2."""
    sel = Selection(max_selected=3, key_block=32, span=32)
    votes = jnp.asarray([[1, 2, 1, 1, 2, 1]], jnp.int32)
    best = jnp.asarray([[5.0, 0.0, 7.0, 7.0, 1.0, 7.0]], jnp.float32)
    got = np.asarray(BS.kept_centres(votes, best, sel, picks=8, interpret=True))[0]
    centre = lambda j: sel.sink_tokens + j * 32 + 16
    assert got.tolist() == [centre(1), centre(2), centre(4)]


def test_order_keys_follow_the_floats():
    """Ascending floats, -0 and +0 one key; NaNs of either sign below everything (XLA's sort
    of -score puts them last)."""
    x = jnp.asarray([-jnp.nan, jnp.nan, -jnp.inf, -3e38, -2.0, -1.0, -1e-30, -0.0, 0.0, 1e-30,
                     1.0, 2.0, 3e38, jnp.inf], jnp.float32)
    keys = np.asarray(BS.order_keys(x)).astype(np.int64)
    assert keys[0] == keys[1] and keys[7] == keys[8]  # NaNs alike, -0 == +0
    assert (np.diff(keys) > 0).sum() == len(x) - 3


def test_nan_scores_rank_last_as_in_the_sort():
    """A NaN best score (only NaN inputs give one) ranks below every number, as XLA's sort
    ranks it; among NaNs the lower block stays."""
    sel = Selection(max_selected=2, key_block=32, span=32)
    nan = np.float32(np.nan)
    best = jnp.asarray([[nan, 1.0, -nan, -jnp.inf], [nan, -nan, nan, 0.5]], jnp.float32)
    votes = jnp.ones((2, 4), jnp.int32)
    got = BS.kept_centres(votes, best, sel, picks=4, interpret=True)
    want = R.kept_centres_by_sort(votes, best, sel)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_bad_inputs_are_refused():
    sel = Selection(key_block=32, span=32)
    with pytest.raises(ValueError, match="int32 votes"):
        BS.kept_centres(jnp.zeros((2, 8), jnp.float32), jnp.zeros((2, 8)), sel, picks=4)
    with pytest.raises(ValueError, match="NB <="):
        BS.kept_centres(jnp.zeros((2, BS.MAX_BLOCKS + 1), jnp.int32),
                        jnp.zeros((2, BS.MAX_BLOCKS + 1)), sel, picks=4)
    with pytest.raises(ValueError, match="block_select"):
        Config(block_select="radix")


@pytest.mark.parametrize("cap,nb", [(5, 80), (40, 30)])
@pytest.mark.parametrize("c", [1, 2, 6])
def test_the_selection_equals_the_sorts(cap, nb, c, monkeypatch):
    """``pallas._select`` with ``block_select="kernel"`` (the scatter-add, the kernel, the lists
    from its centres) against the sorts of the picks (``reference.select_from_picks``): equal
    lists and lengths, picks crowded on few blocks (votes) with tied scores. Candidates (N, C,
    R') with C = top_k (the picks as they are), C < top_k and C > top_k (splits, merged first);
    rows past R are padding, not read (R x top_k = 140 picks: past the small-selection
    kernel's 64)."""
    sel = Selection(8, 8, 2, cap, 32, 8, 32, key_block=32)
    rows, pad = 70, 3
    s_keys = sel.sink_tokens + nb * sel.key_block
    rng = np.random.default_rng(nb * 10 + c)
    idx = (sel.sink_tokens + rng.integers(0, nb, (4, c, rows + pad)) * 32 + 16).astype(np.int32)
    idx[rng.random(idx.shape) < 0.2] = -1
    val = (rng.integers(-2, 3, idx.shape) * 0.5).astype(np.float32)
    c0 = jnp.full((4,), s_keys, jnp.int32)
    l0 = jnp.asarray([s_keys, s_keys - 100, s_keys - 64, sel.sink_tokens + 40], jnp.int32)
    want = P._select(jnp.asarray(idx), jnp.asarray(val), c0, l0, sel, True, rows, s_keys, "sort")
    calls = []
    kernel = BS.kept_centres
    monkeypatch.setattr(BS, "kept_centres", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    got = P._select(jnp.asarray(idx), jnp.asarray(val), c0, l0, sel, True, rows, s_keys, "kernel")
    assert calls  # the kernel selected
    for x, y in zip(got, want):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_lowers_for_cuda():
    sds = jax.ShapeDtypeStruct
    sel = Selection(key_block=32, span=32)
    f = jax.jit(lambda v, b: BS.kept_centres(v, b, sel, picks=8192))
    exported = export_for_cuda(f, sds((16, 4095), jnp.int32), sds((16, 4095), jnp.float32))
    assert [o.shape for o in exported.out_avals] == [(16, sel.max_selected)]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("kind", ["ties", "spread"])
def test_gpu_compiled_kernel_keeps_the_sorts_blocks(kind):
    """The 128K prefill's size with 8 kv heads (1,912 rows of 4,095 blocks, the authors' cap
    256), compiled, against the sort."""
    sel = Selection(key_block=32, span=32)
    votes, best = _votes(np.random.default_rng(5), 1912, 4095, kind)
    got = BS.kept_centres(votes, best, sel, picks=8192)
    want = R.kept_centres_by_sort(votes, best, sel)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
