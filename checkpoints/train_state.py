"""Periodic train-state checkpoints with orbax's CheckpointManager, verified on restore.

A run's checkpoint directory holds one sub-directory per saved step (orbax layout), each with
two items:

    state/   every array of the train state (``jax_cca.train.Trainer``), flattened to
             {"00000": array, ...} so the layout does not depend on optax / flax pytree types
    meta/    JSON: format tag, step, the flattened leaf paths, shapes and dtypes, a 64-bit
             fingerprint of every array, and the caller's metadata (data position, configs)

orbax writes a step into a temporary directory and renames it into place only when complete, so a
crash mid-save leaves the previous steps untouched and the half-written one invisible (it is
deleted when the next manager opens the directory); ``keep`` old steps are pruned only after a
newer one is complete. Restoring checks the leaf paths, shapes and dtypes against the target and
every fingerprint against the restored data, and turns any failure into a CheckpointError that
names the directory and the step.

The fingerprints are computed on the devices (a position-weighted sum of the array's bits modulo
2^32, two of them per array), so they cost one cheap reduction per save and work for arrays
sharded over many hosts. Any change of a single word is always detected.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from checkpoints.model_io import CheckpointError

FORMAT = "jax-cca-train-state"
VERSION = 1


def _words(x: jax.Array) -> jax.Array:
    """The bits of ``x`` as a flat uint32 vector."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32).reshape(-1)
    size = jnp.dtype(x.dtype).itemsize
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size]
    bits = jax.lax.bitcast_convert_type(x, unsigned)  # 8-byte dtypes gain a trailing axis of 2
    return bits.astype(jnp.uint32).reshape(-1)


@jax.jit
def _fingerprints(arrays: list) -> jax.Array:
    """(n, 2) uint32: two position-weighted sums of each array's bits, modulo 2^32. The weights
    are odd, so changing any one word changes both sums."""
    sums = []
    for x in arrays:
        w = _words(x)
        i = jax.lax.iota(jnp.uint32, w.shape[0])
        w1 = (i * jnp.uint32(2654435761) + jnp.uint32(0x9E3779B9)) | jnp.uint32(1)
        w2 = ((i ^ jnp.uint32(0x85EBCA6B)) * jnp.uint32(2246822519)) | jnp.uint32(1)
        mixed = w ^ (w >> jnp.uint32(15))
        sums.append(jnp.stack([jnp.sum(w * w1, dtype=jnp.uint32),
                               jnp.sum(mixed * w2, dtype=jnp.uint32)]))
    return jnp.stack(sums)


def fingerprints(arrays: list) -> list[str]:
    """Hex fingerprints (16 digits) of ``arrays``, in order."""
    if not arrays:
        return []
    out = _fingerprints(list(arrays))
    host = np.asarray(out.addressable_data(0))  # replicated: every process holds all of it
    return [f"{int(a):08x}{int(b):08x}" for a, b in host]


def _flatten(tree) -> tuple[list[str], list, object]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [jax.tree_util.keystr(p) for p, _ in leaves], [x for _, x in leaves], treedef


def _name(i: int) -> str:
    return f"{i:05d}"


