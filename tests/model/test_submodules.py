"""CCALlama's building blocks against their transformers counterparts: rotary embeddings (default,
linear, llama3), RMSNorm, the MLP, one attention layer and one decoder layer (full attention)."""

from __future__ import annotations

import copy

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.llama import modeling_llama as hf_llama

from jax_cca import CCAConfig
from jax_cca.model import RMSNorm
from jax_cca.rope import apply_rope, inverse_frequencies, rope_cos_sin
from torch_bridge import convert_hf_llama

ROPES = {
    "default": dict(rope_theta=10000.0, rope_scaling=None),
    "linear": dict(rope_theta=10000.0, rope_scaling=dict(rope_type="linear", factor=8.0)),
    # Llama 3.1's own numbers: every band of the blend (long, medium, short wavelengths) occurs.
    "llama3_8k": dict(rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8192)),
    "llama3_32": dict(rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32)),
}


def configs(rope: str, head_dim: int):
    """(CCAConfig, transformers.LlamaConfig) of one architecture."""
    kw = copy.deepcopy(ROPES[rope])
    hf = transformers.LlamaConfig(vocab_size=101, hidden_size=2 * head_dim, intermediate_size=96,
                                  num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=1, head_dim=head_dim,
                                  max_position_embeddings=8192, **copy.deepcopy(kw))
    ours = CCAConfig(vocab_size=101, hidden_size=2 * head_dim, intermediate_size=96, num_layers=1,
                     num_heads=2, num_kv_heads=1, head_dim=head_dim,
                     max_position_embeddings=8192, **kw)
    return ours, hf


def random_positions(batch: int, length: int, high: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.integers(0, high, size=(batch, length)), axis=1)


# ------------------------------------------------------------------------------- RoPE
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("rope", list(ROPES))
def test_inverse_frequencies_match_transformers(rope, head_dim):
    ours, hf = configs(rope, head_dim)
    ref = hf_llama.LlamaRotaryEmbedding(hf).inv_freq.numpy()
    got = inverse_frequencies(ours)
    assert got.dtype == np.float32 and got.shape == ref.shape == (head_dim // 2,)
    # Elementwise: a norm-wise error would hide the small (long-wavelength) frequencies, which
    # are exactly the ones llama3 / linear scaling changes.
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=0)


def test_llama3_blend_covers_all_three_bands():
    ours, _ = configs("llama3_8k", 128)
    plain = inverse_frequencies(ours.replace(rope_scaling=None))
    scaled = inverse_frequencies(ours)
    ratio = plain / scaled
    assert np.any(np.isclose(ratio, 1.0, rtol=1e-6))       # short wavelengths kept
    assert np.any(np.isclose(ratio, 8.0, rtol=1e-6))       # long wavelengths / factor
    assert np.any((ratio > 1.01) & (ratio < 7.99))        # the smooth blend in between


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("rope", list(ROPES))
def test_cos_sin_match_transformers(rope, head_dim, rel_err):
    """cos/sin over positions up to 4095. Our inverse frequencies and HF's differ by a few float32
    ulps (numpy's and torch's powf round differently; checked above to 1e-6), and an angle of
    ~4000 rad amplifies one ulp of a frequency past 1e-5, so at long positions the angle
    computation is checked on HF's own frequencies; end to end on positions below 512."""
    ours, hf = configs(rope, head_dim)
    rotary = hf_llama.LlamaRotaryEmbedding(hf)
    x = torch.randn(2, 300, head_dim)
    long_pos = random_positions(2, 300, 4000, seed=head_dim)
    long_pos[:, -1] = 4095
    cos_ref, sin_ref = rotary(x, torch.as_tensor(long_pos))
    cos, sin = rope_cos_sin(jnp.asarray(long_pos, jnp.int32), rotary.inv_freq.numpy())
    assert cos.shape == sin.shape == (2, 300, head_dim)
    assert cos.dtype == sin.dtype == jnp.float32
    assert rel_err(cos, cos_ref.numpy()) < 1e-5
    assert rel_err(sin, sin_ref.numpy()) < 1e-5

    short_pos = random_positions(2, 300, 512, seed=head_dim + 1)
    cos_ref, sin_ref = rotary(x, torch.as_tensor(short_pos))
    cos, sin = rope_cos_sin(jnp.asarray(short_pos, jnp.int32), inverse_frequencies(ours))
    assert rel_err(cos, cos_ref.numpy()) < 1e-5
    assert rel_err(sin, sin_ref.numpy()) < 1e-5


