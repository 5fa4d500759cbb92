"""Plot bench_decode.py results: decode ms/token against context length, CCA and full attention,
each with its HBM-bandwidth bound; one or more JSON files (e.g. an H100 run and an H200 run for
the full-attention lengths that do not fit on the H100).

    python bench/plot_decode.py bench/results/decode_h100.json [more.json ...] docs/img/decode.png
    python bench/plot_decode.py --bandwidth-gbps 4300 decode_h200*.json docs/img/decode_h200.png

The bound is each row's ``decode_bound_ms``: bytes read over the bandwidth measured in that run
(bench_decode.py's ``bandwidth_gbps``: the larger of the read-only and copy rates), or over
``--bandwidth-gbps`` when given (for runs whose measured rate is known to be understated).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

STYLE = {"cca": ("tab:blue", "CCA (g=16, w=1024)"), "full": ("tab:gray", "full attention")}


def decode_points(paths: list[str], bandwidth_gbps: float | None = None
                  ) -> dict[tuple[str, str], list[tuple[int, float, float]]]:
    """(attention, device) -> sorted (T, decode ms, bound ms) of the batch-1 rows that ran."""
    points: dict[tuple[str, str], list[tuple[int, float, float]]] = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        device = data["env"]["device"]
        for row in data["batch1"]:
            if not row.get("decode_fits") or row.get("decode_ms") is None:
                continue
            key = (row["attention"], device)
            bound = (row["decode_bytes_read"] / bandwidth_gbps / 1e6 if bandwidth_gbps
                     else row["decode_bound_ms"])
            points.setdefault(key, []).append((row["T"], row["decode_ms"], bound))
    return {key: sorted(rows) for key, rows in points.items()}


def main(sources: list[str], dst: str, bandwidth_gbps: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = decode_points(sources, bandwidth_gbps)
    rate = f"{bandwidth_gbps / 1000:.1f} TB/s" if bandwidth_gbps else "measured bandwidth"
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
                alpha=0.6, label=f"bound (bytes / {rate}){suffix}")
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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sources", nargs="+", help="bench_decode.py JSON files")
    ap.add_argument("dst", help="the PNG to write")
    ap.add_argument("--bandwidth-gbps", type=float, default=None,
                    help="bound = bytes read / this rate (default: each run's measured bandwidth)")
    args = ap.parse_args()
    main(args.sources, args.dst, args.bandwidth_gbps)
