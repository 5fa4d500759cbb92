"""CCA forward as a Pallas kernel with the Mosaic GPU lowering (Hopper, sm_90): warp specialised.

Same function and contract as ``pallas._forward`` (padded inputs and core tokens in, the output and
the base-2 log-sum-exp of the scaled scores out), so ``pallas.py``'s backward runs unchanged on its
residuals. What differs is how the work is scheduled on the GPU (FlashAttention-3's plan, which the
Triton lowering cannot express):

* One CTA per (query head, tile of 128 queries, batch row), three warpgroups. Warpgroup 2 is the
  producer: it streams the tile's fused key set, core blocks ``0 .. nc`` then raw blocks
  ``a0 .. end``, through a ring of ``slots`` shared-memory buffers with TMA copies. Warpgroups 0
  and 1 own 64 query rows each: ``S = Q K^T`` and ``O += P V`` on wgmma, a base-2 online softmax
  in registers.
* The two consumers take turns on the tensor cores through a shared barrier (ping-pong), so one's
  exponentials overlap the other's matmuls. With ``MgpuConfig.overlap`` each consumer also
  pipelines its own steps (FlashAttention-3's intra-warpgroup overlap): block s's ``Q K^T`` and
  block s-1's ``P V`` are issued together, and block s's softmax runs while ``P V`` is on the
  tensor cores (same operations in the same order, so the same bits).
* Both consumers walk the whole stream of the tile (each ring slot is released when both have read
  it). A block that is only partly visible to a consumer's rows is masked; with a finite "minus
  infinity" and the weights of masked keys set to 0, a block invisible to all its rows adds nothing.

Bounds and masks follow ``pallas._forward_kernel`` exactly: query t sees core token j iff
``(j + 1) g <= start(t)`` and raw key s iff ``start(t) <= s <= t``.

Supported (:func:`supports`): 16-bit inputs, head dim 64 or 128, T a multiple of 128 (the two
consumers' rows). ``interpret=True`` runs the Mosaic GPU interpreter on CPU (slow: tests use tiny
shapes). That interpreter (jax 0.10) hangs inside a jitted gradient; the forward jitted or not, and
the gradient taken eagerly, run (tests/parity/harness.py takes it eagerly).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from kernels.cca.pallas_common import LOG2E, NEG, cdiv, pad_to, window_start

ROWS = 64  # query rows per consumer warpgroup (one wgmma M tile)
CONSUMERS = 2
TILE = ROWS * CONSUMERS  # queries per CTA


@dataclasses.dataclass(frozen=True)
class MgpuConfig:
    """Key block (rows per TMA copy, the N of the ``Q K^T`` wgmma) and ring depth of the producer.

    H200, 128K, d = 128, kernel alone (bench/results/ab_forward_mgpu_h200.json): 128-key blocks
    with 2 slots 19.5 ms; 64-key blocks with 3 or 4 slots 22.5-22.9 ms. 128 keys with 3 slots do
    not fit in shared memory at d = 128. ``overlap``: the software-pipelined consumer step
    (:func:`consume`), the same bits; H100 (``bench/results/ab_overlap_h100.json``): slower,
    20.5 against 19.3 ms at 128K and 2.42 against 2.16 at 32K, so off. ``pingpong``: with
    ``overlap``, False lets the consumers run without taking turns; H100
    (``bench/results/ab_overlap_free_pin_cca_h100.json``): 19.06 against 19.24 ms at 128K with
    8 kv heads, 2.24 against 2.15 at 32K, so off too. ``heavy_first``: the query tiles with
    the most keys (the late ones) run first; False runs them in order, as JAX's own
    ``attention_mgpu`` does: 6.5% slower on causal attention at 32K (15.12 against 14.19 ms on
    an H100, where JAX's kernel took 14.59 and cuDNN 14.75;
    ``bench/results/attention_ceiling_order_h100.json``)."""

    block_k: int = 128
    slots: int = 2
    overlap: bool = False
    pingpong: bool = True
    heavy_first: bool = True

    def __post_init__(self):
        if self.block_k not in (64, 128):
            raise ValueError(f"MgpuConfig.block_k must be 64 or 128; got {self.block_k}")
        if self.slots < 2:
            raise ValueError(f"MgpuConfig.slots must be >= 2; got {self.slots}")
        for name in ("overlap", "pingpong", "heavy_first"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MgpuConfig.{name} must be a bool; got "
                                 f"{getattr(self, name)!r}")


def wgmma_inputs(dtype, head_dim: int) -> bool:
    """Inputs the Mosaic GPU attention kernels take: 16-bit, head dim 64 or 128 (their wgmma
    tiles and 128-byte swizzled shared memory)."""
    return (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and head_dim in (64, 128))


def supports(q, config: MgpuConfig | None = None) -> bool:
    """True where this kernel computes the forward of padded q (B, T, Hq, D): 16-bit, head dim 64
    or 128, T a multiple of 128 and of the key block."""
    _, t, _, d = q.shape
    bk = (config or MgpuConfig()).block_k
    return wgmma_inputs(q.dtype, d) and t % TILE == 0 and t % bk == 0


def available() -> bool:
    """The Mosaic GPU lowering is importable and the default device is a Hopper GPU (sm_90: the
    kernel is built on wgmma, which later architectures replace)."""
    try:
        import jax.experimental.pallas.mosaic_gpu  # noqa: F401
    except ImportError:
        return False
    dev = jax.devices()[0]
    if dev.platform != "gpu":
        return False
    cc = getattr(dev, "compute_capability", "0")
    try:
        return 9.0 <= float(cc) < 10.0
    except ValueError:
        return False


def uses_mosaic_gpu(setting: str, name: str, fits: bool, needs: str, interpret: bool) -> bool:
    """Whether a kernel with a Triton and a Mosaic GPU lowering runs the latter. ``setting`` is
    the config field ``name`` ("auto", "triton" or "mosaic_gpu"), ``fits`` whether the Mosaic GPU
    kernel takes these inputs, ``needs`` what it takes (for the error): "mosaic_gpu" demands it
    (a ValueError when it does not fit, or, compiled, without a Hopper GPU); "auto" takes it where
    it fits on a Hopper GPU, never in the interpreter."""
    if setting == "triton":
        return False
    if setting == "mosaic_gpu":
        if not fits:
            raise ValueError(f"{name}='mosaic_gpu' needs {needs}")
        if not interpret and not available():
            raise ValueError(f"{name}='mosaic_gpu' needs a Hopper (sm_90) GPU and jax's Mosaic "
                             "GPU lowering")
        return True
    return fits and not interpret and available()


def interpret_params():
    """Parameters of the Mosaic GPU interpreter (jax internals; None if this jax has none)."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError:
        return None
    return InterpretGPUParams()


