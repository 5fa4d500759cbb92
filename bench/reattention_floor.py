"""The ReAttention prefill's floor against issue 7's goal, from a ``bench_reattention.py`` result:

    python bench/reattention_floor.py bench/results/reattention_kb32_profile_h100_s20.json

For each prefill row (block picks), the floor is what the op would take with each part at the
best rate the same run measured on the same GPU, and everything else free:

* attention: the row's exact attended pairs (``attended_pairs``, the cuDNN prefix's chunks
  included) x 4 d x Hq FLOP, at cuDNN's own rate over the attended keys (its T x attended
  pairs in ``cudnn_attended``'s time);
* scoring: every row of every chunk with a middle against each of its middle's blocks, one
  2d-wide dot product (the signed rows against the blocks' maxima and minima), at the run's
  matmul rate (``peaks``);
* list gathers: the rotated keys written once (sink + kept blocks x b slots per chunk and kv
  head), at the run's read bandwidth. Their reads are left out: on random inputs the same
  blocks win in many chunks, and most of those reads hit L2.

The goal is 1.10 x cuDNN at the attended length. "room" is what the goal leaves above the
floor, "above" what the op spends there now (its one-call time minus the floor). Rows with a
``profile`` also split the device time into the Mosaic GPU kernels (scoring + attention), the
gathers, the cuDNN prefix and the rest. Plain arithmetic on the file: runs anywhere.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from kernels.reattention import reference
from kernels.reattention.params import Selection

GOAL = 1.10


def chunk_geometry(length: int, q_heads: int, kv_heads: int, head_dim: int, sel: Selection):
    """(rows, middle blocks, kept slots) per chunk of a prefill of ``length`` tokens, batch 1."""
    geo = reference.geometry((1, length, q_heads, head_dim), (1, length, kv_heads, head_dim),
                             sel)
    starts = reference.query_starts(None, 1, length, length)
    c0, c1, l0 = (np.asarray(x)[0].astype(np.float64)
                  for x in reference.chunk_bounds(starts, geo))
    middle = np.maximum(l0 - sel.sink_tokens, 0)
    blocks = middle // sel.key_block
    kept = np.where(middle > 0, sel.sink_tokens + sel.key_block * np.minimum(
        sel.max_selected, blocks), 0)
    return c1 - c0, blocks, kept


def floor_row(row: dict, peaks: dict, sel: Selection, head_dim: int = 128) -> dict:
    """The floor account of one ``bench_reattention`` prefill row (times in ms)."""
    t, hq, hkv = row["T"], row["Hq"], row["Hkv"]
    rows, blocks, kept = chunk_geometry(t, hq, hkv, head_dim, sel)
    cudnn_ms = row["cudnn_attended"]["median_ms"]
    cudnn_rate = 4.0 * t * row["attended"] * head_dim * hq / (cudnn_ms * 1e-3)
    attention = 4.0 * row["reattention"]["attended_pairs"] * head_dim * hq / cudnn_rate * 1e3
    score_flop = float(np.sum(2.0 * rows * hq * blocks * 2 * head_dim))
    scoring = score_flop / (peaks["matmul_tflops"] * 1e12) * 1e3
    key_bytes = float(np.sum(kept * head_dim * 2 * hkv))
    gathers = key_bytes / (peaks["read_gbps"] * 1e9) * 1e3
    op = row["reattention"]["median_ms"]
    floor = attention + scoring + gathers
    out = {"T": t, "Hkv": hkv, "op_ms": op, "cudnn_attended_ms": cudnn_ms,
           "cudnn_tflops": cudnn_rate / 1e12, "goal_ms": GOAL * cudnn_ms,
           "floor_ms": {"attention": attention, "scoring": scoring, "key_writes": gathers,
                        "total": floor},
           "scoring_flop": score_flop, "key_write_bytes": key_bytes,
           "above_floor_ms": op - floor, "room_ms": GOAL * cudnn_ms - floor}
    if "profile" in row:
        out["device_ms"] = device_split(row["profile"])
        out["device_above_floor_ms"] = out["device_ms"]["total"] - floor
    return out


def device_split(profile: dict) -> dict:
    """The device time (ms per call) of a profile's busiest stream, by kind of kernel; "rest"
    includes the ops past the profile's top list."""
    line = max(profile["lines"].values(), key=lambda ln: ln["us_per_step"])
    split = {"mosaic_gpu": 0.0, "gathers": 0.0, "cudnn": 0.0}
    for op in line["top"]:
        name = op["name"]
        kind = ("mosaic_gpu" if "mosaic_gpu" in name else "gathers"
                if name.startswith("reattention_gather") else "cudnn"
                if name.startswith("cudnn") else None)
        if kind:
            split[kind] += op["us_per_step"] / 1e3
    split["total"] = line["us_per_step"] / 1e3
    split["rest"] = split["total"] - sum(split[k] for k in ("mosaic_gpu", "gathers", "cudnn"))
    return split


def account(data: dict) -> list[dict]:
    sel = Selection(**data["selection"])
    if sel.key_block <= 1:
        raise ValueError("the floor account is for block picks (key_block > 1): token picks "
                         "score every key")
    return [floor_row(r, data["peaks"], sel) for r in data["prefill"] if "reattention" in r]


def table(rows: list[dict]) -> str:
    lines = ["| T | kv heads | op ms | goal ms | floor ms (attention + scoring + key writes) "
             "| above the floor: op / device time | room above the floor |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        f = r["floor_ms"]
        device = r.get("device_above_floor_ms")
        lines.append(f"| {r['T'] // 1024}K | {r['Hkv']} | {r['op_ms']:.2f} | {r['goal_ms']:.2f} "
                     f"| {f['attention']:.2f} + {f['scoring']:.2f} + {f['key_writes']:.2f} = "
                     f"{f['total']:.2f} | {r['above_floor_ms']:.1f} / "
                     f"{'-' if device is None else f'{device:.1f}'} | {r['room_ms']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("result", help="a bench_reattention.py JSON with block picks")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args(argv)
    rows = account(json.loads(Path(args.result).read_text()))
    print(json.dumps(rows, indent=1) if args.json else table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
