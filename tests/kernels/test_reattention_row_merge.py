"""The scoring kernel's warp-per-row top-k merge (``kernels/reattention/mgpu_row_merge.py``).

The merge is written once against a set of warp operations; on the CPU its numpy backend runs
it lane by lane (the same steps, shared-memory addresses and branches as the kernel's MLIR) over
whole score matrices, tile by tile, and the lists it leaves in the row layout must equal a sort
of every row's scores (top_k by score, ties to the lower position) bit for bit: random scores,
integer scores that tie everywhere, masked first and last tiles, rows with fewer keys than
top_k, 64- and 128-key tiles. On a Hopper GPU the MLIR backend runs alone in a small kernel
and must leave the same lists as the numpy lanes (its CPU twin: that kernel lowers for CUDA);
the whole scoring kernel's GPU tests with ``merge="rows"`` are in
``test_reattention_mgpu_score.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.cca.pallas_common import NEG
from kernels.cca.pallas_mgpu import available
from kernels.reattention import mgpu_row_merge as M
from tests.kernels.conftest import export_for_cuda


def _sorted_topk(scores: np.ndarray, positions: np.ndarray, top_k: int):
    """Each row's top_k (score, position) of the unmasked columns, best first, equal scores
    lower position first; NEG / -1 where a row has fewer."""
    vals = np.full((scores.shape[0], top_k), NEG, np.float32)
    idxs = np.full((scores.shape[0], top_k), -1, np.int32)
    for r, row in enumerate(scores):
        live = np.flatnonzero(row > NEG)
        order = live[np.lexsort((positions[live], -row[live]))][:top_k]
        vals[r, :len(order)], idxs[r, :len(order)] = row[order], positions[order]
    return vals, idxs


def _scores(rng, n: int, ties: bool, lo: int, hi: int):
    s = (rng.integers(-2, 3, (64, n)) if ties else rng.standard_normal((64, n))).astype(np.float32)
    s[:, :lo] = NEG  # the kernel's first tile: keys before the split's start
    s[:, hi:] = NEG  # its last: keys past the split's end
    return s


@pytest.mark.parametrize("top_k", [1, 2, 4, 8])
@pytest.mark.parametrize("bk", [64, 128])
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
def test_lists_equal_a_sort(top_k, bk, ties):
    rng = np.random.default_rng(top_k * 10 + bk + ties)
    for tiles in (1, 3, 6):
        n = tiles * bk
        scores = _scores(rng, n, ties, lo=int(rng.integers(0, 12)),
                         hi=n - int(rng.integers(0, 40)))
        positions = 5000 + np.arange(n, dtype=np.int32)
        got = M.simulate(scores, positions, top_k, bk)
        want = _sorted_topk(scores, positions, top_k)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])


def test_rows_with_fewer_keys_than_top_k():
    """A split of 3 live keys (the rest masked): three entries, then NEG / -1."""
    scores = np.full((64, 64), NEG, np.float32)
    scores[:, 10:13] = np.arange(3, dtype=np.float32)
    vals, idxs = M.simulate(scores, np.arange(64, dtype=np.int32), 5, 64)
    assert (idxs == [12, 11, 10, -1, -1]).all() and (vals[:, 3:] == NEG).all()


def test_a_half_goes_through_shared_memory_only_when_a_row_gains():
    """The cost model behind the design: a half of 8 rows is transposed only when one of its rows
    gains an entry, and a row pops once per entry that enters. With random scores over 64
    tiles, most of the later halves stay in registers, and the pops are about k ln(N / k) per
    row (the expected number of records of the running top_k), far fewer than the tiles."""
    rng = np.random.default_rng(3)
    n, top_k, stats = 64 * 64, 4, {}
    M.simulate(rng.standard_normal((64, n)).astype(np.float32), np.arange(n, dtype=np.int32),
               top_k, 64, stats)
    assert stats["half_checked"] == 4 * 2 * 64  # warps x halves x tiles
    assert stats["half"] < 0.8 * stats["half_checked"]
    pops_per_row = (stats["row"] + stats["more"]) / 64
    assert top_k <= pops_per_row < 2 * top_k * np.log(n / top_k), pops_per_row


def test_the_shared_memory_fits():
    """The buffer is 8 rows of STRIDE floats per consumer warp (36 KiB for four consumers), and
    the kernel's shared memory with it stays within Hopper's 227 KiB at the defaults."""
    from kernels.reattention import pallas_mgpu_score as S

    assert np.prod(M.buffer_shape(4)) * 4 == 36864
    assert S.smem_bytes(128, 2, 8, 64, 4, 4, "rows") <= S.SMEM_BYTES
    assert S.smem_bytes(128, 2, 8, 128, 3, 4, "rows") <= S.SMEM_BYTES
    assert S.smem_bytes(128, 2, 8, 128, 4, 4, "rows") > S.SMEM_BYTES


# ----------------------------------------------------------------------------- the MLIR backend
def _merge_kernel(tiles: int, top_k: int, bk: int):
    """The row merge alone in a one-warpgroup Mosaic GPU kernel: (tiles, 64, bk) float32 scores
    (tile t at positions t * bk + column) -> the (top_k, 64) lists (scores, positions), so that
    a failure on the GPU points at the merge rather than the scoring kernel around it."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    from jax import lax

    row = plgpu.Layout.WGMMA.reduce(1)
    merge = M.merge_fn(top_k, bk)

    def kernel(s_ref, v_out, i_out, buf, v_smem, i_smem):
        fill = lambda x, dt: plgpu.layout_cast(jnp.full((M.ROWS,), x, dt), row)
        lists = (tuple(fill(NEG, jnp.float32) for _ in range(top_k)),
                 tuple(fill(-1, jnp.int32) for _ in range(top_k)))

        def body(t, lists):
            scores = plgpu.load(s_ref.at[t], (), layout=plgpu.Layout.WGMMA, optimized=False)
            return merge(scores, fill(t * bk, jnp.int32), *lists, buf)

        vals, idxs = lax.fori_loop(0, tiles, body, lists)
        for p in range(top_k):
            v_smem.at[p][...] = vals[p]
            i_smem.at[p][...] = idxs[p]
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(v_smem, v_out)
        plgpu.copy_smem_to_gmem(i_smem, i_out)
        plgpu.wait_smem_to_gmem(0)

    out = (top_k, M.ROWS)
    return plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct(out, jnp.float32), jax.ShapeDtypeStruct(out, jnp.int32)),
        scratch_types=[plgpu.SMEM(M.buffer_shape(1), jnp.float32),
                       plgpu.SMEM(out, jnp.float32), plgpu.SMEM(out, jnp.int32)])


