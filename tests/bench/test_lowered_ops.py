"""``bench/lowered_ops.py``: the ReAttention op lowered for CUDA on the CPU, its XLA glue listed.

Also a guard on the decode step's shape: its selection is one kernel (``pallas_select``), so the
lowered step keeps one sort (merging the scoring's key splits) and no scatter or scan."""

from __future__ import annotations

from bench import lowered_ops
from kernels.cca import pallas_mgpu


def test_decode_step_has_one_sort_and_no_scatter():
    before = pallas_mgpu.available
    summary = lowered_ops.summarize(lowered_ops.lower(16384, 8, decode=True), min_mb=32)
    assert pallas_mgpu.available is before  # the Hopper check is patched only while lowering
    counts = summary["counts"]
    assert counts.get("sort", 0) == 1, counts
    assert "scatter" not in counts and "reduce_window" not in counts, counts
    assert counts["custom_call"] >= 3  # scoring, selection, attention


def test_prefill_listing_runs(capsys):
    assert lowered_ops.main(["--length", "2048", "--kv-heads", "8", "--min-mb", "1"]) == 0
    out = capsys.readouterr().out
    assert "ops XLA launches or fuses" in out and " MB " in out
    assert lowered_ops.prefix_tokens(2048) == 2048 and lowered_ops.prefix_tokens(32768) == 8704
