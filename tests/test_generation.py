"""jax_cca.generation: greedy and sampled decoding (prefill, then cached decode steps)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_cca import CCAConfig, CCALlama
from jax_cca.generation import Sampling, _decode_step, filter_logits, generate, select_next_token

VOCAB = 97
GROUP, WINDOW = 4, 8
# Positions 11..17 are generated: core tokens first become visible at t = 11 (start(11) = 4), the
# local region's start moves at t = 15, and group boundaries 12 and 16 are crossed.
PROMPT_LEN = 11
NEW = 7


def tiny_config(**overrides) -> CCAConfig:
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_layers=2,
                num_heads=4, num_kv_heads=2, max_position_embeddings=64, group_size=GROUP,
                local_window=WINDOW)
    return CCAConfig.tiny(**{**base, **overrides})


@pytest.fixture(scope="module")
def models() -> dict[str, CCALlama]:
    full = CCALlama.from_config(tiny_config(attention="full"), seed=3)
    return {"full": full, "cca": full.with_attention(attention="cca")}


@pytest.fixture(scope="module")
def prompt() -> jax.Array:
    rng = np.random.default_rng(1234)
    return jnp.asarray(rng.integers(3, VOCAB, (2, PROMPT_LEN)), jnp.int32)


_FORWARDS: dict[int, tuple] = {}


def forward(model, ids) -> jax.Array:
    """``model(ids)`` jitted (one compile per length; eager op-by-op dispatch is far slower)."""
    if id(model) not in _FORWARDS:
        graphdef, state = nnx.split(model)
        fn = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))
        _FORWARDS[id(model)] = (model, fn, state)  # holding the model keeps id() unique
    _, fn, state = _FORWARDS[id(model)]
    return fn(state, jnp.asarray(ids))


def manual_greedy(model, ids, steps):
    """Reference: re-run the model on the growing sequence and take the argmax of the last row."""
    cur = jnp.asarray(ids)
    for _ in range(steps):
        nxt = jnp.argmax(forward(model, cur)[:, -1], axis=-1).astype(jnp.int32)
        cur = jnp.concatenate([cur, nxt[:, None]], axis=1)
    return np.asarray(cur)


class _LazyGreedy(dict):
    """attention -> reference greedy continuation, computed on first use (so that the cost is
    spread over the tests that need each one)."""

    def __init__(self, models, prompt):
        super().__init__()
        self.models, self.prompt = models, prompt

    def __missing__(self, attention):
        self[attention] = manual_greedy(self.models[attention], self.prompt, NEW)
        return self[attention]


@pytest.fixture(scope="module")
def greedy(models, prompt) -> dict[str, np.ndarray]:
    return _LazyGreedy(models, prompt)


# ---------------------------------------------------------------------------- greedy
@pytest.mark.parametrize("attention", ["full", "cca"])
def test_greedy_matches_manual_argmax_loop(models, prompt, greedy, attention):
    out = generate(models[attention], prompt, NEW)
    assert out.shape == (2, PROMPT_LEN + NEW) and out.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out), greedy[attention])


def test_cca_setting_really_differs_from_full(models, greedy):
    """Guards the test above: with g=4, w=8 at length 18 CCA must not be full attention."""
    ids = jnp.asarray(greedy["full"])
    a, b = np.asarray(forward(models["full"], ids)), np.asarray(forward(models["cca"], ids))
    rel = np.linalg.norm(a - b) / np.linalg.norm(a)
    assert rel > 1e-3
    # ... while the first w + g - 1 positions see only raw tokens and agree.
    np.testing.assert_allclose(a[:, : WINDOW + GROUP - 1], b[:, : WINDOW + GROUP - 1],
                               rtol=1e-4, atol=1e-4)


def test_rows_of_a_batch_are_independent(models, prompt, greedy):
    single = generate(models["cca"], prompt[1:], NEW)
    np.testing.assert_array_equal(np.asarray(single)[0], greedy["cca"][1])


def test_model_method_delegates(models, prompt, greedy):
    out = models["full"].generate(prompt, max_new_tokens=NEW)
    np.testing.assert_array_equal(np.asarray(out), greedy["full"])


def test_accepts_numpy_and_lists(models, prompt, greedy):
    out = generate(models["full"], np.asarray(prompt).tolist(), 3)
    np.testing.assert_array_equal(np.asarray(out), greedy["full"][:, : PROMPT_LEN + 3])


def test_zero_new_tokens_returns_prompt(models, prompt):
    out = generate(models["full"], np.asarray(prompt, np.int64), 0)
    assert out.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out), np.asarray(prompt))


def test_decode_step_compiled_once(models, prompt):
    before = _decode_step._cache_size()
    generate(models["full"], prompt, 5)
    after_first = _decode_step._cache_size()
    generate(models["full"], prompt, 5)
    assert after_first - before <= 1  # one compilation for all 5 positions
    assert _decode_step._cache_size() == after_first  # and reused by the next call


# ---------------------------------------------------------------------------- sampling
def test_sampling_is_reproducible_and_depends_on_seed(models, prompt):
    kw = dict(temperature=1.0, top_p=0.95)
    a = generate(models["cca"], prompt, NEW, seed=7, **kw)
    b = generate(models["cca"], prompt, NEW, seed=7, **kw)
    c = generate(models["cca"], prompt, NEW, seed=8, **kw)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a)[:, PROMPT_LEN:], np.asarray(c)[:, PROMPT_LEN:])
    np.testing.assert_array_equal(np.asarray(a)[:, :PROMPT_LEN], np.asarray(prompt))


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-6)], ids=["top_k=1", "top_p~0"])
def test_single_candidate_sampling_equals_greedy(models, prompt, greedy, kw):
    out = generate(models["cca"], prompt, NEW, temperature=3.0, seed=5, **kw)
    np.testing.assert_array_equal(np.asarray(out), greedy["cca"])


def test_sampled_tokens_come_from_the_top_k_of_the_right_position(models, prompt):
    model = models["full"]
    out = np.asarray(generate(model, prompt, 8, temperature=20.0, top_k=3, seed=11))
    logits = np.asarray(forward(model, out))
    for pos in range(PROMPT_LEN, PROMPT_LEN + 8):
        top3 = np.argsort(-logits[:, pos - 1], axis=-1)[:, :3]
        for row in range(2):
            assert out[row, pos] in top3[row], (row, pos)
    # At temperature 20 over 3 candidates, picking only argmaxes 16 times is unlikely (~1e-8).
    argmax = logits[:, PROMPT_LEN - 1 : PROMPT_LEN + 7].argmax(-1)
    assert not np.array_equal(argmax, out[:, PROMPT_LEN:])


def test_filter_logits_top_k_and_top_p_sets():
    logits = jnp.log(jnp.asarray([[0.05, 0.5, 0.15, 0.3], [0.4, 0.1, 0.25, 0.25]]))
    kept_k = np.isfinite(np.asarray(filter_logits(logits, Sampling(1.0, top_k=2))))
    np.testing.assert_array_equal(kept_k, [[0, 1, 0, 1], [1, 0, 1, 1]])  # a tie keeps both
    kept_p = np.isfinite(np.asarray(filter_logits(logits, Sampling(1.0, top_p=0.7))))
    # Row 0: 0.5 (before: 0) and 0.3 (before: 0.5 < 0.7) stay; 0.15 has 0.8 before it.
    np.testing.assert_array_equal(kept_p[0], [0, 1, 0, 1])
    # Row 1: 0.4, then one 0.25 (before: 0.4); the other 0.25 has 0.65 < 0.7 before it too.
    np.testing.assert_array_equal(kept_p[1], [1, 0, 1, 1])


def test_sampling_frequencies_follow_temperature_and_top_p():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    n = 40000
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs, jnp.float32)), (n, 4))
    key = jax.random.key(0)
    tokens = np.asarray(select_next_token(logits, key, Sampling(temperature=2.0)))
    expected = np.sqrt(probs) / np.sqrt(probs).sum()
    np.testing.assert_allclose(np.bincount(tokens, minlength=4) / n, expected, atol=0.01)
    tokens = np.asarray(select_next_token(logits, key, Sampling(temperature=1.0, top_p=0.7)))
    np.testing.assert_allclose(np.bincount(tokens, minlength=4) / n,
                               [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.01)


# ---------------------------------------------------------------------------- stop tokens
def _first_new_token_absent_from(row: np.ndarray, other: np.ndarray) -> tuple[int, int]:
    """(position, token) of row 0's first new token that row 1 never generates."""
    for pos in range(PROMPT_LEN + 1, PROMPT_LEN + NEW - 2):
        tok = int(row[pos])
        if tok not in row[PROMPT_LEN:pos] and tok not in other[PROMPT_LEN:]:
            return pos, tok
    pytest.fail("no suitable stop token in this greedy continuation")


