"""Timing and environment helpers shared by the GPU benchmarks."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
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


def measure_peaks(size: int = 8192, copy_bytes: int = 2**30) -> dict:
    """Measured bf16 matmul rate (TFLOP/s) and device copy bandwidth (GB/s, read + write)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.bfloat16)
    b = jax.random.normal(jax.random.PRNGKey(1), (size, size), jnp.bfloat16)
    mm = jax.jit(lambda x, y: x @ y)
    t = time_fn(mm, a, b, reps=20)["median_ms"]
    x = jax.random.normal(jax.random.PRNGKey(2), (copy_bytes // 4,), jnp.float32)
    cp = jax.jit(lambda x: x * 1.0001)
    tc = time_fn(cp, x, reps=20)["median_ms"]
    return {"matmul_tflops": 2 * size**3 / t / 1e9, "copy_gbps": 2 * copy_bytes / tc / 1e6}


def save_results(name: str, payload: dict) -> Path:
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1))
    return path
