"""CCA inside a transformers LLaMA: ``patch_llama(model, group_size=16, local_window=1024)``.

Every ``LlamaAttention`` of the model is replaced by a :class:`CCALlamaAttention` that keeps the
same projection modules (same parameters, same state_dict names, so ``save_pretrained`` and
optimizers see no difference) and computes, like ``jax_cca.CCALlama(attention="cca")``:
projections -> RoPE with the decoder's own position embeddings (HF's ``apply_rotary_pos_emb``) ->
``torch_bridge.cca_attention`` over (B, T, H, D) (GQA without repeating k/v) -> o_proj.

Supported: forward passes over whole sequences, training and evaluation, any batch size, every
LLaMA RoPE variant (the HF layer computes the angles). Attention masks: none, plain causal, or
causal with right padding (real tokens then get exactly the CCA of the unpadded sequence).
Not supported, with an error that says so: left padding, packed sequences or any other custom
mask; attention dropout in training; decoding with a filled KV cache (a prefill into an empty
cache is fine; use ``jax_cca.CCALlama.generate`` for CCA decoding).
"""

from __future__ import annotations

import torch
from torch import nn

from torch_bridge.attention import IMPLEMENTATIONS, cca_attention


def _right_padded(key_ok: torch.Tensor) -> bool:
    """True if along the last axis no kept key follows a masked one."""
    return bool((key_ok[..., 1:] <= key_ok[..., :-1]).all())


def check_attention_mask(mask, batch: int, length: int) -> None:
    """Raises ValueError for a mask CCA cannot honour (anything but none / causal / causal with
    right padding). Accepts HF's 2D padding masks and 4D boolean or additive float masks."""
    advice = ("patch_llama's CCA honours unpadded or right-padded batches only (pad on the right, "
              "e.g. tokenizer.padding_side = 'right'); left padding, packed sequences and custom "
              "masks would change which tokens are pooled and windowed")
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"unsupported attention mask of type {type(mask).__name__} "
                         "(use attn_implementation='sdpa' or 'eager'); " + advice)
    if mask.ndim == 2:  # (B, T) padding mask, as flash-attention style interfaces pass it
        keep = mask.bool()
        if tuple(keep.shape) != (batch, length) or not _right_padded(keep):
            raise ValueError(f"attention mask {tuple(mask.shape)} is not right padding; " + advice)
        return
    if mask.ndim != 4 or tuple(mask.shape[-2:]) != (length, length):
        raise ValueError(f"attention mask of shape {tuple(mask.shape)} does not match "
                         f"{length} queries and keys; " + advice)
    keep = mask if mask.dtype == torch.bool else mask == 0
    key_ok = keep[..., -1, :]  # the last query row: causal attention lets it see every key
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    expected = causal & key_ok[..., None, :]
    if not (_right_padded(key_ok) and torch.equal(keep, expected)):
        raise ValueError("attention mask is not causal with right padding; " + advice)


class CCALlamaAttention(nn.Module):
    """Drop-in replacement for transformers' ``LlamaAttention`` computing CCA attention.

    Build it from an existing ``LlamaAttention`` (its q/k/v/o projections are reused, not copied).
    ``forward`` has the HF signature and returns ``(output, None)`` (no attention weights).
    """

    def __init__(self, attention: nn.Module, *, group_size: int = 16, local_window: int = 1024,
                 pooling: str = "cca", implementation: str | None = None):
        super().__init__()
        self.config = attention.config
        self.layer_idx = attention.layer_idx
        self.head_dim = attention.head_dim
        self.scaling = attention.scaling
        self.attention_dropout = attention.attention_dropout
        self.is_causal = True
        self.q_proj, self.k_proj = attention.q_proj, attention.k_proj
        self.v_proj, self.o_proj = attention.v_proj, attention.o_proj
        self.configure(group_size=group_size, local_window=local_window, pooling=pooling,
                       implementation=implementation)

    def configure(self, *, group_size: int, local_window: int, pooling: str = "cca",
                  implementation: str | None = None) -> None:
        from kernels.cca.reference_torch import check_cca_hparams

        check_cca_hparams(group_size, local_window, pooling)
        if implementation is not None and implementation not in IMPLEMENTATIONS:
            raise ValueError(f"unknown implementation {implementation!r}; choose from "
                             f"{IMPLEMENTATIONS} or None")
        self.group_size, self.local_window = group_size, local_window
        self.pooling, self.implementation = pooling, implementation

    def extra_repr(self) -> str:
        return (f"group_size={self.group_size}, local_window={self.local_window}, "
                f"pooling={self.pooling!r}, implementation={self.implementation!r}")

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                past_key_values=None, **kwargs):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        if position_embeddings is None:
            raise ValueError("CCALlamaAttention needs the decoder's position_embeddings (cos, sin)")
        cache = past_key_values if past_key_values is not None else kwargs.get("past_key_value")
        b, t, _ = hidden_states.shape
        shape = (b, t, -1, self.head_dim)
        # HF layout (B, H, T, D) for RoPE and the cache; CCA takes (B, T, H, D) views of it.
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            keys, _ = cache.update(k, v, self.layer_idx)
            if keys.shape[2] != t:
                raise NotImplementedError(
                    f"CCA in PyTorch runs on whole sequences: this call has {t} new tokens and "
                    f"{keys.shape[2]} cached keys. Decoding with a KV cache is not supported by "
                    "patch_llama (call the model with use_cache=False, or generate with "
                    "jax_cca.CCALlama.generate)")
        check_attention_mask(attention_mask, b, t)
        if self.training and self.attention_dropout:
            raise NotImplementedError(
                f"attention dropout ({self.attention_dropout}) is not supported by CCA; set "
                "config.attention_dropout = 0.0")
        o = cca_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                          group_size=self.group_size, local_window=self.local_window,
                          pooling=self.pooling, softmax_scale=self.scaling,
                          implementation=self.implementation)
        return self.o_proj(o.reshape(b, t, -1)), None


def patch_llama(model: nn.Module, group_size: int = 16, local_window: int = 1024,
                pooling: str = "cca", implementation: str | None = None) -> nn.Module:
    """Make every attention layer of a transformers LLaMA (``LlamaForCausalLM``, ``LlamaModel``)
    compute CCA attention; returns the same model, modified in place.

    Parameters are untouched (the layers reuse the projection modules), so fine-tuning, saving
    and loading work as before. Calling it again on a patched model changes the CCA settings.
    ``implementation``: None (Triton on CUDA, the torch reference on CPU), "triton" or
    "reference" (see ``torch_bridge.cca_attention``). Raises TypeError for other models.
    """
    from transformers.models.llama.modeling_llama import LlamaAttention

    from kernels.cca.reference_torch import check_cca_hparams

    check_cca_hparams(group_size, local_window, pooling)
    settings = dict(group_size=group_size, local_window=local_window, pooling=pooling,
                    implementation=implementation)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type != "llama":
        raise TypeError(f"patch_llama supports transformers LLaMA models (LlamaForCausalLM, "
                        f"LlamaModel); got {type(model).__name__} with model_type {model_type!r}")
    targets = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children()
               if type(child) is LlamaAttention or isinstance(child, CCALlamaAttention)]
    if not targets:
        raise TypeError(f"{type(model).__name__} has no LlamaAttention layer to patch")
    for parent, name, child in targets:
        if isinstance(child, CCALlamaAttention):
            child.configure(**settings)
        else:
            setattr(parent, name, CCALlamaAttention(child, **settings))
    return model
