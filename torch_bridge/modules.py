"""CCA or ReAttention inside a transformers LLaMA: ``patch_llama(model, group_size=16,
local_window=1024)`` or ``patch_llama(model, attention="reattention", reattention_top_k=4, ...)``.

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

``attention="reattention"`` puts a :class:`ReAttentionLlamaAttention` in every layer instead,
computing like ``jax_cca.CCALlama(attention="reattention")``: projections -> the ReAttention op
(``kernels/reattention/torch_ops.py``) over UN-rotated q and k, which applies RoPE itself at the
re-numbered positions with the frequencies of the model's own rotary embedding (default, linear
or llama3 scaling) -> o_proj. The decoder's position embeddings are not used. It also decodes
with a transformers KV cache (``model.generate``): the cache then holds un-rotated keys, which only
this module reads. Masks: none, causal, or causal with right padding of a cache-less prefill
(padding queries do not vote in the selection). Meant for inference: ReAttention is
training-free and its Triton kernels are forward only.
"""

from __future__ import annotations

import torch
from torch import nn

from torch_bridge.attention import IMPLEMENTATIONS, cca_attention


def _layer_cache(past_key_values, kwargs: dict):
    """The transformers KV cache handed to an attention layer, or None: transformers >= 5.24
    passes it as ``cache``, earlier releases as ``past_key_values`` (or ``past_key_value``)."""
    for cache in (kwargs.get("cache"), past_key_values, kwargs.get("past_key_value")):
        if cache is not None:
            return cache
    return None


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


def _adopt_projections(module: nn.Module, attention: nn.Module) -> None:
    """Give ``module`` the HF attention's settings and its q/k/v/o projections (shared, not
    copied), so that the replacement keeps the trained weights."""
    module.config = attention.config
    module.layer_idx = attention.layer_idx
    module.head_dim = attention.head_dim
    module.scaling = attention.scaling
    module.attention_dropout = attention.attention_dropout
    module.is_causal = True
    module.q_proj, module.k_proj = attention.q_proj, attention.k_proj
    module.v_proj, module.o_proj = attention.v_proj, attention.o_proj

class CCALlamaAttention(nn.Module):
    """Drop-in replacement for transformers' ``LlamaAttention`` computing CCA attention.

    Build it from an existing ``LlamaAttention`` (its q/k/v/o projections are reused, not copied).
    ``forward`` has the HF signature and returns ``(output, None)`` (no attention weights).
    """

    def __init__(self, attention: nn.Module, *, group_size: int = 16, local_window: int = 1024,
                 pooling: str = "cca", implementation: str | None = None):
        super().__init__()
        _adopt_projections(self, attention)
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
        cache = _layer_cache(past_key_values, kwargs)
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


def reattention_query_lengths(mask, batch: int, queries: int, keys: int):
    """Real queries per sequence ((B,) int64 tensor) from a transformers attention mask, or None
    when every query is real. Accepts none, causal (queries at the last ``queries`` of ``keys``
    positions), and causal with right padding when there is no earlier cache (queries ==
    keys); raises ValueError for anything else (left padding, packed sequences, custom masks)."""
    advice = ("ReAttention in patch_llama honours unpadded batches, or right-padded ones without "
              "a filled KV cache (tokenizer.padding_side = 'right'); left padding, packed "
              "sequences and custom masks would change which keys are selected and numbered")
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"unsupported attention mask of type {type(mask).__name__} "
                         "(use attn_implementation='sdpa' or 'eager'); " + advice)
    if mask.ndim == 2:  # (B, S) padding mask
        key_ok = mask.bool()
        if tuple(key_ok.shape) != (batch, keys):
            raise ValueError(f"attention mask {tuple(mask.shape)} does not match {batch} "
                             f"sequences of {keys} keys; " + advice)
    else:
        if mask.ndim != 4 or tuple(mask.shape[-2:]) != (queries, keys):
            raise ValueError(f"attention mask of shape {tuple(mask.shape)} does not match "
                             f"{queries} queries and {keys} keys; " + advice)
        keep = mask if mask.dtype == torch.bool else mask == 0
        key_ok = keep[..., -1, :]  # the last query row: causal attention lets it see every key
        rows = torch.arange(queries, device=mask.device)[:, None] + (keys - queries)
        causal = torch.arange(keys, device=mask.device)[None, :] <= rows
        if not torch.equal(keep, causal & key_ok[..., None, :]):
            raise ValueError("attention mask is not causal (with right padding); " + advice)
        key_ok = key_ok.reshape(-1, keys).expand(batch, keys)
    if not _right_padded(key_ok):
        raise ValueError("attention mask is not right padding; " + advice)
    if bool(key_ok.all()):
        return None
    if keys != queries:
        raise ValueError(f"padding with a filled KV cache ({keys - queries} earlier tokens) is "
                         "not supported; " + advice)
    return key_ok.sum(dim=-1)


