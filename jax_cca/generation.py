"""Autoregressive generation for CCALlama: greedy, or sampling with temperature / top-k / top-p.

There is no KV cache yet (the CCA cache comes with its own issue), so every step runs the model
over a fixed-size token buffer of shape (B, T0 + max_new_tokens) and reads the hidden state at the
last filled position. This is exact because both full and CCA attention are causal: the output at
position t depends only on tokens <= t, so whatever sits in the unfilled tail of the buffer never
reaches the position being decoded. (For CCA: query t sees the core token of group j only when
(j + 1) * g <= start(t) <= t, and that core token is pooled from tokens of group j alone.)

The buffer has static shape, so the decode step is compiled once per (model structure, batch,
total length, sampling settings) and reused across calls; the current position is a traced
scalar. Only the logits row of the current position is computed: ``model.hidden_states`` over the
buffer, one row sliced out, then ``model.logits`` on that row, never a (B, T, V) tensor.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is picked from the logits. Hashable: a static argument of the step."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filter_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """Temperature, then top-k, then top-p (Hugging Face's order) on float32 logits (B, V).

    Removed tokens get -inf. top-p keeps the smallest set of most likely tokens whose
    probabilities sum to at least ``top_p`` (the most likely token is always kept).
    """
    logits = logits / sampling.temperature
    vocab = logits.shape[-1]
    if sampling.top_k is not None and sampling.top_k < vocab:
        kth_largest = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if sampling.top_p is not None and sampling.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1, stable=True)  # most likely first
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = mass_before < sampling.top_p
        rows = jnp.arange(logits.shape[0])[:, None]
        keep = jnp.zeros(logits.shape, bool).at[rows, order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return logits


def select_next_token(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """Next token ids (B,) int32 from float32 logits (B, V)."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, sampling), axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "pad_with_stop"))
def _decode_step(graphdef, state, tokens, done, pos, key, stop_ids, pad_id, *, sampling,
                 pad_with_stop):
    """Writes the token for position ``pos`` (predicted from position pos - 1) into ``tokens``.

    Rows already ``done`` (they emitted a stop token) get a filler instead: their previous token
    (``pad_with_stop``, i.e. the stop token repeated) or ``pad_id``.
    """
    model = nnx.merge(graphdef, state)
    hidden = model.hidden_states(tokens)  # (B, L, E)
    last = jax.lax.dynamic_slice_in_dim(hidden, pos - 1, 1, axis=1)  # (B, 1, E)
    logits = model.logits(last)[:, 0].astype(jnp.float32)  # (B, V)
    step_key = jax.random.fold_in(key, pos)
    new = select_next_token(logits, step_key, sampling)
    previous = jax.lax.dynamic_index_in_dim(tokens, pos - 1, axis=1, keepdims=False)
    filler = previous if pad_with_stop else jnp.broadcast_to(pad_id, new.shape)
    new = jnp.where(done, filler, new)
    done = done | jnp.any(new[:, None] == stop_ids[None, :], axis=-1)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, new[:, None], pos, axis=1)
    return tokens, done


def _as_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int; got {value!r}")
    return int(value)


def _stop_list(stop_tokens, vocab: int) -> list[int]:
    if stop_tokens is None:
        return []
    items: Iterable = [stop_tokens] if isinstance(stop_tokens, numbers.Integral) else stop_tokens
    try:
        ids = [_as_int(s, "every stop token") for s in items]
    except TypeError:
        raise ValueError(
            f"stop_tokens must be an int or a list of ints; got {stop_tokens!r}"
        ) from None
    bad = [s for s in ids if not 0 <= s < vocab]
    if bad:
        raise ValueError(f"stop tokens {bad} are outside the vocabulary [0, {vocab})")
    return ids


