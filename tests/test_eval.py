"""jax_cca.eval and ``jax-cca eval``: the prompts (the answer really is in the context, at the
asked depth, in the fine-tuning data's format), exact-match scoring, the pipeline end to end
(scored against a perfect retriever that reads the prompt, and run for real on a tiny random
model, whose predictions must be what ``generate`` gives), skipped methods, the report, the
heat-map writer and the command line."""

from __future__ import annotations

import json
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from jax_cca import CCAConfig, CCALlama
from jax_cca import generation
from jax_cca.cli import main
from jax_cca.data import SyntheticRetrieval, SyntheticVocab
from jax_cca.eval import (
    TASKS,
    MethodRun,
    TaskOptions,
    default_key_words,
    em_table,
    evaluate,
    evaluate_methods,
    exact_match,
    load_report,
    make_example,
    make_examples,
    plot_em_by_length,
    plot_heatmap,
    prepare_model,
    save_report,
    token_accuracy,
)

VOCAB = 97
V = SyntheticVocab(VOCAB)


def retrieve(prompt, v: SyntheticVocab = V) -> list[int]:
    """A perfect reader of the format, written independently of the builders: the question at
    the end names a key (or the passkey); return the digits stored for it in the context."""
    p = [int(x) for x in prompt]
    assert p[-1] == v.answer, "a prompt ends with the ANSWER marker"
    q = len(p) - 1 - p[::-1].index(v.query)
    asked = p[q + 1 : -1]
    if asked == [v.passkey]:
        i = p.index(v.passkey)
        assert p.count(v.passkey) == 2, "one passkey fact and the question"
        return p[i + 1 : p.index(v.period, i)]
    found = [i for i in range(q) if p[i] == v.kv_pair and p[i + 1 : i + 1 + len(asked)] == asked
             and p[i + 1 + len(asked)] == v.sep]
    assert len(found) == 1, f"the asked key is stored {len(found)} times"
    start = found[0] + 2 + len(asked)
    return p[start : p.index(v.period, start)]


# ------------------------------------------------------------------------------ prompts
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [61, 500, 1001])
def test_the_answer_is_in_the_context_at_the_depth(task, length):
    for depth in (0.0, 0.3, 0.5, 1.0):
        e = make_example(task, length, depth, sample=2, vocab_size=VOCAB, seed=5)
        p = e.prompt
        assert p.dtype == np.int32 and p.shape == (length,) and p[0] == V.bos
        assert p.min() >= 0 and p.max() < VOCAB
        assert retrieve(p) == e.answer.tolist()
        needle = p[e.needle_start : e.needle_end].tolist()
        assert needle[-1] == V.period and needle[-1 - len(e.answer) : -1] == e.answer.tolist()
        marker = V.passkey if task == "passkey" else V.kv_pair
        assert needle[0] == marker
        if task == "kvqa":  # records back to back after a short filler; the asked one by index
            records = [i for i in range(length) if p[i] == V.kv_pair]
            n = len(records)
            assert records.index(e.needle_start) == round(depth * (n - 1))
            assert records[0] < len(needle)  # the filler is shorter than one record
        else:  # the depth is the fraction of the filler words that come before the needle
            question = length - 1 - p.tolist()[::-1].index(V.query)
            facts = np.zeros(length, bool)
            facts[question:] = True
            for i in range(question):
                if p[i] in (V.passkey, V.kv_pair):
                    facts[i : p.tolist().index(V.period, i) + 1] = True
            words = (p >= V.first_word) & ~facts
            before, total = int(words[: e.needle_start].sum()), int(words.sum())
            assert before == round(depth * total), (before, total, depth)


def test_examples_are_deterministic_and_distinct():
    a = make_example("multikey", 300, 0.5, 0, vocab_size=VOCAB, seed=1)
    b = make_example("multikey", 300, 0.5, 0, vocab_size=VOCAB, seed=1)
    c = make_example("multikey", 300, 0.5, 1, vocab_size=VOCAB, seed=1)
    np.testing.assert_array_equal(a.prompt, b.prompt)
    assert not np.array_equal(a.prompt, c.prompt)
    rows = make_examples("passkey", 80, [0.0, 1.0], 3, vocab_size=VOCAB)
    assert [(r.depth, r.sample) for r in rows] == [(0.0, 0), (0.0, 1), (0.0, 2), (1.0, 0),
                                                   (1.0, 1), (1.0, 2)]


