"""Autoregressive generation for CCALlama: greedy, or sampling with temperature / top-k / top-p.

The prompt runs once through ``model.prefill``, which returns the logits of each row's last
prompt token and a decode cache (``jax_cca/cache.py``: every key and value for full attention;
the core token of each completed group plus a ring of the last w + g raw tokens for CCA). Each
further token is one ``decode`` step: the row's previous token attends to the cache, is written
into it, and the next token is picked from its logits. :func:`generate_batch` runs prompts of
different lengths together: they are right-padded, prefilled with per-row lengths (padding never
reaches the cache) and decoded in lockstep, every row at its own position.

Shapes are static: the prefill compiles once per (batch, prompt length, cache size) and the decode
step once per (model structure, batch, cache size, sampling settings, number of stop tokens); the
position is a traced scalar. Only logits rows that are used are computed, never (B, T, V).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import time
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jax_cca.model import check_token_ids


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


@functools.partial(jax.jit, static_argnames=("sampling", "pad_with_stop"))
def _next_token(logits, previous, done, pos, key, stop_ids, pad_id, *, sampling, pad_with_stop):
    """The token each row emits for position ``pos`` (decided from ``logits`` (B, V)), and the
    updated ``done`` flags.

    Rows already ``done`` (they emitted a stop token) get a filler instead: their ``previous``
    token (``pad_with_stop``, i.e. the stop token repeated) or ``pad_id``.
    """
    step_key = jax.random.fold_in(key, pos)
    new = select_next_token(logits.astype(jnp.float32), step_key, sampling)
    filler = previous if pad_with_stop else jnp.broadcast_to(pad_id, new.shape)
    new = jnp.where(done, filler, new)
    done = done | jnp.any(new[:, None] == stop_ids[None, :], axis=-1)
    return new, done


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "pad_with_stop"),
                   donate_argnames=("cache",))
def _decode_step(graphdef, state, cache, previous, done, pos, key, stop_ids, pad_id, *, sampling,
                 pad_with_stop):
    """Feeds each row's ``previous`` token through the cached model and picks the next one."""
    model = nnx.merge(graphdef, state)
    fed = jnp.clip(previous, 0, model.config.vocab_size - 1)  # a pad_id filler may be any int
    logits, cache = model.cached_forward(fed[:, None], jnp.ones_like(fed), cache, prefill=False)
    new, done = _next_token(logits, previous, done, pos, key, stop_ids, pad_id,
                            sampling=sampling, pad_with_stop=pad_with_stop)
    return new, done, cache


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
    check_token_ids(ids, config.vocab_size)
    if ids.shape[0] < 1 or ids.shape[1] < 1:
        raise ValueError(f"input_ids must hold at least one token per row; got {ids.shape}")
    max_new_tokens = _as_int(max_new_tokens, "max_new_tokens")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0; got {max_new_tokens}")
    total = ids.shape[1] + max_new_tokens
    if config.attention == "reattention":
        # ReAttention re-numbers the keys it attends to: positions stay below both the length
        # and the selection's bound, so the context may exceed the pretrained range.
        bound = config.max_reattention_position()
        if min(total, bound) > config.max_position_embeddings:
            raise ValueError(
                f"prompt length {ids.shape[1]} + max_new_tokens {max_new_tokens} = {total} "
                f"tokens under this ReAttention selection reach positions up to "
                f"{min(total, bound) - 1}, past the model's max_position_embeddings "
                f"({config.max_position_embeddings}); lower reattention_window, "
                "reattention_max_selected, reattention_span or reattention_chunk (they bound "
                f"the attended length at {bound})"
            )
    elif total > config.max_position_embeddings:
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


def _sampling(temperature, top_k, top_p) -> Sampling:
    if temperature == 0:  # greedy ignores top-k / top-p: share one compiled step
        return Sampling()
    return Sampling(float(temperature), None if top_k is None else int(top_k),
                    None if top_p is None else float(top_p))


def _check_chunk(prefill_chunk) -> None:
    if prefill_chunk is not None and _as_int(prefill_chunk, "prefill_chunk") < 1:
        raise ValueError(f"prefill_chunk must be >= 1 (or None); got {prefill_chunk}")


@dataclasses.dataclass
class GenerationStats:
    """Wall-clock seconds of one :func:`run_generation` (device work finished at each end)."""

    prefill_seconds: float  # prompt forward, cache fill and the first new token
    decode_seconds: float  # the cached decode steps that follow
    decode_steps: int


