"""bench/decode_1m.py runs end to end in its --quick CPU mode: a tiny tied-embedding model decodes
over a random un-rotated cache with ReAttention and with full attention, and the JSON says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_decode_1m_quick(tmp_path):
    out = tmp_path / "d1m.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "decode_1m.py"), "--quick",
                           "--steps", "8", "--out", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["env"]["platform"] == "cpu" and data["config"]["tie_word_embeddings"]
    rows = {r["attention"]: r for r in data["rows"]}
    assert set(rows) == {"reattention", "full"}
    for row in rows.values():
        assert row["fits"] and row["context"] == 2048 and row["decode_ms"] > 0
        assert row["cache_gib"] > 0
