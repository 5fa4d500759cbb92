"""CCALlama against transformers' LlamaForCausalLM: logits parity, both loading paths, bf16, HF
round trips (plain and sharded) and the attention switch.

Every model is a tiny random LLaMA from the ``make_hf_llama`` fixture (all weights redrawn, norms
included); inputs are batch 2, length 77 (not a multiple of any group size used here).
"""

from __future__ import annotations

import copy
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jax_cca import CCALlama
from jax_cca.rope import inverse_frequencies
from torch_bridge import convert_hf_llama, export_hf_llama

B, T = 2, 77
FP32_TOL = 1e-4
BF16_TOL = 2e-2

# original_max_position_embeddings = 64 < T: with head_dim 16 and theta 5e5 the wavelengths
# (6.3, 32.5, 168, ...) fall in all three llama3 bands (short < 16 <= medium <= 64 < long).
LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=64)

# name -> LlamaConfig overrides of conftest.TINY_LLAMA (deep-copied before use: LlamaConfig
# mutates the rope dicts it is given).
CONFIGS = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa_8q_2kv": dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=2),
    "llama3_rope": dict(rope_theta=500000.0, rope_scaling=LLAMA3_SCALING),
    "linear_rope": dict(rope_scaling=dict(rope_type="linear", factor=4.0)),
    "tied": dict(tie_word_embeddings=True),
    "biases": dict(attention_bias=True, mlp_bias=True),
    "head_dim_64": dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64),
    "head_dim_128": dict(hidden_size=96, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=128),
}


def config(name: str) -> dict:
    return copy.deepcopy(CONFIGS[name])


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, positions):
    return nnx.merge(graphdef, state)(ids, positions)


def jax_logits(model, ids, positions=None) -> np.ndarray:
    """Logits as float32 numpy, through one jitted forward per config."""
    out = _forward(*nnx.split(model), jnp.asarray(ids, jnp.int32),
                   None if positions is None else jnp.asarray(positions, jnp.int32))
    assert out.shape == (*ids.shape, model.config.vocab_size)
    return np.asarray(out.astype(jnp.float32))


def params(model) -> dict:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_params(a, b):
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert pa[k].dtype == pb[k].dtype, k
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=str(k))


def assert_state_dicts_equal(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, (name, got[name].dtype, tensor.dtype)
        assert got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), f"{name} differs after the round trip"


