"""The decode benchmark's largest-batch search (bench/bench_decode.py): each attempt in its own
process, stepping down from the predicted batch on out-of-memory and up once from a fit."""

from __future__ import annotations

import types

import pytest

from bench import bench_decode
from jax_cca.cache import cache_bytes


def _search(monkeypatch, limit: int | None, predicted: int, max_batch: int = 256,
            error_at: int | None = None):
    calls = []

    def fake_attempt(attention, t, batch, args, bandwidth):
        calls.append(batch)
        if batch == error_at:
            return {"batch": batch, "fits": None, "error": "boom"}
        fits = limit is None or batch <= limit
        return {"batch": batch, "fits": fits, "tokens_per_s": float(batch)} if fits else \
            {"batch": batch, "fits": False, "error": "does not fit: RESOURCE_EXHAUSTED"}

    monkeypatch.setattr(bench_decode, "attempt_in_child", fake_attempt)
    config = bench_decode.base_config(True, 256 + 16)
    args = types.SimpleNamespace(decode_steps=4, max_batch=max_batch)
    free = cache_bytes(config, 256 + 16, 1) * predicted / 0.97 + 1
    return bench_decode.batch_search(config, 256, args, int(free), 1000.0), calls


def test_fit_at_prediction_tries_one_size_up(monkeypatch):
    res, calls = _search(monkeypatch, limit=40, predicted=40)
    assert calls == [40, 46] and res["largest_batch"] == 40 and res["predicted_batch"] == 40
    assert [t["batch"] for t in res["tried"]] == [40, 46] and res["tokens_per_s"] == 40.0


def test_out_of_memory_steps_down_until_one_fits(monkeypatch):
    res, calls = _search(monkeypatch, limit=25, predicted=40)
    assert calls == [40, 34, 28, 23] and res["largest_batch"] == 23


def test_nothing_fits_within_the_attempt_cap(monkeypatch):
    res, calls = _search(monkeypatch, limit=0, predicted=40)
    assert len(calls) == bench_decode.MAX_ATTEMPTS and res["largest_batch"] is None
    assert res["tokens_per_s"] is None


def test_an_error_other_than_memory_stops_the_search(monkeypatch):
    res, calls = _search(monkeypatch, limit=None, predicted=40, error_at=40)
    assert calls == [40] and res["largest_batch"] is None


@pytest.mark.parametrize("predicted, max_batch", [(300, 256), (4, 4)])
def test_capped_at_max_batch(monkeypatch, predicted, max_batch):
    res, calls = _search(monkeypatch, limit=None, predicted=predicted, max_batch=max_batch)
    assert calls == [max_batch] and res["capped"] and res["largest_batch"] == max_batch