def check_generate_args(model, input_ids, max_new_tokens, temperature, top_k, top_p, seed,
                        pad_id) -> np.ndarray:
    """Validates the arguments of :func:`generate`; returns input_ids as a numpy int array."""
    config = model.config
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(
            f"input_ids must be a 2-D (batch, length) array of token ids; got shape {ids.shape}"
        )
    if ids.dtype == bool or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must hold integers; got dtype {ids.dtype}")
    if ids.shape[0] < 1 or ids.shape[1] < 1:
        raise ValueError(f"input_ids must hold at least one token per row; got {ids.shape}")
    if ids.min() < 0 or ids.max() >= config.vocab_size:
        raise ValueError(
            f"input_ids must lie in [0, {config.vocab_size}) (the vocabulary); got values from "
            f"{ids.min()} to {ids.max()}"
        )
    max_new_tokens = _as_int(max_new_tokens, "max_new_tokens")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0; got {max_new_tokens}")
    total = ids.shape[1] + max_new_tokens
    if total > config.max_position_embeddings:
        raise ValueError(
            f"prompt length {ids.shape[1]} + max_new_tokens {max_new_tokens} = {total} exceeds "
            f"the model's max_position_embeddings ({config.max_position_embeddings})"
        )
    if not isinstance(temperature, numbers.Real) or not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy); got {temperature!r}")
    if top_k is not None and _as_int(top_k, "top_k") < 1:
        raise ValueError(f"top_k must be >= 1 (or None); got {top_k}")
    if top_p is not None and not (isinstance(top_p, numbers.Real) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] (or None); got {top_p!r}")
    _as_int(seed, "seed")
    if pad_id is not None:
        _as_int(pad_id, "pad_id")
    return ids


def generate(
    model,
    input_ids,
    max_new_tokens: int = 64,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stop_tokens: int | Iterable[int] | None = None,
    pad_id: int | None = None,
    progress: bool | str = False,
) -> jax.Array:
    """Continue ``input_ids`` (B, T0) by ``max_new_tokens`` tokens; returns (B, T0 + N) int32.

    Greedy (argmax) when ``temperature == 0`` (``top_k`` / ``top_p`` are then ignored); otherwise
    samples from softmax(logits / temperature) restricted to the ``top_k`` most likely tokens
    and/or the top-p nucleus, with ``jax.random`` keyed by ``seed`` (same seed, same tokens).

    ``stop_tokens``: a token id or ids. Once a row emits one, it is finished: every later position
    of that row holds ``pad_id``, or, when ``pad_id`` is None (the default), the stop token it
    emitted, repeated. Generation ends early when every row has finished. ``progress=True`` (or a
    string, used as the label) shows a tqdm bar over the new tokens.
    """
    ids = check_generate_args(model, input_ids, max_new_tokens, temperature, top_k, top_p, seed,
                              pad_id)
    stops = _stop_list(stop_tokens, model.config.vocab_size)
    batch, prompt_len = ids.shape
    total = prompt_len + max_new_tokens
    tokens = np.zeros((batch, total), np.int32)
    tokens[:, :prompt_len] = ids
    tokens = jnp.asarray(tokens)
    if max_new_tokens == 0:
        return tokens

    if temperature == 0:  # greedy ignores top-k / top-p: share one compiled step
        sampling = Sampling()
    else:
        sampling = Sampling(float(temperature), None if top_k is None else int(top_k),
                            None if top_p is None else float(top_p))
    graphdef, state = nnx.split(model)
    done = jnp.zeros((batch,), bool)
    key = jax.random.key(int(seed))
    stop_ids = jnp.asarray(stops, jnp.int32).reshape(-1)
    pad = jnp.int32(0 if pad_id is None else pad_id)
    label = progress if isinstance(progress, str) else "generating"
    bar = tqdm(total=max_new_tokens, desc=label, unit="tok", disable=not progress, leave=False)
    pos = prompt_len
    with bar:
        while pos < total:
            tokens, done = _decode_step(graphdef, state, tokens, done, jnp.int32(pos), key,
                                        stop_ids, pad, sampling=sampling,
                                        pad_with_stop=pad_id is None)
            pos += 1
            if not bar.disable:
                tokens.block_until_ready()  # so that the bar shows real progress
            bar.update(1)
            if stops and bool(jnp.all(done)):
                break
    if pos < total:  # every row stopped early: fill the rest as the step would have
        filled = np.array(tokens)
        filler = filled[:, pos - 1 : pos] if pad_id is None else np.int32(pad_id)
        filled[:, pos:] = filler
        tokens = jnp.asarray(filled)
    return tokens
