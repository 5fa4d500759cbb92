"""bench/decode_anatomy.py runs end to end in its --quick CPU mode: every measurement in a child
process, a line fitted through the layer counts, and each XLA flag set recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_decode_anatomy_quick(tmp_path):
    out = tmp_path / "anatomy.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "decode_anatomy.py"), "--quick",
                           "--steps", "8", "--out", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["env"]["platform"] == "cpu"
    assert [r["layers"] for r in data["layers"]] == [1, 2]
    assert all(r["decode_ms"] > 0 and r["kernels"]["fusion"] > 0 for r in data["layers"])
    assert data["layers"][1]["bytes_read"] > data["layers"][0]["bytes_read"]
    assert set(data["fit"]) == {"per_layer_ms", "fixed_ms"}
    from bench.decode_anatomy import FLAG_SETS
    assert [f["name"] for f in data["flags"]] == list(FLAG_SETS)
    assert all("decode_ms" in f or "error" in f for f in data["flags"])
