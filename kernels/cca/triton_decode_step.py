"""The small kernels of a decode step as plain Triton kernels for PyTorch tensors: the twins of
``pallas_rope_append.py`` (RoPE of the new token's q and k, and the cache write) and
``pallas_decode_pool.py`` (the pooling of a group the new token completes).

Shape letters as in ``pallas_decode.py``: B batch, Hq query heads, Hkv kv heads, D head dim, S
rows of a cache buffer (full attention: every position; CCA: the ring, R rows), N core slots.

Written separately from the Pallas kernels and checked against them (tests/parity): the grids
are (heads, B) instead of (B, heads); the pooling takes any group size (rows masked up to a power
of two) and returns new core arrays (torch tensors are not donated) instead of writing in place.
The arithmetic is the one both must match: RoPE rounds each product and the sum to x's dtype, as
``jax_cca.rope.apply_rope``; pooling is ``kernels.cca.reference.pool_core_tokens`` in float32.

On a GPU the kernels are compiled; on CPU they run through the Triton interpreter, which must be
switched on (``TRITON_INTERPRET=1``) before this module is imported.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.cca.triton import check_runnable
from kernels.triton_common import INTERPRET  # noqa: F401  (whether the kernels are interpreted)
from kernels.triton_common import output as _output
from kernels.triton_common import poison_outputs  # noqa: F401  (public here too)


# ------------------------------------------------------------------------------ RoPE + append
@triton.jit
def _rope_append_kernel(X, COS, SIN, POS, VALID, QO, KO, VO, KB, VB, LENGTHS,
                        sx_b, sx_h, sq_b, sq_h, sk_b, sk_h, sb_b, sb_s, sb_h, modulus, limit,
                        HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr):
    """Program (i, b): i < HQ rotates query head i; i >= HQ rotates key head h = i - HQ, copies
    value head h and, if VALID[b] > 0 and POS[b] < limit, writes both to row POS[b] % modulus
    of the buffers. Program (0, b) stores the new length POS[b] + VALID[b]."""
    i = tl.program_id(0)
    b = tl.program_id(1)
    pos = tl.load(POS + b)
    valid = tl.load(VALID + b)
    if i == 0:
        tl.store(LENGTHS + b, pos + valid)
    lo = tl.arange(0, HALF)
    x_row = X + b * sx_b + i * sx_h
    x1 = tl.load(x_row + lo)
    x2 = tl.load(x_row + HALF + lo)
    dt = x1.dtype
    c1 = tl.load(COS + b * 2 * HALF + lo).to(dt).to(tl.float32)
    c2 = tl.load(COS + b * 2 * HALF + HALF + lo).to(dt).to(tl.float32)
    s1 = tl.load(SIN + b * 2 * HALF + lo).to(dt).to(tl.float32)
    s2 = tl.load(SIN + b * 2 * HALF + HALF + lo).to(dt).to(tl.float32)
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    r1 = ((f1 * c1).to(dt).to(tl.float32) + (-f2 * s1).to(dt).to(tl.float32)).to(dt)
    r2 = ((f2 * c2).to(dt).to(tl.float32) + (f1 * s2).to(dt).to(tl.float32)).to(dt)
    if i < HQ:
        tl.store(QO + b * sq_b + i * sq_h + lo, r1)
        tl.store(QO + b * sq_b + i * sq_h + HALF + lo, r2)
    else:
        h = i - HQ
        v_row = X + b * sx_b + (HQ + HKV + h) * sx_h
        v1 = tl.load(v_row + lo)
        v2 = tl.load(v_row + HALF + lo)
        out = b * sk_b + h * sk_h
        tl.store(KO + out + lo, r1)
        tl.store(KO + out + HALF + lo, r2)
        tl.store(VO + out + lo, v1)
        tl.store(VO + out + HALF + lo, v2)
        if (valid > 0) & (pos < limit):
            row = b * sb_b + (pos % modulus) * sb_s + h * sb_h
            tl.store(KB + row + lo, r1)
            tl.store(KB + row + HALF + lo, r2)
            tl.store(VB + row + lo, v1)
            tl.store(VB + row + HALF + lo, v2)


def rope_append(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_buf: torch.Tensor,
                v_buf: torch.Tensor, positions: torch.Tensor, n_valid: torch.Tensor,
                lengths: torch.Tensor | None = None, *, num_heads: int, modulus: int,
                limit: int | None = None):
    """(q (B, Hq, D), k, v (B, Hkv, D), k_buf, v_buf, lengths (B,)) from the un-rotated ``qkv``
    (B, Hq + 2 Hkv, D) and the step's cos, sin (B, D): q and k rotated; for every b with
    ``n_valid[b] > 0`` and ``positions[b] < limit`` (default: the buffers' rows), k and v also
    written to row ``positions[b] % modulus`` of copies of the buffers (B, S, Hkv, D); lengths =
    positions + n_valid (``lengths``, the old ones, is not read: torch tensors are not donated)."""
    del lengths
    if qkv.ndim != 3 or k_buf.ndim != 4 or k_buf.shape != v_buf.shape:
        raise ValueError(f"expected qkv (B, Hq + 2 Hkv, D) and buffers (B, S, Hkv, D); got "
                         f"{tuple(qkv.shape)}, {tuple(k_buf.shape)}, {tuple(v_buf.shape)}")
    b, h3, d = qkv.shape
    hkv = k_buf.shape[2]
    if h3 != num_heads + 2 * hkv or k_buf.shape[0] != b or k_buf.shape[3] != d:
        raise ValueError(f"qkv {tuple(qkv.shape)} must hold {num_heads} + 2 x {hkv} heads of the "
                         f"buffers' batch and head dim {tuple(k_buf.shape)}")
    if d < 2 or d & (d - 1):
        raise ValueError(f"the Triton RoPE/append kernel needs a power-of-two head dim; got {d}")
    if tuple(cos.shape) != (b, d) or tuple(sin.shape) != (b, d) or modulus < 1:
        raise ValueError(f"cos and sin must be ({b}, {d}) and modulus >= 1; got "
                         f"{tuple(cos.shape)}, {tuple(sin.shape)}, {modulus}")
    if k_buf.dtype != qkv.dtype or v_buf.dtype != qkv.dtype:
        raise ValueError(f"buffers must have qkv's dtype {qkv.dtype}; got {k_buf.dtype}")
    if tuple(positions.shape) != (b,) or tuple(n_valid.shape) != (b,):
        raise ValueError(f"positions and n_valid must be ({b},); got {tuple(positions.shape)} "
                         f"and {tuple(n_valid.shape)}")
    limit = k_buf.shape[1] if limit is None else limit
    check_runnable(qkv)
    qkv = qkv.contiguous()
    k_buf, v_buf = k_buf.clone().contiguous(), v_buf.clone().contiguous()
    q = _output((b, num_heads, d), qkv.dtype, qkv.device)
    k = _output((b, hkv, d), qkv.dtype, qkv.device)
    v = _output((b, hkv, d), qkv.dtype, qkv.device)
    new_lengths = _output((b,), torch.int32, qkv.device)
    _rope_append_kernel[(num_heads + hkv, b)](
        qkv, cos.float().contiguous(), sin.float().contiguous(),
        positions.to(torch.int32).contiguous(), n_valid.to(torch.int32).contiguous(),
        q, k, v, k_buf, v_buf, new_lengths, qkv.stride(0), qkv.stride(1), q.stride(0),
        q.stride(1), k.stride(0), k.stride(1), k_buf.stride(0), k_buf.stride(1), k_buf.stride(2),
        modulus, limit, HQ=num_heads, HKV=hkv, HALF=d // 2, num_warps=1)
    return q, k, v, k_buf, v_buf, new_lengths


# ------------------------------------------------------------------------------ pooling
@triton.jit
def _pool_kernel(Q, RK, RV, POS, VALID, CK, CV,
                 sq_b, sq_h, sr_b, sr_s, sr_h, sc_b, sc_s, sc_h, n_slots, ring, scale,
                 HEADS: tl.constexpr, HP: tl.constexpr, GROUP: tl.constexpr,
                 GP: tl.constexpr, D: tl.constexpr, POOLING: tl.constexpr):
    """Program (h, b): if the token at POS[b] completes group j (and is valid, and slot j
    exists), pools the group's GROUP ring rows of kv head h into core slot j. POOLING 0: cca
    (softmax over the group of mean-query . key x scale), 1: mean, 2: max."""
    h = tl.program_id(0)
    b = tl.program_id(1)
    t = tl.load(POS + b)
    j = t // GROUP
    if (tl.load(VALID + b) > 0) & ((t + 1) % GROUP == 0) & (j < n_slots):
        offs_r = tl.arange(0, GP)
        offs_d = tl.arange(0, D)
        ok = offs_r < GROUP
        rows = (j * GROUP + offs_r) % ring
        ptr = b * sr_b + rows[:, None] * sr_s + h * sr_h + offs_d[None, :]
        keys = tl.load(RK + ptr, mask=ok[:, None], other=0.0).to(tl.float32)
        values = tl.load(RV + ptr, mask=ok[:, None], other=0.0).to(tl.float32)
        if POOLING == 1:
            kc = tl.sum(keys, axis=0) / GROUP
            vc = tl.sum(values, axis=0) / GROUP
        elif POOLING == 2:
            kc = tl.max(tl.where(ok[:, None], keys, float("-inf")), axis=0)
            vc = tl.max(tl.where(ok[:, None], values, float("-inf")), axis=0)
        else:
            offs_h = tl.arange(0, HP)
            qs = tl.load(Q + b * sq_b + (h * HEADS + offs_h)[:, None] * sq_h + offs_d[None, :],
                         mask=(offs_h < HEADS)[:, None], other=0.0).to(tl.float32)
            q_pool = tl.sum(qs, axis=0) / HEADS
            s = tl.sum(keys * q_pool[None, :], axis=1) * scale
            s = tl.where(ok, s, float("-inf"))
            p = tl.exp(s - tl.max(s, axis=0))
            p = p / tl.sum(p, axis=0)
            kc = tl.sum(p[:, None] * keys, axis=0)
            vc = tl.sum(p[:, None] * values, axis=0)
        out = b * sc_b + j * sc_s + h * sc_h + offs_d
        tl.store(CK + out, kc.to(CK.dtype.element_ty))
        tl.store(CV + out, vc.to(CV.dtype.element_ty))


POOLINGS = {"cca": 0, "mean": 1, "max": 2}


def pool_decode_step(q: torch.Tensor, ring_k: torch.Tensor, ring_v: torch.Tensor,
                     core_k: torch.Tensor, core_v: torch.Tensor, positions: torch.Tensor,
                     n_valid: torch.Tensor, *, group_size: int, pooling: str = "cca",
                     softmax_scale: float | None = None):
    """(core_k, core_v) copies with the core token of group ``positions[b] // g`` written for
    every sequence b whose new token (already in the ring, ``n_valid[b] > 0``) completes that
    group and whose slot exists; every other row as given. The ring holds whole groups
    (R a multiple of g)."""
    b, hq, d = q.shape
    _, r, hkv, _ = ring_k.shape
    g = group_size
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be 'cca', 'mean' or 'max'; got {pooling!r}")
    if g < 1 or r % g or d < 1 or d & (d - 1) or hq % hkv:
        raise ValueError(f"the Triton pooling kernel needs a power-of-two head dim ({d}), a ring "
                         f"of whole groups (R = {r}, g = {g}) and Hkv ({hkv}) dividing Hq ({hq})")
    if ring_k.shape != ring_v.shape or core_k.shape != core_v.shape or core_k.shape[0] != b:
        raise ValueError(f"ring {tuple(ring_k.shape)}/{tuple(ring_v.shape)} and core "
                         f"{tuple(core_k.shape)}/{tuple(core_v.shape)} must match pairwise")
    check_runnable(q)
    core_k, core_v = core_k.clone().contiguous(), core_v.clone().contiguous()
    n = core_k.shape[1]
    if n == 0:
        return core_k, core_v
    heads = hq // hkv
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    q, ring_k, ring_v = (x.contiguous() for x in (q, ring_k, ring_v))
    _pool_kernel[(hkv, b)](
        q, ring_k, ring_v, positions.to(torch.int32).contiguous(),
        n_valid.to(torch.int32).contiguous(), core_k, core_v,
        q.stride(0), q.stride(1), ring_k.stride(0), ring_k.stride(1), ring_k.stride(2),
        core_k.stride(0), core_k.stride(1), core_k.stride(2), n, r, scale,
        HEADS=heads, HP=triton.next_power_of_2(heads), GROUP=g,
        GP=max(2, triton.next_power_of_2(g)), D=d, POOLING=POOLINGS[pooling], num_warps=4)
    return core_k, core_v
