"""jax-cca: Core Context Aware attention and ReAttention for LLaMA-family models in JAX.

    from jax_cca import CCALlama, CCAConfig
    model = CCALlama.from_pretrained(hf_dir, attention="cca", group_size=16, local_window=1024)
"""

from jax_cca.config import CCAConfig
from jax_cca.model import CCALlama

__all__ = ["CCAConfig", "CCALlama"]
__version__ = "0.1.0"
