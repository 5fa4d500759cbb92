"""Save and restore a CCALlama with orbax, safely.

A checkpoint is a directory::

    jax_cca.json   format tag, the CCAConfig, and a sha256 of every parameter array
    state/         the orbax (tensorstore) parameter tree

Saving writes everything into a temporary sibling directory and renames it into place only once
it is complete (``jax_cca.fileio.atomic_directory``), so a crash never leaves a half-written checkpoint under the final name and never
destroys the one it replaces. Restoring checks the manifest, the tree and every checksum, and
turns any failure into a CheckpointError that names the path and the problem. Nothing here
imports torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jax_cca.fileio import atomic_directory

MANIFEST = "jax_cca.json"
FORMAT = "jax-cca-model"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt or not a jax-cca checkpoint."""


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def _flat_params(model) -> dict[str, np.ndarray]:
    state = nnx.state(model, nnx.Param)
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def _digest(array: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(f"{array.dtype.name}{array.shape}".encode())
    h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def _config_digest(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def save_model(model, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``model`` (config + parameters) to the directory ``path``. Returns the path."""
    path = Path(path).absolute()
    with atomic_directory(path, overwrite=overwrite) as tmp:
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        ckptr = _checkpointer()
        ckptr.save(tmp / "state", params)
        ckptr.wait_until_finished()
        config = json.loads(model.config.to_json())
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "config": config,
            "config_sha256": _config_digest(config),
            "sha256": {k: _digest(v) for k, v in _flat_params(model).items()},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return path


def read_manifest(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise CheckpointError(f"{path} is not a jax-cca checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{manifest_file} is corrupt: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(
            manifest.get("sha256"), dict):
        raise CheckpointError(f"{manifest_file} is not a {FORMAT} manifest")
    if not isinstance(manifest.get("config"), dict) or (
            _config_digest(manifest["config"]) != manifest.get("config_sha256")):
        raise CheckpointError(f"{manifest_file}: the stored config fails its checksum (corrupt)")
    if manifest.get("version", 0) > VERSION:
        raise CheckpointError(
            f"{path} was written by a newer jax-cca (format version {manifest['version']})"
        )
    return manifest


def restore_model(path: str | os.PathLike, **overrides):
    """The CCALlama saved at ``path``. ``overrides`` change config fields (attention="cca",
    group_size, local_window, dtype, ...): the weights are the same, cast if dtype changes."""
    from jax_cca.config import CCAConfig
    from jax_cca.model import CCALlama

    path = Path(path).absolute()
    manifest = read_manifest(path)
    try:
        config = CCAConfig(**manifest["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: stored config is invalid: {e}") from None
    graphdef, abstract_state = nnx.split(CCALlama.abstract(config))
    target = nnx.to_pure_dict(abstract_state)
    try:
        params = _checkpointer().restore(path / "state", target)
    except Exception as e:  # orbax/tensorstore raise many types for damaged data
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {e}") from e
    nnx.replace_by_pure_dict(abstract_state, params)
    model = nnx.merge(graphdef, abstract_state)
    actual = _flat_params(model)
    expected = manifest["sha256"]
    bad = sorted(k for k in expected if k not in actual or _digest(actual[k]) != expected[k])
    bad += sorted(set(actual) - set(expected))
    if bad:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: {len(bad)} parameter(s) fail their checksum, "
            f"e.g. {bad[:3]}"
        )
    return model.with_attention(**overrides) if overrides else model