# ------------------------------------------------------------------------------- fp32 parity
@pytest.mark.parametrize("path", ["from_pretrained", "convert_live"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp32_logits_match_transformers(name, path, make_hf_llama, random_ids, rel_err,
                                        torch_logits):
    hf, directory = make_hf_llama(seed=len(name), save=path == "from_pretrained", **config(name))
    ids = random_ids(B, T, hf.config.vocab_size, seed=len(name))
    ref = torch_logits(hf, ids)
    model = CCALlama.from_pretrained(directory) if path == "from_pretrained" else (
        convert_hf_llama(hf))
    assert model.config.attention == "full"
    assert model.config.dtype == "float32"
    assert model.config.head_dim == hf.config.head_dim
    assert model.config.num_kv_heads == hf.config.num_key_value_heads
    err = rel_err(jax_logits(model, ids), ref)
    assert err < FP32_TOL, f"{name}/{path}: rel err {err:.3g}"


def test_convert_accepts_a_directory_too(make_hf_llama, random_ids, rel_err, torch_logits):
    hf, directory = make_hf_llama(seed=3, **config("gqa_8q_2kv"))
    ids = random_ids(B, T, hf.config.vocab_size, seed=3)
    model = convert_hf_llama(str(directory))
    assert_same_params(model, convert_hf_llama(hf))
    assert rel_err(jax_logits(model, ids), torch_logits(hf, ids)) < FP32_TOL


def test_rope_scaling_is_active_at_the_tested_length():
    """The llama3 / linear configs must actually change the frequencies used at T = 77 (every
    llama3 band included), else the parity tests above would not test the scaling."""
    from jax_cca import CCAConfig

    base = CCAConfig(vocab_size=211, hidden_size=64, intermediate_size=160, num_layers=2,
                     num_heads=4, num_kv_heads=2, rope_theta=500000.0)
    plain = inverse_frequencies(base)
    scaled = inverse_frequencies(base.replace(rope_scaling=dict(LLAMA3_SCALING)))
    ratio = plain / scaled
    assert np.any(np.isclose(ratio, 1.0, rtol=1e-6))       # short wavelengths kept
    assert np.any(np.isclose(ratio, 8.0, rtol=1e-6))       # long wavelengths / factor
    assert np.any((ratio > 1.01) & (ratio < 7.99))        # the smooth blend in between
    # Changed frequencies rotate by a visibly different angle within the tested positions.
    assert np.max(np.abs(plain - scaled)) * (T - 1) > 0.1
    linear = inverse_frequencies(base.replace(rope_scaling=dict(rope_type="linear", factor=4.0)))
    np.testing.assert_allclose(linear, plain / 4, rtol=1e-6)


def test_explicit_positions_match_transformers(make_hf_llama, random_ids, rel_err):
    """Explicit per-row positions with gaps (RoPE is relative, so a plain offset would change
    nothing) go through RoPE like HF's position_ids; positions reach ~2000, far beyond the llama3
    original_max_position_embeddings of 32."""
    hf, _ = make_hf_llama(seed=11, save=False, rope_theta=500000.0,
                          rope_scaling=dict(LLAMA3_SCALING))
    ids = random_ids(B, T, hf.config.vocab_size, seed=11)
    steps = np.random.default_rng(11).integers(1, 50, size=(B, T))
    positions = np.cumsum(steps, axis=1) + np.array([[0], [7]])
    # An explicit all-ones mask: without it transformers reads gapped position_ids as packed
    # sequences and masks across them.
    with torch.no_grad():
        ref = hf(input_ids=torch.as_tensor(ids), position_ids=torch.as_tensor(positions),
                 attention_mask=torch.ones(B, T, dtype=torch.long), use_cache=False).logits.numpy()
    model = convert_hf_llama(hf)
    out = jax_logits(model, ids, positions)
    assert rel_err(out, ref) < FP32_TOL
    # The offsets matter (otherwise the check above would be vacuous).
    assert rel_err(jax_logits(model, ids), ref) > 1e-2


# ------------------------------------------------------------------------------- bf16
@pytest.mark.parametrize("name", ["gqa_8q_2kv", "llama3_rope", "tied", "head_dim_128"])
def test_bf16_model_close_to_fp32_transformers(name, make_hf_llama, random_ids, rel_err,
                                               torch_logits):
    hf, directory = make_hf_llama(seed=20 + len(name), **config(name))
    ids = random_ids(B, T, hf.config.vocab_size, seed=20)
    model = CCALlama.from_pretrained(directory, dtype=jnp.bfloat16)
    assert model.config.dtype == "bfloat16"
    assert all(v.dtype == jnp.bfloat16 for v in params(model).values())
    out = _forward(*nnx.split(model), jnp.asarray(ids, jnp.int32), None)
    assert out.dtype == jnp.bfloat16
    err = rel_err(np.asarray(out.astype(jnp.float32)), torch_logits(hf, ids))
    assert err < BF16_TOL, f"{name}: bf16 rel err {err:.3g}"


def test_bf16_saved_checkpoint_loads_as_bf16(make_hf_llama, random_ids, rel_err, torch_logits):
    """A bf16 HF directory loads in bf16 by default; with dtype=float32 it holds exactly the bf16
    weights and matches the fp32 evaluation of those weights to fp32 accuracy."""
    hf, directory = make_hf_llama(seed=31, torch_dtype=torch.bfloat16, **config("gqa_8q_2kv"))
    ids = random_ids(B, T, hf.config.vocab_size, seed=31)
    # fp32 evaluation of the bf16 weights. (Not hf.float(): .to(bf16) also rounded HF's rotary
    # inv_freq buffer, which .float() cannot undo.)
    hf32 = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32)
    hf32.config._attn_implementation = "eager"
    hf32.eval()
    ref = torch_logits(hf32, ids)

    model = CCALlama.from_pretrained(directory)
    assert model.config.dtype == "bfloat16"
    assert all(v.dtype == jnp.bfloat16 for v in params(model).values())
    assert rel_err(jax_logits(model, ids), ref) < BF16_TOL

    model32 = CCALlama.from_pretrained(directory, dtype=jnp.float32)
    sd = hf.state_dict()
    p32 = params(model32)
    np.testing.assert_array_equal(p32[("embed_tokens", "embedding")],
                                  sd["model.embed_tokens.weight"].float().numpy())
    np.testing.assert_array_equal(p32[("layers", 1, "self_attn", "k_proj", "kernel")],
                                  sd["model.layers.1.self_attn.k_proj.weight"].float().numpy().T)
    assert rel_err(jax_logits(model32, ids), ref) < FP32_TOL


def test_convert_live_bf16_model(make_hf_llama):
    """bf16 tensors of a live model cross into JAX bit for bit."""
    hf, directory = make_hf_llama(seed=33, torch_dtype=torch.bfloat16, **config("biases"))
    from_dir = CCALlama.from_pretrained(directory)
    assert_same_params(convert_hf_llama(hf, dtype=jnp.bfloat16), from_dir)
    loaded = transformers.LlamaForCausalLM.from_pretrained(directory)  # config.dtype is set
    assert loaded.dtype == torch.bfloat16
    assert_same_params(convert_hf_llama(loaded), from_dir)


# ------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("name", ["gqa_8q_2kv", "llama3_rope", "linear_rope", "tied", "biases",
                                  "head_dim_128"])
