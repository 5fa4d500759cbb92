"""The Mosaic GPU gathered attention of ReAttention (``kernels/reattention/pallas_mgpu_attend.py``).

On CPU it runs through jax's Mosaic GPU interpreter at small sizes, against the Triton-lowered
kernel in the Pallas interpreter and the float32 reference on the same bf16 inputs: chunks in
several groups (``Config.gather_bytes``), GQA, a batch of two continuing a cache from different
starts (the tail window starts past key 0, at rows that are not multiples of 8), a sink that
leaves L0 off the 8-row grid of the TMA copies, a chunk written past the cache. The interpreter
fills unwritten memory with NaN, so a row the kernel forgot fails. On a Hopper GPU (``-m gpu``)
the compiled kernel runs at 32K with the authors' defaults and at awkward sizes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.cca.pallas_mgpu import available, interpret_params
from kernels.reattention import mgpu_tokens
from kernels.reattention import pallas as P
from kernels.reattention import pallas_mgpu_attend as M
from kernels.reattention.params import Config, Selection
from kernels.reattention.shapes import Case, gpu_cases, small
from tests.kernels import reattention_runs as runs
from tests.kernels.conftest import TOL, export_for_cuda, rel_err
from tests.kernels.test_reattention_reference import make_qkv

needs_hopper = pytest.mark.skipif(not available(),
                                  reason="needs a Hopper GPU (runs on the device machine)")
needs_interpreter = pytest.mark.skipif(interpret_params() is None,
                                       reason="this jax has no Mosaic GPU interpreter")


def _config(lowering: str, **changes) -> Config:
    base = Config(score_block_q=16, score_block_k=16, score_stages=1, attn_block_q=16,
                  attn_block_k=16, attn_stages=1, tail_keys="rotated", full_prefix="off",
                  attend_lowering=lowering, mgpu_attend_block_k=64)
    return dataclasses.replace(base, **changes)


def _run(q, k, v, sel, config, q_start=None, interpret=True):
    """Compiled on the GPU; op by op in the interpreter (jax 0.10's Mosaic GPU interpreter hangs
    when the kernel is part of a larger jitted program; the kernel itself is jitted)."""
    fn = lambda q, k, v, s: P.reattention_with_selection(q, k, v, sel=sel, q_start=s,
                                                          config=config, interpret=interpret)
    return fn(q, k, v, q_start) if interpret else jax.jit(fn)(q, k, v, q_start)


def _check(case, q_start=None, num_keys=None, rows=None, outputs=None, **changes):
    """Mosaic GPU (interpreted) against the Triton lowering (interpreted) and the reference; the
    Triton-lowered kernels of the Mosaic GPU path (scoring, list gather) with NaN-poisoned
    outputs, so that a read of anything they leave unwritten shows up as NaN. ``outputs``: a
    dict that gets the Mosaic GPU output as "mosaic_gpu"."""
    q, k, v = (x.astype(jnp.bfloat16) for x in make_qkv(case, seed=case.length, num_keys=num_keys))
    if q_start is not None:
        q_start = jnp.asarray(q_start)
    with P.poison_outputs():  # list slots the gather skips are NaN: the kernel must not read them
        out_m, gl_m, n_m = _run(q, k, v, case.sel, _config("mosaic_gpu", **changes), q_start)
    out_t, gl_t, n_t = _run(q, k, v, case.sel, _config("triton"), q_start)
    f32 = lambda x: x.astype(jnp.float32)
    ref, _, n_ref = runs.reference_fn(case.sel)(f32(q), f32(k), f32(v), q_start)
    rows = rows or slice(None)
    np.testing.assert_array_equal(np.asarray(n_m), np.asarray(n_ref))
    np.testing.assert_array_equal(np.asarray(n_t), np.asarray(n_ref))
    assert np.isfinite(np.asarray(out_m, np.float32)).all()
    err_m, err_t = rel_err(out_m[:, rows], ref[:, rows]), rel_err(out_t[:, rows], ref[:, rows])
    assert 1e-4 < err_m < TOL[jnp.bfloat16], err_m  # really bf16, and close
    assert err_m < 1.5 * err_t + 1e-3, (err_m, err_t)  # no worse than the Triton lowering
    if outputs is not None:
        outputs["mosaic_gpu"] = out_m
    return n_m


def test_config_and_inputs_are_checked():
    for bad in [dict(attend_lowering="cuda"), dict(mgpu_attend_block_k=32),
                dict(mgpu_attend_block_k=256),
                dict(mgpu_attend_slots=1), dict(gather_bytes=0), dict(mgpu_attend_overlap=1)]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            Config(**bad)
    case = Case(1, 200, 2, 1, 64, small(4, 32, 2, 3, 3, 64, 8))
    q, k, v = make_qkv(case, seed=6)  # float32: the kernel takes 16-bit inputs only
    with pytest.raises(ValueError, match="attend_lowering='mosaic_gpu' needs bfloat16"):
        _run(q, k, v, case.sel, _config("mosaic_gpu"))
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    with pytest.raises(ValueError, match="rotated tail"):  # the tail rotated in the kernel
        _run(q, k, v, case.sel, _config("mosaic_gpu", tail_keys="in_kernel"))
    rows = jnp.zeros((1, 1, 1, 64, 64), jnp.bfloat16)  # 64 rows: not a multiple of 128
    lists = jnp.zeros((1, 1, 1, 128, 64), jnp.bfloat16)
    window = jnp.zeros((1, 256, 1, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="multiple of 128"):
        M.attend(rows, lists, lists, window, window, jnp.zeros((1, 1, 1, 8), jnp.int32),
                 groups=1, num_keys=200, scale=0.125, interpret=True)


def test_auto_keeps_the_triton_lowering_off_hopper():
    case = Case(1, 200, 2, 1, 64, small(4, 32, 2, 3, 3, 64, 8))
    q = jnp.zeros((1, 200, 2, 64), jnp.bfloat16)
    geo = P.geometry(q.shape, (1, 200, 1, 64), case.sel)
    assert not P._uses_mgpu_attend(q, geo, Config(), rotated=True, interpret=True)
    assert P._uses_mgpu_attend(q, geo, Config(attend_lowering="mosaic_gpu"), rotated=True,
                               interpret=True)
    decode = dataclasses.replace(geo, num_queries=1)  # one query: the Triton lowering
    with pytest.raises(ValueError, match="more than one query"):
        P._uses_mgpu_attend(q, decode, Config(attend_lowering="mosaic_gpu"), rotated=True,
                            interpret=True)


def test_layers_share_one_lowered_kernel():
    """The model calls the op once per layer; through ``pallas._mgpu_attend`` (a jit) the layers
    share one lowered kernel (the CCA forward's compile-time lesson, issue 10). Lowered for CUDA
    on the CPU with jax.export: the Mosaic GPU lowering runs, nothing compiles."""
    bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    rows, lists, window = bf16(1, 2, 3, 256, 128), bf16(1, 2, 3, 256, 128), bf16(1, 512, 2, 128)
    meta = jax.ShapeDtypeStruct((1, 2, 3, 8), jnp.int32)

    def module_chars(attend, layers: int) -> int:
        def model(qo, kg, vg, kw, vw, mt):
            for _ in range(layers):
                qo = qo + attend(qo, kg, vg, kw, vw, mt, groups=2, num_keys=2000, scale=0.09,
                                 block_k=128, slots=2, interpret=False)
            return qo
        return len(export_for_cuda(model, rows, lists, lists, window, window, meta)
                   .mlir_module())

    one = module_chars(P._mgpu_attend, 1)
    assert module_chars(P._mgpu_attend, 3) < 1.1 * one
    assert module_chars(M.attend, 3) > 2.5 * one  # what the jit saves


def test_tail_sources_are_the_buffers_themselves_on_the_gpu():
    """Compiled, the kernel reads the rotated window and the cache's v in place (TMA fills rows
    past their ends with zeros): no copy unless a row count is not a multiple of 8 (the TMA
    descriptor's tiles). The interpreter, which raises on such reads, gets zero-padded copies
    reaching as far as a tail block can (past L0 of a chunk written past the cache)."""
    window, v = jnp.ones((2, 40, 3, 64), jnp.bfloat16), jnp.ones((2, 100, 3, 64), jnp.bfloat16)
    kw, vr = M.tail_sources(window, v, block_k=64, num_queries=30, interpret=False)
    assert kw is window and vr.shape == (2, 104, 3, 64)
    np.testing.assert_array_equal(np.asarray(vr[:, 100:], np.float32), 0)
    kw, vr = M.tail_sources(window, v, block_k=64, num_queries=30, interpret=True)
    assert kw.shape[1] == 200 and vr.shape[1] == 264  # + T + 2 blocks, rounded up to 8
    np.testing.assert_array_equal(np.asarray(kw[:, :40], np.float32), 1)
    np.testing.assert_array_equal(np.asarray(kw[:, 40:], np.float32), 0)


def _exported_attention(geo, config: Config, nc: int, rows: int) -> str:
    """The op's Mosaic GPU attention stage (``_attend_mgpu``) over ``nc`` chunks of ``rows``
    packed rows, lowered for CUDA on the CPU with jax.export: its module text."""
    b, s, hkv, d = geo.batch, geo.num_keys, geo.kv_heads, geo.head_dim
    bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)

    def attend(qo, k, v, gl, mt, window):
        return P._attend_mgpu(qo, k, v, gl, mt, window, np.ones(d // 2, np.float32), 0.09, geo,
                              config, interpret=False)

    return export_for_cuda(
        attend, bf16(b, hkv, nc, rows, d), bf16(b, s, hkv, d), bf16(b, s, hkv, d),
        i32(b, hkv, nc, geo.num_gathered), i32(b, hkv, nc, 8), bf16(b, 2048, hkv, d)
    ).mlir_module()


def test_groups_of_chunks_share_their_lowered_kernels():
    """Five chunks in groups of 2, 2 and 1 (``Config.gather_bytes``): three calls of the
    attention kernel, two lowered kernels (one per group size). The groups read their rows in
    place through meta's row shift, so no group gets a kernel of its own. Lowered for CUDA on
    the CPU with jax.export."""
    b, hkv, nc, r, d, s = 1, 2, 5, 256, 128, 4096
    geo = P.geometry((b, s, 2 * hkv, d), (b, s, hkv, d), Selection())
    per_chunk = b * hkv * P.round_up(geo.num_gathered, 128) * d * 2 * 2
    config = dataclasses.replace(P.default_config(d, 2, r), gather_bytes=2 * per_chunk)
    text = _exported_attention(geo, config, nc, r)
    assert text.count("call @_mgpu_attend") == 3
    assert text.count("func.func private @_mgpu_attend") == 2


def test_block_picks_lower_for_cuda():
    """With block picks the op's attention reads the lists' values from the cache in place
    (pieces of 32 rows, four TMA copies per 128-key block) and gathers only the keys: twice
    the chunks per group of ``gather_bytes``. Lowered for CUDA on the CPU: the Mosaic GPU
    lowering checks the copies (jax 0.11 also that each starts on an 8-row tile)."""
    b, hkv, d, s = 1, 2, 128, 4096
    sel = Selection(key_block=32)
    geo = P.geometry((b, s, 2 * hkv, d), (b, s, hkv, d), sel)
    nc = geo.num_chunks
    keys_per_chunk = b * hkv * P.round_up(geo.num_gathered, 128) * d * 2
    config = dataclasses.replace(P.default_config(d, 2, geo.rows), gather_bytes=4 * keys_per_chunk,
                                 mgpu_list_values="in_place")  # ("auto": G = 1 only)
    assert M.values_piece(sel, config.mgpu_attend_block_k) == 32
    text = _exported_attention(geo, config, nc, geo.rows)
    assert text.count("call @_mgpu_attend") == 2  # 8 chunks, 4 per group: keys only
    assert text.count("func.func private @_mgpu_attend") == 1


@needs_interpreter
def test_interpreted_groups_of_chunks():
    """MHA, four chunks with a middle in four groups of one (a list of 20 slots in a 64-slot
    block: the last list block masked), sink 4 (L0 = 4 + 8 i: the tail's first block starts
    4 rows early)."""
    case = Case(1, 256, 2, 2, 64, small(4, 32, 2, 4, 4, 64, 8))
    n_g = _check(case, gather_bytes=1)
    assert (np.asarray(n_g)[..., 1:] > 4).all()  # chunks past the first selected something


@needs_interpreter
def test_interpreted_overlap_gives_the_same_bits():
    """``Config.mgpu_attend_overlap`` (each block's softmax against the previous block's P V)
    runs the same operations in the same order as one block at a time: the same bits. Four
    chunks in groups of one: masked last list blocks, tails starting 4 rows before L0."""
    case = Case(1, 256, 2, 2, 64, small(4, 32, 2, 4, 4, 64, 8))
    q, k, v = (x.astype(jnp.bfloat16) for x in make_qkv(case, seed=case.length))
    outs = [_run(q, k, v, case.sel, _config("mosaic_gpu", gather_bytes=1,
                                            mgpu_attend_overlap=overlap))[0]
            for overlap in (False, True)]
    assert np.isfinite(np.asarray(outs[0], np.float32)).all()
    np.testing.assert_array_equal(np.asarray(outs[0], np.float32),
                                  np.asarray(outs[1], np.float32))


@needs_interpreter
def test_interpreted_gqa_batch_continuation():
    """G = 4 (rows packed four heads per query), d = 128, a batch of two continuing a cache
    from starts 110 and 90: the tail windows start at keys 87 and 67, not multiples of 8. One kv
    head: the interpreter's time grows with the programs (kv heads > 1: the other tests)."""
    case = Case(2, 40, 4, 1, 128, small(3, 16, 2, 4, 5, 8, 4))
    _check(case, q_start=[110, 90], num_keys=150)


@needs_interpreter
def test_interpreted_lists_shorter_than_their_slots():
    """Lists of 192 slots (cap 8, spans of 16) holding 0 to about 130 keys: the gather leaves
    the 64-slot blocks past round_up(n_g, 64) unwritten (NaN under poisoning) and the kernel
    reads none of them. G = 2 with one kv head (a second one would double the interpreter's
    time and test nothing more here)."""
    case = Case(1, 600, 2, 1, 64, small(4, 32, 2, 8, 16, 64, 8))
    n_g = np.asarray(_check(case))
    assert n_g.min() <= 64 and n_g.max() > 64  # some chunks skip blocks, some read two


@needs_interpreter
def test_interpreted_192_key_blocks():
    """``mgpu_attend_block_k=192``: three 64-column groups in each ``P V`` wgmma. Lists of up
    to 4 + 16 x 16 slots (two 192-slot blocks, the last one masked), tails of a 32-key window
    and a 64-query chunk inside one or two blocks, starting 4 rows before L0."""
    case = Case(1, 600, 2, 1, 64, small(4, 32, 2, 16, 16, 64, 8))
    n_g = np.asarray(_check(case, mgpu_attend_block_k=192))
    assert n_g.max() > 192  # some lists reach into a second key block


def test_192_key_blocks_lower_for_cuda():
    """192-key blocks at d = 128 with block picks (values read in place, six 32-row copies per
    block) lower for CUDA on the CPU. With the query tiles, their 2 slots take 229,376 bytes
    of shared memory, as the 3-slot ring of 128 keys that ran on an H200 (2026-12-04). There is
    no room for more: the CCA forward's kernel, 512 bytes of lse staging more, was refused with
    3 slots of 128 keys on an H100 (jax 0.11.2: 232,568 bytes > 232,448)."""
    b, hkv, d, s = 1, 1, 128, 4096
    sel = Selection(key_block=32)
    geo = P.geometry((b, s, hkv, d), (b, s, hkv, d), sel)
    config = dataclasses.replace(P.default_config(d, 2, geo.rows), mgpu_attend_block_k=192)
    assert M.values_piece(sel, 192) == 32
    assert _exported_attention(geo, config, geo.num_chunks, geo.rows).count(
        "call @_mgpu_attend") >= 1


@needs_interpreter
def test_interpreted_chunk_written_past_the_cache():
    """q_start + T > S: rows inside the cache equal the reference; the rows past it are finite."""
    case = Case(1, 69, 2, 2, 64, small(3, 5, 2, 4, 5, 64, 4))
    _check(case, q_start=[113], num_keys=125, rows=slice(0, 12))


@needs_interpreter
def test_interpreted_block_picks_read_values_in_place():
    """Block picks (blocks of 32 after a sink of 16): the lists are runs of cache rows, so the
    kernel reads their values from the cache in pieces of gcd(16, 32) = 16 rows
    (``values_piece``) and the gather copies only the keys. Lists of 16 + 4 x 32 slots span
    three 64-slot blocks, the last one partial. The same bits as with the values gathered."""
    sel = Selection(16, 32, 2, 4, 32, 64, 32, key_block=32)
    case = Case(1, 384, 2, 1, 64, sel)
    assert M.values_piece(sel, 64) == 16
    assert M.values_piece(Selection(12, key_block=32, span=32), 64) == 0  # runs of 4 rows
    big = Selection(0, key_block=256, span=256, middle_align=256)
    assert M.values_piece(big, 128) == 128  # runs of 256 rows, copied 128 at a time
    assert M.values_piece(Selection(), 128) == 0  # token picks: gathered
    q0 = jnp.zeros((1, 64, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="mgpu_list_values='in_place' needs lists"):
        _run(q0, q0[:, :, :1], q0[:, :, :1], Selection(12, 8, 2, 4, 32, 16, 32, key_block=32),
             _config("mosaic_gpu", mgpu_list_values="in_place"))
    outs = {}
    n_g = np.asarray(_check(case, outputs=outs, mgpu_list_values="in_place"))  # "auto": G = 1
    assert n_g.max() > 128  # some lists reach into a third key block
    q, k, v = (x.astype(jnp.bfloat16) for x in make_qkv(case, seed=case.length))
    with P.poison_outputs():
        gathered = _run(q, k, v, sel, _config("mosaic_gpu", mgpu_list_values="gathered"))[0]
    np.testing.assert_array_equal(np.asarray(outs["mosaic_gpu"], np.float32),
                                  np.asarray(gathered, np.float32))


# ----------------------------------------------------------------------------- GPU, real sizes
@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("case", [
    *gpu_cases(32768),
    Case(2, 20011, 10, 2, 64, Selection(sink_tokens=20)),
    Case(2, 20008, 16, 4, 64, Selection(sink_tokens=20, chunk_size=128)),
    Case(1, 32768, 32, 32, 128, Selection(key_block=32)),  # the values read in place
], ids=lambda c: c.id)
def test_gpu_matches_triton_lowering_and_reference(case):
    """bf16 at 32K with the authors' defaults (MHA and GQA), and batch 2 at a length that is a
    multiple of no tile (5 query heads per kv head, d = 64, sink 20: L0 off the 8-row grid),
    and block picks at 32K MHA (the lists' values read from the cache in place);
    the batch-2 cases also in groups of 3 chunks. Same selection as the Triton lowering,
    outputs as close to the float32 reference. All but the G = 5 case read and write their rows
    in place (``Config.mgpu_rows``); the last one's final chunk reaches past T, so its queries
    there are read as zeros and not written (the TMA unit's bounds)."""
    q, k, v = (x.astype(jnp.bfloat16) for x in make_qkv(case, seed=11))
    rows = case.sel.chunk_size * case.q_heads // case.kv_heads

    def run(lowering, **changes):
        config = dataclasses.replace(P.default_config(case.head_dim, 2, rows),
                                     attend_lowering=lowering, **changes)
        return _run(q, k, v, case.sel, config, interpret=False)

    out_m, gl_m, n_m = run("mosaic_gpu")
    out_t, gl_t, n_t = run("triton")
    np.testing.assert_array_equal(np.asarray(n_m), np.asarray(n_t))
    f32 = lambda x: x.astype(jnp.float32)
    ref = runs.reference_fn(case.sel)(f32(q), f32(k), f32(v))[0]
    err_m, err_t = rel_err(out_m, ref), rel_err(out_t, ref)
    assert err_m < TOL[jnp.bfloat16] and err_m < 1.5 * err_t + 1e-3, (err_m, err_t)
    out_o, *_ = run("mosaic_gpu", mgpu_attend_overlap=True)  # pipelined: the same bits
    np.testing.assert_array_equal(np.asarray(out_o, np.float32), np.asarray(out_m, np.float32))
    if case.batch == 2:
        per_chunk = 2 * 2 * P.round_up(case.sel.num_gathered(), 128) * 64 * 2 * 2
        out_g, *_ = run("mosaic_gpu", gather_bytes=3 * per_chunk)
        np.testing.assert_array_equal(np.asarray(out_g, np.float32), np.asarray(out_m, np.float32))


@needs_hopper
@pytest.mark.gpu
def test_gpu_192_key_blocks():
    """192-key blocks compiled at 32K with block picks (GQA 32/8, d = 128): they fit in shared
    memory, select the same keys and give the 128-key blocks' output up to where the online
    softmax rescales (other block edges), as close to the float32 reference."""
    case = Case(1, 32768, 32, 8, 128, Selection(key_block=32))
    q, k, v = (x.astype(jnp.bfloat16) for x in make_qkv(case, seed=12))
    rows = case.sel.chunk_size * case.q_heads // case.kv_heads
    outs = {}
    for bk in (128, 192):
        config = dataclasses.replace(P.default_config(case.head_dim, 2, rows),
                                     attend_lowering="mosaic_gpu", mgpu_attend_block_k=bk)
        outs[bk] = _run(q, k, v, case.sel, config, interpret=False)
    np.testing.assert_array_equal(np.asarray(outs[128][2]), np.asarray(outs[192][2]))
    f32 = lambda x: x.astype(jnp.float32)
    ref = runs.reference_fn(case.sel)(f32(q), f32(k), f32(v))[0]
    err_128, err_192 = rel_err(outs[128][0], ref), rel_err(outs[192][0], ref)
    assert err_192 < TOL[jnp.bfloat16] and err_192 < 1.5 * err_128 + 1e-3, (err_192, err_128)
    assert rel_err(outs[192][0], outs[128][0]) < 1e-2


# ----------------------------------------------------------------------------- rows in place
def test_rows_in_place_config_and_inputs_are_checked():
    for bad in [dict(mgpu_rows="tokens"), dict(prefix_keys="all")]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            Config(**bad)
    assert [mgpu_tokens.applies(g, c, t) for g, c, t in [
        (1, 64, 8), (4, 16, 200), (8, 8, 16), (2, 96, 96), (5, 64, 64), (16, 4, 64), (4, 8, 64),
        (1, 1, 8), (4, 16, 201)]] == [True, True, True, True, False, False, False, False, False]
    rows = jnp.zeros((1, 72, 8, 64), jnp.bfloat16)
    lists = jnp.zeros((1, 2, 2, 128, 64), jnp.bfloat16)
    window, meta = jnp.zeros((1, 256, 2, 64), jnp.bfloat16), jnp.zeros((1, 2, 2, 8), jnp.int32)
    kwargs = dict(groups=4, num_keys=256, scale=0.125, block_k=128, interpret=True)
    for tokens, match in [(M.Tokens(8, 128, 0, 0, 72), "C \\* G a multiple of 64"),
                          (M.Tokens(16, 128, 0, 0, 70), "multiples of 8; .* 70 out"),
                          (M.Tokens(16, 64, 0, 0, 72), "multiple of 128"),
                          (M.Tokens(64, 128, 0, 0, 72), "must cover")]:
        with pytest.raises(ValueError, match=match):
            M.attend(rows, lists, lists, window, window, meta, tokens=tokens, **kwargs)
    with pytest.raises(ValueError, match="needs the rows in place"):
        M.attend(lists, lists, lists, window, window, meta, out=rows, **kwargs)


def test_rows_in_place_lower_for_cuda():
    """The op's attention with its rows in place (``_attend_mgpu`` with ``Tokens``) lowers for
    CUDA on the CPU, in three groups writing one aliased output, at a length that is a multiple
    of 8 but not of the chunk (the last chunk's queries reach past T). A length that is not a
    multiple of 8 keeps the packed rows: the TMA descriptors of q and of the output tile T by
    8, and Mosaic GPU refuses other lengths."""
    b, hkv, g, d, t, chunk = 1, 2, 4, 128, 1000, 128
    sel = Selection(chunk_size=chunk)
    geo = P.geometry((b, t, hkv * g, d), (b, t, hkv, d), sel)
    config = dataclasses.replace(P.default_config(d, 2, geo.rows), attend_lowering="mosaic_gpu")
    per_chunk = b * hkv * P.round_up(geo.num_gathered, 128) * d * 2 * 2
    config = dataclasses.replace(config, gather_bytes=2 * per_chunk)
    assert P._rows_in_place(geo, config)
    assert not P._rows_in_place(dataclasses.replace(geo, num_queries=999), config)
    p, nc = 2 * chunk, geo.num_chunks - 2
    bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)

    def attend(qo, k, v, gl, mt, window):
        tokens, qo = P._tokens(qo, geo, p, geo.rows, interpret=False)
        return P._attend_mgpu(qo, k, v, gl, mt, window, np.ones(d // 2, np.float32), 0.09, geo,
                              config, interpret=False, tokens=tokens)

    exported = export_for_cuda(
        attend, bf16(b, t - p, hkv * g, d), bf16(b, t, hkv, d), bf16(b, t, hkv, d),
        i32(b, hkv, nc, geo.num_gathered), i32(b, hkv, nc, 8), bf16(b, t, hkv, d))
    assert [o.shape for o in exported.out_avals] == [(b, t, hkv * g, d)]
    text = exported.mlir_module()
    assert text.count("call @_mgpu_attend") == 3  # groups of 2, 2 and 2 chunks
    # two lowered kernels: the first group's into a fresh output, the later groups' (one
    # function) into the previous output, aliased (operand 6: ``out``)
    assert text.count("func.func private @_mgpu_attend") == 2
    assert text.count("output_operand_aliases") == 1 and "operand_index = 6" in text


def test_head_major_tiles_go_back_to_the_packed_order():
    """A tile read in place holds row (query t, head g) at g * 64 / G + t; ``to_packed`` puts it
    back at t * G + g, tile by tile."""
    for groups in mgpu_tokens.GROUPS:
        n = 64 // groups
        packed = np.arange(3 * 128).reshape(3, 128)  # two tiles per leading row
        tile, r = np.divmod(np.arange(128), 64)
        t, g = r % n, r // n  # what head-major row r of a tile holds
        head_major = packed[:, tile * 64 + t * groups + g]
        np.testing.assert_array_equal(np.asarray(mgpu_tokens.to_packed(
            jnp.asarray(head_major), groups)), packed)


@needs_interpreter
@pytest.mark.skipif(not mgpu_tokens.in_place_supported(True),
                    reason="jax 0.10's Mosaic GPU interpreter cannot write into an existing array "
                           "(the op copies each group's queries in there instead)")
def test_interpreted_launch_writes_into_an_existing_array():
    """``mgpu_tokens.launch`` with an output to write into: the kernel's rows land in place, the
    array's other rows keep their values."""
    import functools

    import jax.experimental.pallas.mosaic_gpu as plgpu
    from jax.experimental import pallas as pl

    x = jnp.arange(64 * 64, dtype=jnp.float32).reshape(64, 64).astype(jnp.bfloat16)
    out = jnp.full((1, 130, 4, 64), -1.0, jnp.bfloat16)
    smem = plgpu.SMEM((64, 64), jnp.bfloat16, transforms=(plgpu.TilingTransform((8, 64)),
                                                          plgpu.SwizzleTransform(128)))

    def body(x_ref, o_ref):
        def scoped(buf, bar):
            plgpu.copy_gmem_to_smem(x_ref, buf, bar.at[0])
            plgpu.barrier_wait(bar.at[0])
            mgpu_tokens.store(buf, o_ref, 0, 48, 0, 4)
            plgpu.wait_smem_to_gmem(0)
        pl.run_scoped(scoped, smem, plgpu.Barrier(num_barriers=1))

    run = functools.partial(mgpu_tokens.launch, body, (x,), out_type=jax.ShapeDtypeStruct(
        out.shape, out.dtype), interpret=True, grid=(1,), grid_names=("g",))
    got = np.asarray(jax.jit(run)(out), np.float32)
    want = np.full(out.shape, -1.0, np.float32)
    want[0, 48:64] = np.asarray(x, np.float32).reshape(4, 16, 64).transpose(1, 0, 2)
    np.testing.assert_array_equal(got, want)


@needs_interpreter
@pytest.mark.parametrize("hq,hkv,chunk", [(2, 2, 64), (4, 1, 16), (8, 1, 8)],
                         ids=["G1", "G4", "G8"])
def test_interpreted_rows_in_place_equal_packed_rows(hq, hkv, chunk):
    """Rows read and written in place (``Config.mgpu_rows``) against packed copies, bit for bit:
    a prefill from position 0 with its first chunk as full attention (``full_prefix`` "xla":
    the prefix copied into the in-place output), the rest in groups of one chunk, the last
    chunk partial but for G = 8 (its queries past T are not written), G = 1, 4 and 8 (C * G =
    64: the second consumer of a 128-row tile holds only padding; G = 2 is the next test's).
    Two kv heads for G = 1 (the in-place row offsets of a second kv head), one for the rest:
    the interpreter's time grows with the programs."""
    t = (3 * chunk + chunk // 2 + 5) // 8 * 8  # in place needs T % 8 == 0 (its TMA boxes)
    case = Case(1, t, hq, hkv, 64, small(4, 16, 2, 4, 4, chunk, 8))
    q, k, v = (x.astype(jnp.bfloat16) for x in make_qkv(case, seed=t))
    geo = P.geometry(q.shape, k.shape, case.sel)
    runs_ = {}
    for rows in ("in_place", "packed"):
        config = _config("mosaic_gpu", full_prefix="xla", gather_bytes=1, mgpu_rows=rows)
        assert P._rows_in_place(geo, config) == (rows == "in_place")
        with P.poison_outputs():
            runs_[rows] = _run(q, k, v, case.sel, config)
    for a, b in zip(runs_["in_place"], runs_["packed"]):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    f32 = lambda x: x.astype(jnp.float32)
    ref = runs.reference_fn(case.sel)(f32(q), f32(k), f32(v))[0]
    assert rel_err(runs_["in_place"][0], ref) < TOL[jnp.bfloat16]


@needs_interpreter
def test_interpreted_rows_in_place_batch_continuation():
    """Rows in place against packed rows, bit for bit, for a batch of two continuing a cache
    from positions 100 and 84 (no prefix: every chunk is scored and gathered), G = 2 and C = 32
    (C * G = 64: a 128-row tile whose second consumer holds only padding), three chunks, the
    last partial. One kv head (the interpreter's time grows with the programs)."""
    case = Case(2, 72, 2, 1, 64, small(3, 16, 2, 4, 5, 32, 4))
    q, k, v = (x.astype(jnp.bfloat16) for x in make_qkv(case, seed=3, num_keys=176))
    q_start = jnp.asarray([100, 84])
    outs = {}
    for rows in ("in_place", "packed"):
        config = _config("mosaic_gpu", mgpu_rows=rows)
        with P.poison_outputs():
            outs[rows] = _run(q, k, v, case.sel, config, q_start)
    for a, b in zip(outs["in_place"], outs["packed"]):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert np.isfinite(np.asarray(outs["in_place"][0], np.float32)).all()
