"""checkpoints.save_model / restore_model: bitwise round trips, overrides, overwrite rules,
damaged checkpoints (always a CheckpointError naming the path, never a silent wrong answer),
crashes mid-save, and restoring without torch."""

from __future__ import annotations

import functools
import gc
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import checkpoints
from jax_cca import fileio
from checkpoints import (
    CheckpointError,
    is_checkpoint,
    model_io,
    read_manifest,
    restore_model,
    save_model,
)
from jax_cca import CCAConfig, CCALlama

REPO = Path(__file__).resolve().parents[1]
# Restoring a damaged checkpoint leaves orbax's pending read coroutines to fail after the
# CheckpointError has been raised; their "exception ignored" reports are expected noise here.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(autouse=True)
def _collect_orbax_garbage():
    """Finalise those coroutines inside the test that caused them (where the filter applies)."""
    yield
    gc.collect()

SMALL = dict(vocab_size=150, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
             num_kv_heads=2, group_size=4, local_window=8, max_position_embeddings=512)
B, T = 2, 45


def flat_params(model) -> dict:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def random_model(seed: int = 0, **changes) -> CCALlama:
    """A CCALlama whose every parameter (RMSNorm weights included: they start at ones, so
    swapped or dropped norms would otherwise be invisible) is fresh random (numpy-drawn into the
    abstract model: much faster on CPU than running the initialisers)."""
    config = CCAConfig(**{**SMALL, **changes})
    graphdef, state = nnx.split(CCALlama.abstract(config))
    rng = np.random.default_rng(seed)
    new = []
    for path, var in nnx.to_flat_state(state):
        value = rng.standard_normal(var.shape) * (0.5 if len(var.shape) == 1 else 0.15)
        if path[-1] == "weight":          # RMSNorm
            value = value + 1.0
        new.append((path, var.replace(jnp.asarray(value, config.jnp_dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(new))


def ids(seed: int = 0) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).integers(0, SMALL["vocab_size"], (B, T)),
                       jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, input_ids):
    return nnx.merge(graphdef, state)(input_ids)


def logits(model) -> np.ndarray:
    """Jitted forward (one compile per config instead of per-op eager dispatch)."""
    out = _forward(*nnx.split(model), ids())
    assert out.shape == (B, T, SMALL["vocab_size"])
    out = np.asarray(out.astype(jnp.float32))
    assert np.isfinite(out).all()
    return out


def assert_same_model(got, want):
    assert got.config == want.config
    pg, pw = flat_params(got), flat_params(want)
    assert pg.keys() == pw.keys()
    for k in pw:
        assert pg[k].dtype == pw[k].dtype, k
        np.testing.assert_array_equal(pg[k], pw[k], err_msg=str(k))
    np.testing.assert_array_equal(logits(got), logits(want))


def leftovers(parent: Path, keep: set[str]) -> list[str]:
    """Entries of ``parent`` other than ``keep`` (temp or backup directories of a save)."""
    return sorted(p.name for p in parent.iterdir() if p.name not in keep)


@pytest.fixture(scope="module")
def model():
    return random_model(seed=1)


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory) -> Path:
    """A pristine checkpoint of ``model``; tests copy it before damaging anything."""
    return save_model(model, tmp_path_factory.mktemp("pristine") / "ckpt")


@pytest.fixture
def ckpt(saved, tmp_path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "ckpt"))


# ------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("changes", [
    dict(),
    dict(dtype="bfloat16"),
    dict(dtype="bfloat16", tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    dict(attention="cca", rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32), eos_token_id=[2, 7]),
], ids=["fp32", "bf16", "bf16_tied_bias", "cca_llama3"])
def test_round_trip_is_bitwise(changes, tmp_path):
    original = random_model(seed=2, **changes)
    path = save_model(original, tmp_path / "ckpt")
    assert path == (tmp_path / "ckpt").absolute()
    assert is_checkpoint(path)
    assert read_manifest(path)["config"] == json.loads(original.config.to_json())
    restored = restore_model(path)
    assert_same_model(restored, original)
    if changes.get("dtype") == "bfloat16":
        assert all(v.dtype == jnp.bfloat16 for v in flat_params(restored).values())
    # CCALlama.from_pretrained recognises the checkpoint too.
    assert_same_model(CCALlama.from_pretrained(path), original)
    # Nothing but the checkpoint is left next to it; no orbax temp dirs inside it.
    assert leftovers(tmp_path, {"ckpt"}) == []
    assert not [p for p in path.rglob("*") if "tmp" in p.name.lower()]


