"""Where a decode step's time goes beyond its bytes: ablations for one GPU call.

    PYTHONPATH=. python bench/decode_anatomy.py --out $OUT/anatomy.json     # H100/H200, ~4 min
    PYTHONPATH=. python bench/decode_anatomy.py --quick --out /tmp/a.json   # tiny, CPU, < 1 min

The decode benchmark (LLaMA-2-7B shapes, batch 1) found about 2.2 ms per step on top of the bytes
read, the same for CCA and full attention, so a cost per kernel or per layer rather than per byte.
This script separates it, at one context length (``--context``, default 128K) and attention
(``--attention``, default cca):

* layers: the step of models of 1, 8 and 32 layers (same shapes otherwise). A straight line through
  (layers, ms) gives the per-layer cost and the fixed cost (embedding, final norm, LM head, the
  step's dispatch); the per-layer cost over the per-layer bytes at ``--bandwidth-gbps`` shows
  how far each layer is from its bandwidth bound.
* XLA flags: the 32-layer step again in a fresh process per flag set (XLA reads its flags once),
  e.g. CUDA-graph command buffers off, on for every command type, on from the first kernel. A flag
  this XLA does not know fails that process; the failure is recorded and the rest runs.
* kernels: how many kernels (fusions, custom calls, library calls) the compiled step launches.
* ``--profile``: the smallest model's step traced op by op (``bench/device_trace.py``): device
  time per XLA op and per kernel, against the step's wall time.

Timing as in ``bench/bench_decode.py`` (steps dispatched back to back, the median per step).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.bench_decode import (base_config, cache_bytes_read, decode_fn, graphdef_of,  # noqa: E402
                                layout_args, random_state, synthetic_cache, time_decode,
                                weight_bytes_read)
from bench import device_trace  # noqa: E402
from bench.common import environment, json_from_child  # noqa: E402

FLAG_SETS = {
    "command buffers off": "--xla_gpu_enable_command_buffer=",
    "command buffers, every type": "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,"
                                   "CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,WHILE,CONDITIONAL",
    "command buffers from one kernel": "--xla_gpu_graph_min_graph_size=1",
    "GEMMs to cuBLAS (no Triton GEMM fusions)": "--xla_gpu_enable_triton_gemm=false",
}
KERNEL_OPS = ("fusion", "custom-call", "cublas", "gemm", "dot")


def kernel_counts(hlo: str) -> dict:
    """Launch-like instructions of the compiled step's entry and fused computations."""
    counts = {op: len(re.findall(rf"= [^=]*? {op}\(", hlo)) for op in ("fusion", "custom-call")}
    counts["triton custom calls"] = hlo.count("__gpu$xla.gpu.triton")
    counts["cublas calls"] = hlo.count("__cublas$")
    return counts


def measure(layers: int, args) -> dict:
    """One decode step of a model with ``layers`` layers at context ``args.context``."""
    max_len = args.context + 2 * args.steps + 8
    config = base_config(args.quick, max_len, not args.separate_projections).replace(
        attention=args.attention, num_layers=layers)
    state = jax.block_until_ready(random_state(config))
    cache = synthetic_cache(config, 1, max_len, args.context)
    tokens = jnp.zeros((1,), jnp.int32)
    t0 = time.perf_counter()
    compiled = decode_fn(graphdef_of(config)).lower(state, tokens, cache).compile()
    compile_s = time.perf_counter() - t0
    ms, synced, cache = time_decode(compiled, state, tokens, cache, args.steps)
    profile = None
    if args.profile:
        held = [cache]

        def step():
            logits, held[0] = compiled(state, tokens, held[0])
            return logits

        profile = device_trace.op_table(step, steps=8)
        cache = held[0]
    read = weight_bytes_read(config, state, 1) + cache_bytes_read(config, args.context, max_len)
    row = {"layers": layers, "compile_s": compile_s, "decode_ms": ms, "decode_ms_synced": synced,
           "bytes_read": read, "bound_ms": read / (args.bandwidth_gbps * 1e6),
           "kernels": kernel_counts(compiled.as_text() or "")}
    if profile is not None:
        row["profile"] = profile
        row["hlo"] = compiled.as_text()  # maps the traced fusion names to the model's ops
    del cache, state
    return row


