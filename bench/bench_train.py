"""Training throughput: a 1B-class LLaMA at 32K tokens, CCA against full attention, one GPU.

    PYTHONPATH=. python bench/bench_train.py --out $OUT/train.json   # H100: < 8 min with compiles
    PYTHONPATH=. python bench/bench_train.py --quick                 # tiny sizes, CPU

Each variant runs the real train step (``jax_cca.train.Trainer``: bf16 compute over float32
master weights and AdamW state, per-layer remat, chunked LM-head loss) on the built-in synthetic
retrieval data, and reports tokens/s (median step time after the compiling step), the compile
time, the peak device memory, and the model FLOPs per second counting the dense matmuls
(6 x parameters x tokens) plus the attention work each variant must do (CCA: the visible core
and local keys of every query; full: the causal triangle; backward = 2x forward). Full
attention is cuDNN's (``jax.nn.dot_product_attention``), CCA the Pallas kernels. Results are
written after every variant, so a run cut short keeps what it measured; a variant that would
end after ``--budget-s`` (judged by the time the previous one took) is recorded as skipped.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

from bench.common import environment
from jax_cca import CCAConfig, CCALlama
from jax_cca.data import SyntheticRetrieval
from jax_cca.train import TrainConfig, Trainer
from kernels.cca.reference import visible_key_counts

# LLaMA-shaped, about 1.0B parameters: 16 layers, hidden 2048, 32 query / 8 kv heads of 128.
MODEL_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=16,
                num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=131072,
                rope_theta=500000.0, group_size=16, local_window=1024)
MODEL_QUICK = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=4096,
                   group_size=8, local_window=32)


def step_flops(config: CCAConfig, attention: str, batch: int, seq_len: int) -> float:
    """Model FLOPs of one train step (forward + backward, remat recomputation not counted)."""
    c = config
    per_layer = (c.hidden_size * c.head_dim * (c.num_heads * 2 + c.num_kv_heads * 2)
                 + 3 * c.hidden_size * c.intermediate_size)
    matmul_params = c.num_layers * per_layer + c.hidden_size * c.vocab_size  # + LM head
    dense = 6.0 * matmul_params * batch * seq_len
    if attention == "full":
        keys = seq_len * (seq_len + 1) / 2
    else:
        core, raw = visible_key_counts(seq_len, c.group_size, c.local_window)
        keys = core + raw
    attn_forward = 4.0 * c.head_dim * c.num_heads * keys * batch * c.num_layers
    return dense + 3.0 * attn_forward


def bench_variant(model: CCALlama, attention: str, *, seq_len: int, batch: int, steps: int,
                  seed: int) -> dict:
    config = model.config.replace(attention=attention)
    train_config = TrainConfig(learning_rate=1e-5, warmup_steps=0, total_steps=1000,
                               compute_dtype="bfloat16", remat=True, loss_chunk=4096)
    trainer = Trainer(config, train_config)
    state = trainer.init_state(model.with_attention(attention=attention))
    data = SyntheticRetrieval(seq_len=seq_len, vocab_size=config.vocab_size, seed=seed)
    batches = [trainer.put_batch(data.next_batch(batch)) for _ in range(steps + 1)]
    t0 = time.perf_counter()
    state, metrics = trainer.step(state, batches[0])
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    times, losses = [], [float(metrics["loss"])]
    for b in batches[1:]:
        t0 = time.perf_counter()
        state, metrics = trainer.step(state, b)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
        losses.append(float(metrics["loss"]))
    step_s = statistics.median(times)
    tokens = batch * seq_len
    result = {"attention": attention, "step_ms": step_s * 1e3, "step_ms_all": [
        t * 1e3 for t in times], "tokens_per_s": tokens / step_s,
        "first_step_s (compile + run)": compile_s,
        "model_tflops_per_s": step_flops(config, attention, batch, seq_len) / step_s / 1e12,
        "losses": losses, "finite": bool(np.isfinite(losses).all())}
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        result["peak_memory_gib"] = stats["peak_bytes_in_use"] / 2**30
    del state, batches
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and length (CPU)")
    parser.add_argument("--seq-len", type=int, default=None, help="default 32768 (quick: 256)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 4)")
    parser.add_argument("--layers", type=int, default=None, help="override the layer count")
    parser.add_argument("--attention", action="append", choices=("cca", "full"), default=None,
                        help="variants, in order (default cca then full)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="skip a variant that would end after this many seconds, judging "
                             "by the previous one (default 420)")
    parser.add_argument("--out", default=None, help="JSON output (default bench/results/"
                        "train_<device>.json; quick: not written unless given)")
    args = parser.parse_args(argv)

    begin = time.perf_counter()
    sizes = dict(MODEL_QUICK if args.quick else MODEL_1B)
    if args.layers:
        sizes["num_layers"] = args.layers
    seq_len = args.seq_len or (256 if args.quick else 32768)
    steps = args.steps or (2 if args.quick else 4)
    config = CCAConfig(**sizes, dtype="float32")
    model = CCALlama.from_config(config, seed=0)
    env = environment()
    results = {"environment": env, "model": json.loads(config.to_json()),
               "num_params": model.num_params(), "seq_len": seq_len, "batch": args.batch,
               "timed_steps": steps, "train": "bf16 compute, fp32 master + AdamW, remat per "
               "layer, loss chunk 4096", "variants": []}
    out = Path(args.out) if args.out else None
    if out is None and not args.quick:
        device = env["device"].lower().replace(" ", "_")
        out = Path(__file__).parent / "results" / f"train_{device}.json"
    last = 0.0  # seconds the previous variant took: the next one is assumed to take as long
    for attention in args.attention or ["cca", "full"]:
        elapsed = time.perf_counter() - begin
        if elapsed + last > args.budget_s:
            results["variants"].append({"attention": attention, "skipped": f"budget: "
                                        f"{elapsed:.0f} s elapsed + {last:.0f} s expected > "
                                        f"{args.budget_s:.0f} s"})
            continue
        started = time.perf_counter()
        try:
            entry = bench_variant(model, attention, seq_len=seq_len, batch=args.batch,
                                  steps=steps, seed=0)
        except Exception as e:  # e.g. out of memory: record it, keep the other variant
            entry = {"attention": attention, "error": f"{type(e).__name__}: {e}"[:2000]}
        results["variants"].append(entry)
        gc.collect()
        last = time.perf_counter() - started
        done = {v["attention"]: v for v in results["variants"] if "tokens_per_s" in v}
        if "cca" in done and "full" in done:
            results["cca_speedup"] = done["cca"]["tokens_per_s"] / done["full"]["tokens_per_s"]
        print(json.dumps(entry), flush=True)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1))
    results["total_s"] = time.perf_counter() - begin
    if out is not None:
        out.write_text(json.dumps(results, indent=1))
    print(json.dumps({k: v for k, v in results.items() if k != "variants"}, indent=1))
    return 0 if all("tokens_per_s" in v for v in results["variants"]) else 1


if __name__ == "__main__":
    sys.exit(main())
