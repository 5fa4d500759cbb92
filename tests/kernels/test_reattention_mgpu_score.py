"""The Mosaic GPU scoring kernel of ReAttention (``kernels/reattention/pallas_mgpu_score.py``).

On a Hopper GPU (``-m gpu``) the compiled kernel's picks equal the Triton lowering's: at 32K
with four consumers (the default) and two, and at 16K with other top_k and 128-key tiles, for
both merges (``Config.mgpu_merge``: per-thread lists, or a warp per row); with
integer scores (q, k in {-1, 0, 1}: ties everywhere) they equal the sort-based reference's bit
for bit, the CPU twin of which runs the Triton lowering in the interpreter; the
ReAttention op and parity suites run it too (``Config.score_lowering`` "auto"). On CPU the
argument checks run, and the kernel is lowered for CUDA (``jax.export``: the Mosaic GPU lowering
with its ``inline_mgpu`` merge runs, nothing compiles) for each width of the per-thread lists.
jax 0.10's Mosaic GPU interpreter deadlocked on this kernel's barriers under the suite's XLA
flags (at the sizes tried when this file was written), and cannot run ``inline_mgpu`` at all,
so the CPU twin of the same function is the Triton-lowered scoring kernel in the Pallas
interpreter (``test_reattention_ops.py``, ``test_picks_match_reference_topk``). At tiny sizes
the interpreter does run it (with the rounds merge): ``test_reattention_key_blocks.py`` checks
the signed rows made in the kernel there.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.reattention import pallas as P
from kernels.reattention import pallas_mgpu_score as M
from kernels.reattention import reference as R
from kernels.reattention.params import Config, Selection
from kernels.reattention.shapes import Case, gpu_cases, small
from tests.kernels.conftest import export_for_cuda
from tests.kernels.test_reattention_reference import make_qkv

needs_hopper = pytest.mark.skipif(not M.available(),
                                  reason="needs a Hopper GPU (runs on the device machine)")


def test_key_counts_the_kernel_cannot_read_fall_back():
    """A cache length that is not a multiple of 8 cannot be read by the kernel's TMA copies: "auto"
    keeps the Triton lowering there, and "mosaic_gpu" says why it cannot run."""
    sel, config = small(4, 32, 2, 3, 3, 64, 8), Config(score_lowering="mosaic_gpu")
    for s_len, fits in [(200, True), (201, False), (60, False)]:
        q = jnp.zeros((1, s_len, 2, 64), jnp.bfloat16)
        assert M.supports(q.dtype, 64, s_len, sel.top_k) == fits
        if not fits:
            with pytest.raises(ValueError, match="multiple of 8"):
                P._uses_mgpu_score(q, q[:, :, :1], sel, config, interpret=True)


def test_config_and_inputs_are_checked():
    with pytest.raises(ValueError, match="score_lowering"):
        Config(score_lowering="cuda")
    with pytest.raises(ValueError, match="mgpu_consumers"):
        Config(mgpu_consumers=3)
    with pytest.raises(ValueError, match="mgpu_block_k"):
        Config(mgpu_block_k=32)
    with pytest.raises(ValueError, match="mgpu_merge"):
        Config(mgpu_merge="warps")
    case = Case(1, 200, 2, 1, 64, small(4, 32, 2, 3, 3, 64, 8))
    q, k, _ = make_qkv(case, seed=6)  # float32: the Mosaic GPU kernel takes 16-bit inputs only
    with pytest.raises(ValueError, match="score_lowering='mosaic_gpu' needs bfloat16"):
        P.picks(q, k, sel=case.sel, config=Config(score_lowering="mosaic_gpu"), interpret=True)
    rows = jnp.zeros((1, 1, 1, 128, 64), jnp.bfloat16)  # 128 rows: not a multiple of 64 x 4
    with pytest.raises(ValueError, match="consumers"):
        M.score(rows, k.astype(jnp.bfloat16), jnp.zeros((1, 1), jnp.int32), sink=4, top_k=2,
                splits=1, split_len=256, interpret=True)
    rows = jnp.zeros((1, 1, 1, 256, 128), jnp.bfloat16)
    keys = jnp.zeros((1, 256, 1, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="merge must be one of"):
        M.score(rows, keys, jnp.zeros((1, 1), jnp.int32), sink=4, top_k=2, splits=1,
                split_len=256, merge="warps", interpret=True)
    with pytest.raises(ValueError, match="shared memory"):  # 4 slots of 128 keys + the buffer
        M.score(rows, keys, jnp.zeros((1, 1), jnp.int32), sink=4, top_k=8, splits=1,
                split_len=256, block_k=128, slots=4, merge="rows", interpret=True)


@pytest.mark.parametrize("merge", M.MERGES)
@pytest.mark.parametrize("consumers,top_k,block_k", [(4, 4, 64), (2, 3, 64), (4, 8, 128),
                                                      (2, 1, 128)])
def test_lowers_for_cuda(consumers, top_k, block_k, merge):
    """The kernel lowers for CUDA on the CPU (the Mosaic GPU lowering and the MLIR of either
    merge: the per-thread lists, which hold 2, 4 or 8 entries per thread and row here, or a warp
    per row through shared memory; Mosaic GPU verifies the module), with a sink off the 8-row
    grid and two key splits."""
    bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    rows, k = bf16(1, 2, 3, 64 * consumers, 128), bf16(1, 4096, 2, 128)
    l0 = jax.ShapeDtypeStruct((1, 3), jnp.int32)

    def score(rows, k, l0):
        return M.score(rows, k, l0, sink=20, top_k=top_k, splits=2, split_len=2048,
                       block_k=block_k, slots=3 if block_k == 128 else 4, consumers=consumers,
                       merge=merge)

    exported = export_for_cuda(score, rows, k, l0)
    assert [o.shape for o in exported.out_avals] == [(1, 2, 3, 2, top_k, 64 * consumers)] * 2


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("merge", M.MERGES)
@pytest.mark.parametrize("top_k,block_k", [(3, 128), (8, 64), (1, 64)])
def test_gpu_top_k_and_key_tiles(top_k, block_k, merge):
    """Other top_k (lists of 4 and 8 entries per thread and row; a top_k of 1) and 128-key
    tiles, GQA at 16K, both merges: picks equal the Triton lowering's."""
    case = Case(1, 16384, 32, 8, 128, Selection(top_k=top_k, local_window=2048))
    _check_picks(case, consumers=4, block_k=block_k, merge=merge)


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("consumers", [4, 2])
@pytest.mark.parametrize("case", [*gpu_cases(32768), Case(2, 20008, 10, 2, 64),
                                  Case(1, 32768, 8, 2, 128, Selection(sink_tokens=20))],
                         ids=lambda c: c.id)
