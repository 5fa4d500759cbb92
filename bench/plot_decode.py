"""Plot bench_decode.py results: decode ms/token against context length, CCA and full attention,
each with its HBM-bandwidth bound; one or more JSON files (e.g. an H100 run and an H200 run for
the full-attention lengths that do not fit on the H100).

    python bench/plot_decode.py bench/results/decode_h100.json [more.json ...] docs/img/decode.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

STYLE = {"cca": ("tab:blue", "CCA (g=16, w=1024)"), "full": ("tab:gray", "full attention")}


def decode_points(paths: list[str]) -> dict[tuple[str, str], list[tuple[int, float, float]]]:
    """(attention, device) -> sorted (T, decode ms, bound ms) of the batch-1 rows that ran."""
    points: dict[tuple[str, str], list[tuple[int, float, float]]] = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        device = data["env"]["device"]
        for row in data["batch1"]:
            if not row.get("decode_fits") or row.get("decode_ms") is None:
                continue
            key = (row["attention"], device)
            points.setdefault(key, []).append(
                (row["T"], row["decode_ms"], row["decode_bound_ms"]))
    return {key: sorted(rows) for key, rows in points.items()}


def main(sources: list[str], dst: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = decode_points(sources)
    if not points:
        raise SystemExit(f"no decode rows that ran in {', '.join(sources)}")
    fig, ax = plt.subplots(figsize=(6.5, 4))
    devices = sorted({device for _, device in points})
    for (attention, device), rows in sorted(points.items()):
        color, label = STYLE.get(attention, ("tab:red", attention))
        marker = "os^v"[devices.index(device) % 4]
        suffix = f", {device}" if len(devices) > 1 else ""
        t = [r[0] / 1024 for r in rows]
        ax.plot(t, [r[1] for r in rows], color=color, marker=marker, label=label + suffix)
        ax.plot(t, [r[2] for r in rows], color=color, marker=marker, linestyle=":",
                alpha=0.6, label=f"bound (bytes / copy bandwidth){suffix}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (K tokens)")
    ax.set_ylabel("decode ms / token (batch 1)")
    ax.set_title("LLaMA-2-7B shapes, bf16: decode step time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dst, dpi=120)
    print("wrote", dst)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    main(sys.argv[1:-1], sys.argv[-1])
