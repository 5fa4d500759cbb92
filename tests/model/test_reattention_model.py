"""CCALlama(attention="reattention"): the model, its decode cache (ReAttentionCache: un-rotated
keys) and generation.

Tiny random LLaMA (2 layers, hidden 64, head dim 16), GQA 4/2 unless named, llama3 RoPE scaling
with an original context of 64 so that its three frequency bands (kept, blended, divided) all
occur. Selection: sink 3, window 8 (aligned to 4), each query picks 2 keys, at most 3 per chunk
of 8 queries, spans of 3: over 40+ tokens the middle region holds far more keys than are
selected, so the selection really drops keys. Positions then stay below
3 + 3 * 3 + 8 + 3 + 8 = 31 (``CCAConfig.max_reattention_position``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kernels.reattention.reference as reattention_reference
from jax_cca import CCAConfig, CCALlama
from jax_cca.cache import ReAttentionCache, cache_bytes, init_cache
from jax_cca.decode import reattention_kwargs
from jax_cca.generation import generate, generate_batch
from jax_cca.rope import inverse_frequencies

VOCAB = 97
SEQ = 40
TOL = 1e-4  # fp32 whole model (SPEC.md section 4)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
SELECTION = dict(reattention_sink=3, reattention_window=8, reattention_top_k=2,
                 reattention_max_selected=3, reattention_span=3, reattention_chunk=8,
                 reattention_align=4)
EVERYTHING = dict(reattention_top_k=64, reattention_max_selected=64)  # keeps every middle key


def config(**overrides) -> CCAConfig:
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_layers=2,
                num_heads=4, num_kv_heads=2, max_position_embeddings=256, rope_theta=10000.0,
                rope_scaling=LLAMA3, attention="reattention", **SELECTION)
    return CCAConfig.tiny(**{**base, **overrides})


@pytest.fixture(scope="module")
def model() -> CCALlama:
    return CCALlama.from_config(config(), seed=7)


@pytest.fixture(scope="module")
def sequence() -> np.ndarray:
    return np.random.default_rng(4242).integers(0, VOCAB, (2, SEQ)).astype(np.int32)


_FORWARDS: dict[int, tuple] = {}


def forward(m: CCALlama, ids) -> np.ndarray:
    """``m(ids)`` jitted (one compilation per model and shape), as numpy."""
    if id(m) not in _FORWARDS:
        graphdef, state = nnx.split(m)
        _FORWARDS[id(m)] = (m, jax.jit(lambda st, x: nnx.merge(graphdef, st)(x)), state)
    _, fn, state = _FORWARDS[id(m)]
    return np.asarray(fn(state, jnp.asarray(ids, jnp.int32)))


def oracle_logits(m: CCALlama, ids) -> np.ndarray:
    """The model's layers composed by hand around ``reattention_naive`` (the dense test oracle:
    a keep-mask over all keys from an argsort of every score, positions from its running
    count), with the model's llama3-scaled frequencies. Jitted."""
    graphdef, state = nnx.split(m)
    return np.asarray(jax.jit(lambda st, x: _oracle(nnx.merge(graphdef, st), x))(
        state, jnp.asarray(ids, jnp.int32)))


