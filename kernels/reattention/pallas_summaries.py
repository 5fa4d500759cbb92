"""The block summaries of block picks as one Pallas kernel (Triton lowering).

Same function as ``key_blocks.summaries`` (its jnp twin and reference): row sink + j of the
result holds [max, min] per dim of the keys [sink + j b, sink + (j + 1) b) of a kv head.

Why a kernel: XLA's reduce of the cache over the b rows of each block read the keys at about
0.5 TB/s on an H100 (2.06 ms at 128K with 32 kv heads, 0.45 ms at 32K; `docs/perf-notes.md`,
fourteenth session), a sixth of the copy rate. Here a program reads ``TILE`` whole blocks of one
kv head (rows of D contiguous values, ``TILE`` b of them), reduces each block's b rows in
registers and writes the ``TILE`` summary rows: every key is read once. The last program of a
row of tiles starts early enough to end at the last block (its first blocks are written twice,
with the same values), so no load is masked.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from kernels.cca.pallas_common import call
from kernels.reattention import key_blocks
from kernels.reattention.params import Selection, cdiv

TILE = 8  # blocks per program (fewer when the cache holds fewer)


def applies(sel: Selection, head_dim: int) -> bool:
    """Power-of-two block sizes and head dims (Triton's block shapes)."""
    b = sel.key_block
    return b > 1 and not b & (b - 1) and head_dim >= 16 and not head_dim & (head_dim - 1)


def _kernel(k_ref, o_ref, *, sink: int, kb: int, tile: int, nb: int):
    first = jnp.minimum(pl.program_id(0) * tile, nb - tile)  # the last tile ends at block nb
    x = k_ref[pl.ds(sink + first * kb, tile * kb), :]
    x = x.reshape(tile, kb, x.shape[-1])
    d = x.shape[-1]
    o_ref[pl.ds(first, tile), pl.ds(0, d)] = jnp.max(x, axis=1)
    o_ref[pl.ds(first, tile), pl.ds(d, d)] = jnp.min(x, axis=1)


def block_summaries(k: Float[Array, "B S Hkv D"], sel: Selection,
                    interpret: bool = False) -> Float[Array, "B S2 Hkv D2"]:
    """``key_blocks.summaries``: by the kernel where it :func:`applies`, else by the jnp twin."""
    if applies(sel, k.shape[3]):
        return summaries(k, sel, interpret=interpret)
    return key_blocks.summaries(k, sel)


@functools.partial(jax.jit, static_argnames=("sel", "interpret"))
def summaries(k: Float[Array, "B S Hkv D"], sel: Selection,
              interpret: bool = False) -> Float[Array, "B S2 Hkv D2"]:
    """``key_blocks.summaries`` (B, round_up(sink + NB, 8), Hkv, 2D), the reductions in the
    kernel; the sink's rows and the padding zeros (a copy of the NB rows, 1 / b of the keys)."""
    b, s, hkv, d = k.shape
    if not applies(sel, d):
        raise ValueError(f"the summaries kernel needs a power-of-two key_block > 1 and head dim; "
                         f"got key_block {sel.key_block}, head dim {d}")
    nb, sink, kb = key_blocks.num_blocks(s, sel), sel.sink_tokens, sel.key_block
    total = key_blocks.summary_rows(s, sel)
    if nb == 0:
        return jnp.zeros((b, total, hkv, 2 * d), k.dtype)
    tile = min(TILE, 1 << (nb.bit_length() - 1))  # a power of two <= nb
    rows = call(
        functools.partial(_kernel, sink=sink, kb=kb, tile=tile, nb=nb),
        grid=(cdiv(nb, tile), b, hkv),
        in_specs=[pl.BlockSpec((None, s, None, d), lambda j, bi, h: (bi, 0, h, 0))],
        out_specs=[pl.BlockSpec((None, nb, None, 2 * d), lambda j, bi, h: (bi, 0, h, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, nb, hkv, 2 * d), k.dtype)],
        inputs=[k],
        num_warps=8,
        num_stages=1,
        interpret=interpret,
        name="reattention_summaries",
    )[0]
    return jnp.pad(rows, [(0, 0), (sink, total - sink - nb), (0, 0), (0, 0)])
