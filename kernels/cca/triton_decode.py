"""Decode attention as plain Triton kernels for PyTorch tensors: the twin of ``pallas_decode.py``.

One new query token per sequence at position ``t = positions[b]`` against a decode cache
(``jax_cca/cache.py``): full attention over the rows ``s < t`` of ``k, v (B, S, Hkv, D)``, or CCA
over the visible core slots ``(B, N, Hkv, D)`` and the ring ``(B, R, Hkv, D)``, plus the new
token's own key and value. Visibility, as in ``pallas_decode.py``:

* full: row s iff ``s < t``;
* CCA core: slot j iff ``(j + 1) g <= start(t)``, ``start(t) = max(t - w + 1, 0) // g * g``;
* CCA ring: slot s holds position ``t - 1 - ((t - 1 - s) mod R)``; visible iff that lies in
  ``[start(t), t - 1]`` and s < min(t, R).

Written independently of the Pallas kernel, so each checks the other (tests/parity): the grid is
(Hkv, B, P) and split p takes the key blocks p, p + P, p + 2P, ... of every segment (Pallas: one
contiguous share of the segments laid end to end); blocks are loaded with masks (Pallas shifts the
last block back); the online softmax is in base e; each program writes its unnormalised partial
(acc, row max, row sum) and the merge with the new token is torch float32 math.

On a GPU the kernel is compiled; on CPU it runs through the Triton interpreter, which must be
switched on (``TRITON_INTERPRET=1``) before this module is imported.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.cca.triton import check_runnable
from kernels.triton_common import INTERPRET  # noqa: F401  (whether the kernel is interpreted)
from kernels.triton_common import dot as _dot
from kernels.triton_common import dot_mode as _dot_mode
from kernels.triton_common import output as _output
from kernels.triton_common import poison_outputs  # noqa: F401  (public here too)

NEG: tl.constexpr = tl.constexpr(-1.0e30)  # finite "minus infinity" of an empty row


@triton.jit
def _segment(acc, m, l, q, K, V, kv_base, stride_s, n_rows, count, t, start, ring,
             split, offs_d, scale, RING: tl.constexpr, BK: tl.constexpr, P: tl.constexpr,
             DOT: tl.constexpr):
    """Online softmax (base e) of the query rows over blocks split, split + P, ... of one
    segment; ``count`` rows from the start can hold a visible key."""
    for blk in range(split, tl.cdiv(count, BK), P):
        rows = blk * BK + tl.arange(0, BK)
        ok = (rows < count) & (rows < n_rows)
        if RING:
            held = t - 1 - ((t - 1 - rows + ring) % ring)
            ok = ok & (held >= start)
        ptr = kv_base + rows[:, None] * stride_s + offs_d[None, :]
        k = tl.load(K + ptr, mask=ok[:, None], other=0.0)
        v = tl.load(V + ptr, mask=ok[:, None], other=0.0)
        s = _dot(q, tl.trans(k), DOT) * scale
        s = tl.where(ok[None, :], s, NEG)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.where(ok[None, :], tl.exp(s - m_new[:, None]), 0.0)
        alpha = tl.exp(m - m_new)
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT)
        m = m_new
    return acc, m, l


@triton.jit
def _decode_kernel(Q, POS, K0, V0, K1, V1, ACC, M, L,
                   sq_b, sq_h, s0_b, s0_s, s0_h, s1_b, s1_s, s1_h, n0, n1, ring, scale,
                   G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr,
                   WINDOW: tl.constexpr, CCA: tl.constexpr, BK: tl.constexpr, P: tl.constexpr,
                   DOT: tl.constexpr):
    """Program (h, b, p). Full: segment 0 is the cache (rows < t). CCA: segment 0 the core slots,
    segment 1 the ring. Writes acc (GP, D), row max and row sum of its share."""
    h = tl.program_id(0)
    b = tl.program_id(1)
    p = tl.program_id(2)
    t = tl.load(POS + b)
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b * sq_b + (h * G + offs_g)[:, None] * sq_h + offs_d[None, :],
                mask=(offs_g < G)[:, None], other=0.0)
    acc = tl.zeros((GP, D), tl.float32)
    m = tl.full((GP,), NEG, tl.float32)
    l = tl.zeros((GP,), tl.float32)
    if CCA:
        start = tl.maximum(t - WINDOW + 1, 0) // GROUP * GROUP
        acc, m, l = _segment(acc, m, l, q, K0, V0, b * s0_b + h * s0_h, s0_s, n0,
                             tl.minimum(start // GROUP, n0), t, start, 1, p, offs_d, scale,
                             False, BK, P, DOT)
        acc, m, l = _segment(acc, m, l, q, K1, V1, b * s1_b + h * s1_h, s1_s, n1,
                             tl.minimum(t, n1), t, start, ring, p, offs_d, scale,
                             True, BK, P, DOT)
    else:
        acc, m, l = _segment(acc, m, l, q, K0, V0, b * s0_b + h * s0_h, s0_s, n0,
                             tl.minimum(t, n0), t, 0, 1, p, offs_d, scale, False, BK, P, DOT)
    row = (p * tl.num_programs(1) + b) * tl.num_programs(0) + h
    tl.store(ACC + (row * GP + offs_g)[:, None] * D + offs_d[None, :], acc)
    tl.store(M + row * GP + offs_g, m)
    tl.store(L + row * GP + offs_g, l)


def _check(q, k_new, v_new, positions, caches: dict) -> None:
    if q.ndim != 3 or k_new.ndim != 3 or k_new.shape != v_new.shape:
        raise ValueError(f"decode attention expects q (B, Hq, D) and k_new, v_new (B, Hkv, D); "
                         f"got {tuple(q.shape)}, {tuple(k_new.shape)}, {tuple(v_new.shape)}")
    b, hq, d = q.shape
    hkv = k_new.shape[1]
    if k_new.shape[0] != b or k_new.shape[2] != d or hq % hkv:
        raise ValueError(f"k_new {tuple(k_new.shape)} must be (B={b}, Hkv, D={d}) with Hkv "
                         f"dividing Hq={hq}")
    if d < 16 or d & (d - 1):
        raise ValueError(f"the Triton decode kernel needs a power-of-two head dim >= 16; got {d}")
    for name, x in caches.items():
        if x.ndim != 4 or x.shape[0] != b or tuple(x.shape[2:]) != (hkv, d):
            raise ValueError(f"{name} must be (B={b}, S, Hkv={hkv}, D={d}); got {tuple(x.shape)}")
        if x.dtype != q.dtype or k_new.dtype != q.dtype or v_new.dtype != q.dtype:
            raise ValueError(f"q, k_new, v_new and {name} must share one dtype; got {q.dtype}, "
                             f"{k_new.dtype}, {v_new.dtype}, {x.dtype}")
    if tuple(positions.shape) != (b,) or positions.dtype.is_floating_point:
        raise ValueError(f"positions must be ({b},) integers; got {tuple(positions.shape)} "
                         f"{positions.dtype}")
    check_runnable(q)


def _decode(q, k_new, v_new, positions, seg0, seg1, *, group_size: int, local_window: int,
            softmax_scale: float | None, num_splits: int, block_k: int) -> torch.Tensor:
    b, hq, d = q.shape
    hkv = k_new.shape[1]
    grp = hq // hkv
    gp = max(16, 1 << (grp - 1).bit_length())
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    k0, v0 = (x.contiguous() for x in seg0)
    k1, v1 = (x.contiguous() for x in (seg1 if seg1 is not None else seg0))
    q = q.contiguous()
    pos = positions.to(device=q.device, dtype=torch.int32).contiguous()
    programs = num_splits * b * hkv
    acc = _output((programs * gp, d), torch.float32, q.device)
    m = _output((programs * gp,), torch.float32, q.device)
    l = _output((programs * gp,), torch.float32, q.device)
    _decode_kernel[(hkv, b, num_splits)](
        q, pos, k0, v0, k1, v1, acc, m, l,
        q.stride(0), q.stride(1), k0.stride(0), k0.stride(1), k0.stride(2),
        k1.stride(0), k1.stride(1), k1.stride(2), k0.shape[1], k1.shape[1],
        max(k1.shape[1], 1), scale,
        G=grp, GP=gp, D=d, GROUP=max(group_size, 1), WINDOW=max(local_window, 1),
        CCA=seg1 is not None, BK=block_k, P=num_splits, DOT=_dot_mode(q), num_warps=4)
    # Merge the P partials with the new token's own key and value (float32, base e).
    acc = acc.view(num_splits, b, hkv, gp, d)[:, :, :, :grp]
    m = m.view(num_splits, b, hkv, gp)[:, :, :, :grp]
    l = l.view(num_splits, b, hkv, gp)[:, :, :, :grp]
    qf = q.float().view(b, hkv, grp, d)
    s_new = (qf * k_new.float()[:, :, None, :]).sum(-1) * scale  # (B, Hkv, G)
    top = torch.maximum(s_new, m.amax(0))
    w_new, w = torch.exp(s_new - top), torch.exp(m - top)  # empty shares: m = -1e30 -> 0
    num = w_new[..., None] * v_new.float()[:, :, None, :] + (w[..., None] * acc).sum(0)
    out = num / (w_new + (w * l).sum(0))[..., None]
    return out.reshape(b, hq, d).to(q.dtype)


def full_decode_attention(q, k_new, v_new, k_cache, v_cache, positions, *,
                          softmax_scale: float | None = None, num_splits: int = 4,
                          block_k: int = 32) -> torch.Tensor:
    """Causal full attention of one new token per sequence (q (B, Hq, D), k_new, v_new
    (B, Hkv, D)) over the cache rows ``s < positions[b]`` of ``k_cache, v_cache (B, S, Hkv, D)``
    and itself; (B, Hq, D) in q's dtype."""
    _check(q, k_new, v_new, positions, {"k_cache": k_cache, "v_cache": v_cache})
    return _decode(q, k_new, v_new, positions, (k_cache, v_cache), None, group_size=1,
                   local_window=1, softmax_scale=softmax_scale, num_splits=num_splits,
                   block_k=block_k)


