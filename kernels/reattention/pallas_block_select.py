"""The kept blocks of a chunk's block picks by thresholds instead of a sort: a Pallas kernel
(Triton lowering), one program per (batch, kv head, chunk).

Same function as the ranking of ``reference.select_from_block_picks``: of the blocks with votes,
keep the ``max_selected`` best by (more votes, then a higher best score, then the lower block),
and return their centres ascending. XLA sorts each row's NB blocks for it, by three keys, in
several passes over memory (about 2 ms at 128K with 8 kv heads: 1,912 rows of 4,095 blocks).
Here each row's votes and scores stay in registers and the cut is found by counting:

* the vote threshold t: the largest t >= 1 with at least ``max_selected`` blocks of t votes or
  more, bit by bit from the top (a count per bit of the votes' range). Without one every block
  with a vote is kept;
* among the blocks of exactly t votes, the ``need`` best scores (``need`` = max_selected minus
  the blocks above t): the score threshold, bit by bit over the scores' order-preserving 32-bit
  keys (+0 and -0 are one key, as in XLA's sort);
* among the blocks of t votes and exactly that score, the lowest blocks: a running count.

The kept blocks' centres are then written in block order to their ranks (a running count), and
the slots past the last one get ``INT_MAX``, which ``reference.lists_from_centres`` reads as
"none". About 50 counts of 4K elements per row, against a sort's passes over memory.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt
from jaxtyping import Array, Float, Int

from kernels.cca.pallas_common import call
from kernels.reattention.params import Selection, next_power_of_2
from kernels.reattention.reference import INT_MAX

MAX_BLOCKS = 1 << 15  # a row's blocks live in registers: 1M keys at blocks of 32


def applies(num_blocks: int) -> bool:
    return 1 <= num_blocks <= MAX_BLOCKS


def _i32(bits: int) -> int:
    """The int32 with these 32 bits (1 << 31 is INT_MIN)."""
    return int(np.array(bits & 0xFFFFFFFF, np.uint32).view(np.int32))


def order_keys(x: Float[Array, "*N"]) -> Int[Array, "*N"]:
    """int32 keys ordered as the float32 scores rank in XLA's sort of -score: -0 and +0 one key,
    every NaN the lowest key, below -inf (XLA's comparator makes NaNs positive and sorts them
    last, so they rank worst). Zeros are found by a float compare, as the sort's comparator
    compares: where the device treats denormals as zero (XLA's CPU does), so do the keys."""
    bits = lax.bitcast_convert_type(jnp.where(x == 0, jnp.zeros_like(x), x), jnp.int32)
    key = jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)
    return jnp.where(x != x, jnp.int32(_i32(1 << 31)), key)


def _largest_at_least(count, bits: int, need):
    """The largest x of ``bits`` unsigned bits with ``count(x) >= need`` (count non-increasing
    in x; 0 where none qualifies but 0), bit by bit from the top."""
    x = jnp.int32(0)
    for bit in reversed(range(bits)):
        c = x | jnp.int32(_i32(1 << bit))
        x = jnp.where(count(c) >= need, c, x)
    return x


def _kernel(votes_ref, best_ref, out_ref, *, sel: Selection, vote_bits: int):
    cap = sel.max_selected
    votes = votes_ref[...]
    key = order_keys(best_ref[...])
    nbp = votes.shape[0]
    block = jnp.arange(nbp, dtype=jnp.int32)
    count = lambda mask: jnp.sum(mask.astype(jnp.int32))
    # The vote threshold (votes are counts: non-negative and below 2^vote_bits).
    t = _largest_at_least(lambda c: count(votes >= c), vote_bits, cap)
    tie = votes == t
    need = cap - count(votes > t)
    # Among t votes, the need-th best score: its key in offset binary (unsigned order).
    flip = jnp.int32(_i32(1 << 31))
    kb = _largest_at_least(lambda c: count(tie & (key >= (c ^ flip))), 32, need) ^ flip
    need = need - count(tie & (key > kb))
    last = tie & (key == kb)
    kept = jnp.where(t > 0, (votes > t) | (tie & (key > kb))
                     | (last & (jnp.cumsum(last.astype(jnp.int32)) <= need)), votes > 0)
    rank = jnp.cumsum(kept.astype(jnp.int32)) - 1
    n_kept = count(kept)
    width = out_ref.shape[0]  # > max_selected: the last slot is never a rank
    slots = jnp.arange(width, dtype=jnp.int32)
    plt.store(out_ref.at[pl.ds(0, width)], jnp.full((width,), INT_MAX, jnp.int32),
              mask=slots >= n_kept)
    centre = sel.sink_tokens + block * sel.key_block + sel.key_block // 2
    # Masked-off entries point at the last slot, which no rank writes (the interpreter's masked
    # store rewrites the old value there).
    plt.store(out_ref.at[jnp.where(kept, rank, width - 1)], centre, mask=kept)


@functools.partial(jax.jit, static_argnames=("sel", "picks", "interpret"))
def kept_centres(votes: Int[Array, "N NB"], best: Float[Array, "N NB"], sel: Selection,
                 picks: int, interpret: bool = False) -> Int[Array, "N K"]:
    """The centres of the ``max_selected`` best blocks of each row (``reference.block_votes``:
    votes and best scores of NB blocks), ascending, INT_MAX past the last; K = max_selected.
    ``picks``: the picks the votes were counted from. It bounds them (each pick counts once),
    and the vote threshold is searched over its bits only: votes above it are not allowed."""
    n, nb = votes.shape
    if not applies(nb) or best.shape != (n, nb) or votes.dtype != jnp.int32:
        raise ValueError(f"the block-selection kernel takes (N, NB) int32 votes and float "
                         f"scores with 1 <= NB <= {MAX_BLOCKS}; got votes {votes.dtype}"
                         f"{list(votes.shape)}, scores {list(best.shape)}")
    nbp = next_power_of_2(max(nb, 2))  # Triton blocks are powers of two: no votes past NB
    votes = jnp.pad(votes, ((0, 0), (0, nbp - nb)))
    best = jnp.pad(best.astype(jnp.float32), ((0, 0), (0, nbp - nb)), constant_values=-jnp.inf)
    width = next_power_of_2(sel.max_selected + 1)
    out = call(
        functools.partial(_kernel, sel=sel, vote_bits=max(int(picks), 1).bit_length()),
        grid=(n,),
        in_specs=[pl.BlockSpec((None, nbp), lambda i: (i, 0))] * 2,
        out_specs=[pl.BlockSpec((None, width), lambda i: (i, 0))],
        out_shape=[jax.ShapeDtypeStruct((n, width), jnp.int32)],
        inputs=[votes, best],
        num_warps=4 if nbp <= 4096 else 8,
        num_stages=1,
        interpret=interpret,
        name="reattention_block_select",
    )[0]
    return out[:, :sel.max_selected]