def test_restore_with_overrides(model, saved, rel_err):
    cca = restore_model(saved, attention="cca", group_size=4, local_window=12)
    assert (cca.config.attention, cca.config.group_size, cca.config.local_window) == (
        "cca", 4, 12)
    assert cca.config == model.config.replace(attention="cca", group_size=4, local_window=12)
    want = model.with_attention(attention="cca", group_size=4, local_window=12)
    np.testing.assert_array_equal(logits(cca), logits(want))
    assert rel_err(logits(cca), logits(model)) > 1e-3   # the switch is real at T = 45

    bf16 = restore_model(saved, dtype=jnp.bfloat16)
    assert bf16.config == model.config.replace(dtype="bfloat16")
    for k, v in flat_params(model).items():
        got = flat_params(bf16)[k]
        assert got.dtype == jnp.bfloat16, k
        np.testing.assert_array_equal(got, v.astype(jnp.bfloat16), err_msg=str(k))
    out = model  # fp32 reference
    assert rel_err(logits(bf16), logits(out)) < 2e-2

    both = restore_model(saved, attention="cca", group_size=4, local_window=8, dtype="bfloat16")
    assert both.config == model.config.replace(attention="cca", local_window=8, dtype="bfloat16")
    assert rel_err(logits(both), logits(model.with_attention(attention="cca", local_window=8))) \
        < 2e-2
    re = restore_model(saved, attention="reattention", reattention_top_k=8)
    assert re.config == model.config.replace(attention="reattention", reattention_top_k=8)
    # The stored checkpoint itself is unchanged by restoring with overrides.
    assert_same_model(restore_model(saved), model)


def test_restore_with_invalid_overrides(saved):
    with pytest.raises(ValueError, match="multiple of group_size"):
        restore_model(saved, group_size=4, local_window=10)
    with pytest.raises(ValueError, match="reattention_top_k"):
        restore_model(saved, attention="reattention", reattention_top_k=0)
    with pytest.raises(ValueError, match="attention must be one of"):
        restore_model(saved, attention="sparse")


