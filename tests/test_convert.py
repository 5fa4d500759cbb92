"""torch_bridge loading: clear errors for broken Hugging Face directories, .bin checkpoints,
loading without torch, and the numpy safetensors reader/writer against the reference library."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx

from jax_cca import CCALlama
from torch_bridge import convert_hf_llama, export_hf_llama
from torch_bridge.safetensors_io import (
    SafetensorsError,
    read_header,
    read_safetensors,
    write_safetensors,
)

REPO = Path(__file__).resolve().parents[1]


def params(model) -> dict:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_params(a, b):
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert pa[k].dtype == pb[k].dtype, k
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=str(k))


@pytest.fixture
def hf_dir(make_hf_llama):
    """(hf model, a saved single-file safetensors directory)."""
    return make_hf_llama(seed=123)


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_tensors(directory: Path, edit) -> None:
    """Apply ``edit(dict name -> array)`` to model.safetensors (written with the safetensors
    library, not ours, so the loader is tested on files it did not write)."""
    from safetensors.torch import load_file, save_file

    f = directory / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


# ------------------------------------------------------------------------------- directory errors
def test_missing_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        CCALlama.from_pretrained(missing)
    with pytest.raises(FileNotFoundError, match="nope"):
        convert_hf_llama(str(missing))


def test_missing_config_json(hf_dir, tmp_path):
    d = copy_dir(hf_dir[1], tmp_path / "m")
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        CCALlama.from_pretrained(d)


def test_invalid_config_json(hf_dir, tmp_path):
    d = copy_dir(hf_dir[1], tmp_path / "m")
    (d / "config.json").write_text('{"hidden_size": 64,')
    with pytest.raises(ValueError, match="config.json"):
        CCALlama.from_pretrained(d)


def test_no_weight_files(hf_dir, tmp_path):
    d = copy_dir(hf_dir[1], tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no LLaMA weights"):
        CCALlama.from_pretrained(d)


def test_convert_rejects_other_objects():
    with pytest.raises(TypeError, match="directory path or a transformers LlamaForCausalLM"):
        convert_hf_llama(42)


@pytest.fixture
def sharded_dir(hf_dir, tmp_path):
    model = CCALlama.from_pretrained(hf_dir[1])
    d = tmp_path / "sharded"
    export_hf_llama(model, d, max_shard_bytes=100_000)
    assert len(list(d.glob("model-*-of-*.safetensors"))) >= 3
    return model, d


def test_shard_index_naming_a_missing_shard(sharded_dir):
    _, d = sharded_dir
    victim = sorted(d.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        CCALlama.from_pretrained(d)


def test_corrupt_shard_index(sharded_dir):
    _, d = sharded_dir
    (d / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match="shard index"):
        CCALlama.from_pretrained(d)


def test_sharded_directory_loads(sharded_dir):
    model, d = sharded_dir
    assert_same_params(CCALlama.from_pretrained(d), model)


@pytest.mark.parametrize("cut", ["half", "last_bytes", "header"])
def test_truncated_safetensors(hf_dir, tmp_path, cut):
    d = copy_dir(hf_dir[1], tmp_path / "m")
    f = d / "model.safetensors"
    data = f.read_bytes()
    keep = {"half": len(data) // 2, "last_bytes": len(data) - 3, "header": 100}[cut]
    f.write_bytes(data[:keep])
    with pytest.raises(SafetensorsError, match="truncated") as info:
        CCALlama.from_pretrained(d)
    assert str(f) in str(info.value)


def test_truncated_shard(sharded_dir):
    _, d = sharded_dir
    f = sorted(d.glob("model-*.safetensors"))[-1]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(SafetensorsError, match="truncated"):
        CCALlama.from_pretrained(d)


def test_shape_mismatch_lists_the_tensors(hf_dir, tmp_path):
    d = copy_dir(hf_dir[1], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["hidden_size"] = 96          # head_dim stays explicit (16): only hidden-size shapes change
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape mismatch") as info:
        CCALlama.from_pretrained(d)
    msg = str(info.value)
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.1.mlp.down_proj.weight", "model.norm.weight", "lm_head.weight"):
        assert repr(name) in msg, name
    assert "(211, 64)" in msg and "(211, 96)" in msg


def test_unexpected_extra_tensor(hf_dir, tmp_path):
    d = copy_dir(hf_dir[1], tmp_path / "m")

    def edit(t):
        t["model.layers.0.mlp.extra_proj.weight"] = torch.randn(3, 3)
        t["model.layers.7.mlp.up_proj.weight"] = torch.randn(160, 64)   # only 2 layers
    rewrite_tensors(d, edit)
    with pytest.raises(ValueError, match="unexpected tensor") as info:
        CCALlama.from_pretrained(d)
    assert "model.layers.0.mlp.extra_proj.weight" in str(info.value)
    assert "model.layers.7.mlp.up_proj.weight" in str(info.value)


def test_rotary_inv_freq_buffers_are_ignored(hf_dir, tmp_path):
    """Old checkpoints store the derived inv_freq buffer: not an error."""
    d = copy_dir(hf_dir[1], tmp_path / "m")
    rewrite_tensors(d, lambda t: t.update({
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.rand(8)}))
    assert_same_params(CCALlama.from_pretrained(d), CCALlama.from_pretrained(hf_dir[1]))


@pytest.mark.parametrize("victims", [
    ["model.layers.1.mlp.down_proj.weight"],
    ["lm_head.weight"],
    ["model.norm.weight", "model.layers.0.input_layernorm.weight"],
])
def test_missing_tensor(hf_dir, tmp_path, victims):
    d = copy_dir(hf_dir[1], tmp_path / "m")
    rewrite_tensors(d, lambda t: [t.pop(v) for v in victims])
    with pytest.raises(ValueError, match="missing tensor") as info:
        CCALlama.from_pretrained(d)
    for v in victims:
        assert repr(v) in str(info.value)


def test_all_problems_reported_together(hf_dir, tmp_path):
    d = copy_dir(hf_dir[1], tmp_path / "m")

    def edit(t):
        t.pop("model.layers.0.self_attn.k_proj.weight")
        t["model.layers.1.self_attn.v_proj.weight"] = torch.randn(5, 64)
        t["something.else"] = torch.randn(2)
    rewrite_tensors(d, edit)
    with pytest.raises(ValueError) as info:
        CCALlama.from_pretrained(d)
    msg = str(info.value)
    assert "missing tensor 'model.layers.0.self_attn.k_proj.weight'" in msg
    assert "shape mismatch for 'model.layers.1.self_attn.v_proj.weight'" in msg
    assert "unexpected tensor 'something.else'" in msg


def test_tied_checkpoint_with_a_stored_lm_head_copy(make_hf_llama, tmp_path):
    hf, directory = make_hf_llama(seed=9, tie_word_embeddings=True)
    d = copy_dir(directory, tmp_path / "m")
    rewrite_tensors(d, lambda t: t.update(
        {"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    model = CCALlama.from_pretrained(d)
    assert model.config.tie_word_embeddings
    assert_same_params(model, CCALlama.from_pretrained(directory))


# ------------------------------------------------------------------------------- .bin checkpoints
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pytorch_bin_checkpoint(make_hf_llama, tmp_path, dtype):
    hf, directory = make_hf_llama(seed=77, torch_dtype=dtype, attention_bias=True)
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(directory / "config.json", d / "config.json")
    torch.save(hf.state_dict(), d / "pytorch_model.bin")
    model = CCALlama.from_pretrained(d)
    assert_same_params(model, CCALlama.from_pretrained(directory))
    assert model.config.dtype == {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]


def test_sharded_pytorch_bin_checkpoint(hf_dir, tmp_path):
    hf, directory = hf_dir
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(directory / "config.json", d / "config.json")
    state = hf.state_dict()
    names = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2],
              "pytorch_model-00002-of-00002.bin": names[1::2]}
    weight_map = {}
    for fname, keys in halves.items():
        torch.save({k: state[k] for k in keys}, d / fname)
        weight_map.update({k: fname for k in keys})
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_same_params(CCALlama.from_pretrained(d), CCALlama.from_pretrained(directory))


# ------------------------------------------------------------------------------- without torch
NO_TORCH_SCRIPT = textwrap.dedent("""
    import builtins, json, sys
    if sys.argv[1] == "blocked":
        sys.modules["torch"] = None   # any `import torch` now raises ImportError
    attempts = []
    _import = builtins.__import__
    def spy(name, *args, **kwargs):
        if name.split(".")[0] == "torch":
            attempts.append(name)
        return _import(name, *args, **kwargs)
    builtins.__import__ = spy

    import numpy as np
    import jax.numpy as jnp
    from jax_cca import CCALlama

    model = CCALlama.from_pretrained(sys.argv[2])
    ids = np.load(sys.argv[3])
    logits = np.asarray(model(jnp.asarray(ids, jnp.int32)))
    ref = np.load(sys.argv[4])
    err = float(np.linalg.norm(logits - ref) / np.linalg.norm(ref))
    loaded = sorted(k for k, v in sys.modules.items()
                    if k.split(".")[0] == "torch" and v is not None)
    finite = bool(np.isfinite(logits).all())
    print(json.dumps({"shape": list(logits.shape), "err": err, "finite": finite,
                      "attempts": attempts, "loaded": loaded}))