@pytest.mark.parametrize("head_dim", [64, 128])
def test_apply_rope_matches_transformers(head_dim, rel_err):
    ours, hf = configs("llama3_32", head_dim)
    positions = random_positions(2, 37, 3000, seed=1)
    rotary = hf_llama.LlamaRotaryEmbedding(hf)
    gen = torch.Generator().manual_seed(head_dim)
    q = torch.randn(2, 37, 4, head_dim, generator=gen)   # (B, T, H, D), our layout
    k = torch.randn(2, 37, 2, head_dim, generator=gen)
    cos_ref, sin_ref = rotary(q, torch.as_tensor(positions))
    q_ref, k_ref = hf_llama.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2),
                                                 cos_ref, sin_ref)
    q_ref, k_ref = q_ref.transpose(1, 2).numpy(), k_ref.transpose(1, 2).numpy()
    cos, sin = jnp.asarray(cos_ref.numpy()), jnp.asarray(sin_ref.numpy())
    q_out = apply_rope(jnp.asarray(q.numpy()), cos, sin)
    k_out = apply_rope(jnp.asarray(k.numpy()), cos, sin)
    assert rel_err(q_out, q_ref) < 1e-6
    assert rel_err(k_out, k_ref) < 1e-6
    # bf16 inputs stay bf16 and stay close.
    q_bf16 = apply_rope(jnp.asarray(q.numpy()).astype(jnp.bfloat16), cos, sin)
    assert q_bf16.dtype == jnp.bfloat16
    assert rel_err(q_bf16.astype(jnp.float32), q_ref) < 2e-2


# ------------------------------------------------------------------------------- RMSNorm
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rmsnorm_matches_transformers(dtype, rel_err):
    dim, eps = 96, 1e-5
    gen = torch.Generator().manual_seed(7)
    weight = 0.5 + torch.rand(dim, generator=gen)
    x = 3.0 * torch.randn(2, 33, dim, generator=gen) + 0.5
    ref_norm = hf_llama.LlamaRMSNorm(dim, eps=eps)
    with torch.no_grad():
        ref_norm.weight.copy_(weight)
        ref = ref_norm(x).numpy()           # float32 reference
    jdt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    norm = RMSNorm(dim, eps=eps, dtype=jdt)
    norm.weight[...] = jnp.asarray(weight.numpy(), jdt)
    out = norm(jnp.asarray(x.numpy(), jdt))
    assert out.dtype == jdt
    tol = 1e-6 if dtype == "float32" else 2e-2
    assert rel_err(out.astype(jnp.float32), ref) < tol
    # The weight is applied (not left at ones) and eps is the one given.
    assert rel_err(out.astype(jnp.float32), ref / weight.numpy()) > 0.1
    tiny = 1e-3 * jnp.asarray(x.numpy()[:1, :1], jnp.float32)
    big_eps = RMSNorm(dim, eps=1.0, dtype=jnp.float32)
    assert rel_err(big_eps(tiny), np.asarray(tiny) / np.sqrt(1.0)) < 1e-3


# ------------------------------------------------------------------------------- layers
LAYER_CONFIGS = {
    "gqa_d64": dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64),
    "gqa_d128_bias": dict(hidden_size=96, num_attention_heads=4, num_key_value_heads=1,
                          head_dim=128, attention_bias=True, mlp_bias=True),
    # head_dim 16, theta 5e5, original 64: wavelengths in all three llama3 bands.
    "mha_llama3": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                       rope_theta=500000.0, rope_scaling=dict(
                           rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                           high_freq_factor=4.0, original_max_position_embeddings=64)),
}


def _layer_inputs(hf, seed: int, b: int = 2, t: int = 77):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, hf.config.hidden_size, generator=gen)
    positions = torch.arange(t)[None].expand(b, t)
    cos_sin = hf.model.rotary_emb(x, positions)
    mask = torch.full((t, t), torch.finfo(torch.float32).min).triu(1)[None, None].expand(b, 1, t, t)
    return x, positions, cos_sin, mask


@pytest.mark.parametrize("name", list(LAYER_CONFIGS))
def test_attention_and_decoder_layer_match_transformers(name, make_hf_llama, rel_err):
    hf, _ = make_hf_llama(seed=5, save=False, num_hidden_layers=1,
                          **copy.deepcopy(LAYER_CONFIGS[name]))
    model = convert_hf_llama(hf)
    x, positions, cos_sin, mask = _layer_inputs(hf, seed=len(name))
    cos, sin = rope_cos_sin(jnp.asarray(positions.numpy(), jnp.int32),
                            inverse_frequencies(model.config))
    xj = jnp.asarray(x.numpy())
    hf_layer = hf.model.layers[0]
    with torch.no_grad():
        attn_ref, _ = hf_layer.self_attn(x, position_embeddings=cos_sin, attention_mask=mask)
        mlp_ref = hf_layer.mlp(x)
        layer_ref = hf_layer(x, attention_mask=mask, position_ids=positions,
                             position_embeddings=cos_sin)
    layer = model.layers[0]
    assert rel_err(layer.self_attn(xj, cos, sin), attn_ref.numpy()) < 1e-5
    assert rel_err(layer.mlp(xj), mlp_ref.numpy()) < 1e-5
    assert rel_err(layer(xj, cos, sin), layer_ref.numpy()) < 1e-5
    # Causality: changing the last token changes no earlier output.
    x2 = xj.at[:, -1].set(-xj[:, -1])
    np.testing.assert_array_equal(np.asarray(layer.self_attn(x2, cos, sin))[:, :-1],
                                  np.asarray(layer.self_attn(xj, cos, sin))[:, :-1])
