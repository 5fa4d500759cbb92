"""CCAConfig: a LLaMA-family architecture plus the choice of attention and its hyper-parameters."""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Literal

import jax.numpy as jnp

Attention = Literal["full", "cca", "reattention"]
ATTENTIONS = ("full", "cca", "reattention")
ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_name(dtype: Any) -> str:
    name = jnp.dtype(dtype).name
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; use one of {sorted(DTYPES)}")
    return name


@dataclasses.dataclass(frozen=True)
class CCAConfig:
    """Architecture of a LLaMA 2 / 3 / 3.1 / 3.2 decoder and the attention it runs.

    ``rope_scaling`` follows Hugging Face: None, or a dict with ``rope_type`` "linear" (``factor``)
    or "llama3" (``factor``, ``low_freq_factor``, ``high_freq_factor``,
    ``original_max_position_embeddings``). ``dtype`` is the compute and parameter dtype name.

    CCA (``attention="cca"``) uses ``group_size``, ``local_window`` and ``pooling``. ReAttention
    (``attention="reattention"``) uses the ``reattention_*`` fields, which map onto
    ``kernels.reattention.params.Selection`` (:meth:`selection`): ``sink`` tokens always kept,
    the local ``window`` (aligned to ``align``), each query's ``top_k`` keys, at most
    ``max_selected`` of them per chunk of ``chunk`` queries, each bringing ``span`` neighbours;
    ``key_block`` b > 1 picks whole aligned blocks of b keys instead (``span`` must equal b).
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    attention: Attention = "full"
    group_size: int = 16
    local_window: int = 1024
    pooling: str = "cca"
    # ReAttention's selection (kernels/reattention/params.py Selection; defaults: the authors').
    reattention_sink: int = 32
    reattention_window: int = 8192
    reattention_top_k: int = 4
    reattention_max_selected: int = 256
    reattention_span: int = 32
    reattention_chunk: int = 512
    reattention_align: int = 128
    reattention_key_block: int = 1
    implementation: str | None = None
    dtype: str = "float32"
    # Serving layout (jax_cca/fused.py): q, k, v stored as one ``qkv_proj`` and gate, up as one
    # ``gate_up_proj``, so a decode step runs two large GEMMs instead of five small ones. The
    # same function; Hugging Face export and loading convert between the layouts.
    fused_projections: bool = False

    def __post_init__(self):
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) is not divisible by num_heads "
                    f"({self.num_heads}); set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", _normalize_rope_scaling(self.rope_scaling))
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings; got {self.head_dim}")
        if not isinstance(self.fused_projections, bool):
            raise ValueError(f"fused_projections must be a bool; got {self.fused_projections!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}; got {self.attention!r}")
        from kernels.cca.reference import check_cca_hparams

        check_cca_hparams(self.group_size, self.local_window, self.pooling)
        self.selection()  # validates the ReAttention fields

    def selection(self):
        """ReAttention's :class:`kernels.reattention.params.Selection` from the
        ``reattention_*`` fields (raises ValueError naming a bad one)."""
        from kernels.reattention.params import Selection

        fields = dict(sink_tokens=self.reattention_sink, local_window=self.reattention_window,
                      top_k=self.reattention_top_k, max_selected=self.reattention_max_selected,
                      span=self.reattention_span, chunk_size=self.reattention_chunk,
                      middle_align=self.reattention_align,
                      key_block=self.reattention_key_block)
        try:
            return Selection(**fields)
        except ValueError as e:  # name the config fields, not the Selection arguments
            names = dict(zip(fields, ("reattention_sink", "reattention_window",
                                      "reattention_top_k", "reattention_max_selected",
                                      "reattention_span", "reattention_chunk",
                                      "reattention_align", "reattention_key_block")))
            pattern = r"\b(" + "|".join(names) + r")\b(?=[ =])"
            message = re.sub(pattern, lambda m: names[m.group(1)], str(e))
            raise ValueError(message) from None

    def max_reattention_position(self) -> int:
        """An upper bound (exclusive) on the positions ReAttention gives any query or key: the
        longest attended list, sink + max_selected * span + window + align - 1 + chunk. Every
        position stays below it, and below the context length, whatever the context length.
        Block picks (``reattention_key_block`` > 1) keep the bound: a kept block brings its
        ``key_block == span`` keys, as a kept token brings its span."""
        sel = self.selection()
        return sel.num_gathered() + sel.local_window + sel.middle_align - 1 + sel.chunk_size

    # ----------------------------------------------------------------- named constructors
    @classmethod
    def tiny(cls, **overrides) -> "CCAConfig":
        """The embedded default: a small GQA LLaMA that runs on a laptop CPU in seconds."""
        base = dict(vocab_size=512, hidden_size=256, intermediate_size=688, num_layers=4,
                    num_heads=8, num_kv_heads=2, rope_theta=10000.0,
                    max_position_embeddings=8192, group_size=16, local_window=256)
        return cls(**{**base, **overrides})

    @classmethod
    def llama2_7b(cls, **overrides) -> "CCAConfig":
        return cls(**{**dict(max_position_embeddings=4096), **overrides})

    @classmethod
    def llama3_8b(cls, **overrides) -> "CCAConfig":
        base = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                    num_heads=32, num_kv_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5,
                    max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192})
        return cls(**{**base, **overrides})

    def __hash__(self) -> int:  # rope_scaling is a dict; hash the canonical JSON instead
        return hash(self.to_json())

    def replace(self, **changes) -> "CCAConfig":
        return dataclasses.replace(self, **changes)

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    @property
    def kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    # ----------------------------------------------------------------- Hugging Face config
    @classmethod
    def from_hf_config(cls, hf: dict, **overrides) -> "CCAConfig":
        """From a Hugging Face LlamaConfig dict (config.json), transformers 4.x or 5.x layout."""
        model_type = hf.get("model_type")
        archs = hf.get("architectures") or []
        if model_type not in (None, "llama") or any(a != "LlamaForCausalLM" for a in archs):
            raise ValueError(
                f"unsupported architecture: model_type={model_type!r}, architectures={archs}; "
                "only LLaMA-family checkpoints (LlamaForCausalLM) are supported"
            )
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r}; LLaMA uses 'silu'")
        rope = dict(hf.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = hf.get("rope_scaling") or (rope if rope else None)
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                               "num_hidden_layers", "num_attention_heads") if k not in hf]
        if missing:
            raise ValueError(f"config.json lacks required LLaMA fields: {missing}")
        kwargs = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim"),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
        )
        return cls(**{**kwargs, **overrides})

    def to_hf_config(self) -> dict:
        """A config.json dict that transformers 4.x and 5.x load as a LlamaConfig."""
        hf = dict(
            architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
            vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling, max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings, attention_bias=self.attention_bias,
            mlp_bias=self.mlp_bias, bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id, torch_dtype=self.dtype,
        )
        return hf

    # ----------------------------------------------------------------- JSON
    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "CCAConfig":
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown CCAConfig fields: {unknown}")
        return cls(**data)


def _normalize_rope_scaling(scaling: dict) -> dict | None:
    scaling = dict(scaling)
    scaling.pop("rope_theta", None)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    scaling.pop("type", None)
    scaling["rope_type"] = rope_type
    if rope_type not in ROPE_TYPES:
        raise NotImplementedError(
            f"rope_scaling type {rope_type!r} is not supported; supported: {ROPE_TYPES}"
        )
    if rope_type == "default":
        return None
    required = {"linear": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                           "original_max_position_embeddings")}[rope_type]
    missing = [k for k in required if k not in scaling]
    if missing:
        raise ValueError(f"rope_scaling of type {rope_type!r} lacks {missing}")
    return scaling