""")


def run_script(script: str, *args) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["blocked", "available"])
def test_from_pretrained_safetensors_needs_no_torch(hf_dir, tmp_path, random_ids, torch_logits,
                                                    mode):
    hf, directory = hf_dir
    ids = random_ids(2, 37, hf.config.vocab_size, seed=5)
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "ref.npy", torch_logits(hf, ids))
    out = run_script(NO_TORCH_SCRIPT, mode, directory, tmp_path / "ids.npy", tmp_path / "ref.npy")
    assert out["shape"] == [2, 37, hf.config.vocab_size]
    assert out["finite"] and out["err"] < 1e-4
    assert out["loaded"] == [], f"torch was imported: {out['loaded']}"
    assert out["attempts"] == [], f"something tried to import torch: {out['attempts']}"


def test_bin_without_torch_says_what_is_needed(hf_dir, tmp_path):
    hf, directory = hf_dir
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(directory / "config.json", d / "config.json")
    torch.save(hf.state_dict(), d / "pytorch_model.bin")
    script = textwrap.dedent("""
        import json, sys
        sys.modules["torch"] = None
        from jax_cca import CCALlama
        try:
            CCALlama.from_pretrained(sys.argv[1])
        except ImportError as e:
            print(json.dumps({"error": str(e)}))
        else:
            print(json.dumps({"error": None}))
    """)
    out = run_script(script, d)
    assert out["error"] and "torch" in out["error"] and "pytorch_model.bin" in out["error"]


# ------------------------------------------------------------------------------- safetensors_io
def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "bf16": rng.standard_normal((4, 7)).astype(ml_dtypes.bfloat16),
        "f16": rng.standard_normal((2, 3, 4)).astype(np.float16),
        "i32": rng.integers(-2**31, 2**31 - 1, size=(11,), dtype=np.int32),
        "i64": rng.integers(-2**62, 2**62, size=(2, 2), dtype=np.int64),
        "u8": rng.integers(0, 256, size=(9,), dtype=np.uint8),
        "bool": rng.integers(0, 2, size=(5,)).astype(bool),
        "f64": rng.standard_normal((3,)),
        "empty_f32": np.zeros((0,), np.float32),
        "empty_2d_bf16": np.zeros((3, 0), ml_dtypes.bfloat16),
        "scalar_f32": np.array(rng.standard_normal(), np.float32),
        "scalar_i32": np.array(-7, np.int32),
        "non_contiguous": rng.standard_normal((6, 4)).astype(np.float32).T,
    }


def assert_arrays_equal(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype, (k, got[k].dtype, v.dtype)
        assert got[k].shape == v.shape, (k, got[k].shape, v.shape)
        assert np.asarray(got[k]).tobytes() == v.tobytes(), k   # bitwise, C order
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_safetensors_round_trip(tmp_path):
    arrays = _arrays()
    f = tmp_path / "x.safetensors"
    write_safetensors(f, arrays, metadata={"note": "hi"})
    assert not (tmp_path / "x.safetensors.tmp").exists()
    assert_arrays_equal(read_safetensors(f), arrays)
    header, data_start = read_header(f)
    assert data_start % 8 == 0
    assert header["scalar_f32"]["shape"] == [] and header["empty_f32"]["shape"] == [0]


def test_safetensors_files_we_write_load_in_the_reference_library(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    arrays = _arrays(1)
    f = tmp_path / "x.safetensors"
    write_safetensors(f, arrays)
    with safe_open(str(f), framework="pt") as sf:
        assert sf.metadata() == {"format": "pt"}
    loaded = load_file(f)
    for k, v in arrays.items():
        t = loaded[k]
        assert tuple(t.shape) == v.shape, k
        if v.dtype == ml_dtypes.bfloat16:
            assert t.dtype == torch.bfloat16
            got = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            got = t.numpy()
        assert got.dtype == v.dtype, k
        np.testing.assert_array_equal(got, v, err_msg=k)


def test_reference_library_files_load_with_numpy_reader(tmp_path):
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(3)
    tensors = {
        "a": torch.randn(5, 3, generator=gen),
        "b": torch.randn(4, 2, generator=gen).to(torch.bfloat16),
        "c": torch.randn(7, generator=gen).to(torch.float16),
        "d": torch.randint(-100, 100, (3, 3), generator=gen, dtype=torch.int32),
        "e": torch.zeros(0, 4),
        "s": torch.tensor(2.5),
    }
    f = tmp_path / "ref.safetensors"
    save_file(tensors, f)
    got = read_safetensors(f)
    assert sorted(got) == sorted(tensors)
    for k, t in tensors.items():
        assert got[k].shape == tuple(t.shape), k
        if t.dtype == torch.bfloat16:
            assert got[k].dtype == ml_dtypes.bfloat16
            np.testing.assert_array_equal(got[k].view(np.int16), t.view(torch.int16).numpy())
        else:
            np.testing.assert_array_equal(got[k], t.numpy(), err_msg=k)


def test_safetensors_rejects_damaged_files(tmp_path):
    f = tmp_path / "x.safetensors"
    write_safetensors(f, {"w": np.arange(64, dtype=np.float32)})
    good = f.read_bytes()

    f.write_bytes(good[:5])
    with pytest.raises(SafetensorsError, match="too short"):
        read_safetensors(f)
    f.write_bytes((2**40).to_bytes(8, "little") + good[8:])
    with pytest.raises(SafetensorsError, match="truncated"):
        read_safetensors(f)
    n = int.from_bytes(good[:8], "little")
    f.write_bytes(good[:8] + b"{" * n + good[8 + n:])
    with pytest.raises(SafetensorsError, match="not valid JSON"):
        read_safetensors(f)
    header = json.dumps({"w": {"dtype": "C64", "shape": [2], "data_offsets": [0, 16]}}).encode()
    f.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    with pytest.raises(SafetensorsError, match="unsupported dtype"):
        read_safetensors(f)
    header = json.dumps({"w": {"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}}).encode()
    f.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    with pytest.raises(SafetensorsError, match="wrong size"):
        read_safetensors(f)
    with pytest.raises(SafetensorsError, match="complex64"):
        write_safetensors(tmp_path / "y.safetensors", {"z": np.zeros(2, np.complex64)})


@pytest.mark.parametrize("header", [
    {"w": [1, 2]},                                                        # entry not an object
    {"w": {"dtype": "F32", "shape": [4]}},                               # no data_offsets
    [1, 2, 3],                                                            # header not an object
    {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [4, 0]}},      # negative size
    {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]},       # overlapping tensors
     "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}},
], ids=["entry-not-object", "no-offsets", "header-not-object", "negative-size", "overlap"])
def test_malformed_safetensors_header(tmp_path, header):
    f = tmp_path / "bad.safetensors"
    blob = json.dumps(header).encode()
    f.write_bytes(len(blob).to_bytes(8, "little") + blob + bytes(16))
    with pytest.raises(SafetensorsError):
        read_safetensors(f)
