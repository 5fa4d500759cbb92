"""CCALlama: a LLaMA 2 / 3 / 3.1 / 3.2 decoder in Flax NNX whose attention is full, CCA or
ReAttention. Parameter names mirror Hugging Face's so the weight map stays a short table
(torch_bridge/convert.py); Linear kernels are stored (in, out)."""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from jax_cca import decode, fused, ops
from jax_cca.cache import LayerCache, init_cache, reset_lengths
from jax_cca.config import CCAConfig
from jax_cca.rope import apply_rope, default_positions, inverse_frequencies, rope_cos_sin
from kernels.rms_norm import pallas as rms_norm_pallas
from kernels.rms_norm import reference as rms_norm_reference


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype: Any, rngs: nnx.Rngs | None = None):
        del rngs
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x: Float[Array, "... E"]) -> Float[Array, "... E"]:
        return rms_norm_reference.rms_norm(x, self.weight[...], self.eps)

    def add_then_norm(self, x, residual, *, kernel: bool = False):
        """``(s, self(s))`` with ``s = x + residual`` (residual None: ``s = x``). ``kernel``: as
        one Pallas kernel (``kernels/rms_norm/pallas.py``; the decode step on GPU)."""
        if kernel:
            return rms_norm_pallas.add_rms_norm(x, residual, self.weight[...], eps=self.eps)
        return rms_norm_reference.add_rms_norm(x, residual, self.weight[...], self.eps)


def _linear(n_in: int, n_out: int, bias: bool, config: CCAConfig, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(n_in, n_out, use_bias=bias, dtype=config.jnp_dtype,
                      param_dtype=config.jnp_dtype, rngs=rngs)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: CCAConfig, *, rngs: nnx.Rngs):
        e, f, b = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.config = config
        if config.fused_projections:
            self.gate_up_proj = _linear(e, 2 * f, b, config, rngs)
        else:
            self.gate_proj = _linear(e, f, b, config, rngs)
            self.up_proj = _linear(e, f, b, config, rngs)
        self.down_proj = _linear(f, e, b, config, rngs)

    def __call__(self, x):
        if self.config.fused_projections:
            gate, up = fused.split_output(self.gate_up_proj(x),
                                          fused.split_sizes(self.config)["gate_up_proj"])
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(jax.nn.silu(gate) * up)