# ------------------------------------------------------------------------------- overwrite
def test_existing_path_without_overwrite(model, tmp_path):
    path = save_model(model, tmp_path / "ckpt")
    before = {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    other = random_model(seed=9)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_model(other, path)
    after = {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    assert after == before
    assert_same_model(restore_model(path), model)
    assert leftovers(tmp_path, {"ckpt"}) == []

    save_model(other, path, overwrite=True)
    assert_same_model(restore_model(path), other)
    assert leftovers(tmp_path, {"ckpt"}) == []


def test_existing_non_checkpoint_path_is_not_overwritten_by_default(model, tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        save_model(model, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "notes.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------- damage
def data_files(path: Path) -> list[Path]:
    files = [p for p in (path / "state").rglob("*") if p.is_file()]
    assert files, f"no files under {path / 'state'}"
    return sorted(files, key=lambda p: (p.stat().st_size, str(p)))


def test_truncated_largest_data_file(ckpt):
    f = data_files(ckpt)[-1]
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError) as info:
        restore_model(ckpt)
    assert str(ckpt) in str(info.value)


@pytest.mark.parametrize("where", [0.25, 0.5, 0.9])
def test_flipped_bytes_in_largest_data_file(ckpt, where):
    f = data_files(ckpt)[-1]
    data = bytearray(f.read_bytes())
    i = int(len(data) * where)
    data[i:i + 4] = bytes(b ^ 0xFF for b in data[i:i + 4])
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as info:
        restore_model(ckpt)
    assert str(ckpt) in str(info.value)


def test_every_damaged_file_errors_or_restores_identically(model, saved, tmp_path):
    """Flip a byte in, truncate, or delete each file of the checkpoint in turn: the restore must
    either raise CheckpointError naming the path or give back exactly the saved model (some
    orbax files are advisory). A different model without an error is the one forbidden
    result."""
    want = flat_params(model)
    files = sorted(p.relative_to(saved) for p in saved.rglob("*") if p.is_file())
    errors = 0
    for i, rel in enumerate(files):
        for damage in ("flip", "truncate", "delete"):
            work = Path(shutil.copytree(saved, tmp_path / f"{damage}-{i}"))
            f = work / rel
            data = bytearray(f.read_bytes())
            if damage == "flip":
                data[len(data) // 2] ^= 0x5A
                f.write_bytes(bytes(data))
            elif damage == "truncate":
                f.write_bytes(bytes(data[: len(data) // 2]))
            else:
                f.unlink()
            try:
                got = restore_model(work)
            except CheckpointError as e:
                assert str(work) in str(e), (rel, damage, str(e)[:300])
                errors += 1
                continue
            assert got.config == model.config, (rel, damage)
            p = flat_params(got)
            assert p.keys() == want.keys(), (rel, damage)
            for k in want:
                assert p[k].dtype == want[k].dtype and np.array_equal(p[k], want[k]), (
                    f"{damage} of {rel} gave a different {k} without an error")
            shutil.rmtree(work)
    assert errors >= len(files)  # most damage is detected, not merely survived


def test_wrong_checksum_in_manifest(ckpt):
    manifest = json.loads((ckpt / model_io.MANIFEST).read_text())
    name = sorted(manifest["sha256"])[0]
    manifest["sha256"][name] = "0" * 64
    (ckpt / model_io.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="checksum") as info:
        restore_model(ckpt)
    assert str(ckpt) in str(info.value) and name in str(info.value)


def test_damaged_config_in_manifest_is_detected(ckpt):
    f = ckpt / model_io.MANIFEST
    text = f.read_text()
    assert '"rope_theta": 10000.0' in text
    f.write_text(text.replace('"rope_theta": 10000.0', '"rope_theta": 10001.0'))
    with pytest.raises(CheckpointError):
        restore_model(ckpt)


def test_invalid_stored_config(ckpt):
    manifest = json.loads((ckpt / model_io.MANIFEST).read_text())
    manifest["config"]["local_window"] = 7
    (ckpt / model_io.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="config") as info:
        restore_model(ckpt)
    assert str(ckpt) in str(info.value)


def test_stored_config_not_matching_the_arrays(ckpt):
    manifest = json.loads((ckpt / model_io.MANIFEST).read_text())
    manifest["config"]["intermediate_size"] = 128
    (ckpt / model_io.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError) as info:
        restore_model(ckpt)
    assert str(ckpt) in str(info.value)


def test_missing_manifest(ckpt):
    (ckpt / model_io.MANIFEST).unlink()
    assert not is_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="not a jax-cca checkpoint") as info:
        restore_model(ckpt)
    assert str(ckpt) in str(info.value)


@pytest.mark.parametrize("text", ['{"format": "jax-cca-model", "sha', "", "\x00\x01garbage",
                                  '{"format": "something-else", "sha256": {}}', "[1, 2]"])
def test_corrupt_manifest(ckpt, text):
    (ckpt / model_io.MANIFEST).write_text(text)
    with pytest.raises(CheckpointError) as info:
        restore_model(ckpt)
    assert str(ckpt) in str(info.value)


def test_manifest_from_a_newer_version(ckpt):
    manifest = json.loads((ckpt / model_io.MANIFEST).read_text())
    manifest["version"] = model_io.VERSION + 1
    (ckpt / model_io.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="newer"):
        restore_model(ckpt)


def test_missing_state_directory(ckpt):
    shutil.rmtree(ckpt / "state")
    with pytest.raises(CheckpointError) as info:
        restore_model(ckpt)
    assert str(ckpt) in str(info.value)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not found") as info:
        restore_model(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value)


# ------------------------------------------------------------------------------- crashes
class _Crash(Exception):
    pass


def _crashing_checkpointer(monkeypatch, exc):
    real = model_io._checkpointer

    class Crashing:
        def __init__(self):
            self.inner = real()

        def save(self, path, params):
            self.inner.save(path, params)       # data really written, then the "crash"
            self.inner.wait_until_finished()
            raise exc

        def wait_until_finished(self):
            self.inner.wait_until_finished()

    monkeypatch.setattr(model_io, "_checkpointer", Crashing)


@pytest.mark.parametrize("exc", [_Crash("simulated crash"), KeyboardInterrupt()],
                         ids=["error", "interrupt"])
def test_crash_in_orbax_save_keeps_previous_checkpoint(model, tmp_path, monkeypatch, exc):
    path = save_model(model, tmp_path / "ckpt")
    _crashing_checkpointer(monkeypatch, exc)
    with pytest.raises(type(exc)):
        save_model(random_model(seed=5), path, overwrite=True)
    monkeypatch.undo()
    assert leftovers(tmp_path, {"ckpt"}) == []
    assert_same_model(restore_model(path), model)


def test_crash_writing_manifest_keeps_previous_checkpoint(model, tmp_path, monkeypatch):
    path = save_model(model, tmp_path / "ckpt")
    real_write = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name == model_io.MANIFEST:
            real_write(self, "{\"format\": \"jax-cca-m")   # half written, then the crash
            raise _Crash("simulated crash while writing the manifest")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(_Crash):
        save_model(random_model(seed=6), path, overwrite=True)
    monkeypatch.undo()
    assert leftovers(tmp_path, {"ckpt"}) == []
    assert_same_model(restore_model(path), model)


def test_crash_during_the_final_rename_restores_the_old_checkpoint(model, tmp_path, monkeypatch):
    path = save_model(model, tmp_path / "ckpt")
    real_rename = os.rename
    calls = []

    def rename(src, dst):
        # Only the rename of the finished temp dir onto the final name fails (orbax renames
        # its own temp dirs inside it with the same os.rename).
        if Path(dst) == path and Path(src).name.startswith(".ckpt.writing-"):
            calls.append(src)
            raise OSError("simulated failure renaming the new checkpoint into place")
        return real_rename(src, dst)

    monkeypatch.setattr(fileio.os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        save_model(random_model(seed=7), path, overwrite=True)
    monkeypatch.undo()
    assert len(calls) == 1
    assert leftovers(tmp_path, {"ckpt"}) == []
    assert_same_model(restore_model(path), model)


def test_crash_on_first_save_leaves_nothing(model, tmp_path, monkeypatch):
    _crashing_checkpointer(monkeypatch, _Crash("simulated crash"))
    with pytest.raises(_Crash):
        save_model(model, tmp_path / "ckpt")
    monkeypatch.undo()
    assert leftovers(tmp_path, set()) == []
    with pytest.raises(CheckpointError):
        restore_model(tmp_path / "ckpt")
    # A later save to the same path works.
    save_model(model, tmp_path / "ckpt")
    assert_same_model(restore_model(tmp_path / "ckpt"), model)


# ------------------------------------------------------------------------------- without torch
def test_restore_without_torch(model, saved, tmp_path):
    np.save(tmp_path / "ids.npy", np.asarray(ids()))
    np.save(tmp_path / "ref.npy", logits(model))
    script = textwrap.dedent("""
        import json, sys
        sys.modules["torch"] = None
        import numpy as np
        import jax.numpy as jnp
        from checkpoints import restore_model
        from jax_cca import CCALlama
        ids = jnp.asarray(np.load(sys.argv[2]), jnp.int32)
        ref = np.load(sys.argv[3])
        errs = []
        for m in (restore_model(sys.argv[1]), CCALlama.from_pretrained(sys.argv[1])):
            out = np.asarray(m(ids))
            errs.append(float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
                        if np.isfinite(out).all() else float("nan"))
        loaded = sorted(k for k, v in sys.modules.items()
                        if k.split(".")[0] == "torch" and v is not None)
        print(json.dumps({"shape": list(out.shape), "errs": errs, "loaded": loaded}))
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script, str(saved), str(tmp_path / "ids.npy"),
                           str(tmp_path / "ref.npy")], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["shape"] == [B, T, SMALL["vocab_size"]]
    assert all(e < 1e-6 for e in out["errs"]), out["errs"]   # NaN fails this too
    assert out["loaded"] == []


def test_package_exports():
    assert checkpoints.CheckpointError is CheckpointError
    assert issubclass(CheckpointError, Exception)
