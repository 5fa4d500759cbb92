"""The PyTorch side of jax-cca: Hugging Face LLaMA weight conversion and CCA attention in torch.

    from torch_bridge import convert_hf_llama   # HF dir or LlamaForCausalLM -> CCALlama
    from torch_bridge import export_hf_llama    # CCALlama -> HF safetensors directory
    from torch_bridge import cca_attention      # CCA on torch tensors (Triton kernels or reference)
    from torch_bridge import patch_llama        # a transformers LlamaForCausalLM computing CCA
                                                # (or ReAttention: attention="reattention")

Importing this package imports neither torch nor jax; each function imports what it needs
(``cca_attention`` and ``patch_llama`` are loaded on first access).
"""

import importlib

from torch_bridge.convert import convert_hf_llama, export_hf_llama, load_hf_llama

_LAZY = {
    "cca_attention": "torch_bridge.attention",
    "patch_llama": "torch_bridge.modules",
    "CCALlamaAttention": "torch_bridge.modules",
    "ReAttentionLlamaAttention": "torch_bridge.modules",
}

__all__ = ["convert_hf_llama", "export_hf_llama", "load_hf_llama", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
