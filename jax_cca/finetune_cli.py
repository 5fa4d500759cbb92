"""The ``jax-cca finetune`` subcommand: argument parsing and the run (data, model, resume,
metrics, loss plot). The training itself is ``jax_cca.train``; see docs/training.md."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from jax_cca.cli import _int_at_least, _float_in, _add_attention_args, CLIError, _existing_dir, _copy_tokenizer_files, _describe

FINETUNE_TASKS = ("mix", "passkey", "kv")
# Options that define a run: a resumed run must repeat them (``--lr`` / ``--warmup`` left out
# take the saved values). The mesh, --steps, saving and display options may change.
RUN_OPTIONS = ("model", "data", "task", "seq_len", "batch_size", "accum", "lr", "warmup",
               "min_lr_ratio", "weight_decay", "clip", "trainable", "dtype", "seed",
               "loss_chunk", "attention", "group_size", "local_window")


def _mesh_shape(text: str) -> tuple[int, int, int]:
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        sizes = []
    if len(sizes) not in (2, 3) or min(sizes) < 1:
        raise argparse.ArgumentTypeError(
            f"expected DATA,FSDP or DATA,FSDP,TENSOR positive sizes like 1,8; got {text!r}")
    return (*sizes, 1)[:3]


def add_finetune_parser(sub) -> None:
    ft = sub.add_parser(
        "finetune", help="fine-tune a model with CCA (or full) attention",
        description="Fine-tune a LLaMA-family model: AdamW with warmup + cosine decay, gradient "
                    "clipping and accumulation, bf16 compute over float32 master weights, "
                    "per-layer rematerialisation, sharded over all devices (FSDP). Writes "
                    "OUT/checkpoints (every --save-every steps; --resume continues exactly), "
                    "OUT/metrics.jsonl, OUT/loss.png and the final model OUT/model. "
                    "See docs/training.md.")
    ft.add_argument("--model", metavar="DIR",
                    help="Hugging Face LLaMA directory or jax-cca checkpoint (default: "
                         "CCAConfig.tiny() with random weights)")
    ft.add_argument("--data", metavar="PATH",
                    help="text or JSONL ('text' field) file, or a directory of them (default: "
                         "the built-in synthetic passkey / key-value retrieval set)")
    ft.add_argument("--tokenizer", metavar="PATH",
                    help="tokenizer.json or its directory, for --data (default: the --model "
                         "directory)")
    ft.add_argument("--task", choices=FINETUNE_TASKS, default="mix",
                    help="synthetic task when no --data is given (default mix)")
    ft.add_argument("--seq-len", type=_int_at_least(2), default=1024,
                    help="tokens per sequence (default 1024)")
    ft.add_argument("--steps", type=_int_at_least(1), default=100,
                    help="optimizer steps in total, counting resumed ones (default 100)")
    ft.add_argument("--out", required=True, metavar="DIR", help="run directory")
    ft.add_argument("--batch-size", type=_int_at_least(1), default=1,
                    help="sequences per micro-batch, over all devices (default 1)")
    ft.add_argument("--accum", type=_int_at_least(1), default=1,
                    help="micro-batches per optimizer step (gradient accumulation; default 1)")
    ft.add_argument("--lr", type=_float_in(0.0, None, True), default=None,
                    help="peak learning rate (default 2e-5 with --model, 1e-3 for the random "
                         "tiny model)")
    ft.add_argument("--warmup", type=_int_at_least(0), default=None,
                    help="linear warmup steps (default 10%% of --steps, at most 100)")
    ft.add_argument("--min-lr-ratio", type=_float_in(0.0, 1.0, False), default=0.1,
                    help="final learning rate of the cosine decay / peak (default 0.1)")
    ft.add_argument("--weight-decay", type=_float_in(0.0, None, False), default=0.0,
                    help="AdamW weight decay on matrices (default 0)")
    ft.add_argument("--clip", type=_float_in(0.0, None, False), default=1.0,
                    help="clip gradients to this global norm; 0 = no clipping (default 1)")
    ft.add_argument("--trainable", default="all", metavar="GROUPS",
                    help="'all' or comma-separated groups of attention, mlp, norms, "
                         "embeddings, head; the rest stays frozen (default all)")
    ft.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                    help="compute dtype; trainable weights and AdamW moments stay float32 "
                         "(default bfloat16)")
    ft.add_argument("--no-remat", action="store_true",
                    help="keep every layer's activations instead of recomputing them in the "
                         "backward pass (faster, much more memory)")
    ft.add_argument("--loss-chunk", type=_int_at_least(1), default=4096,
                    help="positions per chunk of the LM head + loss (default 4096)")
    ft.add_argument("--save-every", type=_int_at_least(1), default=100,
                    help="checkpoint every N steps, and at the last (default 100)")
    ft.add_argument("--keep", type=_int_at_least(1), default=3,
                    help="checkpoints kept (default 3)")
    ft.add_argument("--resume", action="store_true",
                    help="continue from the newest checkpoint in OUT (starts fresh if none)")
    ft.add_argument("--seed", type=int, default=0,
                    help="seed of the random model, the synthetic data and the shuffling")
    ft.add_argument("--mesh", type=_mesh_shape, default=None, metavar="D,F[,T]",
                    help="device mesh data,fsdp[,tensor] (default 1,<all devices>,1)")
    ft.add_argument("--distributed", action="store_true",
                    help="multi-host: call jax.distributed.initialize() first (cluster "
                         "detected from the environment, or the three options below)")
    ft.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                    help="with --distributed: address of process 0")
    ft.add_argument("--num-processes", type=_int_at_least(1), default=None,
                    help="with --distributed: number of processes")
    ft.add_argument("--process-id", type=_int_at_least(0), default=None,
                    help="with --distributed: this process's index")
    _add_attention_args(ft, default_attention="cca", default_group=None, default_window=None,
                        reattention=False)  # ReAttention is training-free
    ft.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    ft.set_defaults(func=cmd_finetune)


def _peek_model_config(path: Path):
    """The CCAConfig of a model directory without loading its weights."""
    import json

    from checkpoints import is_checkpoint, read_manifest
    from jax_cca.config import CCAConfig

    if is_checkpoint(path):
        return CCAConfig(**read_manifest(path)["config"])
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CLIError(f"{path} is neither a jax-cca checkpoint nor a Hugging Face model "
                       "directory (no config.json)")
    try:
        return CCAConfig.from_hf_config(json.loads(config_file.read_text()))
    except json.JSONDecodeError as e:
        raise CLIError(f"{config_file} is not valid JSON: {e}") from None


def _eos_id(config) -> int:
    eos = config.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    if not isinstance(eos, int):
        raise CLIError("the model config has no eos_token_id, needed to separate documents")
    return eos


def _finetune_dataset(args, config, model_dir: Path | None):
    from jax_cca.data import DataError, SyntheticRetrieval, TextDataset

    try:
        if args.data is None:
            return SyntheticRetrieval(seq_len=args.seq_len, vocab_size=config.vocab_size,
                                      seed=args.seed, task=args.task)
        if args.tokenizer is not None:
            tokenizer = Path(args.tokenizer)
        elif model_dir is not None and (model_dir / "tokenizer.json").is_file():
            tokenizer = model_dir
        else:
            raise CLIError("--data needs a tokenizer: pass --tokenizer PATH (tokenizer.json or "
                           "its directory), or a --model directory that holds tokenizer.json")
        return TextDataset(args.data, tokenizer, seq_len=args.seq_len, eos_id=_eos_id(config),
                           seed=args.seed, vocab_size=config.vocab_size)
    except (DataError, ValueError) as e:
        raise CLIError(str(e)) from None


def _read_metrics(path: Path, up_to_step: int | None = None) -> list[dict]:
    import json

    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if up_to_step is None or r["step"] <= up_to_step]


def _plot_loss(metrics: list[dict], png: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no loss plot (pip install 'jax-cca[plot]')"
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in metrics], [r["loss"] for r in metrics], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over counted tokens)")
    ax.set_title(png.parent.name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return f"loss plot: {png}"


def _checked(checkpointer, load):
    """``load()``; a damaged newest checkpoint becomes a CLIError that says how to fall back."""
    from checkpoints import CheckpointError

    try:
        return load()
    except CheckpointError as e:
        steps = checkpointer.steps()
        hint = (f"; to resume from step {steps[-2]}, move {checkpointer.directory / str(steps[-1])}"
                " out of the way" if len(steps) > 1 else "")
        raise CLIError(f"{e}{hint}") from None


def cmd_finetune(args) -> int:
    import json
    import os

    if args.distributed:
        from jax_cca.train import initialize_distributed

        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    import jax
    import numpy as np

    from checkpoints import save_model
    from checkpoints.train_state import TrainCheckpointer
    from jax_cca.config import CCAConfig
    from jax_cca.model import CCALlama
    from jax_cca.train import TrainConfig, Trainer, fit, make_mesh

    out = Path(args.out).absolute()
    ckpt_dir = out / "checkpoints"
    metrics_path = out / "metrics.jsonl"
    primary = jax.process_index() == 0
    model_dir = _existing_dir(args.model, "model directory") if args.model else None
    attention = {k: v for k, v in dict(attention=args.attention, group_size=args.group_size,
                                       local_window=args.local_window).items() if v is not None}

    # 1. What is there to resume? Only read; nothing in OUT is changed before the data loads.
    has_checkpoints = ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())
    if not args.resume and (has_checkpoints or metrics_path.exists()):
        raise CLIError(f"{out} already holds a run; pass --resume to continue it, or choose "
                       "another --out")
    saved = None
    if args.resume and has_checkpoints:
        reader = TrainCheckpointer(ckpt_dir, create=False)
        saved = _checked(reader, reader.read_meta)
        reader.close()
        config = CCAConfig.from_json(saved["metadata"]["model_config"])
    elif model_dir is not None:
        config = _peek_model_config(model_dir).replace(**attention)
    else:
        config = CCAConfig.tiny(**attention)

    # 2. The run's options; a resumed run must repeat them.
    run = {"model": str(model_dir) if model_dir else None,
           "data": str(Path(args.data).absolute()) if args.data else None,
           "task": args.task if args.data is None else None, "seq_len": args.seq_len,
           "batch_size": args.batch_size, "accum": args.accum, "lr": args.lr,
           "warmup": args.warmup, "min_lr_ratio": args.min_lr_ratio,
           "weight_decay": args.weight_decay, "clip": args.clip, "trainable": args.trainable,
           "dtype": args.dtype, "seed": args.seed, "loss_chunk": args.loss_chunk,
           "attention": config.attention, "group_size": config.group_size,
           "local_window": config.local_window}
    if saved is not None:
        before = saved["metadata"]["run"]
        for key in ("lr", "warmup"):
            if run[key] is None:
                run[key] = before[key]
        for key, value in attention.items():
            run[key] = value
        diff = [f"{k}: saved {before.get(k)!r}, now {run[k]!r}" for k in RUN_OPTIONS
                if before.get(k) != run[k]]
        if diff:
            raise CLIError(f"--resume with different options than the saved run in {out}: "
                           + "; ".join(diff))
    if run["lr"] is None:
        run["lr"] = 2e-5 if model_dir else 1e-3
    if run["warmup"] is None:
        run["warmup"] = min(100, args.steps // 10)
    try:
        train_config = TrainConfig(
            learning_rate=run["lr"], warmup_steps=run["warmup"], total_steps=args.steps,
            min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay,
            clip_norm=args.clip or None, accum_steps=args.accum, compute_dtype=args.dtype,
            remat=not args.no_remat, trainable=args.trainable, loss_chunk=args.loss_chunk)
    except ValueError as e:
        raise CLIError(str(e)) from None

    # 3. The data (a bad file stops here, before any checkpoint is touched).
    dataset = _finetune_dataset(args, config, model_dir)
    mesh = make_mesh(*args.mesh) if args.mesh else make_mesh()
    split = mesh.shape["data"] * mesh.shape["fsdp"]
    if args.batch_size % split:
        raise CLIError(f"--batch-size {args.batch_size} must be a multiple of data x fsdp = "
                       f"{split} (the mesh {dict(mesh.shape)}); pass --mesh or another size")

    # 4. The state: restored, or from the model.
    model = None
    if saved is None:
        if model_dir is not None:
            model = CCALlama.from_pretrained(model_dir, **attention)
            config = model.config  # the weights' dtype, which config.json may not state
        else:
            model = CCALlama.from_config(config, seed=args.seed)
    trainer = Trainer(config, train_config, mesh)
    checkpointer = TrainCheckpointer(ckpt_dir, keep=args.keep)
    if saved is not None:
        state, meta = _checked(checkpointer,
                               lambda: checkpointer.restore(trainer.abstract_state()))
        try:
            dataset.load_state_dict(meta["data"])
        except ValueError as e:
            raise CLIError(str(e)) from None
        start = int(np.asarray(state["step"].addressable_data(0)))
    else:
        if args.resume:
            print(f"no checkpoint in {ckpt_dir}: starting at step 0", file=sys.stderr)
        state = trainer.init_state(model)
        del model
        start = 0
    if start >= args.steps:
        raise CLIError(f"the run in {out} is already at step {start} >= --steps {args.steps}")
    print(f"model: {_describe(config)}; trainable {args.trainable}; data: "
          f"{args.data or 'synthetic ' + args.task}; mesh {dict(mesh.shape)}; "
          f"steps {start} -> {args.steps}", file=sys.stderr)

    # 5. Train.
    metrics = _read_metrics(metrics_path, start)
    if primary:
        out.mkdir(parents=True, exist_ok=True)
        tmp = metrics_path.with_name(metrics_path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in metrics))
        os.replace(tmp, metrics_path)  # a resumed run drops the steps it will redo
        (out / "run.json").write_text(json.dumps(
            {"run": run, "train_config": train_config.to_dict(),
             "model_config": json.loads(config.to_json())}, indent=1))
    tokens_per_step = args.batch_size * args.accum * args.seq_len
    from tqdm import tqdm

    bar = tqdm(total=args.steps, initial=start, unit="step", dynamic_ncols=True,
               disable=args.no_progress or not primary)
    clock = {"last": time.perf_counter(), "begin": time.perf_counter()}
    log = metrics_path.open("a") if primary else None

    def on_step(step: int, m: dict) -> None:
        now = time.perf_counter()
        seconds, clock["last"] = now - clock["last"], now
        row = {"step": step, **m, "seq_tokens": tokens_per_step, "step_time_s": seconds,
               "tokens_per_s": tokens_per_step / seconds}
        metrics.append(row)
        if log is not None:
            log.write(json.dumps(row) + "\n")
            log.flush()
        bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{row['tokens_per_s']:,.0f}",
                        refresh=False)
        bar.update(1)

    metadata = {"run": run, "model_config": config.to_json(),
                "train_config": train_config.to_dict()}
    try:
        state = fit(trainer, state, dataset, batch_size=args.batch_size, until_step=args.steps,
                    checkpointer=checkpointer, save_every=args.save_every, metadata=metadata,
                    on_step=on_step)
    finally:
        bar.close()
        if log is not None:
            log.close()
        checkpointer.close()

    # 6. The final model, the plot.
    model = trainer.export_model(state)
    if primary:
        save_model(model, out / "model", overwrite=True)
        for src in (model_dir, Path(args.tokenizer) if args.tokenizer else None):
            if src is not None and src.is_dir():
                _copy_tokenizer_files(src, out / "model")
        print(f"steps {start + 1}..{args.steps} in {time.perf_counter() - clock['begin']:.1f} s; "
              f"loss {metrics[0]['loss']:.4f} at step {metrics[0]['step']} -> "
              f"{metrics[-1]['loss']:.4f} at step {metrics[-1]['step']}", file=sys.stderr)
        print(f"checkpoints: {ckpt_dir}; metrics: {metrics_path}; model: {out / 'model'}")
        print(_plot_loss(metrics, out / "loss.png"))
    return 0


# ------------------------------------------------------------------------------ entry point