def test_stop_token_fills_the_rest_of_that_row_only(models, prompt, greedy):
    ref = greedy["full"]
    pos, stop = _first_new_token_absent_from(ref[0], ref[1])
    out = np.asarray(generate(models["full"], prompt, NEW, stop_tokens=stop))
    np.testing.assert_array_equal(out[0, : pos + 1], ref[0, : pos + 1])
    assert (out[0, pos + 1 :] == stop).all()
    np.testing.assert_array_equal(out[1], ref[1])
    out = np.asarray(generate(models["full"], prompt, NEW, stop_tokens=[stop], pad_id=-1))
    np.testing.assert_array_equal(out[0, : pos + 1], ref[0, : pos + 1])
    assert (out[0, pos + 1 :] == -1).all()
    np.testing.assert_array_equal(out[1], ref[1])


def test_all_rows_stopping_ends_early_with_full_shape(models, prompt, greedy):
    ref = greedy["full"]
    stops = [int(ref[0, PROMPT_LEN + 1]), int(ref[1, PROMPT_LEN + 2])]
    out = np.asarray(generate(models["full"], prompt, NEW, stop_tokens=stops, pad_id=VOCAB))
    assert out.shape == ref.shape
    for row in range(2):
        new = ref[row, PROMPT_LEN:]
        first = next(i for i, t in enumerate(new) if t in stops)
        np.testing.assert_array_equal(out[row, : PROMPT_LEN + first + 1],
                                      ref[row, : PROMPT_LEN + first + 1])
        assert (out[row, PROMPT_LEN + first + 1 :] == VOCAB).all()


