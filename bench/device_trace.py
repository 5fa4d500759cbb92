"""Where a jitted step spends its device time, op by op, from JAX's own profiler trace.

    table = op_table(lambda: step(...), steps=8)

Traces ``steps`` calls of ``run`` (each returns arrays to wait for) with ``jax.profiler`` and
reads the trace back with ``jax.profiler.ProfileData``: for every device plane (GPU) and each of
its lines (XLA ops, XLA modules, CUDA streams), the number of events, their summed duration and
the ``top`` names by time, per step. The sum over the line of kernels against the wall time of a
step says whether a step is kernel time or gaps between kernels. On the CPU the host planes are
read instead (the test's check that the plumbing works).
"""

from __future__ import annotations

import collections
import glob
import tempfile
import time

import jax


def op_table(run, *, steps: int, top: int = 40) -> dict:
    jax.block_until_ready(run())  # compiled and warm
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        t0 = time.perf_counter()
        for _ in range(steps):
            out = run()
        jax.block_until_ready(out)
        wall_ms = (time.perf_counter() - t0) * 1e3 / steps
        jax.profiler.stop_trace()
        paths = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)
        if not paths:
            return {"error": "the profiler wrote no trace", "wall_ms_per_step": wall_ms}
        data = jax.profiler.ProfileData.from_file(paths[0])
    planes = [p for p in data.planes if p.name.startswith("/device:")]
    if not planes:
        planes = [p for p in data.planes if p.name.startswith("/host:CPU")]
    lines = {}
    for plane in planes:
        for line in plane.lines:
            totals, counts = collections.Counter(), collections.Counter()
            for ev in line.events:
                totals[ev.name] += ev.duration_ns
                counts[ev.name] += 1
            if not counts:
                continue
            lines[f"{plane.name} | {line.name}"] = {
                "events_per_step": sum(counts.values()) / steps,
                "us_per_step": sum(totals.values()) / steps / 1e3,
                "top": [{"name": name[:160], "calls_per_step": counts[name] / steps,
                         "us_per_step": ns / steps / 1e3}
                        for name, ns in totals.most_common(top)],
            }
    return {"wall_ms_per_step": wall_ms, "steps": steps, "lines": lines}
