"""Plain PyTorch (float32) reference for Core Context Aware attention: the twin of reference.py.

Same function, same shape letters (B batch, T tokens, Hq query heads, Hkv kv heads, G = Hq // Hkv,
D head dim, N = T // g complete groups, C query chunk, L local keys), same argument checks. The math
is in README.md in this folder (SPEC.md section 1):

* ``pool_core_tokens``: the core key/value of every complete group, per kv head. The pooling query
  is the mean, over the G query heads sharing the kv head, of the query of the group's last token;
  the softmax scale is the attention's (``1 / sqrt(D)`` or ``softmax_scale``).
* ``local_window_start`` / ``core_visible`` / ``local_visible``: what query t sees, exactly.
* ``cca_attention``: one softmax over [visible core keys ; local raw keys], chunked over queries
  so that memory grows linearly with T; each chunk is recomputed in the backward pass
  (``torch.utils.checkpoint``), so gradients are linear in T too.

Everything is computed in float32 and returned in the query dtype; autograd works through all of it.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

POOLINGS = ("cca", "mean", "max")
DEFAULT_CHUNK = 256


def local_window_start(t: torch.Tensor, group_size: int, local_window: int) -> torch.Tensor:
    """First raw key visible to query ``t``: ``max(0, floor((t - w + 1) / g) * g)``, exact for
    every t (``rounding_mode="floor"`` rounds toward minus infinity)."""
    first = torch.div(t - local_window + 1, group_size, rounding_mode="floor") * group_size
    return torch.clamp(first, min=0)


def core_visible(t: torch.Tensor, j: torch.Tensor, group_size: int,
                 local_window: int) -> torch.Tensor:
    """True where query ``t`` sees the core token of group ``j`` (it ends before start(t))."""
    return (j + 1) * group_size <= local_window_start(t, group_size, local_window)


def local_visible(t: torch.Tensor, s: torch.Tensor, group_size: int,
                  local_window: int) -> torch.Tensor:
    """True where query ``t`` sees raw key ``s`` (``start(t) <= s <= t``)."""
    return (local_window_start(t, group_size, local_window) <= s) & (s <= t)


def check_cca_hparams(group_size: int, local_window: int, pooling: str = "cca") -> None:
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size must be a positive int; got {group_size!r}")
    if not isinstance(local_window, int) or isinstance(local_window, bool) or local_window < 1:
        raise ValueError(f"local_window must be a positive int; got {local_window!r}")
    if local_window % group_size:
        raise ValueError(
            f"local_window ({local_window}) must be a multiple of group_size ({group_size})"
        )
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}; got {pooling!r}")


def check_cca_args(q, k, v, group_size: int, local_window: int, pooling: str = "cca") -> None:
    """Raises ValueError naming the problem for inputs the CCA math does not define."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            "cca_attention expects q (B, T, Hq, D) and k, v (B, T, Hkv, D); got shapes "
            f"q={tuple(q.shape)}, k={tuple(k.shape)}, v={tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got k={tuple(k.shape)}, "
                         f"v={tuple(v.shape)}")
    b, t, hq, d = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (b, t, d):
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch, length or head dim"
        )
    if k.shape[2] == 0 or hq % k.shape[2]:
        raise ValueError(
            f"number of query heads ({hq}) must be a multiple of kv heads ({k.shape[2]})"
        )
    if not (q.dtype.is_floating_point and q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    check_cca_hparams(group_size, local_window, pooling)


def softmax_scale_or_default(head_dim: int, softmax_scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)


def pool_core_tokens(
    q: torch.Tensor,  # (B, T, Hq, D)
    k: torch.Tensor,  # (B, T, Hkv, D)
    v: torch.Tensor,  # (B, T, Hkv, D)
    *,
    group_size: int,
    pooling: str = "cca",
    softmax_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Core key/value (B, N, Hkv, D) of every complete group, per kv head, in float32.

    ``pooling="cca"`` is the paper's globality-aware pooling; ``"mean"`` and ``"max"`` are the
    paper's ablations (plain mean / element-wise max over the group's keys and values).
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    g = group_size
    n = t // g
    k_groups = k[:, : n * g].float().reshape(b, n, g, hkv, d)
    v_groups = v[:, : n * g].float().reshape(b, n, g, hkv, d)
    if pooling == "mean":
        return k_groups.mean(dim=2), v_groups.mean(dim=2)
    if pooling == "max":
        return k_groups.amax(dim=2), v_groups.amax(dim=2)
    q_last = q[:, g - 1 : n * g : g].float()  # (B, N, Hq, D)
    q_pool = q_last.reshape(b, n, hkv, hq // hkv, d).mean(dim=3)  # (B, N, Hkv, D)
    scores = torch.einsum("bnhd,bnghd->bnhg", q_pool, k_groups)
    weights = torch.softmax(scores * softmax_scale_or_default(d, softmax_scale), dim=-1)
    k_core = torch.einsum("bnhg,bnghd->bnhd", weights, k_groups)
    v_core = torch.einsum("bnhg,bnghd->bnhd", weights, v_groups)
    return k_core, v_core


def _chunk_len(t: int, multiple: int, chunk_size: int | None) -> int:
    c = chunk_size or DEFAULT_CHUNK
    c = max(multiple, (c // multiple) * multiple)
    return min(c, -(-t // multiple) * multiple)


def _attend_chunk(q_chunk, k_core, v_core, k_loc, v_loc, rows, cols, group_size: int,
                  local_window: int, scale: float):
    """Output (B, C, Hkv, G, D) of one query chunk over its [core ; local] keys."""
    n = k_core.shape[1]
    j = torch.arange(n, device=rows.device)
    s_core = torch.einsum("bchgd,bnhd->bhgcn", q_chunk, k_core)
    s_loc = torch.einsum("bchgd,blhd->bhgcl", q_chunk, k_loc)
    visible = torch.cat([core_visible(rows[:, None], j[None, :], group_size, local_window),
                         local_visible(rows[:, None], cols[None, :], group_size, local_window)],
                        dim=-1)
    scores = torch.cat([s_core, s_loc], dim=-1) * scale
    # Every query sees at least itself, so no row is fully masked.
    p = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    out = torch.einsum("bhgcn,bnhd->bchgd", p[..., :n], v_core)
    return out + torch.einsum("bhgcl,blhd->bchgd", p[..., n:], v_loc)


def cca_attention(
    q: torch.Tensor,  # (B, T, Hq, D)
    k: torch.Tensor,  # (B, T, Hkv, D)
    v: torch.Tensor,  # (B, T, Hkv, D)
    *,
    group_size: int = 16,
    local_window: int = 1024,
    pooling: str = "cca",
    softmax_scale: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """CCA attention (B, T, Hq, D), chunked over queries so memory grows linearly with T.

    A chunk of C queries (C a multiple of g) reads the raw keys from start(first query) to its
    last query and the core tokens visible to its last query; under autograd each chunk is
    checkpointed (recomputed in the backward pass).
    """
    check_cca_args(q, k, v, group_size, local_window, pooling)
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    g, w = group_size, local_window
    scale = softmax_scale_or_default(d, softmax_scale)
    k_core, v_core = pool_core_tokens(q, k, v, group_size=g, pooling=pooling,
                                      softmax_scale=softmax_scale)
    c = _chunk_len(t, g, chunk_size)
    qf = q.float().reshape(b, t, hkv, hq // hkv, d)
    kf, vf = k.float(), v.float()
    recompute = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    outs = []
    for c0 in range(0, t, c):
        c1 = min(c0 + c, t)
        k0 = max(0, ((c0 - w + 1) // g) * g)  # start(c0): Python's // floors
        n_vis = max(0, ((c1 - 1 - w + 1) // g) * g) // g  # core tokens the last query sees
        rows = torch.arange(c0, c1, device=q.device)
        cols = torch.arange(k0, c1, device=q.device)
        args = (qf[:, c0:c1], k_core[:, :n_vis], v_core[:, :n_vis], kf[:, k0:c1], vf[:, k0:c1],
                rows, cols, g, w, scale)
        if recompute:
            outs.append(checkpoint(_attend_chunk, *args, use_reentrant=False))
        else:
            outs.append(_attend_chunk(*args))
    out = torch.cat(outs, dim=1) if outs else qf.new_zeros(b, 0, hkv, hq // hkv, d)
    return out.reshape(b, t, hq, d).to(q.dtype)
