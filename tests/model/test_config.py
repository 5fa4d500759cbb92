"""CCAConfig: validation, Hugging Face config import/export (transformers 4.x and 5.x layouts),
JSON round trip and hashing."""

from __future__ import annotations

import copy
import dataclasses
import json

import jax.numpy as jnp
import pytest
from flax import nnx

from jax_cca import CCAConfig, CCALlama

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
             num_kv_heads=2, group_size=4, local_window=8)

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def hf_dict(**changes) -> dict:
    """A LLaMA config.json dict (transformers 4.x layout unless changed)."""
    base = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": 300, "hidden_size": 128, "intermediate_size": 344,
        "num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "tie_word_embeddings": False,
        "bos_token_id": 128000, "eos_token_id": [128001, 128009], "torch_dtype": "bfloat16",
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


# ------------------------------------------------------------------------------- validation
def test_defaults_and_derived_fields():
    c = CCAConfig(**SMALL)
    assert c.head_dim == 16
    assert c.kv_groups == 2
    assert c.dtype == "float32" and c.jnp_dtype == jnp.float32
    assert c.attention == "full"
    assert CCAConfig(**SMALL, head_dim=64).head_dim == 64
    assert CCAConfig(**SMALL, dtype=jnp.bfloat16).dtype == "bfloat16"
    assert CCAConfig(**SMALL, dtype="float16").jnp_dtype == jnp.float16


@pytest.mark.parametrize("changes, match", [
    (dict(group_size=4, local_window=10), r"local_window \(10\).*multiple of group_size \(4\)"),
    (dict(group_size=0), "group_size"),
    (dict(local_window=0), "local_window"),
    (dict(num_heads=6, num_kv_heads=4, head_dim=16),
     r"num_heads \(6\).*multiple of num_kv_heads \(4\)"),
    (dict(attention="sparse"), "attention must be one of"),
    (dict(head_dim=15), "head_dim must be even"),
    (dict(hidden_size=60, num_heads=8), "not divisible by num_heads"),
    (dict(num_layers=0), "num_layers must be positive"),
    (dict(dtype="int8"), "unsupported dtype"),
    (dict(pooling="median"), "pooling"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "lacks"),
])
def test_invalid_configs_raise_value_error(changes, match):
    with pytest.raises(ValueError, match=match):
        CCAConfig(**{**SMALL, **changes})


def test_replace_validates_too():
    with pytest.raises(ValueError, match="multiple of group_size"):
        CCAConfig(**SMALL).replace(local_window=6)


@pytest.mark.parametrize("rope_type", ["yarn", "dynamic", "longrope"])
def test_unsupported_rope_type_is_not_implemented(rope_type):
    with pytest.raises(NotImplementedError, match=rope_type):
        CCAConfig(**SMALL, rope_scaling={"rope_type": rope_type, "factor": 4.0})
    with pytest.raises(NotImplementedError, match=rope_type):
        CCAConfig.from_hf_config(hf_dict(rope_scaling={"type": rope_type, "factor": 4.0}))
    with pytest.raises(NotImplementedError, match=rope_type):
        CCAConfig.from_hf_config(hf_dict(rope_parameters={"rope_type": rope_type, "factor": 4.0,
                                                          "rope_theta": 1e4}))


def test_default_rope_scaling_normalises_to_none():
    assert CCAConfig(**SMALL, rope_scaling={"rope_type": "default"}).rope_scaling is None
    c = CCAConfig(**SMALL, rope_scaling={"type": "linear", "factor": 2.0})
    assert c.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_reattention_fields_default_validate_and_build():
    config = CCAConfig(**SMALL, attention="reattention")
    sel = config.selection()  # the authors' defaults (SPEC.md section 2)
    assert (sel.sink_tokens, sel.local_window, sel.top_k, sel.max_selected, sel.span,
            sel.chunk_size, sel.middle_align, sel.key_block) == (32, 8192, 4, 256, 32, 512, 128, 1)
    assert config.max_reattention_position() == 32 + 256 * 32 + 8192 + 127 + 512
    model = CCALlama(config.replace(reattention_top_k=7), rngs=nnx.Rngs(0))
    assert model.config.selection().top_k == 7
    switched = CCALlama.abstract(CCAConfig(**SMALL)).with_attention(attention="reattention")
    assert switched.config.attention == "reattention"
    for field, bad in [("reattention_top_k", 0), ("reattention_sink", -1),
                       ("reattention_chunk", 2.5), ("reattention_span", True),
                       ("reattention_align", 0), ("reattention_window", -8),
                       ("reattention_max_selected", 0), ("reattention_key_block", 0),
                       ("reattention_key_block", 1.0)]:
        with pytest.raises(ValueError, match=field):
            CCAConfig(**SMALL, **{field: bad})