def test_save_pretrained_round_trip_is_bitwise(name, make_hf_llama, random_ids, tmp_path,
                                               torch_logits):
    hf, directory = make_hf_llama(seed=40 + len(name), **config(name))
    model = CCALlama.from_pretrained(directory)
    out_dir = tmp_path / "exported"
    model.save_pretrained(out_dir)
    assert (out_dir / "config.json").is_file() and (out_dir / "model.safetensors").is_file()

    back = transformers.LlamaForCausalLM.from_pretrained(out_dir)
    back.eval()
    assert_state_dicts_equal(back.state_dict(), hf.state_dict())
    # The exported config describes the same architecture: identical HF logits.
    for key in ("num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size",
                "intermediate_size", "num_hidden_layers", "vocab_size", "rms_norm_eps",
                "tie_word_embeddings", "attention_bias", "mlp_bias", "max_position_embeddings"):
        assert getattr(back.config, key) == getattr(hf.config, key), key
    assert back.config.rope_parameters == hf.config.rope_parameters
    back.config._attn_implementation = "eager"
    ids = random_ids(B, T, hf.config.vocab_size, seed=41)
    np.testing.assert_array_equal(torch_logits(back, ids), torch_logits(hf, ids))


def test_save_pretrained_round_trip_bf16(make_hf_llama, tmp_path):
    hf, directory = make_hf_llama(seed=50, torch_dtype=torch.bfloat16, **config("biases"))
    model = CCALlama.from_pretrained(directory)
    out_dir = tmp_path / "exported"
    model.save_pretrained(out_dir)
    exported = json.loads((out_dir / "config.json").read_text())
    assert exported.get("dtype", exported.get("torch_dtype")) == "bfloat16"
    back = transformers.LlamaForCausalLM.from_pretrained(out_dir, dtype="auto")
    assert back.dtype == torch.bfloat16
    assert_state_dicts_equal(back.state_dict(), hf.state_dict())
    # And loading the export back into JAX gives the same parameters.
    assert_same_params(CCALlama.from_pretrained(out_dir), model)


