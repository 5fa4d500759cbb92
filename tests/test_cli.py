"""The jax-cca command line, run in-process through ``jax_cca.cli.main``, and the demo's numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints import read_manifest
from jax_cca import CCALlama, demo
from jax_cca.cli import main
from jax_cca.generation import generate
from kernels.cca.reference import core_visible, local_visible

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

VOCAB = 101
WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "home"]
PROMPT_IDS = [5, 17, 88, 3, 42, 99, 7, 61, 23, 14, 70, 33, 9, 55]  # 14 > w + g - 1 = 11


def _write_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    vocab.update({f"w{i}": i for i in range(len(vocab), VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """A tiny random Hugging Face LLaMA (GQA, random norms) saved with a tokenizer.json."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    directory = tmp_path_factory.mktemp("hf_llama")
    model.save_pretrained(directory)
    _write_tokenizer(directory)
    return model, directory


@pytest.fixture(scope="module")
def checkpoint(hf_model, tmp_path_factory):
    _, hf_dir = hf_model
    out = tmp_path_factory.mktemp("ckpts") / "tiny"
    rc = main(["convert", str(hf_dir), str(out), "--group-size", "4", "--local-window", "8"])
    assert rc == 0
    return out


def torch_greedy(model, ids: list[int], steps: int) -> list[int]:
    cur = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(cur).logits[:, -1].argmax(-1, keepdim=True)
            cur = torch.cat([cur, nxt], dim=1)
    return cur[0, len(ids):].tolist()


def _line(out: str, prefix: str) -> str:
    lines = [l for l in out.splitlines() if l.startswith(prefix)]
    assert len(lines) == 1, out
    return lines[0][len(prefix):].strip()


def _ids(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t]


