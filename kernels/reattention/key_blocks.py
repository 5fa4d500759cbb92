"""Block picks (``Selection.key_block`` = b > 1) as new inputs to the token-level scoring.

Block j of the middle holds the keys [sink + j b, sink + (j + 1) b). A row q scores it by

    U_j(q) = sum_d max(q_d M_jd, q_d m_jd),

M_j and m_j the block's per-dim maximum and minimum of the un-rotated keys: an upper bound of
max_i q . k_i over the block (the bound of Quest, arXiv 2406.10774). With q+ = max(q, 0) and
q- = min(q, 0), U_j = q+ . M_j + q- . m_j = [q+, q-] . [M_j, m_j], one dot product of width 2D,
so every scoring kernel runs unchanged on

* the rows ``signed_queries(q)`` = [q+, q-] (exact in any dtype: only signs are split);
* the summary "cache" ``summaries(k, sel)``, row sink + j = [M_j, m_j] (exact: maxima and
  minima of stored keys), rows below the sink zero (never scored: the sink is not the middle);
* the middle end ``summary_end(L0)`` = sink + (L0 - sink) / b (b divides ``middle_align``, so
  the middle is whole blocks).

A pick of summary row sink + j is handed to the selection as the token position
``centres`` = sink + j b + b // 2, whose span (``span == key_block``) is exactly block j, so
votes, the cap and the gathered list are the token-level ones: ties of the bound go to the lower
block, ties of votes to the higher best bound, then the lower block. ``reference_torch`` has the
same three functions for tensors.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from kernels.reattention.params import Selection, round_up


def num_blocks(num_keys: int, sel: Selection) -> int:
    """Whole blocks of b keys from the sink on."""
    return max(num_keys - sel.sink_tokens, 0) // sel.key_block


def signed_queries(q: Float[Array, "*N D"]) -> Float[Array, "*N D2"]:
    """[max(q, 0), min(q, 0)] along the last axis."""
    zero = jnp.zeros((), q.dtype)
    return jnp.concatenate([jnp.maximum(q, zero), jnp.minimum(q, zero)], axis=-1)


def summary_rows(num_keys: int, sel: Selection) -> int:
    """Rows of the summaries of a cache of ``num_keys`` keys: round_up(sink + NB, 8)."""
    return round_up(sel.sink_tokens + num_blocks(num_keys, sel), 8)


def block_extremes(blocks: Float[Array, "B N b Hkv D"]) -> Float[Array, "B N Hkv D2"]:
    """[max, min] per dim over each block's b keys (axis 2): the blocks' summary rows."""
    return jnp.concatenate([blocks.max(axis=2), blocks.min(axis=2)], axis=-1)


def summaries(k: Float[Array, "B S Hkv D"], sel: Selection) -> Float[Array, "B S2 Hkv D2"]:
    """Summary rows (B, :func:`summary_rows`, Hkv, 2D) in k's dtype: row sink + j holds
    [max, min] of block j's keys per dim; the sink's rows and the padding are zeros."""
    b, s, hkv, d = k.shape
    nb, sink, kb = num_blocks(s, sel), sel.sink_tokens, sel.key_block
    rows = block_extremes(k[:, sink: sink + nb * kb].reshape(b, nb, kb, hkv, d))
    return jnp.pad(rows, [(0, 0), (sink, summary_rows(s, sel) - sink - nb), (0, 0), (0, 0)])


def check_summaries(summaries, k_shape: tuple, k_dtype, sel: Selection) -> None:
    """``summaries`` given for a cache of shape ``k_shape`` must be what :func:`summaries` of it
    would be in shape and dtype, and the picks must be block picks (its values are the
    caller's: ``jax_cca.cache.ReAttentionCache`` keeps them equal)."""
    b, s, hkv, d = k_shape
    want = (b, summary_rows(s, sel), hkv, 2 * d)
    if sel.key_block <= 1 or summaries.shape != want or summaries.dtype != k_dtype:
        raise ValueError(f"block_summaries must be the block summaries of the key cache "
                         f"{tuple(k_shape)} (shape {want}, dtype {k_dtype}) with block picks "
                         f"(key_block > 1); got {summaries.dtype}{list(summaries.shape)} with "
                         f"key_block {sel.key_block}")


def summary_end(l0: Int[Array, "*N"], num_keys: int, sel: Selection) -> Int[Array, "*N"]:
    """The middle's end [sink, L0) in summary rows: L0 itself when the middle is empty."""
    sink = sel.sink_tokens
    blocks = jnp.minimum((l0 - sink) // sel.key_block, num_blocks(num_keys, sel))
    return jnp.where(l0 > sink, sink + blocks, l0).astype(l0.dtype)


def centres(idx: Int[Array, "*N"], sel: Selection) -> Int[Array, "*N"]:
    """Summary-row picks -> the token positions whose spans are their blocks (-1 stays)."""
    kb = sel.key_block
    return jnp.where(idx >= 0, sel.sink_tokens + (idx - sel.sink_tokens) * kb + kb // 2,
                     -1).astype(idx.dtype)