@pytest.mark.parametrize("task,data_task", [("passkey", "passkey"), ("kvqa", "kv")])
def test_same_format_as_the_finetuning_data(task, data_task):
    """A prompt of L tokens is laid out like SyntheticRetrieval's sequence of L + answer + EOS
    tokens: the same markers, in the same order, with the same key and answer sizes."""
    length, opts = 400, TaskOptions()
    answer_len = opts.answer_length(task)
    data = SyntheticRetrieval(seq_len=length + answer_len, vocab_size=VOCAB, task=data_task)
    tokens, mask = data.example(0)
    prompt, answer = tokens[:length], tokens[length : length + answer_len]
    assert mask[length:].all() and not mask[:length].any()
    e = make_example(task, length, 0.5, vocab_size=VOCAB)

    def markers(x):
        return [int(t) for t in x if t < V.first_word and not V.first_digit <= t < V.first_word]

    assert markers(e.prompt) == markers(prompt)
    assert len(e.answer) == len(answer)
    assert retrieve(prompt) == answer.tolist()  # the reader understands the training data too
    if task == "kvqa":
        assert data.key_words == default_key_words(length, VOCAB)
        assert e.needle_end - e.needle_start == data.key_words + opts.value_digits + 3


def test_key_words_and_needles_options():
    opts = TaskOptions(key_words=3, num_needles=6, value_digits=2, passkey_digits=7)
    e = make_example("multikey", 200, 0.25, vocab_size=VOCAB, options=opts)
    assert int((e.prompt == V.kv_pair).sum()) == 6 and len(e.answer) == 2
    assert e.needle_end - e.needle_start == 3 + 2 + 3
    assert retrieve(e.prompt) == e.answer.tolist()
    assert len(make_example("passkey", 50, 1.0, vocab_size=VOCAB, options=opts).answer) == 7


def test_bad_task_arguments():
    with pytest.raises(ValueError, match="too short for the passkey task"):
        make_example("passkey", 10, 0.5, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="too short for the kvqa task"):
        make_example("kvqa", 18, 0.5, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="too short for the multikey task"):
        make_example("multikey", 30, 0.5, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="depth"):
        make_example("passkey", 100, 1.5, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="unknown task"):
        make_example("summary", 100, 0.5, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="at least 64"):
        make_example("passkey", 100, 0.5, vocab_size=32)
    with pytest.raises(ValueError, match="num_needles"):
        TaskOptions(num_needles=0)


def test_exact_match_and_token_accuracy():
    assert exact_match([14, 15, 16], [14, 15, 16])
    assert exact_match(np.asarray([14, 15, 16, 2, 9]), np.asarray([14, 15, 16]))
    assert not exact_match([14, 15, 17], [14, 15, 16])
    assert not exact_match([14, 15], [14, 15, 16])
    assert not exact_match([15, 16, 14], [14, 15, 16])
    assert token_accuracy([14, 0, 16], [14, 15, 16]) == pytest.approx(2 / 3)
    assert token_accuracy([14], [14, 15]) == 0.5
    with pytest.raises(ValueError):
        token_accuracy([1], [])


# ------------------------------------------------------------------------------ pipeline
CONFIG = CCAConfig.tiny(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_layers=2,
                        num_heads=4, num_kv_heads=2, group_size=4, local_window=16,
                        max_position_embeddings=512)


@pytest.fixture(scope="module")
def model():
    return CCALlama.from_config(CONFIG, seed=2)