class Attention(nnx.Module):
    """LLaMA self-attention computing ``config.attention``: "full", "cca", or "reattention"
    (``ops.reattention`` over UN-rotated q and k: the op applies RoPE itself, at the re-numbered
    positions of the keys it gathers, with the model's inverse frequencies)."""

    def __init__(self, config: CCAConfig, *, rngs: nnx.Rngs):
        self.config = config
        e, d, b = config.hidden_size, config.head_dim, config.attention_bias
        if config.fused_projections:
            self.qkv_proj = _linear(e, (config.num_heads + 2 * config.num_kv_heads) * d, b,
                                    config, rngs)
        else:
            self.q_proj = _linear(e, config.num_heads * d, b, config, rngs)
            self.k_proj = _linear(e, config.num_kv_heads * d, b, config, rngs)
            self.v_proj = _linear(e, config.num_kv_heads * d, b, config, rngs)
        self.o_proj = _linear(config.num_heads * d, e, b, config, rngs)

    def qkv(self, x: Float[Array, "B T E"]):
        """Un-rotated q (B, T, Hq, D), k and v (B, T, Hkv, D), in either parameter layout."""
        c = self.config
        bsz, t, _ = x.shape
        if c.fused_projections:
            q, k, v = fused.split_output(self.qkv_proj(x), fused.split_sizes(c)["qkv_proj"])
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return (q.reshape(bsz, t, c.num_heads, c.head_dim),
                k.reshape(bsz, t, c.num_kv_heads, c.head_dim),
                v.reshape(bsz, t, c.num_kv_heads, c.head_dim))

    def qkv_heads(self, x: Float[Array, "B T E"]) -> Float[Array, "B T H3 D"]:
        """Un-rotated q, k, v heads as one array: Hq query heads, then Hkv key and Hkv value
        heads (the fused layout's projection, reshaped; the separate one's, concatenated).

        The separate layout's three projections pass an optimization barrier before the
        concatenation. Without it, XLA on the GPU fused one batch-1 projection (a matrix-vector
        product, rewritten as a multiply and a reduce) into the concatenation's kernel, which
        ran it about 200 times slower than its own kernel: 0.42 ms per layer for a 1B model's
        k projection, +52% on a 1M-token decode step with full attention
        (``docs/perf-notes.md``, seventeenth session)."""
        c = self.config
        bsz, t, _ = x.shape
        if c.fused_projections:
            return self.qkv_proj(x).reshape(bsz, t, -1, c.head_dim)
        return jnp.concatenate(jax.lax.optimization_barrier(self.qkv(x)), axis=2)

    def _project(self, x: Float[Array, "B T E"], cos, sin):
        """Rotated q (B, T, Hq, D), rotated k and v (B, T, Hkv, D). ReAttention: q and k are
        returned un-rotated (``cos``, ``sin`` unused)."""
        q, k, v = self.qkv(x)
        if self.config.attention == "reattention":
            return q, k, v
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _attention(self, q, k, v, q_lengths=None) -> Float[Array, "B T Hq D"]:
        """The attention op over a whole (prefix of a) sequence at positions 0..T-1.
        ``q_lengths`` (B,): real tokens per row (right padding after them); only ReAttention
        needs it (padding must not vote in its selection), causal masking covers the others."""
        c = self.config
        if c.attention == "reattention":
            return ops.reattention(q, k, v, q_lengths=q_lengths, **decode.reattention_kwargs(c))
        if c.attention == "cca":
            return ops.cca_attention(q, k, v, group_size=c.group_size,
                                     local_window=c.local_window, pooling=c.pooling,
                                     implementation=c.implementation)
        return ops.full_attention(q, k, v, implementation=c.implementation)

    def _output(self, o: Float[Array, "B T Hq D"]) -> Float[Array, "B T E"]:
        bsz, t = o.shape[:2]
        return self.o_proj(o.reshape(bsz, t, self.config.num_heads * self.config.head_dim))

    def __call__(self, x: Float[Array, "B T E"], cos, sin) -> Float[Array, "B T E"]:
        return self._output(self._attention(*self._project(x, cos, sin)))

    def with_cache(self, x: Float[Array, "B C E"], cos, sin, cache: LayerCache,
                   n_valid: Int[Array, "B"], *, prefill: bool,
                   positions: Int[Array, "B"] | None = None,
                   counters: decode.SplitCounters | None = None) -> tuple[Array, LayerCache]:
        """``prefill``: x is a whole prompt at positions 0..C-1; the ordinary attention op gives
        the output and the cache is filled from it. Otherwise x holds C new tokens per sequence
        that attend to the cache and to each other (``jax_cca.decode.extend_attention``).
        Only the first ``n_valid[b]`` rows of x are written to the cache. A one-token step on
        the Pallas decode path rotates q and k inside the kernel that writes the cache, at the
        step's ``positions`` (None: this layer's lengths), threading the step's ``counters``
        (``decode.SplitCounters``) through the layers."""
        if not prefill and decode.rotates_in_kernel(cache, x.shape[1], self.config):
            o, cache = decode.decode_step_unrotated(cache, self.qkv_heads(x)[:, 0], cos[:, 0],
                                                    sin[:, 0], n_valid, self.config,
                                                    positions=positions, counters=counters)
            return self._output(o[:, None]), cache
        q, k, v = self._project(x, cos, sin)
        if prefill:
            o = self._attention(q, k, v, q_lengths=n_valid)
            cache = decode.prefill_cache(cache, q, k, v, n_valid, self.config)
        else:
            o, cache = decode.extend_attention(cache, q, k, v, n_valid, self.config)
        return self._output(o), cache


