"""Hugging Face LLaMA <-> CCALlama weight conversion.

One table maps each HF tensor name to its NNX parameter path and says whether the matrix is
transposed (torch Linear stores (out, in); nnx.Linear stores (in, out)). Loading a directory of
safetensors needs numpy only; ``.bin`` checkpoints and live ``LlamaForCausalLM`` objects need torch,
which is imported only then.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from torch_bridge.safetensors_io import read_safetensors, write_safetensors

# (HF name regex, NNX path template, transpose). "{i}" is the layer index.
WEIGHT_TABLE: list[tuple[str, tuple, bool]] = [
    (r"model\.embed_tokens\.weight", ("embed_tokens", "embedding"), False),
    (r"model\.norm\.weight", ("norm", "weight"), False),
    (r"lm_head\.weight", ("lm_head", "kernel"), True),
    (r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight",
     ("layers", "{i}", "{1}", "weight"), False),
    (r"model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.weight",
     ("layers", "{i}", "self_attn", "{1}", "kernel"), True),
    (r"model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.bias",
     ("layers", "{i}", "self_attn", "{1}", "bias"), False),
    (r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight",
     ("layers", "{i}", "mlp", "{1}", "kernel"), True),
    (r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.bias",
     ("layers", "{i}", "mlp", "{1}", "bias"), False),
]
# Buffers some checkpoints carry that are derived, not learned.
IGNORED = re.compile(r".*\.rotary_emb\.inv_freq")


def hf_to_nnx_path(name: str) -> tuple[tuple, bool] | None:
    """(NNX path, transpose) for an HF tensor name, or None if the name is not a LLaMA weight."""
    for pattern, template, transpose in WEIGHT_TABLE:
        m = re.fullmatch(pattern, name)
        if not m:
            continue
        path = []
        for part in template:
            if part == "{i}":
                path.append(int(m.group(1)))
            elif part == "{1}":
                path.append(m.group(2))
            else:
                path.append(part)
        return tuple(path), transpose
    return None


def nnx_to_hf_name(path: tuple) -> tuple[str, bool]:
    """Inverse of hf_to_nnx_path: (HF tensor name, transpose)."""
    parts = [str(p) for p in path]
    if parts[0] == "layers":
        leaf = {"kernel": "weight"}.get(parts[-1], parts[-1])
        name = "model.layers." + ".".join(parts[1:-1] + [leaf])
    elif parts[0] == "lm_head":
        name = "lm_head.weight"
    elif parts[0] == "embed_tokens":
        name = "model.embed_tokens.weight"
    else:
        name = "model." + ".".join(parts)
    return name, parts[-1] == "kernel"


# ---------------------------------------------------------------------------- reading HF files
def _weight_files(directory: Path) -> tuple[list[Path], str]:
    """The checkpoint's weight files and their format ("safetensors" or "bin")."""
    for index_name, fmt in (("model.safetensors.index.json", "safetensors"),
                            ("pytorch_model.bin.index.json", "bin")):
        index = directory / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index}: not a valid shard index ({e})") from None
            files = [directory / f for f in sorted(set(weight_map.values()))]
            missing = [str(f) for f in files if not f.exists()]
            if missing:
                raise FileNotFoundError(f"{index} lists shards that do not exist: {missing}")
            return files, fmt
    for single, fmt in (("model.safetensors", "safetensors"), ("pytorch_model.bin", "bin")):
        if (directory / single).exists():
            return [directory / single], fmt
    raise FileNotFoundError(
        f"no LLaMA weights in {directory}: expected model.safetensors, "
        "model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json"
    )


def _torch_to_numpy(tensor) -> np.ndarray:
    import ml_dtypes
    import torch

    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _read_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"{path} is a PyTorch .bin checkpoint: reading it needs torch "
            "(pip install 'jax-cca[torch]'), or convert it to safetensors first"
        ) from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: _torch_to_numpy(v) for k, v in state.items()}


