"""Triton (PyTorch) against Pallas (JAX) CCA kernels, in one process on one GPU, same inputs.

    PYTHONPATH=. python bench/bench_parity.py                    # 8K..128K, MHA 32/32 and GQA 32/8
    PYTHONPATH=. python bench/bench_parity.py --lengths 8192,32768 --reps 20

B = 1, d = 128, bf16, g = 16, w = 1024 (the paper's setting). For every shape: the Triton kernels
(``kernels/cca/triton.py``) forward and forward+backward, timed from torch with the same method as
``bench/common.time_fn`` uses for the Pallas kernels (median wall time of several runs after
warm-up, synchronised: ``torch.cuda.synchronize`` / ``block_until_ready``); the Pallas/Triton
time ratio (below 1: Pallas faster; the goal is at most 1.10); and the relative error between the
two implementations' outputs and gradients on the same bf16 inputs (shared through DLPack).
Shapes left when ``--budget-s`` runs out are skipped (the JSON says so). Writes
``parity_<device>.json`` through ``bench/common.save_results`` ($OUT or bench/results/).
"""

from __future__ import annotations

import os

# jax and torch share the GPU: jax must not take 75% of it up front (before importing jax).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import environment, save_results, time_fn  # noqa: E402
from kernels.cca import pallas  # noqa: E402
from kernels.cca import triton as cca_triton  # noqa: E402
from kernels.cca.shapes import gpu_shapes  # noqa: E402


def time_torch(fn, *, warmup: int = 2, reps: int = 10) -> dict:
    """Median/min wall time in ms of ``fn()``, synchronised like ``bench.common.time_fn``."""
    for _ in range(warmup):
        fn()
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "reps": reps}


def to_jax(x: torch.Tensor) -> jax.Array:
    try:
        return jax.dlpack.from_dlpack(x.detach().contiguous())
    except Exception:  # pragma: no cover - older stacks without CUDA DLPack exchange
        return jnp.asarray(x.detach().float().cpu().numpy()).astype(jnp.bfloat16)


def to_torch(x: jax.Array) -> torch.Tensor:
    try:
        return torch.from_dlpack(x)
    except Exception:  # pragma: no cover
        return torch.as_tensor(np.asarray(x.astype(jnp.float32))).cuda()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    if not bool(torch.isfinite(out).all()):
        return float("nan")
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))


def bench_shape(shape, reps: int) -> dict:
    kw = dict(group_size=shape.group_size, local_window=shape.local_window)
    gen = torch.Generator(device="cuda").manual_seed(shape.length + shape.kv_heads)
    b, t, d = shape.batch, shape.length, shape.head_dim
    draw = lambda h: torch.randn((b, t, h, d), generator=gen, device="cuda",
                                 dtype=torch.bfloat16)
    q, k, v, ct = draw(shape.q_heads), draw(shape.kv_heads), draw(shape.kv_heads), \
        draw(shape.q_heads)
    row = {"shape": shape.id, "T": t, "Hq": shape.q_heads, "Hkv": shape.kv_heads}

    # ---- Triton (torch autograd over the Triton kernels)
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))

    def triton_fwd():
        with torch.no_grad():
            return cca_triton.cca_attention(q, k, v, **kw)

    def triton_fwd_bwd():
        out = cca_triton.cca_attention(qg, kg, vg, **kw)
        return torch.autograd.grad(out, (qg, kg, vg), ct)

    out_t = cca_triton.cca_attention(qg, kg, vg, **kw)
    grads_t = torch.autograd.grad(out_t, (qg, kg, vg), ct)
    results_t = [out_t.detach(), *grads_t]
    row["triton"] = {"fwd_ms": time_torch(triton_fwd, reps=reps)["median_ms"],
                     "fwd_bwd_ms": time_torch(triton_fwd_bwd, reps=reps)["median_ms"]}
    del qg, kg, vg, out_t, grads_t
    torch.cuda.empty_cache()

    # ---- Pallas (jax.custom_vjp over the Pallas kernels), on the very same bf16 values
    qj, kj, vj, ctj = (to_jax(x) for x in (q, k, v, ct))
    cca = lambda q, k, v: pallas.cca_attention(q, k, v, **kw)

    def with_grad(q, k, v, ct):
        out, vjp = jax.vjp(cca, q, k, v)
        return (out, *vjp(ct))

    fwd, fwd_bwd = jax.jit(cca), jax.jit(with_grad)
    results_p = fwd_bwd(qj, kj, vj, ctj)
    row["pallas"] = {"fwd_ms": time_fn(fwd, qj, kj, vj, reps=reps)["median_ms"],
                     "fwd_bwd_ms": time_fn(fwd_bwd, qj, kj, vj, ctj, reps=reps)["median_ms"]}
    row["rel_err_triton_vs_pallas"] = {
        name: rel_err(a, to_torch(p)) for name, a, p in
        zip(("out", "dq", "dk", "dv"), results_t, results_p)}
    for phase in ("fwd", "fwd_bwd"):
        row[f"ratio_{phase}"] = row["pallas"][f"{phase}_ms"] / row["triton"][f"{phase}_ms"]
    del results_p, qj, kj, vj, ctj, results_t
    torch.cuda.empty_cache()
    return row