class DecoderLayer(nnx.Module):
    def __init__(self, config: CCAConfig, *, rngs: nnx.Rngs):
        norm = dict(eps=config.rms_norm_eps, dtype=config.jnp_dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, **norm)
        self.self_attn = Attention(config, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, **norm)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))

    def with_cache(self, x, pending, cos, sin, cache: LayerCache, n_valid, *, prefill: bool,
                   norm_kernel: bool = False, positions=None, counters=None):
        """Returns (x, pending, cache) with this layer's MLP output as the new ``pending``: the
        residual add waits for the next norm (``RMSNorm.add_then_norm``), which can then be one
        kernel (``norm_kernel``) instead of three. ``pending`` None: nothing to add to x.
        ``positions``, ``counters``: the step's, as ``Attention.with_cache`` takes them."""
        x, normed = self.input_layernorm.add_then_norm(x, pending, kernel=norm_kernel)
        h, cache = self.self_attn.with_cache(normed, cos, sin, cache, n_valid, prefill=prefill,
                                             positions=positions, counters=counters)
        x, normed = self.post_attention_layernorm.add_then_norm(x, h, kernel=norm_kernel)
        return x, self.mlp(normed), cache


def _remat_layer(layer: DecoderLayer, x, cos, sin):
    """``layer(x, cos, sin)`` under ``jax.checkpoint``: its activations are recomputed in the
    backward pass. Functional (split / merge), so it works at any trace level."""
    graphdef, state = nnx.split(layer)
    run = jax.checkpoint(lambda state, x, cos, sin: nnx.merge(graphdef, state)(x, cos, sin))
    return run(state, x, cos, sin)


@functools.partial(jax.jit, static_argnames=("graphdef", "prefill"), donate_argnames=("cache",))
def _cached_forward(graphdef, state, input_ids, n_valid, cache, *, prefill):
    return nnx.merge(graphdef, state).cached_forward(input_ids, n_valid, cache, prefill=prefill)


def check_token_ids(ids: np.ndarray, vocab_size: int, name: str = "input_ids") -> None:
    """Raises ValueError unless ``ids`` (a host array) holds integers of the vocabulary
    [0, vocab_size); shared by ``generation.check_generate_args`` and :meth:`CCALlama.extend`."""
    if ids.dtype == bool or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must hold integers; got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"{name} must lie in [0, {vocab_size}) (the vocabulary); got values "
                         f"from {ids.min()} to {ids.max()}")


