"""Decode attention as a Pallas GPU kernel (Triton lowering), flash-decoding style: one new query
token per sequence against a decode cache (``jax_cca/cache.py``), full or CCA.

Shape letters: B batch, Hq query heads, Hkv kv heads, G = Hq / Hkv, Gp = G padded to a power of
two >= 16 (the rows of a ``pl.dot``), D head dim, P splits, BK key block.

The key set of a sequence is one or more *segments* of cache rows (full: ``k, v (B, S, Hkv, D)``;
CCA: the core slots ``(B, N, Hkv, D)`` then the ring ``(B, R, Hkv, D)``). The grid is
(P, B, Hkv). Program (p, b, h) takes the G query heads of kv head h as the rows of one tile, counts
the blocks of each segment that can hold a visible key for the position ``t = positions[b]`` (read
in the kernel, so lengths are dynamic), lays the segments' blocks end to end, takes the p-th of P
equal contiguous shares and runs one online softmax (float32, base 2) over it with a per-key mask:

* full: rows ``s < t`` (positions before the new token);
* CCA core: slot j iff ``(j + 1) g <= start(t)`` (a prefix of the core slots);
* CCA ring: slot s holds position ``t - 1 - ((t - 1 - s) mod R)``, visible iff it lies in
  ``[start(t), t - 1]`` (the same mask holds whether or not the new token has already been written
  to slot ``t mod R``: that slot then holds t, otherwise t - R, and neither is in the range).

Only blocks that can hold a visible key are read: at 128K a CCA step reads about T/g + w rows
per kv head, not the preallocated ``max_len``. Each program writes its normalised partial output
and base-2 log-sum-exp; a share without a visible key writes zeros and a finite -huge lse, so it
carries weight exactly 0 in the combine and never a NaN. The combine merges the P
partials with the new token's own key and value, which are passed separately: the new token is
always visible, so the merged maximum is finite. The combine is a second small kernel
(``_combine_kernel``, one program per sequence and kv head). :func:`cca_decode_step` also pools
the group the new token completes, as one more program per sequence and kv head of the
attention's grid (``pallas_decode_pool.pool_group``), instead of a launch of its own.

A block that would run past a segment's end is shifted back to end at the last row, and the rows
it shares with the previous block are masked, so every load is in bounds without masked loads;
segments shorter than 16 rows are zero-padded (a few rows). On CPU the kernel runs through the
Pallas interpreter (``interpret=True``).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from kernels.cca.pallas_common import (
    LOG2E, NEG, call, cdiv, dot, exp2_for, merge_split_partials, online_softmax_update, pad_to,
    resolve_interpret, window_start)

# About 2 programs per SM of an H100 (132 SMs), as many as fit at once with 3 stages of 64-row
# tiles. bench/tune_decode.py, H100, 7B shapes, batch 1: CCA at 128K 65 us (512 programs: 69), full
# at 32K 190 us (203).
TARGET_PROGRAMS = 256
MIN_BLOCK = 16  # rows of a pl.dot operand


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the decode kernel. ``num_splits`` None: :func:`default_num_splits`."""

    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3
    num_splits: int | None = None

    def __post_init__(self):
        b = self.block_k
        if isinstance(b, bool) or not isinstance(b, int) or b < MIN_BLOCK or b & (b - 1):
            raise ValueError(f"DecodeConfig.block_k must be a power of two >= 16; got {b!r}")
        for name in ("num_warps", "num_stages"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DecodeConfig.{name} must be a positive int; got {value!r}")
        s = self.num_splits
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or s < 1):
            raise ValueError(f"DecodeConfig.num_splits must be a positive int or None; got {s!r}")


def default_decode_config(head_dim: int, itemsize: int) -> DecodeConfig:
    """64-row key blocks for 16-bit caches, 32 for float32 (twice the shared memory per row)."""
    del head_dim
    if itemsize >= 4:
        return DecodeConfig(block_k=32, num_warps=4, num_stages=2)
    return DecodeConfig(block_k=64, num_warps=4, num_stages=3)


