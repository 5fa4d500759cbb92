"""ReAttention's claim in miniature: a small LLaMA trained with full attention at 1K tokens,
evaluated on needle retrieval at 8x-64x its training length, with full attention (expected to
fail past the training length) and with ReAttention (training-free; expected to hold).

    PYTHONPATH=. python bench/replicate_reattention.py          # GPU
    PYTHONPATH=. python bench/replicate_reattention.py --quick  # CPU smoke run, < 2 min
    PYTHONPATH=. python bench/replicate_reattention.py --report JSON   # docs/results.md only

Same structure and options as ``bench/replicate_cca.py`` (whose helpers it uses): pretraining on
the synthetic retrieval mix with a length curriculum (default ``256:600,1024:2400``), then
``jax_cca.eval`` on passkey and multi-key needle retrieval at ``--lengths`` (default 1K, 8K, 16K,
32K, 64K: the training length, then 8x to 64x). ReAttention runs the same weights with
``attention="reattention"`` and the selection given by the ``--re-*`` options, twice: picking
tokens (the authors' method) and, with ``--re-key-block`` b > 0 (default 32; it must equal
``--re-span`` and divide ``--re-align``), picking whole blocks of b keys by their bound
(``reattention_key_block``, docs/reattention.md), so that the two are compared on one trained
model. The selection is sized so that
every position it hands out stays below the training length (sink + max_selected * span + window
+ align - 1 + chunk; checked before running). While this installation's model cannot run
ReAttention the method is recorded as skipped, with the reason, and full attention still runs.
``--report JSON`` writes the "ReAttention in miniature" section of docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.replicate_cca import (  # noqa: E402
    DOCS,
    QUICK,
    add_common_args,
    command,
    data_name,
    describe_environment,
    plots,
    pretrained_model,
    quick_warning,
    resolve,
    skipped_lines,
    small_config,
    speed_table,
    training_table,
    write_section,
)

SECTION = "replicate_reattention"
# --re-* option -> CCAConfig field of ReAttention's selection (jax_cca/config.py).
SELECTION = {"sink": "reattention_sink", "window": "reattention_window",
             "top_k": "reattention_top_k", "max_selected": "reattention_max_selected",
             "span": "reattention_span", "chunk": "reattention_chunk",
             "align": "reattention_align"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, curriculum="256:600,1024:2400",
                    lengths=[1024, 8192, 16384, 32768, 65536], tasks=["passkey", "multikey"])
    defaults = dict(sink=16, window=256, top_k=4, max_selected=16, span=32, chunk=128, align=64)
    for name, value in defaults.items():
        p.add_argument(f"--re-{name.replace('_', '-')}", dest=f"re_{name}", type=int,
                       default=value, help=f"ReAttention {SELECTION[name]} (default {value})")
    p.add_argument("--re-key-block", dest="re_key_block", type=int, default=32,
                   help="also evaluate ReAttention picking blocks of this many keys "
                        "(reattention_key_block; 0: tokens only; default 32)")
    return p


# Training length 64: sink 4 + 2 spans of 8 + window 16 + align 8 - 1 + chunk 16 = 59 < 64.
QUICK_RE = {**QUICK, "lengths": [64, 512, 1024], "re_sink": 4, "re_window": 16, "re_top_k": 2,
            "re_max_selected": 2, "re_span": 8, "re_chunk": 16, "re_align": 8,
            "re_key_block": 8}
BLOCKS = "reattention_blocks"  # the label of the block-picks run


def selection_options(args) -> dict:
    return {field: getattr(args, f"re_{name}") for name, field in SELECTION.items()}


def methods(args, options: dict) -> list[tuple[str, str, dict]]:
    """(label, method, options) of each run: ReAttention with token picks, then with block
    picks (unless --re-key-block 0), then full attention, so that a run cut short keeps the
    ReAttention results first."""
    from jax_cca import CCAConfig

    runs = [("reattention", "reattention", options)]
    if args.re_key_block:
        blocks = {**options, "reattention_key_block": args.re_key_block}
        try:  # the config's own rules: span = key block, dividing the alignment
            CCAConfig(attention="reattention", **blocks)
        except ValueError as err:
            raise SystemExit(f"--re-key-block {args.re_key_block}: {err}") from None
        runs.append((BLOCKS, "reattention", blocks))
    return runs + [("full", "full", {})]


def position_bound(options: dict) -> int:
    """Positions ReAttention can hand out are below this (as CCAConfig.max_reattention_position:
    the gathered list, the aligned window and the chunk)."""
    return (options["reattention_sink"]
            + options["reattention_max_selected"] * options["reattention_span"]
            + options["reattention_window"] + options["reattention_align"] - 1
            + options["reattention_chunk"])


def check_bound(bound: int, train_len: int) -> None:
    if bound > train_len:
        raise SystemExit(f"the ReAttention selection hands out positions up to {bound - 1}, past "
                         f"the training length {train_len}: lower --re-window, --re-max-selected,"
                         " --re-span or --re-chunk")


def run(args) -> Path:
    from bench.common import environment
    from jax_cca.eval import TaskOptions, em_table, evaluate_methods, save_report

    begin = time.perf_counter()
    options = selection_options(args)
    bound = position_bound(options)
    to_run = methods(args, options)
    if not args.load_models:
        check_bound(bound, max(s.seq_len for s in args.curriculum))
    config = small_config(args, max(args.lengths) + 5)
    full, record = pretrained_model(args, config)
    train_len = max(s["seq_len"] for s in record["stages"])
    check_bound(bound, train_len)
    if args.train_only:
        print(f"trained in {time.perf_counter() - begin:.0f} s; model in {args.save_models}")
        return args.save_models
    model = full.with_attention(dtype=args.eval_dtype)
    common = dict(tasks=args.tasks, lengths=args.lengths, depths=args.depths,
                  samples=args.samples, batch_size=args.batch_size, seed=args.seed + 7,
                  task_options=TaskOptions(key_words=record["stages"][-1]["key_words"]),
                  memory_lengths=[max(args.lengths)], progress=True)
    runs, env = [], environment()
    protocol = {**{k: (str(v) if isinstance(v, Path) else v)
                   for k, v in vars(args).items() if k != "curriculum"},
                "curriculum": [[s.seq_len, s.steps] for s in args.curriculum],
                "train_length": train_len, "position_bound": bound}
    for label, method, method_options in to_run:
        start = time.perf_counter()
        runs += evaluate_methods(model, [(method, method_options)], label=label,
                                 on_skip=lambda m, why: print(f"skipping {m}: {why}",
                                                              file=sys.stderr), **common)
        print(f"{label}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
        # after every method, so a run cut short keeps what it evaluated
        path = save_report(args.out, runs, environment=env, protocol=protocol,
                           model_config=json.loads(full.config.to_json()), training=[record],
                           eval_key_words=common["task_options"].key_words,
                           total_seconds=time.perf_counter() - begin)
    for task in args.tasks:
        print(f"\n{task} (exact match over depths and samples):\n{em_table(runs, task)}")
    print(f"\n{speed_table(runs)}\n\nresults: {path} ({time.perf_counter() - begin:.0f} s)")
    print(f"report: PYTHONPATH=. python bench/replicate_reattention.py --report {path}")
    return path


def report(json_path: str | Path, docs: Path = DOCS) -> Path:
    from jax_cca.eval import em_table, load_report

    meta, runs = load_report(json_path)
    protocol, cfg = meta["protocol"], meta["model_config"]
    train_len = max(s["seq_len"] for s in meta["training"][0]["stages"])
    sel = ", ".join(f"{name} {protocol[f're_{name}']}" for name in SELECTION)
    body = [quick_warning(meta),
            f"`{command(meta, SECTION)}` -> `{Path(json_path).name}`; "
            f"{describe_environment(meta)}; {meta.get('total_seconds', 0):.0f} s in all.\n",
            f"Model: {cfg['num_layers']} layers, hidden {cfg['hidden_size']}, "
            f"{cfg['num_heads']} query / {cfg['num_kv_heads']} kv heads, vocab "
            f"{cfg['vocab_size']}, from random weights, trained with full attention at "
            f"{train_len} tokens at most on {data_name(meta)}. Evaluated at "
            f"{', '.join(str(n) for n in protocol['lengths'])} tokens "
            f"({', '.join(f'{n / train_len:g}x' for n in protocol['lengths'])} the training "
            f"length) in {protocol['eval_dtype']}, {protocol['samples']} samples per (task, "
            f"length, depth). ReAttention selection: {sel}; its positions stay below "
            f"{protocol['position_bound']} <= {train_len}."
            + (f" `{BLOCKS}` is the same selection picking whole blocks of "
               f"{protocol['re_key_block']} keys (`reattention_key_block`) instead of tokens."
               if protocol.get("re_key_block") else "") + "\n",
            "### Training\n", training_table(meta["training"]), "",
            "### Exact match per context length (over depths and samples)\n"]
    for task in protocol["tasks"]:
        body += [f"**{task}**\n", em_table(runs, task), ""]
    body += [skipped_lines(runs), "### Speed and memory (same runs)\n",
             "As in the CCA section: prefill seconds per batch (median after the compiling "
             "batch), decode ms per cached step, decode cache MiB (ReAttention keeps the full, "
             "un-rotated cache), XLA prefill temporaries at the longest length.\n",
             speed_table(runs), "", "### Plots\n",
             *plots(runs, protocol["tasks"], SECTION, docs / "img", train_len)]
    write_section(docs / "results.md", SECTION,
                  "ReAttention in miniature (full attention vs ReAttention past the training "
                  "length)", "\n".join(body))
    return docs / "results.md"


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.report:
        print(f"wrote {report(args.report, args.docs)}")
        return 0
    if args.train_only and not args.save_models:
        parser.error("--train-only needs --save-models DIR")
    run(resolve(args, parser, QUICK_RE, SECTION))
    return 0


if __name__ == "__main__":
    sys.exit(main())
