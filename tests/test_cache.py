"""Decode caches (jax_cca/cache.py) and attention with a cache (jax_cca/decode.py): prefill plus
cached decoding must give the logits of one forward over the whole sequence.

Tiny GQA model (4 query / 2 kv heads), g = 4, w = 8: a 40-token sequence crosses ten group
boundaries and moves the local window 8 times; rows w..w+g-2 (8, 9, 10), where a truncating
division would get start(t) wrong, are decoded and prefilled like every other row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_cca import CCAConfig, CCALlama
from jax_cca.cache import (
    CCACache,
    FullCache,
    cache_bytes,
    init_cache,
    ring_positions,
    ring_size,
)
from jax_cca.generation import generate, generate_batch
from jax_cca.rope import default_positions, inverse_frequencies, rope_cos_sin
from kernels.cca.reference import pool_core_tokens

VOCAB = 97
G, W = 4, 8
SEQ = 40
TOL = 1e-4  # fp32 whole model (SPEC.md section 4)


def tiny_config(**overrides) -> CCAConfig:
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_layers=2,
                num_heads=4, num_kv_heads=2, max_position_embeddings=128, group_size=G,
                local_window=W)
    return CCAConfig.tiny(**{**base, **overrides})


@pytest.fixture(scope="module")
def models() -> dict[str, CCALlama]:
    full = CCALlama.from_config(tiny_config(attention="full"), seed=11)
    return {"full": full, "cca": full.with_attention(attention="cca")}


@pytest.fixture(scope="module")
def sequence() -> np.ndarray:
    return np.random.default_rng(2024).integers(0, VOCAB, (2, SEQ)).astype(np.int32)


_FORWARDS: dict[int, tuple] = {}


def forward(model, ids) -> np.ndarray:
    """``model(ids)`` jitted, as numpy."""
    if id(model) not in _FORWARDS:
        graphdef, state = nnx.split(model)
        fn = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))
        _FORWARDS[id(model)] = (model, fn, state)  # holding the model keeps id() unique
    _, fn, state = _FORWARDS[id(model)]
    return np.asarray(fn(state, jnp.asarray(ids, jnp.int32)))


@pytest.fixture(scope="module")
def reference(models, sequence) -> dict[str, np.ndarray]:
    return {att: forward(m, sequence) for att, m in models.items()}


def layer0_qkv(model, ids):
    """Rotated q, k and v of the first layer over ``ids`` (positions 0..T-1)."""
    ids = jnp.asarray(ids, jnp.int32)
    cos, sin = rope_cos_sin(default_positions(*ids.shape), inverse_frequencies(model.config))
    layer = model.layers[0]
    return layer.self_attn._project(layer.input_layernorm(model.embed_tokens(ids)), cos, sin)


# ---------------------------------------------------------------------------- exactness
def test_the_setting_really_exercises_cca(reference):
    """Guards the tests below: past row w + g - 2 CCA must differ from full attention."""
    a, b = reference["full"], reference["cca"]
    tail = slice(W + G - 1, None)
    assert np.linalg.norm(a[:, tail] - b[:, tail]) / np.linalg.norm(a[:, tail]) > 1e-2
    np.testing.assert_allclose(a[:, : W + G - 1], b[:, : W + G - 1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attention", ["full", "cca"])
def test_prefill_then_decode_equals_one_forward_for_every_prefix(models, sequence, reference,
                                                                 rel_err, attention):
    """Row 0 takes every prefix length P, row 1 the length 40 - P in the same batch; both then
    decode the rest of their sequence one token at a time. Every logits row, from the prefill's
    (position P - 1) to the last decode step's, must match the full forward's row."""
    model, ref = models[attention], reference[attention]
    for p in range(1, SEQ):
        lengths = np.array([p, SEQ - p])
        cache = model.init_cache(2, 2 * SEQ)
        padded = np.where(np.arange(SEQ) < lengths[:, None], sequence, (sequence + 1) % VOCAB)
        logits, cache = model.prefill(padded, lengths, cache)
        got = [[row] for row in np.asarray(logits)]
        for step in range(SEQ - lengths.min()):
            pos = lengths + step
            tokens = np.where(pos < SEQ, sequence[np.arange(2), np.minimum(pos, SEQ - 1)], 0)
            logits, cache = model.decode_step(tokens, cache)
            for b, row in enumerate(np.asarray(logits)):
                if pos[b] < SEQ:
                    got[b].append(row)
        np.testing.assert_array_equal(np.asarray(cache[0].lengths), lengths + SEQ - lengths.min())
        for b in range(2):
            err = rel_err(np.stack(got[b]), ref[b, lengths[b] - 1 :])
            assert err < TOL, (p, b, err)


@pytest.mark.parametrize("attention", ["full", "cca"])
def test_decode_step_equals_the_last_row_of_a_prefill_and_builds_the_same_cache(
        models, sequence, rel_err, attention):
    model = models[attention]
    for length in (2, 9, 10, 11, 12, 13, 24, 37):  # t = length - 1 covers rows w..w+g-2
        lengths = np.array([length, length + 3])
        logits, cache = model.prefill(sequence, lengths - 1, model.init_cache(2, SEQ))
        logits, decoded = model.decode_step(sequence[np.arange(2), lengths - 1], cache)
        ref_logits, ref_cache = model.prefill(sequence, lengths, model.init_cache(2, SEQ))
        assert rel_err(logits, ref_logits) < TOL, length
        for got, want in zip(jax.tree_util.tree_leaves(decoded),
                             jax.tree_util.tree_leaves(ref_cache), strict=True):
            if want.dtype == jnp.int32:
                np.testing.assert_array_equal(got, want)
            elif np.any(np.asarray(want)):  # an empty cache part (no core token yet) is zero
                assert rel_err(got, want) < 1e-5, length
            else:
                np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("attention, chunk", [("full", 5), ("cca", 3), ("cca", 8), ("cca", 13)])
def test_chunked_prefill_equals_one_pass(models, sequence, rel_err, attention, chunk):
    """Chunks of 3 split groups across chunks (the group's first tokens come from the ring);
    13 is longer than the ring (w + g = 12), so a chunk overwrites the whole ring."""
    model = models[attention]
    lengths = np.array([SEQ - 1, 17])
    one, one_cache = model.prefill(sequence, lengths, model.init_cache(2, SEQ + 3))
    chunked, chunked_cache = model.prefill(sequence, lengths, model.init_cache(2, SEQ + 3),
                                           chunk_size=chunk)
    assert rel_err(chunked, one) < 1e-5
    for got, want in zip(jax.tree_util.tree_leaves(chunked_cache),
                         jax.tree_util.tree_leaves(one_cache), strict=True):
        if want.dtype == jnp.int32:
            np.testing.assert_array_equal(got, want)
        else:
            assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("attention", ["full", "cca"])
def test_padding_never_reaches_logits_or_cache(models, sequence, attention):
    model = models[attention]
    lengths = np.array([13, 30])
    other = np.random.default_rng(7).integers(0, VOCAB, sequence.shape).astype(np.int32)
    padded = np.where(np.arange(SEQ) < lengths[:, None], sequence, other)
    a, cache_a = model.prefill(sequence, lengths, model.init_cache(2, SEQ))
    b, cache_b = model.prefill(padded, lengths, model.init_cache(2, SEQ))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for x, y in zip(jax.tree_util.tree_leaves(cache_a), jax.tree_util.tree_leaves(cache_b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_ablation_poolings_decode_exactly_too(models, sequence, rel_err, pooling):
    model = models["cca"].with_attention(pooling=pooling)
    ref = forward(model, sequence)
    lengths = np.array([5, 22])
    logits, cache = model.prefill(sequence, lengths, model.init_cache(2, SEQ))
    got = [[row] for row in np.asarray(logits)]
    for step in range(SEQ - 22):
        logits, cache = model.decode_step(sequence[np.arange(2), lengths + step], cache)
        for b, row in enumerate(np.asarray(logits)):
            got[b].append(row)
    for b in range(2):
        n = len(got[b])
        assert rel_err(np.stack(got[b]), ref[b, lengths[b] - 1 : lengths[b] - 1 + n]) < TOL


def test_bfloat16_decode_stays_close_to_the_float32_forward(models, sequence, rel_err):
    """bf16 weights, activations and cache (core tokens are stored in bf16, while the op keeps
    them in float32): within SPEC's bf16 tolerance of the float32 model."""
    model = models["cca"].with_attention(dtype="bfloat16")
    ref = forward(models["cca"], sequence)
    logits, cache = model.prefill(sequence, np.array([9, 9]), model.init_cache(2, SEQ))
    got = [np.asarray(logits, np.float32)]
    for pos in range(9, 24):
        logits, cache = model.decode_step(sequence[:, pos], cache)
        got.append(np.asarray(logits, np.float32))
    assert rel_err(np.stack(got, axis=1), ref[:, 8:24]) < 2e-2


# ---------------------------------------------------------------------------- cache contents
def _nonzero_rows(x) -> np.ndarray:
    """(B, S) True where a cache row (Hkv, D) holds anything."""
    return np.abs(np.asarray(x)).reshape(*x.shape[:2], -1).max(-1) > 0


@pytest.mark.parametrize("attention", ["full", "cca"])
def test_cache_holds_exactly_the_expected_tokens(models, sequence, rel_err, attention):
    """First layer, checked against q, k, v recomputed from the embeddings: full attention holds
    k, v of every position < length; CCA holds the core of every completed group (pooled as
    ``reference.pool_core_tokens`` pools the whole sequence) and the last R raw tokens in slots
    p mod R. Everything else in a fresh cache stays exactly zero."""
    model = models[attention]
    max_len = 2 * SEQ + 1  # not a multiple of g: N = 20 core slots
    q, k, v = (np.asarray(x) for x in layer0_qkv(model, sequence))
    k_core, v_core = (np.asarray(x) for x in pool_core_tokens(q, k, v, group_size=G))
    lengths = np.array([3, 14])
    logits, cache = model.prefill(sequence, lengths, model.init_cache(2, max_len))
    for step in range(SEQ - 14 + 1):
        layer = jax.tree_util.tree_map(np.asarray, cache[0])
        np.testing.assert_array_equal(np.asarray(layer.lengths), lengths)
        if attention == "full":
            assert isinstance(layer, FullCache) and layer.k.shape == (2, max_len, 2, 16)
            for b in range(2):
                n = lengths[b]
                assert rel_err(layer.k[b, :n], k[b, :n]) < 1e-6
                assert rel_err(layer.v[b, :n], v[b, :n]) < 1e-6
            np.testing.assert_array_equal(_nonzero_rows(layer.k),
                                          np.arange(max_len) < lengths[:, None])
        else:
            assert isinstance(layer, CCACache)
            assert layer.core_k.shape == (2, max_len // G, 2, 16)
            assert layer.ring_k.shape == (2, W + G, 2, 16)
            for b in range(2):
                n = lengths[b] // G  # completed groups
                if n:
                    assert rel_err(layer.core_k[b, :n], k_core[b, :n]) < 1e-5
                    assert rel_err(layer.core_v[b, :n], v_core[b, :n]) < 1e-5
            np.testing.assert_array_equal(_nonzero_rows(layer.core_k),
                                          np.arange(max_len // G) < (lengths // G)[:, None])
            slots = np.asarray(ring_positions(jnp.asarray(lengths), W + G))
            held = slots >= 0
            np.testing.assert_array_equal(held.sum(1), np.minimum(lengths, W + G))
            np.testing.assert_array_equal(_nonzero_rows(layer.ring_k), held)
            for b in range(2):
                pos = slots[b][held[b]]
                assert set(pos) == set(range(max(0, lengths[b] - W - G), lengths[b]))
                assert rel_err(layer.ring_k[b][held[b]], k[b, pos]) < 1e-6
                assert rel_err(layer.ring_v[b][held[b]], v[b, pos]) < 1e-6
        if step < SEQ - 14:
            logits, cache = model.decode_step(sequence[np.arange(2), lengths], cache)
            lengths = lengths + 1


def test_ring_positions_and_ring_size():
    pos = np.asarray(ring_positions(jnp.asarray([0, 1, 12, 13, 30]), 12))
    np.testing.assert_array_equal(pos[0], np.arange(12) - 12)  # empty: all negative
    np.testing.assert_array_equal(pos[1], [0] + list(range(-11, 0)))
    np.testing.assert_array_equal(pos[2], np.arange(12))
    np.testing.assert_array_equal(pos[3], [12] + list(range(1, 12)))
    assert sorted(pos[4]) == list(range(18, 30)) and all(pos[4] % 12 == np.arange(12))
    cfg = tiny_config(attention="cca")
    assert ring_size(cfg, 1000) == W + G
    assert ring_size(cfg, 5) == 8  # short caches: max_len rounded up to a multiple of g
    assert ring_size(cfg, 12) == 12


# ---------------------------------------------------------------------------- bytes
@pytest.mark.parametrize("attention", ["full", "cca", "reattention"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cache_bytes_match_the_arrays(attention, dtype):
    cfg = tiny_config(attention=attention, dtype=dtype)
    for max_len, batch in ((1, 1), (7, 2), (12, 1), (40, 3), (81, 2)):
        cache = init_cache(cfg, batch, max_len)
        assert len(cache) == cfg.num_layers
        real = sum(x.nbytes for x in jax.tree_util.tree_leaves(cache))
        assert cache_bytes(cfg, max_len, batch) == real, (max_len, batch)


def test_llama2_7b_cache_bytes_at_128k():
    """LLaMA-2-7B (32 layers, 32 kv heads of dim 128), bf16, one sequence of 131072 tokens."""
    expected = {
        "full": 32 * (2 * 131072 * 32 * 128 * 2 + 4),  # 64 GiB + 32 int32 lengths
        "cca": 32 * (2 * (131072 // 16 + 1024 + 16) * 32 * 128 * 2 + 4),  # 8192 core + 1040 ring
    }
    assert expected == {"full": 68_719_476_864, "cca": 4_840_226_944}
    for att, nbytes in expected.items():
        cfg = CCAConfig.llama2_7b(attention=att, group_size=16, local_window=1024,
                                  dtype="bfloat16")
        assert cache_bytes(cfg, 131072) == nbytes
        shapes = jax.eval_shape(lambda cfg=cfg: init_cache(cfg, 1, 131072))  # no memory
        assert sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(shapes)) == nbytes


def test_cache_arguments_are_checked(models, sequence):
    with pytest.raises(ValueError, match="max_len must be a positive int"):
        init_cache(tiny_config(attention="cca"), 2, 0)
    # ReAttention keeps every (un-rotated) key and value: full attention's size.
    assert cache_bytes(tiny_config(attention="reattention"), 16, 2) == \
        cache_bytes(tiny_config(attention="full"), 16, 2)
    model = models["cca"]
    with pytest.raises(ValueError, match="does not fit a cache of batch 2 and max_len 30"):
        model.prefill(sequence, None, model.init_cache(2, 30))
    with pytest.raises(ValueError, match="does not fit a cache of batch 3"):
        model.prefill(sequence, None, model.init_cache(3, SEQ))
    with pytest.raises(ValueError, match=r"lengths must be 2 ints in \[1, 40\]"):
        model.prefill(sequence, [0, 3], model.init_cache(2, SEQ))
    with pytest.raises(ValueError, match="chunk_size"):
        model.prefill(sequence, None, model.init_cache(2, SEQ), chunk_size=0)
    # Before, floats were cast and ids outside the vocabulary clamped by the embedding gather.
    with pytest.raises(ValueError, match="input_ids must hold integers"):
        model.prefill(sequence.astype(np.float32), None, model.init_cache(2, SEQ))
    with pytest.raises(ValueError, match="vocabulary"):
        model.prefill(np.where(sequence == sequence[0, 3], VOCAB, sequence), None,
                      model.init_cache(2, SEQ))
    with pytest.raises(ValueError, match=r"lengths must be 2 ints"):
        model.prefill(sequence, np.array([3.5, 2.0]), model.init_cache(2, SEQ))
    padded = sequence.copy()
    padded[1, 20:] = -1  # right padding past a row's length is never read: any value
    model.prefill(padded, [SEQ, 20], model.init_cache(2, SEQ))


@pytest.mark.parametrize("attention", ["full", "cca", "reattention"])
def test_decode_and_extend_arguments_are_checked_and_the_cache_survives(models, sequence,
                                                                        attention):
    """extend / decode_step refuse, with a ValueError naming the problem and before the cache
    is donated, what they used to cast or drop silently: float ids, a (B, 1) token array, a
    batch that is not the cache's, n_valid outside [0, C], ids outside the vocabulary, and
    valid tokens past max_len (not stored: their logits would be meaningless). After each
    refusal the same cache still decodes."""
    model = models[attention] if attention in models else CCALlama.from_config(
        tiny_config(attention="reattention", reattention_window=8, reattention_sink=2))
    _, cache = model.prefill(sequence[:, :SEQ - 2], None, model.init_cache(2, SEQ))
    tokens = sequence[:, SEQ - 2]
    bad_steps = [
        (lambda c: model.decode_step(tokens.astype(np.float32), c), "integers"),
        (lambda c: model.decode_step(tokens[:, None], c), r"\(batch,\)"),
        (lambda c: model.decode_step(tokens[:1], c), "1 sequences given to a cache of batch 2"),
        (lambda c: model.decode_step(np.array([0, VOCAB]), c), "vocabulary"),
        (lambda c: model.extend(sequence[:, :3], np.array([4, 0]), c), r"n_valid .* \[0, 3\]"),
        (lambda c: model.extend(sequence[:, :3], np.array([3, 1]), c), "sequence 0 holds"),
    ]
    for step, match in bad_steps:
        with pytest.raises(ValueError, match=match):
            step(cache)
        assert not cache[0].lengths.is_deleted()
    logits, cache = model.extend(sequence[:, SEQ - 2:], np.array([2, 1]), cache)  # fills row 0
    assert np.asarray(cache[0].lengths).tolist() == [SEQ, SEQ - 1]
    with pytest.raises(ValueError, match=f"holds {SEQ} tokens per sequence; sequence 0"):
        model.decode_step(tokens, cache)


# ---------------------------------------------------------------------------- generation
def recompute_greedy(model, ids, steps) -> np.ndarray:
    """The pre-cache way: each step runs a full forward over a (B, T0 + steps) buffer and takes
    the argmax at the last filled row. The unfilled tail holds random tokens, which causal
    attention must never let reach that row; one buffer shape, so one compilation."""
    ids = np.asarray(ids, np.int32)
    t0 = ids.shape[1]
    buf = np.random.default_rng(99).integers(0, VOCAB, (ids.shape[0], t0 + steps)).astype(np.int32)
    buf[:, :t0] = ids
    for pos in range(t0, t0 + steps):
        buf[:, pos] = forward(model, buf)[:, pos - 1].argmax(-1)
    return buf


@pytest.mark.parametrize("attention", ["full", "cca"])
def test_generate_with_cache_equals_recompute_greedy(models, sequence, attention):
    """Prompt of 9, 13 new tokens: positions 9..21 cross groups 12, 16, 20 and move start(t)."""
    model = models[attention]
    prompt = sequence[:, :9]
    ref = recompute_greedy(model, prompt, 13)
    np.testing.assert_array_equal(np.asarray(generate(model, prompt, 13)), ref)
    np.testing.assert_array_equal(np.asarray(generate(model, prompt, 13, prefill_chunk=4)), ref)


@pytest.mark.parametrize("attention", ["full", "cca"])
def test_generate_batch_equals_each_prompt_alone(models, sequence, attention):
    model = models[attention]
    prompts = [sequence[0, :5].tolist(), sequence[1, :14].tolist(), sequence[0, 7:16].tolist()]
    out = generate_batch(model, prompts, 9)
    assert [len(o) for o in out] == [9, 9, 9]
    for prompt, new in zip(prompts, out):
        alone = np.asarray(generate(model, [prompt], 9))[0, len(prompt):]
        assert new == alone.tolist()
    # A stop token ends that prompt's list (included) and no other.
    first_new = next(i for i in range(1, 9) if out[1][i] not in out[1][:i])
    stop = out[1][first_new]
    cut = generate_batch(model, prompts, 9, stop_tokens=stop)
    for new, full in zip(cut, out):
        expected = full[: full.index(stop) + 1] if stop in full else full
        assert new == expected


def test_generate_batch_checks_its_prompts(models):
    with pytest.raises(ValueError, match="non-empty list"):
        generate_batch(models["full"], [], 3)
    with pytest.raises(ValueError, match="at least one token"):
        generate_batch(models["full"], [[1, 2], []], 3)
    with pytest.raises(ValueError, match=r"\[0, 97\)"):
        generate_batch(models["full"], [[1, 2], [VOCAB]], 3)
    assert generate_batch(models["full"], [[1, 2], [3]], 0) == [[], []]
