"""Plain PyTorch (float32) reference for ReAttention: the twin of reference.py.

Same function, shape letters and stages (README.md in this folder): ``score_topk`` (each row's
top_k middle keys by raw q . k, ties to the lower position), ``select_from_picks`` (votes, the
most-voted keys, spans, the gathered list), ``attend_gathered`` (RoPE at the re-numbered positions
0 .. n-1, causal softmax attention). ``rope_cos_sin`` / ``apply_rope`` are the torch twins of
``jax_cca/rope.py`` (LLaMA "rotate half" layout, angles in float32).

Multi-key sorts are chains of stable sorts (least significant key first). Integer tensors are
int64 (torch indexing). Everything is computed in float32 and returned in the query dtype.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kernels.reattention.params import Geometry, Selection, geometry

KEY_BLOCK = 512
INT_MAX = int(np.iinfo(np.int32).max)


# ----------------------------------------------------------------------------- arguments
def check_args(q, k, v) -> None:
    """Raises ValueError naming the problem for inputs ReAttention does not define."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            "reattention expects q (B, T, Hq, D) and k, v (B, S, Hkv, D); got shapes "
            f"q={tuple(q.shape)}, k={tuple(k.shape)}, v={tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got k={tuple(k.shape)}, "
                         f"v={tuple(v.shape)}")
    b, t, hq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head dim")
    if t < 1 or k.shape[1] < t:
        raise ValueError(f"need 1 <= T <= S (queries are the last T positions); got T={t}, "
                         f"S={k.shape[1]}")
    if k.shape[2] == 0 or hq % k.shape[2]:
        raise ValueError(
            f"number of query heads ({hq}) must be a multiple of kv heads ({k.shape[2]})")
    if d % 2:
        raise ValueError(f"head dim must be even for rotary embeddings; got {d}")
    if not (q.dtype.is_floating_point and q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")


def default_inv_freq(head_dim: int, rope_theta: float = 10000.0) -> np.ndarray:
    """The D/2 rotary inverse frequencies in float32 (LLaMA default, no scaling)."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (1.0 / (np.float32(rope_theta) ** exponents)).astype(np.float32)


def resolve_inv_freq(head_dim: int, rope_theta: float, inv_freq) -> np.ndarray:
    if inv_freq is None:
        return default_inv_freq(head_dim, rope_theta)
    inv_freq = np.asarray(inv_freq.cpu() if torch.is_tensor(inv_freq) else inv_freq, np.float32)
    if inv_freq.shape != (head_dim // 2,):
        raise ValueError(f"inv_freq must have shape ({head_dim // 2},); got {inv_freq.shape}")
    return inv_freq


def softmax_scale_or_default(head_dim: int, softmax_scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)


def query_starts(q_start, batch: int, num_keys: int, num_queries: int, device) -> torch.Tensor:
    """(B,) int64 position of each batch element's first query (default S - T)."""
    if q_start is None:
        return torch.full((batch,), num_keys - num_queries, dtype=torch.int64, device=device)
    return torch.as_tensor(q_start, dtype=torch.int64, device=device).expand(batch).clone()


def voting_ends(c1: torch.Tensor, q_start: torch.Tensor, q_lengths) -> torch.Tensor:
    """(B, NC) end of the voting queries of each chunk: ``c1``, cut at ``q_start + q_lengths``
    when given (queries past it are right padding: outputs, but no votes)."""
    if q_lengths is None:
        return c1
    q_lengths = torch.as_tensor(q_lengths, dtype=torch.int64, device=c1.device)
    return torch.minimum(c1, (q_start + q_lengths.expand(q_start.shape))[:, None])


# ----------------------------------------------------------------------------- RoPE
def rope_cos_sin(positions: torch.Tensor, inv_freq) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (..., D) float32 of positions (...), duplicated over both halves of D."""
    inv = torch.as_tensor(np.asarray(inv_freq, np.float32), device=positions.device)
    angles = positions.float()[..., None] * inv
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, with cos/sin broadcast against x (..., N, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq) -> torch.Tensor:
    """RoPE of x (..., N, D) at positions (..., N)."""
    cos, sin = rope_cos_sin(positions, inv_freq)
    return apply_rope(x, cos, sin)


# ----------------------------------------------------------------------------- geometry
def chunk_bounds(q_start: torch.Tensor, geo: Geometry):
    """(c0, c1, L0), each (B, NC) int64: chunk [c0, c1) and its local window start L0."""
    sel = geo.sel
    c0 = q_start[:, None] + torch.arange(geo.num_chunks, device=q_start.device)[None, :] * geo.chunk
    c1 = torch.minimum(c0 + geo.chunk, q_start[:, None] + geo.num_queries)
    middle = torch.clamp(c0 - sel.local_window - sel.sink_tokens, min=0)
    l0 = torch.clamp(c0, max=sel.sink_tokens) + middle // sel.middle_align * sel.middle_align
    return c0, c1, l0


def pack_rows(q: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """(B, T, Hq, D) -> (B, Hkv, NC, R, D): row r of a chunk is query c0 + r // G, head
    hk * G + r % G; T zero-padded to NC * C."""
    b, t, hq, d = q.shape
    pad = geo.num_chunks * geo.chunk - t
    q = torch.nn.functional.pad(q, (0, 0, 0, 0, 0, pad))
    q = q.reshape(b, geo.num_chunks, geo.chunk, geo.kv_heads, geo.groups, d)
    return q.permute(0, 3, 1, 2, 4, 5).reshape(b, geo.kv_heads, geo.num_chunks, geo.rows, d)


def unpack_rows(o: torch.Tensor, geo: Geometry) -> torch.Tensor:
    b, d = o.shape[0], o.shape[-1]
    o = o[:, :, :, : geo.rows].reshape(b, geo.kv_heads, geo.num_chunks, geo.chunk, geo.groups, d)
    o = o.permute(0, 2, 3, 1, 4, 5).reshape(b, geo.num_chunks * geo.chunk, geo.q_heads, d)
    return o[:, : geo.num_queries]


def row_positions(c0: torch.Tensor, rows: int, groups: int) -> torch.Tensor:
    return c0[..., None] + torch.arange(rows, device=c0.device) // groups


# ----------------------------------------------------------------------------- 1. scoring
def score_topk(q_rows: torch.Tensor, k_heads: torch.Tensor, l0: torch.Tensor, sel: Selection,
               key_block: int = KEY_BLOCK):
    """q_rows (B, Hkv, R, D), k_heads (B, Hkv, S, D), l0 (B,) -> (values, positions)
    (B, Hkv, R, K): each row's top_k middle keys [sink, L0), best first, ties to the lower
    position; position -1 (value -inf) where the middle has fewer keys."""
    b, hkv, r, _ = q_rows.shape
    s_len = k_heads.shape[2]
    kk = sel.top_k
    dev = q_rows.device
    vals = torch.full((b, hkv, r, kk), float("-inf"), device=dev)
    idx = torch.full((b, hkv, r, kk), -1, dtype=torch.int64, device=dev)
    middle = s_len - sel.sink_tokens
    if middle <= 0:
        return vals, idx
    kb_len = min(key_block, middle)
    for lo in range(sel.sink_tokens, s_len, kb_len):
        cols = lo + torch.arange(kb_len, device=dev)
        keys = k_heads[:, :, torch.clamp(cols, max=s_len - 1)]
        s = torch.einsum("bhrd,bhkd->bhrk", q_rows, keys)
        s = s.masked_fill(cols[None, None, None, :] >= l0[:, None, None, None], float("-inf"))
        merged_v = torch.cat([vals, s], dim=-1)
        merged_i = torch.cat([idx, cols.expand(b, hkv, r, kb_len)], dim=-1)
        order = torch.sort(merged_v, dim=-1, descending=True, stable=True).indices[..., :kk]
        vals = torch.gather(merged_v, -1, order)
        idx = torch.gather(merged_i, -1, order)
    return vals, torch.where(torch.isfinite(vals), idx, -1)


def block_scoring_inputs(q: torch.Tensor, k: torch.Tensor, l0: torch.Tensor, sel: Selection):
    """``key_blocks.py`` for tensors (``Selection.key_block`` = b > 1): the signed queries
    [max(q, 0), min(q, 0)] (B, T, Hq, 2D), the summary rows (B, round_up(sink + NB, 8), Hkv,
    2D), row sink + j = [max, min] of block j's keys (sink rows and padding zero), and the
    middle ends L0 in summary rows."""
    b, s, hkv, d = k.shape
    sink, kb = sel.sink_tokens, sel.key_block
    nb = max(s - sink, 0) // kb
    q_s = torch.cat([q.clamp(min=0), q.clamp(max=0)], dim=-1)
    blocks = k[:, sink: sink + nb * kb].reshape(b, nb, kb, hkv, d)
    rows = torch.cat([blocks.amax(dim=2), blocks.amin(dim=2)], dim=-1)
    total = -(-(sink + nb) // 8) * 8
    k_s = torch.nn.functional.pad(rows, (0, 0, 0, 0, sink, total - sink - nb))
    end = torch.where(l0 > sink, sink + torch.clamp((l0 - sink) // kb, max=nb), l0)
    return q_s, k_s, end


def block_centres(idx: torch.Tensor, sel: Selection) -> torch.Tensor:
    """Summary-row picks -> the token positions whose spans are their blocks (-1 stays)."""
    kb = sel.key_block
    return torch.where(idx >= 0, sel.sink_tokens + (idx - sel.sink_tokens) * kb + kb // 2, -1)


# ----------------------------------------------------------------------------- 2. selection
def _sort_by(keys: list[torch.Tensor], *payload: torch.Tensor):
    """Lexicographic ascending sort along the last dim (keys[0] most significant) of keys and
    payload, by stable sorts from the least significant key."""
    order = torch.arange(keys[0].shape[-1], device=keys[0].device).expand_as(keys[0])
    for key in reversed(keys):
        step = torch.sort(torch.gather(key, -1, order), dim=-1, stable=True).indices
        order = torch.gather(order, -1, step)
    return [torch.gather(x, -1, order) for x in (*keys, *payload)]


def select_from_picks(idx: torch.Tensor, val: torch.Tensor, c0: torch.Tensor, l0: torch.Tensor,
                      sel: Selection):
    """idx, val (N, P) picks (idx -1: none), c0, l0 (N,) -> gathered list (N, NG) int64 and its
    length n_g (N,): [0 .. min(sink, c0) - 1 ; union of the spans of the max_selected most-voted
    keys (ties: higher best score, then lower position)], ascending; slots from n_g hold 0."""
    n, p = idx.shape
    dev = idx.device
    ng = sel.num_gathered()
    cap = sel.max_selected
    valid = idx >= 0
    s_idx, s_neg = _sort_by([torch.where(valid, idx, INT_MAX), torch.where(valid, -val, 0.0)])
    ar = torch.arange(p, device=dev)
    boundary = torch.cat([torch.ones(n, 1, dtype=torch.bool, device=dev),
                          s_idx[:, 1:] != s_idx[:, :-1]], dim=1)
    first = boundary & (s_idx != INT_MAX)
    b_pos = torch.where(boundary, ar, p)
    after = torch.cat([b_pos[:, 1:], torch.full((n, 1), p, device=dev)], dim=1)
    next_boundary = torch.flip(torch.cummin(torch.flip(after, [1]), dim=1).values, [1])
    votes = next_boundary - ar
    k1 = torch.where(first, -votes, 1)
    k2 = torch.where(first, s_neg, 0.0)
    k1, _, k3 = _sort_by([k1, k2, s_idx])
    if p < cap:
        k1 = torch.nn.functional.pad(k1, (0, cap - p), value=1)
        k3 = torch.nn.functional.pad(k3, (0, cap - p), value=INT_MAX)
    kept = k1[:, :cap] < 0
    centers = torch.sort(torch.where(kept, k3[:, :cap], INT_MAX), dim=1).values
    kept = centers != INT_MAX
    c = torch.where(kept, centers, 0)
    a = torch.clamp(c - sel.span_left, min=sel.sink_tokens)
    bnd = torch.minimum(c + sel.span_right, l0[:, None] - 1)
    prev = torch.cat([torch.full((n, 1), -1, device=dev), bnd[:, :-1]], dim=1)
    start = torch.maximum(a, prev + 1)
    count = torch.where(kept, torch.clamp(bnd - start + 1, min=0), 0)
    sink = torch.clamp(c0, max=sel.sink_tokens)
    offset = sink[:, None] + torch.cumsum(count, dim=1) - count
    o = torch.arange(sel.span, device=dev)
    tokens = start[:, :, None] + o
    dest = torch.where(o < count[:, :, None], offset[:, :, None] + o, ng)  # ng: dropped below
    slots = torch.arange(ng + 1, device=dev)
    glist = torch.where(slots[None, :] < sink[:, None], slots[None, :], 0)
    glist = glist.scatter(1, dest.reshape(n, -1), tokens.reshape(n, -1))
    return glist[:, :ng], sink + count.sum(dim=1)


# ----------------------------------------------------------------------------- 3. attention
def attend_gathered(q_rows, t_rows, k_heads, v_heads, glist, n_g, l0, tail: int, inv_freq,
                    scale: float):
    """Causal attention of un-rotated rows (B, Hkv, R, D) over [gathered list ; keys L0 .. t]
    with positions 0 .. n-1 (slot i -> i, key j >= L0 -> n_g + j - L0, query t -> n_g + t - L0).
    Returns (B, Hkv, R, D) float32."""
    b, hkv, ng = glist.shape
    s_len = k_heads.shape[2]
    dev = q_rows.device
    j = l0[:, None] + torch.arange(tail, device=dev)  # (B, TAIL)
    jc = torch.clamp(j, max=s_len - 1)[:, None, :, None].expand(b, hkv, tail, k_heads.shape[3])
    gl = glist[..., None].expand(b, hkv, ng, k_heads.shape[3])
    keys = torch.cat([torch.gather(k_heads, 2, gl), torch.gather(k_heads, 2, jc)], dim=2)
    values = torch.cat([torch.gather(v_heads, 2, gl), torch.gather(v_heads, 2, jc)], dim=2)
    slots = torch.arange(ng, device=dev)
    k_pos = torch.cat([slots.expand(b, hkv, ng),
                       n_g[..., None] + torch.arange(tail, device=dev)], dim=-1)
    q_pos = n_g[..., None] + (t_rows - l0[:, None])[:, None, :]
    keys = rotate(keys, k_pos, inv_freq)
    q_rot = rotate(q_rows, q_pos, inv_freq)
    scores = torch.einsum("bhrd,bhnd->bhrn", q_rot, keys) * scale
    r = t_rows.shape[1]
    mask = torch.cat([
        (slots[None, None, :] < n_g[..., None])[:, :, None, :].expand(b, hkv, r, ng),
        (j[:, None, :] <= t_rows[:, :, None])[:, None].expand(b, hkv, r, tail),
    ], dim=-1)
    p = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.einsum("bhrn,bhnd->bhrd", p, values)


# ----------------------------------------------------------------------------- the op
def reattention_with_selection(q, k, v, *, sel: Selection = Selection(), q_start=None,
                               rope_theta: float = 10000.0, inv_freq=None,
                               softmax_scale: float | None = None, q_lengths=None):
    """(out (B, T, Hq, D), gathered lists (B, Hkv, NC, NG), lengths (B, Hkv, NC)).
    ``q_lengths`` (B,): valid queries per batch element (``voting_ends``)."""
    check_args(q, k, v)
    geo = geometry(tuple(q.shape), tuple(k.shape), sel)
    q0 = query_starts(q_start, geo.batch, geo.num_keys, geo.num_queries, q.device)
    inv_freq = resolve_inv_freq(geo.head_dim, rope_theta, inv_freq)
    scale = softmax_scale_or_default(geo.head_dim, softmax_scale)
    c0, c1, l0 = chunk_bounds(q0, geo)
    c1 = voting_ends(c1, q0, q_lengths)  # only the voting uses c1 here
    q_rows = pack_rows(q.float(), geo)
    k_heads = k.float().transpose(1, 2)
    v_heads = v.float().transpose(1, 2)
    b, hkv = geo.batch, geo.kv_heads
    s_rows, s_keys, s_end = q_rows, k_heads, l0
    if sel.key_block > 1:  # whole blocks by an upper bound (``block_scoring_inputs``)
        q_s, k_s, s_end = block_scoring_inputs(q.float(), k.float(), l0, sel)
        s_rows, s_keys = pack_rows(q_s, geo), k_s.transpose(1, 2)
    outs, glists, n_gs = [], [], []
    for ci in range(geo.num_chunks):
        t_rows = row_positions(c0[:, ci], geo.rows, geo.groups)
        vals, idx = score_topk(s_rows[:, :, ci], s_keys, s_end[:, ci], sel)
        if sel.key_block > 1:
            idx = block_centres(idx, sel)
        idx = torch.where((t_rows < c1[:, ci, None])[:, None, :, None], idx, -1)
        rep = lambda x: x.repeat_interleave(hkv)
        glist, n_g = select_from_picks(idx.reshape(b * hkv, -1), vals.reshape(b * hkv, -1),
                                       rep(c0[:, ci]), rep(l0[:, ci]), sel)
        glist, n_g = glist.reshape(b, hkv, -1), n_g.reshape(b, hkv)
        outs.append(attend_gathered(q_rows[:, :, ci], t_rows, k_heads, v_heads, glist, n_g,
                                    l0[:, ci], geo.tail, inv_freq, scale))
        glists.append(glist)
        n_gs.append(n_g)
    out = unpack_rows(torch.stack(outs, dim=2), geo).to(q.dtype)
    return out, torch.stack(glists, dim=2), torch.stack(n_gs, dim=2)


def reattention(q, k, v, *, sink_tokens: int = 32, local_window: int = 8192, top_k: int = 4,
                max_selected: int = 256, span: int = 32, chunk_size: int = 512,
                middle_align: int = 128, key_block: int = 1, q_start=None,
                rope_theta: float = 10000.0, inv_freq=None, softmax_scale: float | None = None,
                q_lengths=None) -> torch.Tensor:
    """ReAttention over un-rotated torch tensors q (B, T, Hq, D) (the last T positions, or from
    ``q_start``) and k, v (B, S, Hkv, D) -> (B, T, Hq, D) in q's dtype. ``q_lengths`` (B,): only
    the first q_lengths[b] queries of element b vote (the rest is right padding)."""
    sel = Selection(sink_tokens, local_window, top_k, max_selected, span, chunk_size, middle_align,
                    key_block)
    return reattention_with_selection(q, k, v, sel=sel, q_start=q_start, rope_theta=rope_theta,
                                      inv_freq=inv_freq, softmax_scale=softmax_scale,
                                      q_lengths=q_lengths)[0]


def reattention_decode(q, k_cache, v_cache, lengths, **kwargs) -> torch.Tensor:
    """One decode step: q (B, Hq, D) is the query of position lengths - 1 (its key and value
    already cached); cache slots from ``lengths`` on are ignored."""
    kwargs = {**kwargs, "chunk_size": 1}
    q_start = torch.as_tensor(lengths, device=q.device) - 1
    return reattention(q[:, None], k_cache, v_cache, q_start=q_start, **kwargs)[:, 0]