def layout_helpers(interpret: bool):
    """(cast, iota) that pin register layouts on the GPU. The interpreter has no lowering for
    register layouts, so there they are left to it (plain ``lax`` ops)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    if interpret:
        return (lambda x, layout: x,
                lambda dt, shape, dim, layout: lax.broadcasted_iota(dt, shape, dim))
    return (plgpu.layout_cast,
            lambda dt, shape, dim, layout: plgpu.broadcasted_iota(dt, shape, dim, layout=layout))


class Ring(NamedTuple):
    """The key/value ring of a warp-specialised attention kernel: ``slots`` shared-memory key
    and value blocks, their barriers (``*_full``: the producer's copy landed; ``*_free``: both
    consumers are done with it) and ``turn``, the consumers' barrier for the tensor cores."""

    k: Any
    v: Any
    k_full: Any
    v_full: Any
    k_free: Any
    v_free: Any
    turn: Any
    slots: int


def take_turn(turn) -> None:
    """Arrive on the consumers' barrier and wait for its phase (None: no turns taken)."""
    _turn_arrive(turn)
    _turn_wait(turn)


def _turn_arrive(turn) -> None:
    import jax.experimental.pallas.mosaic_gpu as plgpu

    if turn is not None:
        plgpu.barrier_arrive(turn)


def _turn_wait(turn) -> None:
    import jax.experimental.pallas.mosaic_gpu as plgpu

    if turn is not None:
        plgpu.barrier_wait(turn)