def test_save_pretrained_refuses_to_overwrite(make_hf_llama, tmp_path):
    hf, directory = make_hf_llama(seed=51, save=True)
    model = CCALlama.from_pretrained(directory)
    out_dir = tmp_path / "exported"
    model.save_pretrained(out_dir)
    before = (out_dir / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError):
        model.save_pretrained(out_dir)
    assert (out_dir / "model.safetensors").read_bytes() == before
    model.save_pretrained(out_dir, overwrite=True)
    assert (out_dir / "model.safetensors").read_bytes() == before


def test_sharded_export(make_hf_llama, random_ids, tmp_path, torch_logits):
    hf, directory = make_hf_llama(seed=60, **config("gqa_8q_2kv"))
    model = CCALlama.from_pretrained(directory)
    total = sum(v.nbytes for v in params(model).values())
    out_dir = tmp_path / "sharded"
    export_hf_llama(model, out_dir, max_shard_bytes=total // 5)

    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    shard_files = sorted(p.name for p in out_dir.glob("*.safetensors"))
    n = len(shard_files)
    assert n >= 5
    assert shard_files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (out_dir / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == shard_files
    assert sorted(index["weight_map"]) == sorted(hf.state_dict())
    assert index["metadata"]["total_size"] == total

    back = transformers.LlamaForCausalLM.from_pretrained(out_dir)
    back.eval()
    assert_state_dicts_equal(back.state_dict(), hf.state_dict())

    again = CCALlama.from_pretrained(out_dir)
    assert_same_params(again, model)
    ids = random_ids(B, T, hf.config.vocab_size, seed=60)
    np.testing.assert_array_equal(jax_logits(again, ids), jax_logits(model, ids))


def test_overwriting_a_sharded_export_replaces_the_weights(make_hf_llama, tmp_path):
    hf, directory = make_hf_llama(seed=61)
    old = CCALlama.from_pretrained(directory)
    new = CCALlama.from_pretrained(make_hf_llama(seed=62)[1])
    out_dir = tmp_path / "export"
    export_hf_llama(old, out_dir, max_shard_bytes=100_000)
    export_hf_llama(new, out_dir, overwrite=True)          # one file this time
    assert_same_params(CCALlama.from_pretrained(out_dir), new)


# ------------------------------------------------------------------------------- attention switch
def test_cca_with_a_window_covering_everything_equals_full(make_hf_llama, random_ids, rel_err):
    g = 4
    w = ((T + g + g - 1) // g) * g  # multiple of g, >= T + g
    hf, directory = make_hf_llama(seed=70, **config("gqa_8q_2kv"))
    ids = random_ids(B, T, hf.config.vocab_size, seed=70)
    full = CCALlama.from_pretrained(directory)
    cca = CCALlama.from_pretrained(directory, attention="cca", group_size=g, local_window=w)
    assert (cca.config.attention, cca.config.group_size, cca.config.local_window) == ("cca", g, w)
    ref = jax_logits(full, ids)
    assert rel_err(jax_logits(cca, ids), ref) < 1e-5
    # A small window really switches the attention (core tokens replace far raw tokens).
    small = CCALlama.from_pretrained(directory, attention="cca", group_size=4, local_window=8)
    err = rel_err(jax_logits(small, ids), ref)
    assert err > 1e-2, f"attention='cca' with w=8 gave the full-attention logits (err {err:.2g})"
    # with_attention swaps the attention on the same weights.
    switched = full.with_attention(attention="cca", group_size=4, local_window=8)
    np.testing.assert_array_equal(jax_logits(switched, ids), jax_logits(small, ids))
    # The first w tokens see only raw tokens: identical to full attention there.
    assert rel_err(jax_logits(small, ids)[:, :8], ref[:, :8]) < 1e-5