def test_gpu_picks_equal_triton_lowering(case, consumers):
    """The authors' defaults at 32K, and at a length that is a multiple of no key tile or chunk
    (20008: the kernel needs multiples of 8; batch 2, 5 query heads per kv head, d = 64), and
    with a sink of 20 (the middle starts off the 8-row grid of the TMA copies, whose first tile
    then starts at key 16 and is masked below 20), bf16: the two lowerings read the same bf16
    products with
    float32 sums, so their picks agree as sets (a summation-order near-tie may flip a rare one)
    and their scores to float32 rounding."""
    _check_picks(case, consumers=consumers)


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("consumers", [4, 2])
@pytest.mark.parametrize("case", gpu_cases(32768), ids=lambda c: c.id)
def test_gpu_row_merge_picks_equal_triton_lowering(case, consumers):
    """The warp-per-row merge (``Config.mgpu_merge="rows"``) at the authors' defaults, 32K."""
    _check_picks(case, consumers=consumers, merge="rows")


def _slots(block_k: int, merge: str) -> int:
    """The default ring of 4 slots, 3 where 128-key tiles and the row merge's buffer would not
    fit in shared memory with 4."""
    return 3 if block_k == 128 and merge == "rows" else 4


def _check_picks(case: Case, consumers: int, block_k: int = 64, merge: str = "lanes"):
    q, k, _ = (x.astype(jnp.bfloat16) for x in make_qkv(case, seed=9))

    def picks(lowering):
        rows = case.sel.chunk_size * case.q_heads // case.kv_heads
        config = dataclasses.replace(P.default_config(case.head_dim, 2, rows),
                                     score_lowering=lowering, mgpu_consumers=consumers,
                                     mgpu_block_k=block_k, mgpu_merge=merge,
                                     mgpu_slots=_slots(block_k, merge))
        return jax.jit(lambda q, k: P.picks(q, k, sel=case.sel, config=config))(q, k)

    vals_m, idx_m = picks("mosaic_gpu")
    vals_t, idx_t = picks("triton")
    same = np.sort(np.asarray(idx_m), -1) == np.sort(np.asarray(idx_t), -1)
    assert same.mean() > 0.9999, same.mean()
    live = np.asarray(idx_t) >= 0
    assert live.mean() > 0.5
    diff = np.abs(np.sort(np.asarray(vals_m), -1) - np.sort(np.asarray(vals_t), -1))
    assert np.max(np.where(live & same, diff, 0)) < 1e-3 * np.max(np.abs(np.asarray(vals_t)))