def _weights(scores, m, mask, scale2: float):
    """One block of the base-2 online softmax: (p, m_new, alpha) for the (64, block) ``scores``
    against the rows' running maxima ``m`` (``mask``: None or the visible keys; masked scores
    count as the finite "minus infinity" and their weights are 0).

    A masked score's weight is exp2 of about -3e37 (or of -inf) below a row's running maximum,
    so 0 already, except in a row that has seen no visible key yet (its maximum the masked
    value itself). Those rows are zeroed as a whole, by a row vector, so the mask dies at the
    maximum: a second select by the mask kept its (64, block) tile alive through the
    exponentials, and with the column indices hoisted out of the loop that spilled
    (ReAttention's kernel, H100 ptxas: 64/128 bytes of spill stores/loads with 128-key blocks,
    4/4 without; 796/868 against 444/508 with 192). The same bits (interpreter runs of both
    kernels, masked first steps included)."""
    if mask is not None:
        scores = jnp.where(mask, scores, NEG)
    m_new = jnp.maximum(m, scores.max(axis=1) * scale2)
    p = jnp.exp2(scores * scale2 - lax.broadcast_in_dim(m_new, scores.shape, [0]))
    if mask is not None:
        live = (m_new > NEG * scale2).astype(jnp.float32)
        p = p * lax.broadcast_in_dim(live, scores.shape, [0])
    return p, m_new, jnp.exp2(m - m_new)


def _rows(x, like):
    return lax.broadcast_in_dim(x, like.shape, [0])


def _dot_kt(q_smem, k):
    """Q K^T as a plain dot (the interpreter has no transposed wgmma operands)."""
    return lax.dot_general(q_smem[...], k, (((1,), (1,)), ((), ())),
                           preferred_element_type=jnp.float32)