def versions() -> dict:
    import triton

    env = environment()
    env.update(torch=torch.__version__, triton=triton.__version__,
               torch_device=torch.cuda.get_device_name(0))
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="8192,16384,32768,65536,131072")
    ap.add_argument("--reps", type=int, default=10, help="timed runs per measurement (>= 32K: "
                                                         "half, at least 3)")
    ap.add_argument("--budget-s", type=float, default=270.0,
                    help="skip the remaining shapes once this much time has passed")
    ap.add_argument("--name", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or jax.default_backend() != "gpu":
        print("bench_parity needs a CUDA GPU visible to both torch and jax", file=sys.stderr)
        return 2
    start = time.perf_counter()
    env = versions()
    print(env, flush=True)
    results = {"env": env, "config": {"batch": 1, "head_dim": 128, "dtype": "bfloat16",
                                      "group_size": 16, "local_window": 1024,
                                      "timing": "median wall ms, synchronised, after 2 warm-ups"},
               "rows": []}
    for t in map(int, args.lengths.split(",")):
        for shape in gpu_shapes(t):
            if time.perf_counter() - start > args.budget_s:
                row = {"shape": shape.id, "skipped": f"time budget of {args.budget_s:.0f} s spent"}
            else:
                reps = args.reps if t <= 32768 else max(3, args.reps // 2)
                try:
                    row = bench_shape(shape, reps)
                except Exception:
                    row = {"shape": shape.id, "error": traceback.format_exc()[-2000:]}
                    torch.cuda.empty_cache()
            print(row, flush=True)
            results["rows"].append(row)
    results["wall_s"] = time.perf_counter() - start
    name = args.name or "parity_" + env["device"].replace(" ", "_")
    print("saved", save_results(name, results))

    print(f"\n{'shape':40s} {'triton fwd':>10s} {'pallas fwd':>10s} {'P/T':>5s} "
          f"{'triton f+b':>10s} {'pallas f+b':>10s} {'P/T':>5s} {'max rel err':>11s}")
    for r in results["rows"]:
        if "ratio_fwd" not in r:
            print(f"{r['shape']:40s} {r.get('skipped') or 'ERROR ' + r['error'][-200:]}")
            continue
        err = max(r["rel_err_triton_vs_pallas"].values())
        print(f"{r['shape']:40s} {r['triton']['fwd_ms']:10.2f} {r['pallas']['fwd_ms']:10.2f} "
              f"{r['ratio_fwd']:5.2f} {r['triton']['fwd_bwd_ms']:10.2f} "
              f"{r['pallas']['fwd_bwd_ms']:10.2f} {r['ratio_fwd_bwd']:5.2f} {err:11.2e}")
    print("P/T = Pallas time / Triton time (goal <= 1.10); rel err: Triton vs Pallas, bf16, "
          "max over out, dq, dk, dv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