def test_reattention_key_block_field():
    """Block picks: key_block = span = b, b dividing align; the position bound keeps its formula
    (a kept block brings its b == span keys). A key_block the span or align does not fit is
    refused naming the config fields; configs stored before the field existed load with 1."""
    config = CCAConfig(**SMALL, attention="reattention", reattention_key_block=16,
                       reattention_span=16)
    sel = config.selection()
    assert (sel.key_block, sel.span, sel.middle_align) == (16, 16, 128)
    assert config.max_reattention_position() == 32 + 256 * 16 + 8192 + 127 + 512
    with pytest.raises(ValueError, match=r"reattention_key_block=16 .*reattention_span=32"):
        CCAConfig(**SMALL, reattention_key_block=16)  # span stays 32
    with pytest.raises(ValueError, match=r"reattention_key_block=16 .*reattention_align=24"):
        CCAConfig(**SMALL, reattention_key_block=16, reattention_span=16, reattention_align=24)
    with pytest.raises(ValueError, match="reattention_key_block"):
        config.replace(reattention_span=8)
    switched = CCALlama.abstract(CCAConfig(**SMALL)).with_attention(
        attention="reattention", reattention_key_block=8, reattention_span=8)
    assert switched.config.selection().key_block == 8
    old = json.loads(config.to_json())
    del old["reattention_key_block"]
    assert CCAConfig.from_json(json.dumps(old)).reattention_key_block == 1


# ------------------------------------------------------------------------------- HF configs
def test_from_hf_config_transformers4_layout():
    hf = hf_dict(rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE), head_dim=None)
    c = CCAConfig.from_hf_config(hf, attention="cca", group_size=16, local_window=64)
    assert (c.vocab_size, c.hidden_size, c.intermediate_size) == (300, 128, 344)
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (3, 8, 2, 16)
    assert c.rope_theta == 500000.0
    assert c.rope_scaling == LLAMA3_ROPE
    assert c.rms_norm_eps == 1e-5 and c.max_position_embeddings == 4096
    assert c.bos_token_id == 128000 and c.eos_token_id == [128001, 128009]
    assert (c.attention, c.group_size, c.local_window) == ("cca", 16, 64)
    assert not c.tie_word_embeddings and not c.attention_bias and not c.mlp_bias


def test_from_hf_config_transformers4_legacy_type_key():
    hf = hf_dict(rope_theta=10000.0, rope_scaling={"type": "linear", "factor": 4.0})
    assert CCAConfig.from_hf_config(hf).rope_scaling == {"rope_type": "linear", "factor": 4.0}


def test_from_hf_config_transformers5_layout():
    hf = hf_dict(rope_parameters={**LLAMA3_ROPE, "rope_theta": 500000.0}, head_dim=32,
                 attention_bias=True, mlp_bias=True, tie_word_embeddings=True)
    hf.pop("torch_dtype")
    hf["dtype"] = "bfloat16"
    c = CCAConfig.from_hf_config(hf)
    assert c.rope_theta == 500000.0
    assert c.rope_scaling == LLAMA3_ROPE            # rope_theta is not part of the scaling
    assert c.head_dim == 32
    assert c.attention_bias and c.mlp_bias and c.tie_word_embeddings
    plain = CCAConfig.from_hf_config(hf_dict(rope_parameters={"rope_type": "default",
                                                              "rope_theta": 123456.0}))
    assert plain.rope_theta == 123456.0 and plain.rope_scaling is None


def test_from_hf_config_does_not_mutate_its_input():
    hf = hf_dict(rope_parameters={**LLAMA3_ROPE, "rope_theta": 500000.0})
    before = copy.deepcopy(hf)
    CCAConfig.from_hf_config(hf)
    assert hf == before


def test_both_layouts_agree_with_live_transformers_configs():
    """The dicts transformers itself writes (5.x, plus a 4.x-style dict) load to equal configs."""
    import transformers

    kw = dict(vocab_size=300, hidden_size=128, intermediate_size=344, num_hidden_layers=3,
              num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-5,
              max_position_embeddings=4096)
    live = transformers.LlamaConfig(**kw, rope_theta=500000.0,
                                    rope_scaling=dict(LLAMA3_ROPE)).to_dict()
    assert "rope_parameters" in live
    legacy = {**kw, "model_type": "llama", "rope_theta": 500000.0, "bos_token_id": 1,
              "eos_token_id": 2, "rope_scaling": dict(LLAMA3_ROPE)}
    assert CCAConfig.from_hf_config(live) == CCAConfig.from_hf_config(legacy)


