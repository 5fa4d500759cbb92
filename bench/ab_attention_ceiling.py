"""Our Mosaic GPU attention body against cuDNN and JAX's own Mosaic GPU attention on the same
problem: causal self-attention over T tokens, 32 query heads, d = 128, bf16, one process,
alternating rounds:

    PYTHONPATH=. python bench/ab_attention_ceiling.py --out $OUT/ceiling.json   # H100, ~2 min

* ``ours``: the CCA forward kernel (``kernels/cca/pallas_mgpu.forward``) with its local window
  as long as the sequence (w = T), where CCA is causal attention (no core token is visible:
  ``visible_key_counts`` gives 0 of them). Its schedule options (``MgpuConfig``) as variants,
  ``ours_in_order`` with the query tiles in order (as JAX's kernel runs them; ours runs the
  heavy ones first), and ``ours_f16`` on float16 copies (as JAX's kernel takes them).
* ``jax_mgpu``: ``jax.experimental.pallas.ops.gpu.attention_mgpu`` (the ping-pong design ours
  follows), 64-row query blocks, 128- or 64-key blocks, 2 slots, causal, on float16 copies of
  the inputs (it takes no bfloat16 in jax 0.11.2) with q scaled by 1/sqrt(d) first (it applies
  no softmax scale); left out where that version refuses it.
* ``cudnn``: ``jax.nn.dot_product_attention(..., is_causal=True, implementation="cudnn")``.

Each row gives ms and TFLOP/s counting the causal half (4 d per visible pair): whether our
kernel's gap to cuDNN, if any, is its schedule or Mosaic GPU's code. ``max_abs_diff``: each
output against cuDNN's.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from bench.ab_reattention_attend import inputs
from bench.common import time_alternating, write_rows
from kernels.cca import pallas_mgpu


def _jax_mgpu(block_kv: int):
    """JAX's Mosaic GPU attention as a function of (q, k, v), or None where it is missing."""
    try:
        from jax.experimental.pallas.ops.gpu import attention_mgpu
    except ImportError:
        return None
    config = attention_mgpu.TuningConfig(block_q=64, block_kv=block_kv, max_concurrent_steps=2,
                                         causal=True)
    return lambda q, k, v: attention_mgpu.attention(q, k, v, config)


def bench(t: int, hkv: int, rounds: int, g: int = 16) -> dict:
    q, k, v = inputs(t, hkv)
    kc, vc = k[:, g - 1::g], v[:, g - 1::g]
    scale = 128**-0.5
    fns = {}
    for name, config in {"ours": pallas_mgpu.MgpuConfig(),
                         "ours_overlap": pallas_mgpu.MgpuConfig(overlap=True),
                         "ours_in_order": pallas_mgpu.MgpuConfig(heavy_first=False)}.items():
        f = jax.jit(lambda q, k, v, kc, vc, c=config: pallas_mgpu.forward(
            q, k, v, kc, vc, g=g, w=t, scale=scale, config=c)[0])
        fns[name] = (f, (q, k, v, kc, vc))
    # ours on float16 copies too: JAX's kernel takes float16 only, so this separates the dtype
    fns["ours_f16"] = (fns["ours"][0], tuple(x.astype(jnp.float16) for x in (q, k, v, kc, vc)))
    fns["cudnn"] = (jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn")), (q, k, v))
    skipped = {}
    half = ((q * scale).astype(jnp.float16), k.astype(jnp.float16), v.astype(jnp.float16))
    for bkv in (128, 64):
        f = _jax_mgpu(bkv)
        if f is None:
            skipped["jax_mgpu"] = "not in this jax"
            break
        try:
            jax.block_until_ready(jax.jit(f)(*half))
            fns[f"jax_mgpu_bkv{bkv}"] = (jax.jit(f), half)
        except Exception as e:  # noqa: BLE001 - a refusal or a compile failure: reported
            skipped[f"jax_mgpu_bkv{bkv}"] = f"{type(e).__name__}: {str(e)[:300]}"
    ref = np.asarray(fns["cudnn"][0](*fns["cudnn"][1]), np.float32)
    diff = {n: float(np.abs(np.asarray(f(*a), np.float32) - ref).max())
            for n, (f, a) in fns.items() if n != "cudnn"}
    ms = time_alternating(fns, calls=10 if t <= 32768 else 3, rounds=rounds)
    flops = 4.0 * 32 * 128 * t * (t + 1) / 2
    return {"T": t, "Hkv": hkv, "ms": ms, "tflops": {n: flops / (m * 1e9) for n, m in ms.items()},
            "vs_cudnn": {n: m / ms["cudnn"] for n, m in ms.items()}, "max_abs_diff": diff,
            "skipped": skipped}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cases", default="32768:32,32768:8", help="T:Hkv,...")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = []
    for p in filter(None, args.cases.split(",")):
        t, hkv = map(int, p.split(":"))
        rows.append(bench(t, hkv, args.rounds))
        print(json.dumps(rows[-1]), flush=True)
    write_rows(rows, __doc__.splitlines()[0], args.out, peaks=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
