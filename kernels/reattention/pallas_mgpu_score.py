"""ReAttention's scoring + per-row top-k as a Pallas kernel with the Mosaic GPU lowering (Hopper).

Same function as ``pallas._score_kernel`` (the Triton lowering): every row (query, head of a kv
head) of a chunk scores the middle keys [sink, L0) of its key split with the raw q . k of
un-rotated vectors and keeps its ``top_k`` best (score, position) pairs, ties to the lower
position. What differs is the schedule, close to the CCA forward's (``kernels/cca/
pallas_mgpu.py``): one CTA per (64 x ``consumers`` rows, key split, chunk) x batch x kv head.
The last warpgroup streams the split's key tiles through a ring of ``slots`` shared-memory
buffers with TMA copies; each consumer warpgroup owns 64 rows and computes ``S = Q K^T`` on
wgmma.

The top-k merge runs below Pallas's array semantics (``_lane_topk``, ``plgpu.inline_mgpu``):
each thread keeps a sorted list of its own columns of each of its two rows, and each row a
threshold, at most its exact k-th best score so far. A tile costs, per thread and row, a max
over the thread's scores, a compare with the threshold and a warp vote; only when some lane of
the warp beats its threshold does every lane insert its best remaining score of the tile into
its own list, again while some lane still beats (at most top_k times), and then recompute the
thresholds (shuffles within the quad of lanes that share a row). After the last tile the lists
are merged into each row's top_k in ``top_k`` rounds (``_rounds``). Ties keep the lower
position: tiles are swept in position order, a tile's equal scores are taken lowest column
first, a thread inserts only strictly better scores, and the final rounds take the lowest
position among equal maxima.

Where the time goes (H200, 128K, 32 heads, d = 128): the merge, not the matmuls. Without any
merge the sweep runs at 640-700 TF/s (``bench/results/score_mgpu_variants_h200.json``). The
first version merged the rows' lists in rounds while some row of the warpgroup gained (a
shared-memory any()): 370 TF/s, as about 4 ln(N / 4) new entries per row over N keys made a
warpgroup-wide round necessary on most tiles. With the per-thread lists, 540-580 TF/s
(``bench/results/ab_reattention_score_h200.json``), 585 with the pops (at 32K 450, at 16K
290: a vote covers 8 rows, so over the first few thousand keys nearly every tile pops). Four
consumers with 64-key tiles are the defaults: more warps hide the merge's latency (two
consumers: 360 TF/s).

``merge="rows"`` (``Config.mgpu_merge``) swaps ``_lane_topk`` for the warp-per-row merge of
``mgpu_row_merge.py``, which keeps the rows' exact lists instead (not yet measured on a GPU).

Output: ``(vals, idx)`` of shape (B, Hkv, NC, splits, top_k, R), each row's entries sorted by
score (idx -1 and the score ``NEG`` where a row has fewer than top_k keys), for
``pallas._score`` to merge like the Triton kernel's.

Supported (:func:`supports`): 16-bit inputs, head dim 64, 128 or 256 (the 256-wide signed rows
of block picks at d = 128, ``key_blocks.py``; with 4 consumers only 2 slots of 64 keys fit in
shared memory), at least one key tile of keys
and a multiple of 8, top_k <= 8; the caller pads the rows to a multiple of 64 x consumers.
Block picks' signed rows are either given (2D wide, ``signed_queries(q)``) or, with
``signed=True``, made by the kernel from q's own D-wide rows (D 64 or 128).
``interpret=True`` runs the Mosaic GPU interpreter on CPU, with the rows' lists merged tile by
tile in ``top_k`` rounds instead (the interpreter cannot run ``inline_mgpu``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from kernels.cca.pallas_common import NEG, cdiv
from kernels.cca.pallas_mgpu import (available, interpret_params,  # noqa: F401
                                     layout_helpers, produce, wgmma_inputs)
from kernels.reattention import mgpu_row_merge, mgpu_tokens, params
from kernels.reattention.reference import INT_MAX

ROWS = 64  # rows per consumer warpgroup (one wgmma M tile)
MAX_TOP_K = 8


def supports(dtype, head_dim: int, num_keys: int, top_k: int, block_k: int = 64) -> bool:
    """True where this kernel applies: 16-bit q and k, head dim 64, 128 or 256, at least one
    key tile of keys and a multiple of 8 (the TMA descriptor of the cache, read in place, tiles
    its sequence dimension by 8; Mosaic GPU rejects other lengths), top_k <= 8 (the caller pads
    the rows to a multiple of 64 x consumers). The ring must fit too (``smem_bytes``)."""
    takes = head_dim == 256 and wgmma_inputs(dtype, 128) or wgmma_inputs(dtype, head_dim)
    return (takes and num_keys >= block_k and num_keys % 8 == 0
            and 1 <= top_k <= MAX_TOP_K)


def _rounds(scores, cols, vals, idxs, rounds: int):
    """Merges a (64, n) tile of (score, position) candidates into the rows' sorted lists (row
    vectors) in ``rounds`` rounds: a round takes each row's best remaining candidate (the lowest
    position among equal maxima) and inserts it where it beats the row's last entry. With
    ``rounds`` = top_k nothing that belongs in a row's top_k is left out."""
    for _ in range(rounds):
        m = scores.max(axis=1)
        mb = lax.broadcast_in_dim(m, scores.shape, [0])
        j = jnp.where(scores == mb, cols, INT_MAX).min(axis=1)
        vals, idxs = mgpu_row_merge.insert(vals, idxs, m, j, where=jnp.where,
                                           gt=lambda a, b: a > b)
        scores = jnp.where(cols == lax.broadcast_in_dim(j, scores.shape, [0]), NEG, scores)
    return vals, idxs


