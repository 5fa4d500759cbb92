"""The Mosaic GPU scoring kernel of ReAttention (``kernels/reattention/pallas_mgpu_score.py``).

On a Hopper GPU (``-m gpu``) the compiled kernel's picks equal the Triton lowering's: at 32K
with four consumers (the default) and two, and at 16K with other top_k and 128-key tiles; the
ReAttention op and parity suites run it too (``Config.score_lowering`` "auto"). On CPU the
argument checks run, and the kernel is lowered for CUDA (``jax.export``: the Mosaic GPU lowering
with its ``inline_mgpu`` merge runs, nothing compiles) for each width of the per-thread lists.
jax 0.10's Mosaic GPU interpreter deadlocks on this kernel's barriers under the suite's XLA
flags, and cannot run ``inline_mgpu`` at all, so the CPU twin of the same function is the
Triton-lowered scoring kernel in the Pallas interpreter (``test_reattention_ops.py``,
``test_picks_match_reference_topk``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.reattention import pallas as P
from kernels.reattention import pallas_mgpu_score as M
from kernels.reattention.params import Config, Selection
from kernels.reattention.shapes import Case, gpu_cases, small
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
    case = Case(1, 200, 2, 1, 64, small(4, 32, 2, 3, 3, 64, 8))
    q, k, _ = make_qkv(case, seed=6)  # float32: the Mosaic GPU kernel takes 16-bit inputs only
    with pytest.raises(ValueError, match="score_lowering='mosaic_gpu' needs bfloat16"):
        P.picks(q, k, sel=case.sel, config=Config(score_lowering="mosaic_gpu"), interpret=True)
    rows = jnp.zeros((1, 1, 1, 128, 64), jnp.bfloat16)  # 128 rows: not a multiple of 64 x 4
    with pytest.raises(ValueError, match="consumers"):
        M.score(rows, k.astype(jnp.bfloat16), jnp.zeros((1, 1), jnp.int32), sink=4, top_k=2,
                splits=1, split_len=256, interpret=True)


@pytest.mark.parametrize("consumers,top_k,block_k", [(4, 4, 64), (2, 3, 64), (4, 8, 128),
                                                      (2, 1, 128)])
def test_lowers_for_cuda(consumers, top_k, block_k):
    """The kernel lowers for CUDA on the CPU (the Mosaic GPU lowering and the MLIR of the
    per-thread merge, whose lists hold 2, 4 or 8 entries per thread and row here), with a sink
    off the 8-row grid and two key splits."""
    bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    rows, k = bf16(1, 2, 3, 64 * consumers, 128), bf16(1, 4096, 2, 128)
    l0 = jax.ShapeDtypeStruct((1, 3), jnp.int32)

    def score(rows, k, l0):
        return M.score(rows, k, l0, sink=20, top_k=top_k, splits=2, split_len=2048,
                       block_k=block_k, consumers=consumers)

    exported = jax.export.export(jax.jit(score), platforms=["cuda"])(rows, k, l0)
    assert [o.shape for o in exported.out_avals] == [(1, 2, 3, 2, top_k, 64 * consumers)] * 2


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("top_k,block_k", [(3, 128), (8, 64), (1, 64)])
def test_gpu_top_k_and_key_tiles(top_k, block_k):
    """Other top_k (lists of 4 and 8 entries per thread and row; a top_k of 1) and 128-key
    tiles, GQA at 16K: picks equal the Triton lowering's."""
    case = Case(1, 16384, 32, 8, 128, Selection(top_k=top_k, local_window=2048))
    _check_picks(case, consumers=4, block_k=block_k)


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


def _check_picks(case: Case, consumers: int, block_k: int = 64):
    q, k, _ = (x.astype(jnp.bfloat16) for x in make_qkv(case, seed=9))

    def picks(lowering):
        rows = case.sel.chunk_size * case.q_heads // case.kv_heads
        config = dataclasses.replace(P.default_config(case.head_dim, 2, rows),
                                     score_lowering=lowering, mgpu_consumers=consumers,
                                     mgpu_block_k=block_k)
        return jax.jit(lambda q, k: P.picks(q, k, sel=case.sel, config=config))(q, k)

    vals_m, idx_m = picks("mosaic_gpu")
    vals_t, idx_t = picks("triton")
    same = np.sort(np.asarray(idx_m), -1) == np.sort(np.asarray(idx_t), -1)
    assert same.mean() > 0.9999, same.mean()
    live = np.asarray(idx_t) >= 0
    assert live.mean() > 0.5
    diff = np.abs(np.sort(np.asarray(vals_m), -1) - np.sort(np.asarray(vals_t), -1))
    assert np.max(np.where(live & same, diff, 0)) < 1e-3 * np.max(np.abs(np.asarray(vals_t)))
