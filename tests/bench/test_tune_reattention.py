"""bench/tune_reattention.py runs in its --quick CPU mode (interpreted kernels): every config is
timed and checked against the default config, and a malformed config is refused by name."""

from __future__ import annotations

import json

import pytest

from bench import tune_reattention


def test_tune_reattention_quick(tmp_path):
    out = tmp_path / "tune.json"
    assert tune_reattention.main(["--quick", "--hkv", "2", "--score", "32,32,4,2", "--attn",
                                  "16,32,4,2", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["env"]["platform"] == "cpu" and data["length"] == 300
    (score,), (attn,) = data["score"], data["attn"]
    assert score["cfg"] == [32, 32, 4, 2] and score["ms"] > 0 and score["same_picks"] == 1.0
    assert attn["cfg"] == [16, 32, 4, 2] and attn["op_ms"] > 0
    assert attn["rel_err_vs_default"] < 1e-5


def test_a_config_needs_four_numbers():
    with pytest.raises(SystemExit, match="block_q,block_k,num_warps,num_stages"):
        tune_reattention.main(["--quick", "--score", "32,32,4"])