def test_pipeline_scores_a_perfect_retriever(model, monkeypatch):
    """Generation replaced by a reader of the prompt that answers right at depth 0 and 1 and
    wrong (one digit off) at depth 0.5: the cells must say exactly that, through batching with
    padding (7 examples per length, batches of 4)."""
    calls = []

    def oracle(runner, ids, lengths, new_tokens, **kwargs):
        calls.append(ids.shape)
        out = []
        for row in ids:
            answer = retrieve(row)
            p = row.tolist()
            depth_half = p.index(V.passkey) if V.passkey in p[:-3] else None
            wrong = (depth_half is not None and abs(depth_half / len(p) - 0.5) < 0.1)
            if wrong:
                answer = [answer[0]] + [V.first_digit + (a - V.first_digit + 1) % 10
                                        for a in answer[1:]]
            out.append((answer + [V.eos] * new_tokens)[:new_tokens])
        stats = generation.GenerationStats(0.5, 0.25, new_tokens - 1)
        return np.asarray(out, np.int32), stats

    monkeypatch.setattr(generation, "run_generation", oracle)
    run = evaluate(model, "full", tasks=["passkey", "kvqa"], lengths=[120, 200],
                   depths=[0.0, 0.5, 1.0], samples=2, batch_size=4, seed=3)
    assert calls == [(4, 120)] * 3 + [(4, 200)] * 3  # 12 examples per length, padded to 4s
    for n in (120, 200):
        assert run.cell("passkey", n, 0.0)["em"] == 1.0
        assert run.cell("passkey", n, 1.0)["em"] == 1.0
        half = run.cell("passkey", n, 0.5)
        assert half["em"] == 0.0 and half["token_acc"] == pytest.approx(1 / 5)
        assert all(run.cell("kvqa", n, d)["em"] == 1.0 for d in (0.0, 0.5, 1.0))
    assert run.em_by_length("passkey") == {120: pytest.approx(4 / 6), 200: pytest.approx(4 / 6)}
    grid = run.em_grid("passkey")
    np.testing.assert_array_equal(grid, [[1, 1], [0, 0], [1, 1]])
    speed = run.speed[0]
    assert speed["batches"] == 3 and speed["prefill_s"] == 0.5
    assert speed["decode_ms_per_token"] == pytest.approx(250 / 4)
    assert speed["prefill_tokens_per_s"] == pytest.approx(4 * 120 / 0.5)


def test_pipeline_on_a_tiny_model(model, tmp_path):
    """Real generation through the cache for cca and streaming: every prediction is the greedy
    continuation ``generate`` gives the prompt alone; the report round-trips through JSON."""
    runs = evaluate_methods(model, [("cca", {"local_window": 8}),
                                    ("streaming", {"sink_tokens": 2, "local_window": 12})],
                            tasks=["passkey", "multikey"], lengths=[77, 130], depths=[0.0, 1.0],
                            samples=1, batch_size=3, memory_lengths=[130])
    assert [r.status for r in runs] == ["ok", "ok"]
    cca, streaming = runs
    assert cca.options == {"group_size": 4, "local_window": 8}
    assert streaming.options == {"sink_tokens": 2, "local_window": 12}
    for run in runs:
        runner, _ = prepare_model(model, run.method, run.options)
        e = make_example("multikey", 130, 1.0, 0, vocab_size=VOCAB)
        ids = jnp.asarray(np.stack([e.prompt] * 3))  # the evaluation's batch shape: no compile
        expected = np.asarray(runner.generate(ids, 5))[0, 130:134]
        assert run.cell("multikey", 130, 1.0)["predictions"] == [expected.tolist()]
        assert {c["samples"] for c in run.cells} == {1} and len(run.cells) == 8
        entry = run.speed[1]
        assert entry["batches"] == 2 and entry["prefill_s"] > 0
        assert entry["prefill_memory"]["temp_bytes"] > 0 and run.speed[0]["prefill_memory"] is None
    # CCA's own cache is smaller than full attention's; streaming allocates the full one but
    # needs only sinks + window.
    full_bytes = streaming.speed[1]["kv_cache_bytes"]
    assert cca.speed[1]["kv_cache_bytes"] < full_bytes
    assert streaming.speed[1]["kv_cache_bytes_method"] < full_bytes
    path = save_report(tmp_path / "r.json", runs, note="x")
    meta, back = load_report(path)
    assert meta["note"] == "x" and meta["environment"]["jax"]
    assert [r.to_dict() for r in back] == [r.to_dict() for r in runs]
    table = em_table(back, "passkey")
    assert table.splitlines()[0] == "| length | cca | streaming |" and "| 77 |" in table