def _oracle(m: CCALlama, ids):
    c = m.config
    x = m.embed_tokens(ids)
    b, t = ids.shape
    for layer in m.layers:
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).reshape(b, t, c.num_heads, c.head_dim)  # un-rotated
        k = attn.k_proj(h).reshape(b, t, c.num_kv_heads, c.head_dim)
        v = attn.v_proj(h).reshape(b, t, c.num_kv_heads, c.head_dim)
        o = reattention_reference.reattention_naive(q, k, v, sel=c.selection(),
                                                    inv_freq=inverse_frequencies(c))
        x = x + attn.o_proj(o.reshape(b, t, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return m.logits(m.norm(x))


# ---------------------------------------------------------------------------- the forward
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_selecting_everything_equals_full_attention(heads, sequence, rel_err):
    """With every middle key selected (top_k and the cap above the context) the gathered set is
    the whole prefix in order, re-numbered 0..t: full attention. Likewise when the local window
    covers the context. The restrictive selection really differs."""
    hq, hkv = heads
    restrictive = CCALlama.from_config(config(num_heads=hq, num_kv_heads=hkv), seed=3)
    full = forward(restrictive.with_attention(attention="full"), sequence)
    everything = forward(restrictive.with_attention(**EVERYTHING), sequence)
    assert rel_err(everything, full) < TOL
    if hkv == 2:
        wide = forward(restrictive.with_attention(reattention_window=64), sequence)
        assert rel_err(wide, full) < TOL
    assert rel_err(forward(restrictive, sequence), full) > 1e-2


def test_forward_equals_the_dense_oracle(model, sequence, rel_err):
    assert rel_err(forward(model, sequence), oracle_logits(model, sequence)) < TOL
    mha = CCALlama.from_config(config(num_kv_heads=4, reattention_chunk=5), seed=5)
    assert rel_err(forward(mha, sequence[:, :31]), oracle_logits(mha, sequence[:, :31])) < TOL


def test_forward_arguments_are_checked(model, sequence):
    ids = jnp.asarray(sequence)
    with pytest.raises(ValueError, match="custom positions"):
        model(ids, positions=jnp.broadcast_to(jnp.arange(SEQ), ids.shape))
    with pytest.raises(ValueError, match="does not run ReAttention"):
        model.with_attention(implementation="cudnn")(ids)


# ---------------------------------------------------------------------------- block picks
def test_block_picks_in_the_model(sequence, rel_err):
    """reattention_key_block = span = 2 (dividing the align 4): each row picks whole aligned
    blocks of 2 middle keys. Every block selectable is full attention; the restrictive block
    selection drops keys and equals the dense oracle (which reads the block picks from
    config.selection())."""
    m = CCALlama.from_config(config(reattention_key_block=2, reattention_span=2), seed=3)
    assert m.config.selection().key_block == 2
    assert reattention_kwargs(m.config)["key_block"] == 2  # prefill and decode steps alike
    full = forward(m.with_attention(attention="full"), sequence)
    assert rel_err(forward(m.with_attention(**EVERYTHING), sequence), full) < TOL
    got = forward(m, sequence)
    assert rel_err(got, full) > 1e-2
    assert rel_err(got, oracle_logits(m, sequence)) < TOL


def test_block_picks_reach_the_decode_op(rel_err):
    """ops.reattention_decode(key_block=...) (the model's decode step) is the last row of
    ops.reattention with chunks of one query, and differs from token picks."""
    from jax_cca import ops
    from kernels.reattention import key_blocks
    from kernels.reattention.params import Selection

    rng = np.random.default_rng(11)
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
               for shape in ((2, 4, 16), (2, 40, 2, 16), (2, 40, 2, 16)))
    lengths = jnp.asarray([40, 33])
    kw = dict(sink_tokens=3, local_window=8, top_k=2, max_selected=3, span=2, middle_align=4,
              implementation="xla")
    step = ops.reattention_decode(q, k, v, lengths, key_block=2, **kw)
    last = ops.reattention(q[:, None], k, v, q_start=lengths - 1, chunk_size=1, key_block=2,
                           **kw)[:, 0]
    assert rel_err(step, last) < 1e-6
    assert rel_err(step, ops.reattention_decode(q, k, v, lengths, **kw)) > 1e-3
    with pytest.raises(ValueError, match="key_block=4"):
        ops.reattention_decode(q, k, v, lengths, key_block=4, **kw)
    # the summaries a decode cache keeps: the same step, with or without them, both ways (head
    # dim 32, the Pallas kernels' least)
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
               for shape in ((2, 4, 32), (2, 40, 2, 32), (2, 40, 2, 32)))
    summaries = key_blocks.summaries(k, Selection(3, 8, 2, 3, 2, 1, 4, key_block=2))
    bogus = summaries.at[:, 3 + 5].set(100.0)  # block 5 wins every row's picks: used?
    for implementation in ("xla", "pallas"):
        kw["implementation"] = implementation
        step = lambda s: np.asarray(ops.reattention_decode(q, k, v, lengths, key_block=2,
                                                           block_summaries=s, **kw))
        np.testing.assert_array_equal(step(summaries), step(None))
        assert rel_err(step(bogus), step(summaries)) > 1e-3
    for bad, extra in ((summaries[:, :-8], dict(key_block=2)), (summaries, {}),
                       (summaries.astype(jnp.bfloat16), dict(key_block=2))):
        with pytest.raises(ValueError, match="block_summaries must be"):
            ops.reattention_decode(q, k, v, lengths, block_summaries=bad, **extra, **kw)