def launch_plan(sizes: list[int], batch: int, kv_heads: int,
                config: DecodeConfig) -> tuple[int, int]:
    """(key block, splits) for segments of ``sizes`` rows: one key block for every segment, at
    most the shortest one (a shorter segment is padded to 16 rows); the splits from the config
    or :func:`default_num_splits`."""
    bk = min([config.block_k] + [max(MIN_BLOCK, 1 << (n.bit_length() - 1)) for n in sizes])
    capacity = sum(-(-n // bk) for n in sizes)
    return bk, config.num_splits or default_num_splits(batch, kv_heads, max(capacity, 1))


def default_num_splits(batch: int, kv_heads: int, capacity_blocks: int) -> int:
    """Enough splits for about TARGET_PROGRAMS programs, never more than the blocks a full cache
    could hold (an empty share costs a launch and a partial row of the combine)."""
    return max(1, min(capacity_blocks, -(-TARGET_PROGRAMS // (batch * kv_heads))))


def _kernel(pos_ref, *refs, segments, bk: int, scale2: float, num_splits: int,
            g: int, w: int, gp: int, exp2, pool=None):
    """refs: [valid (with ``pool``)], the query tile, (keys, values) per segment, then the
    partial output (Gp, D) and lse (Gp,), or (1, D) and (1,) for MHA, whose Gp rows are copies
    of its one query, [then the core keys and values, aliased to the core segment's inputs].

    ``segments``: static (kind, rows, real rows, ring) per segment (rows: padded to >= bk);
    kind "keys" (positions < t), "core" (slots j < start(t) / g) or "ring" (modulus ``ring``).
    ``pool``: the static arguments of ``pallas_decode_pool.pool_group``; program 0 of the split
    axis then pools (the group the new token completes) before its share of the attention: the
    grid keeps its P x B x Hkv programs (about two per SM, one wave)."""
    n = len(segments)
    if pool is not None:
        valid_ref, refs = refs[0], refs[1:]
    q_ref, refs = refs[0], refs[1:]
    t = pos_ref[()]
    split = pl.program_id(0)
    q = q_ref[...]  # the query_tile block: read once, for the pooling and the attention
    if pool is not None:
        from kernels.cca.pallas_decode_pool import pool_group

        ring = [seg[0] for seg in segments].index("ring")

        @pl.when(split == 0)
        def _():  # never read by this step's attention: the slot is not visible to its own token
            pool_group(t, valid_ref[()], lambda: q, refs[2 * ring], refs[2 * ring + 1],
                       refs[2 * n + 2], refs[2 * n + 3], **pool)

    o, lse = attend_share(t, query_rows(q, gp), refs[:2 * n], split, segments=segments,
                          bk=bk, scale2=scale2, num_splits=num_splits, g=g, w=w, exp2=exp2)
    o_ref, lse_ref = refs[2 * n], refs[2 * n + 1]
    o_ref[...], lse_ref[...] = partial_rows(o, lse, o_ref.shape[0])


def attend_share(t, q, kv_refs, split, *, segments, bk: int, scale2: float, num_splits: int,
                 g: int, w: int, exp2):
    """Share ``split`` of the visible key blocks (see :func:`_kernel`) for the query tile q
    (Gp, D): its normalised partial output (Gp, D) and base-2 log-sum-exp (Gp,), float32.
    ``kv_refs``: (keys, values) per segment."""
    n = len(segments)
    start = window_start(t, g, w) if g else None
    counts = []
    for kind, _, real, ring in segments:
        if kind == "keys":
            counts.append(jnp.minimum(t, real))
        elif kind == "core":
            counts.append(jnp.minimum(lax.div(start, g), real))
        else:
            counts.append(jnp.minimum(t, ring))
    blocks = [cdiv(c, bk) for c in counts]
    per = cdiv(functools.reduce(lambda a, b: a + b, blocks), num_splits)
    first = split * per
    carry = (jnp.zeros(q.shape, jnp.float32), jnp.full((q.shape[0],), NEG, jnp.float32),
             jnp.zeros((q.shape[0],), jnp.float32))

    offset = 0
    for (kind, rows, _, ring), count, nb, i in zip(segments, counts, blocks, range(n)):
        k_ref, v_ref = kv_refs[2 * i], kv_refs[2 * i + 1]

        def body(kb, carry, kind=kind, rows=rows, ring=ring, count=count, k_ref=k_ref,
                 v_ref=v_ref):
            lo = kb * bk
            base = jnp.minimum(lo, rows - bk)  # the last block ends at the segment's last row
            cols = base + jnp.arange(bk)
            mask = (cols >= lo) & (cols < count)
            if kind == "ring":
                held = (t - 1) - lax.rem(t - 1 - cols + ring, ring)
                mask = mask & (held >= start)
            sl = pl.ds(base, bk)
            scores = dot(q, k_ref[sl, :], trans_b=True)
            return online_softmax_update(carry, scores, v_ref[sl, :], scale2, mask[None, :],
                                         exp2)

        lo_block = jnp.clip(first - offset, 0, nb)
        hi_block = jnp.clip(first + per - offset, 0, nb)
        carry = lax.fori_loop(lo_block, hi_block, body, carry)
        offset = offset + nb

    acc, m, l = carry
    has = l > 0.0
    l_safe = jnp.where(has, l, 1.0)
    return acc / l_safe[:, None], jnp.where(has, m + jnp.log2(l_safe), NEG)


def partial_rows(o, lse, rows: int):
    """The rows of a partial that are stored: all Gp, or for MHA (``rows`` 1) one, since its Gp
    rows are equal; the combine then reads 1/Gp of them."""
    if rows < o.shape[0]:
        return jnp.max(o, axis=0, keepdims=True), jnp.max(lse, axis=0, keepdims=True)
    return o, lse


def supports(head_dim: int) -> bool:
    """Head dims the kernel takes: powers of two >= 16 (a ``pl.dot`` operand's width)."""
    return head_dim >= MIN_BLOCK and not head_dim & (head_dim - 1)


def _check(q, k_new, v_new, positions, caches):
    if q.ndim != 3 or k_new.ndim != 3 or v_new.ndim != 3:
        raise ValueError(
            "decode attention expects q (B, Hq, D) and k_new, v_new (B, Hkv, D); got shapes "
            f"q={tuple(q.shape)}, k_new={tuple(k_new.shape)}, v_new={tuple(v_new.shape)}")
    b, hq, d = q.shape
    hkv = k_new.shape[1]
    if k_new.shape != v_new.shape or k_new.shape[0] != b or k_new.shape[2] != d:
        raise ValueError(f"k_new {tuple(k_new.shape)} and v_new {tuple(v_new.shape)} must both be "
                         f"(B={b}, Hkv, D={d})")
    if hq % hkv:
        raise ValueError(f"number of query heads ({hq}) must be a multiple of kv heads ({hkv})")
    if not supports(d):
        raise ValueError(f"the Pallas decode kernel needs a power-of-two head dim >= 16; got {d}")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"q must be floating point; got {q.dtype}")
    for name, x in caches.items():
        if x.ndim != 4 or x.shape[0] != b or x.shape[2:] != (hkv, d):
            raise ValueError(f"{name} must be (B={b}, S, Hkv={hkv}, D={d}); got {tuple(x.shape)}")
        if x.dtype != q.dtype or k_new.dtype != q.dtype or v_new.dtype != q.dtype:
            raise ValueError(f"q, k_new, v_new and {name} must share one dtype; got {q.dtype}, "
                             f"{k_new.dtype}, {v_new.dtype}, {x.dtype}")
    if positions.shape != (b,) or not jnp.issubdtype(positions.dtype, jnp.integer):
        raise ValueError(f"positions must be ({b},) integers; got {positions.shape} "
                         f"{positions.dtype}")


def _decode(q, k_new, v_new, positions, segments, *, g, w, softmax_scale, config, interpret,
            pool=None):
    """segments: list of (kind, keys, values, ring modulus) with keys/values (B, S, Hkv, D).
    ``pool``: None, or (n_valid, pooling) to pool the group each new token completes into the
    core segment in the same launch (:func:`cca_decode_step`); then returns (out, core_k,
    core_v)."""
    b, hq, d = q.shape
    hkv = k_new.shape[1]
    grp = hq // hkv
    gp = padded_heads(grp)
    config = config or default_decode_config(d, jnp.dtype(q.dtype).itemsize)
    interpret = resolve_interpret(interpret)
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    segments = [s for s in segments if s[1].shape[1] > 0]
    if not segments:  # nothing cached can be visible: the new token attends to itself alone
        return jnp.repeat(v_new, grp, axis=1).astype(q.dtype)
    sizes = [s[1].shape[1] for s in segments]
    bk, splits = launch_plan(sizes, b, hkv, config)
    statics, arrays = [], []
    for kind, keys, values, ring in segments:
        real = keys.shape[1]
        if real < bk:
            keys, values = pad_to(keys, 1, bk), pad_to(values, 1, bk)
        statics.append((kind, keys.shape[1], real, ring))
        arrays += [keys, values]
    q_tile = query_tile(q, hkv)
    kernel = functools.partial(_kernel, segments=tuple(statics), bk=bk, scale2=scale * LOG2E,
                               num_splits=splits, g=g, w=w, gp=gp, exp2=exp2_for(interpret))
    kv_map = lambda s, bi, h: (bi, 0, h, 0)
    rows_out = gp if grp > 1 else 1  # partial rows written per program (see _kernel)
    scalar = pl.BlockSpec((None,), lambda s, bi, h: (bi,))
    kv_specs = [pl.BlockSpec((None, rows, None, d), kv_map) for _, rows, _, _ in statics
                for _ in "kv"]
    extra_in, extra_specs, extra_out, extra_out_specs, aliases = [], [], [], [], {}
    if pool is not None:  # program 0 of the split axis also pools
        n_valid, pooling = pool
        core = [st[0] for st in statics].index("core")
        core_k, core_v = arrays[2 * core], arrays[2 * core + 1]
        ring = statics[[st[0] for st in statics].index("ring")][3]
        kernel = functools.partial(kernel, pool=dict(
            g=g, n=core_k.shape[1], ring=ring, heads=grp, scale=scale, pooling=pooling))
        extra_in, extra_specs = [n_valid.astype(jnp.int32)], [scalar]
        extra_out = [jax.ShapeDtypeStruct(core_k.shape, core_k.dtype),
                     jax.ShapeDtypeStruct(core_v.shape, core_v.dtype)]
        extra_out_specs = kv_specs[2 * core: 2 * core + 2]
        aliases = {3 + 2 * core: 2, 4 + 2 * core: 3}  # inputs: pos, valid, q, segments...
    outs = call(
        kernel,
        grid=(splits, b, hkv),
        in_specs=[scalar, *extra_specs,
                  pl.BlockSpec((None, None, q_tile.shape[2], d), lambda s, bi, h: (bi, h, 0, 0))]
        + kv_specs,
        out_specs=[pl.BlockSpec((None, None, None, rows_out, d),
                                lambda s, bi, h: (s, bi, h, 0, 0)),
                   pl.BlockSpec((None, None, None, rows_out), lambda s, bi, h: (s, bi, h, 0))]
        + extra_out_specs,
        out_shape=[jax.ShapeDtypeStruct((splits, b, hkv, rows_out, d), jnp.float32),
                   jax.ShapeDtypeStruct((splits, b, hkv, rows_out), jnp.float32), *extra_out],
        inputs=[positions.astype(jnp.int32), *extra_in, q_tile, *arrays],
        aliases=aliases,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        interpret=interpret,
        name="cca_decode" if g else "full_decode",
    )
    out = _combine(q_tile, k_new, v_new, outs[0], outs[1], scale, interpret, grp)
    return out if pool is None else (out, outs[2], outs[3])


def padded_heads(grp: int) -> int:
    """Gp: the G query heads of a kv head padded to a power of two >= 16 (a ``pl.dot`` tile)."""
    return max(MIN_BLOCK, 1 << (grp - 1).bit_length())


def query_tile(q, hkv: int):
    """q (B, Hq, D) as (B, Hkv, rows, D): the G query heads of each kv head, padded with zero
    rows to Gp; with G = 1 (MHA) one row, which the kernels broadcast to Gp themselves (no pad
    kernel per layer and step). The decode pooling kernel reads the same array (one pad)."""
    b, hq, d = q.shape
    q = q.reshape(b, hkv, hq // hkv, d)
    return q if hq == hkv else pad_to(q, 2, padded_heads(hq // hkv))


def query_rows(q, gp: int):
    """The (Gp, D) query tile of a program from its :func:`query_tile` block (loaded), or from
    one query head (D,)."""
    if q.ndim == 1:
        q = q[None, :]
    return q if q.shape[0] == gp else jnp.broadcast_to(q, (gp, q.shape[1]))


UNROLL_SPLITS = 32  # the combine's loop over the splits is unrolled up to this many


def _combine_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, out_ref, *, splits: int, scale2: float,
                    gp: int, exp2):
    """Program (b, h): :func:`merge_with_new_token` of its G query heads."""
    out_ref[...] = merge_with_new_token(query_rows(q_ref[...], gp), k_ref[...], v_ref[...], o_ref,
                                        lse_ref, splits=splits, scale2=scale2,
                                        exp2=exp2).astype(out_ref.dtype)


def merge_with_new_token(q, k_new, v_new, o_ref, lse_ref, *, splits: int, scale2: float, exp2,
                         rows: int | None = None):
    """The output (Gp, D) float32 of one (sequence, kv head): the P partial softmaxes (o (P, Gp,
    D) normalised, lse (P, Gp) base 2; Gp = 1 for MHA) merged with the new token's own key and
    value (D,), given the (rotated) query tile q (Gp, D); with ``rows``, of the first ``rows``
    rows only (q then holds those). The loop is unrolled (its loads independent of one another)
    up to ``UNROLL_SPLITS`` splits."""
    q = q.astype(jnp.float32)
    k_new, v_new = k_new.astype(jnp.float32), v_new.astype(jnp.float32)
    s_new = jnp.sum(q * k_new[None, :], axis=1) * scale2  # (Gp,)
    # The new token is always visible: start from it (weight 1 at its own score), so the
    # running maximum is finite and a share without a visible key (lse -huge) adds exactly 0.
    carry = (s_new, jnp.ones_like(s_new), jnp.broadcast_to(v_new[None, :], q.shape))
    _, l, acc = merge_split_partials(carry, o_ref, lse_ref, 0, splits, UNROLL_SPLITS, exp2,
                                     rows)
    return acc / l[:, None]


def _combine(q_tile, k_new, v_new, o, lse, scale, interpret, grp: int):
    """Merges P partial softmaxes (o (P, B, Hkv, Gp, D) normalised, lse (P, B, Hkv, Gp) base 2;
    Gp = 1 for MHA) with the new token's own key and value: one small kernel of B x Hkv programs
    (as XLA ops it was about six kernels per layer and decode step). ``q_tile``:
    :func:`query_tile`."""
    b, hkv, rows, d = q_tile.shape
    splits, _, _, gp, _ = o.shape
    kernel = functools.partial(_combine_kernel, splits=splits, scale2=scale * LOG2E, gp=gp,
                               exp2=exp2_for(interpret))
    token = pl.BlockSpec((None, None, d), lambda bi, h: (bi, h, 0))
    tile = pl.BlockSpec((None, None, gp, d), lambda bi, h: (bi, h, 0, 0))
    [out] = call(
        kernel,
        grid=(b, hkv),
        in_specs=[pl.BlockSpec((None, None, rows, d), lambda bi, h: (bi, h, 0, 0)), token, token,
                  pl.BlockSpec((splits, None, None, gp, d), lambda bi, h: (0, bi, h, 0, 0)),
                  pl.BlockSpec((splits, None, None, gp), lambda bi, h: (0, bi, h, 0))],
        out_specs=[tile],
        out_shape=[jax.ShapeDtypeStruct((b, hkv, gp, d), q_tile.dtype)],
        inputs=[q_tile, k_new, v_new, o, lse],
        num_warps=4,
        num_stages=1,
        interpret=interpret,
        name="decode_combine",
    )
    return out[:, :, :grp].reshape(b, hkv * grp, d)


def full_decode_attention(
    q: Float[Array, "B Hq D"],
    k_new: Float[Array, "B Hkv D"],
    v_new: Float[Array, "B Hkv D"],
    k_cache: Float[Array, "B S Hkv D"],
    v_cache: Float[Array, "B S Hkv D"],
    positions: Int[Array, "B"],
    *,
    softmax_scale: float | None = None,
    config: DecodeConfig | None = None,
    interpret: bool | None = None,
) -> Float[Array, "B Hq D"]:
    """Causal full attention of one new token per sequence at position ``positions[b]``: one
    softmax over the cached rows ``s < positions[b]`` (position s at row s) and the new token.

    The cache may already hold the new token at row ``positions[b]`` or not: that row is not read.
    """
    _check(q, k_new, v_new, positions, {"k_cache": k_cache, "v_cache": v_cache})
    return _decode(q, k_new, v_new, positions, [("keys", k_cache, v_cache, 0)], g=0, w=0,
                   softmax_scale=softmax_scale, config=config, interpret=interpret)


def cca_decode_attention(
    q: Float[Array, "B Hq D"],
    k_new: Float[Array, "B Hkv D"],
    v_new: Float[Array, "B Hkv D"],
    core_k: Float[Array, "B N Hkv D"],
    core_v: Float[Array, "B N Hkv D"],
    ring_k: Float[Array, "B R Hkv D"],
    ring_v: Float[Array, "B R Hkv D"],
    positions: Int[Array, "B"],
    *,
    group_size: int,
    local_window: int,
    softmax_scale: float | None = None,
    config: DecodeConfig | None = None,
    interpret: bool | None = None,
) -> Float[Array, "B Hq D"]:
    """CCA attention of one new token per sequence at position ``t = positions[b]``: one softmax
    over the core slots j with ``(j + 1) g <= start(t)``, the ring slots holding a position in
    ``[start(t), t - 1]`` (slot s holds the latest position congruent to s mod R) and the new token.

    The ring must hold the whole local region, i.e. R >= w + g - 1 or R >= every position (as
    ``jax_cca.cache.ring_size`` sizes it); the core slots below start(t) / g must be pooled.
    """
    _check_cca(q, k_new, v_new, core_k, core_v, ring_k, ring_v, positions, group_size,
               local_window)
    ring = ring_k.shape[1]
    return _decode(q, k_new, v_new, positions,
                   [("core", core_k, core_v, 0), ("ring", ring_k, ring_v, ring)],
                   g=group_size, w=local_window, softmax_scale=softmax_scale, config=config,
                   interpret=interpret)


def _check_cca(q, k_new, v_new, core_k, core_v, ring_k, ring_v, positions, group_size: int,
               local_window: int) -> None:
    from kernels.cca.reference import check_cca_hparams

    check_cca_hparams(group_size, local_window)
    _check(q, k_new, v_new, positions, {"core_k": core_k, "core_v": core_v, "ring_k": ring_k,
                                        "ring_v": ring_v})
    if core_k.shape != core_v.shape or ring_k.shape != ring_v.shape or ring_k.shape[1] < 1:
        raise ValueError(f"core_k {core_k.shape} / core_v {core_v.shape} and ring_k "
                         f"{ring_k.shape} / ring_v {ring_v.shape} must match pairwise, R >= 1")


# Whether the model's decode step pools inside the attention's launch (cca_decode_step) where
# it can. H200, 7B at 128K, one process (ab_decode_step_s9b_h200.json): in the first attention
# program of each (sequence, kv head) 5.346 ms against 5.386 with the pooling kernel apart
# (faster in 13 of 15 rounds). As 32 extra programs instead (past one wave) it was 0.16 ms
# slower (ab_decode_step_s9_h200.json).
POOL_IN_ATTENTION = True


def fuses_pooling(core_slots: int, ring: int, head_dim: int, itemsize: int,
                  config: DecodeConfig | None = None) -> bool:
    """Whether :func:`cca_decode_step` can pool in the attention's launch: the core and ring
    segments need no padding to the key block (a padded copy cannot be written in place)."""
    bk = (config or default_decode_config(head_dim, itemsize)).block_k
    return min(core_slots, ring) >= bk


def cca_decode_step(
    q: Float[Array, "B Hq D"],
    k_new: Float[Array, "B Hkv D"],
    v_new: Float[Array, "B Hkv D"],
    core_k: Float[Array, "B N Hkv D"],
    core_v: Float[Array, "B N Hkv D"],
    ring_k: Float[Array, "B R Hkv D"],
    ring_v: Float[Array, "B R Hkv D"],
    positions: Int[Array, "B"],
    n_valid: Int[Array, "B"],
    *,
    group_size: int,
    local_window: int,
    pooling: str = "cca",
    softmax_scale: float | None = None,
    config: DecodeConfig | None = None,
    interpret: bool | None = None,
) -> tuple[Float[Array, "B Hq D"], Float[Array, "B N Hkv D"], Float[Array, "B N Hkv D"]]:
    """(out, core_k, core_v): ``pallas_decode_pool.pool_decode_step`` and
    :func:`cca_decode_attention` of one step in one launch. The first attention program of each
    (sequence, kv head) also pools the group the new token completes (it must already be in the
    ring) into its core slot, in place; that slot is never visible to the token that completes
    it (``(j + 1) g = t + 1 > start(t)``), so the attention's programs do not read it (their
    masked loads may, and weigh it 0). Saves a launch per layer and step. (Extra programs for
    the pooling instead made the grid 288 programs, past the one wave of about two per SM, and
    the 7B step 0.16 ms slower on an H200: ``ab_decode_step_s9_h200.json``.)
    Needs :func:`fuses_pooling`; the core arrays are updated in place when donated. Like every
    masked slot of a loaded block, the slot being pooled must hold a finite value (the caches'
    zeros or an earlier pooling): its weight is exactly 0, but 0 x NaN is not."""
    from kernels.cca import pallas_decode_pool

    d = q.shape[-1]
    if not fuses_pooling(core_k.shape[1], ring_k.shape[1], d, jnp.dtype(q.dtype).itemsize,
                         config):
        raise ValueError(f"cca_decode_step needs core slots ({core_k.shape[1]}) and ring "
                         f"({ring_k.shape[1]}) of at least a key block; use pool_decode_step "
                         f"and cca_decode_attention")
    pallas_decode_pool.check_pooling(group_size, d, ring_k.shape[1], pooling)
    _check_cca(q, k_new, v_new, core_k, core_v, ring_k, ring_v, positions, group_size,
               local_window)
    if n_valid.shape != positions.shape:
        raise ValueError(f"n_valid must be {positions.shape}; got {n_valid.shape}")
    ring = ring_k.shape[1]
    return _decode(q, k_new, v_new, positions,
                   [("core", core_k, core_v, 0), ("ring", ring_k, ring_v, ring)],
                   g=group_size, w=local_window, softmax_scale=softmax_scale, config=config,
                   interpret=interpret, pool=(n_valid, pooling))
