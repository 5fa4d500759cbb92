"""The scoring A/B's probes patch the kernel they are meant to (a CPU check: it only loads)."""

import pytest

from bench import ab_reattention_score as ab


@pytest.mark.parametrize("name", sorted(ab.PROBES))
def test_probe_patches_one_line_of_the_kernel(name, tmp_path):
    line, new = ab.PROBES[name]
    module = ab.probe_module(name, str(tmp_path))
    text = (tmp_path / f"{name}.py").read_text()
    assert line not in text and text.count(new) == 1
    assert callable(module.score) and module.ROWS == ab.pallas_mgpu_score.ROWS


def test_probe_whose_line_is_gone_stops_the_run(monkeypatch, tmp_path):
    monkeypatch.setitem(ab.PROBES, "probe_gone", ("no such line in the kernel", "x"))
    with pytest.raises(SystemExit, match="probe_gone"):
        ab.probe_module("probe_gone", str(tmp_path))
