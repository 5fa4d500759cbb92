"""patch_llama(attention="reattention"): a transformers LlamaForCausalLM computing ReAttention
equals CCALlama(attention="reattention") on the same weights: logits (float32 rel err < 1e-4)
with the torch reference and the Triton kernels (interpreted on CPU), greedy generation through
transformers' own KV cache, right padding, and the refusals.

Tiny random LLaMAs (``make_hf_llama`` in tests/conftest.py, every weight redrawn) with llama3
RoPE scaling (original context 64, so its three frequency bands occur): GQA 4/2 with head dim 16
(the torch reference) and GQA 2/1 with head dim 64 (also Triton, which needs a power of two
>= 32). Selection: sink 3, window 8 (aligned to 4), 2 picks per query, at most 3 per chunk of 8
queries, spans of 3, so over 61 tokens most of the middle is dropped.
"""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch

from tests.parity import harness

B, T = 2, 61
FP32_TOL = 1e-4
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
SELECTION = dict(reattention_sink=3, reattention_window=8, reattention_top_k=2,
                 reattention_max_selected=3, reattention_span=3, reattention_chunk=8,
                 reattention_align=4)
BASE = dict(vocab_size=128, rope_theta=10000.0, rope_scaling=LLAMA3)
CONFIGS = {
    "gqa_4x2_d16": BASE,
    "gqa_2x1_d64": dict(BASE, hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                        head_dim=64),
}