def fit(rows: list[dict]) -> dict:
    """ms = fixed + per_layer * layers, least squares."""
    x = np.array([r["layers"] for r in rows], float)
    y = np.array([r["decode_ms"] for r in rows], float)
    per_layer, fixed = np.polyfit(x, y, 1) if len(rows) > 1 else (float("nan"), float("nan"))
    return {"per_layer_ms": float(per_layer), "fixed_ms": float(fixed)}


def in_child(flags: str, layers: int, args) -> dict:
    """:func:`measure` in a fresh process whose XLA_FLAGS carry ``flags``: XLA reads its flags
    once, and the memory JAX takes in a process stays taken until it exits (so this process
    never touches the device)."""
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-layers", str(layers),
           "--context", str(args.context), "--attention", args.attention, "--steps",
           str(args.steps), "--bandwidth-gbps", str(args.bandwidth_gbps)
           ] + (["--quick"] if args.quick else []) + layout_args(args) + (
               ["--profile"] if args.profile and layers == min(args.layer_counts) and not flags
               else [])
    return {"flags": flags, "layers": layers,
            **json_from_child(cmd, timeout=args.child_timeout, env=env)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=None, help="tokens held (default 131072)")
    ap.add_argument("--attention", default="cca", choices=("cca", "full"))
    ap.add_argument("--layers", default=None, help="layer counts (default 1,8,32; quick: 1,2)")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--bandwidth-gbps", type=float, default=4300.0,
                    help="for the bound (default: the H200's device copy rate seen with torch)")
    ap.add_argument("--no-flags", action="store_true", help="skip the XLA flag variants")
    ap.add_argument("--flag-sets", type=int, default=None,
                    help="run only the first N of the XLA flag sets (default: all)")
    ap.add_argument("--flag-set", action="append", default=[], metavar="NAME=FLAGS",
                    help="an XLA flag set to try besides the built-in ones (repeatable)")
    ap.add_argument("--child-timeout", type=float, default=240.0,
                    help="seconds each measuring process may take (default 240)")
    ap.add_argument("--separate-projections", action="store_true",
                    help="q, k, v and gate, up as separate matrices instead of the serving layout")
    ap.add_argument("--profile", action="store_true",
                    help="trace the smallest model's step op by op (bench/device_trace.py)")
    ap.add_argument("--quick", action="store_true", help="tiny model (CPU check)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child-layers", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.context = args.context or (512 if args.quick else 131072)
    args.layer_counts = [int(x) for x in (args.layers or ("1,2" if args.quick else "1,8,32"))
                         .split(",")]
    flag_sets = [] if args.no_flags else list(FLAG_SETS.items())[:args.flag_sets]
    for entry in args.flag_set:
        name, sep, flags = entry.partition("=")
        if not sep or not flags.strip().startswith("--"):
            ap.error(f"--flag-set wants NAME=--xla_flag=value..., got {entry!r}")
        flag_sets.append((name, flags.strip()))
    if args.child_layers:
        row = {"env": environment(), **measure(args.child_layers, args)}
        Path(args.out).write_text(json.dumps(row))
        return 0
    results = {"context": args.context, "attention": args.attention,
               "bandwidth_gbps": args.bandwidth_gbps, "layers": [], "flags": []}
    out = Path(args.out) if args.out else None

    def save():
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1))

    for n in args.layer_counts:
        row = in_child("", n, args)
        results.setdefault("env", row.pop("env", None))
        row.pop("env", None)
        results["layers"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "hlo"}), flush=True)
        save()
    results["fit"] = fit([r for r in results["layers"] if "decode_ms" in r])
    print(json.dumps(results["fit"]), flush=True)
    save()
    for name, flags in flag_sets:
        results["flags"].append({"name": name, **in_child(flags, args.layer_counts[-1], args)})
        results["flags"][-1].pop("env", None)
        print(json.dumps({k: v for k, v in results["flags"][-1].items() if k != "kernels"}),
              flush=True)
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