class TrainCheckpointer:
    """Saves and restores train states (any pytree of jax arrays) under ``directory``.

    ``keep``: how many of the newest steps to keep (None: all). ``async_save``: writes continue
    in the background after ``save`` returns (``wait()`` blocks until they are complete);
    the arrays are copied to host memory before ``save`` returns.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int | None = 3,
                 async_save: bool = True, create: bool = True):
        import orbax.checkpoint as ocp

        self.directory = Path(directory).absolute()
        if not create and not self.directory.is_dir():
            raise CheckpointError(f"checkpoint directory not found: {self.directory}")
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be >= 1 or None; got {keep}")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=create, cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save)
        self._ocp = ocp
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "meta"))

    # -------------------------------------------------------------- queries
    def steps(self) -> list[int]:
        """Completed steps, oldest first."""
        self._manager.reload()  # another process (or a crash) may have changed the directory
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def _where(self, step: int) -> str:
        return f"checkpoint step {step} in {self.directory}"

    def read_meta(self, step: int | None = None) -> dict:
        """The metadata saved with ``step`` (default: the latest), checked for format."""
        step = self._resolve(step)
        try:
            meta = self._manager.restore(
                step, args=self._ocp.args.Composite(meta=self._ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # orbax raises many types for missing / damaged files
            raise CheckpointError(f"{self._where(step)} is corrupt: its metadata cannot be "
                                  f"read ({type(e).__name__}: {e})") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or not all(
                isinstance(meta.get(k), list) for k in ("paths", "shapes", "dtypes",
                                                        "fingerprints")):
            raise CheckpointError(f"{self._where(step)} is not a {FORMAT} checkpoint "
                                  "(corrupt metadata)")
        if meta.get("version", 0) > VERSION:
            raise CheckpointError(f"{self._where(step)} was written by a newer jax-cca")
        return meta

    def _resolve(self, step: int | None) -> int:
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise CheckpointError(f"no checkpoint step {step} in {self.directory} "
                                  f"(steps: {steps})")
        return step

    # -------------------------------------------------------------- save / restore
    def save(self, step: int, state, metadata: dict | None = None) -> None:
        """Saves ``state`` (a pytree of jax arrays) as ``step`` with JSON ``metadata``; older
        steps beyond ``keep`` are removed once this one is complete."""
        paths, leaves, _ = _flatten(state)
        meta = {
            "format": FORMAT, "version": VERSION, "step": int(step), "paths": paths,
            "shapes": [list(x.shape) for x in leaves],
            "dtypes": [jnp.dtype(x.dtype).name for x in leaves],
            "fingerprints": fingerprints(leaves),
            "metadata": metadata or {},
        }
        arrays = {_name(i): x for i, x in enumerate(leaves)}
        self._manager.save(int(step), force=True, args=self._ocp.args.Composite(
            state=self._ocp.args.StandardSave(arrays), meta=self._ocp.args.JsonSave(meta)))

    def restore(self, abstract_state, step: int | None = None) -> tuple[object, dict]:
        """(state, metadata) of ``step`` (default: the latest). ``abstract_state`` is the target:
        a pytree of ``jax.ShapeDtypeStruct`` (with shardings) of the same structure as the
        saved state (``Trainer.abstract_state()``)."""
        step = self._resolve(step)
        meta = self.read_meta(step)
        paths, targets, treedef = _flatten(abstract_state)
        shapes = [list(x.shape) for x in targets]
        dtypes = [jnp.dtype(x.dtype).name for x in targets]
        for what, saved, wanted in (("parameter/optimizer leaves", meta["paths"], paths),
                                    ("shapes", meta["shapes"], shapes),
                                    ("dtypes", meta["dtypes"], dtypes)):
            if saved != wanted:
                diff = next((i for i, (a, b) in enumerate(zip(saved, wanted)) if a != b),
                            min(len(saved), len(wanted)))
                example = (f"{paths[diff] if diff < len(paths) else 'leaf ' + str(diff)}: saved "
                           f"{saved[diff] if diff < len(saved) else 'nothing'}, expected "
                           f"{wanted[diff] if diff < len(wanted) else 'nothing'}")
                raise CheckpointError(
                    f"{self._where(step)} holds a different train state ({what} differ, e.g. "
                    f"{example}): another model, trainable set or optimizer")
        target = {_name(i): x for i, x in enumerate(targets)}
        try:
            restored = self._manager.restore(step, args=self._ocp.args.Composite(
                state=self._ocp.args.StandardRestore(target)))["state"]
            leaves = [restored[_name(i)] for i in range(len(targets))]
        except Exception as e:  # orbax / tensorstore raise many types for damaged data
            raise CheckpointError(f"{self._where(step)} is truncated or corrupt "
                                  f"({type(e).__name__}: {e})") from e
        bad = [p for p, a, b in zip(paths, fingerprints(leaves), meta["fingerprints"]) if a != b]
        if bad:
            raise CheckpointError(f"{self._where(step)} is corrupt: {len(bad)} array(s) fail "
                                  f"their fingerprint, e.g. {bad[:3]}")
        return jax.tree_util.tree_unflatten(treedef, leaves), meta["metadata"]

    def wait(self) -> None:
        """Blocks until background writes are complete."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "TrainCheckpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
