"""The fused serving layout (``fused_projections``: one QKV and one gate-up matrix per layer):
same logits, gradients and cached decoding (prefill + greedy steps) as the separate layout, exact
round trips between the layouts, Hugging Face load/export and orbax checkpoints in both.

Tiny random LLaMA models, float32, GQA (8 query / 2 kv heads) with biases, so the three parts
of the QKV matrix have different widths and every split point is exercised.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from checkpoints import restore_model, save_model
from jax_cca import CCALlama, CCAConfig, fused
from torch_bridge import convert_hf_llama, export_hf_llama
from torch_bridge.convert import hf_state_dict

TOL = 1e-4  # whole models, float32 (SPEC.md 4): the fused GEMMs sum in another order

CONFIG = dict(hidden_size=128, num_heads=8, num_kv_heads=2, intermediate_size=96, num_layers=2,
              attention_bias=True, mlp_bias=True, group_size=4, local_window=8)


def _models(attention: str, seed: int = 0):
    config = CCAConfig.tiny(attention=attention, **CONFIG)
    separate = CCALlama.from_config(config, seed=seed)
    # Biases start at zero: draw them so that a misplaced bias slice changes the outputs.
    _, state = nnx.split(separate)
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), 64))
    state = jax.tree_util.tree_map_with_path(
        lambda path, x: 0.1 * jax.random.normal(next(keys), x.shape, x.dtype)
        if "bias" in jax.tree_util.keystr(path) else x, state)
    nnx.update(separate, state)
    return separate, separate.with_fused_projections()


def _flat(model) -> dict:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def test_fused_layout_holds_two_matrices_per_layer():
    separate, fused_model = _models("cca")
    names = {p[-2] for p in _flat(fused_model)}
    assert {"qkv_proj", "gate_up_proj"} <= names
    assert not names & {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
    c = fused_model.config
    qkv = fused_model.layers[0].self_attn.qkv_proj.kernel
    assert qkv.shape == (c.hidden_size, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim)
    assert fused_model.num_params() == separate.num_params()


def test_round_trip_between_layouts_is_exact():
    separate, fused_model = _models("full")
    back = fused_model.with_fused_projections(False)
    a, b = _flat(separate), _flat(back)
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(a[path], b[path], err_msg=str(path))


@pytest.mark.parametrize("attention", ["full", "cca", "reattention"])
def test_fused_logits_equal_separate(attention, random_ids, rel_err):
    separate, fused_model = _models(attention)
    ids = jnp.asarray(random_ids(2, 45, separate.config.vocab_size))
    assert rel_err(fused_model(ids), separate(ids)) < TOL


def test_fused_gradients_equal_separate(random_ids, rel_err):
    separate, fused_model = _models("full")
    ids = jnp.asarray(random_ids(2, 33, separate.config.vocab_size))

    def grads(model):
        graphdef, params = nnx.split(model, nnx.Param)
        loss = lambda p: jnp.mean(jnp.tanh(nnx.merge(graphdef, p)(ids)))
        g = jax.grad(loss)(params)
        return {path: v.get_value() for path, v in nnx.to_flat_state(g)}

    g_sep = grads(separate)
    g_fused = fused.unfuse(grads(fused_model), fused_model.config)
    assert g_sep.keys() == g_fused.keys()
    for path in g_sep:
        assert rel_err(g_fused[path], g_sep[path]) < TOL, path


@pytest.mark.parametrize("attention", ["full", "cca"])
def test_fused_cached_decoding_equals_separate(attention, random_ids, rel_err):
    """Prefill of different lengths + greedy decode steps through each layout's cache: the same
    logits at every step."""
    separate, fused_model = _models(attention)
    ids = jnp.asarray(random_ids(2, 30, separate.config.vocab_size))
    lengths = jnp.asarray([30, 19])
    outs = []
    for model in (separate, fused_model):
        cache = model.init_cache(2, 40)
        logits, cache = model.prefill(ids, lengths, cache)
        steps = [logits]
        token = jnp.argmax(logits, axis=-1)
        for _ in range(6):
            logits, cache = model.decode_step(token, cache)
            steps.append(logits)
            token = jnp.argmax(logits, axis=-1)
        outs.append(jnp.stack(steps))
    assert rel_err(outs[1], outs[0]) < TOL


def test_hf_export_and_load_in_the_fused_layout(make_hf_llama, tmp_path, random_ids, rel_err):
    hf_model, directory = make_hf_llama(seed=3, num_attention_heads=4, num_key_value_heads=2)
    separate = convert_hf_llama(directory)
    fused_model = CCALlama.from_pretrained(directory, fused_projections=True)
    assert fused_model.config.fused_projections
    ids = jnp.asarray(random_ids(2, 21, separate.config.vocab_size))
    assert rel_err(fused_model(ids), separate(ids)) < TOL
    # Export writes Hugging Face's separate tensors, bit for bit the ones it loaded.
    exported, original = hf_state_dict(fused_model), hf_state_dict(separate)
    assert exported.keys() == original.keys()
    for name in original:
        np.testing.assert_array_equal(exported[name], original[name], err_msg=name)
    export_hf_llama(fused_model, tmp_path / "hf")
    reloaded = CCALlama.from_pretrained(tmp_path / "hf")
    assert not reloaded.config.fused_projections
    assert rel_err(reloaded(ids), separate(ids)) < TOL


def test_checkpoints_keep_the_layout_and_convert_on_request(tmp_path):
    separate, fused_model = _models("cca")
    path = save_model(fused_model, tmp_path / "ckpt")
    restored = restore_model(path)
    assert restored.config.fused_projections
    a, b = _flat(fused_model), _flat(restored)
    assert a.keys() == b.keys() and all(np.array_equal(a[p], b[p]) for p in a)
    unfused = restore_model(path, fused_projections=False)
    a, b = _flat(separate), _flat(unfused)
    assert a.keys() == b.keys() and all(np.array_equal(a[p], b[p]) for p in a)


def test_config_field_is_checked_and_serialised():
    with pytest.raises(ValueError, match="fused_projections must be a bool"):
        CCAConfig.tiny(fused_projections="yes")
    config = CCAConfig.tiny(fused_projections=True)
    assert CCAConfig.from_json(config.to_json()) == config
    assert "fused_projections" not in config.to_hf_config()
