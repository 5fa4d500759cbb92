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