# ---------------------------------------------------------------------------- demo
def test_demo_at_small_length(monkeypatch, capsys):
    captured = {}
    real = demo.run_demo

    def spy(**kwargs):
        captured["kwargs"] = kwargs
        captured["res"] = real(**kwargs)
        return captured["res"]

    monkeypatch.setattr(demo, "run_demo", spy)
    rc = main(["demo", "--length", "40", "--new-tokens", "2", "--group-size", "4",
               "--local-window", "8", "--repeats", "1", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    for text in ("Exactness check", "-> OK", "Prefill of the 40-token prompt", "64.00 GiB",
                 "4.51 GiB (93% less)", "Greedy generation of 2 tokens", "time per token"):
        assert text in out, text
    res = captured["res"]
    assert res["window_check"]["relative_error"] < 1e-5
    assert res["window_check"]["local_window"] == 44  # smallest multiple of 4 >= 40 + 4
    assert res["relative_difference"] > 1e-3  # 40 > w + g: CCA is not full attention here
    cfg = res["config"]
    assert (cfg["num_layers"], cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim"]) == \
        (4, 8, 2, 32)
    for att in ("full", "cca"):
        assert res[att]["logits_shape"] == (1, 40, 512)
        assert res[att]["prefill_ms_per_token"] > 0 and res[att]["generate_ms_per_token"] > 0
        assert res[att]["generated"].shape == (1, 2)
    # jax_cca.cache.cache_bytes for a cache sized for the prompt (max_len 40), batch 1: per layer,
    # K and V rows of 2 kv heads x 32 float32 dims, plus one int32 length; 4 layers.
    per_token = 2 * 4 * 2 * 32 * 4  # K and V, layers, kv heads, head dim, float32 bytes
    lengths = 4 * 4  # a (B,) int32 per layer
    assert res["full"]["kv_cache_bytes"] == per_token * 40 + lengths
    # CCA: 40 // g = 10 core slots and a ring of w + g = 12 raw slots.
    assert res["cca"]["kv_cache_bytes"] == per_token * (40 // 4 + 8 + 4) + lengths
    assert res["full"]["attention_flops"] == 4 * 32 * (40 * 41 // 2) * 8 * 4
    assert res["cca"]["attention_flops"] < res["full"]["attention_flops"]


@pytest.mark.parametrize("argv, length", [([], 2048), (["--length", "512"], 512)])
def test_no_command_runs_the_demo(monkeypatch, argv, length):
    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda **kw: calls.append(kw))
    assert main(argv) == 0
    assert len(calls) == 1
    assert calls[0]["length"] == length
    assert (calls[0]["group_size"], calls[0]["local_window"]) == (16, 256)


def test_visible_key_count_matches_the_masks():
    t, g, w = 37, 4, 8
    rows = np.arange(t)[:, None]
    core = int(np.asarray(core_visible(rows, np.arange(t // g)[None, :], g, w)).sum())
    raw = int(np.asarray(local_visible(rows, np.arange(t)[None, :], g, w)).sum())
    assert demo.attention_keys(t, "cca", g, w) == core + raw
    assert demo.attention_keys(t, "full", g, w) == t * (t + 1) // 2


def test_llama2_7b_costs_match_the_paper():
    big = demo.llama2_7b_costs()
    # jax_cca.cache layout, bf16, one sequence: per layer K and V of 32 kv heads x 128 dims per
    # cached token, plus a (1,) int32 length; 32 layers.
    lengths = 32 * 4
    assert big["full"]["kv_cache_bytes"] == 64 * 2**30 + lengths  # 2*32*32*128*131072*2 bytes
    cca_tokens = 131072 // 16 + (1024 + 16)  # a core slot per group + a ring of w + g raw slots
    assert big["cca"]["kv_cache_bytes"] == 2 * 32 * 32 * 128 * cca_tokens * 2 + lengths
    assert 0.92 < 1 - big["cca"]["kv_cache_bytes"] / big["full"]["kv_cache_bytes"] < 0.94
    ratio = big["full"]["attention_flops"] / big["cca"]["attention_flops"]
    assert 11 < ratio < 14  # the paper: about 12x fewer attention FLOPs at 128K


# ---------------------------------------------------------------------------- convert
def test_convert_writes_a_cca_checkpoint_with_the_same_weights(hf_model, checkpoint):
    torch_model, _ = hf_model
    config = read_manifest(checkpoint)["config"]
    assert (config["attention"], config["group_size"], config["local_window"]) == ("cca", 4, 8)
    assert (checkpoint / "tokenizer.json").is_file()
    model = CCALlama.from_pretrained(checkpoint, attention="full")
    ids = np.random.default_rng(3).integers(0, VOCAB, (2, 21))
    ours = np.asarray(model(jnp.asarray(ids, jnp.int32)))
    with torch.no_grad():
        ref = torch_model(torch.tensor(ids)).logits.numpy()
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-4


def test_convert_refuses_to_overwrite(hf_model, checkpoint, capsys):
    _, hf_dir = hf_model
    before = sorted(p.name for p in checkpoint.iterdir())
    assert main(["convert", str(hf_dir), str(checkpoint)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err
    assert sorted(p.name for p in checkpoint.iterdir()) == before


# ---------------------------------------------------------------------------- generate
def test_generate_full_attention_matches_transformers(hf_model, checkpoint, capsys):
    torch_model, _ = hf_model
    rc = main(["generate", "--model", str(checkpoint), "--prompt-ids",
               ",".join(map(str, PROMPT_IDS)), "--max-new-tokens", "6", "--attention", "full",
               "--ignore-eos", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert _ids(_line(out, "prompt ids:")) == PROMPT_IDS
    assert _ids(_line(out, "generated ids:")) == torch_greedy(torch_model, PROMPT_IDS, 6)


def test_generate_uses_the_stored_cca_attention(checkpoint, capsys):
    rc = main(["generate", "--model", str(checkpoint), "--prompt-ids",
               ",".join(map(str, PROMPT_IDS)), "--max-new-tokens", "5", "--ignore-eos",
               "--no-progress"])
    assert rc == 0
    printed = _ids(_line(capsys.readouterr().out, "generated ids:"))
    model = CCALlama.from_pretrained(checkpoint)
    assert model.config.attention == "cca"
    expected = generate(model, jnp.asarray([PROMPT_IDS]), 5)
    assert printed == np.asarray(expected)[0, len(PROMPT_IDS):].tolist()


def test_generate_with_reattention_and_its_knobs(checkpoint, capsys):
    knobs = dict(sink=2, window=4, top_k=2, max_selected=2, span=1, chunk=4, align=2)
    argv = ["generate", "--model", str(checkpoint), "--prompt-ids",
            ",".join(map(str, PROMPT_IDS)), "--max-new-tokens", "5", "--ignore-eos",
            "--no-progress", "--attention", "reattention"]
    for name, value in knobs.items():
        argv += [f"--reattention-{name.replace('_', '-')}", str(value)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    printed = _ids(_line(captured.out, "generated ids:"))
    assert "attention reattention (sink=2, window=4, top_k=2" in captured.err
    model = CCALlama.from_pretrained(checkpoint, attention="reattention",
                                     **{f"reattention_{k}": v for k, v in knobs.items()})
    expected = generate(model, jnp.asarray([PROMPT_IDS]), 5)
    assert printed == np.asarray(expected)[0, len(PROMPT_IDS):].tolist()
    assert main(argv + ["--reattention-top-k", "0"]) == 2
    assert "--reattention-top-k" in capsys.readouterr().err


def test_reattention_key_block_flag_reaches_generate_and_convert(hf_model, checkpoint, tmp_path,
                                                                capsys):
    """--reattention-key-block: block picks in generate (the tokens of the same model built in
    Python, the description names it), stored by convert, refused with a span it does not fit."""
    knobs = ["--attention", "reattention", "--reattention-sink", "2", "--reattention-window", "4",
             "--reattention-top-k", "1", "--reattention-max-selected", "1",
             "--reattention-chunk", "4", "--reattention-align", "2",
             "--reattention-span", "2", "--reattention-key-block", "2"]
    argv = ["generate", "--model", str(checkpoint), "--prompt-ids",
            ",".join(map(str, PROMPT_IDS)), "--max-new-tokens", "3", "--ignore-eos",
            "--no-progress", *knobs]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "span=2, chunk=4, key_block=2)" in captured.err
    model = CCALlama.from_pretrained(
        checkpoint, attention="reattention", reattention_sink=2, reattention_window=4,
        reattention_top_k=1, reattention_max_selected=1, reattention_chunk=4,
        reattention_align=2, reattention_span=2, reattention_key_block=2)
    expected = generate(model, jnp.asarray([PROMPT_IDS]), 3)
    printed = _ids(_line(captured.out, "generated ids:"))
    assert printed == np.asarray(expected)[0, len(PROMPT_IDS):].tolist()
    assert main(argv + ["--reattention-span", "3"]) == 2  # the block is not the span
    assert "reattention_key_block=2" in capsys.readouterr().err
    assert main(argv + ["--reattention-key-block", "0"]) == 2
    assert "--reattention-key-block" in capsys.readouterr().err
    _, hf_dir = hf_model
    out = tmp_path / "blocks"
    assert main(["convert", str(hf_dir), str(out), *knobs]) == 0
    config = read_manifest(out)["config"]
    assert (config["reattention_key_block"], config["reattention_span"]) == (2, 2)
    assert CCALlama.from_pretrained(out).config.selection().key_block == 2


def test_generate_from_text_prompt_with_sampling(checkpoint, capsys):
    text = "the cat sat on a mat and the dog ran far away home the cat"
    argv = ["generate", "--model", str(checkpoint), "--prompt", text, "--max-new-tokens", "4",
            "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "3",
            "--ignore-eos", "--no-progress"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    tok = tokenizers.Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    prompt_ids = tok.encode(text).ids
    assert _ids(_line(first, "prompt ids:")) == prompt_ids
    new = _ids(_line(first, "generated ids:"))
    assert len(new) == 4
    assert _line(first, "text:") == tok.decode(prompt_ids + new)
    assert main(argv) == 0  # same seed, same sample
    assert _line(capsys.readouterr().out, "generated ids:") == _line(first, "generated ids:")


def test_generate_stops_at_a_stop_token(checkpoint, capsys):
    base = ["generate", "--model", str(checkpoint), "--prompt-ids",
            ",".join(map(str, PROMPT_IDS)), "--max-new-tokens", "8", "--ignore-eos",
            "--no-progress"]
    assert main(base) == 0
    full = _ids(_line(capsys.readouterr().out, "generated ids:"))
    stop = full[2]
    cut = full[: full.index(stop) + 1]
    assert len(cut) < len(full)
    assert main(base + ["--stop-tokens", str(stop)]) == 0
    assert _ids(_line(capsys.readouterr().out, "generated ids:")) == cut


# ---------------------------------------------------------------------------- export
def test_export_round_trips_to_transformers(hf_model, checkpoint, tmp_path, capsys):
    torch_model, _ = hf_model
    out = tmp_path / "hf_out"
    assert main(["export", str(checkpoint), str(out)]) == 0
    assert (out / "tokenizer.json").is_file()
    back = transformers.LlamaForCausalLM.from_pretrained(out)
    ref = torch_model.state_dict()
    got = back.state_dict()
    assert set(got) == set(ref)
    for name, tensor in ref.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=name)
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 2
    capsys.readouterr()
    assert main(["export", str(checkpoint), str(out)]) == 2  # not empty, no --overwrite
    assert "not empty" in capsys.readouterr().err


def test_export_overwrite_drops_stale_shards(checkpoint, tmp_path):
    """A shard index left by an earlier (sharded) export must not shadow the new weights."""
    out = tmp_path / "hf_out"
    assert main(["export", str(checkpoint), str(out)]) == 0
    current = CCALlama.from_pretrained(checkpoint).with_attention(attention="full")
    from torch_bridge import export_hf_llama

    other = tmp_path / "other"  # other weights, written as several shards plus an index
    export_hf_llama(_perturbed(current), other, max_shard_bytes=20_000)
    for f in other.glob("model*"):
        (out / f.name).write_bytes(f.read_bytes())
    assert (out / "model.safetensors.index.json").is_file()
    assert main(["export", str(checkpoint), str(out), "--overwrite"]) == 0
    assert not (out / "model.safetensors.index.json").exists()
    reloaded = CCALlama.from_pretrained(out)
    ids = jnp.asarray(np.random.default_rng(4).integers(0, VOCAB, (1, 9)), jnp.int32)
    np.testing.assert_array_equal(np.asarray(reloaded(ids)), np.asarray(current(ids)))


def _perturbed(model):
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree_util.tree_map(lambda x: x + 0.5, state))


# ---------------------------------------------------------------------------- errors
ERROR_CASES = {
    "convert-missing-dir": (["convert", "{missing}", "{tmp}/out"], "not found"),
    "export-missing-dir": (["export", "{missing}", "{tmp}/out"], "not found"),
    "generate-missing-model": (["generate", "--model", "{missing}", "--prompt-ids", "1,2"],
                               "not found"),
    "generate-no-prompt": (["generate", "--model", "{ckpt}"], "--prompt"),
    "generate-bad-ids": (["generate", "--model", "{ckpt}", "--prompt-ids", "1,x"], "token ids"),
    "generate-bad-top-p": (["generate", "--model", "{ckpt}", "--prompt-ids", "1", "--top-p",
                            "1.5"], "--top-p"),
    "generate-no-tokenizer": (["generate", "--model", "{ckpt}", "--tokenizer", "{tmp}",
                               "--prompt", "hi"], "tokenizer.json"),
    "generate-too-long": (["generate", "--model", "{ckpt}", "--prompt-ids", "1,2,3",
                           "--max-new-tokens", "94", "--no-progress"],
                          "max_position_embeddings (96)"),
    "generate-out-of-vocab": (["generate", "--model", "{ckpt}", "--prompt-ids", "3,101"],
                              "[0, 101)"),
    "unknown-command": (["train"], "invalid choice"),
    "demo-bad-window": (["demo", "--group-size", "4", "--local-window", "10"],
                        "multiple of group_size"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_print_one_line_and_exit_2(case, checkpoint, tmp_path, capsys):
    argv, expected = ERROR_CASES[case]
    fill = {"missing": str(tmp_path / "does-not-exist"), "tmp": str(tmp_path),
            "ckpt": str(checkpoint)}
    assert main([a.format(**fill) for a in argv]) == 2
    captured = capsys.readouterr()
    lines = [l for l in captured.err.splitlines() if l.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("jax-cca: error:") and expected in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out


def test_python_dash_m_entry_point(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "jax_cca", "convert", str(tmp_path / "nope"), str(tmp_path / "o")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith("jax-cca: error: Hugging Face model directory not")
    assert not (tmp_path / "o").exists()
