"""The ``jax-cca eval`` subcommand: long-context retrieval (passkey, multi-key needle,
multi-document key-value QA) with exact-match scoring, for one model under several attention
methods. The evaluation itself is ``jax_cca.eval``; see docs/evaluation.md."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from jax_cca.cli import CLIError, _describe, _existing_dir, _int_at_least


def _length(text: str) -> int:
    text = text.strip()
    scale = 1024 if text[-1:] in ("k", "K") else 1
    try:
        value = int(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a length like 4096 or 4K; got {text!r}") \
            from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"lengths must be positive; got {text!r}")
    return value


def _list_of(parse, what: str):
    def parse_list(text: str) -> list:
        parts = [p for p in text.replace(" ", "").split(",") if p]
        if not parts:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}")
        return [parse(p) for p in parts]

    return parse_list


def _depth(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a depth in [0, 1]; got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"depths must be in [0, 1]; got {text!r}")
    return value


def _choice(options: tuple[str, ...], what: str):
    def parse(text: str) -> str:
        if text not in options:
            raise argparse.ArgumentTypeError(f"unknown {what} {text!r}; choose from "
                                             f"{', '.join(options)}")
        return text

    return parse


def _option(text: str) -> tuple[str, object]:
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE; got {text!r}")
    for cast in (int, float):
        try:
            return name, cast(raw)
        except ValueError:
            pass
    return name, {"true": True, "false": False}.get(raw.lower(), raw)


def add_eval_parser(sub) -> None:
    from jax_cca.eval import METHODS, TASKS

    ev = sub.add_parser(
        "eval", help="long-context retrieval accuracy (exact match) of a model per method",
        description="Evaluate a model on synthetic long-context retrieval (passkey, multi-key "
                    "needle in a haystack, multi-document key-value QA: the token scheme of the "
                    "built-in fine-tuning data) at several context lengths and needle depths, "
                    "under several attention methods, with greedy generation through the KV "
                    "cache and exact-match scoring. Prints EM tables; with --out writes "
                    "results.json and depth x length heat-maps. See docs/evaluation.md.")
    ev.add_argument("--model", metavar="DIR",
                    help="jax-cca checkpoint or Hugging Face LLaMA directory (default: "
                         "CCAConfig.tiny() with random weights, EM ~0)")
    ev.add_argument("--method", type=_list_of(_choice(METHODS, "method"), "methods"),
                    default=["full", "cca", "streaming"], metavar="M[,M..]",
                    help=f"attention methods, comma-separated, of {', '.join(METHODS)} "
                         "(default full,cca,streaming)")
    ev.add_argument("--tasks", type=_list_of(_choice(TASKS, "task"), "tasks"),
                    default=list(TASKS), metavar="T[,T..]",
                    help=f"tasks of {', '.join(TASKS)} (default all)")
    ev.add_argument("--lengths", type=_list_of(_length, "lengths"), default=[1024, 2048],
                    metavar="N[,N..]", help="prompt lengths in tokens, e.g. 4K,8K "
                                            "(default 1024,2048)")
    ev.add_argument("--depths", type=_list_of(_depth, "depths"),
                    default=[0.0, 0.25, 0.5, 0.75, 1.0], metavar="D[,D..]",
                    help="depths of the asked fact, 0 = start, 1 = end (default "
                         "0,0.25,0.5,0.75,1)")
    ev.add_argument("--samples", type=_int_at_least(1), default=2,
                    help="examples per (task, length, depth) (default 2)")
    ev.add_argument("--batch-size", type=_int_at_least(1), default=8,
                    help="prompts per generation batch (default 8)")
    ev.add_argument("--seed", type=_int_at_least(0), default=0,
                    help="seed of the examples (and of the random model)")
    ev.add_argument("--group-size", type=_int_at_least(1), default=None,
                    help="cca: group size g (default: the model's)")
    ev.add_argument("--local-window", type=_int_at_least(1), default=None,
                    help="cca: local window w (default: the model's)")
    ev.add_argument("--sink-tokens", type=_int_at_least(0), default=4,
                    help="streaming: attention sinks (default 4)")
    ev.add_argument("--streaming-window", type=_int_at_least(1), default=None,
                    help="streaming: window (default: the cca window)")
    ev.add_argument("--option", type=_option, action="append", default=[],
                    metavar="NAME=VALUE",
                    help="reattention: a model config field, e.g. reattention_window=256 "
                         "(repeatable)")
    ev.add_argument("--key-words", type=_int_at_least(1), default=None,
                    help="words per key in multikey/kvqa (default: what the fine-tuning data "
                         "uses at each length; pass the training value for other lengths)")
    ev.add_argument("--passkey-digits", type=_int_at_least(1), default=5,
                    help="passkey length (default 5, as in the fine-tuning data)")
    ev.add_argument("--value-digits", type=_int_at_least(1), default=4,
                    help="value length in multikey/kvqa (default 4, as in the fine-tuning data)")
    ev.add_argument("--needles", type=_int_at_least(1), default=4,
                    help="multikey: needles in the haystack, one asked (default 4)")
    ev.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                    help="compute dtype (default: the model's)")
    ev.add_argument("--max-positions", type=_int_at_least(1), default=None,
                    help="raise the model's max_position_embeddings (to evaluate past the "
                         "length it was trained at)")
    ev.add_argument("--prefill-chunk", type=_int_at_least(1), default=None,
                    help="prefill prompts in chunks of N tokens (less memory)")
    ev.add_argument("--memory", action="store_true",
                    help="also record XLA's memory analysis of each prefill (compiles it again)")
    ev.add_argument("--out", metavar="DIR",
                    help="write DIR/results.json and the plots (default: print tables only)")
    ev.add_argument("--no-plot", action="store_true", help="write no plots")
    ev.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    ev.set_defaults(func=cmd_eval)


def _method_options(args, method: str) -> dict:
    if method == "cca":
        return {"group_size": args.group_size, "local_window": args.local_window}
    if method == "streaming":
        return {"sink_tokens": args.sink_tokens,
                "local_window": args.streaming_window or args.local_window}
    if method == "reattention":
        return dict(args.option)
    return {}


def _load_model(args):
    from jax_cca.config import CCAConfig
    from jax_cca.model import CCALlama

    overrides = {k: v for k, v in dict(dtype=args.dtype,
                                       max_position_embeddings=args.max_positions).items()
                 if v is not None}
    if args.model is None:
        return CCALlama.from_config(CCAConfig.tiny(**overrides), seed=args.seed)
    return CCALlama.from_pretrained(_existing_dir(args.model, "model directory"), **overrides)


def cmd_eval(args) -> int:
    from jax_cca.eval import (
        TaskOptions,
        em_table,
        evaluate_methods,
        plot_em_by_length,
        plot_heatmap,
        save_report,
    )

    if args.option and "reattention" not in args.method:
        raise CLIError("--option sets reattention options; add reattention to --method")
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a directory")
    model = _load_model(args)
    config = model.config
    task_options = TaskOptions(passkey_digits=args.passkey_digits,
                               value_digits=args.value_digits, key_words=args.key_words,
                               num_needles=args.needles)
    longest = max(args.lengths) + max(task_options.answer_length(t) for t in args.tasks)
    if longest > config.max_position_embeddings and set(args.method) - {"reattention"}:
        raise CLIError(f"the longest prompt plus answer ({longest} tokens) exceeds the model's "
                       f"max_position_embeddings ({config.max_position_embeddings}); pass "
                       f"--max-positions {longest} to evaluate past it")
    print(f"model: {_describe(config)}", file=sys.stderr)

    def skipped(method: str, reason: str) -> None:
        print(f"skipping {method}: {reason}", file=sys.stderr)

    start = time.perf_counter()
    runs = evaluate_methods(
        model, [(m, _method_options(args, m)) for m in args.method], on_skip=skipped,
        tasks=args.tasks, lengths=args.lengths, depths=args.depths, samples=args.samples,
        seed=args.seed, batch_size=args.batch_size, task_options=task_options,
        prefill_chunk=args.prefill_chunk, memory_lengths=args.lengths if args.memory else (),
        progress=not args.no_progress)
    done = [r for r in runs if r.status == "ok"]
    if not done:
        raise CLIError("no method could run: " + "; ".join(f"{r.method}: {r.reason}"
                                                            for r in runs))
    print(f"evaluated {', '.join(r.name for r in done)} in {time.perf_counter() - start:.1f} s",
          file=sys.stderr)
    for task in args.tasks:
        print(f"\n{task}: exact match over depths and samples\n")
        print(em_table(done, task))
    if out is None:
        return 0
    path = save_report(out / "results.json", runs, model_path=args.model,
                       command="jax-cca " + " ".join(sys.argv[1:]) if sys.argv else None)
    print(f"\nresults: {path}")
    if not args.no_plot:
        try:
            for task in args.tasks:
                for run in done:
                    plot_heatmap(run, task, out / f"heatmap_{run.name}_{task}.png")
                plot_em_by_length(done, task, out / f"em_{task}.png")
            print(f"plots: {out}/heatmap_*.png, {out}/em_*.png")
        except ImportError as e:
            print(f"no plots: {e}", file=sys.stderr)
    return 0