def test_methods_bad_and_skipped(model, monkeypatch):
    with pytest.raises(ValueError, match="unknown method"):
        evaluate(model, "sparse", lengths=[100])
    with pytest.raises(ValueError, match="unknown"):
        prepare_model(model, "cca", {"window": 8})
    with pytest.raises(ValueError, match="config fields"):
        prepare_model(model, "reattention", {"no_such_field": 1})
    with pytest.raises(ValueError, match="too short"):
        evaluate(model, "full", lengths=[12], tasks=["kvqa"])
    with pytest.raises(ValueError, match="duplicates"):
        evaluate(model, "full", lengths=[100, 100])

    def not_wired(self, **changes):
        if changes.get("attention") == "reattention":
            raise NotImplementedError("attention='reattention' is not implemented yet")
        return original(self, **changes)

    original = CCALlama.with_attention
    monkeypatch.setattr(CCALlama, "with_attention", not_wired)
    skipped = []
    runs = evaluate_methods(model, ["reattention"], lengths=[100], depths=[0.5], samples=1,
                            tasks=["passkey"], on_skip=lambda m, why: skipped.append((m, why)))
    assert runs[0].status == "skipped" and "not wired" in runs[0].reason
    assert skipped and skipped[0][0] == "reattention"
    assert em_table(runs, "passkey") == "(no passkey results)"


def _fake_run(method: str) -> MethodRun:
    run = MethodRun(method=method, options={}, tasks=["passkey"], lengths=[1024, 4096],
                    depths=[0.0, 0.5, 1.0], samples=2)
    for i, n in enumerate(run.lengths):
        for j, d in enumerate(run.depths):
            correct = (i + j) % 3
            run.cells.append({"task": "passkey", "length": n, "depth": d, "samples": 2,
                              "correct": min(correct, 2), "em": min(correct, 2) / 2,
                              "token_acc": 0.5, "answers": [], "predictions": []})
    return run


