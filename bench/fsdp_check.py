"""A sharded train step equals the single-device step.

    PYTHONPATH=. python bench/fsdp_check.py                      # 2 GPUs: mesh data=1 x fsdp=2
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        PYTHONPATH=. python bench/fsdp_check.py --quick --mesh 2,4 --mesh 2,2,2   # CPU

Runs two optimizer steps (AdamW, gradient accumulation, remat, CCA attention, float32 compute
at the highest matmul precision) from the same weights on the same batches, once on one device
and once on each ``--mesh DATA,FSDP[,TENSOR]``, and prints JSON with the relative errors of the
losses and of the updated parameters against the single-device run, and how many parameters the
mesh actually splits. Exits 1 when an error reaches ``--tol`` (1e-5) or a mesh splits nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np

jax.config.update("jax_default_matmul_precision", "highest")

from bench.common import environment  # noqa: E402
from jax_cca import CCAConfig, CCALlama  # noqa: E402
from jax_cca.data import SyntheticRetrieval  # noqa: E402
from jax_cca.train import TrainConfig, Trainer, make_mesh  # noqa: E402

STEPS = 2


def rel_err(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def flat(tree) -> np.ndarray:
    return np.concatenate([np.asarray(x, np.float64).reshape(-1) for x in jax.tree.leaves(tree)])


def run(trainer: Trainer, model: CCALlama, batches: list[dict]) -> tuple[list[float], dict]:
    state = trainer.init_state(model)
    losses = []
    for batch in batches:
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, jax.tree.map(np.asarray, state["params"])


def model_params(model: CCALlama) -> dict:
    from flax import nnx

    return jax.tree.map(lambda x: np.asarray(x, np.float32),
                        nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def split_params(trainer: Trainer) -> int:
    return sum(any(axis is not None for axis in s.spec)
               for s in jax.tree.leaves(trainer.shardings["params"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mesh", action="append", default=None, metavar="D,F[,T]",
                        help="mesh to compare (repeatable; default 1,<all devices>)")
    parser.add_argument("--quick", action="store_true", help="a tiny model (CPU)")
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)

    if args.quick:
        config = CCAConfig.tiny(vocab_size=128, hidden_size=64, intermediate_size=96,
                                num_layers=2, num_heads=4, num_kv_heads=2, attention="cca",
                                group_size=4, local_window=16)
        seq_len, batch = 48, 8
    else:
        config = CCAConfig.tiny(vocab_size=4096, hidden_size=512, intermediate_size=1376,
                                num_layers=4, num_heads=8, num_kv_heads=2, attention="cca",
                                group_size=16, local_window=256)
        seq_len, batch = 1024, 8
    train_config = TrainConfig(learning_rate=1e-3, warmup_steps=0, total_steps=10,
                               compute_dtype="float32", remat=True, accum_steps=2,
                               loss_chunk=seq_len // 2 + 1, weight_decay=0.1)
    data = SyntheticRetrieval(seq_len=seq_len, vocab_size=config.vocab_size, seed=0)
    batches = [data.next_batch(batch * train_config.accum_steps) for _ in range(STEPS)]
    for b in batches:  # count every target: a loss over many tokens, not 6 per sequence
        b["mask"] = np.ones_like(b["mask"])
        b["mask"][0, : seq_len // 3] = 0.0  # and some padding-style masking
    model = CCALlama.from_config(config, seed=0)

    devices = jax.devices()
    meshes = [tuple(int(x) for x in m.split(",")) for m in args.mesh] if args.mesh \
        else [(1, len(devices))]
    ref_losses, ref_params = run(Trainer(config, train_config, make_mesh(1, 1, 1, devices[:1])),
                                 model, batches)
    results = {"environment": environment(),
               "devices": [str(d) for d in devices], "platform": devices[0].platform,
               "jax": jax.__version__, "config": json.loads(config.to_json()),
               "seq_len": seq_len, "batch": batch, "accum_steps": train_config.accum_steps,
               "steps": STEPS, "reference_losses": ref_losses, "tol": args.tol, "meshes": []}
    ok = True
    for shape in meshes:
        mesh = make_mesh(*shape)
        trainer = Trainer(config, train_config, mesh)
        losses, params = run(trainer, model, batches)
        entry = {"mesh": dict(mesh.shape), "losses": losses,
                 "loss_rel_err": rel_err(losses, ref_losses),
                 "params_rel_err": rel_err(flat(params), flat(ref_params)),
                 "update_rel_err": rel_err(flat(params) - flat(model_params(model)),
                                           flat(ref_params) - flat(model_params(model))),
                 "split_params": split_params(trainer),
                 "num_params": len(jax.tree.leaves(trainer.shardings["params"]))}
        entry["ok"] = bool(entry["loss_rel_err"] < args.tol and entry["params_rel_err"] < args.tol
                           and (entry["split_params"] > 0 or mesh.size == 1))
        ok &= entry["ok"]
        results["meshes"].append(entry)
    results["ok"] = ok
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