@pytest.mark.parametrize("changes, match", [
    (dict(model_type="mistral", architectures=["MistralForCausalLM"]), "mistral"),
    (dict(architectures=["LlamaForSequenceClassification"]), "LlamaForSequenceClassification"),
    (dict(hidden_act="gelu"), "gelu"),
])
def test_unsupported_architectures(changes, match):
    with pytest.raises(ValueError, match=match):
        CCAConfig.from_hf_config(hf_dict(**changes))


def test_missing_required_fields_are_named():
    hf = hf_dict()
    del hf["intermediate_size"], hf["num_hidden_layers"]
    with pytest.raises(ValueError, match="intermediate_size.*num_hidden_layers"):
        CCAConfig.from_hf_config(hf)


def test_to_hf_config_round_trip():
    c = CCAConfig(**{**SMALL, "num_kv_heads": 1}, head_dim=32, rope_theta=500000.0,
                  rope_scaling=dict(LLAMA3_ROPE), tie_word_embeddings=True, attention_bias=True,
                  eos_token_id=[5, 6], dtype="bfloat16")
    hf = c.to_hf_config()
    json.dumps(hf)  # serialisable as config.json
    assert hf["model_type"] == "llama" and hf["architectures"] == ["LlamaForCausalLM"]
    # The dtype travels separately (torch_bridge reads config.json's torch_dtype / dtype).
    assert hf["torch_dtype"] == "bfloat16"
    back = CCAConfig.from_hf_config(hf, attention=c.attention, group_size=c.group_size,
                                    local_window=c.local_window, dtype=c.dtype)
    assert back == c
    # ReAttention's fields are not part of a LLaMA config.json: they come as overrides.
    re = c.replace(attention="reattention", reattention_top_k=9, reattention_chunk=64)
    assert "reattention_top_k" not in re.to_hf_config()
    assert CCAConfig.from_hf_config(re.to_hf_config(), attention="reattention",
                                    reattention_top_k=9, reattention_chunk=64,
                                    group_size=c.group_size, local_window=c.local_window,
                                    dtype=c.dtype) == re


# ------------------------------------------------------------------------------- JSON, hashing
@pytest.mark.parametrize("config", [
    CCAConfig(**SMALL),
    CCAConfig(**SMALL, attention="cca", rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE),
              eos_token_id=[1, 2], bos_token_id=None, dtype="bfloat16", head_dim=64,
              implementation="xla", pooling="mean"),
    CCAConfig.llama3_8b(),
    CCAConfig.tiny(),
    CCAConfig.tiny(attention="reattention", reattention_sink=4, reattention_window=64,
                   reattention_top_k=8, reattention_max_selected=16, reattention_span=5,
                   reattention_chunk=7, reattention_align=2),
    CCAConfig.tiny(attention="reattention", reattention_key_block=4, reattention_span=4,
                   reattention_align=8),
])
def test_json_round_trip(config):
    text = config.to_json()
    back = CCAConfig.from_json(text)
    assert back == config
    assert hash(back) == hash(config)
    assert back.to_json() == text
    assert dataclasses.asdict(back) == dataclasses.asdict(config)


def test_from_json_rejects_unknown_fields_and_bad_values():
    data = json.loads(CCAConfig(**SMALL).to_json())
    with pytest.raises(ValueError, match="unknown CCAConfig fields.*hidden_sise"):
        CCAConfig.from_json(json.dumps({**data, "hidden_sise": 3}))
    with pytest.raises(ValueError, match="multiple of group_size"):
        CCAConfig.from_json(json.dumps({**data, "local_window": 9}))


def test_hashing():
    a = CCAConfig(**SMALL, rope_scaling=dict(LLAMA3_ROPE))
    b = CCAConfig(**SMALL, rope_scaling=dict(reversed(list(LLAMA3_ROPE.items()))))
    assert a == b and hash(a) == hash(b)          # key order does not matter
    c = a.replace(local_window=16)
    assert c != a and hash(c) != hash(a)
    assert len({a, b, c, CCAConfig(**SMALL)}) == 3
    assert {a: 1}[b] == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.hidden_size = 3  # type: ignore[misc]


def test_replace_keeps_the_original():
    a = CCAConfig(**SMALL)
    b = a.replace(attention="cca", dtype=jnp.bfloat16)
    assert (a.attention, a.dtype) == ("full", "float32")
    assert (b.attention, b.dtype) == ("cca", "bfloat16")
