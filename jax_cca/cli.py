"""The ``jax-cca`` command (also ``python -m jax_cca``).

    jax-cca                              the demo: CCA vs full attention on a tiny random LLaMA
    jax-cca demo --length 4096           the same, with options
    jax-cca convert HF_DIR OUT_DIR       Hugging Face LLaMA directory -> orbax checkpoint
    jax-cca export CKPT_DIR HF_OUT_DIR   orbax checkpoint -> Hugging Face safetensors directory
    jax-cca generate --model DIR --prompt "Once upon a time" --max-new-tokens 32
    jax-cca finetune --seq-len 512 --steps 200 --out runs/tiny   fine-tune (docs/training.md)

User errors (a missing directory, a bad argument) print one ``jax-cca: error: ...`` message on
stderr and exit with status 2; programming errors keep their traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from pathlib import Path

from jax_cca.fileio import check_writable

COMMANDS = ("demo", "convert", "export", "generate", "finetune")
# Tokenizer files copied along by convert and export, so that `generate --prompt` finds them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "generation_config.json")

class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's default prints the whole usage block
        raise CLIError(f"{message} (see '{self.prog} --help')")


# ------------------------------------------------------------------------------ argument types
def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _float_in(low: float, high: float | None, low_open: bool):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        if too_low or (high is not None and value > high) or value != value:
            bound = f"({low}" if low_open else f"[{low}"
            raise argparse.ArgumentTypeError(
                f"must be in {bound}, {high if high is not None else 'inf'}], got {value}"
            )
        return value

    return parse


def _id_list(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.replace(" ", "").split(",") if part != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated token ids like 1,2,3; got {text!r}"
        ) from None
    if not ids:
        raise argparse.ArgumentTypeError("expected at least one token id")
    return ids


# ------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    from jax_cca import __version__

    parser = _Parser(
        prog="jax-cca",
        description="Core Context Aware attention (CCA) for LLaMA-family models in JAX. "
                    "With no command, runs the demo.",
    )
    parser.add_argument("--version", action="version", version=f"jax-cca {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="CCA vs full attention on a tiny random model (default)",
                          description="Compare CCA with full attention on CCAConfig.tiny() with "
                                      "random weights: exactness check, prefill and generation "
                                      "timings, attention FLOPs and KV-cache sizes.")
    demo.add_argument("--length", type=_int_at_least(1), default=2048,
                      help="prompt length in tokens (default 2048)")
    demo.add_argument("--new-tokens", type=_int_at_least(0), default=16,
                      help="tokens to generate greedily (default 16)")
    demo.add_argument("--group-size", type=_int_at_least(1), default=16,
                      help="CCA group size g (default 16)")
    demo.add_argument("--local-window", type=_int_at_least(1), default=256,
                      help="CCA local window w, a multiple of g (default 256)")
    demo.add_argument("--batch", type=_int_at_least(1), default=1, help="batch size (default 1)")
    demo.add_argument("--repeats", type=_int_at_least(1), default=3,
                      help="timed prefill runs; the median is reported (default 3)")
    demo.add_argument("--seed", type=int, default=0, help="weights and prompt seed (default 0)")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    demo.set_defaults(func=cmd_demo)

    conv = sub.add_parser("convert", help="Hugging Face LLaMA directory -> orbax checkpoint",
                          description="Load a Hugging Face LLaMA directory (safetensors or .bin) "
                                      "and save it as a jax-cca orbax checkpoint.")
    conv.add_argument("hf_dir", metavar="HF_DIR", help="Hugging Face model directory")
    conv.add_argument("out_dir", metavar="OUT_DIR", help="checkpoint directory to write")
    _add_attention_args(conv, default_attention="cca", default_group=16, default_window=1024)
    conv.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                      help="parameter dtype (default: the checkpoint's)")
    conv.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    conv.set_defaults(func=cmd_convert)

    exp = sub.add_parser("export", help="orbax checkpoint -> Hugging Face safetensors directory",
                         description="Write a jax-cca checkpoint as a Hugging Face LLaMA "
                                     "directory (config.json + safetensors).")
    exp.add_argument("ckpt_dir", metavar="CKPT_DIR", help="jax-cca checkpoint directory")
    exp.add_argument("hf_out_dir", metavar="HF_OUT_DIR", help="directory to write")
    exp.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                     help="dtype of the written weights (default: the checkpoint's)")
    exp.add_argument("--overwrite", action="store_true",
                     help="write into HF_OUT_DIR even if it is not empty (its old weight files "
                          "and shard indexes are removed first)")
    exp.set_defaults(func=cmd_export)

    gen = sub.add_parser("generate", help="continue a prompt with a model",
                         description="Greedy (temperature 0) or sampled continuation of a prompt. "
                                     "One prefill of the prompt, then one cached decode "
                                     "step per new token (full: KV cache; CCA: core tokens + "
                                     "local ring; ReAttention: un-rotated KV cache).")
    gen.add_argument("--model", required=True, metavar="DIR",
                     help="Hugging Face LLaMA directory or jax-cca checkpoint")
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", metavar="TEXT",
                        help="prompt text (needs tokenizer.json in --tokenizer or the model dir)")
    prompt.add_argument("--prompt-ids", type=_id_list, metavar="IDS",
                        help="prompt token ids, comma-separated: 1,2,3")
    gen.add_argument("--tokenizer", metavar="DIR",
                     help="directory holding tokenizer.json (default: the model directory)")
    gen.add_argument("--max-new-tokens", type=_int_at_least(0), default=32,
                     help="tokens to generate (default 32)")
    gen.add_argument("--temperature", type=_float_in(0.0, None, False), default=0.0,
                     help="0 = greedy (default); > 0 samples")
    gen.add_argument("--top-k", type=_int_at_least(1), default=None,
                     help="sample among the k most likely tokens")
    gen.add_argument("--top-p", type=_float_in(0.0, 1.0, True), default=None,
                     help="nucleus sampling: smallest set of tokens with probability >= p")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    gen.add_argument("--stop-tokens", type=_id_list, default=None, metavar="IDS",
                     help="extra stop token ids, comma-separated")
    gen.add_argument("--ignore-eos", action="store_true",
                     help="do not stop at the model's end-of-sequence token")
    _add_attention_args(gen, default_attention=None, default_group=None, default_window=None)
    gen.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                     help="compute dtype (default: the model's)")
    gen.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    gen.set_defaults(func=cmd_generate)
    from jax_cca.finetune_cli import add_finetune_parser

    add_finetune_parser(sub)
    from jax_cca.eval_cli import add_eval_parser
    add_eval_parser(sub)
    return parser


# ReAttention knobs: flag suffix -> (CCAConfig field, help). Unset: the model's (config) value.
REATTENTION_ARGS = {
    "sink": ("reattention_sink", "sink tokens always attended"),
    "window": ("reattention_window", "local window"),
    "top-k": ("reattention_top_k", "keys each query picks by position-free score"),
    "max-selected": ("reattention_max_selected", "picked keys kept per chunk of queries"),
    "span": ("reattention_span", "neighbours each kept key brings"),
    "chunk": ("reattention_chunk", "queries sharing one selection in a prefill"),
    "align": ("reattention_align", "alignment of the middle region"),
    "key-block": ("reattention_key_block", "pick whole blocks of N keys by an upper bound of "
                  "q.k (1: token picks; N > 1 needs --reattention-span N)"),
}


def _add_attention_args(p, *, default_attention, default_group, default_window,
                        reattention: bool = True):
    """--attention, the CCA knobs and (``reattention``) the ReAttention knobs."""
    keep = " (default: as stored in the model)"
    p.add_argument("--attention", choices=("full", "cca", "reattention")[: 3 if reattention else 2],
                   default=default_attention,
                   help=f"attention to run (default {default_attention})" if default_attention
                   else "attention to run" + keep)
    p.add_argument("--group-size", type=_int_at_least(1), default=default_group,
                   help=f"CCA group size g (default {default_group})" if default_group
                   else "CCA group size g" + keep)
    p.add_argument("--local-window", type=_int_at_least(1), default=default_window,
                   help=f"CCA local window w, a multiple of g (default {default_window})"
                   if default_window else "CCA local window w" + keep)
    if not reattention:
        return
    from jax_cca.config import CCAConfig

    defaults = {f.name: f.default for f in dataclasses.fields(CCAConfig)}
    for suffix, (field, text) in REATTENTION_ARGS.items():
        low = 0 if suffix in ("sink", "window") else 1
        p.add_argument(f"--reattention-{suffix}", dest=field, type=_int_at_least(low),
                       default=None, metavar="N",
                       help=f"ReAttention: {text} (default: the model's, else {defaults[field]})")


def _overrides(args) -> dict:
    names = {"attention": "attention", "group_size": "group_size",
             "local_window": "local_window", "dtype": "dtype",
             **{field: field for field, _ in REATTENTION_ARGS.values()}}
    return {key: getattr(args, attr) for attr, key in names.items()
            if getattr(args, attr, None) is not None}


def _existing_dir(path: str, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise CLIError(f"{what} not found: {p}")
    if not p.is_dir():
        raise CLIError(f"{what} is not a directory: {p}")
    return p


def _copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def _describe(config) -> str:
    att = config.attention
    if att == "cca":
        att += f" (g={config.group_size}, w={config.local_window})"
    elif att == "reattention":
        sel = config.selection()
        att += (f" (sink={sel.sink_tokens}, window={sel.local_window}, top_k={sel.top_k}, "
                f"max_selected={sel.max_selected}, span={sel.span}, chunk={sel.chunk_size}"
                + (f", key_block={sel.key_block})" if sel.key_block > 1 else ")"))
    return (f"{config.num_layers} layers, {config.num_heads} heads / {config.num_kv_heads} kv, "
            f"vocab {config.vocab_size}, {config.dtype}, attention {att}")


# ------------------------------------------------------------------------------ commands
def cmd_demo(args) -> int:
    from jax_cca.demo import run_demo

    run_demo(length=args.length, new_tokens=args.new_tokens, group_size=args.group_size,
             local_window=args.local_window, batch=args.batch, seed=args.seed,
             repeats=args.repeats, progress=not args.no_progress)
    return 0


def cmd_convert(args) -> int:
    from checkpoints import save_model
    from jax_cca.model import CCALlama

    src = _existing_dir(args.hf_dir, "Hugging Face model directory")
    out = Path(args.out_dir)
    check_writable(out, args.overwrite)  # fail before the (possibly long) load
    model = CCALlama.from_pretrained(src, **_overrides(args))
    save_model(model, out, overwrite=args.overwrite)
    copied = _copy_tokenizer_files(src, out)
    print(f"converted {src} -> {out}: {model.num_params():,} parameters, "
          f"{_describe(model.config)}")
    if copied:
        print(f"copied {', '.join(copied)}")
    return 0


def cmd_export(args) -> int:
    from jax_cca.model import CCALlama

    src = _existing_dir(args.ckpt_dir, "checkpoint directory")
    out = Path(args.hf_out_dir)
    check_writable(out, args.overwrite)
    model = CCALlama.from_pretrained(src, **_overrides(args))
    model.save_pretrained(out, overwrite=args.overwrite)
    copied = _copy_tokenizer_files(src, out)
    print(f"exported {src} -> {out}: {model.num_params():,} parameters, {model.config.dtype}")
    if copied:
        print(f"copied {', '.join(copied)}")
    return 0


def _load_tokenizer(directory: Path, required: bool):
    """A ``tokenizers.Tokenizer`` from directory/tokenizer.json, or None when not required and
    unavailable."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        if required:
            raise CLIError(f"--prompt needs a tokenizer, but {path} does not exist; pass "
                           "--tokenizer DIR or give token ids with --prompt-ids")
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        if required:
            raise CLIError("--prompt needs the 'tokenizers' package: "
                           "pip install 'jax-cca[tokenizers]'") from None
        return None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own Exception type for bad files
        raise CLIError(f"cannot read tokenizer {path}: {e}") from None