# ---------------------------------------------------------------------------- decode cache
def test_cache_holds_the_unrotated_keys_and_values(model, sequence):
    cache = model.init_cache(2, SEQ + 3)
    assert all(isinstance(layer, ReAttentionCache) for layer in cache)
    assert cache_bytes(model.config, SEQ + 3, 2) == sum(
        x.nbytes for x in jax.tree_util.tree_leaves(cache))
    _, cache = model.prefill(sequence, [SEQ, 29], cache)
    np.testing.assert_array_equal(np.asarray(cache[0].lengths), [SEQ, 29])
    layer = model.layers[0]
    h = layer.input_layernorm(model.embed_tokens(jnp.asarray(sequence)))
    k = np.asarray(layer.self_attn.k_proj(h)).reshape(2, SEQ, 2, 16)
    v = np.asarray(layer.self_attn.v_proj(h)).reshape(2, SEQ, 2, 16)
    np.testing.assert_allclose(np.asarray(cache[0].k[0, :SEQ]), k[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(cache[0].v[1, :29]), v[1, :29], rtol=1e-6, atol=1e-6)
    assert not np.asarray(cache[0].k[1, 29:]).any()  # padding never reaches the cache


def test_decode_equals_the_forward_when_each_query_selects_alone(sequence, rel_err):
    """reattention_chunk=1: every prefill row selects for itself, as every decode step does, so
    prefill + cached decode steps give the rows of one forward."""
    alone = CCALlama.from_config(config(reattention_chunk=1), seed=7)
    want = forward(alone, sequence)
    prompt = 17
    logits, cache = alone.prefill(sequence[:, :prompt], None, alone.init_cache(2, SEQ))
    got = [np.asarray(logits)]
    for t in range(prompt, SEQ):
        logits, cache = alone.decode_step(sequence[:, t], cache)
        got.append(np.asarray(logits))
    assert rel_err(np.stack(got, axis=1), want[:, prompt - 1:]) < TOL
    np.testing.assert_array_equal(np.asarray(cache[1].lengths), [SEQ, SEQ])


def test_block_picks_cache_keeps_the_summaries(sequence, rel_err):
    """With block picks the decode cache keeps the blocks' summaries: after a right-padded
    prefill, a chunked prefill and every decode step they are exactly
    ``key_blocks.summaries`` of the cached keys (every write recomputes the blocks it touched),
    the decode steps read them (the op's ``block_summaries``) and still give the rows of one
    forward, and ``cache_bytes`` counts them."""
    from kernels.reattention import key_blocks

    alone = CCALlama.from_config(config(reattention_chunk=1, reattention_key_block=2,
                                        reattention_span=2), seed=5)
    sel = alone.config.selection()
    cache = alone.init_cache(2, SEQ + 1)
    assert cache[0].block_summaries.shape == (2, 24, 2, 32)  # round_up(3 + 19 blocks, 8)
    assert cache_bytes(alone.config, SEQ + 1, 2) == sum(
        x.nbytes for x in jax.tree_util.tree_leaves(cache))

    def check(cache):
        for layer in cache:
            np.testing.assert_array_equal(np.asarray(layer.block_summaries),
                                          np.asarray(key_blocks.summaries(layer.k, sel)))

    prompt = 13
    logits, cache = alone.prefill(sequence[:, :prompt], [prompt, 9], cache)
    check(cache)
    _, chunked = alone.prefill(sequence[:, :prompt], None, alone.init_cache(2, SEQ + 1),
                               chunk_size=5)
    check(chunked)
    check(alone.prefill(sequence, None, alone.init_cache(2, SEQ + 1))[1])  # every block: all
    logits, cache = alone.prefill(sequence[:, :prompt], None, alone.init_cache(2, SEQ + 1))
    got = [np.asarray(logits)]
    for t in range(prompt, SEQ):
        logits, cache = alone.decode_step(sequence[:, t], cache)
        got.append(np.asarray(logits))
        check(cache)
    assert rel_err(np.stack(got, axis=1), forward(alone, sequence)[:, prompt - 1:]) < TOL
    # a model picking other blocks (or tokens) decodes from the same cache, its summaries unused
    others = (dict(reattention_key_block=4, reattention_span=4),
              dict(reattention_key_block=1, reattention_span=3))
    for other in others:
        switched = alone.with_attention(**other)
        fresh = switched.prefill(sequence[:, :prompt], None, switched.init_cache(2, SEQ + 1))[1]
        want = switched.decode_step(sequence[:, prompt], fresh)[0]
        reused = alone.prefill(sequence[:, :prompt], None, alone.init_cache(2, SEQ + 1))[1]
        assert rel_err(switched.decode_step(sequence[:, prompt], reused)[0], want) < TOL


@pytest.mark.parametrize("chunk", [8, 16])
def test_chunked_prefill_equals_one_pass(model, sequence, rel_err, chunk):
    """Prefill chunks that are multiples of reattention_chunk (8) keep the selection chunks."""
    one, cache_one = model.prefill(sequence, [SEQ, 27], model.init_cache(2, SEQ))
    got, cache = model.prefill(sequence, [SEQ, 27], model.init_cache(2, SEQ), chunk_size=chunk)
    assert rel_err(got, one) < TOL
    for a, b in zip(cache, cache_one):
        assert rel_err(a.k, b.k) < TOL and rel_err(a.v, b.v) < TOL
        np.testing.assert_array_equal(np.asarray(a.lengths), np.asarray(b.lengths))
    whole = forward(model, sequence)
    assert rel_err(np.asarray(one)[0], whole[0, -1]) < TOL


def test_padding_never_reaches_the_selection_logits_or_cache(model, sequence, rel_err):
    """Row 1 holds 35 tokens and 5 of padding: in its last real chunk [32, 40) five padding
    queries would otherwise outvote its three real ones (the cap is 3 of the 20 middle keys).
    Equal to the prompt alone."""
    lengths = [SEQ, 35]
    for chunk in (None, 8):
        logits, cache = model.prefill(sequence, lengths, model.init_cache(2, SEQ),
                                      chunk_size=chunk)
        for b, n in enumerate(lengths):
            alone, cache_alone = model.prefill(sequence[b:b + 1, :n], None,
                                               model.init_cache(1, SEQ))
            assert rel_err(np.asarray(logits)[b], np.asarray(alone)[0]) < TOL
            assert rel_err(cache[1].k[b, :n], cache_alone[1].k[0, :n]) < TOL
    # In a plain forward the 5 tokens after position 34 are real and vote: row 34 changes.
    assert rel_err(np.asarray(logits)[1], forward(model, sequence)[1, 34]) > 1e-2


# ---------------------------------------------------------------------------- generation
def recompute_greedy(m: CCALlama, ids, steps) -> np.ndarray:
    """Each step: a whole forward over a fixed (B, T0 + steps) buffer (random tail), argmax at
    the last filled row."""
    ids = np.asarray(ids, np.int32)
    t0 = ids.shape[1]
    buf = np.random.default_rng(9).integers(0, VOCAB, (ids.shape[0], t0 + steps)).astype(np.int32)
    buf[:, :t0] = ids
    for pos in range(t0, t0 + steps):
        buf[:, pos] = forward(m, buf)[:, pos - 1].argmax(-1)
    return buf


def test_generate_greedy_equals_recompute(sequence):
    alone = CCALlama.from_config(config(reattention_chunk=1), seed=7)
    prompt = sequence[:, :19]
    want = recompute_greedy(alone, prompt, 12)
    np.testing.assert_array_equal(np.asarray(generate(alone, prompt, 12)), want)
    np.testing.assert_array_equal(np.asarray(generate(alone, prompt, 12, prefill_chunk=4)),
                                  want)


def test_generate_batch_and_sampling(model, sequence):
    """Prompts of 27 and 38 tokens decoded together: each gets its own continuation (the
    shorter one's last chunk [24, 32) holds 3 real and 5 padding queries). Sampling is
    reproducible, stays in the vocabulary and differs from greedy."""
    prompts = [sequence[0, 2:29].tolist(), sequence[1, :38].tolist()]
    out = generate_batch(model, prompts, 8)
    assert [len(o) for o in out] == [8, 8]
    for prompt, new in zip(prompts, out):
        assert new == np.asarray(generate(model, [prompt], 8))[0, len(prompt):].tolist()
    kw = dict(temperature=0.8, top_k=20, seed=3)
    sampled = generate_batch(model, prompts, 8, **kw)
    assert sampled == generate_batch(model, prompts, 8, **kw)
    assert all(0 <= t < VOCAB for row in sampled for t in row)
    assert sampled != out


def test_positions_stay_below_the_bound_past_the_pretrained_range(monkeypatch):
    """max_position_embeddings 48, a 110-token context: generation is allowed (ReAttention
    re-numbers), and every position RoPE sees, in the prefill and in each decode step, stays
    below the selection's bound 31; the same lengths are refused for full attention and for a
    selection whose bound exceeds the range."""
    cfg = config(max_position_embeddings=48)
    assert cfg.max_reattention_position() == 31
    m = CCALlama.from_config(cfg, seed=1)
    seen = []
    original = reattention_reference.rope_cos_sin

    def recording(positions, inv_freq):
        jax.debug.callback(lambda p: seen.append(int(np.max(p))), jnp.max(positions))
        return original(positions, inv_freq)

    monkeypatch.setattr(reattention_reference, "rope_cos_sin", recording)
    prompt = np.random.default_rng(5).integers(0, VOCAB, (1, 98)).astype(np.int32)
    out = np.asarray(generate(m, prompt, 12))
    jax.effects_barrier()
    assert out.shape == (1, 110)
    assert len(seen) >= 2 * 11  # both layers, prefill and every decode step
    assert 24 <= max(seen) < 31 < 48
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(m.with_attention(attention="full"), prompt, 12)
    with pytest.raises(ValueError, match="reach positions up to 109"):
        generate(m.with_attention(reattention_window=96), prompt, 12)


# ---------------------------------------------------------------------------- Pallas
def test_pallas_model_matches_xla(sequence, rel_err):
    """The Pallas kernels (interpreted on CPU) in the model, head dim 32: forward and decode."""
    xla = CCALlama.from_config(config(num_heads=2, num_kv_heads=1, implementation="xla"), seed=2)
    pallas = xla.with_attention(implementation="pallas")
    ids = sequence[:, :21]
    assert rel_err(forward(pallas, ids), forward(xla, ids)) < TOL
    steps = {}
    for name, m in (("xla", xla), ("pallas", pallas)):
        _, cache = m.prefill(ids, [21, 15], m.init_cache(2, 24))
        steps[name] = np.asarray(m.decode_step(sequence[:, 21], cache)[0])
    assert rel_err(steps["pallas"], steps["xla"]) < TOL


def test_init_cache_without_a_model():
    cache = init_cache(config(), 3, 10)
    assert isinstance(cache[0], ReAttentionCache) and cache[0].k.shape == (3, 10, 2, 16)
