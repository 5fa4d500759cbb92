"""The plain ReAttention reference (kernels/reattention/reference.py) against independent
formulations: the dense sort-based selection and keep-mask attention, full causal attention when
everything is selected, decode against prefill rows, hand-checked vote/span/tie semantics."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_cca import ops
from jax_cca.rope import apply_rope, rope_cos_sin
from kernels.cca import reference as cca_reference
from kernels.reattention import reference as R
from kernels.reattention.params import Selection
from kernels.reattention.shapes import CPU_CASES, Case, small
from tests.kernels import reattention_runs as runs
from tests.kernels.conftest import rel_err


def make_qkv(case: Case, seed: int, num_keys: int | None = None):
    """Fresh random q (B, T, Hq, D) and k, v (B, S, Hkv, D), never zeros."""
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    s = num_keys or case.length
    q = jax.random.normal(kq, (case.batch, case.length, case.q_heads, case.head_dim))
    k = jax.random.normal(kk, (case.batch, s, case.kv_heads, case.head_dim))
    v = jax.random.normal(kv, (case.batch, s, case.kv_heads, case.head_dim))
    return q, k, v


def _reference(q, k, v, sel):
    return runs.reference_fn(sel)(q, k, v)


def _valid(glist, n_g):
    """Gathered lists with the slots past n_g zeroed (their content is unspecified)."""
    glist, n_g = np.asarray(glist), np.asarray(n_g)
    return np.where(np.arange(glist.shape[-1]) < n_g[..., None], glist, 0)


def check_dense_oracles(case: Case, seed: int):
    """The reference's selection == the argsort/lexsort one (same lists, same lengths) and its
    output == the keep-mask formulation to float32 round-off; returns (q, k, out, glist, n_g)."""
    q, k, v = make_qkv(case, seed=seed)
    out, glist, n_g = _reference(q, k, v, case.sel)
    glist_sorted, n_sorted = jax.jit(functools.partial(R.select_sorted, sel=case.sel))(q, k)
    np.testing.assert_array_equal(np.asarray(n_g), np.asarray(n_sorted))
    np.testing.assert_array_equal(_valid(glist, n_g), _valid(glist_sorted, n_sorted))
    naive = jax.jit(functools.partial(R.reattention_naive, sel=case.sel))(q, k, v)
    assert rel_err(out, naive) < 1e-5
    return q, k, out, glist, n_g


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c.id)
def test_matches_sort_based_selection_and_dense_formulation(case):
    """Selection == the argsort/lexsort reference (same lists, same lengths); output == the
    keep-mask formulation (positions = running count of kept keys) to float32 round-off."""
    q, k, out, glist, n_g = check_dense_oracles(case, seed=case.length)
    # Not vacuous: the selection really dropped keys somewhere, and kept spans elsewhere.
    geo_sink = min(case.sel.sink_tokens, case.length)
    assert int(np.max(n_g)) > geo_sink
    last_l0 = np.asarray(R.chunk_bounds(jnp.zeros(case.batch, jnp.int32),
                                        R.geometry(q.shape, k.shape, case.sel))[2])[:, -1]
    assert (np.asarray(n_g)[:, :, -1] < last_l0[:, None]).all()


def rotated_full_attention(q, k, v):
    """Causal full attention of RoPE(q), RoPE(k) at the original positions 0 .. T-1."""
    inv_freq = R.default_inv_freq(q.shape[-1])
    pos = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
    cos, sin = rope_cos_sin(pos, inv_freq)
    return cca_reference.full_attention_naive(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)


@pytest.mark.parametrize("case", [
    Case(2, 61, 4, 2, 64, small(2, 8, 61, 61, 1, 16, 4)),
    Case(1, 50, 5, 1, 128, small(3, 5, 50, 50, 3, 7, 1)),
], ids=lambda c: c.id)
def test_selecting_everything_is_full_attention(case):
    """With top_k and max_selected >= S every middle key is kept: positions 0..n-1 are the
    original ones and ReAttention is causal full attention with RoPE."""
    q, k, v = make_qkv(case, seed=3)
    out, _, n_g = _reference(q, k, v, case.sel)
    assert rel_err(out, rotated_full_attention(q, k, v)) < 1e-5
    c0, _, l0 = R.chunk_bounds(jnp.zeros(case.batch, jnp.int32),
                               R.geometry(q.shape, k.shape, case.sel))
    np.testing.assert_array_equal(np.asarray(n_g), np.broadcast_to(np.asarray(l0)[:, None],
                                                                   n_g.shape))


PARAMS = ("sink_tokens", "local_window", "top_k", "max_selected", "span", "chunk_size",
          "middle_align")
prefill = jax.jit(R.reattention, static_argnames=PARAMS)
decode = jax.jit(R.reattention_decode, static_argnames=PARAMS)


def test_decode_equals_prefill_rows():
    """A decode step at position t equals row t of a prefill whose chunk holds t alone: every row
    of a chunk_size=1 prefill, and the last row of a default-chunked prefill of 1 + m*C tokens.
    Batch elements at different lengths in one padded cache."""
    case = Case(2, 45, 8, 2, 64)
    q, k, v = make_qkv(case, seed=11)
    kw = dict(sink_tokens=3, local_window=6, top_k=2, max_selected=3, span=3, middle_align=4)
    lengths = jnp.array([34, 45])  # 34 = 1 + 3 * 11: a lone last query under chunk_size=11
    out = decode(q[jnp.arange(2), lengths - 1], k, v, lengths, **kw)
    sl = lambda x: x[:1, :34]
    chunked = prefill(sl(q), sl(k), sl(v), chunk_size=11, **kw)
    assert rel_err(out[0], chunked[0, -1]) < 1e-6
    one_by_one = prefill(sl(q), sl(k), sl(v), chunk_size=1, **kw)
    assert rel_err(out[0], one_by_one[0, -1]) < 1e-6
    # Not vacuous: the other rows of the chunked prefill shared a selection, and differ.
    assert rel_err(chunked[0, :-1], one_by_one[0, :-1]) > 1e-3
    # Every row of a chunk_size=1 prefill is a decode step (batch element 1, full length).
    full = prefill(q[1:], k[1:], v[1:], chunk_size=1, **kw)
    assert rel_err(out[1], full[0, -1]) < 1e-6
    rows = jnp.array([17, 29])
    steps = decode(q[1, rows], jnp.broadcast_to(k[1:], k.shape), jnp.broadcast_to(v[1:], v.shape),
                   rows + 1, **kw)
    assert rel_err(steps, full[0, rows]) < 1e-6


def test_continuation_equals_prefill_rows():
    """Queries of positions [c, T) over the whole cache (chunked prefill, q_start = S - T)
    equal rows [c, T) of one prefill when c is a chunk boundary."""
    case = Case(2, 70, 4, 2, 64, small(2, 9, 2, 4, 4, 10, 2))
    q, k, v = make_qkv(case, seed=5)
    full = _reference(q, k, v, case.sel)[0]
    tail = jax.jit(functools.partial(R.reattention_with_selection, sel=case.sel))(q[:, 40:], k,
                                                                                  v)[0]
    assert rel_err(tail, full[:, 40:]) < 1e-6


def test_select_from_picks_by_hand():
    """Votes, the cap, the tie-breaks (best score, then position), span clipping and merging."""
    sel = Selection(sink_tokens=2, local_window=4, top_k=1, max_selected=3, span=3,
                    chunk_size=8, middle_align=1)
    # key: votes (best score) -> 10: 3 (1.0), 11: 2 (0.5), 30: 1 (9.0), 20: 1 (5.0), 39: 1 (9.0)
    idx = [10, 11, 10, 20, 30, 11, 10, 39, -1, -1]
    val = [1.0, 0.5, 0.2, 5.0, 9.0, 0.1, 0.3, 9.0, 99.0, 99.0]
    select = jax.jit(R.select_from_picks, static_argnames="sel")
    glist, n_g = select(jnp.array([idx]), jnp.array([val]), jnp.array([50]), jnp.array([40]),
                        sel=sel)
    # 10 and 11 win on votes; 30 and 39 tie on votes and score: 30 (lower position) wins.
    # Spans [9, 11] and [10, 12] merge; [29, 31]; sink [0, 1].
    assert int(n_g[0]) == 2 + 4 + 3
    assert np.asarray(glist[0, :9]).tolist() == [0, 1, 9, 10, 11, 12, 29, 30, 31]
    # Cap 5: 39's span is clipped at L0 = 40 and 20 joins; the sink shrinks to c0 when c0 < sink.
    sel5 = Selection(2, 4, 1, 5, 3, 8, 1)
    glist, n_g = select(jnp.array([idx]), jnp.array([val]), jnp.array([50]), jnp.array([40]),
                        sel=sel5)
    assert np.asarray(glist[0, : int(n_g[0])]).tolist() == [0, 1, 9, 10, 11, 12, 19, 20, 21, 29,
                                                             30, 31, 38, 39]
    glist, n_g = select(jnp.array([[-1, -1]]), jnp.array([[0.0, 0.0]]), jnp.array([1]),
                        jnp.array([1]), sel=sel5)
    assert int(n_g[0]) == 1 and int(glist[0, 0]) == 0


def test_topk_ties_go_to_the_lower_position():
    """Identical keys score identically: each row keeps the lowest positions among equals, as
    a stable argsort does (the rule every implementation follows)."""
    case = Case(1, 8, 2, 1, 64, small(1, 4, 3, 8, 1, 8, 1))
    q, k, _ = make_qkv(case, seed=2, num_keys=40)
    k = k.at[:, 20:30].set(k[:, 5:6])  # keys 5 and 20..29 are equal
    q = jnp.broadcast_to(k[:, 5:6], q.shape)  # ...and every row's best (|k|^2 vs O(sqrt(D)))
    geo = R.geometry(q.shape, k.shape, case.sel)
    c0, _, l0 = R.chunk_bounds(jnp.array([32]), geo)
    assert int(c0[0, 0]) == 32 and int(l0[0, 0]) == 28  # middle [1, 28): 5 and 20..27
    score = jax.jit(R.score_topk, static_argnames=("sel", "key_block"))
    vals, idx = score(R.pack_rows(q, geo)[:, :, 0], k.transpose(0, 2, 1, 3), l0[:, 0],
                      sel=case.sel, key_block=8)
    assert (np.asarray(idx) == np.array([5, 20, 21])).all()
    glist, n_g = jax.jit(functools.partial(R.select_sorted, sel=case.sel))(q, k)
    ours, n_ours = _reference(q, k, k, case.sel)[1:]
    assert int(n_g[0, 0, 0]) == int(n_ours[0, 0, 0]) == 4
    np.testing.assert_array_equal(np.asarray(glist)[..., :4], np.asarray(ours)[..., :4])
    assert np.asarray(ours)[0, 0, 0, :4].tolist() == [0, 5, 20, 21]


@pytest.mark.parametrize("bad,match", [
    (dict(top_k=0), "top_k"),
    (dict(sink_tokens=-1), "sink_tokens"),
    (dict(span=0), "span"),
    (dict(chunk_size=2.5), "chunk_size"),
    (dict(implementation="cuda"), "unknown implementation"),
])
def test_bad_arguments_name_the_problem(bad, match):
    q, k, v = make_qkv(Case(1, 16, 2, 1, 64), seed=0)
    with pytest.raises(ValueError, match=match):
        ops.reattention(q, k, v, **bad)


@pytest.mark.parametrize("bad,match", [
    (dict(q_start=jnp.array([1, 2, 3])), "q_start must be a scalar or one value per batch"),
    (dict(q_start=2.0), "q_start must be integers; got dtype float"),
    (dict(q_start=jnp.array([-1, 0])), r"q_start must lie in \[0, 40\]"),
    (dict(q_start=40, q_lengths=jnp.array([0, 1])), "a query past the cache: q_start \\+ q_len"),
    (dict(q_start=jnp.array([30, 0])), "a query past the cache: q_start \\+ T"),
    (dict(q_start=30, q_lengths=jnp.array([11, 0])), "a query past the cache: q_start \\+ q_len"),
    (dict(q_lengths=jnp.array([17, 3])), r"q_lengths must lie in \[0, 16\]"),
    (dict(q_lengths=jnp.array([3])), "q_lengths must be a scalar or one value per batch"),
    (dict(q_lengths=jnp.array([True, False])), "q_lengths must be integers; got dtype bool"),
])
def test_bad_positions_name_the_problem(bad, match):
    """Positions the op does not define raise (before, an out-of-range q_start or q_lengths, or
    a float one, ran and returned something): every real query needs its own key in the cache,
    0 <= q_lengths <= T. Under jit the values are traced and only shapes and dtypes are
    checked."""
    q, k, v = make_qkv(Case(2, 40, 2, 1, 64), seed=0)
    q = q[:, :16]
    with pytest.raises(ValueError, match=match):
        ops.reattention(q, k, v, **bad)


def test_good_positions_pass_and_traced_ones_are_not_read():
    q, k, v = make_qkv(Case(2, 40, 2, 1, 64), seed=0)
    q = q[:, :16]
    sel = dict(sink_tokens=2, local_window=8, top_k=2, max_selected=2, span=3, chunk_size=8,
               middle_align=4)
    ops.reattention(q, k, v, q_start=jnp.array([24, 0]), **sel)
    ops.reattention(q, k, v, q_start=30, q_lengths=jnp.array([10, 0]), **sel)  # padding past S
    ops.reattention(q, k, v, q_start=jnp.array([40, 24]), q_lengths=jnp.array([0, 16]), **sel)
    f = jax.jit(lambda s: ops.reattention(q, k, v, q_start=s, **sel))
    assert f(jnp.array([24, 3])).shape == q.shape


@pytest.mark.parametrize("lengths,match", [
    (jnp.array([0, 3]), r"lengths must lie in \[1, 40\]"),
    (jnp.array([41, 3]), r"lengths must lie in \[1, 40\]"),
    (jnp.array([3]), "lengths must be a scalar or one value per batch"),
    (jnp.array([3.0, 2.0]), "lengths must be integers"),
])
def test_bad_decode_lengths_name_the_problem(lengths, match):
    q, k, v = make_qkv(Case(2, 40, 2, 1, 64), seed=0)
    with pytest.raises(ValueError, match=match):
        ops.reattention_decode(q[:, -1], k, v, lengths)


def test_bad_shapes_name_the_problem():
    q, k, v = make_qkv(Case(1, 16, 3, 2, 64), seed=0)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        ops.reattention(q, k, v)
    q, k, v = make_qkv(Case(1, 16, 4, 2, 64), seed=0)
    with pytest.raises(ValueError, match="expects q"):
        ops.reattention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="dtype"):
        ops.reattention(q, k.astype(jnp.bfloat16), v)
    with pytest.raises(ValueError, match="T <= S"):
        ops.reattention(q, k[:, :8], v[:, :8])
    with pytest.raises(ValueError, match="inv_freq"):
        ops.reattention(q, k, v, inv_freq=np.ones(3, np.float32))
    with pytest.raises(ValueError, match="power-of-two head dim"):
        q, k, v = make_qkv(Case(1, 16, 4, 2, 48), seed=0)
        ops.reattention(q, k, v, implementation="pallas")