def _scores(q_smem, ring: Ring, slot, interpret: bool):
    """``S = Q K^T`` of the key block in ring slot ``slot``: issued, the tensor cores handed to
    the other consumer (:func:`take_turn`), then waited for."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    if interpret:
        scores = _dot_kt(q_smem, ring.k[slot])
        take_turn(ring.turn)
        return scores

    def qk(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(ring.k.at[slot], (1, 0)))
        take_turn(ring.turn)
        return acc_ref[...]

    return pl.run_scoped(qk, plgpu.ACC((ROWS, ring.k.shape[1]), jnp.float32))


def attend_block(s, carry, *, q_smem, ring: Ring, n_steps, scale2: float, dtype, mask,
                 interpret: bool):
    """Step ``s`` of a consumer warpgroup, one block at a time: the key block in ring slot
    ``s % slots`` through the base-2 online softmax ``carry = (acc, m, l)`` of the 64 rows in
    ``q_smem`` (``mask``: None, every key visible, or a function giving the (64, block) mask).
    The consumers take turns on the tensor cores (``S = Q K^T``, then ``O += P V``) so that one's
    softmax overlaps the other's matmuls. (ptxas moves the "softmax done" arrive ahead of the
    softmax, seen in the SASS; pinning it after the softmax with a store of the row sums to
    shared memory was 3-5% slower: ``docs/perf-notes.md``, nineteenth session.)"""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    acc, m, l = carry
    slot = lax.rem(s, ring.slots)
    scores = _scores(q_smem, ring, slot, interpret)
    plgpu.barrier_arrive(ring.k_free.at[slot])
    p, m_new, alpha = _weights(scores, m, None if mask is None else mask(), scale2)
    acc = acc * _rows(alpha, acc)
    l = l * alpha + p.sum(axis=1)
    p16 = p.astype(dtype)
    acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
    plgpu.barrier_arrive(ring.turn)  # softmax done
    plgpu.barrier_wait(ring.v_full.at[slot])
    plgpu.barrier_wait(ring.turn)  # the tensor cores are ours

    def wait_next_keys():
        @pl.when(s + 1 < n_steps)
        def _():
            plgpu.barrier_wait(ring.k_full.at[lax.rem(s + 1, ring.slots)])

    def pv(acc_ref):
        plgpu.wgmma(acc_ref, p16, ring.v.at[slot])
        wait_next_keys()

    if interpret:  # and no run_state
        acc = acc + jnp.dot(p16, ring.v[slot], preferred_element_type=jnp.float32)
        wait_next_keys()
    else:  # on the GPU, P V accumulates into O in the wgmma registers
        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
    plgpu.barrier_arrive(ring.v_free.at[slot])
    return acc, m_new, l


def _issue_step(s, carry, *, q_smem, ring: Ring, scale2: float, dtype, mask, stash,
                interpret: bool):
    """Step ``s`` (>= 1) of a consumer warpgroup, software-pipelined (FlashAttention-3's
    intra-warpgroup overlap): ``S = Q K_s^T`` and the previous block's ``O += P V`` are issued
    together, and block s's softmax runs while ``P V`` is still on the tensor cores. ``carry =
    (acc, m, l, p)``: acc still lacks the previous block's ``P V`` (p: its weights, 16-bit).
    The same operations in the same order as :func:`attend_block`, so the same bits."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    acc, m, l, p_prev = carry
    slot, prev = lax.rem(s, ring.slots), lax.rem(s - 1, ring.slots)
    bk = ring.k.shape[1]
    plgpu.barrier_wait(ring.v_full.at[prev])
    plgpu.barrier_wait(ring.k_full.at[slot])
    _turn_wait(ring.turn)  # the other consumer has issued its step

    def weights(scores, m):  # float32 weights: their 16-bit copy is made after the wait
        p, m_new, alpha = _weights(scores, m, None if mask is None else mask(), scale2)
        return p, m_new, alpha, p.sum(axis=1)

    if interpret:  # plain dots (no transposed operands, no run_state)
        scores = _dot_kt(q_smem, ring.k[slot])
        acc = acc + jnp.dot(p_prev, ring.v[prev], preferred_element_type=jnp.float32)
        take_turn(ring.turn)
        plgpu.barrier_arrive(ring.k_free.at[slot])
        p, m, alpha, psum = weights(scores, m)
        plgpu.barrier_arrive(ring.v_free.at[prev])
        acc, l, p16 = acc * _rows(alpha, acc), l * alpha + psum, p.astype(dtype)
    else:
        def step(refs):
            o_ref, m_ref, l_ref, p_ref = refs

            def qk(s_ref):
                plgpu.wgmma(s_ref, q_smem, plgpu.transpose_ref(ring.k.at[slot], (1, 0)))
                plgpu.wgmma(o_ref, p_prev, ring.v.at[prev])
                take_turn(ring.turn)
                return plgpu.wgmma_accumulator_load(s_ref, wait_n=1)  # S done, P V in flight

            scores = pl.run_scoped(qk, plgpu.ACC((ROWS, bk), jnp.float32))
            plgpu.barrier_arrive(ring.k_free.at[slot])
            p, m_new, alpha, psum = weights(scores, m)
            # The row sums go to shared memory before the wait: ptxas keeps the wait after
            # that store, so the softmax stays between the two waits (without it ptxas hoisted
            # the wait above the softmax, and nothing overlapped; seen in the SASS).
            stash[...] = psum
            # Wait for P V. Until then p_prev's registers are the wgmma's: the barrier keeps
            # them live, so that LLVM does not write the new weights into them (ptxas would
            # then serialise the wgmmas, C7513). As in FlashAttention-3, the 16-bit weights
            # are made after the wait.
            o, _, p = lax.optimization_barrier((o_ref[...], p_prev, p))
            plgpu.barrier_arrive(ring.v_free.at[prev])
            o_ref[...] = o * _rows(alpha, o)
            l_ref[...] = l * alpha + psum
            m_ref[...] = m_new
            p_ref[...] = p.astype(dtype)

        acc, m, l, p16 = pl.run_state(step)((plgpu.ACC.init(acc), m, l, p_prev))
    acc, m, l, p16 = lax.optimization_barrier((acc, m, l, p16))
    _turn_arrive(ring.turn)  # softmax done
    return acc, m, l, p16


