"""The GPU benchmark scripts run end to end in their --quick CPU mode (tiny sizes), so that they
do not rot between GPU sessions, and their plots render from what they write."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_bench_decode_quick_and_plot(tmp_path):
    out = tmp_path / "decode.json"
    # --max-batch 1: the search runs one child per attention (batch 1 fits, 2 is past the cap);
    # its stepping rules are tested without processes in test_decode_search.py.
    proc = _run([str(REPO / "bench" / "bench_decode.py"), "--quick", "--lengths", "256",
                 "--max-batch", "1", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = data["batch1"]
    assert {r["attention"] for r in rows} == {"cca", "full"}
    for r in rows:
        assert r["decode_ms"] > 0 and r["decode_bound_ms"] > 0 and r["prefill_s"] > 0
        assert r["memory_bound_bytes"] == r["weight_bytes"] + r["cache_bytes"]
    cca = {r["T"]: r["cache_bytes"] for r in rows if r["attention"] == "cca"}
    full = {r["T"]: r["cache_bytes"] for r in rows if r["attention"] == "full"}
    assert all(cca[t] < full[t] for t in cca)
    search = {(r["attention"], r["T"]): r for r in data["batch_search"]}
    assert set(search) == {("cca", 256), ("full", 256)}
    assert all(r["largest_batch"] and r["tried"] for r in search.values())
    assert {"read_gbps", "bandwidth_gbps"} <= set(data["peaks"])
    from bench import report

    table = report.report(out)
    assert "bench_decode" in table and "| 256 | full |" in table
    pytest.importorskip("matplotlib")
    png = tmp_path / "decode.png"
    proc = _run([str(REPO / "bench" / "plot_decode.py"), str(out), str(png)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert png.stat().st_size > 10_000


def test_report_renders_the_committed_gpu_results():
    from bench import report

    cca = report.report(REPO / "bench" / "results" / "cca_h100_v4.json")
    assert "NVIDIA H100" in cca and "| 128K | 32/32 |" in cca
    parity = report.report(REPO / "bench" / "results" / "parity_h100.json")
    assert "bench_parity" in parity and "triton 3.6.0" in parity
    with pytest.raises(SystemExit, match="not a result"):
        report.report(REPO / "bench" / "results" / "tune_cca_T131072_bwd_h100.json")


def test_decode_1m_quick(tmp_path):
    """A tiny tied-embedding model decodes over a random un-rotated cache with ReAttention
    (token and block picks) and with full attention."""
    out = tmp_path / "d1m.json"
    proc = _run([str(REPO / "bench" / "decode_1m.py"), "--quick", "--steps", "8", "--attention",
                 "reattention,reattention_blocks,full", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["env"]["platform"] == "cpu" and data["config"]["tie_word_embeddings"]
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"reattention", "reattention_blocks", "full"}
    for row in rows.values():
        assert row["fits"] and row["context"] == 2048 and row["decode_ms"] > 0
        assert row["cache_gib"] > 0
    assert rows["reattention_blocks"]["key_block"] > 1 and rows["reattention"]["key_block"] == 1
    assert rows["reattention_blocks"]["cache_gib"] > rows["reattention"]["cache_gib"]  # summaries


def test_decode_anatomy_quick(tmp_path):
    """Every measurement in a child process, a line through the layer counts, the XLA flag sets
    asked for recorded (the first one: on a CPU the GPU flags change nothing, and each is one
    more child process)."""
    out = tmp_path / "anatomy.json"
    proc = _run([str(REPO / "bench" / "decode_anatomy.py"), "--quick", "--steps", "8", "--profile",
                 "--flag-sets", "1", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["env"]["platform"] == "cpu"
    assert [r["layers"] for r in data["layers"]] == [1, 2]
    assert all(r["decode_ms"] > 0 and r["kernels"]["fusion"] > 0 for r in data["layers"])
    assert data["layers"][1]["bytes_read"] > data["layers"][0]["bytes_read"]
    assert set(data["fit"]) == {"per_layer_ms", "fixed_ms"}
    from bench.decode_anatomy import FLAG_SETS

    assert [f["name"] for f in data["flags"]] == list(FLAG_SETS)[:1]
    assert all("decode_ms" in f or "error" in f for f in data["flags"])
    # --profile: the smallest model's step op by op (CPU: the host planes), with its HLO.
    profile = data["layers"][0]["profile"]
    assert profile["wall_ms_per_step"] > 0 and profile["lines"], profile
    assert all(line["events_per_step"] > 0 for line in profile["lines"].values())
    assert "fusion" in data["layers"][0]["hlo"] and "profile" not in data["layers"][1]


def test_decode_anatomy_rejects_a_malformed_flag_set(capsys):
    """``--flag-set NAME=FLAGS`` is checked before anything is measured."""
    from bench import decode_anatomy

    for bad in ("no-equals-sign", "name=xla_gpu_flag=true", "name="):
        with pytest.raises(SystemExit):
            decode_anatomy.main(["--quick", "--flag-set", bad])
        assert "--flag-set wants NAME=--xla_flag=value" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_reattention_quick(tmp_path):
    """Prefill rows carry one-call and back-to-back times for ReAttention and every baseline,
    and their ratios are the times' own; decode rows time both ways too."""
    out = tmp_path / "reattention.json"
    proc = _run([str(REPO / "bench" / "bench_reattention.py"), "--quick", "--out", str(out)],
                tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert len(data["prefill"]) == 4 and len(data["decode"]) == 3, data
    for r in data["prefill"]:
        pipe = {name: r[name]["pipelined_ms"] for name in
                ("reattention", "cudnn_causal", "cudnn_causal_rope", "cudnn_attended")}
        assert all(ms > 0 for ms in pipe.values()), r
        assert r["pipelined_ratio_vs_causal"] == pytest.approx(
            pipe["reattention"] / pipe["cudnn_causal"])
        assert r["pipelined_overhead_vs_attended"] == pytest.approx(
            pipe["reattention"] / pipe["cudnn_attended"] - 1)
        assert r["ratio_vs_causal"] == pytest.approx(
            r["reattention"]["median_ms"] / r["cudnn_causal"]["median_ms"])
    assert all(r["reattention"]["pipelined_ms"] > 0 for r in data["decode"])
    from bench import report

    assert " / " in report.reattention_table(data).split("\n\n")[1]


def test_ab_decode_step_checks_its_variants_and_options():
    """``--variants`` names built-in variants only; ``--xla`` wants NAME=OPTION=VALUE pairs,
    with true/false and integers typed (they become ``compile(compiler_options=)``)."""
    from bench import ab_decode_step

    for argv in (["--variants", "no such variant"], ["--xla", "name=flag-without-value"]):
        with pytest.raises(SystemExit):
            ab_decode_step.main(["--quick", *argv])
    assert ab_decode_step._option("xla_gpu_enable_pdl=false") == ("xla_gpu_enable_pdl", False)
    assert ab_decode_step._option("xla_gpu_autotune_level=0") == ("xla_gpu_autotune_level", 0)
    assert ab_decode_step._option("a=b") == ("a", "b")


def test_ab_decode_step_variants_of_the_ninth_session_are_the_same_step():
    """The "XLA lengths" variant (the write predicate and the lengths' update as XLA ops, as
    before they moved into ``rope_append``), "pool apart" (the pooling kernel as a launch of
    its own), both, and "pool fused" (the pooling inside the attention's launch: the
    three-launch step, the default until the thirteenth session) compute the same logits and
    cache, so the A/B times only where that work runs.
    The cache is large enough (64 core slots, a 36-slot ring) for the fused pooling."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from bench import ab_decode_step
    from jax_cca import CCAConfig, CCALlama

    config = CCAConfig.tiny(attention="cca", num_layers=2, num_heads=4, num_kv_heads=2,
                            head_dim=64, hidden_size=128, group_size=4, local_window=32,
                            implementation="pallas")
    model = CCALlama.from_config(config, seed=1)
    graphdef, state = nnx.split(model)
    _, cache = model.prefill(np.arange(14, dtype=np.int32).reshape(2, 7) % 50,
                             np.array([7, 4]), model.init_cache(2, 256))
    assert ab_decode_step.pallas_decode.fuses_pooling(cache[0].num_core, cache[0].ring, 64, 4)
    tokens, n_valid = jnp.array([3, 5], jnp.int32), jnp.array([1, 0], jnp.int32)

    def make_step():  # a new function per variant: jax.jit would reuse one trace of one
        def step(cache):
            return nnx.merge(graphdef, state).cached_forward(tokens[:, None], n_valid, cache,
                                                             prefill=False)
        return step

    outs, texts = {}, {}
    for name in ("norm kernel, 3 stages/256", "XLA lengths", "pool apart",
                 "XLA lengths, pool apart", "pool fused"):
        with ab_decode_step.variant(*ab_decode_step.VARIANTS[name]):
            step = jax.jit(make_step())
            texts[name] = str(step.trace(cache).jaxpr)
            outs[name] = step(cache)
    # each variant traced its own program: the pooling kernel apart, the lengths in XLA
    pool_kernels = {n: "cca_decode_pool" in t for n, t in texts.items()}
    assert pool_kernels == {"norm kernel, 3 stages/256": False, "XLA lengths": False,
                            "pool apart": True, "XLA lengths, pool apart": True,
                            "pool fused": False}, pool_kernels
    assert len(set(texts.values())) == 4  # the first = pool fused; the three others differ
    assert ab_decode_step.pallas_rope_append.rope_append.__name__ == "rope_append"  # restored
    first, *others = (jax.tree_util.tree_leaves(o) for o in outs.values())
    for other in others:
        for x, y in zip(first, other, strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert np.asarray(outs["XLA lengths"][1][0].lengths).tolist() == [8, 4]
    pooled = np.any(np.asarray(outs["pool apart"][1][0].core_k != cache[0].core_k), axis=(2, 3))
    assert pooled.sum(axis=1).tolist() == [1, 0]  # row 0's token 7 completes group 1


def test_tune_decode_quick(tmp_path):
    """Each decode-kernel config timed and checked against the default config's output."""
    out = tmp_path / "tune.json"
    proc = _run([str(REPO / "bench" / "tune_decode.py"), "--quick", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    for kind in ("cca", "full"):
        rows = data[kind]["rows"]
        assert [r["config"] for r in rows] == ["16,4,1,0", "16,4,1,2"]
        assert all(r["ms"] > 0 and r["rel_err_vs_default"] < 1e-2 for r in rows), rows
