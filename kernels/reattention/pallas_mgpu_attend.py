"""ReAttention's gathered attention as a Pallas kernel with the Mosaic GPU lowering (Hopper).

Same function as ``pallas._attend_kernel`` with the rotated tail (``Config.tail_keys``): every
row (query t, head of a kv head) of a chunk attends, with one online softmax, to the chunk's
gathered list (slots ``0 .. n_g - 1``) and then to the contiguous tail ``[L0, c1)``, causal.
What differs is where RoPE happens and how the work is scheduled:

* **Rotation.** Scores depend on position differences only. A row of query t sits at the
  re-numbered position ``n_g + t - L0`` and list slot i at i; with the row rotated at its original
  position t, slot i is rotated at ``i + L0 - n_g`` (same difference), which the op's list
  gather (``pallas_gather.gather_list``, a kernel; :func:`gather_list` here is its XLA twin)
  does once while it gathers the list's keys into a contiguous block per (batch, kv head,
  chunk). The tail's keys are ``pallas.tail_window``'s copy, rotated at the original positions,
  its values the cache's own rows. So the kernel is plain attention over two contiguous key
  sources, with one rotated query tile.
* **Schedule** (the CCA forward's, ``kernels/cca/pallas_mgpu.py``): one CTA per (128 rows of a
  chunk, batch, kv head), three warpgroups. The producer streams the list's key blocks, then the
  tail's, through a ring of shared-memory slots with TMA copies; the two consumers own 64 rows
  each (``S = Q K^T`` and ``O += P V`` on wgmma, a base-2 online softmax in registers) and take
  turns on the tensor cores.

Masks: list slots past ``n_g`` (its last block); tail keys before L0 (its first block starts at
a multiple of 8 rows of the window, as TMA copies into tiled shared memory need) and after the
row's query (causal, the last blocks). Rows are packed as in ``reference.pack_rows``: row r of a
chunk is query ``c0 + r // G``, head ``r % G``; rows of queries past ``min(c1, S)`` (padding,
or a chunk written past the cache) are computed as that last query (at least L0) and discarded
by the caller. Or (``tokens``) the kernel reads a consumer's 64 rows from the rotated queries
(B, T, Hq, D) in place, head-major (``mgpu_tokens``), and writes them to the output's queries,
so that the op needs neither a packed copy of q nor one of the output.

Tail blocks start up to 7 rows before L0 and may end up to a block past the window (or the
cache): the TMA copies fill rows past the end of a buffer with zeros, keys there are masked
(causal) and their values are finite. :func:`tail_sources` gives the kernel those buffers.

Supported (:func:`supports`): 16-bit inputs, head dim 64 or 128; the caller pads rows to a
multiple of 128 and the list to a multiple of the key block. ``interpret=True`` runs the Mosaic
GPU interpreter.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from kernels.cca.pallas_common import LOG2E, cdiv, pad_to
from kernels.cca.pallas_mgpu import Ring, consume, layout_helpers, produce, wgmma_inputs
from kernels.reattention import mgpu_tokens

ROWS = 64  # rows per consumer warpgroup (one wgmma M tile)
CONSUMERS = 2
TILE = ROWS * CONSUMERS  # rows per CTA


def supports(dtype, head_dim: int) -> bool:
    """True where this kernel applies: 16-bit inputs with head dim 64 or 128."""
    return wgmma_inputs(dtype, head_dim)


def _kernel(meta_ref, q_ref, kg_ref, vg_ref, kw_ref, v_ref, o_ref, scoped, *, groups, bk,
            slots, tiles, nc, nc_rows, hkv, s_len, scale, dtype, tokens, piece, overlap,
            interpret):
    import jax.experimental.pallas.mosaic_gpu as plgpu

    (qo_smem2, k_smem, v_smem, *stash2), (k_full, v_full, q_full), (k_free, v_free), turn = scoped
    _, iota = layout_helpers(interpret)
    b = lax.axis_index("batch")
    h = lax.axis_index("heads")
    wg = lax.axis_index("wg")
    item = lax.axis_index("items")
    c = lax.div(item, tiles)
    tile = lax.rem(item, tiles)
    c0, c1, l0, n_g, ws, row_shift = (meta_ref[b, h, c, i] for i in range(6))
    # ws is a multiple of 8 (``pallas.tail_window``): the values' tail copies start at cache
    # row ws + a multiple of 8, and Mosaic GPU addresses a copy into 8-row tiles by (tile, row
    # in the tile), so the start must be a tile's first row. jax 0.11 refuses to lower the copy
    # unless that is known here; 0.10 did not check.
    ws = pl.multiple_of(ws, 8)
    chunk_row = (b * hkv + h) * nc + c  # o, kg, vg: (B * Hkv * NC, rows or slots, D)
    q_row = (b * hkv + h) * nc_rows + c + row_shift  # q: (B * Hkv * NC_rows, rows, D)
    # Padding rows count as the chunk's last query, and rows of a chunk written past the cache
    # (not stored) as at least L0, so that every row sees a key and the tail has a block.
    last_t = jnp.minimum(c1, s_len) - 1
    clamp = lambda t: jnp.maximum(jnp.minimum(t, last_t), l0)
    # Packed row r's query. Head-major tiles (``tokens``) hold the same queries per 64 rows (G
    # divides 64), so their first and last queries, which the schedule below uses, are too.
    query_of = lambda r: clamp(c0 + lax.div(r, groups))
    if tokens is not None:  # rows in place (``mgpu_tokens``): chunk c + shift of q and out
        token = lambda offset, r0: offset + (c + row_shift) * tokens.chunk + lax.div(r0, groups)

    # The CTA's stream: steps [0, nl) are list blocks, [nl, n_steps) tail blocks; tail block i
    # holds window rows a0 + i bk .. (key ws + that row).
    nl = cdiv(n_g, bk)
    a0 = lax.div(l0 - ws, 8) * 8
    t_cta = query_of(tile * TILE + TILE - 1)
    n_steps = nl + cdiv(t_cta + 1 - ws - a0, bk)

    ring = Ring(k_smem, v_smem, k_full, v_full, k_free, v_free, turn, slots)

    @pl.when(wg < CONSUMERS)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        qo_smem = qo_smem2.at[wg]
        r0 = tile * TILE + wg * ROWS
        if tokens is None:
            plgpu.copy_gmem_to_smem(q_ref.at[q_row, pl.ds(r0, ROWS)], qo_smem, q_full.at[wg])
        else:
            mgpu_tokens.load(q_ref, b, token(tokens.q_offset, r0), h * groups, groups, qo_smem,
                             q_full.at[wg])
        plgpu.barrier_wait(q_full.at[wg])
        plgpu.barrier_wait(k_full.at[0])  # n_steps >= 1: every row sees its own query

        # Each row's query as a (64,) row vector broadcast into the tile (two registers per
        # thread instead of one per element of the tile).
        rows = iota(jnp.int32, (ROWS,), 0, plgpu.Layout.WGMMA.reduce(1))
        if tokens is None:
            queries = query_of(r0 + rows)
        else:  # head-major rows
            queries = clamp(c0 + lax.div(r0, groups) + mgpu_tokens.tile_query(rows, groups))

        def visible(kind: str):
            def mask(s):
                cols = iota(jnp.int32, (ROWS, bk), 1, plgpu.Layout.WGMMA)
                if kind == "list":
                    return cols + s * bk < n_g
                keys = cols + (ws + a0 + (s - nl) * bk)
                return (keys >= l0) & (keys <= lax.broadcast_in_dim(queries, cols.shape, [0]))

            return mask

        # Which steps need a mask, for this consumer's rows: the list's last block if partial;
        # the tail's first block (keys before L0) and the blocks from the first that holds a
        # key past the consumer's first query (causal).
        full_list = lax.div(n_g, bk)
        t_min = query_of(r0)
        unmasked_end = jnp.clip(lax.div(t_min + 1 - ws - a0, bk), 1, n_steps - nl)
        segments = [(full_list, None), (nl, visible("list")), (nl + 1, visible("tail")),
                    (nl + unmasked_end, None), (n_steps, visible("tail"))]
        acc, m, l = consume(wg, ring, qo_smem, n_steps, segments, scale2=scale * LOG2E,
                            dtype=dtype, overlap=overlap,
                            stash=stash2[0].at[wg] if overlap else None,
                            interpret=interpret)

        acc = acc / lax.broadcast_in_dim(l, acc.shape, [0])
        qo_smem[...] = acc.astype(dtype)
        plgpu.commit_smem()
        if tokens is None:
            plgpu.copy_smem_to_gmem(qo_smem, o_ref.at[chunk_row, pl.ds(r0, ROWS)])
        else:  # padding tiles (rows past C * G) would land on the next chunk's queries
            pl.when(r0 < tokens.chunk * groups)(lambda: mgpu_tokens.store(
                qo_smem, o_ref, b, token(tokens.o_offset, r0), h * groups, groups))
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == CONSUMERS)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")

        def fetch(src_list, src_tail, row0, smem, full, s, slot):
            @pl.when(s < nl)
            def _():
                block = jnp.minimum(s, src_list.shape[1] // bk - 1)  # s itself; static-safe
                plgpu.copy_gmem_to_smem(src_list.at[chunk_row, pl.ds(block * bk, bk)],
                                        smem.at[slot], full.at[slot])

            @pl.when(s >= nl)
            def _():  # rows past the buffer's end arrive as zeros
                plgpu.copy_gmem_to_smem(src_tail.at[b, pl.ds(row0 + a0 + (s - nl) * bk, bk), h],
                                        smem.at[slot], full.at[slot])

        def fetch_values_in_place(s, slot):  # ``piece``: vg_ref holds the lists' cache rows
            for p in range(bk // piece):  # runs of ``piece`` rows, starting at multiples of 8
                dst = v_smem.at[slot, pl.ds(p * piece, piece)]

                @pl.when(s < nl)
                def _():
                    block = jnp.minimum(s, vg_ref.shape[1] // bk - 1)
                    row = pl.multiple_of(vg_ref[chunk_row, block * bk + p * piece], 8)
                    plgpu.copy_gmem_to_smem(v_ref.at[b, pl.ds(row, piece), h], dst,
                                            v_full.at[slot])

                @pl.when(s >= nl)
                def _():
                    row = ws + a0 + (s - nl) * bk + p * piece
                    plgpu.copy_gmem_to_smem(v_ref.at[b, pl.ds(row, piece), h], dst,
                                            v_full.at[slot])

        # Tail keys from the window (row 0 = key ws), values from the cache (row 0 = key 0).
        values = (fetch_values_in_place if piece else
                  lambda s, slot: fetch(vg_ref, v_ref, ws, v_smem, v_full, s, slot))
        produce(slots, n_steps,
                (lambda s, slot: fetch(kg_ref, kw_ref, 0, k_smem, k_full, s, slot), k_free),
                (values, v_free))


def values_piece(sel, block_k: int) -> int:
    """Rows per TMA copy when the kernel reads a chunk's list values from the cache in place
    (``attend``'s ``list_rows``), or 0 where they must be gathered. With block picks
    (``Selection.key_block`` b > 1) a list is the sink's first rows then whole blocks of b
    rows, each block a run of the cache starting at sink + a multiple of b, and slots past the
    list hold row 0. So runs of gcd(sink, b) slots are runs of cache rows, and so are runs of
    any divisor of that; the copies take gcd(sink, b, ``block_k``) rows (a key block of
    ``block_k`` slots holds whole copies), which the TMA copies into 8-row tiles need to be a
    multiple of 8."""
    if sel.key_block <= 1:
        return 0
    piece = math.gcd(sel.sink_tokens, sel.key_block, block_k)
    return piece if piece % 8 == 0 else 0


def gather_list(k: Float[Array, "B S Hkv D"], v: Float[Array, "B S Hkv D"],
                glist: Int[Array, "B Hkv NC NG"], l0: Int[Array, "B Hkv NC"],
                n_g: Int[Array, "B Hkv NC"], inv_freq, block_k: int):
    """(kg, vg) (B, Hkv, NC, NGp, D), NG padded to a multiple of ``block_k``: the keys and
    values of each chunk's list, the keys rotated at ``slot + L0 - n_g`` (float32 math), so that
    they meet rows rotated at their original positions. Padding and unused slots hold key 0
    (masked by the kernel).

    The rotation is two: by the slot's angles (a table of NGp rows) and by the chunk's offset
    (a row per chunk and kv head), so no element evaluates a cosine: at 128K with 32 kv heads
    the lists hold 8e9 elements, and a cosine and a sine of each took about as long as the
    gather's memory traffic."""
    b, _, hkv, d = k.shape
    glist = pad_to(glist, 3, block_k)
    bi = jnp.arange(b)[:, None, None, None]
    hi = jnp.arange(hkv)[None, :, None, None]
    cos_s, sin_s, cos_o, sin_o = lax.optimization_barrier(
        list_rotation_tables(glist.shape[3], l0, n_g, inv_freq))
    x = k[bi, glist, hi].astype(jnp.float32)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    for cos, sin in ((cos_s, sin_s), (cos_o[..., None, :], sin_o[..., None, :])):
        x1, x2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    return jnp.concatenate([x1, x2], axis=-1).astype(k.dtype), v[bi, glist, hi]


def list_rotation_tables(slots: int, l0: Int[Array, "B Hkv NC"], n_g: Int[Array, "B Hkv NC"],
                         inv_freq):
    """The two rotations of a list's keys, as float32 (cos, sin) pairs: by each slot's angles,
    (slots, D/2), then by each chunk's offset L0 - n_g, (B, Hkv, NC, D/2). Shared by
    :func:`gather_list` and ``pallas_gather.gather_list``."""
    freq = jnp.asarray(inv_freq, jnp.float32)
    slot_angle = jnp.arange(slots, dtype=jnp.float32)[:, None] * freq
    offset_angle = (l0 - n_g).astype(jnp.float32)[..., None] * freq
    return (jnp.cos(slot_angle), jnp.sin(slot_angle), jnp.cos(offset_angle),
            jnp.sin(offset_angle))


def tail_sources(window: Float[Array, "B W Hkv D"], v: Float[Array, "B S Hkv D"], *,
                 block_k: int, num_queries: int, interpret: bool) -> tuple[jax.Array, jax.Array]:
    """The buffers the kernel reads the tails from: the rotated window (keys) and the cache's v
    (values, read from row ws on). On the GPU they are used as they are, only their row counts
    padded to a multiple of 8 where they are not (the TMA descriptor of a buffer copied into
    8-row tiles needs it), and the TMA copies fill the rows past their ends with zeros. The
    interpreter raises on such reads (and then hangs), so there both are padded with zeros as
    far as a tail block can reach: a block past the last key, or past L0 of a chunk written
    past the cache (L0 < q_start + T <= S + ``num_queries``)."""
    if interpret:
        rows = [(0, 0), (0, num_queries + 2 * block_k), (0, 0), (0, 0)]
        window, v = jnp.pad(window, rows), jnp.pad(v, rows)
    return pad_to(window, 1, 8), pad_to(v, 1, 8)


class Tokens(NamedTuple):
    """Rows read and written in place (``mgpu_tokens``): the rows of chunk c (+ meta's row shift)
    are queries ``q_offset + (c + shift) * chunk ..`` of the query array (B, Tq, Hq, D), and go
    to the same queries ``o_offset + ..`` of the output (B, ``out_len``, Hq, D); ``rows``: rows
    per chunk, C * G padded to a multiple of 128 (the CTAs' tiles)."""

    chunk: int
    rows: int
    q_offset: int
    o_offset: int
    out_len: int


def attend(
    qo_rows: Float[Array, "B Hkv NC R D"] | Float[Array, "B Tq Hq D"],
    kg: Float[Array, "B Hkv NC NG D"],
    vg: Float[Array, "B Hkv NC NG D"],
    k_window: Float[Array, "B W Hkv D"],
    v: Float[Array, "B S Hkv D"],
    meta: Int[Array, "B Hkv NC 8"],
    *,
    groups: int,
    num_keys: int,
    scale: float,
    block_k: int = 128,
    slots: int = 2,
    tokens: Tokens | None = None,
    out: Float[Array, "B To Hq D"] | None = None,
    list_rows: Int[Array, "B Hkv NC NG"] | None = None,
    piece: int = 0,
    overlap: bool = False,
    interpret: bool = False,
) -> Float[Array, "B Hkv NC R D"] | Float[Array, "B To Hq D"]:
    """Gathered attention of the packed rows ``qo_rows`` (rotated at their original positions)
    over each chunk's list (``kg``, rotated at ``slot + L0 - n_g``; ``vg``) and its tail:
    ``pallas.tail_window``'s keys (row i = key ws + i) and the cache's values (row i = key i),
    both from :func:`tail_sources`. ``meta[..., :6]`` = (c0, c1, L0, n_g, ws, row shift) per
    chunk; ``num_keys`` S. Chunk c of ``kg`` / ``meta`` (and of the output) reads its rows
    from chunk c + (row shift) of ``qo_rows``, so that a group of a call's chunks reads its
    rows in place (the shift is the group's first chunk; 0 when ``qo_rows`` holds exactly the
    chunks of ``kg``). It must keep c + shift within ``qo_rows``' chunks: not checked.

    With ``tokens``, ``qo_rows`` is the rotated queries themselves (B, Tq, Hq, D) and the output
    is (B, ``tokens.out_len``, Hq, D), its chunk c + shift written in place
    (``mgpu_tokens.applies`` must hold); ``out``: an array to write into (in place, aliased),
    else a fresh one whose other queries are left unwritten. Queries past either array's end
    are zeros (read) or dropped (written) by the TMA unit; the interpreter raises on them.

    With ``list_rows`` (the lists' cache rows, NG slots as ``kg``'s) ``vg`` is None: the
    kernel reads the lists' values from ``v`` itself, ``piece`` slots per TMA copy, slot
    ``i .. i + piece - 1`` from rows ``list_rows[i] ..`` for i a multiple of ``piece``
    (:func:`values_piece` says when the lists allow it; the rows are not checked)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    nc, ng = kg.shape[2], kg.shape[3]
    if tokens is None:
        if out is not None:
            raise ValueError("an output to write into needs the rows in place (tokens)")
        b, hkv, nc_rows, r, d = qo_rows.shape
        rows_in = (b * hkv * nc_rows, r, d)
        out_type = jax.ShapeDtypeStruct((b * hkv * nc, r, d), qo_rows.dtype)
    else:
        b, _, hq, d = qo_rows.shape
        hkv, nc_rows, r = kg.shape[1], nc, tokens.rows
        mgpu_tokens.check(hq, hkv, groups, tokens.chunk, r, q=qo_rows.shape[1],
                          out=tokens.out_len)
        rows_in = qo_rows.shape
        out_type = jax.ShapeDtypeStruct((b, tokens.out_len, hq, d), qo_rows.dtype)
    if nc > nc_rows:
        raise ValueError(f"{nc} chunks of lists but only {nc_rows} chunks of rows")
    if (list_rows is None) == (vg is None) or (list_rows is not None and (
            list_rows.shape != kg.shape[:4] or piece < 8 or piece % 8 or block_k % piece)):
        raise ValueError(f"give either the gathered values vg or the lists' rows (shape "
                         f"{kg.shape[:4]}, read in pieces of a multiple of 8 rows dividing "
                         f"block_k={block_k}); got vg {None if vg is None else vg.shape}, rows "
                         f"{None if list_rows is None else list_rows.shape}, piece {piece}")
    if list_rows is None:
        piece = 0
    vals = kg if vg is None else vg  # (values read in place: the checks see kg twice)
    if not (supports(qo_rows.dtype, d) and qo_rows.dtype == kg.dtype == vals.dtype
            == k_window.dtype == v.dtype):
        raise ValueError(f"the Mosaic GPU ReAttention attention needs one 16-bit dtype and head "
                         f"dim 64 or 128; got rows {qo_rows.dtype} with head dim {d}, list "
                         f"{kg.dtype}/{vals.dtype}, window {k_window.dtype}, values {v.dtype}")
    if block_k not in (64, 128, 192) or slots < 2:
        raise ValueError(f"block_k must be 64, 128 or 192 and slots >= 2; got {block_k}, "
                         f"{slots}")
    if (kg.shape != vals.shape or kg.shape[:2] != (b, hkv) or kg.shape[4] != d
            or k_window.shape[::2] != (b, hkv) or v.shape[::2] != (b, hkv)
            or k_window.shape[3] != d or v.shape[3] != d or meta.shape != (b, hkv, nc, 8)):
        raise ValueError(f"shapes disagree: rows {qo_rows.shape}, list {kg.shape}/{vals.shape}, "
                         f"window {k_window.shape}, values {v.shape}, meta {meta.shape}")
    if r % TILE or ng % block_k or k_window.shape[1] % 8 or v.shape[1] % 8:
        raise ValueError(f"rows ({r}) must be a multiple of {TILE}, the list ({ng}) of block_k "
                         f"({block_k}), the window's and the values' rows ({k_window.shape[1]}, "
                         f"{v.shape[1]}) of 8 (tail_sources pads them)")
    dtype = qo_rows.dtype
    tiles = r // TILE
    smem = functools.partial(plgpu.SMEM, transforms=(plgpu.TilingTransform((8, 64)),
                                                     plgpu.SwizzleTransform(128)))
    q_copies = 1 if tokens is None else groups  # copies that fill a consumer's query tile
    v_copies = block_k // piece if piece else 1  # copies that fill a value block

    def entry(meta_ref, q_ref, kg_ref, vg_ref, kw_ref, v_ref, o_ref):
        kernel = functools.partial(_kernel, groups=groups, bk=block_k, slots=slots, tiles=tiles,
                                   nc=nc, nc_rows=nc_rows, hkv=hkv, s_len=num_keys,
                                   scale=scale, dtype=dtype, tokens=tokens, piece=piece,
                                   overlap=overlap, interpret=interpret)
        pl.run_scoped(
            lambda *scoped: kernel(meta_ref, q_ref, kg_ref, vg_ref, kw_ref, v_ref, o_ref,
                                   scoped),
            (smem((CONSUMERS, ROWS, d), dtype), smem((slots, block_k, d), dtype),
             smem((slots, block_k, d), dtype),
             # the pipelined step's row sums (1 KiB: only with overlap, for the deepest rings)
             *([plgpu.SMEM((CONSUMERS, ROWS), jnp.float32)] if overlap else [])),
            (plgpu.Barrier(num_barriers=slots),
             plgpu.Barrier(num_arrivals=v_copies, num_barriers=slots),
             plgpu.Barrier(num_arrivals=q_copies, num_barriers=CONSUMERS)),
            (plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=slots),) * 2,
            plgpu.Barrier(num_arrivals=CONSUMERS),
            collective_axes="wg",
        )

    lists = (b * hkv * nc, ng, d)
    o = mgpu_tokens.launch(
        entry,
        (meta.astype(jnp.int32), qo_rows.reshape(rows_in), kg.reshape(lists),
         list_rows.astype(jnp.int32).reshape(lists[:2]) if piece else vg.reshape(lists),
         k_window, v),
        out,
        out_type=out_type,
        grid=(nc * tiles, b, hkv),
        grid_names=("items", "batch", "heads"),
        num_threads=CONSUMERS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )
    return o if tokens is not None else o.reshape(b, hkv, nc, r, d)