def consume(wg, ring: Ring, q_smem, n_steps, segments, *, scale2: float, dtype, overlap: bool,
            stash, interpret: bool, pingpong: bool = True):
    """A consumer warpgroup's whole stream, steps ``0 .. n_steps - 1`` (n_steps >= 1): returns
    ``(acc, m, l)``, the unnormalised output, base-2 running maxima and sums of its 64 rows.
    ``segments``: ``(stop, mask)`` pairs splitting the steps in order (the first starts at 0),
    ``mask`` None (every key visible) or ``mask(s)`` the (64, block) mask of step s. Step 0's
    keys must have landed. ``overlap`` pipelines each block's softmax against the previous
    block's ``P V`` (:func:`_issue_step`; ``stash``: a (64,) float32 shared-memory scratch
    of the warpgroup's own); otherwise one block at a time (:func:`attend_block`). Consumer 0
    goes first; the two take turns on the tensor cores (with ``overlap``, ``pingpong=False``
    drops the turns: the ring alone keeps them in step)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    cast, iota = layout_helpers(interpret)
    if overlap and not pingpong:  # the consumers run free, synchronised by the ring alone
        ring = ring._replace(turn=None)
    bk = ring.k.shape[1]
    d = q_smem.shape[-1]
    m = cast(jnp.full((ROWS,), NEG, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    l = cast(jnp.full((ROWS,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    acc = cast(jnp.full((ROWS, d), 0.0, jnp.float32), plgpu.Layout.WGMMA)
    pl.when(wg == 1)(lambda: take_turn(ring.turn))
    kwargs = dict(q_smem=q_smem, ring=ring, scale2=scale2, dtype=dtype, interpret=interpret)
    starts = [0] + [stop for stop, _ in segments[:-1]]
    if not overlap:
        carry = (acc, m, l)
        for start, (stop, mask) in zip(starts, segments):
            body = lambda s, c, mask=mask: attend_block(
                s, c, n_steps=n_steps, mask=None if mask is None else lambda: mask(s), **kwargs)
            carry = lax.fori_loop(start, stop, body, carry)
    else:
        # Step 0: S = Q K_0^T alone, its softmax with the mask of the segment that holds it.
        # (Mosaic GPU selects need full-shape predicates: ``zero + scalar`` broadcasts.)
        zero = iota(jnp.int32, (ROWS, bk), 1, plgpu.Layout.WGMMA) * 0
        mask0 = None
        for stop, mask in reversed(segments):
            here = mask(0) if mask is not None else zero == 0
            mask0 = here if mask0 is None else jnp.where(zero + stop > 0, here, mask0)
        scores = _scores(q_smem, ring, 0, interpret)
        plgpu.barrier_arrive(ring.k_free.at[0])
        p, m, _ = _weights(scores, m, mask0, scale2)
        l, p16 = p.sum(axis=1), p.astype(dtype)
        acc, m, l, p16 = lax.optimization_barrier((acc, m, l, p16))
        _turn_arrive(ring.turn)  # softmax done
        carry = (acc, m, l, p16)
        for start, (stop, mask) in zip(starts, segments):
            body = lambda s, c, mask=mask: _issue_step(
                s, c, mask=None if mask is None else lambda: mask(s), stash=stash, **kwargs)
            carry = lax.fori_loop(jnp.maximum(start, 1), stop, body, carry)
        # The last block's P V.
        acc, m, l, p16 = carry
        last = lax.rem(n_steps - 1, ring.slots)
        plgpu.barrier_wait(ring.v_full.at[last])
        _turn_wait(ring.turn)
        if interpret:
            acc = acc + jnp.dot(p16, ring.v[last], preferred_element_type=jnp.float32)
            take_turn(ring.turn)
        else:
            def pv(o_ref):
                plgpu.wgmma(o_ref, p16, ring.v.at[last])
                take_turn(ring.turn)

            acc = pl.run_state(pv)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(ring.v_free.at[last])
        carry = (acc, m, l)
    pl.when(wg == 0)(lambda: take_turn(ring.turn))
    return carry


def produce(slots: int, n_steps, *streams) -> None:
    """The producer warpgroup of a ring of ``slots`` shared-memory buffers: each stream is
    ``(fetch, free)``, ``fetch(s, slot)`` issuing step s's TMA copy into ``slot`` and ``free`` the
    barriers the consumers arrive on when they release a slot. Steps 0 .. n_steps - 1, each into
    a slot released by the step ``slots`` earlier; at the end, waits for the consumers' last
    release of every slot (so every barrier phase is seen)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    for i in range(slots):
        @pl.when(i < n_steps)
        def _():
            for fetch, _ in streams:
                fetch(i, i)

    @pl.loop(slots, jnp.maximum(n_steps, slots))
    def _(s):
        slot = lax.rem(s, slots)
        for fetch, free in streams:
            plgpu.barrier_wait(free.at[slot])
            fetch(s, slot)

    for i in range(slots):
        @pl.when(i < n_steps)
        def _():
            for _, free in streams:
                plgpu.barrier_wait(free.at[i])


