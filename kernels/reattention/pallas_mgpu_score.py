"""ReAttention's scoring + per-row top-k as a Pallas kernel with the Mosaic GPU lowering (Hopper).

Same function as ``pallas._score_kernel`` (the Triton lowering): every row (query, head of a kv
head) of a chunk scores the middle keys [sink, L0) of its key split with the raw q . k of
un-rotated vectors and keeps its ``top_k`` best (score, position) pairs, ties to the lower
position. What differs is the schedule, close to the CCA forward's (``kernels/cca/
pallas_mgpu.py``): one CTA per (64 x ``consumers`` rows, key split, chunk) x batch x kv head.
The last warpgroup streams the split's key tiles through a ring of ``slots`` shared-memory
buffers with TMA copies; each consumer warpgroup owns 64 rows and computes ``S = Q K^T`` on
wgmma.

The running top-k of a row is kept sorted in registers, as ``top_k`` row vectors of scores and of
positions. A key tile merges in rounds: a round takes each row's best remaining key (the lowest
column among equal maxima) and inserts it where it beats the row's k-th entry; rounds go on while
that holds for some row of the warpgroup (at most ``top_k``). Insertion is elementwise on the
row vectors; "some row" is a warpgroup-wide reduction through a 64-entry shared-memory buffer
(one per consumer). Equal scores keep the entry already in the set: it has the lower position,
as tiles are swept in position order and a round extracts equal maxima lowest column first.

Where the time goes (H200, 128K, 32 heads, d = 128; ``bench/results/score_mgpu_variants_h200
.json``): the merge rounds, not the matmuls. Without them the sweep runs at 640-700 TF/s; with
them at 370 (the Triton lowering: 300). Each row records about 4 ln(N / 4) new entries over N
keys, and a round costs a pass over the whole 64-row tile for any one of its rows, so four
consumers with 64-key tiles (more warps to hide the rounds' latency, narrower rounds) are the
defaults.

Output: ``(vals, idx)`` of shape (B, Hkv, NC, splits, top_k, R), each row's entries sorted by
score (idx -1 and the score ``NEG`` where a row has fewer than top_k keys), for
``pallas._score`` to merge like the Triton kernel's.

Supported (:func:`supports`): 16-bit inputs, head dim 64 or 128, at least one key tile of keys
and a multiple of 8, top_k <= 8; the caller pads the rows to a multiple of 64 x consumers. ``interpret=True`` runs
the Mosaic GPU interpreter on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from kernels.cca.pallas_common import NEG, cdiv
from kernels.cca.pallas_mgpu import (available, interpret_params,  # noqa: F401
                                     layout_helpers, produce, wgmma_inputs)
from kernels.reattention.reference import INT_MAX

ROWS = 64  # rows per consumer warpgroup (one wgmma M tile)
MAX_TOP_K = 8


def supports(dtype, head_dim: int, num_keys: int, top_k: int, block_k: int = 64) -> bool:
    """True where this kernel applies: 16-bit q and k, head dim 64 or 128, at least one key tile
    of keys and a multiple of 8 (the TMA descriptor of the cache, read in place, tiles its
    sequence dimension by 8; Mosaic GPU rejects other lengths), top_k <= 8 (the caller pads the
    rows to a multiple of 64 x consumers)."""
    return (wgmma_inputs(dtype, head_dim) and num_keys >= block_k and num_keys % 8 == 0
            and 1 <= top_k <= MAX_TOP_K)


def _insert(vals, idxs, m, j):
    """Sorted insertion of (m, j) into each row's list (vals[0] >= vals[1] >= ...): entries it
    beats strictly move down one place; the last falls off. Elementwise on row vectors."""
    beats = [m > v for v in vals]
    new_vals, new_idxs = [], []
    for i in range(len(vals)):
        if i == 0:
            new_vals.append(jnp.where(beats[0], m, vals[0]))
            new_idxs.append(jnp.where(beats[0], j, idxs[0]))
        else:  # moved down from i - 1, or the new entry lands here, or unchanged
            new_vals.append(jnp.where(beats[i - 1], vals[i - 1], jnp.where(beats[i], m, vals[i])))
            new_idxs.append(jnp.where(beats[i - 1], idxs[i - 1], jnp.where(beats[i], j, idxs[i])))
    return new_vals, new_idxs


REGISTERS = {2: (232, 40), 4: (112, 32)}  # per thread (consumer, producer), by consumer count


def _kernel(l0_ref, q_ref, k_ref, vals_ref, idx_ref, scoped, *, sink, top_k, bk, slots, s_len,
            splits, split_len, tiles, nc, hkv, consumers, interpret):
    import jax.experimental.pallas.mosaic_gpu as plgpu

    (q_smem2, k_smem, v_out2, i_out2, flag2), (k_full, q_full), k_free = scoped
    cast, iota = layout_helpers(interpret)
    b = lax.axis_index("batch")
    h = lax.axis_index("heads")
    wg = lax.axis_index("wg")
    item = lax.axis_index("items")
    c = nc - 1 - lax.div(item, tiles * splits)  # heavy first: later chunks have longer middles
    tile = lax.div(lax.rem(item, tiles * splits), splits)
    split = lax.rem(item, splits)
    l0 = l0_ref[b, c]
    lo = sink + split * split_len
    hi = jnp.minimum(l0, lo + split_len)
    # Tiles start at a multiple of 8 (the TMA copy of a tiled shared-memory buffer divides its
    # row offset by 8): from lo rounded down, the first tile masked below lo.
    lo8 = lax.div(lo, 8) * 8
    n_steps = jnp.where(hi > lo, cdiv(hi - lo8, bk), 0)
    chunk_row = (b * hkv + h) * nc + c  # q_ref: (B * Hkv * NC, R, D)
    out_row = chunk_row * splits + split  # outputs: (B * Hkv * NC * splits, K, R)

    @pl.when(wg < consumers)
    def _consumer():
        plgpu.set_max_registers(REGISTERS[consumers][0], action="increase")
        q_smem = q_smem2.at[wg]
        flag = flag2.at[wg]
        r0 = tile * (consumers * ROWS) + wg * ROWS
        plgpu.copy_gmem_to_smem(q_ref.at[chunk_row, pl.ds(r0, ROWS)], q_smem, q_full.at[wg])
        plgpu.barrier_wait(q_full.at[wg])
        row_layout = plgpu.Layout.WGMMA.reduce(1)
        vals = [cast(jnp.full((ROWS,), NEG, jnp.float32), row_layout)] * top_k
        idxs = [cast(jnp.full((ROWS,), -1, jnp.int32), row_layout)] * top_k

        def some_row(pred):
            """Warpgroup-wide any() of a row predicate, through shared memory: the 64 flags
            are read back in a layout every warp holds whole, so the reduction is in-warp."""
            flag[...] = pred.astype(jnp.int32)
            every = plgpu.load(flag, (), layout=plgpu.Layout.WGMMA.reduce(0))
            return jnp.max(every) > 0

        def merge(scores, cols, vals, idxs):
            def cond(carry):
                it, _, m, vals, _ = carry
                return (it < top_k) & some_row(m > vals[-1])

            def body(carry):
                it, s, m, vals, idxs = carry
                mb = lax.broadcast_in_dim(m, s.shape, [0])
                j = jnp.where(s == mb, cols, INT_MAX).min(axis=1)
                vals, idxs = _insert(vals, idxs, m, j)
                s = jnp.where(cols == lax.broadcast_in_dim(j, s.shape, [0]), NEG, s)
                return it + 1, s, s.max(axis=1), vals, idxs

            carry = (jnp.int32(0), scores, scores.max(axis=1), vals, idxs)
            if interpret:  # top_k rounds, no shared-memory any(): the same picks, as a round
                # where no row beats its k-th changes nothing
                _, _, _, vals, idxs = lax.fori_loop(0, top_k, lambda i, c: body(c), carry)
                return vals, idxs
            _, _, _, vals, idxs = lax.while_loop(cond, body, carry)
            return vals, idxs

        def step(masked: bool):
            def body(s, carry):
                vals, idxs = carry
                slot = lax.rem(s, slots)
                plgpu.barrier_wait(k_full.at[slot])
                if interpret:
                    scores = lax.dot_general(q_smem[...], k_smem[slot], (((1,), (1,)), ((), ())),
                                             preferred_element_type=jnp.float32)
                else:
                    def qk(acc_ref):
                        plgpu.wgmma(acc_ref, q_smem,
                                    plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                        return acc_ref[...]
                    scores = pl.run_scoped(qk, plgpu.ACC((ROWS, bk), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])
                start = lo8 + s * bk
                base = jnp.minimum(start, s_len - bk)  # the producer's clamped copy
                cols = base + iota(jnp.int32, (ROWS, bk), 1, plgpu.Layout.WGMMA)
                if masked:  # first and last tiles: keys before lo or past hi, re-read ones
                    scores = jnp.where((cols >= jnp.maximum(start, lo)) & (cols < hi), scores,
                                       NEG)
                return merge(scores, cols, vals, idxs)
            return body

        first = jnp.minimum(n_steps, 1)
        last = jnp.maximum(n_steps - 1, first)
        carry = lax.fori_loop(0, first, step(True), (vals, idxs))
        carry = lax.fori_loop(first, last, step(False), carry)
        vals, idxs = lax.fori_loop(last, n_steps, step(True), carry)

        v_out, i_out = v_out2.at[wg], i_out2.at[wg]
        for i in range(top_k):
            v_out.at[i][...] = vals[i]
            i_out.at[i][...] = idxs[i]
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(v_out, vals_ref.at[out_row, :, pl.ds(r0, ROWS)])
        plgpu.copy_smem_to_gmem(i_out, idx_ref.at[out_row, :, pl.ds(r0, ROWS)])
        plgpu.wait_smem_to_gmem(0)
        if interpret:  # (jax 0.10's interpreter hangs here without an effect after the copies)
            jax.debug.print("", ordered=False)

    @pl.when(wg == consumers)
    def _producer():
        plgpu.set_max_registers(REGISTERS[consumers][1], action="decrease")

        def fetch(s, slot):
            base = jnp.minimum(lo8 + s * bk, s_len - bk)
            plgpu.copy_gmem_to_smem(k_ref.at[b, pl.ds(base, bk), h], k_smem.at[slot],
                                    k_full.at[slot])

        produce(slots, n_steps, (fetch, k_free))


def score(
    q_rows: Float[Array, "B Hkv NC R D"],
    k: Float[Array, "B S Hkv D"],
    l0: Int[Array, "B NC"],
    *,
    sink: int,
    top_k: int,
    splits: int,
    split_len: int,
    block_k: int = 64,
    slots: int = 4,
    consumers: int = 4,
    interpret: bool = False,
) -> tuple[Float[Array, "B Hkv NC P K R"], Int[Array, "B Hkv NC P K R"]]:
    """Per-row top_k (score, position) of the middle keys [sink + p * split_len, min(L0, sink +
    (p + 1) * split_len)) of every split p, sorted by score; idx -1 where none."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    b, hkv, nc, r, d = q_rows.shape
    s_len = k.shape[1]
    if not (supports(q_rows.dtype, d, s_len, top_k, block_k) and q_rows.dtype == k.dtype):
        raise ValueError(f"the Mosaic GPU ReAttention scoring needs 16-bit q and k with head dim "
                         f"64 or 128, at least {block_k} keys (a multiple of 8) and top_k "
                         f"<= {MAX_TOP_K}; got {q_rows.dtype}/{k.dtype}, rows {tuple(q_rows.shape)}"
                         f", keys {tuple(k.shape)}, top_k {top_k}")
    if k.shape[0] != b or k.shape[2] != hkv or k.shape[3] != d or l0.shape != (b, nc):
        raise ValueError(f"shapes disagree: rows {q_rows.shape}, keys {k.shape}, l0 {l0.shape}")
    if consumers not in REGISTERS or r % (consumers * ROWS):
        raise ValueError(f"consumers must be one of {sorted(REGISTERS)} with rows ({r}) a "
                         f"multiple of 64 * consumers; got {consumers}")
    tiles = r // (consumers * ROWS)
    smem = functools.partial(plgpu.SMEM, transforms=(plgpu.TilingTransform((8, 64)),
                                                     plgpu.SwizzleTransform(128)))
    dtype = q_rows.dtype

    def entry(l0_ref, q_ref, k_ref, vals_ref, idx_ref):
        kernel = functools.partial(_kernel, sink=sink, top_k=top_k, bk=block_k, slots=slots,
                                   s_len=s_len, splits=splits, split_len=split_len, tiles=tiles,
                                   nc=nc, hkv=hkv, consumers=consumers, interpret=interpret)
        pl.run_scoped(
            lambda *scoped: kernel(l0_ref, q_ref, k_ref, vals_ref, idx_ref, scoped),
            (smem((consumers, ROWS, d), dtype), smem((slots, block_k, d), dtype),
             plgpu.SMEM((consumers, top_k, ROWS), jnp.float32),
             plgpu.SMEM((consumers, top_k, ROWS), jnp.int32),
             plgpu.SMEM((consumers, ROWS), jnp.int32)),
            (plgpu.Barrier(num_barriers=slots), plgpu.Barrier(num_barriers=consumers)),
            plgpu.Barrier(num_arrivals=consumers, num_barriers=slots),
            collective_axes="wg",
        )

    out = (b * hkv * nc * splits, top_k, r)
    vals, idx = plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct(out, jnp.float32), jax.ShapeDtypeStruct(out, jnp.int32)),
        grid=(nc * tiles * splits, b, hkv),
        grid_names=("items", "batch", "heads"),
        num_threads=consumers + 1,
        thread_name="wg",
        interpret=interpret_params() if interpret else None,
    )(l0.astype(jnp.int32), q_rows.reshape(b * hkv * nc, r, d), k)
    shape = (b, hkv, nc, splits, top_k, r)
    return vals.reshape(shape), idx.reshape(shape)
