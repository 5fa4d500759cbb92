"""``bench/lowered_ops.py``: the ReAttention op lowered for CUDA on the CPU, its XLA glue listed.

Also a guard on the decode step's shape: the merge of the scoring's key splits and the
selection are one kernel (``pallas_select.select_from_candidates``), so the lowered step has no
sort, scatter or scan."""

from __future__ import annotations

from bench import lowered_ops
from kernels.cca import pallas_mgpu


def test_decode_step_has_no_sort_and_no_scatter():
    before = pallas_mgpu.available
    summary = lowered_ops.summarize(lowered_ops.lower(16384, 8, decode=True), min_mb=32)
    assert pallas_mgpu.available is before  # the Hopper check is patched only while lowering
    counts = summary["counts"]
    assert "sort" not in counts, counts
    assert "scatter" not in counts and "reduce_window" not in counts, counts
    assert counts["custom_call"] >= 3  # scoring, selection, attention


def test_prefill_listing_runs(capsys):
    assert lowered_ops.main(["--length", "2048", "--kv-heads", "8", "--min-mb", "1"]) == 0
    out = capsys.readouterr().out
    assert "ops XLA launches or fuses" in out and " MB " in out
    assert lowered_ops.prefix_tokens(2048) == 2048 and lowered_ops.prefix_tokens(32768) == 8704