def _ternary(case: Case, seed: int):
    """q and k with entries in {-1, 0, 1}: every q . k is a small integer, exact in any summation
    order and in bfloat16 products, so scores tie often and both lowerings must break every tie
    as the reference does (the lower position)."""
    kq, kk = jax.random.split(jax.random.PRNGKey(seed))
    draw = lambda key, heads: jax.random.randint(key, (case.batch, case.length, heads,
                                                       case.head_dim), -1, 2)
    return (draw(kq, case.q_heads).astype(jnp.bfloat16),
            draw(kk, case.kv_heads).astype(jnp.bfloat16))


def _exact_picks(q, k, sel: Selection):
    """Each packed row's top_k middle keys by ``reference.score_topk`` (a sort of every score,
    ties to the lower position), chunk by chunk, as sorted position sets (B, Hkv, NC, R, K)."""
    geo = R.geometry(q.shape, k.shape, sel)
    f32 = lambda x: x.astype(jnp.float32)
    rows = R.pack_rows(f32(q), geo)
    k_heads = f32(k).transpose(0, 2, 1, 3)
    _, _, l0 = R.chunk_bounds(R.query_starts(None, geo.batch, geo.num_keys, geo.num_queries), geo)
    top = jax.jit(lambda r, l: R.score_topk(r, k_heads, l, sel)[1])
    return np.stack([np.sort(np.asarray(top(rows[:, :, c], l0[:, c])), -1)
                     for c in range(geo.num_chunks)], axis=2)


def _check_ties(case: Case, config: Config, interpret):
    q, k = _ternary(case, seed=case.sel.top_k)
    _, idx = jax.jit(lambda q, k: P.picks(q, k, sel=case.sel, config=config,
                                          interpret=interpret))(q, k)
    got = np.sort(np.asarray(idx), -1)
    want = _exact_picks(q, k, case.sel)
    geo = R.geometry(q.shape, k.shape, case.sel)
    t = np.asarray(R.row_positions(jnp.arange(geo.num_chunks) * geo.chunk, geo.rows, geo.groups))
    real = t < case.length  # rows of queries past T (the last chunk's padding): no picks
    assert (got[:, :, ~real] == -1).all()
    assert (want[:, :, real] >= 0).mean() > 0.5  # most rows have a middle of top_k keys
    np.testing.assert_array_equal(got[:, :, real], want[:, :, real])