def read_hf_directory(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json dict, {tensor name: array}) of a Hugging Face LLaMA directory."""
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"Hugging Face model directory not found: {directory}")
    config_file = directory / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{directory} has no config.json")
    try:
        hf_config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON ({e})") from None
    files, fmt = _weight_files(directory)
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        tensors.update(read_safetensors(f) if fmt == "safetensors" else _read_bin(f))
    return hf_config, tensors


# ---------------------------------------------------------------------------- HF -> CCALlama
def _hf_dtype(hf_config: dict) -> str:
    name = hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32"
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def build_model(hf_config: dict, tensors: dict[str, np.ndarray], **overrides):
    """A CCALlama holding ``tensors`` (HF names). Raises one error listing every problem."""
    import jax.numpy as jnp
    from flax import nnx

    from jax_cca.config import CCAConfig
    from jax_cca.model import CCALlama

    overrides.setdefault("dtype", _hf_dtype(hf_config))
    if overrides.pop("fused_projections", False):  # HF stores the separate layout
        return build_model(hf_config, tensors, **overrides).with_fused_projections()
    config = CCAConfig.from_hf_config(hf_config, **overrides)
    graphdef, abstract_state = nnx.split(CCALlama.abstract(config))
    expected = dict(nnx.to_flat_state(abstract_state))
    filled: dict[tuple, Any] = {}
    problems: list[str] = []
    for name, array in tensors.items():
        mapped = hf_to_nnx_path(name)
        if mapped is None:
            if not IGNORED.fullmatch(name):
                problems.append(f"unexpected tensor {name!r} (not part of a LLaMA model)")
            continue
        path, transpose = mapped
        if path not in expected:
            if path == ("lm_head", "kernel") and config.tie_word_embeddings:
                continue  # tied checkpoints may still store a copy of the embedding
            problems.append(f"unexpected tensor {name!r} for this config")
            continue
        target = expected[path]
        value = np.asarray(array).T if transpose else np.asarray(array)
        if value.shape != tuple(target.shape):
            problems.append(
                f"shape mismatch for {name!r}: checkpoint {tuple(array.shape)}, model expects "
                f"{tuple(target.shape[::-1] if transpose else target.shape)}"
            )
            continue
        filled[path] = jnp.asarray(value, dtype=target.dtype)
    for path in expected:
        if path not in filled:
            problems.append(f"missing tensor {nnx_to_hf_name(path)[0]!r}")
    if problems:
        raise ValueError("cannot load LLaMA weights:\n  " + "\n  ".join(sorted(problems)))
    state = nnx.from_flat_state([(p, expected[p].replace(filled[p])) for p in expected])
    return nnx.merge(graphdef, state)


def load_hf_llama(path: str | os.PathLike, **overrides):
    """CCALlama from a Hugging Face LLaMA directory (safetensors needs no torch)."""
    hf_config, tensors = read_hf_directory(path)
    return build_model(hf_config, tensors, **overrides)


def convert_hf_llama(source: Any, **overrides):
    """CCALlama from a Hugging Face directory or a live ``transformers.LlamaForCausalLM``.

    ``overrides`` set CCAConfig fields (``attention="cca"``, ``group_size``, ``dtype``...).
    """
    if isinstance(source, (str, os.PathLike)):
        return load_hf_llama(source, **overrides)
    if not (hasattr(source, "config") and hasattr(source, "state_dict")):
        raise TypeError(
            "convert_hf_llama expects a directory path or a transformers LlamaForCausalLM; "
            f"got {type(source).__name__}"
        )
    hf_config = source.config.to_dict()
    tensors = {k: _torch_to_numpy(v) for k, v in source.state_dict().items()}
    if "dtype" not in overrides and tensors:
        first = next(iter(tensors.values())).dtype.name
        overrides["dtype"] = first if first in ("float32", "bfloat16", "float16") else "float32"
    return build_model(hf_config, tensors, **overrides)


# ---------------------------------------------------------------------------- CCALlama -> HF
def hf_state_dict(model) -> dict[str, np.ndarray]:
    """The model's parameters under HF names and layouts, as numpy (bf16 via ml_dtypes); a model
    in the fused serving layout is split back into q, k, v and gate, up first."""
    from flax import nnx

    if model.config.fused_projections:
        model = model.with_fused_projections(False)
    out = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, transpose = nnx_to_hf_name(path)
        value = np.asarray(variable.get_value())
        out[name] = value.T if transpose else value
    return out


def export_hf_llama(model, path: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30,
                    overwrite: bool = False) -> None:
    """Write config.json and safetensors (sharded with an index above ``max_shard_bytes``).

    The directory is written whole and renamed into place: an existing one (``overwrite=True``)
    is replaced entirely, never mixed with new files."""
    from jax_cca.fileio import atomic_directory

    tensors = hf_state_dict(model)
    shards = list(_shard(tensors, max_shard_bytes))
    with atomic_directory(path, overwrite=overwrite) as directory:
        if len(shards) == 1:
            write_safetensors(directory / "model.safetensors", shards[0])
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                write_safetensors(directory / fname, shard)
                weight_map.update({name: fname for name in shard})
            total = sum(a.nbytes for a in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config = json.dumps(model.config.to_hf_config(), indent=2)
        (directory / "config.json").write_text(config)


def _shard(tensors: dict[str, np.ndarray], max_bytes: int) -> Iterable[dict[str, np.ndarray]]:
    shard: dict[str, np.ndarray] = {}
    size = 0
    for name, arr in tensors.items():
        if shard and size + arr.nbytes > max_bytes:
            yield shard
            shard, size = {}, 0
        shard[name] = arr
        size += arr.nbytes
    if shard:
        yield shard