def _rotary_embedding(model: nn.Module) -> nn.Module:
    """The model's LlamaRotaryEmbedding, checked to be a RoPE ReAttention can re-number (its
    angles are position * inv_freq, unscaled: default, linear or llama3)."""
    rotary = [m for m in model.modules() if type(m).__name__ == "LlamaRotaryEmbedding"]
    if not rotary:
        raise TypeError(f"{type(model).__name__} has no LlamaRotaryEmbedding: ReAttention needs "
                        "the model's rotary frequencies")
    rope_type = getattr(rotary[0], "rope_type", "default")
    scaling = float(getattr(rotary[0], "attention_scaling", 1.0))
    if rope_type not in ("default", "linear", "llama3") or scaling != 1.0:
        raise NotImplementedError(f"ReAttention supports default, linear and llama3 RoPE; this "
                                  f"model uses {rope_type!r} (attention scaling {scaling})")
    return rotary[0]


REATTENTION_DEFAULTS = dict(reattention_sink=32, reattention_window=8192, reattention_top_k=4,
                            reattention_max_selected=256, reattention_span=32,
                            reattention_chunk=512, reattention_align=128,
                            reattention_key_block=1)
# patch_llama's implementation names -> kernels/reattention/torch_ops.py's
_REATTENTION_IMPLEMENTATIONS = {None: None, "triton": "triton", "reference": "torch",
                                "torch": "torch"}


def _selection(settings: dict):
    """kernels.reattention.params.Selection from ``reattention_*`` keyword arguments."""
    from kernels.reattention.params import Selection

    unknown = sorted(set(settings) - set(REATTENTION_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown ReAttention settings {unknown}; known: "
                        f"{sorted(REATTENTION_DEFAULTS)}")
    s = {**REATTENTION_DEFAULTS, **settings}
    return Selection(s["reattention_sink"], s["reattention_window"], s["reattention_top_k"],
                     s["reattention_max_selected"], s["reattention_span"], s["reattention_chunk"],
                     s["reattention_align"], s["reattention_key_block"])


class ReAttentionLlamaAttention(nn.Module):
    """Drop-in replacement for transformers' ``LlamaAttention`` computing ReAttention, like
    ``jax_cca.CCALlama(attention="reattention")``.

    Built from an existing ``LlamaAttention`` (or a patched layer: the q/k/v/o projections are
    reused, not copied) and the model's rotary embedding (read, not owned: its ``inv_freq`` gives
    the RoPE frequencies, so they follow the model's device). ``forward`` has the HF signature
    and returns ``(output, None)``.
    """

    def __init__(self, attention: nn.Module, rotary: nn.Module, *, selection,
                 implementation: str | None = None):
        super().__init__()
        _adopt_projections(self, attention)
        self._rotary = (rotary,)  # a tuple: not registered as a submodule of every layer
        self.configure(selection=selection, implementation=implementation)

    def configure(self, *, selection, implementation: str | None = None) -> None:
        if implementation not in _REATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"unknown implementation {implementation!r}; choose from "
                             f"{[k for k in _REATTENTION_IMPLEMENTATIONS if k]} or None")
        self.selection, self.implementation = selection, implementation

    def extra_repr(self) -> str:
        return f"selection={self.selection}, implementation={self.implementation!r}"

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                past_key_values=None, **kwargs):
        from kernels.reattention import torch_ops

        del position_embeddings  # ReAttention numbers the keys it attends to itself
        cache = _layer_cache(past_key_values, kwargs)
        b, t, _ = hidden_states.shape
        shape = (b, t, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape)  # (B, T, H, D), un-rotated
        k = self.k_proj(hidden_states).view(shape)
        v = self.v_proj(hidden_states).view(shape)
        if cache is not None:  # HF layout (B, H, S, D); the cache holds un-rotated keys
            keys, values = cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx)
            k, v = keys.transpose(1, 2), values.transpose(1, 2)
        q_lengths = reattention_query_lengths(attention_mask, b, t, k.shape[1])
        if self.training and self.attention_dropout:
            raise NotImplementedError(
                f"attention dropout ({self.attention_dropout}) is not supported by ReAttention; "
                "set config.attention_dropout = 0.0")
        sel = self.selection
        o = torch_ops.reattention(
            q, k, v, sink_tokens=sel.sink_tokens, local_window=sel.local_window,
            top_k=sel.top_k, max_selected=sel.max_selected, span=sel.span,
            chunk_size=sel.chunk_size, middle_align=sel.middle_align, key_block=sel.key_block,
            inv_freq=self._rotary[0].inv_freq.float(), softmax_scale=self.scaling,
            implementation=_REATTENTION_IMPLEMENTATIONS[self.implementation],
            q_lengths=q_lengths)
        return self.o_proj(o.reshape(b, t, -1)), None