def cmd_generate(args) -> int:
    import numpy as np

    from jax_cca.generation import generate
    from jax_cca.model import CCALlama

    model_dir = _existing_dir(args.model, "model directory")
    tok_dir = _existing_dir(args.tokenizer, "tokenizer directory") if args.tokenizer \
        else model_dir
    tokenizer = _load_tokenizer(tok_dir, required=args.prompt is not None)
    if args.prompt is not None:
        prompt_ids = tokenizer.encode(args.prompt).ids
        if not prompt_ids:
            raise CLIError(f"the prompt {args.prompt!r} encodes to no tokens")
    else:
        prompt_ids = args.prompt_ids
    model = CCALlama.from_pretrained(model_dir, **_overrides(args))
    stops = list(args.stop_tokens or [])
    eos = model.config.eos_token_id
    if not args.ignore_eos and eos is not None:  # an eos outside a small vocab cannot occur
        eos_ids = [eos] if isinstance(eos, int) else list(eos)
        stops += [e for e in eos_ids if 0 <= e < model.config.vocab_size and e not in stops]
    start = time.perf_counter()
    out = generate(model, np.asarray([prompt_ids]), args.max_new_tokens,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   seed=args.seed, stop_tokens=stops or None,
                   progress=False if args.no_progress else "generating")
    seconds = time.perf_counter() - start
    new = np.asarray(out)[0, len(prompt_ids):].tolist()
    for i, t in enumerate(new):  # cut after the first stop token (the rest is filler)
        if t in stops:
            new = new[: i + 1]
            break
    print(f"model: {_describe(model.config)}", file=sys.stderr)
    print(f"generated {len(new)} tokens in {seconds:.2f} s (includes compilation)",
          file=sys.stderr)
    print("prompt ids: " + ",".join(map(str, prompt_ids)))
    print("generated ids: " + ",".join(map(str, new)))
    if tokenizer is not None:
        print("text: " + tokenizer.decode(list(prompt_ids) + new, skip_special_tokens=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv = ["demo", *argv]  # `jax-cca` and `jax-cca --length 512` run the demo
    from checkpoints import CheckpointError

    user_errors = (CLIError, CheckpointError, FileNotFoundError, FileExistsError,
                   NotADirectoryError, ValueError, NotImplementedError, ImportError)
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except SystemExit as e:  # --help and --version
        return e.code if isinstance(e.code, int) else 0
    except user_errors as e:
        message = str(e) or type(e).__name__
        print(f"jax-cca: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jax-cca: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
