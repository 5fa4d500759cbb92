"""bench/tune_reattention.py runs in its --quick CPU mode (interpreted kernels): every config is
timed and checked against the default config, and a malformed config is refused by name."""

from __future__ import annotations

import json

import pytest

from bench import tune_reattention


def test_tune_reattention_quick(tmp_path):
    out = tmp_path / "tune.json"
    assert tune_reattention.main(["--quick", "--hkv", "2", "--score", "32,32,4,2", "--attn",
                                  "16,32,4,2", "16,32,4,2,in_kernel,xla", "--out",
                                  str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["env"]["platform"] == "cpu" and data["length"] == 300
    (score,), (attn, modes) = data["score"], data["attn"]
    assert score["cfg"] == [32, 32, 4, 2] and score["ms"] > 0 and score["same_picks"] == 1.0
    assert attn["cfg"] == [16, 32, 4, 2] and attn["op_ms"] > 0
    assert (attn["tail_keys"], attn["full_prefix"]) == ("auto", "auto")
    assert (modes["tail_keys"], modes["full_prefix"]) == ("in_kernel", "xla")
    for row in (attn, modes):
        assert row["rel_err_vs_default"] < 1e-5


def test_a_config_needs_four_numbers():
    with pytest.raises(SystemExit, match="block_q,block_k,num_warps,num_stages"):
        tune_reattention.main(["--quick", "--score", "32,32,4"])
    with pytest.raises(SystemExit, match="num_warps,num_stages; got .32,32,4,2,rotated."):
        tune_reattention.main(["--quick", "--score", "32,32,4,2,rotated"])  # modes: --attn only
    with pytest.raises(SystemExit, match="tail_keys must be"):
        tune_reattention.main(["--quick", "--score", "--attn", "32,32,4,2,rotate"])