PATCHED = (CCALlamaAttention, ReAttentionLlamaAttention)


def patch_llama(model: nn.Module, group_size: int = 16, local_window: int = 1024,
                pooling: str = "cca", implementation: str | None = None, *,
                attention: str = "cca", **reattention) -> nn.Module:
    """Make every attention layer of a transformers LLaMA (``LlamaForCausalLM``, ``LlamaModel``)
    compute CCA (``attention="cca"``, the default) or ReAttention (``attention="reattention"``);
    returns the same model, modified in place.

    Parameters are untouched (the layers reuse the projection modules), so fine-tuning, saving
    and loading work as before. Calling it again on a patched model changes the settings (or
    the attention). CCA: ``group_size``, ``local_window``, ``pooling``. ReAttention: the keyword
    arguments named like ``CCAConfig``'s fields, ``reattention_sink`` (32),
    ``reattention_window`` (8192), ``reattention_top_k`` (4), ``reattention_max_selected``
    (256), ``reattention_span`` (32), ``reattention_chunk`` (512), ``reattention_align`` (128),
    ``reattention_key_block`` (1; b > 1 picks whole blocks of b keys and needs span b).
    ``implementation``: None (Triton on CUDA, the torch reference on CPU), "triton" or
    "reference" (see ``torch_bridge.cca_attention``). Raises TypeError for other models.
    """
    from transformers.models.llama.modeling_llama import LlamaAttention

    from kernels.cca.reference_torch import check_cca_hparams

    if attention not in ("cca", "reattention"):
        raise ValueError(f"attention must be 'cca' or 'reattention'; got {attention!r}")
    if attention == "cca":
        if reattention:
            raise TypeError(f"unexpected arguments for attention='cca': {sorted(reattention)}")
        check_cca_hparams(group_size, local_window, pooling)
        settings = dict(group_size=group_size, local_window=local_window, pooling=pooling,
                        implementation=implementation)
    else:
        settings = dict(selection=_selection(reattention), implementation=implementation)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type != "llama":
        raise TypeError(f"patch_llama supports transformers LLaMA models (LlamaForCausalLM, "
                        f"LlamaModel); got {type(model).__name__} with model_type {model_type!r}")
    targets = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children()
               if type(child) is LlamaAttention or isinstance(child, PATCHED)]
    if not targets:
        raise TypeError(f"{type(model).__name__} has no LlamaAttention layer to patch")
    rotary = _rotary_embedding(model) if attention == "reattention" else None
    cls = CCALlamaAttention if attention == "cca" else ReAttentionLlamaAttention
    for parent, name, child in targets:
        if isinstance(child, cls):
            child.configure(**settings)
        elif cls is CCALlamaAttention:
            setattr(parent, name, CCALlamaAttention(child, **settings))
        else:
            setattr(parent, name, ReAttentionLlamaAttention(child, rotary, **settings))
    return model