@pytest.mark.parametrize("top_k,bk", [(4, 64), (8, 128)])
def test_merge_kernel_lowers_for_cuda(top_k, bk):
    """The GPU test's kernel (the MLIR backend alone) lowers for CUDA on the CPU."""
    f = jax.jit(_merge_kernel(3, top_k, bk))
    exported = export_for_cuda(f, jax.ShapeDtypeStruct((3, M.ROWS, bk), jnp.float32))
    assert [o.shape for o in exported.out_avals] == [(top_k, M.ROWS)] * 2


@pytest.mark.skipif(not available(), reason="needs a Hopper GPU (runs on the device machine)")
@pytest.mark.gpu
@pytest.mark.parametrize("top_k,bk", [(1, 64), (4, 64), (3, 128), (8, 128)])
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
def test_gpu_merge_equals_the_numpy_lanes(top_k, bk, ties):
    """On a Hopper GPU the MLIR backend leaves the same lists as the numpy lanes (and a sort),
    bit for bit: random and tie-heavy scores, masked first and last columns."""
    rng = np.random.default_rng(top_k + bk + ties)
    tiles = 7
    scores = _scores(rng, tiles * bk, ties, lo=5, hi=tiles * bk - 9)
    positions = np.arange(tiles * bk, dtype=np.int32)
    vals, idxs = jax.jit(_merge_kernel(tiles, top_k, bk))(
        jnp.asarray(scores.reshape(M.ROWS, tiles, bk).transpose(1, 0, 2)))
    want = M.simulate(scores, positions, top_k, bk)
    np.testing.assert_array_equal(np.asarray(idxs).T, want[1])
    np.testing.assert_array_equal(np.asarray(vals).T, want[0])
    np.testing.assert_array_equal(want[1], _sorted_topk(scores, positions, top_k)[1])
