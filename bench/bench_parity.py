"""Triton (PyTorch) against Pallas (JAX) CCA kernels, in one process on one GPU, same inputs.

    PYTHONPATH=. python bench/bench_parity.py                    # 8K..128K, MHA 32/32 and GQA 32/8
    PYTHONPATH=. python bench/bench_parity.py --lengths 8192,32768 --rounds 11

B = 1, d = 128, bf16, g = 16, w = 1024 (the paper's setting). For every shape: the Triton kernels
(``kernels/cca/triton.py``) forward and forward+backward against the Pallas ones, timed the same
way on both sides and in alternating rounds (Triton, Pallas, Triton, ...) so that clock drift hits
both alike: each round dispatches enough back-to-back calls to fill ``--round-ms`` and waits once
(``torch.cuda.synchronize`` / ``block_until_ready``), so the host's per-call dispatch and sync,
tens of microseconds that matter at 8K, are not counted; the per-call time is the median over
rounds (the synchronised single-call median is kept too, as ``*_synced_ms``); the Pallas/Triton
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

from bench.common import environment, save_results  # noqa: E402
from kernels.cca import pallas  # noqa: E402
from kernels.cca import triton as cca_triton  # noqa: E402
from kernels.cca.shapes import gpu_shapes  # noqa: E402


def torch_sync(_out) -> None:
    torch.cuda.synchronize()


def jax_sync(out) -> None:
    jax.block_until_ready(out)


def synced_ms(call, sync, reps: int) -> float:
    """Median wall ms of single calls, each waited for (the older method, kept for reference)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sync(call())
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def compare(sides: dict, *, rounds: int, round_ms: float, warmup: int = 2) -> dict:
    """{name: {"ms", "min_ms", "synced_ms", "calls_per_round"}} for ``sides`` = {name: (call,
    sync)}: alternating rounds of back-to-back calls, one wait per round."""
    per_round = {}
    for name, (call, sync) in sides.items():
        for _ in range(warmup):
            sync(call())
        once = synced_ms(call, sync, 3)
        per_round[name] = max(1, min(1000, int(round_ms / max(once, 1e-3))))
    times = {name: [] for name in sides}
    for _ in range(rounds):
        for name, (call, sync) in sides.items():
            n = per_round[name]
            t0 = time.perf_counter()
            for _ in range(n):
                out = call()
            sync(out)
            times[name].append((time.perf_counter() - t0) * 1e3 / n)
            del out
    return {name: {"ms": statistics.median(times[name]), "min_ms": min(times[name]),
                   "synced_ms": synced_ms(*sides[name], max(3, rounds)),
                   "calls_per_round": per_round[name]} for name in sides}


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


def bench_shape(shape, rounds: int, round_ms: float) -> dict:
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
    del out_t, grads_t

    # ---- Pallas (jax.custom_vjp over the Pallas kernels), on the very same bf16 values
    qj, kj, vj, ctj = (to_jax(x) for x in (q, k, v, ct))
    cca = lambda q, k, v: pallas.cca_attention(q, k, v, **kw)

    def with_grad(q, k, v, ct):
        out, vjp = jax.vjp(cca, q, k, v)
        return (out, *vjp(ct))

    fwd, fwd_bwd = jax.jit(cca), jax.jit(with_grad)
    results_p = fwd_bwd(qj, kj, vj, ctj)
    timing = dict(rounds=rounds, round_ms=round_ms)
    fwd_times = compare({"triton": (triton_fwd, torch_sync),
                         "pallas": (lambda: fwd(qj, kj, vj), jax_sync)}, **timing)
    bwd_times = compare({"triton": (triton_fwd_bwd, torch_sync),
                         "pallas": (lambda: fwd_bwd(qj, kj, vj, ctj), jax_sync)}, **timing)
    for side in ("triton", "pallas"):
        row[side] = {"fwd_ms": fwd_times[side]["ms"], "fwd_bwd_ms": bwd_times[side]["ms"],
                     "fwd_synced_ms": fwd_times[side]["synced_ms"],
                     "fwd_bwd_synced_ms": bwd_times[side]["synced_ms"],
                     "fwd_min_ms": fwd_times[side]["min_ms"],
                     "fwd_bwd_min_ms": bwd_times[side]["min_ms"]}
    row["rel_err_triton_vs_pallas"] = {
        name: rel_err(a, to_torch(p)) for name, a, p in
        zip(("out", "dq", "dk", "dv"), results_t, results_p)}
    for phase in ("fwd", "fwd_bwd"):
        row[f"ratio_{phase}"] = row["pallas"][f"{phase}_ms"] / row["triton"][f"{phase}_ms"]
    del results_p, qj, kj, vj, ctj, results_t, qg, kg, vg
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
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds per measurement")
    ap.add_argument("--round-ms", type=float, default=100.0,
                    help="back-to-back calls per round: enough to fill this many ms")
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
                                      "timing": f"median over {args.rounds} alternating rounds "
                                                f"of back-to-back calls filling "
                                                f"{args.round_ms:.0f} ms, one wait per round"},
               "rows": []}
    for t in map(int, args.lengths.split(",")):
        for shape in gpu_shapes(t):
            if time.perf_counter() - start > args.budget_s:
                row = {"shape": shape.id, "skipped": f"time budget of {args.budget_s:.0f} s spent"}
            else:
                try:
                    row = bench_shape(shape, args.rounds, args.round_ms)
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
