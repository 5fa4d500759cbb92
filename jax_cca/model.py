"""CCALlama: a LLaMA 2 / 3 / 3.1 / 3.2 decoder in Flax NNX whose attention is full, CCA or (later)
ReAttention. Parameter names mirror Hugging Face's so the weight map stays a short table
(torch_bridge/convert.py); Linear kernels are stored (in, out)."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from jax_cca import ops
from jax_cca.config import CCAConfig
from jax_cca.rope import apply_rope, default_positions, inverse_frequencies, rope_cos_sin


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype: Any, rngs: nnx.Rngs | None = None):
        del rngs
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x: Float[Array, "... E"]) -> Float[Array, "... E"]:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * xf.astype(x.dtype)


def _linear(n_in: int, n_out: int, bias: bool, config: CCAConfig, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(n_in, n_out, use_bias=bias, dtype=config.jnp_dtype,
                      param_dtype=config.jnp_dtype, rngs=rngs)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: CCAConfig, *, rngs: nnx.Rngs):
        e, f, b = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = _linear(e, f, b, config, rngs)
        self.up_proj = _linear(e, f, b, config, rngs)
        self.down_proj = _linear(f, e, b, config, rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nnx.Module):
    def __init__(self, config: CCAConfig, *, rngs: nnx.Rngs):
        if config.attention == "reattention":
            raise NotImplementedError(
                "attention='reattention' is not implemented yet (tracked in the ReAttention "
                "issue); use 'full' or 'cca'"
            )
        self.config = config
        e, d, b = config.hidden_size, config.head_dim, config.attention_bias
        self.q_proj = _linear(e, config.num_heads * d, b, config, rngs)
        self.k_proj = _linear(e, config.num_kv_heads * d, b, config, rngs)
        self.v_proj = _linear(e, config.num_kv_heads * d, b, config, rngs)
        self.o_proj = _linear(config.num_heads * d, e, b, config, rngs)

    def __call__(self, x: Float[Array, "B T E"], cos, sin) -> Float[Array, "B T E"]:
        c = self.config
        bsz, t, _ = x.shape
        q = self.q_proj(x).reshape(bsz, t, c.num_heads, c.head_dim)
        k = self.k_proj(x).reshape(bsz, t, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x).reshape(bsz, t, c.num_kv_heads, c.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if c.attention == "cca":
            o = ops.cca_attention(q, k, v, group_size=c.group_size, local_window=c.local_window,
                                  pooling=c.pooling, implementation=c.implementation)
        else:
            o = ops.full_attention(q, k, v, implementation=c.implementation)
        return self.o_proj(o.reshape(bsz, t, c.num_heads * c.head_dim))


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
        self, input_ids: Int[Array, "B T"], positions: Int[Array, "B T"] | None = None
    ) -> Float[Array, "B T E"]:
        """Final normalised hidden states (before the LM head)."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length); got shape {input_ids.shape}")
        if positions is None:
            positions = default_positions(*input_ids.shape)
        cos, sin = rope_cos_sin(positions, inverse_frequencies(self.config))
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
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
        a changed ``dtype`` casts the weights."""
        config = self.config.replace(**changes)
        _, state = nnx.split(self)
        if config.dtype != self.config.dtype:
            state = jax.tree_util.tree_map(lambda x: x.astype(config.jnp_dtype), state)
        new_graphdef, _ = nnx.split(CCALlama.abstract(config))
        return nnx.merge(new_graphdef, state)

    def num_params(self) -> int:
        return sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(self, nnx.Param)))