def _device_ids(ids: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(ids).to(harness.torch_device())


def _poisoned(impl: str):
    if impl == "triton":
        return harness.reattention_triton_kernels().poison_outputs()
    return contextlib.nullcontext()


def _jax_model(directory, **changes):
    from jax_cca import CCALlama

    return CCALlama.from_pretrained(directory, attention="reattention",
                                    **{**SELECTION, **changes})


def _jax_logits(model, ids) -> np.ndarray:
    import jax.numpy as jnp

    return np.asarray(model(jnp.asarray(ids, jnp.int32)).astype(jnp.float32))


@pytest.mark.parametrize("name, impl", [("gqa_4x2_d16", "reference"),
                                        ("gqa_2x1_d64", "reference"),
                                        ("gqa_2x1_d64", "triton")])
def test_patched_logits_match_cca_llama(name, impl, make_hf_llama, random_ids, rel_err):
    from torch_bridge import patch_llama

    hf, directory = make_hf_llama(seed=len(name), **CONFIGS[name])
    ids = random_ids(B, T, hf.config.vocab_size, seed=len(name))
    jax_model = _jax_model(directory)
    want = _jax_logits(jax_model, ids)
    full = _jax_logits(jax_model.with_attention(attention="full"), ids)
    assert rel_err(want, full) > 1e-2  # the selection really drops keys
    patch_llama(hf, attention="reattention", implementation=impl,
                **SELECTION).to(harness.torch_device())
    with torch.no_grad(), _poisoned(impl):
        got = hf(input_ids=_device_ids(ids)).logits.float().cpu().numpy()
    err = rel_err(got, want)
    assert err < FP32_TOL, f"{name}/{impl}: rel err {err:.3g}"


def test_patched_block_picks_match_cca_llama(make_hf_llama, random_ids, rel_err):
    """reattention_key_block=2 (span 2): patch_llama passes the block picks to the op, giving
    the logits of CCALlama with the same fields; token picks (key_block 1) give others."""
    from torch_bridge import patch_llama

    blocks = dict(SELECTION, reattention_key_block=2, reattention_span=2)
    hf, directory = make_hf_llama(seed=30, **CONFIGS["gqa_4x2_d16"])
    ids = random_ids(B, T, hf.config.vocab_size, seed=30)
    want = _jax_logits(_jax_model(directory, **blocks), ids)
    logits = {}
    for key_block in (2, 1):
        patch_llama(hf, attention="reattention", implementation="reference",
                    **{**blocks, "reattention_key_block": key_block}).to(harness.torch_device())
        assert {layer.self_attn.selection.key_block for layer in hf.model.layers} == {key_block}
        with torch.no_grad():
            logits[key_block] = hf(input_ids=_device_ids(ids)).logits.float().cpu().numpy()
    assert rel_err(logits[2], want) < FP32_TOL
    assert rel_err(logits[1], want) > 1e-3


def test_generate_through_the_transformers_cache_matches_cca_llama(make_hf_llama, random_ids):
    """transformers' generate (its DynamicCache then holds un-rotated keys) gives the greedy
    tokens of CCALlama.generate, whose prefill selects by chunks of 8 and whose decode steps
    select alone, as each transformers step does."""
    import jax.numpy as jnp

    from torch_bridge import patch_llama

    hf, directory = make_hf_llama(seed=21, eos_token_id=None, **CONFIGS["gqa_4x2_d16"])
    ids = random_ids(B, 37, hf.config.vocab_size, seed=21)
    want = np.asarray(_jax_model(directory).generate(jnp.asarray(ids, jnp.int32), 12))
    patch_llama(hf, attention="reattention", **SELECTION).to(harness.torch_device())
    with torch.no_grad():
        got = hf.generate(_device_ids(ids), attention_mask=torch.ones_like(_device_ids(ids)),
                          max_new_tokens=12, do_sample=False, pad_token_id=0)
    np.testing.assert_array_equal(got.cpu().numpy(), want)


def test_right_padding_gives_each_sequence_its_own_reattention(make_hf_llama, random_ids,
                                                               rel_err):
    """Row 1 holds 35 real tokens: its padding queries (36..39 of the chunk [32, 40)) must not
    vote. Real tokens get the logits of the unpadded sequence."""
    from torch_bridge import patch_llama

    hf, _ = make_hf_llama(seed=8, save=False, **CONFIGS["gqa_4x2_d16"])
    patch_llama(hf, attention="reattention", **SELECTION).to(harness.torch_device())
    ids = _device_ids(random_ids(B, 40, hf.config.vocab_size, seed=8))
    mask = torch.ones_like(ids)
    mask[1, 35:] = 0
    with torch.no_grad():
        padded = hf(input_ids=ids, attention_mask=mask).logits
        alone = [hf(input_ids=ids[:1]).logits[0], hf(input_ids=ids[1:, :35]).logits[0]]
        voting = hf(input_ids=ids).logits[1, :35]
    assert rel_err(padded[0].cpu().numpy(), alone[0].cpu().numpy()) < 1e-6
    assert rel_err(padded[1, :35].cpu().numpy(), alone[1].cpu().numpy()) < 1e-6
    assert rel_err(voting.cpu().numpy(), alone[1].cpu().numpy()) > 1e-3


def test_what_patch_llama_refuses_for_reattention(make_hf_llama, random_ids):
    from torch_bridge import patch_llama

    hf, _ = make_hf_llama(seed=9, save=False, **CONFIGS["gqa_4x2_d16"])
    patch_llama(hf, attention="reattention", **SELECTION)
    ids = torch.as_tensor(random_ids(B, 30, hf.config.vocab_size, seed=9))
    left = torch.ones_like(ids)
    left[1, :5] = 0
    right = torch.ones_like(ids)
    right[1, 25:] = 0
    with torch.no_grad():
        with pytest.raises(ValueError, match="right padding"):
            hf(input_ids=ids, attention_mask=left)
        out = hf(input_ids=ids[:, :20], attention_mask=right[:, :20], use_cache=True)
        with pytest.raises(ValueError, match="filled KV cache"):
            hf(input_ids=ids[:, 20:], attention_mask=right, past_key_values=out.past_key_values,
               use_cache=True)
    dropout = copy.deepcopy(hf)
    for layer in dropout.model.layers:
        layer.self_attn.attention_dropout = 0.1
    dropout.train()
    with pytest.raises(NotImplementedError, match="dropout"):
        dropout(input_ids=ids)
    with pytest.raises(ValueError, match="top_k"):
        patch_llama(hf, attention="reattention", reattention_top_k=0)
    with pytest.raises(ValueError, match="key_block=4 .*span"):
        patch_llama(hf, attention="reattention", reattention_key_block=4)  # span 32
    with pytest.raises(TypeError, match="reattention_topk"):
        patch_llama(hf, attention="reattention", reattention_topk=4)
    with pytest.raises(TypeError, match="attention='cca'"):
        patch_llama(hf, reattention_top_k=4)
    with pytest.raises(ValueError, match="attention must be"):
        patch_llama(hf, attention="full")
    with pytest.raises(ValueError, match="unknown implementation"):
        patch_llama(hf, attention="reattention", implementation="cuda")
    yarn, _ = make_hf_llama(seed=9, save=False, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})
    with pytest.raises(NotImplementedError, match="yarn"):
        patch_llama(yarn, attention="reattention")


def test_switching_attention_keeps_parameters(make_hf_llama):
    from torch_bridge import CCALlamaAttention, ReAttentionLlamaAttention, patch_llama

    hf, _ = make_hf_llama(seed=10, save=False, **CONFIGS["gqa_4x2_d16"])
    before = dict(hf.named_parameters())
    keys = list(hf.state_dict())
    patch_llama(hf, attention="reattention", **SELECTION)
    patch_llama(hf, attention="reattention", reattention_top_k=5)
    attns = [layer.self_attn for layer in hf.model.layers]
    assert all(isinstance(a, ReAttentionLlamaAttention) for a in attns)
    assert {a.selection.top_k for a in attns} == {5}
    assert attns[0].selection.local_window == 8192  # unspecified settings: the defaults
    assert attns[0].selection.key_block == 1
    patch_llama(hf, group_size=4, local_window=8)
    assert all(isinstance(layer.self_attn, CCALlamaAttention) for layer in hf.model.layers)
    patch_llama(hf, attention="reattention")
    assert list(hf.state_dict()) == keys
    assert all(p is before[n] for n, p in hf.named_parameters())
