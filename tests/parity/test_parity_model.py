"""patch_llama: a transformers LlamaForCausalLM computing CCA equals CCALlama(attention="cca") on
the same weights, forward (logits, float32 rel err < 1e-4) and backward (every parameter's
gradient against JAX autodiff of CCALlama, and Triton against the torch reference).

Models are tiny random LLaMAs (``make_hf_llama`` in tests/conftest.py: every weight redrawn, norms
included): hidden 64, 2 layers, GQA 4/2 (head dim 16), vocab 128; and a head-dim-64 variant.
Inputs: batch 2, length 77 (not a multiple of g = 8), w = 16, so boundary rows and several
core tokens per query occur.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tests.parity import harness

B, T, G, W = 2, 77, 8, 16
FP32_TOL = 1e-4
CONFIGS = {
    "gqa_4x2_d16": dict(vocab_size=128),
    "gqa_2x1_d64": dict(vocab_size=128, hidden_size=128, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=64),
}


def _device_ids(ids: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(ids).to(harness.torch_device())


def _poisoned(impl: str):
    import contextlib

    return harness.triton_kernels().poison_outputs() if impl == "triton" else (
        contextlib.nullcontext())


def _jax_model(directory):
    from jax_cca import CCALlama

    return CCALlama.from_pretrained(directory, attention="cca", group_size=G, local_window=W)


def _jax_logits(model, ids) -> np.ndarray:
    import jax.numpy as jnp

    return np.asarray(model(jnp.asarray(ids, jnp.int32)).astype(jnp.float32))


def _jax_loss_and_grads(model, ids) -> tuple[float, dict]:
    """Mean next-token cross entropy (as transformers computes it with labels=ids) and its
    gradient for every parameter, keyed by NNX path."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ids = jnp.asarray(ids, jnp.int32)

    def loss_fn(params):
        logits = nnx.merge(graphdef, params, rest)(ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    return float(loss), {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_patched_logits_match_cca_llama(name, impl, make_hf_llama, random_ids, rel_err):
    from torch_bridge import patch_llama

    hf, directory = make_hf_llama(seed=len(name), **CONFIGS[name])
    ids = random_ids(B, T, hf.config.vocab_size, seed=len(name))
    want = _jax_logits(_jax_model(directory), ids)
    patch_llama(hf, group_size=G, local_window=W, implementation=impl).to(harness.torch_device())
    with torch.no_grad(), _poisoned(impl):
        got = hf(input_ids=_device_ids(ids)).logits.float().cpu().numpy()
    err = rel_err(got, want)
    assert err < FP32_TOL, f"{name}/{impl}: rel err {err:.3g}"


def test_patched_backward_matches_jax_and_reference(make_hf_llama, random_ids, rel_err):
    """loss.backward() through the patched model: finite gradients equal to JAX autodiff of
    CCALlama for every parameter, with the Triton kernels and with the torch reference."""
    from torch_bridge import patch_llama
    from torch_bridge.convert import hf_to_nnx_path

    hf, directory = make_hf_llama(seed=31, **CONFIGS["gqa_4x2_d16"])
    ids = random_ids(B, T, hf.config.vocab_size, seed=31)
    want_loss, want_grads = _jax_loss_and_grads(_jax_model(directory), ids)
    grads = {}
    for impl in ("reference", "triton"):
        model = patch_llama(copy.deepcopy(hf), group_size=G, local_window=W,
                            implementation=impl).to(harness.torch_device())
        model.train()
        with _poisoned(impl):
            loss = model(input_ids=_device_ids(ids), labels=_device_ids(ids)).loss
            loss.backward()
        assert abs(loss.item() - want_loss) < 1e-4 * abs(want_loss), (impl, loss.item(), want_loss)
        grads[impl] = {n: p.grad.detach().cpu().numpy() for n, p in model.named_parameters()}
    for name, got in grads["triton"].items():
        path, transpose = hf_to_nnx_path(name)
        want = want_grads[path].T if transpose else want_grads[path]
        assert rel_err(got, want) < FP32_TOL, f"{name}: triton vs jax"
        assert rel_err(grads["reference"][name], want) < FP32_TOL, f"{name}: reference vs jax"
        assert rel_err(got, grads["reference"][name]) < 1e-5, f"{name}: triton vs reference"


def test_right_padding_gives_each_sequence_its_own_cca(make_hf_llama, random_ids, rel_err):
    """With right padding, the real tokens get exactly the CCA of the unpadded sequence."""
    from torch_bridge import patch_llama

    hf, _ = make_hf_llama(seed=8, save=False, **CONFIGS["gqa_4x2_d16"])
    patch_llama(hf, group_size=G, local_window=W).to(harness.torch_device())
    ids = _device_ids(random_ids(B, T, hf.config.vocab_size, seed=8))
    mask = torch.ones_like(ids)
    mask[1, 50:] = 0
    with torch.no_grad():
        padded = hf(input_ids=ids, attention_mask=mask).logits
        alone = [hf(input_ids=ids[:1]).logits[0], hf(input_ids=ids[1:, :50]).logits[0]]
    assert rel_err(padded[0].cpu().numpy(), alone[0].cpu().numpy()) < 1e-6
    assert rel_err(padded[1, :50].cpu().numpy(), alone[1].cpu().numpy()) < 1e-6


def test_what_patch_llama_refuses(make_hf_llama, random_ids):
    """Clear errors: left padding, KV-cache decoding, attention dropout, non-LLaMA models."""
    import transformers

    from torch_bridge import patch_llama

    hf, _ = make_hf_llama(seed=9, save=False, **CONFIGS["gqa_4x2_d16"])
    patch_llama(hf, group_size=G, local_window=W)
    ids = torch.as_tensor(random_ids(B, 40, hf.config.vocab_size, seed=9))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    with torch.no_grad():
        with pytest.raises(ValueError, match="right padding"):
            hf(input_ids=ids, attention_mask=mask)
        out = hf(input_ids=ids[:, :30], use_cache=True)
        with pytest.raises(NotImplementedError, match="KV cache"):
            hf(input_ids=ids[:, 30:31], past_key_values=out.past_key_values, use_cache=True)
    dropout = copy.deepcopy(hf)
    for layer in dropout.model.layers:
        layer.self_attn.attention_dropout = 0.1
    dropout.train()
    with pytest.raises(NotImplementedError, match="dropout"):
        dropout(input_ids=ids)
    with pytest.raises(TypeError, match="LLaMA"):
        patch_llama(torch.nn.Linear(4, 4))
    mistral = transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(TypeError, match="mistral"):
        patch_llama(mistral)
    with pytest.raises(ValueError, match="multiple of group_size"):
        patch_llama(hf, group_size=8, local_window=12)


def test_attention_mask_rules():
    from torch_bridge.modules import check_attention_mask

    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    right = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    left = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.bool)
    check_attention_mask(None, 2, 5)
    check_attention_mask(right.long(), 2, 5)  # (B, T) padding masks
    check_attention_mask((causal & right[:, None, :])[:, None], 2, 5)  # 4D boolean
    additive = torch.where(causal & right[:, None, :], 0.0, torch.finfo(torch.float32).min)
    check_attention_mask(additive[:, None], 2, 5)  # 4D additive (eager)
    for bad in (left, (causal & left[:, None, :])[:, None], torch.ones(2, 1, 5, 5, dtype=bool),
                torch.ones(2, 1, 5, 6, dtype=bool)):
        with pytest.raises(ValueError):
            check_attention_mask(bad, 2, 5)


def test_patching_keeps_parameters_and_can_be_repeated(make_hf_llama):
    from torch_bridge import CCALlamaAttention, patch_llama

    hf, _ = make_hf_llama(seed=10, save=False, **CONFIGS["gqa_4x2_d16"])
    before = dict(hf.named_parameters())
    keys = list(hf.state_dict())
    patch_llama(hf, group_size=G, local_window=W)
    assert list(hf.state_dict()) == keys
    assert all(p is before[n] for n, p in hf.named_parameters())
    patch_llama(hf, group_size=4, local_window=8, pooling="mean", implementation="reference")
    attns = [layer.self_attn for layer in hf.model.layers]
    assert all(isinstance(a, CCALlamaAttention) for a in attns)
    assert {(a.group_size, a.local_window, a.pooling) for a in attns} == {(4, 8, "mean")}


def test_layer_cache_is_found_under_every_keyword_transformers_has_used():
    """transformers >= 5.24 hands the attention layer its KV cache as ``cache``; earlier releases
    as ``past_key_values`` (or ``past_key_value``). The patched layers must see it in all three
    (with 5.24.0 and only the old names, generate silently ran without the cache)."""
    from torch_bridge.modules import _layer_cache

    cache = object()
    assert _layer_cache(None, {"cache": cache}) is cache
    assert _layer_cache(cache, {}) is cache
    assert _layer_cache(None, {"past_key_value": cache}) is cache
    assert _layer_cache(None, {"cache": None}) is None