def _kernel(q_ref, k_ref, v_ref, kc_ref, vc_ref, o_ref, lse_ref, scoped, *, g, w, bk, slots,
            grp, scale, dtype, n_tiles, overlap, pingpong, heavy_first, interpret):
    import jax.experimental.pallas.mosaic_gpu as plgpu

    (qo_smem2, k_smem, v_smem, lse_smem2), (k_full, v_full, q_full), (k_free, v_free), turn = scoped
    _, iota = layout_helpers(interpret)
    b = lax.axis_index("batch")
    h = lax.axis_index("heads")
    wg = lax.axis_index("wg")
    q_seq = lax.axis_index("q_seq")
    tile = n_tiles - 1 - q_seq if heavy_first else q_seq  # heavy (late) tiles first, or in order
    t0 = tile * TILE

    # The tile's stream: steps [0, nc) are core blocks 0..nc-1, steps [nc, n_steps) raw blocks
    # a0, a0 + 1, ... (the union of the two consumers' key sets).
    nc = cdiv(lax.div(window_start(t0 + TILE - 1, g, w), g), bk)
    a0 = lax.div(window_start(t0, g, w), bk)
    end = cdiv(t0 + TILE, bk)
    n_steps = nc + end - a0

    ring = Ring(k_smem, v_smem, k_full, v_full, k_free, v_free, turn, slots)

    @pl.when(wg < CONSUMERS)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        qo_smem = qo_smem2.at[wg]
        r0 = t0 + wg * ROWS
        plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(r0, ROWS), h], qo_smem, q_full.at[wg])
        plgpu.barrier_wait(q_full.at[wg])
        plgpu.barrier_wait(k_full.at[0])  # n_steps >= 1: every query sees itself

        # Per-row bounds as (64,) row vectors broadcast into the tile: each thread holds two
        # rows, so they stay two registers instead of one per element of the tile.
        rows = r0 + iota(jnp.int32, (ROWS,), 0, plgpu.Layout.WGMMA.reduce(1))
        tile_shape = (ROWS, bk)

        def visible(kind: str):
            def mask(s):
                cols = iota(jnp.int32, tile_shape, 1, plgpu.Layout.WGMMA)
                if kind == "core":  # (j + 1) g <= start(t)  <=>  (j + 1) g + w - 1 <= t
                    return cols * g <= _rows(rows - (s * bk * g + g + w - 1), cols)
                keys = cols + (a0 + s - nc) * bk
                return ((keys >= _rows(window_start(rows, g, w), cols))
                        & (keys <= _rows(rows, cols)))

            return mask

        # Per consumer, which steps need a mask (as in pallas._forward_kernel, for rows r0..r0+63):
        # core blocks below start(r0) // g // bk are visible to every row; raw blocks below
        # cdiv(start(r0 + 63), bk) may hold keys left of a row's window, and those from
        # (r0 + 1) // bk on keys right of a row.
        c_full = jnp.minimum(lax.div(lax.div(window_start(r0, g, w), g), bk), nc)
        a1 = cdiv(window_start(r0 + ROWS - 1, g, w), bk)
        d0 = jnp.maximum(a1, lax.div(r0 + 1, bk))
        segments = [(c_full, None), (nc, visible("core")), (nc + a1 - a0, visible("raw")),
                    (nc + d0 - a0, None), (n_steps, visible("raw"))]
        acc, m, l = consume(wg, ring, qo_smem, n_steps, segments, scale2=scale * LOG2E,
                            dtype=dtype, overlap=overlap, stash=lse_smem2.at[wg],
                            interpret=interpret, pingpong=pingpong)

        acc = acc / lax.broadcast_in_dim(l, acc.shape, [0])
        qo_smem[...] = acc.astype(dtype)
        lse_smem = lse_smem2.at[wg]
        lse_smem[...] = m + jnp.log2(l)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(qo_smem, o_ref.at[b, pl.ds(r0, ROWS), h])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, pl.ds(r0, ROWS)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == CONSUMERS)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")
        kv_head = lax.div(h, grp)

        def fetch(src_core, src_raw, smem, full, s, slot):
            @pl.when(s < nc)
            def _():
                block = jnp.minimum(s, src_core.shape[1] // bk - 1)  # s itself; static-safe
                plgpu.copy_gmem_to_smem(src_core.at[b, pl.ds(block * bk, bk), kv_head],
                                        smem.at[slot], full.at[slot])

            @pl.when(s >= nc)
            def _():
                plgpu.copy_gmem_to_smem(src_raw.at[b, pl.ds((a0 + s - nc) * bk, bk), kv_head],
                                        smem.at[slot], full.at[slot])

        produce(slots, n_steps,
                (lambda s, slot: fetch(kc_ref, k_ref, k_smem, k_full, s, slot), k_free),
                (lambda s, slot: fetch(vc_ref, v_ref, v_smem, v_full, s, slot), v_free))


def forward(
    q: Float[Array, "B T Hq D"],
    k: Float[Array, "B T Hkv D"],
    v: Float[Array, "B T Hkv D"],
    kc: Float[Array, "B N Hkv D"],
    vc: Float[Array, "B N Hkv D"],
    *,
    g: int,
    w: int,
    scale: float,
    config: MgpuConfig | None = None,
    interpret: bool = False,
) -> tuple[Float[Array, "B T Hq D"], Float[Array, "B Hq T"]]:
    """(o, lse2) of the padded problem, as ``pallas._forward`` returns them."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    config = config or MgpuConfig()
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    if not supports(q, config):
        raise ValueError(f"the Mosaic GPU CCA forward needs 16-bit q with head dim 64 or 128 and "
                         f"T a multiple of {TILE} and of block_k {config.block_k}; got {q.dtype}, "
                         f"shape {tuple(q.shape)}")
    if not (k.shape == v.shape == (b, t, hkv, d) and kc.shape == vc.shape
            and kc.shape[::2] == (b, hkv) and kc.shape[3] == d and hq % hkv == 0):
        raise ValueError(f"shapes disagree: q {q.shape}, k {k.shape}, v {v.shape}, "
                         f"kc {kc.shape}, vc {vc.shape}")
    if not q.dtype == k.dtype == v.dtype == kc.dtype == vc.dtype:
        raise ValueError("q, k, v and the core tokens must share one dtype")
    bk, slots = config.block_k, config.slots
    kc, vc = pad_to(kc, 1, bk), pad_to(vc, 1, bk)  # core blocks are read whole
    dtype = q.dtype
    smem = functools.partial(plgpu.SMEM, transforms=(plgpu.TilingTransform((8, 64)),
                                                     plgpu.SwizzleTransform(128)))

    def entry(q_ref, k_ref, v_ref, kc_ref, vc_ref, o_ref, lse_ref):
        kernel = functools.partial(_kernel, g=g, w=w, bk=bk, slots=slots, grp=hq // hkv,
                                   scale=scale, dtype=dtype, n_tiles=t // TILE,
                                   overlap=config.overlap, pingpong=config.pingpong,
                                   heavy_first=config.heavy_first, interpret=interpret)
        pl.run_scoped(
            lambda *scoped: kernel(q_ref, k_ref, v_ref, kc_ref, vc_ref, o_ref, lse_ref, scoped),
            (smem((CONSUMERS, ROWS, d), dtype), smem((slots, bk, d), dtype),
             smem((slots, bk, d), dtype), plgpu.SMEM((CONSUMERS, ROWS), jnp.float32)),
            (plgpu.Barrier(num_barriers=slots), plgpu.Barrier(num_barriers=slots),
             plgpu.Barrier(num_barriers=CONSUMERS)),
            (plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=slots),) * 2,
            plgpu.Barrier(num_arrivals=CONSUMERS),
            collective_axes="wg",
        )

    o, lse = plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct(q.shape, dtype),
                  jax.ShapeDtypeStruct((b, hq, t), jnp.float32)),
        grid=(hq, t // TILE, b),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=CONSUMERS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params() if interpret else None,
    )(q, k, v, kc, vc)
    return o, lse