@pytest.mark.parametrize("top_k", [1, 3, 8])
def test_ties_go_to_the_lower_position(top_k):
    """CPU twin of ``test_gpu_ties_go_to_the_lower_position``: the Triton-lowered scoring in the
    Pallas interpreter, integer scores, picks equal the sort-based reference's bit for bit."""
    case = Case(1, 300, 4, 2, 64, small(4, 32, top_k, 8, 3, 64, 8))
    _check_ties(case, Config(score_block_q=16, score_block_k=16, score_stages=1,
                             score_lowering="triton"), interpret=True)


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("merge", M.MERGES)
@pytest.mark.parametrize("top_k,block_k", [(1, 64), (3, 128), (4, 64), (8, 128)])
def test_gpu_ties_go_to_the_lower_position(top_k, block_k, merge):
    """Integer scores (q, k in {-1, 0, 1}): the Mosaic GPU kernel's merge (the per-thread
    lists, pops and final rounds; or a warp per row) must break every tie to the lower
    position; picks equal the sort-based reference's bit for bit (8K, GQA, middles up to 7K
    keys)."""
    case = Case(1, 8192, 8, 2, 64, Selection(top_k=top_k, local_window=1024))
    rows = case.sel.chunk_size * case.q_heads // case.kv_heads
    config = dataclasses.replace(P.default_config(64, 2, rows), score_lowering="mosaic_gpu",
                                 mgpu_block_k=block_k, mgpu_merge=merge,
                                 mgpu_slots=_slots(block_k, merge))
    _check_ties(case, config, interpret=False)


@pytest.mark.parametrize("groups,chunk", [(1, 64), (4, 512), (8, 8)])
def test_lowers_for_cuda_with_rows_in_place(groups, chunk):
    """With q read in place (``mgpu_tokens``: G copies per tile, a row offset of whole 8-row
    tiles) the kernel lowers for CUDA on the CPU; its picks come out per (split, K, row)."""
    bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    q, k, l0 = bf16(1, 3 * chunk, 2 * groups, 128), bf16(1, 4096, 2, 128), jax.ShapeDtypeStruct(
        (1, 2), jnp.int32)
    r = P.round_up(chunk * groups, 256)

    def score(q, k, l0):
        return M.score(q, k, l0, sink=20, top_k=4, splits=2, split_len=2048,
                       tokens=(chunk, chunk, r))

    exported = export_for_cuda(score, q, k, l0)
    assert [o.shape for o in exported.out_avals] == [(1, 2, 2, 2, 4, r)] * 2
    with pytest.raises(ValueError, match="multiple of 64"):
        M.score(jnp.zeros((1, 96, 4, 128), jnp.bfloat16), jnp.zeros((1, 256, 2, 128),
                jnp.bfloat16), jnp.zeros((1, 2), jnp.int32), sink=4, top_k=2, splits=1,
                split_len=256, tokens=(24, 0, 256), interpret=True)


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("case", [*gpu_cases(32768), Case(2, 20008, 16, 2, 64,
                                                          Selection(chunk_size=64))],
                         ids=lambda c: c.id)
def test_gpu_rows_in_place_equal_packed_rows(case):
    """q read in place (``Config.mgpu_rows``, the default where it applies) against packed
    copies of the rows: the same picks and scores, bit for bit (the same products and sums per
    row; only the rows' order in a tile differs). G = 1, 4 and 8 (C = 64)."""
    q, k, _ = (x.astype(jnp.bfloat16) for x in make_qkv(case, seed=9))
    rows = case.sel.chunk_size * case.q_heads // case.kv_heads

    def picks(mode):
        config = dataclasses.replace(P.default_config(case.head_dim, 2, rows),
                                     score_lowering="mosaic_gpu", mgpu_rows=mode)
        return jax.jit(lambda q, k: P.picks(q, k, sel=case.sel, config=config, skip=2))(q, k)

    for a, b in zip(picks("in_place"), picks("packed")):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
