"""bench/report.py renders every committed GPU result kind with its device line, and its numbers
are the file's own (ratios, not overheads; an fsdp check says whether each mesh was equal)."""

import json
from pathlib import Path

import pytest

from bench import report

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"


@pytest.mark.parametrize("name, kind", [("train_h200.json", "bench_train"),
                                        ("decode_h200_64k_128k.json", "bench_decode"),
                                        ("reattention_h200.json", "bench_reattention"),
                                        ("fsdp_h200x2.json", "fsdp_check"),
                                        ("parity_h100_v5.json", "bench_parity")])
def test_committed_results_render_with_their_device(name, kind):
    text = report.report(RESULTS / name)
    assert f"({kind}; device NVIDIA H" in text or f"({kind}; device 2x NVIDIA H200" in text
    assert "jax 0.11.2" in text and "date 2026-" in text


def test_reattention_columns_are_time_ratios(tmp_path):
    data = json.loads((RESULTS / "reattention_h200.json").read_text())
    row = data["prefill"][0]
    ratio = row["reattention"]["median_ms"] / row["cudnn_attended"]["median_ms"]
    line = next(ln for ln in report.reattention_table(data).splitlines()
                if ln.startswith(f"| 8K | {row['Hq']}/{row['Hkv']} |"))
    assert f"{ratio:.2f}x" in line
    data["prefill"] = [{"case": "broken", "error": "boom"}]
    assert "| broken | error |" in report.reattention_table(data)


def test_reattention_back_to_back_timings_sit_next_to_one_call():
    """Rows with ``pipelined_ms`` show 'one call / back to back' times and ratios."""
    data = json.loads((RESULTS / "reattention_h200.json").read_text())
    row = data["prefill"][0]
    for name, ms in (("reattention", 4.0), ("cudnn_attended", 3.0), ("cudnn_causal", 2.0)):
        row[name] = {**row[name], "pipelined_ms": ms}
    row.update(pipelined_overhead_vs_attended=4 / 3 - 1, pipelined_ratio_vs_causal=2.0)
    text = report.reattention_table(data)
    line = next(ln for ln in text.splitlines() if ln.startswith("| 8K |"))
    assert f"{row['reattention']['median_ms']:.2f} / 4.00" in line
    assert f"{row['overhead_vs_attended'] + 1:.2f}x / 1.33x" in line and " / 2.00x" in line
    assert "back to back" in text.split("|")[0]


def test_fsdp_table_flags_an_unequal_mesh():
    data = json.loads((RESULTS / "fsdp_h200x2.json").read_text())
    assert "| yes |" in report.fsdp_table(data)
    data["meshes"][0]["ok"] = False
    assert "| NO |" in report.fsdp_table(data)


def test_all_renders_every_known_result_and_lists_the_rest():
    text = report.report_all()
    for name in ("cca_h100_v4.json", "decode_h200_64k_128k.json", "train_h200.json",
                 "fsdp_h200x2.json", "reattention_h200.json", "parity_h100_v5.json"):
        assert f"`{name}`" in text
    tail = text.rsplit("Not tables of this script", 1)[1]
    assert "tune_cca_T131072_fwd_h100.json" in tail and "replicate_cca_h200.json" in tail
