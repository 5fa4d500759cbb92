"""``jax-cca finetune`` end to end, in-process: the out-of-the-box run (tiny random model,
synthetic data), text data with a tokenizer, resume after a crash that continues exactly, and
bad inputs (a damaged data file on resume: a clear error, and the checkpoints untouched)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from checkpoints import restore_model, save_model
from checkpoints.train_state import TrainCheckpointer
from jax_cca import CCAConfig, CCALlama
from jax_cca.cli import main
from jax_cca.finetune_cli import _plot_loss

tokenizers = pytest.importorskip("tokenizers")
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "home",
         "red", "blue", "green", "sky", "sea", "sun"]


def write_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A small jax-cca checkpoint with a tokenizer.json beside it."""
    config = CCAConfig.tiny(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2,
                            num_heads=4, num_kv_heads=2, group_size=4, local_window=16)
    path = save_model(CCALlama.from_config(config, seed=3),
                      tmp_path_factory.mktemp("model") / "small")
    write_tokenizer(path)
    return path


@pytest.fixture
def corpus(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(
        json.dumps({"text": " ".join(rng.choice(WORDS, size=int(rng.integers(4, 40))))}) + "\n"
        for _ in range(40)))
    return path


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def steps(out: Path) -> list[int]:
    return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())


def params(model) -> dict:
    return {"/".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_finetune_runs_out_of_the_box(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["finetune", "--seq-len", "48", "--steps", "3", "--save-every", "2",
               "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "loss=" in captured.err and "tok_s=" in captured.err  # the progress bar
    assert "attention cca" in captured.err and "synthetic mix" in captured.err
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert np.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and r["learning_rate"] > 0
        assert r["seq_tokens"] == 48 and r["tokens"] > 0
    assert steps(out) == [2, 3]
    if importlib.util.find_spec("matplotlib") is not None:  # the optional [plot] extra
        assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    else:
        assert "matplotlib is not installed" in captured.out and not (out / "loss.png").exists()
    model = restore_model(out / "model")
    assert model.config == CCAConfig.tiny(attention="cca")
    run = json.loads((out / "run.json").read_text())
    assert run["train_config"]["compute_dtype"] == "bfloat16" and run["train_config"]["remat"]


def test_finetune_text_resume_after_crash_and_bad_data(model_dir, corpus, tmp_path, capsys):
    args = ["finetune", "--model", str(model_dir), "--data", str(corpus), "--seq-len", "24",
            "--steps", "6", "--save-every", "2", "--keep", "5", "--batch-size", "2",
            "--accum", "2", "--lr", "3e-3", "--trainable", "attention,mlp",
            "--local-window", "8", "--no-progress"]
    first = tmp_path / "first"
    assert main([*args, "--out", str(first)]) == 0, capsys.readouterr().err
    assert steps(first) == [2, 4, 6]
    reference = metrics(first)
    assert [r["step"] for r in reference] == list(range(1, 7))
    trained = restore_model(first / "model")
    assert trained.config.local_window == 8 and trained.config.attention == "cca"
    assert (first / "model" / "tokenizer.json").is_file()  # generate --prompt works on it
    original = params(restore_model(model_dir))
    for name, value in params(trained).items():  # embeddings, norms, head: frozen
        if "self_attn" in name or "mlp" in name:
            assert not np.array_equal(value, original[name]), name
        else:
            np.testing.assert_array_equal(value, original[name], err_msg=name)

    # A crash after step 2's save: the later checkpoints never happened.
    crashed = tmp_path / "crashed"
    shutil.copytree(first, crashed)
    for step in (4, 6):
        shutil.rmtree(crashed / "checkpoints" / str(step))
    shutil.rmtree(crashed / "model")
    assert main([*args, "--out", str(crashed)]) == 2  # no --resume: refused
    assert "pass --resume" in capsys.readouterr().err
    assert main([*args, "--out", str(crashed), "--resume", "--lr", "1e-3"]) == 2
    assert "lr: saved 0.003, now 0.001" in capsys.readouterr().err
    assert main([*args, "--out", str(crashed), "--resume"]) == 0, capsys.readouterr().err
    assert metrics(crashed) == [  # same losses, gradients and rates, step by step
        {**r, **{k: row[k] for k in ("step_time_s", "tokens_per_s")}}
        for r, row in zip(reference, metrics(crashed))]
    resumed = params(restore_model(crashed / "model"))
    for name, value in params(trained).items():
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)

    # The data file is damaged: a clear error naming it, and every checkpoint stays usable.
    before = sorted(p.relative_to(crashed).as_posix() for p in crashed.rglob("*"))
    with corpus.open("a") as f:
        f.write('{"text": "the cat"}\n{"text": "sat on\n')
    assert main([*args, "--steps", "8", "--out", str(crashed), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"jax-cca: error: {corpus}, line 42: not valid JSON" in err
    assert sorted(p.relative_to(crashed).as_posix() for p in crashed.rglob("*")) == before
    ckpt = TrainCheckpointer(crashed / "checkpoints")
    assert ckpt.steps() == [2, 4, 6]
    assert ckpt.read_meta()["metadata"]["data"]["kind"] == "text"

    # The newest checkpoint is damaged: a clear error, and how to fall back to the one before.
    corpus.write_text("".join(corpus.read_text().splitlines(keepends=True)[:40]))
    files = [f for f in (crashed / "checkpoints" / "6" / "state").rglob("*") if f.is_file()]
    victim = max(files, key=lambda f: f.stat().st_size)
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x55
    victim.write_bytes(bytes(raw))
    assert main([*args, "--steps", "8", "--out", str(crashed), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint step 6 in" in err and "corrupt" in err
    assert f"to resume from step 4, move {crashed / 'checkpoints' / '6'} out of the way" in err


def test_finetune_from_a_hugging_face_bf16_directory(make_hf_llama, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    _, hf_dir = make_hf_llama(seed=4, torch_dtype=torch.bfloat16)
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(hf_dir), "--seq-len", "32", "--steps", "2",
                 "--group-size", "4", "--local-window", "8", "--trainable", "attention",
                 "--out", str(out), "--no-progress"]) == 0, capsys.readouterr().err
    tuned = restore_model(out / "model")
    assert tuned.config.dtype == "bfloat16" and tuned.config.attention == "cca"
    assert tuned.config.group_size == 4 and tuned.config.local_window == 8
    original = params(CCALlama.from_pretrained(hf_dir))
    changed = {name for name, value in params(tuned).items()
               if not np.array_equal(value, original[name])}
    assert changed and all("self_attn" in name for name in changed)
    assert all(np.isfinite(r["loss"]) for r in metrics(out))


def test_finetune_user_errors(model_dir, corpus, tmp_path, capsys):
    out = str(tmp_path / "out")
    cases = [
        (["--data", str(corpus)], "--data needs a tokenizer"),
        (["--model", str(model_dir), "--data", str(tmp_path / "none.jsonl")],
         "data file not found"),
        (["--model", str(tmp_path / "absent")], "model directory not found"),
        (["--trainable", "everything"], "trainable must be 'all' or"),
        (["--mesh", "2"], "expected DATA,FSDP"),
        (["--mesh", "1,4"], "needs 4 devices"),
        (["--seq-len", "8"], "too short"),
    ]
    for extra, message in cases:
        assert main(["finetune", "--out", out, "--steps", "2", "--seq-len", "32",
                     "--no-progress", *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "out").exists()  # nothing was written for a refused run


def test_loss_plot_is_skipped_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    message = _plot_loss([{"step": 1, "loss": 2.0}], tmp_path / "loss.png")
    assert "matplotlib is not installed" in message
    assert not (tmp_path / "loss.png").exists()