class CCALlama(nnx.Module):
    """LLaMA-family causal LM. ``model(input_ids)`` returns logits (B, T, vocab).

    Build one with random weights from a config (``CCALlama(CCAConfig.tiny(), rngs=nnx.Rngs(0))``)
    or load Hugging Face weights with :meth:`from_pretrained`.
    """

    def __init__(self, config: CCAConfig, *, rngs: nnx.Rngs):
        self.config = config
        dt = config.jnp_dtype
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dt,
                                      param_dtype=dt, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(config, rngs=rngs) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dt)
        if not config.tie_word_embeddings:
            self.lm_head = _linear(config.hidden_size, config.vocab_size, False, config, rngs)

    def hidden_states(
        self, input_ids: Int[Array, "B T"], positions: Int[Array, "B T"] | None = None,
        *, remat: bool = False,
    ) -> Float[Array, "B T E"]:
        """Final normalised hidden states (before the LM head). ``remat=True`` (training):
        each decoder layer's activations are recomputed in the backward pass instead of kept
        (``jax.checkpoint`` per layer), so only the layer inputs stay in memory."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length); got shape {input_ids.shape}")
        if positions is not None and self.config.attention == "reattention":
            raise ValueError("attention='reattention' numbers positions itself (0..n-1 over the "
                             "keys each chunk attends to); custom positions are not supported")
        if positions is None:
            positions = default_positions(*input_ids.shape)
        cos, sin = rope_cos_sin(positions, inverse_frequencies(self.config))
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = _remat_layer(layer, x, cos, sin) if remat else layer(x, cos, sin)
        return self.norm(x)

    def logits(self, h: Float[Array, "B T E"]) -> Float[Array, "B T V"]:
        if self.config.tie_word_embeddings:
            return self.embed_tokens.attend(h)
        return self.lm_head(h)

    def __call__(
        self, input_ids: Int[Array, "B T"], positions: Int[Array, "B T"] | None = None
    ) -> Float[Array, "B T V"]:
        return self.logits(self.hidden_states(input_ids, positions))

    def generate(self, input_ids: Int[Array, "B T"], max_new_tokens: int = 64,
                 **kwargs) -> Int[Array, "B T+N"]:
        """Greedy or sampled continuation, (B, T + max_new_tokens) int32. Keyword arguments
        (temperature, top_k, top_p, seed, stop_tokens, pad_id, progress): see
        :func:`jax_cca.generation.generate`."""
        from jax_cca.generation import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)

    # ------------------------------------------------------------------ decoding with a cache
    def init_cache(self, batch: int, max_len: int) -> tuple[LayerCache, ...]:
        """An empty decode cache, one per layer (``jax_cca/cache.py``), for ``batch`` sequences of
        up to ``max_len`` tokens each (prompt and generated tokens)."""
        return init_cache(self.config, batch, max_len)

    def prefill(self, input_ids: Int[Array, "B T"], lengths: Int[Array, "B"] | None,
                cache: tuple[LayerCache, ...], *, chunk_size: int | None = None
                ) -> tuple[Float[Array, "B V"], tuple[LayerCache, ...]]:
        """Runs right-padded prompts (row b: its first ``lengths[b]`` tokens; None: all T) and
        fills ``cache`` with them; returns (logits of each row's last prompt token, cache).

        One pass (default): the ordinary forward (``ops.cca_attention`` / full attention) over
        (B, T), then the cache is filled from each layer's q, k, v. ``chunk_size=C``: the prompt
        goes through in chunks of C tokens, each attending to the cache and to itself, so
        activations are O(C) instead of O(T); the result is the same. Padding never reaches the
        cache or the logits. ``cache`` (from :meth:`init_cache`, any previous contents dropped)
        is donated: use the returned one. Compiled once per shape.
        """
        host = np.asarray(input_ids)
        if host.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length); got shape {host.shape}")
        b, t = host.shape
        lengths = np.full((b,), t) if lengths is None else np.asarray(lengths)
        if (lengths.shape != (b,) or not np.issubdtype(lengths.dtype, np.integer)
                or lengths.min() < 1 or lengths.max() > t):
            raise ValueError(f"lengths must be {b} ints in [1, {t}]; got {lengths.tolist()}")
        check_token_ids(host[np.arange(t)[None, :] < lengths[:, None]], self.config.vocab_size)
        ids = jnp.asarray(host, jnp.int32)
        if cache[0].lengths.shape != (b,) or t > cache[0].max_len:
            raise ValueError(f"a batch of {b} prompts of {t} tokens does not fit a cache of "
                             f"batch {cache[0].lengths.shape[0]} and max_len {cache[0].max_len}")
        if chunk_size is not None and (isinstance(chunk_size, bool)
                                       or not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None; got {chunk_size!r}")
        lengths = jnp.asarray(lengths, jnp.int32)
        graphdef, state = nnx.split(self)
        if chunk_size is None:
            return _cached_forward(graphdef, state, ids, lengths, cache, prefill=True)
        num = -(-t // chunk_size)
        ids = jnp.pad(ids, ((0, 0), (0, num * chunk_size - t)))
        cache, logits = reset_lengths(cache), None
        for i in range(num):
            n_valid = jnp.clip(lengths - i * chunk_size, 0, chunk_size)
            chunk = ids[:, i * chunk_size : (i + 1) * chunk_size]
            chunk_logits, cache = _cached_forward(graphdef, state, chunk, n_valid, cache,
                                                  prefill=False)
            # A row's last prompt token is in the last chunk where it still has tokens.
            logits = chunk_logits if logits is None else \
                jnp.where(n_valid[:, None] > 0, chunk_logits, logits)
        return logits, cache

    def extend(self, input_ids: Int[Array, "B C"], n_valid: Int[Array, "B"],
               cache: tuple[LayerCache, ...]) -> tuple[Float[Array, "B V"], tuple[LayerCache, ...]]:
        """Appends C tokens per sequence (the first ``n_valid[b]`` of row b count) at positions
        ``lengths[b] + i``; returns (logits of each row's last valid token, cache). Donates
        ``cache``. Valid tokens that would land at or past the cache's ``max_len`` raise
        ValueError (size the cache for prompt + new tokens); padding rows past it are dropped.
        The arguments are checked on the host first (:meth:`_check_extend`)."""
        self._check_extend(input_ids, n_valid, cache)
        graphdef, state = nnx.split(self)
        return _cached_forward(graphdef, state, jnp.asarray(input_ids, jnp.int32),
                               jnp.asarray(n_valid, jnp.int32), cache, prefill=False)

    def decode_step(self, token_ids: Int[Array, "B"], cache: tuple[LayerCache, ...]
                    ) -> tuple[Float[Array, "B V"], tuple[LayerCache, ...]]:
        """One new token per sequence: (logits (B, V) of the next token, cache). Donates
        ``cache``."""
        token_ids = jnp.asarray(token_ids)
        if token_ids.ndim != 1 or not jnp.issubdtype(token_ids.dtype, jnp.integer):
            raise ValueError(f"token_ids must be (batch,) integers: one token per sequence; got "
                             f"shape {token_ids.shape}, dtype {token_ids.dtype}")
        return self.extend(token_ids[:, None], np.ones(token_ids.shape, np.int32), cache)

    def _check_extend(self, input_ids, n_valid, cache) -> None:
        """Raises ValueError, before the cache is donated, for tokens :meth:`extend` cannot take:
        ids that are not (B, C), a batch that is not the cache's, n_valid outside [0, C], valid
        tokens that are not integers of the vocabulary (:func:`check_token_ids`), or valid tokens
        past the cache's ``max_len`` (they would not be stored and their logits would be
        meaningless). Reads the ids, n_valid and the cache's lengths on the host: the jitted
        loops (``generate``) do not come through here."""
        ids, counts = np.asarray(input_ids), np.asarray(n_valid)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, C); got shape {ids.shape}")
        b, c = ids.shape
        lengths = np.asarray(cache[0].lengths)
        if lengths.shape != (b,):
            raise ValueError(f"{b} sequences given to a cache of batch {lengths.shape[0]}")
        if (counts.shape != (b,) or not np.issubdtype(counts.dtype, np.integer)
                or counts.min() < 0 or counts.max() > c):
            raise ValueError(f"n_valid must be {b} ints in [0, {c}]; got {counts.tolist()}")
        valid = ids[np.arange(c)[None, :] < counts[:, None]]  # padding may hold anything
        check_token_ids(valid, self.config.vocab_size)
        full = lengths + counts > cache[0].max_len
        if full.any():
            row = int(np.argmax(full))
            raise ValueError(f"the cache holds {cache[0].max_len} tokens per sequence; sequence "
                             f"{row} holds {lengths[row]} and would get {counts[row]} more. Size "
                             f"it for prompt + new tokens (init_cache(max_len=...))")

    def cached_forward(self, input_ids: Int[Array, "B C"], n_valid: Int[Array, "B"],
                       cache: tuple[LayerCache, ...], *, prefill: bool
                       ) -> tuple[Float[Array, "B V"], tuple[LayerCache, ...]]:
        """The traceable body of :meth:`prefill` (``prefill=True``: a prompt at positions 0..C-1,
        ``n_valid`` = lengths) and :meth:`extend` (``prefill=False``); for use under jit."""
        chunk = input_ids.shape[1]
        first = 0 if prefill else cache[0].lengths[:, None]
        positions = jnp.broadcast_to(first + jnp.arange(chunk, dtype=jnp.int32),
                                     input_ids.shape)
        cos, sin = rope_cos_sin(positions, inverse_frequencies(self.config))
        x, pending = self.embed_tokens(input_ids), None
        kernel = not prefill and decode.norms_in_kernel(chunk, self.config)
        new_cache = []
        step = None if prefill else cache[0].lengths  # one array for every layer's kernels
        counters = decode.SplitCounters()  # zeros, made by the first layer that needs them
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            x, pending, layer_cache = layer.with_cache(x, pending, cos, sin, layer_cache, n_valid,
                                                       prefill=prefill, norm_kernel=kernel,
                                                       positions=step, counters=counters)
            new_cache.append(layer_cache)
        if chunk > 1:  # (B, 1, E): only the rows of each sequence's last valid token
            last = jnp.clip(n_valid - 1, 0, chunk - 1)[:, None, None]
            x, pending = (None if a is None else jnp.take_along_axis(a, last, axis=1)
                          for a in (x, pending))
        _, h = self.norm.add_then_norm(x, pending, kernel=kernel)
        return self.logits(h)[:, 0], tuple(new_cache)

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_config(cls, config: CCAConfig, seed: int = 0) -> "CCALlama":
        return cls(config, rngs=nnx.Rngs(seed))

    @classmethod
    def abstract(cls, config: CCAConfig) -> "CCALlama":
        """Shapes and dtypes only (no memory): the target for loading weights."""
        return nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides) -> "CCALlama":
        """Load a Hugging Face LLaMA directory (safetensors: no torch needed) or an orbax
        checkpoint written by ``checkpoints.save_model``.

        ``overrides`` replace config fields, e.g. ``attention="cca", group_size=16,
        local_window=1024, dtype=jnp.bfloat16``.
        """
        from checkpoints import is_checkpoint, restore_model

        if is_checkpoint(path):
            return restore_model(path, **overrides)
        from torch_bridge.convert import load_hf_llama

        return load_hf_llama(path, **overrides)

    def save_pretrained(self, path: str | os.PathLike, **kwargs) -> None:
        """Write a Hugging Face directory (config.json + safetensors) that transformers loads."""
        from torch_bridge.convert import export_hf_llama

        export_hf_llama(self, path, **kwargs)

    def with_attention(self, **changes) -> "CCALlama":
        """The same weights under a changed config (e.g. ``attention="cca", group_size=16``);
        a changed ``dtype`` casts the weights, a changed ``fused_projections`` converts them to
        the other layout (``jax_cca/fused.py``)."""
        config = self.config.replace(**changes)
        _, state = nnx.split(self)
        if config.dtype != self.config.dtype:
            state = jax.tree_util.tree_map(lambda x: x.astype(config.jnp_dtype), state)
        new_graphdef, new_state = nnx.split(CCALlama.abstract(config))
        if config.fused_projections == self.config.fused_projections:
            return nnx.merge(new_graphdef, state)
        convert = fused.fuse if config.fused_projections else fused.unfuse
        flat = convert({p: v.get_value() for p, v in nnx.to_flat_state(state)}, self.config)
        target = dict(nnx.to_flat_state(new_state))
        return nnx.merge(new_graphdef, nnx.from_flat_state(
            [(p, target[p].replace(flat[p])) for p in target]))

    def with_fused_projections(self, fused_projections: bool = True) -> "CCALlama":
        """This model in the serving layout (one QKV and one gate-up matrix per layer: fewer,
        larger GEMMs per decode step), or back with ``False``. Same outputs."""
        return self.with_attention(fused_projections=fused_projections)

    def num_params(self) -> int:
        return sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(self, nnx.Param)))
