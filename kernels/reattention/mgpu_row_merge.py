"""The scoring kernel's top-k merge with a warp per row (``Config.mgpu_merge="rows"``).

Why: the per-thread merge (``pallas_mgpu_score._lane_topk``) keeps the WGMMA register layout,
where the four lanes of a quad share a row and a warp holds 8 rows per register half, so one warp
vote covers 8 rows, and when it fires every lane pops from its own list of its own columns:
about 500 instructions per thread and tile, on about half the tiles at 16K-32K
(docs/perf-notes.md, seventh session).

Here the lists are the rows' own, exact top_k (sorted, in the WGMMA row layout: lane l of warp w
holds rows 16 w + l // 4 and 16 w + 8 + l // 4, the four lanes of a quad the same copy, exactly
the arrays the kernel writes out). A tile costs, per thread and register half (8 rows of the
warp), the same check as before: the lane's best score of its row against that row's k-th
best, and a warp vote. Only when it fires do the half's 8 rows go through shared memory (64
columns per pass) and come back a row at a time across the 32 lanes (2 scores each), and each
row votes alone; a row that gains an entry pops it with a few warp-wide steps: the best score
(``redux.sync`` on the scores' ordered integer bits), its lowest column (a ballot), an
insertion into the row's list (by the quad that holds it), the new k-th best (a shuffle). So a
vote that fires costs the transposition plus one short pop per entry that really enters, not a
pop in every lane.

Ties keep the lower position, as the other merges: tiles come in position order, a pass takes
equal maxima lowest column first, and a score enters only if it beats the k-th best strictly.
At most top_k scores of a pass can enter a row (after top_k pops nothing left beats the popped
ones), so the pops stop there. Scores are finite (masked ones are ``NEG``): a NaN would be the
warp's maximum, match no lane, and end its row's pops for that pass (the per-thread merge
degrades on NaN too).

The algorithm is written once against a small set of warp operations and runs on two
backends: MLIR for the GPU (:class:`MlirWarp`, :func:`merge_fn` through ``plgpu.inline_mgpu``)
and numpy lanes on the CPU (:class:`NumpyWarp`, :func:`simulate`), so that the CPU tests run
the same steps, the same shared-memory addresses and the same branches as the kernel, lane by
lane.
"""

from __future__ import annotations

import numpy as np

from kernels.cca.pallas_common import NEG

ROWS = 64  # rows per consumer warpgroup (one wgmma M tile)
COLS = 64  # columns per pass through shared memory (a 128-key tile takes two)
STRIDE = COLS + 8  # floats per buffer row: 8 rows of a quad's stores land on distinct banks
PASS_ROWS = 8  # rows per pass: one register half of the WGMMA layout


def buffer_shape(consumers: int) -> tuple[int, int]:
    """The float32 shared-memory buffer: 8 rows of STRIDE per warp of the consumers."""
    return (consumers * 4 * PASS_ROWS, STRIDE)


def insert(vals, idxs, m, j, *, where, gt):
    """Sorted insertion of (m, j) into a list (vals[0] >= vals[1] >= ...): entries it beats
    strictly move down one place; the last falls off."""
    beats = [gt(m, v) for v in vals]
    new_vals, new_idxs = [], []
    for i in range(len(vals)):
        if i == 0:
            new_vals.append(where(beats[0], m, vals[0]))
            new_idxs.append(where(beats[0], j, idxs[0]))
        else:  # moved down from i - 1, or the new entry lands here, or unchanged
            new_vals.append(where(beats[i - 1], vals[i - 1], where(beats[i], m, vals[i])))
            new_idxs.append(where(beats[i - 1], idxs[i - 1], where(beats[i], j, idxs[i])))
    return new_vals, new_idxs