def test_stop_token_in_the_prompt_does_not_stop(models, prompt, greedy):
    ref = greedy["full"]
    unused = [int(t) for t in np.asarray(prompt)[0] if t not in ref[:, PROMPT_LEN:]]
    assert unused, "prompt has no token absent from the continuation"
    out = generate(models["full"], prompt, NEW, stop_tokens=unused[:1])
    np.testing.assert_array_equal(np.asarray(out), ref)


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "ids, kwargs, match",
    [
        (np.arange(1, 5), {}, "2-D"),
        (np.full((1, 4), 1.5), {}, "integers"),
        (np.zeros((1, 0), np.int32), {}, "at least one token"),
        (np.array([[1, VOCAB]]), {}, r"\[0, 97\)"),
        (np.array([[1, -1]]), {}, r"\[0, 97\)"),
        (None, dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
        (None, dict(max_new_tokens=2.0), "max_new_tokens must be an int"),
        (None, dict(temperature=-0.5), "temperature must be >= 0"),
        (None, dict(temperature=float("nan")), "temperature must be >= 0"),
        (None, dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (None, dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (None, dict(top_k=0), "top_k must be >= 1"),
        (None, dict(seed=1.5), "seed must be an int"),
        (None, dict(stop_tokens=[VOCAB + 3]), "outside the vocabulary"),
        (None, dict(stop_tokens="x"), "stop token"),
        (None, dict(max_new_tokens=54), r"11 \+ max_new_tokens 54 = 65 exceeds .*\(64\)"),
    ],
)
def test_invalid_arguments_raise_clear_errors(models, prompt, ids, kwargs, match):
    ids = prompt if ids is None else ids
    kwargs = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(models["full"], ids, **kwargs)


def test_longest_allowed_length_works(models):
    ids = jnp.asarray(np.random.default_rng(5).integers(0, VOCAB, (1, 63)), jnp.int32)
    out = generate(models["cca"], ids, 1)  # 63 + 1 = max_position_embeddings
    assert out.shape == (1, 64)
    np.testing.assert_array_equal(np.asarray(out), manual_greedy(models["cca"], ids, 1))
