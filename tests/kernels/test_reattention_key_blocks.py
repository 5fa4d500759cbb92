"""Block picks (``Selection.key_block``, ``kernels/reattention/key_blocks.py``): the score is an
upper bound of the block's best q . k, the reference equals the dense oracle that evaluates that
bound element by element, selecting every block is full attention, a planted needle's block is
picked, decode equals prefill rows, the Pallas kernels equal the reference (interpreted here,
compiled with ``-m gpu``), and bad parameters name the problem."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from kernels.reattention import key_blocks
from kernels.reattention import pallas as P
from kernels.reattention import pallas_block_select as BS
from kernels.reattention import pallas_mgpu_score as M
from kernels.reattention import pallas_summaries
from kernels.reattention import reference as R
from kernels.reattention import reference_torch
from kernels.reattention.params import Selection
from kernels.reattention.shapes import BLOCK_CASES, Case
from tests.kernels.conftest import TOL, export_for_cuda, rel_err
from tests.kernels.test_reattention_ops import (_config, assert_same_selection, needs_gpu,
                                                pallas_run, reference_run)
from tests.kernels.test_reattention_reference import (_reference, _valid, check_dense_oracles,
                                                      make_qkv, rotated_full_attention)

SEL = Selection(sink_tokens=3, local_window=8, top_k=2, max_selected=3, span=4, chunk_size=7,
                middle_align=8, key_block=4)


def test_block_score_bounds_every_key_of_the_block():
    """[q+, q-] . [max, min] is sum_d max(q_d max_d, q_d min_d) >= q . k for every key of the
    block, reached when the block is one key repeated; the torch twin gives the same rows."""
    q = jax.random.normal(jax.random.PRNGKey(0), (1, 5, 2, 16))
    k = jax.random.normal(jax.random.PRNGKey(1), (1, 3 + 6 * 4 + 2, 2, 16))  # 6 whole blocks
    rows, summ = key_blocks.signed_queries(q), key_blocks.summaries(k, SEL)
    assert summ.shape == (1, 16, 2, 32)  # sink 3 + 6 blocks, padded to 8 rows
    assert not np.asarray(summ[:, :3]).any() and not np.asarray(summ[:, 9:]).any()
    bound = jnp.einsum("bthd,bjhd->bthj", rows, summ[:, 3:9], precision=R.HIGHEST)
    blocks = k[:, 3:27].reshape(1, 6, 4, 2, 16)
    direct = jnp.maximum(q[:, :, :, None, :] * blocks.max(2).transpose(0, 2, 1, 3)[:, None],
                         q[:, :, :, None, :] * blocks.min(2).transpose(0, 2, 1, 3)[:, None])
    np.testing.assert_allclose(bound, direct.sum(-1), rtol=1e-5, atol=1e-5)
    tokens = jnp.einsum("bthd,bjihd->bthji", q, blocks, precision=R.HIGHEST).max(-1)
    assert (np.asarray(bound) >= np.asarray(tokens) - 1e-5).all()
    same = jnp.repeat(k[:, 3:9], 4, axis=1)  # each block one key four times: bound = q . k
    tight = jnp.einsum("bthd,bjhd->bthj", rows,
                       key_blocks.summaries(jnp.pad(same, [(0, 0), (3, 0), (0, 0), (0, 0)]),
                                            SEL)[:, 3:9], precision=R.HIGHEST)
    np.testing.assert_allclose(tight, jnp.einsum("bthd,bjhd->bthj", q, k[:, 3:9]), rtol=1e-5,
                               atol=1e-5)
    l0 = jnp.array([2, 3, 11, 27, 35])
    np.testing.assert_array_equal(key_blocks.summary_end(l0, k.shape[1], SEL), [2, 3, 5, 9, 9])
    np.testing.assert_array_equal(key_blocks.centres(jnp.array([-1, 3, 4, 8]), SEL),
                                  [-1, 5, 9, 25])
    q_t, k_t, end_t = reference_torch.block_scoring_inputs(
        torch.as_tensor(np.array(q)), torch.as_tensor(np.array(k)),
        torch.as_tensor(np.array(l0)), SEL)
    np.testing.assert_array_equal(q_t.numpy(), np.asarray(rows))
    np.testing.assert_array_equal(k_t.numpy(), np.asarray(summ))
    np.testing.assert_array_equal(end_t.numpy(), [2, 3, 5, 9, 9])
    np.testing.assert_array_equal(
        reference_torch.block_centres(torch.tensor([-1, 3, 4, 8]), SEL).numpy(), [-1, 5, 9, 25])


@pytest.mark.parametrize("case", BLOCK_CASES, ids=lambda c: c.id)
def test_matches_the_dense_block_oracle(case):
    """Same lists as ``select_sorted`` (which evaluates the bound element by element, sorts
    every block, counts votes over the sequence); output == the keep-mask formulation. Every
    list is whole blocks, and some chunk dropped blocks."""
    q, k, out, glist, n_g = check_dense_oracles(case, seed=case.length + 1)
    sel, lists = case.sel, _valid(glist, n_g).reshape(-1, glist.shape[-1])
    for row, n in zip(lists, np.asarray(n_g).ravel()):
        middle = row[:n][row[:n] >= sel.sink_tokens] - sel.sink_tokens
        counts = np.bincount(middle // sel.key_block)
        assert set(counts.tolist()) <= {0, sel.key_block}, counts
    c0, _, l0 = R.chunk_bounds(jnp.zeros(case.batch, jnp.int32),
                               R.geometry(q.shape, k.shape, sel))
    assert (np.asarray(n_g)[:, :, -1] < np.asarray(l0)[:, None, -1]).all()  # blocks dropped


def test_selecting_every_block_is_full_attention():
    case = Case(2, 61, 4, 2, 64, Selection(2, 8, 61, 61, 4, 16, 4, key_block=4))
    q, k, v = make_qkv(case, seed=4)
    out, *_ = _reference(q, k, v, case.sel)
    assert rel_err(out, rotated_full_attention(q, k, v)) < 1e-5


def test_a_planted_needle_block_is_picked():
    """One middle key equal to 6 x the last query's direction wins its block's bound for that
    query, so with one pick kept the last chunk attends exactly that block."""
    case = Case(1, 200, 2, 1, 64, Selection(4, 16, 1, 1, 8, 1, 8, key_block=8))
    q, k, v = make_qkv(case, seed=11)
    k = k * 0.3
    needle = 4 + 8 * 9 + 5  # block 9
    k = k.at[0, needle, 0].set(6.0 * q[0, -1, 0] / jnp.linalg.norm(q[0, -1, 0]))
    q = q.at[0, -1, 1].set(q[0, -1, 0])  # both heads look for it
    _, glist, n_g = _reference(q, k, v, case.sel)
    last = np.asarray(glist)[0, 0, -1, : int(n_g[0, 0, -1])]
    np.testing.assert_array_equal(last, list(range(4)) + list(range(4 + 72, 4 + 80)))


def test_decode_equals_prefill_rows():
    sel = dict(sink_tokens=3, local_window=8, top_k=2, max_selected=3, span=4, middle_align=8,
               key_block=4)
    case = Case(1, 57, 4, 2, 64)
    q, k, v = make_qkv(case, seed=5)
    rows = jax.jit(functools.partial(R.reattention, chunk_size=1, **sel))(q, k, v)
    for t in (20, 40, 57):
        step = R.reattention_decode(q[:, t - 1], k, v, jnp.array([t]), **sel)
        assert rel_err(step, rows[:, t - 1]) < 1e-6


@pytest.mark.parametrize("case", BLOCK_CASES, ids=lambda c: c.id)
def test_pallas_matches_reference(case):
    q, k, v = make_qkv(case, seed=300 + case.length)
    out, *selection = pallas_run(q, k, v, case.sel)
    ref, *ref_selection = reference_run(q, k, v, case.sel)
    assert rel_err(out, ref) < TOL[jnp.float32]
    assert_same_selection(selection, ref_selection)


def test_pallas_bf16_and_split_scoring_match_reference():
    """bf16 (signed rows and summaries are exact in bf16, so the picks are the reference's) and
    the scoring's key splits over the summary rows."""
    case = Case(2, 111, 8, 2, 64, Selection(3, 16, 2, 6, 4, 32, 8, key_block=4))
    q, k, v = (x.astype(jnp.bfloat16) for x in make_qkv(case, seed=41))
    ref, *ref_selection = reference_run(q, k, v, case.sel)
    for config in (None, _config(score_splits=3)):
        out, *selection = pallas_run(q, k, v, case.sel, config)
        assert_same_selection(selection, ref_selection)
        assert rel_err(out, ref) < TOL[jnp.bfloat16]


def test_votes_counted_per_block_give_the_same_lists():
    """``select_from_block_picks`` (votes by scatter, one sort of the blocks) gives the lists of
    ``select_from_picks`` (two sorts of the picks) on random block picks: repeated blocks, ties
    of scores (zeros of both signs included), blocks past L0, no picks, caps that cut."""
    rng = np.random.default_rng(0)
    by_blocks = jax.jit(R.select_from_block_picks, static_argnums=(4, 5))  # one compile per
    by_picks = jax.jit(R.select_from_picks, static_argnums=(4,))  # trial, not one per op
    for trial in range(12):
        b = int(rng.choice([2, 4, 8, 32]))
        sink, s = int(rng.integers(0, 40)), int(rng.integers(50, 3000))
        sel = Selection(sink, 8, 3, int(rng.integers(1, 12)), b, 16, b, key_block=b)
        nb = key_blocks.num_blocks(s, sel)
        n, p = 7, int(rng.integers(1, 200))
        idx = sel.sink_tokens + rng.integers(0, max(nb, 1), (n, p)) * b + b // 2
        idx = np.where((rng.random((n, p)) < 0.2) | (nb == 0), -1, idx).astype(np.int32)
        val = (rng.choice(np.array([-1.0, 0.0, -0.0, 0.5, 2.0], np.float32), (n, p))
               if trial % 2 else rng.standard_normal((n, p)).astype(np.float32))
        c0 = rng.integers(sink, s + 1, n).astype(np.int32)
        l0 = np.minimum(c0, rng.integers(sink, s + 1, n)).astype(np.int32)
        args = [jnp.asarray(x) for x in (idx, val, c0, l0)]
        for got, want in zip(by_blocks(*args, sel, s), by_picks(*args, sel)):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_pallas_scatter_votes_match_the_sorts(monkeypatch):
    """The op with ``Config.block_select="scatter"`` and "kernel" (the block-selection kernel)
    gives the sorts' lists and outputs (64 rows x top_k 3 = 192 picks per chunk: past the
    small-selection kernel's 64)."""
    case = BLOCK_CASES[1]
    q, k, v = make_qkv(case, seed=3)
    calls = []
    scatter = R.select_from_block_picks
    monkeypatch.setattr(R, "select_from_block_picks",
                        lambda *args: calls.append(1) or scatter(*args))
    runs = [P.reattention_with_selection(q, k, v, sel=case.sel, interpret=True,
                                         config=_config(block_select=mode))
            for mode in ("sort", "scatter", "kernel")]
    assert calls == [1]  # the scatter path ran (once: "kernel" counts votes on its own)
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_auto_takes_the_kernel_else_the_scatter_where_the_blocks_are_fewer(monkeypatch):
    """``block_select="auto"`` keeps the blocks by the block-selection kernel; where the kernel
    does not apply (NB past its bound, lowered here to 60), by the scatter where NB <= P (the
    chunk's picks, here 80: past the small-selection kernel's 64) and the sorts elsewhere.
    "kernel" past the bound takes the scatter. The same lists every time."""
    sel = Selection(8, 8, 2, 5, 32, 8, 32, key_block=32)
    p = 80
    calls = []
    for module, name in ((R, "select_from_block_picks"), (BS, "kept_centres")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args, _f=original, _n=name, **kw:
                            calls.append(_n) or _f(*args, **kw))
    rng = np.random.default_rng(1)
    kernel, scatter, unbounded = ["kept_centres"], ["select_from_block_picks"], BS.MAX_BLOCKS
    for bound, nb, mode, path in [(None, p, "auto", kernel), (None, p + 1, "auto", kernel),
                                  (60, p, "auto", scatter), (60, p + 1, "auto", []),
                                  (60, p + 1, "kernel", scatter), (None, p + 1, "scatter", scatter),
                                  (None, p // 2, "sort", [])]:
        monkeypatch.setattr(BS, "MAX_BLOCKS", bound or unbounded)
        s_keys = sel.sink_tokens + nb * sel.key_block
        assert key_blocks.num_blocks(s_keys, sel) == nb
        idx = (sel.sink_tokens + rng.integers(0, nb, (3, p)) * sel.key_block
               + sel.key_block // 2).astype(np.int32)
        val = rng.standard_normal((3, p)).astype(np.float32)
        c0 = l0 = jnp.full((3,), s_keys, jnp.int32)
        want = R.select_from_picks(jnp.asarray(idx), jnp.asarray(val), c0, l0, sel)
        calls.clear()
        got = P._select(jnp.asarray(idx)[:, None], jnp.asarray(val)[:, None], c0, l0, sel,
                        True, p, s_keys, mode)  # candidates (N, C = 1, R' = P)
        assert calls == path, (bound, nb, mode, calls)
        for x, y in zip(got, want):
            np.testing.assert_array_equal(np.asarray(x)[..., :y.shape[-1]], np.asarray(y))


@pytest.mark.parametrize("s,hkv,d,sink,kb", [
    (1000, 2, 64, 3, 8),  # 124 blocks: 16 tiles, the last one starting early
    (300, 1, 128, 32, 32),  # 8 blocks: one tile
    (77, 2, 32, 5, 16),  # 4 blocks: a tile of 4
    (20, 1, 32, 12, 16),  # no whole block: zeros
])
def test_summaries_kernel_equals_its_jnp_twin(s, hkv, d, sink, kb):
    """The Pallas summaries (interpreted; NaN-poisoned output, so a row it skips shows) have
    the jnp twin's bits, sink rows and padding zeros included."""
    sel = Selection(sink, 8, 2, 4, kb, 16, kb, key_block=kb)
    k = jax.random.normal(jax.random.PRNGKey(s), (2, s, hkv, d), jnp.bfloat16)
    with P.poison_outputs():
        got = pallas_summaries.summaries(k, sel, interpret=True)
    np.testing.assert_array_equal(np.asarray(got, np.float32),
                                  np.asarray(key_blocks.summaries(k, sel), np.float32))


def test_summaries_kernel_checks_and_lowers_for_cuda():
    """Blocks and head dims that are not powers of two go to the jnp twin (``applies``); the
    kernel refuses them by name. At 128K with 32 kv heads it lowers for CUDA on the CPU."""
    assert not pallas_summaries.applies(Selection(key_block=24, span=24, middle_align=96), 128)
    assert not pallas_summaries.applies(Selection(key_block=32), 96)
    assert not pallas_summaries.applies(Selection(), 128)  # token picks
    with pytest.raises(ValueError, match="key_block 24"):
        pallas_summaries.summaries(jnp.zeros((1, 100, 1, 64), jnp.bfloat16),
                                   Selection(key_block=24, span=24, middle_align=96))
    exported = export_for_cuda(lambda k: pallas_summaries.summaries(k, Selection(key_block=32)),
                               jax.ShapeDtypeStruct((1, 131072, 32, 128), jnp.bfloat16))
    assert exported.out_avals[0].shape == (1, 32 + 4095 + 1, 32, 256)


@pytest.mark.parametrize("bad,match", [
    (dict(span=32, key_block=16), "span must equal it"),
    (dict(span=48, key_block=48), "divide middle_align"),
    (dict(key_block=0), "key_block must be a positive int"),
    (dict(key_block=True), "key_block must be a positive int"),
])
def test_bad_key_blocks_name_the_problem(bad, match):
    with pytest.raises(ValueError, match=match):
        Selection(**bad)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_32k_bf16_block_picks(head_dim):
    """32K, 32 q / 8 kv heads, blocks of 32 with the authors' other defaults: head dim 64 scores
    128-wide rows on the Mosaic GPU kernel, 128 scores 256-wide rows on the Triton lowering."""
    case = Case(1, 32768, 32, 8, head_dim, Selection(key_block=32))
    q, k, v = (x.astype(jnp.bfloat16) for x in make_qkv(case, seed=33))
    out, gl, n = pallas_run(q, k, v, case.sel)
    ref, gl_ref, n_ref = reference_run(q, k, v, case.sel)
    assert rel_err(out, ref) < TOL[jnp.bfloat16]
    same = (_valid(gl, n) == _valid(gl_ref, n_ref)).all(-1) & (np.asarray(n) == np.asarray(n_ref))
    assert same.mean() > 0.95, same.mean()  # near-ties may flip a rare pick, never many



@pytest.mark.parametrize("signed", [False, True], ids=["xla_signs", "kernel_signs"])
@pytest.mark.parametrize("consumers,slots,tokens", [(4, 2, False), (2, 3, True)])
def test_signed_rows_lower_for_the_mosaic_gpu_scoring(consumers, slots, tokens, signed):
    """At d = 128 the signed rows are 256 wide: the Mosaic GPU scoring takes them with a ring
    that fits in shared memory (``fitting_slots``: 2 slots with 4 consumers, 4 with 2), packed
    or read in place, made by XLA or (``signed``) by the kernel from q's 128-wide rows; lowered
    for CUDA here, compiled with -m gpu."""
    bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    assert M.supports(jnp.bfloat16, 256, 4096, 4) and not M.supports(jnp.float32, 256, 4096, 4)
    assert M.smem_bytes(256, 2, 4, 64, 4, 4, "lanes") > M.SMEM_BYTES
    assert M.fitting_slots(4, 256, 2, 4, 64, 4, "lanes") == 2
    assert M.fitting_slots(4, 256, 2, 4, 64, 2, "lanes") == 4
    assert M.fitting_slots(6, 128, 2, 4, 64, 4, "lanes") == 6
    k, l0 = bf16(1, 4096, 2, 256), jax.ShapeDtypeStruct((1, 3), jnp.int32)
    width = 128 if signed else 256
    rows = bf16(1, 1536, 8, width) if tokens else bf16(1, 2, 3, 64 * consumers, width)
    score = functools.partial(M.score, sink=32, top_k=4, splits=2, split_len=2048, block_k=64,
                              slots=slots, consumers=consumers,
                              tokens=(512, 0, 2048) if tokens else None, signed=signed)
    exported = export_for_cuda(score, rows, k, l0)
    r = 2048 if tokens else 64 * consumers
    assert [o.shape for o in exported.out_avals] == [(1, 2, 3, 2, 4, r)] * 2
    with pytest.raises(ValueError, match="use fewer slots"):
        M.score(jnp.zeros((1, 2, 3, 256, 256), jnp.bfloat16), jnp.zeros((1, 4096, 2, 256),
                jnp.bfloat16), jnp.zeros((1, 3), jnp.int32), sink=32, top_k=4, splits=1,
                split_len=4096, slots=4, consumers=4, interpret=True)
    zeros = lambda *shape: jnp.zeros(shape, jnp.bfloat16)
    l0 = jnp.zeros((1, 3), jnp.int32)
    call = functools.partial(M.score, l0=l0, sink=32, top_k=4, splits=1, split_len=4096,
                             slots=2, consumers=4, interpret=True)
    with pytest.raises(ValueError, match=r"shapes disagree.*2 x the rows' width"):
        call(zeros(1, 2, 3, 256, 64), zeros(1, 4096, 2, 256), signed=True)
    with pytest.raises(ValueError, match="shapes disagree"):  # unsigned: widths must match
        call(zeros(1, 2, 3, 256, 64), zeros(1, 4096, 2, 128))
    with pytest.raises(ValueError, match="head dim 64 or 128"):  # halves below a smem tile
        call(zeros(1, 2, 3, 256, 32), zeros(1, 4096, 2, 64), signed=True)


@pytest.mark.parametrize("tokens", [False, True], ids=["packed", "in_place"])
def test_signed_rows_made_in_the_kernel_equal_xla_signs_in_the_interpreter(tokens):
    """CPU twin of the GPU test below: the Mosaic GPU scoring kernel in its interpreter (which
    merges in rounds), q's own rows signed in shared memory (``signed=True``) against the
    rows ``signed_queries(q)``: the same picks and scores, bit for bit; packed rows, and rows
    read in place (two query heads per kv head, so two copies per tile)."""
    rng = np.random.default_rng(4)
    bf16 = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    k = bf16(1, 256, 1, 128)  # 2D-wide summaries, D = 64
    if tokens:  # chunks of 64 queries x G = 2 -> 128 rows; padded as far as a tile reads
        q = jnp.pad(bf16(1, 128, 2, 64), ((0, 0), (0, 64), (0, 0), (0, 0)))
        l0, extra = jnp.asarray([[200, 150]], jnp.int32), dict(tokens=(64, 0, 128))
    else:
        q, l0, extra = bf16(1, 1, 1, 128, 64), jnp.asarray([[200]], jnp.int32), {}
    score = functools.partial(M.score, k=k, l0=l0, sink=8, top_k=3, splits=1, split_len=256,
                              block_k=64, slots=2, consumers=2, interpret=True, **extra)
    got, want = score(q, signed=True), score(key_blocks.signed_queries(q))
    assert (np.asarray(want[1]) >= 0).all()
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("head_dim,signed", [(32, False), (64, True), (128, True)])
def test_kernel_signs_only_where_its_halves_fit(monkeypatch, head_dim, signed):
    """Where the Mosaic GPU scoring runs (patched in here), block picks hand it q's own rows to
    sign at head dim 64 and 128, and XLA's 2D-wide copy at 32 (halves below a 64-wide
    shared-memory tile)."""
    seen = []

    class Stop(Exception):
        pass

    def record(q_rows, *args, signed=False, **kwargs):
        seen.append((q_rows.shape[-1], signed))
        raise Stop

    monkeypatch.setattr(P, "_uses_mgpu_score", lambda *args: True)
    monkeypatch.setattr(P, "_score", record)
    case = Case(1, 256, 4, 2, head_dim, Selection(4, 16, 2, 3, 8, 64, 8, key_block=8))
    q, k, _ = (x.astype(jnp.bfloat16) for x in make_qkv(case, seed=2))
    with pytest.raises(Stop):
        P.picks(q, k, sel=case.sel, interpret=True)
    assert seen == [(head_dim if signed else 2 * head_dim, signed)]


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("hkv", [32, 8])
def test_gpu_signed_rows_on_the_mosaic_gpu_scoring(hkv):
    """32K, d = 128, blocks of 32: the Mosaic GPU scoring of the 256-wide signed rows (4
    consumers, 2 slots) picks what the Triton lowering picks."""
    case = Case(1, 32768, 32, hkv, 128, Selection(key_block=32))
    q, k, _ = (x.astype(jnp.bfloat16) for x in make_qkv(case, seed=19))
    rows = 512 * 32 // hkv

    def picks(lowering):
        config = dataclasses.replace(P.default_config(128, 2, rows), score_lowering=lowering,
                                     mgpu_slots=2)
        return jax.jit(lambda q, k: P.picks(q, k, sel=case.sel, config=config))(q, k)

    (vals_m, idx_m), (vals_t, idx_t) = picks("mosaic_gpu"), picks("triton")
    same = np.sort(np.asarray(idx_m), -1) == np.sort(np.asarray(idx_t), -1)
    assert same.mean() > 0.9999, same.mean()
    assert (np.asarray(idx_t) >= 0).mean() > 0.5
    # The kernel's own signed rows (the default) against XLA's copy: the same wgmma steps, so
    # the same picks and scores, bit for bit; with q read in place and from packed rows.
    for q_rows in ("in_place", "packed"):
        got, want = (jax.jit(lambda q, k, c=dataclasses.replace(
            P.default_config(128, 2, rows), score_lowering="mosaic_gpu", mgpu_slots=2,
            mgpu_rows=q_rows, mgpu_signed_rows=signs): P.picks(q, k, sel=case.sel, config=c))(
                q, k) for signs in ("in_kernel", "xla"))
        for a, b in zip(got, want):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@needs_gpu
@pytest.mark.gpu
def test_gpu_decode_step_with_block_picks_at_128k():
    """A decode step over a 128K cache, 32 q / 8 kv heads, d = 128, blocks of 32 (the Triton
    lowering scores its 256-wide signed rows: "auto" takes the Mosaic GPU scoring for them
    only with a prefill's 4 consumers, the measured case), against the float32 reference."""
    case = Case(1, 131072, 32, 8, 128)
    q, k, v = (x.astype(jnp.bfloat16) for x in make_qkv(case, seed=21))
    lengths = jnp.array([131000])
    with P.poison_outputs():
        got = jax.jit(functools.partial(P.reattention_decode, key_block=32))(q[:, -1], k, v,
                                                                            lengths)
    f32 = lambda x: x.astype(jnp.float32)
    want = jax.jit(functools.partial(R.reattention_decode, key_block=32))(
        f32(q[:, -1]), f32(k), f32(v), lengths)
    assert rel_err(got, want) < TOL[jnp.bfloat16]


@needs_gpu
@pytest.mark.gpu
def test_gpu_summaries_kernel_at_128k():
    """Compiled (Triton), at 128K with 32 kv heads and d = 128: the jnp twin's bits."""
    sel = Selection(key_block=32)
    k = jax.random.normal(jax.random.PRNGKey(23), (1, 131072, 32, 128), jnp.bfloat16)
    got = pallas_summaries.summaries(k, sel)
    np.testing.assert_array_equal(np.asarray(got, np.float32),
                                  np.asarray(jax.jit(key_blocks.summaries, static_argnums=1)(
                                      k, sel), np.float32))