def test_heatmap_writer(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    run = _fake_run("cca")
    np.testing.assert_array_equal(run.em_grid("passkey"), [[0, 0.5], [0.5, 1], [1, 0]])
    png = plot_heatmap(run, "passkey", tmp_path / "sub" / "h.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
    line = plot_em_by_length([run, _fake_run("full")], "passkey", tmp_path / "l.png",
                             train_length=2048)
    assert line.stat().st_size > 2000
    with pytest.raises(ValueError, match="no kvqa"):
        plot_heatmap(run, "kvqa", tmp_path / "x.png")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"jax-cca\[plot\]"):
        plot_heatmap(run, "passkey", tmp_path / "y.png")


# ------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model):
    from checkpoints import save_model

    return save_model(model, tmp_path_factory.mktemp("eval_model") / "m")


def test_cli_end_to_end(model_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(["eval", "--model", str(model_dir), "--method", "full,streaming",
               "--tasks", "passkey,kvqa", "--lengths", "90,150", "--depths", "0,1",
               "--samples", "1", "--batch-size", "4", "--streaming-window", "16",
               "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "| length | full | streaming |" in captured.out and "| 150 |" in captured.out
    meta, runs = load_report(out / "results.json")
    assert meta["model_path"] == str(model_dir)
    assert [r.method for r in runs] == ["full", "streaming"]
    assert runs[1].options == {"sink_tokens": 4, "local_window": 16}
    assert runs[0].lengths == [90, 150] and runs[0].depths == [0.0, 1.0]
    if "matplotlib" in sys.modules or _has_matplotlib():
        names = sorted(p.name for p in out.glob("*.png"))
        assert names == ["em_kvqa.png", "em_passkey.png", "heatmap_full_kvqa.png",
                         "heatmap_full_passkey.png", "heatmap_streaming_kvqa.png",
                         "heatmap_streaming_passkey.png"]


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("argv,message", [
    (["--depths", "0,1.5"], "depths must be in [0, 1]"),
    (["--method", "cca,sparse"], "unknown method 'sparse'"),
    (["--lengths", "4x"], "expected a length"),
    (["--lengths", "600"], "--max-positions"),
    (["--option", "reattention_window=8"], "add reattention to --method"),
    (["--lengths", "12", "--tasks", "kvqa"], "too short for the kvqa task"),
])
def test_cli_errors(model_dir, argv, message, capsys):
    rc = main(["eval", "--model", str(model_dir), "--method", "full", "--no-progress", *argv]
              if "--method" not in argv else
              ["eval", "--model", str(model_dir), "--no-progress", *argv])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_cli_default_model_runs(tmp_path, capsys):
    """No --model: CCAConfig.tiny() with random weights (EM about 0, but it runs)."""
    rc = main(["eval", "--method", "cca", "--tasks", "passkey", "--lengths", "64",
               "--depths", "0.5", "--samples", "1", "--out", str(tmp_path), "--no-plot",
               "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    _, runs = load_report(tmp_path / "results.json")
    assert runs[0].config["num_layers"] == CCAConfig.tiny().num_layers
    assert json.loads((tmp_path / "results.json").read_text())["format"] == "jax-cca-eval"
    assert not list(tmp_path.glob("*.png"))


# ------------------------------------------------------------------------------ bench reports
def test_replication_reports(tmp_path):
    """The --report steps of both replication scripts: from a JSON to their own section of
    results.md (regenerating one leaves the other alone), with tables, skipped methods and
    plots."""
    pytest.importorskip("matplotlib")
    from bench import replicate_cca, replicate_reattention

    stage = {"seq_len": 2048, "steps": 10, "batch_size": 4, "key_words": 2, "seconds": 3.0,
             "step_ms": 12.5, "tokens_per_s": 1000.0, "loss_first": 2.5, "loss_last": 0.5,
             "loss_curve": [[1, 2.5], [10, 0.5]]}
    training = [{"name": "pretrain (full)", "task": "mix", "seconds": 3.0, "stages": [stage]},
                {"name": "fine-tune (cca)", "task": "mix", "seconds": 1.0,
                 "stages": [{**stage, "steps": 7}]}]
    cfg = json.loads(CONFIG.to_json())
    runs = [_fake_run("full"), _fake_run("cca"),
            MethodRun(method="streaming", options={}, status="skipped", reason="no reason")]
    protocol = dict(quick=False, lengths=[1024, 4096], depths=[0.0, 0.5, 1.0], tasks=["passkey"],
                    samples=2, eval_dtype="bfloat16", group_size=16, local_window=512,
                    cca_steps=300, cca_len=2048, sink_tokens=4,
                    curriculum=[{"seq_len": 2048, "steps": 10}])
    cca_json = save_report(tmp_path / "cca.json", runs, protocol=protocol, model_config=cfg,
                           training=training, eval_key_words=2, total_seconds=12.0)
    docs = tmp_path / "docs"
    replicate_cca.report(cca_json, docs)
    text = (docs / "results.md").read_text()
    table = "| length | full | cca |\n| --- | --- | --- |\n| 1024 | 0.50 (3/6) | 0.50 (3/6) |"
    assert table in text
    assert "**streaming skipped**: no reason" in text and "Smoke run" not in text
    assert "| pretrain (full) | 2048 | 10 | 4 | 2.500 -> 0.500 |" in text
    assert "fine-tuned 7 steps at 2048 tokens" in text
    assert (docs / "img" / "replicate_cca_passkey_cca.png").is_file()

    re_protocol = {**protocol, "quick": True, "position_bound": 900,
                   **{f"re_{n}": 1 for n in replicate_reattention.SELECTION}}
    re_json = save_report(tmp_path / "re.json", runs[:1], protocol=re_protocol,
                          model_config=cfg, training=training[:1], eval_key_words=2)
    replicate_reattention.report(re_json, docs)
    replicate_cca.report(cca_json, docs)  # regenerated: replaced in place, not appended
    text = (docs / "results.md").read_text()
    assert text.count("<!-- replicate_cca:begin -->") == 1
    assert text.count("<!-- replicate_reattention:begin -->") == 1
    assert text.index("replicate_cca:end") < text.index("replicate_reattention:begin")
    assert "Smoke run" in text.split("replicate_reattention:begin")[1]
    assert "(0.5x, 2x the training length)" in text  # trained at 2048


def test_replicate_reattention_runs_token_and_block_picks():
    """The miniature runs ReAttention with token picks, then block picks (unless
    --re-key-block 0), then full attention; a block size the selection cannot take exits with
    the config's own reason."""
    from bench import replicate_reattention as rr

    def labels(*argv):
        args = rr.build_parser().parse_args(list(argv))
        return [(label, method, opts.get("reattention_key_block"))
                for label, method, opts in rr.methods(args, rr.selection_options(args))]

    assert labels() == [("reattention", "reattention", None),
                        (rr.BLOCKS, "reattention", 32), ("full", "full", None)]
    assert labels("--re-key-block", "0") == [("reattention", "reattention", None),
                                             ("full", "full", None)]
    with pytest.raises(SystemExit, match="reattention_span must equal it"):
        labels("--re-key-block", "16")
