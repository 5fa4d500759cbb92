"""The Pallas ReAttention kernels against the jnp reference, through ``kernels.reattention.pallas``
and ``jax_cca.ops.reattention``: outputs, per-row picks and gathered lists, fp32 and bf16, the
split-key scoring path, decode, NaN-poisoned outputs.

On CPU the kernels run through the Pallas interpreter at small sizes with 16-wide tiles (several
row and key tiles, partial tiles, every masked/unmasked loop); with a GPU the same checks run
compiled, plus real sizes (``-m gpu``)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_cca import ops
from kernels.reattention import pallas as P
from kernels.reattention import reference as R
from kernels.reattention.params import Config, attend_splits
from kernels.reattention.shapes import CPU_CASES, Case, gpu_cases, small
from tests.kernels import reattention_runs as runs
from tests.kernels.conftest import TOL, rel_err
from tests.kernels.test_reattention_reference import make_qkv

ON_GPU = jax.default_backend() == "gpu"
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (runs on the device machine)")
SMALL = Config(score_block_q=16, score_block_k=16, score_stages=1, attn_block_q=16,
               attn_block_k=16, attn_stages=1)


def _config(**changes):
    return None if ON_GPU and not changes else Config(**{**SMALL.__dict__, **changes})


def pallas_run(q, k, v, sel, config=None, q_start=None):
    """(out, glist, n_g) of the Pallas path with NaN-poisoned kernel outputs."""
    return runs.pallas_fn(sel, config or _config())(q, k, v, q_start)


def reference_run(q, k, v, sel):
    f32 = lambda x: x.astype(jnp.float32)
    return runs.reference_fn(sel)(f32(q), f32(k), f32(v))


def assert_same_selection(got, want):
    (gl, n), (gl_ref, n_ref) = got, want
    np.testing.assert_array_equal(np.asarray(n), np.asarray(n_ref))
    live = np.arange(gl.shape[-1]) < np.asarray(n)[..., None]
    np.testing.assert_array_equal(np.where(live, gl, 0), np.where(live, gl_ref, 0))


@pytest.mark.parametrize("tail_keys", ["rotated", "in_kernel"])
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c.id)
def test_fp32_matches_reference(case, tail_keys):
    """Both ways of rotating the tail: a copy rotated once at the original positions (the
    default for prefill) and every tile in the kernel at the re-numbered positions."""
    q, k, v = make_qkv(case, seed=200 + case.length)
    out, *selection = pallas_run(q, k, v, case.sel, _config(tail_keys=tail_keys))
    ref, *ref_selection = reference_run(q, k, v, case.sel)
    assert rel_err(out, ref) < TOL[jnp.float32]
    assert_same_selection(selection, ref_selection)


def test_bf16_matches_reference():
    """bf16 kernels against the float32 reference on the same (bf16-rounded) inputs: same
    selection (scores are exact bf16 products summed in float32), output within 2e-2."""
    case = Case(2, 111, 8, 2, 64, small(3, 16, 2, 6, 4, 32, 8))
    q, k, v = (x.astype(jnp.bfloat16) for x in make_qkv(case, seed=31))
    out, *selection = pallas_run(q, k, v, case.sel)
    assert out.dtype == jnp.bfloat16
    ref, *ref_selection = reference_run(q, k, v, case.sel)
    assert_same_selection(selection, ref_selection)
    err = rel_err(out, ref)
    assert 1e-4 < err < TOL[jnp.bfloat16]  # really bf16 arithmetic, and close


@pytest.mark.parametrize("tail_keys", ["rotated", "in_kernel"])
def test_continuation_chunk_matches_reference(tail_keys):
    """Queries continuing a cache from a traced per-element q_start (chunked prefill): the
    rotated tail window starts past key 0 (ws > 0) and differs between the batch elements."""
    case = Case(2, 150, 4, 2, 64, small(3, 16, 2, 4, 5, 8, 4))
    q, k, v = make_qkv(case, seed=71)
    starts = jnp.array([110, 90])  # element 1's keys past 129 are not yet "written": ignored
    qc = jnp.stack([q[0, 110:150], q[1, 90:130]])
    geo = R.geometry(qc.shape, k.shape, case.sel)
    _, ws = P.tail_window(k, starts, geo, R.default_inv_freq(64))
    # W = 40 + 16 + 4 + 3 + 7 = 70 keys (S - W = 80, a multiple of 8); ws = 87, 67 rounded
    # down to multiples of 8
    assert np.asarray(ws).tolist() == [80, 64]
    out, *selection = pallas_run(qc, k, v, case.sel, _config(tail_keys=tail_keys), starts)
    ref, *ref_selection = runs.reference_fn(case.sel)(qc, k, v, starts)
    assert rel_err(out, ref) < TOL[jnp.float32]
    assert_same_selection(selection, ref_selection)


def test_tail_window_starts_at_a_multiple_of_8_and_covers_every_tail():
    """``tail_window``'s first key ws is a multiple of 8 (the Mosaic GPU attention copies the
    values' tail blocks from cache row ws + 8 m into 8-row tiles; the interpreter cannot see a
    misaligned start, jax 0.11 refuses to lower it) and [ws, ws + W) holds every chunk's tail
    [L0, min(c1, S)), for cache lengths on and off multiples of 8 and every query start."""
    sel = small(3, 5, 2, 4, 5, 8, 4)
    checked = 0
    for s_len in (37, 64, 125, 200):
        for t in (1, 5, 13):
            k = jnp.zeros((1, s_len, 1, 8), jnp.float32)
            geo = R.geometry((1, t, 1, 8), k.shape, sel)
            w_len = P.window_length(geo)
            assert w_len <= s_len and (w_len == s_len or (s_len - w_len) % 8 == 0)
            for start in range(0, s_len - t + 8, 3):  # also chunks written past the cache
                q0 = jnp.array([start])
                _, ws = P.tail_window(k, q0, geo, R.default_inv_freq(8))
                ws = int(ws[0])
                c0, c1, l0 = (np.asarray(x)[0] for x in R.chunk_bounds(q0, geo))
                ends = np.minimum(c1, s_len)
                live = l0 < ends
                assert ws % 8 == 0 and 0 <= ws and ws + w_len <= s_len, (s_len, t, start, ws)
                assert (l0[live] >= ws).all() and (ends[live] <= ws + w_len).all(), (
                    s_len, t, start, ws, w_len, l0, ends)
                checked += int(live.sum())
    assert checked > 100


@pytest.mark.parametrize("tail_keys", ["rotated", "in_kernel"])
def test_chunk_written_past_the_cache(tail_keys):
    """q_start + T > S (an extension whose rows past the cache are not stored, as
    ``decode._reattention_extend`` may pass): rows inside the cache equal the reference, and the
    contiguous tail tiles of every program stop before the cache's end (the kernel reads them
    unclamped, so one past it would read stray memory on a GPU; the interpreter clamps)."""
    sel = small(3, 5, 2, 4, 5, 64, 4)
    case = Case(1, 69, 2, 2, 32, sel)
    q, k, v = make_qkv(case, seed=91, num_keys=125)
    start = jnp.array([113])  # rows 113 .. 181; keys 0 .. 124
    out, *_ = pallas_run(q, k, v, sel, _config(tail_keys=tail_keys), start)
    ref, *_ = runs.reference_fn(sel)(q, k, v, start)
    assert rel_err(out[:, :12], ref[:, :12]) < TOL[jnp.float32]
    assert np.isfinite(np.asarray(out)).all()
    geo = R.geometry(q.shape, k.shape, sel)
    c0, c1, l0 = (np.asarray(x)[0] for x in R.chunk_bounds(start, geo))
    _, ws = P.tail_window(k, start, geo, R.default_inv_freq(32))
    bk, w_len, reads = 16, P.window_length(geo), 0
    for ci in range(geo.num_chunks):
        for r0 in range(0, geo.rows, 16):
            unmasked, _ = P.tail_tiles(c0[ci], c1[ci], l0[ci], r0, groups=1, bk=bk, s_len=125)
            end = int(l0[ci]) + int(unmasked) * bk  # one past the last unclamped key
            assert unmasked == 0 or (end <= 125 and end - int(ws[0]) <= w_len), (ci, r0, end)
            reads += int(unmasked)
    assert reads > 0  # not vacuous


@pytest.mark.parametrize("tail_keys,splits", [("rotated", 2), ("in_kernel", 5)])
def test_attention_key_splits(tail_keys, splits):
    """Config.attn_splits: each program takes a run of a row tile's key tiles (list, then
    tail; 5 splits leave some runs empty) and XLA merges the partial softmaxes; the same
    function as one split, up to float32 rounding, with every partial output written."""
    case = CPU_CASES[1]
    q, k, v = make_qkv(case, seed=211)
    out, *selection = pallas_run(q, k, v, case.sel, _config(tail_keys=tail_keys,
                                                            attn_splits=splits))
    one, *_ = pallas_run(q, k, v, case.sel, _config(tail_keys=tail_keys))
    ref, *ref_selection = reference_run(q, k, v, case.sel)
    assert rel_err(out, ref) < TOL[jnp.float32]
    assert rel_err(out, one) < 1e-6
    assert_same_selection(selection, ref_selection)


def test_decode_splits_its_attention(monkeypatch):
    """A decode step (one query) splits its attention's key tiles across programs by default
    (``params.attend_splits``: 2 runs of 4 tiles here); batch elements at different lengths
    against the reference."""
    case = Case(2, 300, 8, 2, 64)
    q, k, v = make_qkv(case, seed=53)
    kw = dict(sink_tokens=4, local_window=64, top_k=2, max_selected=4, span=8, middle_align=16)
    lengths = jnp.array([190, 300])
    qd = q[jnp.arange(2), lengths - 1]
    chosen = []
    monkeypatch.setattr(P, "attend_splits", lambda *a: chosen.append(attend_splits(*a)) or
                        chosen[-1])
    with P.poison_outputs():
        got = jax.jit(functools.partial(P.reattention_decode, config=_config(), **kw))(
            qd, k, v, lengths)
    assert chosen == [2]
    want = jax.jit(functools.partial(R.reattention_decode, **kw))(qd, k, v, lengths)
    assert rel_err(got, want) < TOL[jnp.float32]


@pytest.mark.parametrize("length", [20, 100])
def test_full_prefix_is_the_same_function(length):
    """Chunks whose middle is empty (c0 < sink + w + align) run as plain causal attention
    (``Config.full_prefix``, XLA here): all chunks at T = 20, three of 13 at T = 100."""
    sel = small(3, 16, 2, 4, 5, 8, 4)
    case = Case(2, length, 4, 2, 64, sel)
    q, k, v = make_qkv(case, seed=81)
    geo = R.geometry(q.shape, k.shape, sel)
    n_free = P.full_prefix_chunks(geo, None, "xla")
    assert n_free == min(geo.num_chunks, 3)
    c0, _, l0 = R.chunk_bounds(R.query_starts(None, 2, length, length), geo)
    empty = np.asarray(l0 == jnp.minimum(c0, sel.sink_tokens))[0]
    assert empty[:n_free].all() and not empty[n_free:].any()  # exactly the middle-free chunks
    out, *selection = pallas_run(q, k, v, sel, _config(full_prefix="xla"))
    ref, *ref_selection = reference_run(q, k, v, sel)
    assert rel_err(out, ref) < TOL[jnp.float32]
    for got, want in zip(selection, ref_selection):  # unused list slots too: bit for bit
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # Not at a start past 0, traced or not, nor with the keys of a longer cache, nor when off.
    assert P.full_prefix_chunks(geo, jnp.int32(0), "xla") == 0
    assert P.full_prefix_chunks(dataclasses.replace(geo, num_keys=length + 1), None, "xla") == 0
    assert P.full_prefix_chunks(geo, 0, "xla") == n_free
    assert P.full_prefix_chunks(geo, None, "off") == 0


def test_config_rejects_unknown_modes():
    """Unknown modes, a negative split count, and a rotated tail forced where the window is
    shorter than one tile."""
    with pytest.raises(ValueError, match="tail_keys must be"):
        Config(tail_keys="rotate")
    with pytest.raises(ValueError, match="full_prefix must be"):
        Config(full_prefix="flash")
    with pytest.raises(ValueError, match="attn_splits must be >= 0"):
        Config(attn_splits=-1)
    q, k, v = make_qkv(Case(1, 12, 2, 1, 32), seed=3)  # a 12-key window, 16-key tiles
    sel = small(2, 4, 1, 2, 3, 4, 2)
    with pytest.raises(ValueError, match="fewer than attn_block_k=16"):
        P.reattention_with_selection(q, k, v, sel=sel, config=_config(tail_keys="rotated"))
    if not ON_GPU:
        with pytest.raises(ValueError, match="full_prefix='cudnn' needs a CUDA GPU"):
            P.reattention_with_selection(q, k, v, sel=sel, config=_config(full_prefix="cudnn"))
    out = P.reattention_with_selection(q, k, v, sel=sel, config=_config())[0]  # "auto": in kernel
    assert rel_err(out, reference_run(q, k, v, sel)[0]) < TOL[jnp.float32]


@pytest.mark.parametrize("splits", [1, 3])
def test_picks_match_reference_topk(splits):
    """The scoring kernel's per-row picks are the reference's top_k (as sets), with the key
    range in one piece or split across programs and merged in XLA."""
    case = Case(1, 90, 4, 2, 64, small(3, 8, 3, 4, 2, 16, 1))
    q, k, _ = make_qkv(case, seed=41)
    with P.poison_outputs():
        fn = functools.partial(P.picks, sel=case.sel, config=_config(score_splits=splits))
        vals, idx = jax.jit(fn)(q, k)
    geo = R.geometry(q.shape, k.shape, case.sel)
    c0, c1, l0 = R.chunk_bounds(R.query_starts(None, 1, case.length, case.length), geo)
    q_rows = jnp.moveaxis(R.pack_rows(q, geo), 2, 0)
    k_heads = k.transpose(0, 2, 1, 3)
    for ci in range(geo.num_chunks):
        ref_vals, ref_idx = R.score_topk(q_rows[ci], k_heads, l0[:, ci], case.sel)
        live = (R.row_positions(c0[:, ci], geo.rows, geo.groups) < c1[:, ci, None])
        ref_idx = jnp.where(live[:, None, :, None], ref_idx, -1)
        np.testing.assert_array_equal(np.sort(np.asarray(idx[:, :, ci]), -1),
                                      np.sort(np.asarray(ref_idx), -1))
        ok = np.asarray(ref_idx) >= 0
        np.testing.assert_allclose(np.where(ok, -np.sort(-np.asarray(vals[:, :, ci]), -1), 0),
                                   np.where(ok, np.asarray(ref_vals), 0), rtol=1e-5, atol=1e-5)
    assert (np.asarray(idx) >= 0).sum() > 100  # not vacuous: the middle was long enough


def test_decode_and_dispatch():
    """ops.reattention_decode with implementation="pallas" equals "xla" for batch elements at
    different lengths of one cache; the default implementation runs here."""
    case = Case(2, 60, 8, 2, 128)
    q, k, v = make_qkv(case, seed=51)
    kw = dict(sink_tokens=2, local_window=12, top_k=2, max_selected=3, span=5, middle_align=4)
    lengths = jnp.array([41, 60])
    qd = q[jnp.arange(2), lengths - 1]
    # Jitted: the op-by-op dispatch of the eager ops is several times slower on a CPU.
    decode = lambda impl: jax.jit(functools.partial(ops.reattention_decode, implementation=impl,
                                                    **kw))(qd, k, v, lengths)
    want = decode("xla")
    with P.poison_outputs():
        got = decode("pallas")
    assert rel_err(got, want) < TOL[jnp.float32]
    assert ops.default_reattention_implementation() == ("pallas" if ON_GPU else "xla")
    if not ON_GPU:
        auto = decode(None)
        assert np.array_equal(np.asarray(auto), np.asarray(want))  # the reference itself


def test_every_kernel_output_is_written(monkeypatch):
    """Under NaN poisoning the scoring kernel leaves no NaN in its picks (and the attention
    kernel none in the outputs: every other test); a launch whose grid misses programs leaves
    NaN that the comparison rejects."""
    case = Case(1, 70, 4, 2, 64, small(2, 8, 2, 4, 3, 32, 1))
    q, k, v = make_qkv(case, seed=61)
    ref = reference_run(q, k, v, case.sel)[0]
    with P.poison_outputs():
        vals, idx = jax.jit(functools.partial(P.picks, sel=case.sel, config=_config()))(q, k)
    assert np.isfinite(np.asarray(vals)[np.asarray(idx) >= 0]).all()

    def only_first_program(name):  # a launch that runs one program of the first grid axis
        def launch(kernel, *, grid, **kw):
            return call(kernel, grid=(1, *grid[1:]), **kw) if kw["name"] == name else \
                call(kernel, grid=grid, **kw)
        return launch

    def fresh_run():  # traced now (never from the shared cache), with the patched launch
        with P.poison_outputs():
            fn = functools.partial(P.reattention_with_selection, sel=case.sel, config=_config())
            return jax.jit(fn)(q, k, v)

    call = P.call
    monkeypatch.setattr(P, "call", only_first_program("reattention_attend"))
    out, *_ = fresh_run()
    assert np.isfinite(np.asarray(out)[:, :8]).all()  # the first 16-row tile: queries 0..7
    assert np.isnan(np.asarray(out)[:, 8:]).all()
    with pytest.raises(AssertionError, match="NaN"):
        rel_err(out, ref)
    monkeypatch.setattr(P, "call", only_first_program("reattention_score"))
    with P.poison_outputs():
        vals, _ = jax.jit(functools.partial(P.picks, sel=case.sel, config=_config()))(q, k)
    assert np.isnan(np.asarray(vals)).any()


# ----------------------------------------------------------------------------- GPU, real sizes
@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("case", gpu_cases(32768), ids=lambda c: c.id)
def test_gpu_32k_bf16_defaults(case):
    """The authors' defaults (sink 32, window 8192, top 4, 256 picks, span 32, chunks of 512):
    bf16 kernels against the float32 reference on the same inputs."""
    q, k, v = (x.astype(jnp.bfloat16) for x in make_qkv(case, seed=32))
    out, gl, n = pallas_run(q, k, v, case.sel)
    ref, gl_ref, n_ref = reference_run(q, k, v, case.sel)
    assert rel_err(out, ref) < TOL[jnp.bfloat16]
    same = np.asarray(n) == np.asarray(n_ref)
    assert same.mean() > 0.95, same.mean()  # near-ties may flip a rare pick, never many


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("case", [Case(2, 4001, 8, 2, 64, small(16, 512, 4, 32, 8, 256, 64)),
                                  Case(1, 3001, 10, 2, 128, small(32, 1024, 3, 64, 16, 100, 128))],
                         ids=lambda c: c.id)
def test_gpu_fp32(case):
    q, k, v = make_qkv(case, seed=7)
    out, *selection = pallas_run(q, k, v, case.sel)
    ref, *ref_selection = reference_run(q, k, v, case.sel)
    assert rel_err(out, ref) < TOL[jnp.float32]
    assert_same_selection(selection, ref_selection)


@needs_gpu
@pytest.mark.gpu
def test_gpu_decode_at_256k():
    """A decode step of a 32q/8kv d=64 head layout over a 256K-token cache (bf16)."""
    case = Case(1, 262144, 32, 8, 64)
    q, k, v = (x.astype(jnp.bfloat16) for x in make_qkv(case, seed=9))
    lengths = jnp.array([262000])
    with P.poison_outputs():
        got = jax.jit(P.reattention_decode)(q[:, -1], k, v, lengths)
    f32 = lambda x: x.astype(jnp.float32)
    want = jax.jit(R.reattention_decode)(f32(q[:, -1]), f32(k), f32(v), lengths)
    assert rel_err(got, want) < TOL[jnp.bfloat16]
