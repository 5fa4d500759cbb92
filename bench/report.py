"""Markdown tables from benchmark JSON files (bench/results/): the tables of docs/benchmarks.md.

    python bench/report.py bench/results/cca_h100_v4.json bench/results/parity_h100.json ...
    python bench/report.py --all          # every result file in bench/results/ of a known kind

Each file's kind is recognised from its content (bench_cca, bench_parity, bench_decode,
bench_train, bench_reattention, fsdp_check); each gets a header line with its device, versions and date, then
its table. Files of another kind are refused with their name.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GiB = 2**30


def _k(t: int) -> str:
    return f"{t // 1024}K" if t >= 1024 and t % 1024 == 0 else str(t)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _env_line(env: dict) -> str:
    keys = ("device", "jax", "jaxlib", "torch", "triton", "python", "date")
    return ", ".join(f"{k} {env[k]}" for k in keys if env.get(k))


def cca_table(data: dict) -> str:
    rows = []
    for r in data["rows"]:
        if "speedup_fwd" not in r:
            rows.append([r["shape"], "error"] + [""] * 11)
            continue
        c, u = r["cca"], r["cudnn"]
        rows.append([_k(r["T"]), f"{r['Hq']}/{r['Hkv']}", f"{u['fwd_ms']:.2f}",
                     f"{c['fwd_ms']:.2f}", f"**{r['speedup_fwd']:.2f}x**",
                     f"{u['fwd_bwd_ms']:.2f}", f"{c['fwd_bwd_ms']:.2f}",
                     f"**{r['speedup_fwd_bwd']:.2f}x**", f"{c['fwd_tflops']:.0f}",
                     f"{c['fwd_bwd_tflops']:.0f}", f"{u['fwd_tflops']:.0f}",
                     f"{c['fwd_floor_ms']:.2f}",
                     f"{c['fwd_bwd_temp_bytes'] / 2**20:.0f} / {u['fwd_bwd_temp_bytes'] / 2**20:.0f}"])
    table = _table(["T", "Hq/Hkv", "cuDNN fwd ms", "CCA fwd ms", "fwd speed-up", "cuDNN f+b ms",
                    "CCA f+b ms", "f+b speed-up", "CCA fwd TF/s", "CCA f+b TF/s",
                    "cuDNN fwd TF/s", "CCA fwd floor ms", "temp MiB CCA / cuDNN"], rows)
    lowered = [r for r in data["rows"] if "fwd_ms" in r.get("cca_triton", {}) and "cca" in r]
    if not lowered:
        return table
    # Runs on Hopper also time the op with the Triton-lowered forward (bench_cca.functions).
    default = lowered[0].get("cca_forward", "default")
    return table + "\n\nThe same op with the Triton-lowered forward kernel, same run:\n\n" + _table(
        ["T", "Hq/Hkv", f"CCA fwd ms ({default})", "CCA fwd ms (Triton-lowered)",
         f"CCA f+b ms ({default})", "CCA f+b ms (Triton-lowered)"],
        [[_k(r["T"]), f"{r['Hq']}/{r['Hkv']}", f"{r['cca']['fwd_ms']:.2f}",
          f"{r['cca_triton']['fwd_ms']:.2f}", f"{r['cca']['fwd_bwd_ms']:.2f}",
          f"{r['cca_triton']['fwd_bwd_ms']:.2f}"] for r in lowered])


def parity_table(data: dict) -> str:
    rows = []
    for r in data["rows"]:
        if "ratio_fwd" not in r:
            rows.append([r.get("shape", "?"), "error"] + [""] * 7)
            continue
        t, p = r["triton"], r["pallas"]
        err = max(r["rel_err_triton_vs_pallas"].values())
        rows.append([_k(r["T"]), f"{r['Hq']}/{r['Hkv']}", f"{t['fwd_ms']:.2f}",
                     f"{p['fwd_ms']:.2f}", f"{r['ratio_fwd']:.2f}", f"{t['fwd_bwd_ms']:.2f}",
                     f"{p['fwd_bwd_ms']:.2f}", f"{r['ratio_fwd_bwd']:.2f}", f"{err:.1e}"])
    return _table(["T", "Hq/Hkv", "Triton fwd ms", "Pallas fwd ms", "P/T fwd", "Triton f+b ms",
                   "Pallas f+b ms", "P/T f+b", "rel err"], rows)


def decode_table(data: dict) -> str:
    rows = []
    for r in data["batch1"]:
        fits = r.get("decode_fits") and r.get("decode_ms") is not None
        rows.append([_k(r["T"]), r["attention"],
                     f"{r['prefill_s']:.2f} (floor {r['prefill_floor_s']:.2f})"
                     if r.get("prefill_s") else "does not fit",
                     f"{r['decode_ms']:.2f} (bound {r['decode_bound_ms']:.2f})" if fits
                     else "does not fit",
                     f"{r['cache_bytes'] / GiB:.2f}", f"{r['memory_bound_bytes'] / GiB:.2f}"])
    table = _table(["T", "attention", "prefill s", "decode ms/token, batch 1", "cache GiB",
                    "weights + cache GiB"], rows)
    search = data.get("batch_search") or []
    if search:
        srows = [[_k(s["T"]), s["attention"], str(s.get("largest_batch") or "none fits"),
                  f"{s['tokens_per_s']:.0f}" if s.get("tokens_per_s") else "-"] for s in search]
        table += "\n\n" + _table(["T", "attention", "largest batch", "decode tokens/s"], srows)
    return table


def train_table(data: dict) -> str:
    rows = [[v["attention"], f"{data['seq_len']}", f"{v['step_ms']:.1f}",
             f"{v['tokens_per_s']:.0f}"] for v in data["variants"] if "step_ms" in v]
    n = data["num_params"]
    size = f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"
    line = (f"model: {data['model']['num_layers']} layers, hidden {data['model']['hidden_size']}, "
            f"{size} parameters; {data['train']}")
    return line + "\n\n" + _table(["attention", "seq len", "step ms", "tokens/s"], rows)


def reattention_table(data: dict) -> str:
    rows = []
    for r in data["prefill"]:
        if "reattention" not in r:
            rows.append([r.get("case", "?"), "error"] + [""] * 8)
            continue
        rope = r.get("cudnn_causal_rope")  # results before 2026-12-04 do not have it
        rows.append([_k(r["T"]), f"{r['Hq']}/{r['Hkv']}", str(r["attended"]),
                     *(_step_ms(r[name], 2) for name in
                       ("reattention", "cudnn_attended", "cudnn_causal")),
                     _step_ms(rope, 2) if rope else "-",
                     _ratio(r, "overhead_vs_attended", 1), _ratio(r, "ratio_vs_causal"),
                     _ratio(r, "ratio_vs_causal_rope") if rope else "-"])
    table = _table(["T", "Hq/Hkv", "attended keys", "ReAttention ms",
                    "cuDNN at attended length ms", "cuDNN causal at T ms",
                    "cuDNN causal + RoPE at T ms", "time / cuDNN at attended length",
                    "time / cuDNN causal at T", "time / cuDNN causal + RoPE"], rows)
    if any("pipelined_ratio_vs_causal" in r for r in data["prefill"]):
        table = ("Times are one call (a wait after each) / back to back (the rate layer after "
                 "layer in a model); ratios likewise.\n\n" + table)
    drows = []
    for r in data.get("decode") or []:
        if "reattention" not in r:
            drows.append([_k(r.get("context", 0)), r.get("case", "?"), "error", "", ""])
            continue
        full = {k[: -len("_full")]: v for k, v in r.items()
                if k.endswith("_full") and isinstance(v, dict) and "median_ms" in v}
        drows.append([_k(r["context"]), f"{r['Hq']}/{r['Hkv']}, d = {r['D']}",
                      _step_ms(r["reattention"]),
                      ", ".join(f"{k} {_step_ms(v)}" for k, v in full.items()),
                      f"{r['kv_cache_bytes_one_layer'] / GiB:.2f}"])
    if drows:
        table += "\n\n" + _table(["context", "heads", "ReAttention decode step ms (one layer; "
                                   "one call, back to back where measured)", "full attention ms",
                                   "KV cache GiB (one layer)"], drows)
    return table


def _ratio(row: dict, key: str, offset: float = 0.0) -> str:
    """The row's ratio ``key`` (+ offset) from one call, '/ back to back' where it has that too
    (``pipelined_<key>``)."""
    one = f"{row[key] + offset:.2f}x"
    pipe = row.get(f"pipelined_{key}")
    return f"{one} / {pipe + offset:.2f}x" if pipe is not None else one


def _step_ms(timing: dict, digits: int = 3) -> str:
    """'one call' ms, and '/ back-to-back' ms where the file has it (``pipelined_ms``)."""
    one = f"{timing['median_ms']:.{digits}f}"
    return f"{one} / {timing['pipelined_ms']:.{digits}f}" if "pipelined_ms" in timing else one


def fsdp_table(data: dict) -> str:
    rows = [[" x ".join(f"{k} {v}" for k, v in m["mesh"].items()), f"{m['loss_rel_err']:.1e}",
             f"{m['params_rel_err']:.1e}", f"{m['split_params']} / {m['num_params']}",
             "yes" if m["ok"] else "NO"] for m in data["meshes"]]
    line = (f"devices: {', '.join(data['devices'])}; {data['steps']} AdamW steps, batch "
            f"{data['batch']} x {data['seq_len']} tokens, accumulation {data['accum_steps']}; "
            f"against one device, tolerance {data['tol']:g}")
    return line + "\n\n" + _table(["mesh", "loss rel err", "params rel err",
                                    "params split", "equal"], rows)


KINDS = [  # (name, recogniser, table)
    ("bench_cca", lambda d: "rows" in d and any("cudnn" in r for r in d["rows"]), cca_table),
    ("bench_parity", lambda d: "rows" in d and any("triton" in r for r in d["rows"]),
     parity_table),
    ("bench_decode", lambda d: "batch1" in d, decode_table),
    ("bench_train", lambda d: "variants" in d and "seq_len" in d, train_table),
    ("bench_reattention", lambda d: "prefill" in d and "selection" in d, reattention_table),
    ("fsdp_check", lambda d: "meshes" in d and "reference_losses" in d, fsdp_table),
]


def _render(path: Path, data: dict) -> str | None:
    """The file's header line and table, or None when it is of no known kind."""
    for name, recognise, table in KINDS:
        if recognise(data):
            env = data.get("env") or data.get("environment") or {}
            return f"`{path.name}` ({name}; {_env_line(env)}):\n\n{table(data)}\n"
    return None


def report(path: str | Path) -> str:
    text = _render(Path(path), json.loads(Path(path).read_text()))
    if text is None:
        raise SystemExit(f"{path}: not a result of any of {', '.join(k[0] for k in KINDS)}")
    return text


def report_all(folder: Path = Path(__file__).parent / "results") -> str:
    """Every file of ``folder`` that is of a known kind, by name; the others listed at the end."""
    parts, other = [], []
    for path in sorted(folder.glob("*.json")):
        text = _render(path, json.loads(path.read_text()))
        if text is None:
            other.append(path.name)
        else:
            parts.append(text)
    if other:
        parts.append("Not tables of this script (sweeps, evaluation reports): "
                     + ", ".join(other) + "\n")
    return "\n".join(parts)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        raise SystemExit(__doc__)
    if sys.argv[1:] == ["--all"]:
        print(report_all())
    else:
        print("\n".join(report(p) for p in sys.argv[1:]))
