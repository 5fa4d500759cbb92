"""The PyTorch side of jax-cca: Hugging Face LLaMA weight conversion (torch only where needed).

    from torch_bridge import convert_hf_llama   # HF dir or LlamaForCausalLM -> CCALlama
    from torch_bridge import export_hf_llama    # CCALlama -> HF safetensors directory

Importing this package imports neither torch nor jax; each function imports what it needs.
"""

from torch_bridge.convert import convert_hf_llama, export_hf_llama, load_hf_llama

__all__ = ["convert_hf_llama", "export_hf_llama", "load_hf_llama"]
