"""The CCA paper's protocol in miniature, end to end: train a small LLaMA with full attention,
convert it to CCA and fine-tune it briefly, then compare full attention, CCA and StreamingLLM
(sinks + window) on long-context retrieval at several times the training length.

    PYTHONPATH=. python bench/replicate_cca.py --train-only --save-models runs/m_cca   # GPU, ~4.5 min
    PYTHONPATH=. python bench/replicate_cca.py --load-models runs/m_cca                # then ~2 min
    PYTHONPATH=. python bench/replicate_cca.py --quick          # CPU smoke run, tiny sizes, < 2 min
    PYTHONPATH=. python bench/replicate_cca.py --report bench/results/replicate_cca.json
                                                                # docs/results.md + docs/img/ only

Protocol (the paper: LLaMA-2-7B-32K/80K, full attention -> CCA, ~1,000 fine-tuning steps on
SlimPajama, then LongBench-E / multi-document QA EM against StreamingLLM and others). Here:

1. Pretrain a LLaMA (default 6 layers, hidden 512, 8 query / 2 kv heads, vocab 512) from random
   weights with full attention on the built-in synthetic retrieval mix (``jax_cca.data``:
   passkey and key-value retrieval; no text corpus can be downloaded here, so the filler is
   random words), with a length curriculum (``--curriculum 512:300,2048:700``: short sequences
   first, at a fixed number of tokens per step, so the sparse answer-only loss sees many more
   examples while retrieval is learned).
2. Convert the weights to CCA (``with_attention(attention="cca", group_size, local_window)``)
   and fine-tune ``--cca-steps`` steps on the same mix.
3. Evaluate with ``jax_cca.eval`` (passkey, multi-key needle, multi-document key-value QA;
   exact match; greedy generation through each method's KV cache) at ``--lengths``:
   "full" (the pretrained model), "cca" (fine-tuned), "streaming" (the pretrained model with 4
   sink tokens and CCA's window) and, with ``--with-unfinetuned``, "cca-no-ft" (converted, not
   fine-tuned). Speed (prefill, decode) and memory (KV cache, XLA's prefill temporaries at the
   longest length) of each come from the same runs.

Everything goes into one JSON (``--out``, default ``$OUT/replicate_cca.json`` or
``bench/results/replicate_cca.json``; ``--quick``: a temporary directory); ``--report JSON``
turns it into the "CCA in miniature" section of docs/results.md and its plots in docs/img/,
so the docs are regenerated without a GPU. ``--save-models DIR`` keeps the two trained models
(orbax), ``--load-models DIR`` evaluates them again without training, and ``--train-only``
stops after training: two commands when one would run past a time limit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/replicate_cca.py` without PYTHONPATH
    sys.path.insert(0, str(REPO))

DOCS = REPO / "docs"
RESULTS_MD = DOCS / "results.md"
SECTION = "replicate_cca"


# ------------------------------------------------------------------------------ shared pieces
@dataclasses.dataclass(frozen=True)
class Stage:
    """``steps`` optimizer steps on sequences of ``seq_len`` tokens."""

    seq_len: int
    steps: int


def parse_curriculum(text: str) -> list[Stage]:
    """"512:300,2048:700" -> stages (seq_len:steps, in order)."""
    stages = []
    for part in text.replace(" ", "").split(","):
        try:
            seq_len, steps = (int(x) for x in part.split(":"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected SEQ_LEN:STEPS[,SEQ_LEN:STEPS..] like 512:300,2048:700; got {text!r}"
            ) from None
        if seq_len < 32 or steps < 1:
            raise argparse.ArgumentTypeError(f"stage {part!r}: seq_len >= 32 and steps >= 1")
        stages.append(Stage(seq_len, steps))
    return stages


def lengths_arg(text: str) -> list[int]:
    from jax_cca.eval_cli import _length, _list_of

    return _list_of(_length, "lengths")(text)


def small_config(args, max_len: int):
    """The miniature LLaMA (full attention; CCA hyper-parameters stored for the conversion)."""
    from jax_cca import CCAConfig

    return CCAConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                     intermediate_size=args.intermediate, num_layers=args.layers,
                     num_heads=args.heads, num_kv_heads=args.kv_heads,
                     max_position_embeddings=max_len, rope_theta=args.rope_theta,
                     attention="full", group_size=args.group_size,
                     local_window=args.local_window, bos_token_id=1, eos_token_id=2)


def train(model, stages: list[Stage], *, lr: float, warmup: int, tokens_per_step: int,
          seed: int, compute_dtype: str, name: str, task: str = "mix", log_every: int = 25):
    """Trains ``model`` through the stages with one AdamW schedule over all their steps; returns
    (trained model, record). Batch size per stage: tokens_per_step // seq_len sequences."""
    from jax_cca.data import SyntheticRetrieval
    from jax_cca.train import TrainConfig, Trainer, fit

    total = sum(s.steps for s in stages)
    trainer = Trainer(model.config, TrainConfig(
        learning_rate=lr, warmup_steps=min(warmup, total - 1), total_steps=total,
        compute_dtype=compute_dtype, remat=False))
    state = trainer.init_state(model)
    record = {"name": name, "task": task, "lr": lr, "warmup": warmup,
              "tokens_per_step": tokens_per_step, "compute_dtype": compute_dtype, "stages": []}
    done, begin = 0, time.perf_counter()
    for i, stage in enumerate(stages):
        data = SyntheticRetrieval(seq_len=stage.seq_len, vocab_size=model.config.vocab_size,
                                  seed=seed * 100 + i, task=task)
        batch = max(1, tokens_per_step // stage.seq_len)
        losses, stamps = [], []

        def on_step(step, metrics, losses=losses, stamps=stamps):
            losses.append(metrics["loss"])
            stamps.append(time.perf_counter())
            if step % log_every == 0 or step == done + stage.steps:
                print(f"  {name} step {step}/{total} (T={stage.seq_len}, B={batch}): loss "
                      f"{np.mean(losses[-log_every:]):.4f}", file=sys.stderr, flush=True)

        start = time.perf_counter()
        state = fit(trainer, state, data, batch_size=batch, until_step=done + stage.steps,
                    on_step=on_step)
        steady = np.diff(stamps)  # step 1 of a stage includes compilation
        every = max(1, len(losses) // 40)
        record["stages"].append({
            "seq_len": stage.seq_len, "steps": stage.steps, "batch_size": batch,
            "key_words": data.key_words, "seconds": time.perf_counter() - start,
            "step_ms": float(np.median(steady) * 1e3) if len(steady) else None,
            "tokens_per_s": float(batch * stage.seq_len / np.median(steady))
            if len(steady) else None,
            "loss_first": float(np.mean(losses[: max(1, len(losses) // 10)])),
            "loss_last": float(np.mean(losses[-max(1, len(losses) // 10):])),
            "loss_curve": [[done + j + 1, float(np.mean(losses[j : j + every]))]
                           for j in range(0, len(losses), every)],
        })
        done += stage.steps
    record["seconds"] = time.perf_counter() - begin
    return trainer.export_model(state), record


def write_section(path: Path, name: str, title: str, body: str) -> None:
    """Puts ``body`` between this section's markers in ``path`` (other sections kept)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else (
        "# Results: the papers' claims in miniature\n\n"
        "Generated from the JSON files in `bench/results/` by the `--report` step of each "
        "`bench/replicate_*.py` script (see [evaluation.md](evaluation.md)); do not edit by "
        "hand.\n")
    block = f"{begin}\n## {title}\n\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _mib(x) -> str:
    return "-" if x is None else f"{x / 2**20:.1f}"


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def speed_table(runs) -> str:
    """Markdown: per method and length, prefill / decode speed and memory from the eval runs."""
    lines = ["| method | length | batch | prefill s | prefill tok/s | decode ms/token | "
             "KV cache MiB (this impl.) | KV cache MiB (method) | prefill temp MiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for run in runs:
        if run.status != "ok":
            continue
        for s in run.speed:
            mem = s.get("prefill_memory") or {}
            lines.append(
                f"| {run.name} | {s['length']} | {s['batch_size']} | {_num(s['prefill_s'], '.3f')}"
                f" | {_num(s['prefill_tokens_per_s'], ',.0f')} | "
                f"{_num(s['decode_ms_per_token'], '.2f')} | {_mib(s['kv_cache_bytes'])} | "
                f"{_mib(s['kv_cache_bytes_method'])} | {_mib(mem.get('temp_bytes'))} |")
    return "\n".join(lines)


def training_table(records: list[dict]) -> str:
    lines = ["| phase | seq len | steps | batch | loss first -> last 10% | step ms | tokens/s |"
             " seconds |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for rec in records:
        for s in rec["stages"]:
            lines.append(f"| {rec['name']} | {s['seq_len']} | {s['steps']} | {s['batch_size']} | "
                         f"{s['loss_first']:.3f} -> {s['loss_last']:.3f} | "
                         f"{_num(s['step_ms'], '.1f')} | {_num(s['tokens_per_s'], ',.0f')} | "
                         f"{s['seconds']:.1f} |")
    return "\n".join(lines)


def data_name(meta: dict) -> str:
    task = meta["training"][0].get("task", "mix")
    what = {"mix": "passkey and key-value retrieval", "passkey": "passkey retrieval only",
            "kv": "key-value retrieval only"}[task]
    return f"the built-in synthetic data ({what}; random-word filler, no text corpus)"


def describe_environment(meta: dict) -> str:
    env = meta.get("environment") or {}
    return (f"{env.get('device', '?')} ({env.get('platform', '?')}), jax {env.get('jax', '?')}, "
            f"Python {env.get('python', '?')}, {env.get('date', '?')}")


def skipped_lines(runs) -> str:
    return "".join(f"\n- **{r.name} skipped**: {r.reason}\n" for r in runs if r.status != "ok")


def plots(runs, tasks, prefix: str, img_dir: Path, train_length: int | None) -> list[str]:
    """EM-vs-length and heat-map PNGs; returns their markdown image lines (none without
    matplotlib, with a note)."""
    from jax_cca.eval import plot_em_by_length, plot_heatmap

    lines = []
    try:
        for task in tasks:
            png = plot_em_by_length(runs, task, img_dir / f"{prefix}_{task}.png",
                                    title=f"{task}: exact match vs context length",
                                    train_length=train_length)
            lines.append(f"![{task}](img/{png.name})")
            row = []
            for run in runs:
                if run.status == "ok" and task in run.tasks:
                    png = plot_heatmap(run, task, img_dir / f"{prefix}_{task}_{run.name}.png")
                    row.append(f"![{task} {run.name}](img/{png.name})")
            lines.append(" ".join(row))
    except ImportError as e:
        lines.append(f"(no plots: {e})")
    return lines


def command(meta: dict, script: str) -> str:
    """The command that produced a report (the options that differ from the defaults are in
    the protocol it stores)."""
    quick = " --quick" if meta.get("protocol", {}).get("quick") else ""
    return f"PYTHONPATH=. python bench/{script}.py{quick}"


def quick_warning(meta: dict) -> str:
    protocol = meta.get("protocol", {})
    if not protocol.get("quick"):
        return ""
    pre = meta["training"][0]
    stage = pre["stages"][-1]
    per_length = protocol["samples"] * len(protocol["depths"])
    return (f"> **Smoke run, not a result.** Generated by `--quick` on "
            f"{(meta.get('environment') or {}).get('platform', '?')}: a "
            f"{meta['model_config']['num_layers']}-layer model trained {pre['seconds']:.0f} s "
            f"({pre['task']} data, {stage['seq_len']} tokens), evaluated at "
            f"{', '.join(str(n) for n in protocol['lengths'])} tokens with {per_length} examples "
            "per task and length. It shows that the pipeline runs end to end and what the report "
            "looks like; its numbers say nothing about the methods at scale. Running the script "
            "without `--quick` on the GPU machine, then `--report`, replaces this section.\n\n")


def add_common_args(p: argparse.ArgumentParser, *, curriculum: str, lengths: list[int],
                    tasks: list[str]) -> None:
    """The options both replication scripts share: report, model size, pretraining, evaluation
    budget, dtypes, saved models."""
    p.add_argument("--report", metavar="JSON",
                   help="only write docs/results.md's section and docs/img/ from this JSON")
    p.add_argument("--docs", type=Path, default=DOCS, help="docs directory for --report")
    p.add_argument("--quick", action="store_true", help="tiny CPU smoke run (< 2 min)")
    p.add_argument("--out", type=Path, default=None, help="the result JSON")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--curriculum", type=parse_curriculum, default=parse_curriculum(curriculum),
                   help=f"pretraining stages SEQ_LEN:STEPS,... (default {curriculum})")
    p.add_argument("--steps", type=int, default=None,
                   help="scale the curriculum's steps to this total")
    p.add_argument("--tokens-per-step", type=int, default=32768)
    p.add_argument("--train-task", choices=("mix", "passkey", "kv"), default="mix",
                   help="synthetic training data (default mix: passkey and key-value)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--group-size", type=int, default=16)
    p.add_argument("--local-window", type=int, default=512)
    p.add_argument("--lengths", type=lengths_arg, default=lengths,
                   help="evaluation lengths, e.g. 4K,8K")
    p.add_argument("--depths", type=lambda t: [float(x) for x in t.split(",")],
                   default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--tasks", type=lambda t: t.split(","), default=tasks)
    p.add_argument("--samples", type=int, default=4,
                   help="examples per (task, length, depth)")
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--eval-dtype", choices=("bfloat16", "float32"), default=None,
                   help="default bfloat16 on GPU, float32 elsewhere")
    p.add_argument("--compute-dtype", choices=("bfloat16", "float32"), default=None,
                   help="training compute dtype (default as --eval-dtype)")
    p.add_argument("--save-models", type=Path, default=None, metavar="DIR",
                   help="keep the trained models (orbax) and their training records in DIR")
    p.add_argument("--load-models", type=Path, default=None, metavar="DIR",
                   help="evaluate the models of a --save-models DIR instead of training")
    p.add_argument("--train-only", action="store_true",
                   help="stop after training (with --save-models: split a run in two)")
    p.add_argument("--seed", type=int, default=0)


# The smoke run: a model small enough to learn the passkey task on 2 CPU cores in ~40 s.
QUICK = dict(layers=2, hidden=128, intermediate=256, heads=4, kv_heads=2, vocab=128,
             curriculum=parse_curriculum("64:300"), tokens_per_step=4096, lr=3e-3, warmup=10,
             group_size=8, local_window=32, train_task="passkey", lengths=[64, 128, 256],
             depths=[0.0, 0.5, 1.0], samples=2, batch_size=3, tasks=["passkey"])


def resolve(args, parser: argparse.ArgumentParser, quick: dict, section: str):
    """Fills the defaults that depend on --quick, --steps and the backend."""
    import jax

    if args.quick:
        defaults = parser.parse_args([])
        for key, value in quick.items():  # quick sizes, unless given on the command line
            if getattr(args, key) == getattr(defaults, key):
                setattr(args, key, value)
    if args.steps:
        total = sum(s.steps for s in args.curriculum)
        args.curriculum = [Stage(s.seq_len, max(1, round(s.steps * args.steps / total)))
                           for s in args.curriculum]
    gpu = jax.default_backend() == "gpu"
    args.eval_dtype = args.eval_dtype or ("bfloat16" if gpu else "float32")
    args.compute_dtype = args.compute_dtype or args.eval_dtype
    if args.out is None:
        if args.quick:
            args.out = Path(tempfile.mkdtemp(prefix=f"{section}_")) / f"{section}.json"
        else:
            results = Path(os.environ.get("OUT") or REPO / "bench" / "results")
            args.out = results / f"{section}.json"
    return args


# ------------------------------------------------------------------------------ this script
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, curriculum="256:600,2048:2400",
                    lengths=[2048, 4096, 8192, 16384, 32768],
                    tasks=["passkey", "multikey", "kvqa"])
    p.add_argument("--cca-steps", type=int, default=800)
    p.add_argument("--cca-len", type=int, default=None,
                   help="CCA fine-tuning length (default: the last curriculum length)")
    p.add_argument("--cca-lr", type=float, default=3e-4)
    p.add_argument("--sink-tokens", type=int, default=4)
    p.add_argument("--with-unfinetuned", action="store_true",
                   help="also evaluate CCA right after conversion (cca-no-ft)")
    return p


def _protocol(args) -> dict:
    out = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    out["curriculum"] = [dataclasses.asdict(s) for s in args.curriculum]
    return out


def pretrained_model(args, config):
    """(the model pretrained with full attention, its training record): trained, or read from
    --load-models; written to --save-models."""
    from checkpoints import restore_model, save_model
    from jax_cca import CCALlama

    if args.load_models:
        print(f"loading the pretrained model from {args.load_models}", file=sys.stderr)
        full = restore_model(args.load_models / "full",
                             max_position_embeddings=config.max_position_embeddings)
        return full, json.loads((args.load_models / "training.json").read_text())[0]
    base = CCALlama.from_config(config, seed=args.seed)
    print(f"pretraining {base.num_params():,} parameters with full attention", file=sys.stderr)
    full, record = train(base, args.curriculum, lr=args.lr, warmup=args.warmup,
                         tokens_per_step=args.tokens_per_step, seed=args.seed,
                         compute_dtype=args.compute_dtype, name="pretrain (full)",
                         task=args.train_task)
    if args.save_models:
        save_model(full, args.save_models / "full", overwrite=True)
        (args.save_models / "training.json").write_text(json.dumps([record]))
    return full, record


def trained_models(args, config):
    """(pretrained full model, CCA model fine-tuned from it, training records)."""
    from checkpoints import restore_model, save_model

    full, pre = pretrained_model(args, config)
    if args.load_models and (args.load_models / "cca").exists():
        cca = restore_model(args.load_models / "cca",
                            max_position_embeddings=config.max_position_embeddings)
        return full, cca, json.loads((args.load_models / "training.json").read_text())
    converted = full.with_attention(attention="cca", group_size=args.group_size,
                                    local_window=args.local_window)
    print(f"fine-tuning with CCA (g={args.group_size}, w={args.local_window})", file=sys.stderr)
    cca, ft = train(converted, [Stage(args.cca_len, args.cca_steps)], lr=args.cca_lr,
                    warmup=min(args.warmup, args.cca_steps // 10), seed=args.seed + 1,
                    tokens_per_step=args.tokens_per_step, compute_dtype=args.compute_dtype,
                    name="fine-tune (cca)", task=args.train_task)
    if args.save_models:
        save_model(cca, args.save_models / "cca", overwrite=True)
        (args.save_models / "training.json").write_text(json.dumps([pre, ft]))
    return full, cca, [pre, ft]


def run(args) -> Path:
    from bench.common import environment
    from jax_cca.eval import TaskOptions, em_table, evaluate_methods, save_report

    begin = time.perf_counter()
    new_tokens = 5
    config = small_config(args, max(args.lengths) + new_tokens)
    full, cca, records = trained_models(args, config)
    if args.train_only:
        print(f"trained in {time.perf_counter() - begin:.0f} s; models in {args.save_models}")
        return args.save_models
    key_words = records[0]["stages"][-1]["key_words"]
    full_eval = full.with_attention(dtype=args.eval_dtype)
    cca_eval = cca.with_attention(dtype=args.eval_dtype)
    common = dict(tasks=args.tasks, lengths=args.lengths, depths=args.depths,
                  samples=args.samples, batch_size=args.batch_size, seed=args.seed + 7,
                  task_options=TaskOptions(key_words=key_words),
                  memory_lengths=[max(args.lengths)], progress=True)
    cca_options = {"group_size": args.group_size, "local_window": args.local_window}
    plan = [(full_eval, "full", {}, "full"), (cca_eval, "cca", cca_options, "cca"),
            (full_eval, "streaming", {"sink_tokens": args.sink_tokens,
                                      "local_window": args.local_window}, "streaming")]
    if args.with_unfinetuned:
        plan.append((full_eval, "cca", cca_options, "cca-no-ft"))
    runs, env = [], environment()

    def save():  # after every method, so a run cut short keeps what it evaluated
        return save_report(args.out, runs, environment=env, protocol=_protocol(args),
                           model_config=json.loads(full.config.to_json()), training=records,
                           eval_key_words=key_words, total_seconds=time.perf_counter() - begin)

    for model, method, options, label in plan:
        start = time.perf_counter()
        runs += evaluate_methods(model, [(method, options)], label=label,
                                 on_skip=lambda m, why: print(f"skipping {m}: {why}",
                                                              file=sys.stderr), **common)
        print(f"evaluated {label} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        path = save()
    for task in args.tasks:
        print(f"\n{task} (exact match over depths and samples):\n{em_table(runs, task)}")
    print(f"\n{speed_table(runs)}\n\nresults: {path} ({time.perf_counter() - begin:.0f} s)")
    print(f"report: PYTHONPATH=. python bench/replicate_cca.py --report {path}")
    return path


def report(json_path: str | Path, docs: Path = DOCS) -> Path:
    from jax_cca.eval import em_table, load_report

    meta, runs = load_report(json_path)
    protocol, cfg = meta["protocol"], meta["model_config"]
    pre, ft = meta["training"][0], meta["training"][1]  # what was trained (maybe loaded)
    train_len = max(s["seq_len"] for s in pre["stages"])
    tasks = protocol["tasks"]
    body = [quick_warning(meta),
            f"`{command(meta, 'replicate_cca')}` -> `{Path(json_path).name}`; "
            f"{describe_environment(meta)}; {meta.get('total_seconds', 0):.0f} s in all.\n",
            f"Model: {cfg['num_layers']} layers, hidden {cfg['hidden_size']}, "
            f"{cfg['num_heads']} query / {cfg['num_kv_heads']} kv heads, vocab "
            f"{cfg['vocab_size']}, RoPE theta {cfg['rope_theta']:g}, from random weights. "
            f"Pretrained with full attention on {data_name(meta)}, converted to CCA (g = "
            f"{protocol['group_size']}, w = {protocol['local_window']}) and fine-tuned "
            f"{ft['stages'][0]['steps']} steps at {ft['stages'][0]['seq_len']} tokens. "
            f"StreamingLLM: the "
            f"pretrained model with {protocol['sink_tokens']} sink tokens and a window of "
            f"{protocol['local_window']}. Evaluated in {protocol['eval_dtype']} with "
            f"{protocol['samples']} samples per (task, length, depth), depths "
            f"{', '.join(f'{d:g}' for d in protocol['depths'])}; keys of "
            f"{meta.get('eval_key_words')} word(s) as in the last training stage. Trained at "
            f"{train_len} tokens at most: longer contexts need RoPE extrapolation for full "
            "attention, and CCA's core tokens sit at distances it never saw.\n",
            "### Training\n", training_table(meta["training"]), "",
            "### Exact match per context length (over depths and samples)\n"]
    for task in tasks:
        body += [f"**{task}**\n", em_table(runs, task), ""]
    body += [skipped_lines(runs),
             "### Speed and memory (same runs)\n",
             "Prefill: seconds per batch of prompts (median of the batches after the first, "
             "which compiles); decode: ms per cached decode step of the whole batch; KV cache: "
             "the decode cache this implementation allocates for the batch, and what the method "
             "itself needs (StreamingLLM runs here on the full cache through a mask, so it "
             "allocates full attention's cache); prefill temp: XLA's temporaries of the compiled "
             "prefill at the longest length.\n",
             speed_table(runs), "", "### Plots\n",
             *plots(runs, tasks, SECTION, docs / "img", train_len)]
    write_section(docs / "results.md", SECTION, "CCA in miniature (full vs CCA vs StreamingLLM)",
                  "\n".join(body))
    return docs / "results.md"


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.report:
        print(f"wrote {report(args.report, args.docs)}")
        return 0
    if args.train_only and not args.save_models:
        parser.error("--train-only needs --save-models DIR")
    args = resolve(args, parser, {**QUICK, "cca_steps": 30}, SECTION)
    args.cca_len = args.cca_len or args.curriculum[-1].seq_len
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