def merge_tile(ops, scores, base, vals, idxs, *, top_k: int, bk: int):
    """One score tile into one warp's rows (the whole algorithm; ``ops`` is the backend).

    ``scores[j][h]``: the thread's pair of scores (row 8 h + lane // 4 of the warp, columns
    8 j + 2 (lane % 4) + e) of the (64, bk) tile, WGMMA layout; ``base``: the key position of
    column 0; ``vals[h]`` / ``idxs[h]``: the sorted list of the thread's row of half h. Returns
    the new (vals, idxs)."""
    vals, idxs = [list(v) for v in vals], [list(i) for i in idxs]
    for h in range(2):
        lane_best = tree(ops.fmax, [x for j in range(bk // 8) for x in scores[j][h]])
        fired = ops.any(ops.gt(lane_best, vals[h][-1]))  # a row of the half gains an entry
        out = ops.branch(fired, lambda h=h: _half(ops, scores, base, vals[h], idxs[h], h,
                                                   top_k=top_k, bk=bk),
                         vals[h] + idxs[h], "half")
        vals[h], idxs[h] = out[:top_k], out[top_k:]
    return vals, idxs


def tree(op, xs):
    """op folded over xs as a balanced tree (depth log2 len(xs))."""
    while len(xs) > 1:
        xs = [op(xs[i], xs[i + 1]) if i + 1 < len(xs) else xs[i] for i in range(0, len(xs), 2)]
    return xs[0]


def _half(ops, scores, base, lv, li, h: int, *, top_k: int, bk: int):
    """Half h of the warp's rows (8 rows), a row at a time: the scores go through shared
    memory (64 columns per pass) so that a row lies across the 32 lanes, 2 scores each. The
    rows are a loop (``ops.loop``: scf.for on the GPU, the row index a runtime value), so the
    kernel holds one row's pops, not eight."""
    lane, quad = ops.lane, ops.quad
    buf_row0 = ops.mul(ops.warp, ops.i32(PASS_ROWS))
    store_col = ops.mul(ops.quad_lane, ops.i32(2))
    load_col = ops.mul(lane, ops.i32(2))
    neg = ops.f32(NEG)
    for c in range(bk // COLS):
        col_base = ops.add(base, ops.i32(c * COLS))
        ops.sync_warp()  # the previous pass's reads are done
        for j in range(COLS // 8):
            a, b = scores[c * (COLS // 8) + j][h]
            ops.store_pair(ops.add(buf_row0, quad), ops.add(store_col, ops.i32(8 * j)), a, b)
        ops.sync_warp()

        def row(r, lists, col_base=col_base):
            lv, li = lists[:top_k], lists[top_k:]
            a, b = ops.load_pair(ops.add(buf_row0, r), load_col)
            owner = ops.ieq(quad, r)  # the quad that holds row r's list
            holder = ops.mul(r, ops.i32(4))

            def pops(a, b, lv, li, it):
                m = ops.warp_max(ops.fmax(a, b))
                at_a = ops.feq(a, m)
                src = ops.lowest_lane(ops.or_(at_a, ops.feq(b, m)))
                e = ops.shfl(ops.select(at_a, ops.i32(0), ops.i32(1)), src)
                pos = ops.add(col_base, ops.add(ops.mul(src, ops.i32(2)), e))
                nv, ni = insert(lv, li, m, pos, where=ops.select, gt=ops.gt)
                lv = [ops.select(owner, x, y) for x, y in zip(nv, lv)]
                li = [ops.select(owner, x, y) for x, y in zip(ni, li)]
                if it + 1 == top_k:
                    return lv + li
                mine = ops.ieq(lane, src)
                a = ops.select(ops.and_(mine, ops.ieq(e, ops.i32(0))), neg, a)
                b = ops.select(ops.and_(mine, ops.ieq(e, ops.i32(1))), neg, b)
                more = ops.any(ops.gt(ops.fmax(a, b), ops.shfl(lv[-1], holder)))
                return ops.branch(more, lambda: pops(a, b, lv, li, it + 1), lv + li, "more")

            need = ops.any(ops.gt(ops.fmax(a, b), ops.shfl(lv[-1], holder)))  # row r's k-th
            return ops.branch(need, lambda: pops(a, b, lv, li, 0), lv + li, "row")

        out = ops.loop(PASS_ROWS, row, lv + li)
        lv, li = out[:top_k], out[top_k:]
    return lv + li


# ----------------------------------------------------------------------------- numpy lanes
class NumpyWarp:
    """:func:`merge_tile`'s operations on one warp simulated in numpy: a per-lane value is a
    (32,) array; a branch condition must be the same in every lane (as on the GPU, where the
    branches are warp-uniform), which is asserted."""

    def __init__(self, warp: int, smem: np.ndarray, stats: dict | None = None):
        self.stats = stats
        self.lane = np.arange(32, dtype=np.int32)
        self.quad, self.quad_lane = self.lane // 4, self.lane % 4
        self.warp = np.full(32, warp, np.int32)
        self.smem = smem

    i32 = staticmethod(lambda x: np.full(32, x, np.int32))
    f32 = staticmethod(lambda x: np.full(32, x, np.float32))
    add = staticmethod(lambda a, b: (a + b).astype(np.int32))
    mul = staticmethod(lambda a, b: (a * b).astype(np.int32))
    fmax = staticmethod(np.maximum)
    gt = staticmethod(lambda a, b: a > b)
    feq = staticmethod(lambda a, b: a == b)
    ieq = staticmethod(lambda a, b: a == b)
    and_ = staticmethod(np.logical_and)
    or_ = staticmethod(np.logical_or)
    select = staticmethod(np.where)

    @staticmethod
    def warp_max(x):
        for stride in (1, 2, 4, 8, 16):  # butterfly, as on the GPU
            x = np.maximum(x, x[np.arange(32) ^ stride])
        return x

    @staticmethod
    def any(pred):
        return np.full(32, pred.any())

    @staticmethod
    def lowest_lane(pred):
        assert pred.any(), "a pop without a lane holding the maximum"
        return np.full(32, np.flatnonzero(pred)[0], np.int32)

    @staticmethod
    def shfl(x, src):
        assert (src == src[0]).all()
        return np.full(32, x[src[0]], x.dtype)

    def sync_warp(self):
        pass

    def store_pair(self, row, col, a, b):
        self.smem[row, col], self.smem[row, col + 1] = a, b

    def load_pair(self, row, col):
        return self.smem[row, col].copy(), self.smem[row, col + 1].copy()

    def loop(self, count: int, body, carry):
        for r in range(count):
            carry = body(np.full(32, r, np.int32), carry)
        return carry

    def branch(self, cond, then, current, kind: str):
        assert (cond == cond[0]).all(), "a branch condition that differs between lanes"
        if self.stats is not None:
            self.stats[kind + "_checked"] = self.stats.get(kind + "_checked", 0) + 1
            self.stats[kind] = self.stats.get(kind, 0) + int(cond[0])
        return then() if cond[0] else current


def simulate(scores: np.ndarray, positions: np.ndarray, top_k: int, bk: int, stats=None):
    """The merge of a warpgroup's (64, N) float32 scores, tile by tile (``bk`` columns, N a
    multiple of bk; column n at key ``positions[n]``, tiles' positions ascending, contiguous
    within a tile), every warp's lanes simulated: returns the (64, top_k) lists (score,
    position; NEG / -1 where a row has fewer keys), read from the row layout as the kernel
    writes them, after checking that the four lanes of each quad agree. ``stats``: a dict that
    counts the branches by kind, taken ("half": a half transposed, "row": a row's first pop,
    "more": a further pop) and checked ("half_checked", ...)."""
    smem = np.full((4 * PASS_ROWS, STRIDE), np.nan, np.float32)
    vals_out = np.zeros((ROWS, top_k), np.float32)
    idxs_out = np.zeros((ROWS, top_k), np.int32)
    for w in range(4):
        ops = NumpyWarp(w, smem, stats)
        vals = [[ops.f32(NEG)] * top_k for _ in range(2)]
        idxs = [[ops.i32(-1)] * top_k for _ in range(2)]
        for t0 in range(0, scores.shape[1], bk):
            tile = scores[16 * w:16 * w + 16, t0:t0 + bk]
            regs = [[(tile[8 * h + ops.quad, 8 * j + 2 * ops.quad_lane],
                      tile[8 * h + ops.quad, 8 * j + 2 * ops.quad_lane + 1]) for h in range(2)]
                    for j in range(bk // 8)]
            vals, idxs = merge_tile(ops, regs, ops.i32(positions[t0]), vals, idxs,
                                    top_k=top_k, bk=bk)
        for h in range(2):
            for q in range(8):
                lanes = slice(4 * q, 4 * q + 4)
                for p in range(top_k):
                    for src, out in ((vals[h][p], vals_out), (idxs[h][p], idxs_out)):
                        assert (src[lanes] == src[4 * q]).all(), "a quad's copies differ"
                        out[16 * w + 8 * h + q, p] = src[4 * q]
    return vals_out, idxs_out


# ----------------------------------------------------------------------------- MLIR (GPU)
class MlirWarp:
    """:func:`merge_tile`'s operations as MLIR (arith, vector, scf, inline PTX) for one thread;
    ``smem``: the shared-memory buffer, a (rows, STRIDE) float32 memref (:func:`buffer_shape`;
    ``pallas_mgpu_score._lane_topk`` uses the lane index, the vote and the branch, without one)."""

    def __init__(self, smem=None):
        from jaxlib.mlir import ir
        from jaxlib.mlir.dialects import arith, gpu

        self.ir, self.arith = ir, arith
        self.i32_t, self.f32_t = ir.IntegerType.get_signless(32), ir.F32Type.get()
        self.index_t = ir.IndexType.get()
        self.smem = smem
        tid = arith.index_cast(self.i32_t, gpu.thread_id(gpu.Dimension.x))
        self.lane = arith.andi(tid, self.i32(31))
        self.quad = arith.shrui(self.lane, self.i32(2))
        self.quad_lane = arith.andi(self.lane, self.i32(3))
        self.warp = arith.shrui(tid, self.i32(5))  # the CTA's warp: consumers own the first

    def i32(self, x):
        return self.arith.constant(self.i32_t, x)

    def f32(self, x):
        return self.arith.constant(self.f32_t, x)

    def add(self, a, b):
        return self.arith.addi(a, b)

    def mul(self, a, b):
        return self.arith.muli(a, b)

    def fmax(self, a, b):
        return self.arith.maximumf(a, b)

    def gt(self, a, b):
        return self.arith.cmpf(self.arith.CmpFPredicate.OGT, a, b)

    def feq(self, a, b):
        return self.arith.cmpf(self.arith.CmpFPredicate.OEQ, a, b)

    def ieq(self, a, b):
        return self.arith.cmpi(self.arith.CmpIPredicate.eq, a, b)

    def and_(self, a, b):
        return self.arith.andi(a, b)

    def or_(self, a, b):
        return self.arith.ori(a, b)

    def select(self, p, a, b):
        return self.arith.select(p, a, b)

    def _asm(self, text, *args):
        from jaxlib.mlir.dialects import llvm

        constraints = ",".join(["=r"] + ["r"] * len(args))
        return llvm.inline_asm(self.i32_t, list(args), text, constraints, asm_dialect=0,
                               has_side_effects=True)

    def _flag(self, pred):
        return self.arith.extui(self.i32_t, pred)

    def warp_max(self, x):
        """The warp's largest float, through ``redux.sync`` on integers: the bits of a float,
        with the magnitude bits flipped where the sign is set, order as the floats do (-0
        below +0, which compare equal as floats anyway; no NaN here)."""
        bits = self.arith.bitcast(self.i32_t, x)
        flip = self.arith.andi(self.arith.shrsi(bits, self.i32(31)), self.i32(0x7FFFFFFF))
        key = self._asm("redux.sync.max.s32 $0, $1, 0xffffffff;", self.arith.xori(bits, flip))
        flip = self.arith.andi(self.arith.shrsi(key, self.i32(31)), self.i32(0x7FFFFFFF))
        return self.arith.bitcast(self.f32_t, self.arith.xori(key, flip))

    def any(self, pred):
        flag = self._asm("{ .reg .pred p; setp.ne.u32 p, $1, 0; "
                         "vote.sync.any.pred p, p, 0xffffffff; selp.u32 $0, 1, 0, p; }",
                         self._flag(pred))
        return self.arith.cmpi(self.arith.CmpIPredicate.ne, flag, self.i32(0))

    def lowest_lane(self, pred):
        return self._asm("{ .reg .pred p; .reg .b32 m; setp.ne.u32 p, $1, 0; "
                         "vote.sync.ballot.b32 m, p, 0xffffffff; brev.b32 m, m; "
                         "clz.b32 $0, m; }", self._flag(pred))

    def shfl(self, x, src):
        is_f32 = x.type == self.f32_t
        bits = self.arith.bitcast(self.i32_t, x) if is_f32 else x
        y = self._asm("shfl.sync.idx.b32 $0, $1, $2, 0x1f, 0xffffffff;", bits, src)
        return self.arith.bitcast(self.f32_t, y) if is_f32 else y

    def sync_warp(self):
        from jaxlib.mlir.dialects import nvvm

        # bar.warp.sync also orders the lanes' shared-memory accesses (as __syncwarp)
        nvvm.bar_warp_sync(self.i32(-1))

    def _at(self, row, col):
        return [self.arith.index_cast(self.index_t, x) for x in (row, col)]

    def store_pair(self, row, col, a, b):
        from jaxlib.mlir.dialects import vector

        pair = _vector_of(self.ir.VectorType.get((2,), self.f32_t), [a, b])
        vector.store(pair, self.smem, self._at(row, col), alignment=8)  # one st.shared.v2

    def load_pair(self, row, col):
        from jaxlib.mlir.dialects import vector

        pair = vector.load(self.ir.VectorType.get((2,), self.f32_t), self.smem,
                           self._at(row, col), alignment=8)
        return tuple(vector.extract(pair, dynamic_position=[],
                                    static_position=self.ir.DenseI64ArrayAttr.get([e]))
                     for e in range(2))

    def loop(self, count: int, body, carry):
        """scf.for over r = 0 .. count - 1 (an i32 runtime value) carrying ``carry``."""
        from jaxlib.mlir.dialects import scf

        step = lambda x: self.arith.constant(self.index_t, x)
        op = scf.ForOp(step(0), step(count), step(1), carry)
        with self.ir.InsertionPoint(op.body):
            r = self.arith.index_cast(self.i32_t, op.induction_variable)
            scf.yield_(body(r, list(op.inner_iter_args)))
        return list(op.results)

    def branch(self, cond, then, current, kind: str):
        del kind  # (the numpy lanes count the branches by kind)
        from jaxlib.mlir.dialects import scf

        op = scf.IfOp(cond, [x.type for x in current], has_else=True)
        with self.ir.InsertionPoint(op.then_block):
            scf.yield_(then())
        with self.ir.InsertionPoint(op.else_block):
            scf.yield_(current)
        return list(op.results)


def merge_fn(top_k: int, bk: int):
    """The per-tile merge for the kernel: ``merge(scores, base, vals, idxs, buffer) -> (vals,
    idxs)`` with scores the (64, bk) float32 tile in the WGMMA layout, base (the position of
    its column 0) and the top_k lists (tuples of (64,) arrays) in its row layout, buffer the
    (rows, STRIDE) float32 shared memory of :func:`buffer_shape`."""
    import jax.numpy as jnp
    import jax.experimental.pallas.mosaic_gpu as plgpu
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import vector

    wgmma, row = plgpu.Layout.WGMMA, plgpu.Layout.WGMMA.reduce(1)
    # A flat tuple of results: jax 0.11's inline_mgpu takes no nested return (0.10's did).
    result = tuple(plgpu.ShapeDtypeStruct((ROWS,), dtype, layout=row)
                   for dtype in (jnp.float32, jnp.int32) for _ in range(top_k))

    @plgpu.inline_mgpu(arg_types=(wgmma, row, (row,) * top_k, (row,) * top_k, plgpu.RefType()),
                       return_type=result)
    def flat_merge(ctx, scores, base, vals, idxs, buffer):
        del ctx
        import jax.experimental.mosaic.gpu as mgpu

        take = lambda vec, e: vector.extract(vec, dynamic_position=[],
                                             static_position=ir.DenseI64ArrayAttr.get([e]))
        half_regs = lambda arr: arr.registers.reshape(2)  # [row half h]
        s_regs = scores.registers.reshape(bk // 8, 2)  # [column block j, row half h] <2 x f32>
        pairs = [[(take(s_regs[j, h], 0), take(s_regs[j, h], 1)) for h in range(2)]
                 for j in range(bk // 8)]
        lists = [[[take(half_regs(a)[h], 0) for a in arrs] for h in range(2)]
                 for arrs in (vals, idxs)]
        lv, li = merge_tile(MlirWarp(buffer), pairs, take(half_regs(base)[0], 0), *lists,
                            top_k=top_k, bk=bk)

        def wrap(like, xs):
            regs = [_vector_of(half_regs(like)[h].type, [xs[h]]) for h in range(2)]
            return mgpu.FragmentedArray(
                _registers=np.asarray(regs, dtype=object).reshape(like.registers.shape),
                _layout=like.layout, _is_signed=like.is_signed)

        return (*(wrap(a, [lv[0][p], lv[1][p]]) for p, a in enumerate(vals)),
                *(wrap(a, [li[0][p], li[1][p]]) for p, a in enumerate(idxs)))

    def merge(scores, base, vals, idxs, buffer):
        out = flat_merge(scores, base, vals, idxs, buffer)
        return tuple(out[:top_k]), tuple(out[top_k:])

    return merge


def _vector_of(vec_type, xs):
    """A register of ``vec_type`` (a vector of len(xs) or of 1 broadcast) holding ``xs``."""
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import vector

    out = vector.broadcast(vec_type, xs[0])
    for e, x in enumerate(xs[1:], start=1):
        out = vector.insert(x, out, dynamic_position=[],
                            static_position=ir.DenseI64ArrayAttr.get([e]))
    return out