def run_generation(
    model,
    ids: np.ndarray,
    lengths: np.ndarray,
    max_new_tokens: int,
    *,
    sampling: Sampling = Sampling(),
    seed: int = 0,
    stops: Iterable[int] = (),
    pad_id: int | None = None,
    progress: bool | str = False,
    prefill_chunk: int | None = None,
) -> tuple[np.ndarray, GenerationStats]:
    """The loop under :func:`generate` and :func:`generate_batch`, on validated arguments.

    ``ids`` (B, T): right-padded prompts, row b's prompt is its first ``lengths[b]`` tokens.
    One prefill (``model.prefill``) gives every row's first new token, then one cached decode
    step per further token, for all rows in lockstep, each at its own position. The cache holds
    ``T + max_new_tokens`` tokens per row. Returns the new tokens (B, max_new_tokens) int32
    (stop-token handling as in :func:`generate`) and the timings.
    """
    stops = list(stops)
    batch, width = ids.shape
    graphdef, state = nnx.split(model)
    key = jax.random.key(int(seed))
    stop_ids = jnp.asarray(stops, jnp.int32).reshape(-1)
    pad = jnp.int32(0 if pad_id is None else pad_id)
    step_kw = dict(sampling=sampling, pad_with_stop=pad_id is None)
    label = progress if isinstance(progress, str) else "generating"
    bar = tqdm(total=max_new_tokens, desc=label, unit="tok", disable=not progress, leave=False)

    start = time.perf_counter()
    cache = model.init_cache(batch, width + max_new_tokens)
    logits, cache = model.prefill(ids, lengths, cache, chunk_size=prefill_chunk)
    done = jnp.zeros((batch,), bool)
    # Every row's first new token sits at position lengths[b]; the sampling key of the k-th new
    # token is folded with width + k (the buffer position, when all prompts have the same length).
    new, done = _next_token(logits, jnp.zeros((batch,), jnp.int32), done, jnp.int32(width), key,
                            stop_ids, pad, **step_kw)
    new.block_until_ready()
    prefill_seconds = time.perf_counter() - start
    out = [new]
    start = time.perf_counter()
    with bar:
        bar.update(1)
        while len(out) < max_new_tokens and not (stops and bool(jnp.all(done))):
            new, done, cache = _decode_step(graphdef, state, cache, new, done,
                                            jnp.int32(width + len(out)), key, stop_ids, pad,
                                            **step_kw)
            out.append(new)
            if not bar.disable:
                new.block_until_ready()  # so that the bar shows real progress
            bar.update(1)
        tokens = np.stack([np.asarray(t) for t in out], axis=1)
    stats = GenerationStats(prefill_seconds, time.perf_counter() - start, len(out) - 1)
    if tokens.shape[1] < max_new_tokens:  # every row stopped early: fill as the step would have
        filler = tokens[:, -1:] if pad_id is None else np.int32(pad_id)
        rest = np.broadcast_to(filler, (batch, max_new_tokens - tokens.shape[1]))
        tokens = np.concatenate([tokens, rest.astype(np.int32)], axis=1)
    return tokens, stats


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
    prefill_chunk: int | None = None,
) -> jax.Array:
    """Continue ``input_ids`` (B, T0) by ``max_new_tokens`` tokens; returns (B, T0 + N) int32.

    Greedy (argmax) when ``temperature == 0`` (``top_k`` / ``top_p`` are then ignored); otherwise
    samples from softmax(logits / temperature) restricted to the ``top_k`` most likely tokens
    and/or the top-p nucleus, with ``jax.random`` keyed by ``seed`` (same seed, same tokens).

    ``stop_tokens``: a token id or ids. Once a row emits one, it is finished: every later position
    of that row holds ``pad_id``, or, when ``pad_id`` is None (the default), the stop token it
    emitted, repeated. Generation ends early when every row has finished. ``progress=True`` (or a
    string, used as the label) shows a tqdm bar over the new tokens.

    The prompt runs once (``model.prefill``; in chunks of ``prefill_chunk`` tokens when given),
    then each new token is one cached decode step (``model.decode_step``): full attention reads
    the KV cache, CCA its core tokens and raw ring, ReAttention its un-rotated KV cache
    (``jax_cca/cache.py``). With ReAttention the prompt plus new tokens may exceed
    ``max_position_embeddings`` as long as the selection's bound on positions does not
    (``CCAConfig.max_reattention_position``).
    """
    ids = check_generate_args(model, input_ids, max_new_tokens, temperature, top_k, top_p, seed,
                              pad_id)
    stops = _stop_list(stop_tokens, model.config.vocab_size)
    _check_chunk(prefill_chunk)
    ids = ids.astype(np.int32)
    if max_new_tokens == 0:
        return jnp.asarray(ids)
    new, _ = run_generation(model, ids, np.full(ids.shape[:1], ids.shape[1]), max_new_tokens,
                            sampling=_sampling(temperature, top_k, top_p), seed=seed,
                            stops=stops, pad_id=pad_id, progress=progress,
                            prefill_chunk=prefill_chunk)
    return jnp.asarray(np.concatenate([ids, new], axis=1))


def generate_batch(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stop_tokens: int | Iterable[int] | None = None,
    progress: bool | str = False,
    prefill_chunk: int | None = None,
) -> list[list[int]]:
    """Continue prompts of different lengths together; returns one list of new tokens per prompt.

    Each list holds ``max_new_tokens`` tokens, or ends at (and includes) the row's first stop
    token. The prompts are right-padded into one batch and prefilled with per-row lengths; each
    row decodes at its own positions, so a greedy continuation is the one :func:`generate` gives
    the prompt alone. (Sampled tokens depend on the whole batch's random draw.) Arguments as in
    :func:`generate`.
    """
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__") or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    rows = []
    for prompt in prompts:
        row = np.asarray(prompt)
        row = row.astype(np.int32) if row.size == 0 else row  # [] would be float
        rows.append(check_generate_args(model, row[None], max_new_tokens, temperature, top_k,
                                        top_p, seed, None)[0])
    stops = _stop_list(stop_tokens, model.config.vocab_size)
    _check_chunk(prefill_chunk)
    if max_new_tokens == 0:
        return [[] for _ in rows]
    lengths = np.asarray([len(r) for r in rows])
    ids = np.zeros((len(rows), lengths.max()), np.int32)  # right padding: never read
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    new, _ = run_generation(model, ids, lengths, max_new_tokens,
                            sampling=_sampling(temperature, top_k, top_p), seed=seed,
                            stops=stops, progress=progress, prefill_chunk=prefill_chunk)
    out = []
    for row in new.tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        out.append(row[:cut])
    return out
