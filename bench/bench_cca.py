"""CCA Pallas kernels against cuDNN causal full attention, in the same run on the same GPU.

    PYTHONPATH=. python bench/bench_cca.py                 # 8K..128K, MHA 32/32 and GQA 32/8
    PYTHONPATH=. python bench/bench_cca.py --lengths 8192 --check

Times forward and forward+backward (median of several runs after warm-up), reports speed-up,
achieved TFLOP/s counting only the work each must do (CCA: the visible core + local keys of every
query, plus pooling; full: the causal triangle), XLA's temp memory of each compiled function, and
the floor = FLOPs / measured bf16 matmul rate. Writes bench/results/cca_<device>.json (or $OUT).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import traceback

import jax
import jax.numpy as jnp

from bench.common import environment, measure_peaks, save_results, time_fn
from kernels.cca import pallas, pallas_mgpu, reference
from kernels.cca.shapes import gpu_shapes

BWD_FACTOR = 2.5  # backward matmuls per forward matmul (QK^T recompute, dV, dP, dQ, dK)


def attention_flops(shape, causal_full: bool) -> float:
    b, t, hq, d = shape.batch, shape.length, shape.q_heads, shape.head_dim
    if causal_full:
        keys = t * (t + 1) / 2
        return 4.0 * b * hq * d * keys
    core, raw = reference.visible_key_counts(t, shape.group_size, shape.local_window)
    pooling = 6.0 * b * shape.kv_heads * d * (t // shape.group_size) * shape.group_size
    return 4.0 * b * hq * d * (core + raw) + pooling


def make_inputs(shape, dtype=jnp.bfloat16, seed=0):
    kq, kk, kv, kc = jax.random.split(jax.random.PRNGKey(seed), 4)
    b, t, d = shape.batch, shape.length, shape.head_dim
    q = jax.random.normal(kq, (b, t, shape.q_heads, d), dtype)
    k = jax.random.normal(kk, (b, t, shape.kv_heads, d), dtype)
    v = jax.random.normal(kv, (b, t, shape.kv_heads, d), dtype)
    ct = jax.random.normal(kc, q.shape, dtype)
    return q, k, v, ct


def functions(shape):
    """name -> (forward, forward+backward), jitted. "cca" is the op as users get it (on Hopper its
    forward is the Mosaic GPU kernel); there, "cca_triton" is the same op with the Triton-lowered
    forward kernel, for comparison."""
    kw = dict(group_size=shape.group_size, local_window=shape.local_window)
    cca = lambda q, k, v: pallas.cca_attention(q, k, v, **kw)
    triton_config = dataclasses.replace(pallas.default_config(shape.head_dim, 2),
                                        forward_lowering="triton")
    cca_triton = lambda q, k, v: pallas.cca_attention(q, k, v, config=triton_config, **kw)
    full = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                        implementation="cudnn")

    def with_grad(f):
        def g(q, k, v, ct):
            out, vjp = jax.vjp(f, q, k, v)
            return vjp(ct)
        return g

    fns = {"cca": (jax.jit(cca), jax.jit(with_grad(cca))),
           "cudnn": (jax.jit(full), jax.jit(with_grad(full)))}
    if pallas_mgpu.available():
        fns["cca_triton"] = (jax.jit(cca_triton), jax.jit(with_grad(cca_triton)))
    return fns


def temp_bytes(fn, *args) -> int | None:
    try:
        return int(fn.lower(*args).compile().memory_analysis().temp_size_in_bytes)
    except Exception:
        return None


def bench_shape(shape, peaks) -> dict:
    q, k, v, ct = make_inputs(shape)
    reps = 10 if shape.length <= 32768 else 5
    row = {"shape": shape.id, "T": shape.length, "Hq": shape.q_heads, "Hkv": shape.kv_heads,
           "cca_forward": "mosaic_gpu" if pallas_mgpu.available() else "triton"}
    for name, (fwd, fwd_bwd) in functions(shape).items():
        flops = attention_flops(shape, causal_full=(name == "cudnn"))
        try:
            tf = time_fn(fwd, q, k, v, reps=reps)["median_ms"]
            tb = time_fn(fwd_bwd, q, k, v, ct, reps=reps)["median_ms"]
        except Exception as e:  # e.g. out of memory at 128K: that is a result too
            row[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            continue
        row[name] = {
            "fwd_ms": tf, "fwd_bwd_ms": tb,
            "fwd_tflops": flops / tf / 1e9,
            "fwd_bwd_tflops": flops * (1 + BWD_FACTOR) / tb / 1e9,
            "fwd_floor_ms": flops / (peaks["matmul_tflops"] * 1e9),
            "fwd_temp_bytes": temp_bytes(fwd, q, k, v),
            "fwd_bwd_temp_bytes": temp_bytes(fwd_bwd, q, k, v, ct),
            "work_flops_fwd": flops,
        }
    if "fwd_ms" in row.get("cca", {}) and "fwd_ms" in row.get("cudnn", {}):
        row["speedup_fwd"] = row["cudnn"]["fwd_ms"] / row["cca"]["fwd_ms"]
        row["speedup_fwd_bwd"] = row["cudnn"]["fwd_bwd_ms"] / row["cca"]["fwd_bwd_ms"]
    return row


def rel_err(a, b) -> float:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def check_shape(shape, dtype) -> dict:
    """Pallas (bf16 or fp32) against the fp32 XLA reference on the same inputs, fwd and grads."""
    q, k, v, ct = make_inputs(shape, dtype, seed=shape.length + 1)
    kw = dict(group_size=shape.group_size, local_window=shape.local_window)
    f32 = lambda x: x.astype(jnp.float32)
    with pallas.poison_outputs():
        out, vjp = jax.vjp(lambda *a: pallas.cca_attention(*a, **kw), q, k, v)
        grads = vjp(ct)
    ref, vjp_ref = jax.vjp(lambda *a: reference.cca_attention(*a, **kw), f32(q), f32(k), f32(v))
    grads_ref = vjp_ref(f32(ct))
    res = {"shape": shape.id, "dtype": jnp.dtype(dtype).name, "out": rel_err(out, ref)}
    res.update({n: rel_err(g, r) for n, g, r in zip(("dq", "dk", "dv"), grads, grads_ref)})
    return res


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="8192,16384,32768,65536,131072")
    ap.add_argument("--check", action="store_true", help="also check accuracy at 32K and 4K")
    ap.add_argument("--name", default=None)
    args = ap.parse_args(argv)
    env = environment()
    peaks = measure_peaks()
    print(env, peaks, flush=True)
    results = {"env": env, "peaks": peaks, "rows": [], "checks": []}
    if args.check:
        from kernels.cca.shapes import CCAShape

        for shape, dtype in [(gpu_shapes(32768)[0], jnp.bfloat16),
                             (gpu_shapes(32768)[1], jnp.bfloat16),
                             (CCAShape(2, 4001, 8, 2, 64, 16, 256), jnp.float32),
                             (CCAShape(1, 3001, 10, 2, 128, 64, 1024), jnp.float32)]:
            try:
                res = check_shape(shape, dtype)
            except Exception:
                res = {"shape": shape.id, "error": traceback.format_exc()[-2000:]}
            print("check", res, flush=True)
            results["checks"].append(res)
    for t in map(int, args.lengths.split(",")):
        for shape in gpu_shapes(t):
            try:
                row = bench_shape(shape, peaks)
            except Exception:
                row = {"shape": shape.id, "error": traceback.format_exc()[-2000:]}
            print(row, flush=True)
            results["rows"].append(row)
    name = args.name or "cca_" + env["device"].replace(" ", "_")
    print("saved", save_results(name, results))
    print(f"{'shape':40s} {'cudnn fwd':>10s} {'cca fwd':>9s} {'x':>6s} {'cudnn f+b':>10s} "
          f"{'cca f+b':>9s} {'x':>6s} {'cca TF/s':>9s}")
    for r in results["rows"]:
        if "speedup_fwd" in r:
            print(f"{r['shape']:40s} {r['cudnn']['fwd_ms']:10.2f} {r['cca']['fwd_ms']:9.2f} "
                  f"{r['speedup_fwd']:6.2f} {r['cudnn']['fwd_bwd_ms']:10.2f} "
                  f"{r['cca']['fwd_bwd_ms']:9.2f} {r['speedup_fwd_bwd']:6.2f} "
                  f"{r['cca']['fwd_tflops']:9.1f}")
        else:
            print(r["shape"], "ERROR", str(r)[:300])
    return 0


if __name__ == "__main__":
    sys.exit(main())
