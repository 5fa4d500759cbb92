"""The selection of a chunk with few picks as one Pallas kernel (Triton lowering).

Same function as ``reference.select_from_picks`` (its reference: equal lists and lengths, bit for
bit), for chunks of at most ``MAX_PICKS`` picks: a decode step has G heads x top_k of them (16 for
LLaMA-3's GQA with the authors' top_k). There, XLA's version is three sorts of a few dozen
elements, two scans and a scatter, each its own small kernel, in a step that is bound by such
fixed costs (``docs/perf-notes.md``: 0.106 ms back to back at 16K against about 12 us of
bytes). With so few picks, ranks come from pairwise comparisons instead of sorts, and one
program per (batch, kv head, chunk) does the whole selection:

* votes of a pick = picks of the same position; its key's best score = their largest score;
  one pick per position stands for it (the first);
* a position's rank = positions that beat it (more votes, then a higher best score, then a lower
  position: the order of ``select_from_picks``' second sort, whose float keys treat -0 and +0 as
  equal, as the comparisons here do); the ``max_selected`` best are kept;
* a kept position's span starts after the previous kept span's end (the previous one is the kept
  position below it with the largest end: ends do not decrease); its first list slot is the sink
  plus the lengths of the kept spans below it;
* the kept spans tile [sink, n_g) in order, so the list is two stores: each kept span's
  tokens scattered to its slots (one masked store of a (P, span) table), and every other slot
  written a block at a time (s inside the sink, 0 from n_g on; masked off inside the spans, so
  no slot is written twice).

:func:`select_from_candidates` takes each row's candidates from all the scoring's key splits
instead (a decode step: G rows x 32 splits x top_k) and first keeps each row's best top_k, in
the order of the sort it replaces (``pallas._merge_splits``), by top_k rounds of extraction:
the best score, the lowest position among its equals, the earliest candidate among those (three
reductions over the candidates, all rows at once). One launch instead of that sort, its two
copies and three small fusions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt
from jaxtyping import Array, Float, Int

from kernels.cca.pallas_common import call
from kernels.reattention.params import Selection, cdiv, next_power_of_2

MAX_PICKS = 64  # pairwise tables of MAX_PICKS^2 per program; more picks go through the sorts
MAX_CANDIDATES = 256  # a row's candidates, ranked pairwise (select_from_candidates)
FILL = 2048  # list slots per store of the fill (outside the spans)


def list_width(ng: int) -> tuple[int, int]:
    """(slots per store of the fill, NGp): the list as written, NG slots and at least one more
    (the masked span entries' slot), in whole stores."""
    slots = min(FILL, next_power_of_2(ng + 1))
    return slots, cdiv(ng + 1, slots) * slots


def applies(picks: int) -> bool:
    return 1 <= picks <= MAX_PICKS


def _kernel(meta_ref, idx_ref, val_ref, glist_ref, n_g_ref, *, sel: Selection, slots: int):
    _select(meta_ref[0], meta_ref[1], idx_ref[...], val_ref[...], glist_ref, n_g_ref, sel=sel,
            slots=slots)


def _merge_kernel(meta_ref, idx_ref, val_ref, glist_ref, n_g_ref, *, sel: Selection, slots: int,
                  rows: int, real: int, kp: int):
    """The top_k candidates of each of the ``real`` rows (``pallas._merge_splits``' order:
    higher score, then lower position, then earlier candidate; -0 equal to +0), as kp picks per
    row (slots past top_k, missing candidates and rows past ``real``: -1), then :func:`_select`
    of the ``rows`` x kp picks. Round j takes each row's best remaining candidate: three
    reductions over the (C, rows) block, candidates down the columns."""
    c = idx_ref.shape[0]
    col = lambda x: x[:, None]
    row = lambda x: x[None, :]
    ci, cv = idx_ref[:, pl.ds(0, rows)], val_ref[:, pl.ds(0, rows)]  # (C, rows)
    live = (ci >= 0) & row(jnp.arange(rows, dtype=jnp.int32) < real)
    cand = col(jnp.arange(c, dtype=jnp.int32))
    slot = row(jnp.arange(kp, dtype=jnp.int32))
    acc_idx = jnp.full((rows, kp), -1, jnp.int32)
    acc_val = jnp.full((rows, kp), -jnp.inf, jnp.float32)
    for j in range(sel.top_k):
        best = jnp.max(jnp.where(live, cv, -jnp.inf), axis=0)  # -0 and +0 compare equal
        at = live & (cv == row(best))
        low = jnp.min(jnp.where(at, ci, jnp.iinfo(jnp.int32).max), axis=0)
        at = at & (ci == row(low))
        first = jnp.min(jnp.where(at, cand, c), axis=0)
        chosen = at & (cand == row(first))  # one candidate per row, none once a row is empty
        picked = jnp.max(jnp.where(chosen, ci, -1), axis=0)
        score = jnp.max(jnp.where(chosen, cv, -jnp.inf), axis=0)  # its own bits (-0 stays)
        acc_idx = jnp.where(slot == j, col(picked), acc_idx)
        acc_val = jnp.where(slot == j, col(score), acc_val)
        live = live & ~chosen
    _select(meta_ref[0], meta_ref[1], acc_idx.reshape(rows * kp), acc_val.reshape(rows * kp),
            glist_ref, n_g_ref, sel=sel, slots=slots)


def _select(c0, l0, idx, val, glist_ref, n_g_ref, *, sel: Selection, slots: int):
    """The selection of one chunk from its picks (idx -1: none), written to its whole list
    (``list_width``: NG slots and more, ``slots`` per store of the fill)."""
    valid = idx >= 0
    col = lambda x: x[:, None]  # pick i down the rows, pick j across the columns
    row = lambda x: x[None, :]
    p = idx.shape[0]
    earlier = col(jnp.arange(p, dtype=jnp.int32)) > row(jnp.arange(p, dtype=jnp.int32))
    same = col(valid) & row(valid) & (col(idx) == row(idx))
    votes = jnp.sum(same.astype(jnp.int32), axis=1)
    best = jnp.max(jnp.where(same, row(val), -jnp.inf), axis=1)
    first = valid & (jnp.sum((same & earlier).astype(jnp.int32), axis=1) == 0)
    # j ranks before i: more votes, then a higher best score, then a lower position
    before = row(first) & ((row(votes) > col(votes))
                           | ((row(votes) == col(votes))
                              & ((row(best) > col(best))
                                 | ((row(best) == col(best)) & (row(idx) < col(idx))))))
    kept = first & (jnp.sum(before.astype(jnp.int32), axis=1) < sel.max_selected)
    a = jnp.maximum(idx - sel.span_left, sel.sink_tokens)
    end = jnp.minimum(idx + sel.span_right, l0 - 1)
    below = row(kept) & (row(idx) < col(idx))  # kept positions below pick i's
    prev_end = jnp.max(jnp.where(below, row(end), -1), axis=1)
    start = jnp.maximum(a, prev_end + 1)
    count = jnp.where(kept, jnp.maximum(end - start + 1, 0), 0)
    sink = jnp.minimum(sel.sink_tokens, c0)
    offset = sink + jnp.sum(jnp.where(below, row(count), 0), axis=1)
    n_g = sink + jnp.sum(count)
    n_g_ref[0] = n_g

    def fill(b, carry):  # slots outside the spans: s inside the sink, 0 from n_g on
        s = b * slots + jnp.arange(slots, dtype=jnp.int32)
        plt.store(glist_ref.at[pl.ds(b * slots, slots)], jnp.where(s < sink, s, 0),
                  mask=(s < sink) | (s >= n_g))
        return carry

    lax.fori_loop(0, glist_ref.shape[0] // slots, fill, 0)
    # The spans: kept pick i's tokens start_i + o at slots offset_i + o, o < count_i (they tile
    # [sink, n_g)). Masked-off entries point at the list's last slot, past NG, which no span
    # writes (the interpreter's masked store rewrites the old value there).
    o = row(jnp.arange(next_power_of_2(sel.span), dtype=jnp.int32))
    inside = o < col(count)
    dest = jnp.where(inside, col(offset) + o, glist_ref.shape[0] - 1)
    plt.store(glist_ref.at[dest], col(start) + o, mask=inside)


@functools.partial(jax.jit, static_argnames=("sel", "interpret"))
def select_from_picks(idx: Int[Array, "N P"], val: Float[Array, "N P"], c0: Int[Array, "N"],
                      l0: Int[Array, "N"], sel: Selection, interpret: bool = False
                      ) -> tuple[Int[Array, "N NG"], Int[Array, "N"]]:
    """``reference.select_from_picks`` (same arguments and results) as one kernel launch, for
    P <= ``MAX_PICKS`` picks per row."""
    n, p = idx.shape
    if not applies(p) or val.shape != (n, p) or c0.shape != (n,) or l0.shape != (n,):
        raise ValueError(f"the small-selection kernel takes (N, P) picks with 1 <= P <= "
                         f"{MAX_PICKS} and (N,) chunk bounds; got idx {idx.shape}, val "
                         f"{val.shape}, c0 {c0.shape}, l0 {l0.shape}")
    pp = next_power_of_2(max(p, 2))  # Triton blocks are powers of two: padding picks are -1
    idx = jnp.pad(idx.astype(jnp.int32), ((0, 0), (0, pp - p)), constant_values=-1)
    val = jnp.pad(val.astype(jnp.float32), ((0, 0), (0, pp - p)))
    ng = sel.num_gathered()
    slots, ngp = list_width(ng)
    meta = jnp.stack([c0, l0], axis=1).astype(jnp.int32)
    return _launch(functools.partial(_kernel, sel=sel, slots=slots), meta, idx, val,
                   ng, ngp, interpret)


def _launch(kernel, meta, idx, val, ng: int, ngp: int, interpret: bool, wide: bool = False):
    """One program per chunk: its (c0, l0), its whole picks or candidates block, its list
    (``wide``: all NGp slots the kernel writes, else the first NG)."""
    n = meta.shape[0]
    block = (None, *idx.shape[1:])
    whole = lambda i: (i,) + (0,) * (idx.ndim - 1)
    glist, n_g = call(
        kernel,
        grid=(n,),
        in_specs=[pl.BlockSpec((None, 2), lambda i: (i, 0)),
                  pl.BlockSpec(block, whole), pl.BlockSpec(block, whole)],
        out_specs=[pl.BlockSpec((None, ngp), lambda i: (i, 0)),
                   pl.BlockSpec((None, 1), lambda i: (i, 0))],
        out_shape=[jax.ShapeDtypeStruct((n, ngp), jnp.int32),
                   jax.ShapeDtypeStruct((n, 1), jnp.int32)],
        inputs=[meta, idx, val],
        num_warps=4,
        num_stages=1,
        interpret=interpret,
        name="reattention_select",
    )
    return (glist if wide else glist[:, :ng]), n_g[:, 0]


def merges(rows: int, candidates: int, top_k: int) -> bool:
    """Whether :func:`select_from_candidates` takes chunks of ``rows`` rows with ``candidates``
    candidates each: at most ``MAX_PICKS`` picks (rows and top_k padded to powers of two) and
    ``MAX_CANDIDATES`` candidates per row (ranked pairwise)."""
    return (1 <= candidates <= MAX_CANDIDATES
            and applies(next_power_of_2(rows) * next_power_of_2(max(top_k, 1))))


@functools.partial(jax.jit, static_argnames=("sel", "rows", "interpret", "wide"))
def select_from_candidates(idx: Int[Array, "N C Rc"], val: Float[Array, "N C Rc"],
                           c0: Int[Array, "N"], l0: Int[Array, "N"], sel: Selection,
                           rows: int | None = None, interpret: bool = False,
                           wide: bool = False) -> tuple[Int[Array, "N NG"], Int[Array, "N"]]:
    """``reference.select_from_picks`` of the best ``top_k`` candidates of each of the first
    ``rows`` rows (default: all Rc), as one kernel launch: what ``pallas._merge_splits`` (a sort
    of every row's candidates from all key splits) then :func:`select_from_picks` give, bit for
    bit. Candidate-major, as the Mosaic GPU scoring writes them (rows past ``rows`` are its
    padding, not read). A decode step's rows are G query heads with splits x top_k candidates
    each; merged by XLA that was a transposition, a sort, two copies and small fusions, each a
    launch of its own.

    ``wide``: the list as the kernel writes it, (N, NGp): NGp >= NG a multiple of the power of
    two slots it stores at a time, every slot from n_g on 0 (as the reference's from n_g to
    NG). The attention reads that list in place: no copy of its first NG slots."""
    n, c, rc = idx.shape
    r = rc if rows is None else rows
    if not (merges(r, c, sel.top_k) and r <= rc) or val.shape != (n, c, rc) or (
            c0.shape != (n,) or l0.shape != (n,)):
        raise ValueError(f"the candidate-merging selection kernel takes (N, C, R) candidates, "
                         f"C <= {MAX_CANDIDATES} of each of rows <= R rows, with at most "
                         f"{MAX_PICKS} picks, and (N,) chunk bounds; got idx {idx.shape}, val "
                         f"{val.shape}, rows {rows}, c0 {c0.shape}, l0 {l0.shape}")
    rp, cp, kp = next_power_of_2(r), next_power_of_2(max(c, 2)), next_power_of_2(sel.top_k)
    rcp = max(rp, next_power_of_2(rc))  # the block's rows: a power of two, as Triton's
    pad = ((0, 0), (0, cp - c), (0, rcp - rc))
    if cp != c or rcp != rc:  # a copy; the scoring's own layout needs none
        idx = jnp.pad(idx, pad, constant_values=-1)
        val = jnp.pad(val, pad)
    idx, val = idx.astype(jnp.int32), val.astype(jnp.float32)
    ng = sel.num_gathered()
    slots, ngp = list_width(ng)
    meta = jnp.stack([c0, l0], axis=1).astype(jnp.int32)
    kernel = functools.partial(_merge_kernel, sel=sel, slots=slots, rows=rp, real=r,
                               kp=kp)
    return _launch(kernel, meta, idx, val, ng, ngp, interpret, wide)