def cca_decode_attention(q, k_new, v_new, core_k, core_v, ring_k, ring_v, positions, *,
                         group_size: int, local_window: int, softmax_scale: float | None = None,
                         num_splits: int = 4, block_k: int = 32) -> torch.Tensor:
    """CCA attention of one new token per sequence over the visible core slots
    ``core_k, core_v (B, N, Hkv, D)``, the ring slots ``ring_k, ring_v (B, R, Hkv, D)`` holding a
    position in ``[start(t), t - 1]`` and itself; (B, Hq, D) in q's dtype. The ring must hold
    the whole local region (R >= w + g - 1, or R >= every position)."""
    if group_size < 1 or local_window < group_size or local_window % group_size:
        raise ValueError(f"local_window ({local_window}) must be a positive multiple of "
                         f"group_size ({group_size})")
    _check(q, k_new, v_new, positions, {"core_k": core_k, "core_v": core_v, "ring_k": ring_k,
                                        "ring_v": ring_v})
    if core_k.shape != core_v.shape or ring_k.shape != ring_v.shape or ring_k.shape[1] < 1:
        raise ValueError(f"core_k {tuple(core_k.shape)} / core_v {tuple(core_v.shape)} and "
                         f"ring_k {tuple(ring_k.shape)} / ring_v {tuple(ring_v.shape)} must "
                         f"match pairwise, R >= 1")
    return _decode(q, k_new, v_new, positions, (core_k, core_v), (ring_k, ring_v),
                   group_size=group_size, local_window=local_window,
                   softmax_scale=softmax_scale, num_splits=num_splits, block_k=block_k)