def lane_width(top_k: int) -> int:
    """Columns of the (64, n) WGMMA-layout arrays that hold the per-thread lists: a thread holds
    n / 4 entries of each of its two rows, at least top_k."""
    return 8 * params.cdiv(top_k, 2)


def _lane_topk(top_k: int, bk: int):
    """The per-tile merge on the GPU, below Pallas's array semantics (``plgpu.inline_mgpu``).

    In the WGMMA register layout each thread holds two rows of a (64, bk) score tile, bk / 4
    columns of each (columns 8 j + 2 (lane % 4) + e; the four lanes of a quad share the row).
    Each thread keeps its own sorted list per row, of the columns it holds, in a (64,
    ``lane_width``) array of the same layout: the union of a quad's lists holds the row's top_k
    (an entry leaves a list only for better ones of the same row), and ``_rounds`` merges it once
    at the end. Next to the lists, each row carries a threshold: the quad's k-th best score,
    counting equal scores of different lanes once, so at most the row's exact k-th best. A score
    can enter the row's top_k only if it beats it (strictly: on ties the earlier, lower position
    stays).

    A tile costs, per thread and row, a max over its bk / 4 scores, one compare with the
    threshold and a warp vote. Only where some lane of the warp has a score above its threshold
    does the warp (uniformly) pop: each lane inserts its best remaining score of the tile (the
    lowest column among equal ones) into its own list and drops it from the tile, and pops
    again while some lane's best remaining score beats its threshold, at most top_k times (a
    lane's scores below its own top_k of the tile cannot reach the row's top_k). A lane whose
    popped score is below its threshold inserts it too: its list stays the top entries of its
    own columns, so nothing is lost. Then the threshold is recomputed: top_k rounds of a
    quad-wide max (two butterfly shuffles) of the lists' heads. (Walking the tile score by
    score instead, with a branch per score, took 12-16% longer at 16K-32K:
    ``bench/results/ab_reattention_score_pop_h200.json``.)

    Arguments: the (64, bk) float32 scores, the (64,) int32 position of the tile's column 0 (the
    same in every row), the rows' thresholds and the lists' scores and positions; returns the
    new thresholds and lists."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import arith, vector

    wgmma, row = plgpu.Layout.WGMMA, plgpu.Layout.WGMMA.reduce(1)
    width = lane_width(top_k)
    per_thread = width // 4
    lists = (plgpu.ShapeDtypeStruct((ROWS,), jnp.float32, layout=row),
             plgpu.ShapeDtypeStruct((ROWS, width), jnp.float32, layout=wgmma),
             plgpu.ShapeDtypeStruct((ROWS, width), jnp.int32, layout=wgmma))

    @plgpu.inline_mgpu(arg_types=(wgmma, row, row, wgmma, wgmma), return_type=lists)
    def merge(ctx, scores, base, thresholds, vals, idxs):
        del ctx
        import jax.experimental.mosaic.gpu as mgpu
        from jax.experimental.mosaic.gpu import utils as mgpu_utils

        i32, f32 = ir.IntegerType.get_signless(32), ir.F32Type.get()
        const = lambda x: arith.constant(i32, x)
        take = lambda vec, e: vector.extract(vec, dynamic_position=[],
                                             static_position=ir.DenseI64ArrayAttr.get([e]))
        gt = lambda a, b: arith.cmpf(arith.CmpFPredicate.OGT, a, b)

        ops = mgpu_row_merge.MlirWarp()  # the lane index, the warp vote, the uniform branch
        tree_max = lambda xs: mgpu_row_merge.tree(arith.maximumf, xs)
        warp_any = ops.any
        branch = lambda cond, then, current: ops.branch(cond, then, current, "lanes")

        def quad_kth(lv):
            """The top_k-th best of the quad's lists (equal heads of different lanes pop
            together, so this is at most the exact k-th best)."""
            lv = list(lv)
            neg = arith.constant(f32, NEG)
            for _ in range(top_k):
                m = lv[0]
                for stride in (1, 2):
                    m = arith.maximumf(m, mgpu_utils.shfl_bfly(m, stride))
                pop = arith.cmpf(arith.CmpFPredicate.OEQ, lv[0], m)
                lv = [arith.select(pop, nxt, cur) for cur, nxt in zip(lv, lv[1:] + [neg])]
            return m

        lane_col = arith.muli(ops.quad_lane, const(2))  # 2 (lane % 4)
        s_regs = scores.registers.reshape(bk // 8, 2)  # [column block j, row h] <2 x f32>
        v_regs = vals.registers.reshape(per_thread // 2, 2)
        i_regs = idxs.registers.reshape(per_thread // 2, 2)
        b_regs = base.registers.reshape(2)  # [row h] <1 x i32>
        t_regs = thresholds.registers.reshape(2)  # [row h] <1 x f32>
        new_v, new_i, new_t = (np.empty_like(r) for r in (v_regs, i_regs, t_regs))

        for h in range(2):
            lv = [take(v_regs[p // 2, h], p % 2) for p in range(per_thread)]
            li = [take(i_regs[p // 2, h], p % 2) for p in range(per_thread)]
            xs = [take(s_regs[j, h], e) for j in range(bk // 8) for e in range(2)]
            thr = take(t_regs[h], 0)

            def tile(lv=lv, li=li, xs=xs, h=h, thr=thr):
                col0 = arith.addi(take(b_regs[h], 0), lane_col)
                offs = [8 * (n // 2) + n % 2 for n in range(len(xs))]
                neg = arith.constant(f32, NEG)

                def pop(it, xs, cur):
                    m = tree_max(xs)
                    off = const(1 << 30)
                    for n in reversed(range(len(xs))):  # lowest column among the maxima
                        off = arith.select(arith.cmpf(arith.CmpFPredicate.OEQ, xs[n], m),
                                           const(offs[n]), off)
                    v, i = mgpu_row_merge.insert(cur[:per_thread], cur[per_thread:], m,
                                                 arith.addi(col0, off), where=arith.select,
                                                 gt=gt)
                    cur = v + i
                    if it + 1 == top_k:
                        return cur
                    xs = [arith.select(arith.cmpi(arith.CmpIPredicate.eq, off, const(o)), neg, x)
                          for o, x in zip(offs, xs)]
                    return branch(warp_any(gt(tree_max(xs), thr)),
                                  lambda: pop(it + 1, xs, cur), cur)

                cur = pop(0, xs, lv + li)
                return [quad_kth(cur[:per_thread])] + cur

            out = branch(warp_any(gt(tree_max(xs), thr)), tile, [thr] + lv + li)
            new_t[h] = vector.broadcast(t_regs[h].type, out[0])
            out = out[1:]
            for p in range(0, per_thread, 2):
                for regs, like, first in ((new_v, v_regs, 0), (new_i, i_regs, per_thread)):
                    vec = vector.broadcast(like[0, 0].type, out[first + p])
                    regs[p // 2, h] = vector.insert(out[first + p + 1], vec, dynamic_position=[],
                                                    static_position=ir.DenseI64ArrayAttr.get([1]))
        wrap = lambda regs, like: mgpu.FragmentedArray(
            _registers=regs.reshape(like.registers.shape), _layout=like.layout,
            _is_signed=like.is_signed)
        return wrap(new_t, thresholds), wrap(new_v, vals), wrap(new_i, idxs)

    return merge


REGISTERS = {2: (232, 40), 4: (112, 32)}  # per thread (consumer, producer), by consumer count
MERGES = ("lanes", "rows")
SMEM_BYTES = 227 * 1024  # shared memory per block on Hopper


def smem_bytes(head_dim: int, itemsize: int, top_k: int, block_k: int, slots: int,
               consumers: int, merge: str) -> int:
    """Shared memory of one CTA: the consumers' query rows, the key ring, the output staging
    and, for the "rows" merge, its score buffer (barriers aside)."""
    total = consumers * ROWS * head_dim * itemsize + slots * block_k * head_dim * itemsize
    total += consumers * top_k * ROWS * 8
    if merge == "rows":
        total += int(np.prod(mgpu_row_merge.buffer_shape(consumers))) * 4
    return total


def fitting_slots(slots: int, head_dim: int, itemsize: int, top_k: int, block_k: int,
                  consumers: int, merge: str) -> int:
    """The most ring slots, at most ``slots`` and at least 2, whose CTA fits in shared memory
    (2 where none does: ``score`` then says so). 256-wide rows (block picks at d = 128) with 4
    consumers fit 2 slots of 64 keys, with 2 consumers 4."""
    fit = [n for n in range(2, slots + 1)
           if smem_bytes(head_dim, itemsize, top_k, block_k, n, consumers, merge) <= SMEM_BYTES]
    return max(fit, default=2)


def _kernel(l0_ref, q_ref, k_ref, vals_ref, idx_ref, scoped, *, sink, top_k, bk, slots, s_len,
            splits, split_len, tiles, nc, hkv, consumers, merge, tokens, signed, interpret):
    import jax.experimental.pallas.mosaic_gpu as plgpu

    (q_smem2, k_smem, v_out2, i_out2, *row_buffer), (k_full, q_full), k_free = scoped
    # ``signed``: q_smem2 and k_smem hold two halves each, (consumers, 2, ROWS, D) and (slots,
    # 2, bk, D): [q+, q-] made here from q, and the summaries' [max, min] columns.
    halves = (lambda ref: (ref.at[0], ref.at[1])) if signed else (lambda ref: (ref,))
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
        q_halves = halves(q_smem2.at[wg])
        r0 = tile * (consumers * ROWS) + wg * ROWS
        if tokens is None:
            plgpu.copy_gmem_to_smem(q_ref.at[chunk_row, pl.ds(r0, ROWS)], q_halves[0],
                                    q_full.at[wg])
        else:  # in place, head-major rows (``mgpu_tokens``): the caller reorders the picks
            chunk, q_offset, groups = tokens
            mgpu_tokens.load(q_ref, b, q_offset + c * chunk + lax.div(r0, groups), h * groups,
                             groups, q_halves[0], q_full.at[wg])
        plgpu.barrier_wait(q_full.at[wg])
        if signed:  # q -> [q+, q-] in place, once per tile (``key_blocks.signed_queries``)
            q_rows = q_halves[0][...]
            zero = jnp.zeros((), q_rows.dtype)
            q_halves[0][...] = jnp.maximum(q_rows, zero)
            q_halves[1][...] = jnp.minimum(q_rows, zero)
            plgpu.commit_smem()  # visible to the wgmmas (the async proxy)
        row_layout = plgpu.Layout.WGMMA.reduce(1)
        vals = [cast(jnp.full((ROWS,), NEG, jnp.float32), row_layout)] * top_k
        idxs = [cast(jnp.full((ROWS,), -1, jnp.int32), row_layout)] * top_k
        if interpret:  # the rows' lists, merged tile by tile in top_k rounds
            carry = (vals, idxs)
        elif merge == "rows":  # a warp per row (``mgpu_row_merge``): the rows' own lists
            carry = (tuple(vals), tuple(idxs))
            row_merge = mgpu_row_merge.merge_fn(top_k, bk)
        else:  # every thread's own lists (``_lane_topk``), merged into the rows' at the end
            width = lane_width(top_k)
            carry = (cast(jnp.full((ROWS,), NEG, jnp.float32), row_layout),
                     cast(jnp.full((ROWS, width), NEG, jnp.float32), plgpu.Layout.WGMMA),
                     cast(jnp.full((ROWS, width), -1, jnp.int32), plgpu.Layout.WGMMA))
            lane_merge = _lane_topk(top_k, bk)

        def step(masked: bool):
            def body(s, carry):
                slot = lax.rem(s, slots)
                plgpu.barrier_wait(k_full.at[slot])
                k_halves = halves(k_smem.at[slot])
                if interpret:  # one K = 2D product, as the unsigned rows' (same sums)
                    joined = lambda refs: jnp.concatenate([r[...] for r in refs], axis=-1)
                    scores = lax.dot_general(joined(q_halves), joined(k_halves),
                                             (((1,), (1,)), ((), ())),
                                             preferred_element_type=jnp.float32)
                else:
                    def qk(acc_ref):
                        for qh, kh in zip(q_halves, k_halves):  # one K = 2D sum
                            plgpu.wgmma(acc_ref, qh, plgpu.transpose_ref(kh, (1, 0)))
                        return acc_ref[...]
                    scores = pl.run_scoped(qk, plgpu.ACC((ROWS, bk), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])
                start = lo8 + s * bk
                base = jnp.minimum(start, s_len - bk)  # the producer's clamped copy
                if masked or interpret:
                    cols = base + iota(jnp.int32, (ROWS, bk), 1, plgpu.Layout.WGMMA)
                if masked:  # first and last tiles: keys before lo or past hi, re-read ones
                    scores = jnp.where((cols >= jnp.maximum(start, lo)) & (cols < hi), scores,
                                       NEG)
                if interpret:
                    return _rounds(scores, cols, *carry, top_k)
                base_row = cast(jnp.full((ROWS,), base, jnp.int32), row_layout)
                if merge == "rows":
                    return row_merge(scores, base_row, *carry, row_buffer[0])
                return lane_merge(scores, base_row, *carry)
            return body

        first = jnp.minimum(n_steps, 1)
        last = jnp.maximum(n_steps - 1, first)
        carry = lax.fori_loop(0, first, step(True), carry)
        carry = lax.fori_loop(first, last, step(False), carry)
        carry = lax.fori_loop(last, n_steps, step(True), carry)
        if interpret or merge == "rows":  # the carry holds the rows' own lists
            vals, idxs = carry
        else:
            vals, idxs = _rounds(*carry[1:], vals, idxs, top_k)

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
            if signed:  # the [max, min] columns into the two halves
                half = k_smem.shape[-1]
                for i, kh in enumerate(halves(k_smem.at[slot])):
                    plgpu.copy_gmem_to_smem(
                        k_ref.at[b, pl.ds(base, bk), h, pl.ds(i * half, half)], kh,
                        k_full.at[slot])
            else:
                plgpu.copy_gmem_to_smem(k_ref.at[b, pl.ds(base, bk), h], k_smem.at[slot],
                                        k_full.at[slot])

        produce(slots, n_steps, (fetch, k_free))


def score(
    q_rows: Float[Array, "B Hkv NC R D"] | Float[Array, "B T Hq D"],
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
    merge: str = "lanes",
    tokens: tuple[int, int, int] | None = None,
    signed: bool = False,
    interpret: bool = False,
) -> tuple[Float[Array, "B Hkv NC P K R"], Int[Array, "B Hkv NC P K R"]]:
    """Per-row top_k (score, position) of the middle keys [sink + p * split_len, min(L0, sink +
    (p + 1) * split_len)) of every split p, sorted by score; idx -1 where none. ``merge``: how
    the GPU keeps the top_k, "lanes" (per-thread lists, ``_lane_topk``) or "rows" (a warp per
    row, ``mgpu_row_merge``); the interpreter merges in rounds either way.

    ``tokens`` = (C, q_offset, R): ``q_rows`` is q itself (B, T, Hq, D), chunk c's rows the
    queries ``q_offset + c * C ..``, R rows per chunk (C * G padded to 64 x consumers), read in
    place (``mgpu_tokens``) into head-major tiles: the outputs' rows come in that order
    (``mgpu_tokens.to_packed`` gives the packed order).

    ``signed``: block picks (``key_blocks``). The rows are q itself (head dim D), k the
    summaries (2D wide: [max, min]), and each tile of rows becomes the signed rows [q+, q-] in
    shared memory, scored as two K = D wgmmas: the scores of ``score(signed_queries(q), k)``
    without XLA's 2D-wide copy of q."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    s_len = k.shape[1]
    if tokens is None:
        b, hkv, nc, r, dq = q_rows.shape
        q_in = q_rows.reshape(b * hkv * nc, r, dq)
    else:
        chunk, q_offset, r = tokens
        b, _, hq, dq = q_rows.shape
        hkv, nc, groups = k.shape[2], l0.shape[1], q_rows.shape[2] // k.shape[2]
        mgpu_tokens.check(hq, hkv, groups, chunk, r, T=q_rows.shape[1])
        q_in = q_rows
    if signed and not wgmma_inputs(q_rows.dtype, dq):
        raise ValueError(f"signed rows are made in the kernel from 16-bit q of head dim 64 or "
                         f"128 (its shared-memory tiles); got {q_rows.dtype}, head dim {dq}: "
                         f"pass the rows signed_queries(q) instead")
    d = 2 * dq if signed else dq  # the width scored
    if not (supports(q_rows.dtype, d, s_len, top_k, block_k) and q_rows.dtype == k.dtype):
        raise ValueError(f"the Mosaic GPU ReAttention scoring needs 16-bit q and k with head dim "
                         f"64, 128 or 256, at least {block_k} keys (a multiple of 8) and top_k "
                         f"<= {MAX_TOP_K}; got {q_rows.dtype}/{k.dtype}, rows {tuple(q_rows.shape)}"
                         f", keys {tuple(k.shape)}, top_k {top_k}")
    if k.shape[0] != b or k.shape[2] != hkv or k.shape[3] != d or l0.shape != (b, nc):
        raise ValueError(f"shapes disagree: rows {q_rows.shape}, keys {k.shape}, l0 {l0.shape}"
                         + (" (signed rows: keys 2 x the rows' width)" if signed else ""))
    if consumers not in REGISTERS or r % (consumers * ROWS):
        raise ValueError(f"consumers must be one of {sorted(REGISTERS)} with rows ({r}) a "
                         f"multiple of 64 * consumers; got {consumers}")
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}; got {merge!r}")
    need = smem_bytes(d, q_rows.dtype.itemsize, top_k, block_k, slots, consumers, merge)
    if need > SMEM_BYTES:
        raise ValueError(f"the scoring kernel needs {need} bytes of shared memory with {slots} "
                         f"slots of {block_k} keys, {consumers} consumers and the {merge!r} "
                         f"merge; the GPU has {SMEM_BYTES}: use fewer slots")
    tiles = r // (consumers * ROWS)
    smem = functools.partial(plgpu.SMEM, transforms=(plgpu.TilingTransform((8, 64)),
                                                     plgpu.SwizzleTransform(128)))
    dtype = q_rows.dtype

    def entry(l0_ref, q_ref, k_ref, vals_ref, idx_ref):
        kernel = functools.partial(_kernel, sink=sink, top_k=top_k, bk=block_k, slots=slots,
                                   s_len=s_len, splits=splits, split_len=split_len, tiles=tiles,
                                   nc=nc, hkv=hkv, consumers=consumers, merge=merge,
                                   tokens=tokens and (tokens[0], tokens[1], groups),
                                   signed=signed, interpret=interpret)
        pl.run_scoped(
            lambda *scoped: kernel(l0_ref, q_ref, k_ref, vals_ref, idx_ref, scoped),
            (smem((consumers, 2, ROWS, dq) if signed else (consumers, ROWS, d), dtype),
             smem((slots, 2, block_k, dq) if signed else (slots, block_k, d), dtype),
             plgpu.SMEM((consumers, top_k, ROWS), jnp.float32),
             plgpu.SMEM((consumers, top_k, ROWS), jnp.int32),
             *([plgpu.SMEM(mgpu_row_merge.buffer_shape(consumers), jnp.float32)]
               if merge == "rows" and not interpret else [])),
            (plgpu.Barrier(num_arrivals=2 if signed else 1, num_barriers=slots),
             plgpu.Barrier(num_arrivals=1 if tokens is None else groups,
                           num_barriers=consumers)),
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
    )(l0.astype(jnp.int32), q_in, k)
    shape = (b, hkv, nc, splits, top_k, r)
    return vals.reshape(shape), idx.reshape(shape)
