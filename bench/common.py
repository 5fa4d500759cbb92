"""Timing and environment helpers shared by the GPU benchmarks."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp


def environment() -> dict:
    dev = jax.devices()[0]
    env = {
        "device": getattr(dev, "device_kind", str(dev)),
        "platform": dev.platform,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import jaxlib

        env["jaxlib"] = jaxlib.__version__
    except Exception:  # pragma: no cover
        pass
    return env


def time_fn(fn, *args, warmup: int = 2, reps: int = 10, min_time_s: float = 0.0) -> dict:
    """Median/min wall time in ms of a jitted fn (synchronised with block_until_ready)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    start_all = time.perf_counter()
    while len(times) < reps or time.perf_counter() - start_all < min_time_s:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) > 1000:
            break
    return {"median_ms": statistics.median(times), "min_ms": min(times), "reps": len(times)}


def time_pipelined(fn, *args, calls: int = 20, rounds: int = 5) -> float:
    """Best ms per call of ``fn(*args)`` over ``rounds`` rounds of ``calls`` back-to-back
    dispatches with one wait each: the host's dispatch and sync, which ``time_fn`` counts in every
    call, overlap with the device's work here, as they do in a real program."""
    jax.block_until_ready(fn(*args))  # compile + warm-up
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t0) * 1e3 / calls)
        del out
    return best


def time_alternating(fns: dict, *, calls: int, rounds: int) -> dict[str, float]:
    """A/B timing: ``fns`` maps a name to ``(fn, args)``; every round times ``calls``
    back-to-back calls of each in turn (one wait each), so drift in clocks or temperature hits
    all alike. Returns the median ms per call of each name over the rounds."""
    times = {n: [] for n in fns}
    for _ in range(rounds):
        for n, (f, a) in fns.items():
            jax.block_until_ready(f(*a))
            t0 = time.perf_counter()
            for _ in range(calls):
                out = f(*a)
            jax.block_until_ready(out)
            times[n].append((time.perf_counter() - t0) * 1e3 / calls)
    return {n: statistics.median(v) for n, v in times.items()}


def measure_peaks(size: int = 8192, copy_bytes: int = 2**30) -> dict:
    """Measured ceilings of this device: bf16 matmul rate (TFLOP/s, a ``size``^3 product), copy
    bandwidth (GB/s, bytes read + written by an elementwise op over ``copy_bytes``) and read
    bandwidth (GB/s, bytes read by a sum over ``copy_bytes``), each the best of several rounds of
    back-to-back calls (:func:`time_pipelined`). ``bandwidth_gbps`` is the larger of the two
    rates: the one a bound built from bytes moved should use (the tighter bound)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.bfloat16)
    b = jax.random.normal(jax.random.PRNGKey(1), (size, size), jnp.bfloat16)
    t_mm = time_pipelined(jax.jit(lambda x, y: x @ y), a, b)
    x = jax.random.normal(jax.random.PRNGKey(2), (copy_bytes // 4,), jnp.float32)
    t_copy = time_pipelined(jax.jit(lambda x: x * 1.0001), x)
    t_read = time_pipelined(jax.jit(lambda x: jnp.sum(x)), x)
    copy_gbps, read_gbps = 2 * copy_bytes / t_copy / 1e6, copy_bytes / t_read / 1e6
    return {"matmul_tflops": 2 * size**3 / t_mm / 1e9, "copy_gbps": copy_gbps,
            "read_gbps": read_gbps, "bandwidth_gbps": max(copy_gbps, read_gbps),
            "method": "best of 5 rounds of 20 back-to-back calls, one wait per round"}


def json_from_child(cmd: list[str], *, timeout: float, env: dict | None = None) -> dict:
    """Runs ``cmd + ["--out", FILE]`` in a fresh process and returns the JSON it wrote to FILE,
    or ``{"error": why}`` when it timed out or wrote nothing (with its stderr's tail). A fresh
    process is how the benchmarks isolate runs: XLA reads its flags once per process, and the
    device memory a JAX process takes stays taken (an out-of-memory attempt included) until it
    exits."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        try:
            proc = subprocess.run([*cmd, "--out", str(out)], env=env, capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"did not finish in {timeout:.0f} s"}
        if out.exists():
            return json.loads(out.read_text())
        return {"error": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}


def save_results(name: str, payload: dict) -> Path:
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1))
    return path


def write_rows(rows: list, note: str, out: str | None, peaks: bool = False) -> None:
    """An A/B script's result file (when ``out`` is given): the environment, a note, the rows,
    and with ``peaks`` this device's measured ceilings (:func:`measure_peaks`)."""
    if out:
        extra = {"peaks": measure_peaks()} if peaks else {}
        Path(out).write_text(json.dumps({"env": environment(), "note": note, **extra,
                                         "rows": rows}, indent=1))
