"""A CCA decode step of one layer in one Pallas GPU launch (Triton lowering): RoPE of the new
token's query and key, its key and value written to the ring, the pooling of the group it
completes, the split-K attention and, optionally, the merge of the splits.

Shape letters as in ``pallas_decode.py``; H3 = Hq + 2 Hkv heads of the fused QKV projection.

The model's step otherwise takes three launches per layer: ``pallas_rope_append`` (RoPE, ring
write, lengths), ``pallas_decode.cca_decode_step`` (pooling in the first program of each
(sequence, kv head), the attention's P shares) and ``pallas_decode``'s combine. On an H200 at
128K (7B, batch 1) the first and the last took 2.0 and 2.3 us per layer, each with about 1 us
between kernels (docs/perf-notes.md, 2026-12-03); issue 10's 80% of the bound needs about 4 us
per layer less than the 5.346 ms step of 2026-12-05.

Here every program of the attention's grid (P, B, Hkv) rotates its own query rows: ``x cos +
rotate_half(x) sin``, rotate_half from a second load of the rows with their halves swapped,
rounded as ``jax_cca.rope.apply_rope`` rounds (MHA: one head, broadcast to the Gp rows after).
Program (0, b, h) also rotates key head h, writes it and value head h to ring slot ``t mod R``,
waits for the whole program (a CTA barrier: the pooling reads that row back) and pools. The
other programs may load that slot and the pooled core slot meanwhile: neither is visible to the
new token, both hold finite values, so their weight is exactly 0 whichever they read.

``combine`` (counters given): each program stores its partial into a (P, rows, D) block shared
by the (sequence, kv head), waits for the CTA and adds 1 to the (sequence, kv head)'s counter
with an acquire-release atomic at GPU scope. The program that finds P - 1 there is the last: by
then every partial is visible to it, it merges them with the new token (``pallas_decode``'s
combine arithmetic) and puts the counter back to 0, so one zero array serves a step's layers in
turn. Without it, program (0, b, h) writes the rotated query tile and the rotated key and value
for ``pallas_decode``'s combine kernel (two launches).

Results equal the three-launch step's to the bit in 16-bit dtypes: the same roundings of the
rotation and the same attention and merge code (tests/kernels/test_cca_decode_fused.py). In
float32 the rotation's two products and their sum are not rounded in between, so a compiler
may fuse a multiply-add in one kernel and not in the other (within 1e-6). On CPU the kernel runs
through the Pallas interpreter (programs in sequence, so the last program of each counter is
the last split).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jaxtyping import Array, Float, Int

from kernels.cca import pallas_decode, pallas_decode_pool, pallas_rope_append
from kernels.cca.pallas_common import LOG2E, call, exp2_for, resolve_interpret

# The model's setting (jax_cca/decode.py): None keeps the three launches; "rope" the RoPE and
# ring write inside the attention's launch, the combine apart (two launches); "all" one launch,
# the default since its H200 A/B (perf-notes.md, thirteenth session: 5.151 ms per 128K step
# against 5.172 for "rope" and 5.215 for None).
STEP_LAUNCHES = "all"
MODES = (None, "rope", "all")


def check_mode(mode) -> None:
    if mode not in MODES:
        raise ValueError(f"pallas_decode_fused.STEP_LAUNCHES must be one of {MODES}; got {mode!r}")


def applies(core_slots: int, ring: int, head_dim: int, itemsize: int,
            config: pallas_decode.DecodeConfig | None = None) -> bool:
    """Whether :func:`cca_decode_step_rotating` takes a cache of these sizes: core slots (at
    least one), core and ring of at least a key block (``pallas_decode.fuses_pooling``), and a
    head dim that the rotation and the pooling take."""
    return (core_slots > 0 and pallas_rope_append.supports(head_dim)
            and pallas_decode.supports(head_dim)
            and pallas_decode.fuses_pooling(core_slots, ring, head_dim, itemsize, config))


def _rope(x, xs, cos, sin):
    """``apply_rope`` at one position of rows x (D,) or (R, D), given xs, the same rows with
    their halves swapped: cos, sin (D,) float32 cast to x's dtype, each product and the sum
    rounded to it; x's dtype."""
    d = cos.shape[0]
    col = lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    dt, f32 = x.dtype, jnp.float32
    rnd = lambda y: y.astype(dt).astype(f32)
    c, s = cos.astype(dt).astype(f32), sin.astype(dt).astype(f32)
    rot = jnp.where(col < d // 2, -xs.astype(f32), xs.astype(f32))  # [-x2, x1]
    return (rnd(x.astype(f32) * c) + rnd(rot * s)).astype(dt)


def _rope_head(x_ref, cos, sin):
    """:func:`_rope` of one head (D,) held by ``x_ref``; the swapped halves are a second load."""
    d = cos.shape[0]
    return _rope(x_ref[...], x_ref[(jnp.arange(d) + d // 2) % d], cos, sin)


def _head_rows(first, grp: int, gp: int, d: int):
    """(rows, columns, real) of the (Gp, D) tile of G query heads from ``first`` within a
    (H, D) block: rows first + r, clamped to the last real one (so every address is in bounds;
    for loads only: a masked store to repeated addresses is not a no-op in the interpreter),
    and the mask r < G of the real rows."""
    r = lax.broadcasted_iota(jnp.int32, (gp, d), 0)
    return first + jnp.minimum(r, grp - 1), lax.broadcasted_iota(jnp.int32, (gp, d), 1), r < grp


def _rope_heads(qkv_ref, first, cos, sin, grp: int, gp: int):
    """:func:`_rope` of the G query heads from ``first``, read from the (H3, D) block of the
    fused projections as a (Gp, D) tile whose rows past G are zero (masked loads: no padded
    copy)."""
    d = cos.shape[0]
    rows, cols, real = _head_rows(first, grp, gp, d)
    x = pltriton.load(qkv_ref.at[rows, cols], mask=real, other=0)
    xs = pltriton.load(qkv_ref.at[rows, (cols + d // 2) % d], mask=real, other=0)
    return _rope(x, xs, cos, sin)


def _kernel(*refs, n_in: int, segments, bk: int, scale2: float, num_splits: int, g: int,
            w: int, gp: int, limit: int, pool: dict, combine: bool, interpret: bool, exp2):
    """refs: inputs pos, valid, cos, sin, q (MHA: query head h (D,); GQA: the (H3, D) block of
    the fused projections), k, v (D,), core_k, core_v, ring_k, ring_v, lengths, [counter]; then
    outputs partial o, lse, core_k, core_v, ring_k, ring_v, lengths (the five aliased), then
    with ``combine`` the output rows of the kv head (MHA one; GQA G when a power of two, else
    Gp) and the counter (aliased), else the rotated query rows, key and value. Partial rows: Gp,
    or one for MHA (its Gp rows are equal)."""
    (pos_ref, valid_ref, cos_ref, sin_ref, q_ref, k_ref, v_ref, core_k_in, core_v_in, ring_k_in,
     ring_v_in) = refs[:11]
    o_ref, lse_ref, core_k, core_v, ring_k, ring_v, len_ref, *extra = refs[n_in:]
    split = pl.program_id(0)
    t, valid = pos_ref[()], valid_ref[()]
    cos, sin = cos_ref[...], sin_ref[...]
    grp = pool["heads"]
    first = pl.program_id(2) * grp  # the kv head's first query head
    if grp == 1:
        q_head = _rope_head(q_ref, cos, sin)
        q = pallas_decode.query_rows(q_head, gp)
    else:
        q = _rope_heads(q_ref, first, cos, sin, grp, gp)
    # The query's rows as the three-launch step stores them: MHA one (its Gp rows are equal).
    q_rows = lambda: q if grp > 1 else q_head[None, :]

    @pl.when(split == 0)
    def _():
        len_ref[()] = t + valid  # every (0, b, h) writes the same value
        k_new, v_new = _rope_head(k_ref, cos, sin), v_ref[...]

        @pl.when((valid > 0) & (t < limit))
        def _():
            row = pl.ds(lax.rem(t, ring_k.shape[0]), 1)
            ring_k[row, :] = k_new[None, :].astype(ring_k.dtype)
            ring_v[row, :] = v_new[None, :].astype(ring_v.dtype)

        if not interpret:  # the pooling below reads the row back (interpreted: in sequence)
            pltriton.debug_barrier()
        # The ring as written (the outputs: on the GPU the same memory as the inputs).
        pallas_decode_pool.pool_group(t, valid, q_rows, ring_k, ring_v, core_k, core_v, **pool)
        if not combine:
            q_out, k_out, v_out = extra
            q_out[...] = q_rows()
            k_out[...], v_out[...] = k_new, v_new

    o, lse = pallas_decode.attend_share(
        t, q, [core_k_in, core_v_in, ring_k_in, ring_v_in], split, segments=segments, bk=bk,
        scale2=scale2, num_splits=num_splits, g=g, w=w, exp2=exp2)
    o, lse = pallas_decode.partial_rows(o, lse, o_ref.shape[-2])
    if not combine:
        o_ref[...], lse_ref[...] = o, lse
        return
    out_ref, count_ref = extra
    o_ref[split], lse_ref[split] = o, lse
    if not interpret:  # every thread's partial stored before the count (released) goes up
        pltriton.debug_barrier()
    done = pltriton.atomic_add(count_ref, (jnp.int32(0),), jnp.int32(1))

    @pl.when(done == num_splits - 1)
    def _():  # the last of the P programs: every partial is written and visible (acquired)
        rows, q_merge = out_ref.shape[0], q_rows()
        if grp > 1 and rows == grp:  # G a power of two: merge the G real rows only
            q_merge = _rope_heads(q_ref, first, cos, sin, grp, grp)  # a tile of G rows
        out_ref[...] = pallas_decode.merge_with_new_token(
            q_merge, _rope_head(k_ref, cos, sin), v_ref[...], o_ref, lse_ref, splits=num_splits,
            scale2=scale2, exp2=exp2, rows=rows if grp > 1 else None).astype(out_ref.dtype)
        count_ref[0] = 0


def cca_decode_step_rotating(
    qkv: Float[Array, "B H3 D"],
    cos: Float[Array, "B D"],
    sin: Float[Array, "B D"],
    core_k: Float[Array, "B N Hkv D"],
    core_v: Float[Array, "B N Hkv D"],
    ring_k: Float[Array, "B R Hkv D"],
    ring_v: Float[Array, "B R Hkv D"],
    positions: Int[Array, "B"],
    n_valid: Int[Array, "B"],
    lengths: Int[Array, "B"],
    counters: Int[Array, "B Hkv"] | None = None,
    *,
    num_heads: int,
    group_size: int,
    local_window: int,
    max_len: int,
    pooling: str = "cca",
    softmax_scale: float | None = None,
    config: pallas_decode.DecodeConfig | None = None,
    interpret: bool | None = None,
) -> tuple:
    """(out (B, Hq, D), core_k, core_v, ring_k, ring_v, lengths[, counters]): one CCA decode
    step from the UN-rotated projections, as ``pallas_rope_append.rope_append`` (``modulus`` R,
    ``limit`` max_len) followed by ``pallas_decode.cca_decode_step``, in one launch with
    ``counters`` (B, Hkv) int32 zeros, returned zero again, or two without.

    ``qkv``: the query heads, then Hkv key and Hkv value heads; ``cos``, ``sin``:
    ``jax_cca.rope.rope_cos_sin`` at ``positions`` (float32). Needs :func:`applies`. The cache
    arrays, ``lengths`` (the layer's old lengths, never read: written ``positions + n_valid``)
    and ``counters`` are updated in place when the caller donates them."""
    b, h3, d = qkv.shape
    _, n, hkv, _ = core_k.shape
    r = ring_k.shape[1]
    hq, g, combine = num_heads, group_size, counters is not None
    pallas_rope_append.check_projections(qkv, cos, sin, hq, hkv)
    heads = lambda h: jax.ShapeDtypeStruct((b, h, d), qkv.dtype)
    pallas_decode._check_cca(heads(hq), heads(hkv), heads(hkv), core_k, core_v, ring_k, ring_v,
                             positions, g, local_window)
    pallas_decode_pool.check_pooling(g, d, r, pooling)
    itemsize = jnp.dtype(qkv.dtype).itemsize
    if not applies(n, r, d, itemsize, config):
        raise ValueError(f"the one-launch decode step needs core slots ({n}) and a ring ({r}) of "
                         f"at least a key block and a power-of-two head dim ({d})")
    if r < min(local_window + g - 1, max_len):  # as jax_cca.cache.ring_size sizes it
        raise ValueError(f"a ring of {r} slots cannot hold the local region of up to "
                         f"w + g - 1 = {local_window + g - 1} positions (max_len {max_len})")
    for name, x in (("n_valid", n_valid), ("lengths", lengths)):
        if x.shape != (b,):
            raise ValueError(f"{name} must be ({b},); got {x.shape}")
    if combine and (counters.shape != (b, hkv) or counters.dtype != jnp.int32):
        raise ValueError(f"counters must be ({b}, {hkv}) int32 zeros; got {counters.shape} "
                         f"{counters.dtype}")
    grp = hq // hkv
    gp = pallas_decode.padded_heads(grp)
    config = config or pallas_decode.default_decode_config(d, itemsize)
    interpret = resolve_interpret(interpret)
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    bk, splits = pallas_decode.launch_plan([n, r], b, hkv, config)
    pool = dict(g=g, n=n, ring=r, heads=grp, scale=scale, pooling=pooling)
    kernel = functools.partial(
        _kernel, n_in=12 + combine, segments=(("core", n, n, 0), ("ring", r, r, r)), bk=bk,
        scale2=scale * LOG2E, num_splits=splits, g=g, w=local_window, gp=gp, limit=max_len,
        pool=pool, combine=combine, interpret=interpret, exp2=exp2_for(interpret))

    scalar = pl.BlockSpec((None,), lambda s, bi, h: (bi,))
    vector = pl.BlockSpec((None, d), lambda s, bi, h: (bi, 0))
    head = lambda first: pl.BlockSpec((None, None, d), lambda s, bi, h: (bi, first + h, 0))
    kv = lambda rows: pl.BlockSpec((None, rows, None, d), lambda s, bi, h: (bi, 0, h, 0))
    tile = lambda rows: pl.BlockSpec((None, None, rows, d), lambda s, bi, h: (bi, h, 0, 0))
    # MHA: query head h; GQA: the whole (H3, D) block, whose G rows of kv head h the kernel
    # loads masked into a (Gp, D) tile (no padded copy in XLA).
    q_spec = head(0) if grp == 1 else pl.BlockSpec((None, h3, d), lambda s, bi, h: (bi, 0, 0))
    rows_out = gp if grp > 1 else 1
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    same = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
    inputs = [positions.astype(jnp.int32), n_valid.astype(jnp.int32), cos.astype(jnp.float32),
              sin.astype(jnp.float32), qkv, qkv, qkv, core_k, core_v, ring_k, ring_v,
              lengths.astype(jnp.int32)]
    in_specs = [scalar, scalar, vector, vector, q_spec, head(hq), head(hq + hkv), kv(n), kv(n),
                kv(r), kv(r), scalar]
    out_shape = [f32(splits, b, hkv, rows_out, d), f32(splits, b, hkv, rows_out), same(core_k),
                 same(core_v), same(ring_k), same(ring_v), jax.ShapeDtypeStruct((b,), jnp.int32)]
    out_specs = [kv(n), kv(n), kv(r), kv(r), scalar]
    aliases = {7: 2, 8: 3, 9: 4, 10: 5, 11: 6}
    if combine:  # each program sees all P partials of its (sequence, kv head)
        count = pl.BlockSpec((None, 1), lambda s, bi, h: (bi, h))  # a (1,) ref
        if grp & (grp - 1) == 0:  # G rows per kv head, as (B, Hkv, G, D) = (B, Hq, D)
            out_spec, out_dims = tile(grp), (b, hkv, grp, d)
        else:  # Gp rows; the G real ones sliced out after
            out_spec, out_dims = tile(gp), (b, hkv, gp, d)
        inputs.append(counters)
        in_specs.append(count)
        out_specs = [pl.BlockSpec((splits, None, None, rows_out, d),
                                  lambda s, bi, h: (0, bi, h, 0, 0)),
                     pl.BlockSpec((splits, None, None, rows_out), lambda s, bi, h: (0, bi, h, 0)),
                     *out_specs, out_spec, count]
        out_shape += [jax.ShapeDtypeStruct(out_dims, qkv.dtype), same(counters)]
        aliases[12] = 8
    else:
        out_specs = [pl.BlockSpec((None, None, None, rows_out, d),
                                  lambda s, bi, h: (s, bi, h, 0, 0)),
                     pl.BlockSpec((None, None, None, rows_out), lambda s, bi, h: (s, bi, h, 0)),
                     *out_specs, tile(rows_out), head(0), head(0)]
        out_shape += [jax.ShapeDtypeStruct((b, hkv, rows_out, d), qkv.dtype),
                      jax.ShapeDtypeStruct((b, hkv, d), qkv.dtype),
                      jax.ShapeDtypeStruct((b, hkv, d), qkv.dtype)]
    outs = call(kernel, grid=(splits, b, hkv), in_specs=in_specs, out_specs=out_specs,
                out_shape=out_shape, inputs=inputs, aliases=aliases,
                num_warps=config.num_warps, num_stages=config.num_stages, interpret=interpret,
                name="cca_decode_step")
    caches = tuple(outs[2:7])
    if combine:
        return (outs[7][:, :, :grp].reshape(b, hq, d), *caches, outs[8])
    out = pallas_decode._combine(outs[7], outs[8], outs[9], outs[0], outs[1], scale, interpret,
                                 grp)
    return (out, *caches)
