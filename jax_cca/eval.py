"""Long-context evaluation: synthetic retrieval tasks at any context length, exact-match scoring,
for one model under several attention methods.

    from jax_cca.eval import evaluate, save_report, plot_heatmap
    run = evaluate(model, "cca", lengths=[4096, 8192], depths=[0, 0.5, 1], samples=4)
    save_report("eval/results.json", [run])
    plot_heatmap(run, "passkey", "eval/passkey_cca.png")

Tasks (token scheme of ``jax_cca.data.SyntheticVocab``, the one ``jax-cca finetune`` trains on,
so a model fine-tuned on the built-in synthetic data reads these prompts as its training data).
A prompt is exactly ``length`` tokens; ``depth`` in [0, 1] places the asked fact (0: right after
BOS, 1: right before the question):

* ``passkey``: ``BOS filler.. PASSKEY d1..dn PERIOD filler.. QUERY PASSKEY ANSWER``, answer
  d1..dn: ``SyntheticRetrieval``'s passkey format, the fact after ``round(depth * F)`` of the F
  filler words.
* ``multikey`` (multi-key needle in a haystack): filler words holding ``num_needles`` records
  ``KV key.. SEP v1..vm PERIOD`` with distinct keys; the asked one after ``round(depth * F)``
  filler words, the others at random depths; then ``QUERY key.. ANSWER``, answer v1..vm.
* ``kvqa`` (multi-document key-value QA): ``SyntheticRetrieval``'s key-value format, as many
  records as fit after a short filler; the asked record is number ``round(depth * (N - 1))``.

Keys are ``key_words`` words long: by default what ``SyntheticRetrieval`` uses for a sequence of
this length (pass the training value when evaluating a model at other lengths than it was trained
at). Example i of a cell is generated from (seed, task, length, depth, i) alone: every method sees
the same prompts.

Scoring: the answer is generated greedily through the KV cache (``generation.run_generation``:
one prefill, then cached decode steps), ``max`` answer length tokens for every task of a length
(so all tasks share one compiled prefill and decode step). Exact match (EM): the first
len(answer) generated tokens equal the answer; token accuracy: the fraction of answer positions
right.

Methods (:data:`METHODS`, :func:`prepare_model`): "full", "cca" (``group_size``,
``local_window``), "streaming" (StreamingLLM sinks + window, ``jax_cca.streaming``: ``sink_tokens``,
``local_window``) and "reattention" (any options are passed to
``model.with_attention(attention="reattention", ...)``); a method this installation cannot run
raises :class:`MethodUnavailable`, and :func:`evaluate_methods` records it as skipped.

Results (:class:`MethodRun`, JSON through :func:`save_report`): EM and token accuracy per (task,
length, depth) with the predictions, and per length the timing of the batches (the first one
includes compilation; steady-state prefill seconds and decode ms/token are medians over the
others), the KV cache bytes of this implementation and of the method itself, XLA's memory
analysis of the prefill for the lengths asked, and the device's peak memory where it reports one.
Plots (matplotlib, optional): a depth x length EM heat-map per (method, task) and EM against
length per task.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import numbers
import os
import platform
import statistics
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from jax_cca.data import SyntheticRetrieval, SyntheticVocab

TASKS = ("passkey", "multikey", "kvqa")
METHODS = ("full", "cca", "streaming", "reattention")
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
REPORT_FORMAT = "jax-cca-eval"
REPORT_VERSION = 1
PLOT_HINT = "pip install 'jax-cca[plot]'"


class MethodUnavailable(NotImplementedError):
    """The attention method cannot run in this installation (the message says why)."""


# ------------------------------------------------------------------------------ tasks
@dataclasses.dataclass(frozen=True)
class TaskOptions:
    """Shapes of the synthetic facts. ``key_words=None``: ``SyntheticRetrieval``'s choice for a
    sequence of the evaluated length."""

    passkey_digits: int = 5
    value_digits: int = 4
    key_words: int | None = None
    num_needles: int = 4

    def __post_init__(self):
        for name, low in (("passkey_digits", 1), ("value_digits", 1), ("num_needles", 1)):
            _check_int(getattr(self, name), name, low)
        if self.key_words is not None:
            _check_int(self.key_words, "key_words", 1)

    def answer_length(self, task: str) -> int:
        return self.passkey_digits if task == "passkey" else self.value_digits


@dataclasses.dataclass(frozen=True)
class Example:
    """One prompt of ``length`` tokens and its answer; ``prompt[needle_start:needle_end]`` is the
    asked fact (the passkey fact or the asked record)."""

    task: str
    length: int
    depth: float
    sample: int
    prompt: np.ndarray
    answer: np.ndarray
    needle_start: int
    needle_end: int


def _check_int(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}; got {value!r}")
    return int(value)


def _check_task(task) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    return task


def _check_depth(depth) -> float:
    if isinstance(depth, bool) or not isinstance(depth, numbers.Real) or not 0 <= depth <= 1:
        raise ValueError(f"depth must be a number in [0, 1]; got {depth!r}")
    return float(depth)


def default_key_words(length: int, vocab_size: int, value_digits: int = 4) -> int:
    """Words per key that ``SyntheticRetrieval`` uses for key-value sequences whose prompt is
    ``length`` tokens (its sequences are prompt + answer + EOS = seq_len + 1 tokens)."""
    try:
        data = SyntheticRetrieval(seq_len=length + value_digits, vocab_size=vocab_size,
                                  task="kv", value_digits=value_digits)
    except ValueError:
        return 1  # too short for its key-value task: the shortest keys
    return data.key_words


class _Builder:
    def __init__(self, vocab: SyntheticVocab, rng: np.random.Generator):
        self.v, self.rng = vocab, rng

    def words(self, n: int) -> np.ndarray:
        return self.v.first_word + self.rng.integers(0, self.v.num_words, n)

    def digits(self, n: int) -> np.ndarray:
        return self.v.digits(self.rng.integers(0, 10, n))

    def distinct_keys(self, n: int, key_words: int) -> list[np.ndarray]:
        if self.v.num_words ** key_words < 2 * n:
            raise ValueError(f"{n} distinct keys of {key_words} words need more than "
                             f"{self.v.num_words} words: raise key_words")
        keys: set[tuple] = set()
        while len(keys) < n:
            keys.add(tuple(self.words(key_words).tolist()))
        keys = [np.asarray(k) for k in sorted(keys)]
        self.rng.shuffle(keys)
        return keys

    def record(self, key: np.ndarray, value: np.ndarray) -> np.ndarray:
        return np.concatenate([[self.v.kv_pair], key, [self.v.sep], value, [self.v.period]])

    def kv_question(self, key: np.ndarray) -> np.ndarray:
        return np.concatenate([[self.v.query], key, [self.v.answer]])


def make_example(task: str, length: int, depth: float, sample: int = 0, *, vocab_size: int,
                 seed: int = 0, options: TaskOptions | None = None) -> Example:
    """Example ``sample`` of a (task, length, depth) cell (module docstring for the formats)."""
    _check_task(task)
    length = _check_int(length, "length", 1)
    depth = _check_depth(depth)
    options = options or TaskOptions()
    vocab = SyntheticVocab(vocab_size)
    rng = np.random.default_rng([_check_int(seed, "seed", 0), TASKS.index(task), length,
                                 int(round(depth * 1e6)), _check_int(sample, "sample", 0)])
    build = _Builder(vocab, rng)
    if task == "passkey":
        parts, start, end, answer = _passkey(build, length, depth, options)
    else:
        key_words = options.key_words or default_key_words(length, vocab_size,
                                                           options.value_digits)
        make = _multikey if task == "multikey" else _kvqa
        parts, start, end, answer = make(build, length, depth, options, key_words)
    prompt = np.concatenate([[vocab.bos], *parts]).astype(np.int32)
    assert len(prompt) == length, (task, len(prompt), length)
    return Example(task, length, depth, sample, prompt, answer.astype(np.int32), start + 1,
                   end + 1)


def _too_short(task: str, length: int, minimum: int) -> ValueError:
    return ValueError(f"length {length} is too short for the {task} task (it needs at least "
                      f"{minimum} tokens with these options)")


def _passkey(build: _Builder, length: int, depth: float, options: TaskOptions):
    v, n = build.v, options.passkey_digits
    key = build.digits(n)
    fact = np.concatenate([[v.passkey], key, [v.period]])
    question = np.asarray([v.query, v.passkey, v.answer])
    filler = length - 1 - len(fact) - len(question)
    if filler < 0:
        raise _too_short("passkey", length, length - filler)
    before = int(round(depth * filler))
    parts = [build.words(before), fact, build.words(filler - before), question]
    return parts, before, before + len(fact), key


def _multikey(build: _Builder, length: int, depth: float, options: TaskOptions, key_words: int):
    n, m = options.num_needles, options.value_digits
    keys = build.distinct_keys(n, key_words)
    values = [build.digits(m) for _ in keys]
    records = [build.record(k, val) for k, val in zip(keys, values)]
    question = build.kv_question(keys[0])  # needle 0 is asked
    filler = length - 1 - sum(map(len, records)) - len(question)
    if filler < 0:
        raise _too_short("multikey", length, length - filler)
    offsets = [int(round(depth * filler))] + build.rng.integers(0, filler + 1, n - 1).tolist()
    order = sorted(range(n), key=lambda i: (offsets[i], i))
    words = build.words(filler)
    parts, cursor, start = [], 0, 0
    for i in order:
        parts.append(words[cursor:offsets[i]])
        if i == 0:
            start = sum(map(len, parts))
        parts.append(records[i])
        cursor = offsets[i]
    parts += [words[cursor:], question]
    return parts, start, start + len(records[0]), values[0]


def _kvqa(build: _Builder, length: int, depth: float, options: TaskOptions, key_words: int):
    m = options.value_digits
    record_len = key_words + m + 3
    question_len = key_words + 2
    n = (length - 1 - question_len) // record_len
    if n < 2:
        raise _too_short("kvqa", length, 1 + question_len + 2 * record_len)
    keys = build.distinct_keys(n, key_words)
    values = [build.digits(m) for _ in keys]
    asked = int(round(depth * (n - 1)))
    filler = length - 1 - question_len - n * record_len
    parts = [build.words(filler), *[build.record(k, val) for k, val in zip(keys, values)],
             build.kv_question(keys[asked])]
    start = filler + asked * record_len
    return parts, start, start + record_len, values[asked]


def make_examples(task: str, length: int, depths: Sequence[float], samples: int, *,
                  vocab_size: int, seed: int = 0,
                  options: TaskOptions | None = None) -> list[Example]:
    """Every example of a (task, length) row: ``samples`` per depth, depth-major."""
    return [make_example(task, length, d, i, vocab_size=vocab_size, seed=seed, options=options)
            for d in depths for i in range(samples)]


# ------------------------------------------------------------------------------ scoring
def exact_match(predicted: Sequence[int], answer: Sequence[int]) -> bool:
    """True when the first len(answer) predicted tokens are the answer."""
    answer = [int(a) for a in answer]
    return [int(p) for p in predicted[: len(answer)]] == answer


def token_accuracy(predicted: Sequence[int], answer: Sequence[int]) -> float:
    """Fraction of answer positions predicted right (missing predictions count as wrong)."""
    if len(answer) == 0:
        raise ValueError("an answer must hold at least one token")
    hits = sum(int(p) == int(a) for p, a in zip(predicted, answer))
    return hits / len(answer)


# ------------------------------------------------------------------------------ methods
METHOD_DEFAULTS = {
    "full": {},
    "cca": {"group_size": None, "local_window": None},           # None: the model config's
    "streaming": {"sink_tokens": 4, "local_window": None},       # None: the config's window
}


def prepare_model(model, method: str, options: dict | None = None):
    """(``model``'s weights under attention ``method``, the options it runs with).

    full / cca: ``model.with_attention(...)``; streaming: ``jax_cca.streaming.streaming_model``;
    reattention: ``model.with_attention(attention="reattention", **options)``, raising
    :class:`MethodUnavailable` while the model does not support it (the options it reports are
    then every ``reattention_*`` field of the converted config).
    """
    options = dict(options or {})
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    if method == "reattention":
        converted = _reattention_model(model, options)
        selection = {f.name: getattr(converted.config, f.name)
                     for f in dataclasses.fields(converted.config)
                     if f.name.startswith("reattention")}
        return converted, {**selection, **options}
    unknown = sorted(set(options) - set(METHOD_DEFAULTS[method]))
    if unknown:
        raise ValueError(f"method {method!r} takes the options {sorted(METHOD_DEFAULTS[method])}; "
                         f"got unknown {unknown}")
    resolved = {**METHOD_DEFAULTS[method], **{k: v for k, v in options.items() if v is not None}}
    config = model.config
    if method == "full":
        from jax_cca.model import CCALlama

        plain = type(model) is CCALlama and config.attention == "full"
        return (model if plain else model.with_attention(attention="full")), resolved
    if method == "cca":
        resolved["group_size"] = resolved["group_size"] or config.group_size
        resolved["local_window"] = resolved["local_window"] or config.local_window
        return model.with_attention(attention="cca", **resolved), resolved
    from jax_cca.streaming import streaming_model

    resolved["local_window"] = resolved["local_window"] or config.local_window
    return streaming_model(model, **resolved), resolved


def _reattention_model(model, options: dict):
    """``model.with_attention(attention="reattention", **options)``; the options are CCAConfig
    fields (e.g. ``reattention_window``). MethodUnavailable while the model cannot run it."""
    fields = {f.name for f in dataclasses.fields(type(model.config))}
    unknown = sorted(set(options) - fields)
    if unknown:
        own = sorted(f for f in fields if f.startswith("reattention"))
        raise ValueError(f"reattention options must be model config fields ({own or 'none'}); "
                         f"got unknown {unknown}")
    try:
        converted = model.with_attention(attention="reattention", **options)
        converted.init_cache(1, 16)  # it must also decode from a cache
    except NotImplementedError as e:
        raise MethodUnavailable(
            "ReAttention is not wired into CCALlama in this installation (kernels/reattention/ "
            f"holds the op; the model's attention='reattention' is pending): {e}") from None
    return converted


def method_cache_bytes(model, method: str, options: dict, batch: int, max_len: int
                       ) -> tuple[int | None, int | None]:
    """(bytes of the decode cache this implementation allocates, bytes the method itself needs)
    for ``batch`` sequences of ``max_len`` tokens; None where unknown."""
    from jax_cca.cache import cache_bytes

    try:
        allocated = cache_bytes(model.config, max_len, batch)
    except NotImplementedError:
        allocated = None
    if method == "streaming":
        from jax_cca.streaming import streaming_cache_bytes

        return allocated, streaming_cache_bytes(model.config, batch, max_len=max_len,
                                                **options)
    return allocated, allocated


# ------------------------------------------------------------------------------ results
@dataclasses.dataclass
class MethodRun:
    """The evaluation of one model under one method. ``cells``: one dict per (task, length,
    depth) with ``samples``, ``correct``, ``em``, ``token_acc``, ``answers``, ``predictions``.
    ``speed``: one dict per length (see :func:`evaluate`). ``status`` "ok" or "skipped"
    (``reason`` says why)."""

    method: str
    options: dict
    status: str = "ok"
    reason: str | None = None
    config: dict | None = None
    tasks: list = dataclasses.field(default_factory=list)
    lengths: list = dataclasses.field(default_factory=list)
    depths: list = dataclasses.field(default_factory=list)
    samples: int = 0
    seed: int = 0
    task_options: dict = dataclasses.field(default_factory=dict)
    cells: list = dataclasses.field(default_factory=list)
    speed: list = dataclasses.field(default_factory=list)
    label: str | None = None

    @property
    def name(self) -> str:
        return self.label or self.method

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MethodRun":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def cell(self, task: str, length: int, depth: float) -> dict:
        for c in self.cells:
            if c["task"] == task and c["length"] == length and abs(c["depth"] - depth) < 1e-9:
                return c
        raise KeyError(f"no cell ({task}, {length}, {depth}) in the {self.name} run")

    def em_by_length(self, task: str) -> dict[int, float]:
        """EM of each length, over all depths and samples of ``task``."""
        out = {}
        for length in self.lengths:
            cells = [c for c in self.cells if c["task"] == task and c["length"] == length]
            if cells:
                out[length] = (sum(c["correct"] for c in cells)
                               / sum(c["samples"] for c in cells))
        return out

    def em_grid(self, task: str) -> np.ndarray:
        """(depths, lengths) EM of ``task``; NaN where a cell is missing."""
        grid = np.full((len(self.depths), len(self.lengths)), np.nan)
        for c in self.cells:
            if c["task"] == task:
                i = next(i for i, d in enumerate(self.depths) if abs(d - c["depth"]) < 1e-9)
                grid[i, self.lengths.index(c["length"])] = c["em"]
        return grid


def environment() -> dict:
    """Device, versions and date of this process (stored with every report)."""
    import jax

    dev = jax.devices()[0]
    return {"device": getattr(dev, "device_kind", str(dev)), "platform": dev.platform,
            "device_count": jax.device_count(), "jax": jax.__version__,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def save_report(path: str | os.PathLike, runs: Iterable[MethodRun], **metadata) -> Path:
    """Writes ``{"format", "version", "environment", "runs": [...], **metadata}`` as JSON
    (through a temporary file, so an interrupted write leaves no partial report)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": REPORT_FORMAT, "version": REPORT_VERSION,
               "environment": metadata.pop("environment", None) or environment(),
               **metadata, "runs": [r.to_dict() for r in runs]}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)
    return path


def load_report(path: str | os.PathLike) -> tuple[dict, list[MethodRun]]:
    """(the report's metadata, its runs) from a file written by :func:`save_report`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"evaluation report not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != REPORT_FORMAT:
        raise ValueError(f"{path} is not a jax-cca evaluation report (format "
                         f"{data.get('format') if isinstance(data, dict) else None!r})")
    runs = [MethodRun.from_dict(r) for r in data.get("runs", [])]
    return {k: v for k, v in data.items() if k != "runs"}, runs


# ------------------------------------------------------------------------------ evaluation
def _check_list(values, name: str, check) -> list:
    values = list(values)
    if not values:
        raise ValueError(f"{name} must not be empty")
    out = [check(v) for v in values]
    if len(set(out)) != len(out):
        raise ValueError(f"{name} holds duplicates: {values}")
    return out


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def prefill_memory(model, batch: int, length: int, max_len: int) -> dict | None:
    """XLA's memory analysis of the compiled prefill of ``batch`` prompts of ``length`` tokens
    into a cache of ``max_len`` (bytes: arguments, outputs, temporaries); None where the backend
    gives none. Compiles the prefill once more (ahead of time)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jax_cca.model import _cached_forward

    graphdef, state = nnx.split(model)
    cache = jax.eval_shape(lambda: model.init_cache(batch, max_len))
    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    n_valid = jax.ShapeDtypeStruct((batch,), jnp.int32)
    compiled = _cached_forward.lower(graphdef, state, ids, n_valid, cache,
                                     prefill=True).compile()
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return {"argument_bytes": int(stats.argument_size_in_bytes),
            "output_bytes": int(stats.output_size_in_bytes),
            "alias_bytes": int(stats.alias_size_in_bytes),
            "temp_bytes": int(stats.temp_size_in_bytes)}


def _peak_device_bytes() -> int | None:
    import jax

    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # some backends raise instead of returning None
        return None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def evaluate(
    model,
    method: str = "full",
    *,
    method_options: dict | None = None,
    tasks: Sequence[str] = TASKS,
    lengths: Sequence[int] = (1024, 2048),
    depths: Sequence[float] = DEFAULT_DEPTHS,
    samples: int = 4,
    seed: int = 0,
    batch_size: int = 8,
    task_options: TaskOptions | None = None,
    prefill_chunk: int | None = None,
    memory_lengths: Sequence[int] = (),
    label: str | None = None,
    progress: bool = False,
) -> MethodRun:
    """Runs every (task, length, depth) cell, ``samples`` examples each, with ``model``'s weights
    under ``method``; returns the :class:`MethodRun`. Raises :class:`MethodUnavailable` when the
    method cannot run here.

    Per length, all tasks' examples go through in batches of ``batch_size`` prompts (the last one
    padded with copies, so every batch has one compiled shape) and ``max_new_tokens`` = the
    longest answer. ``speed`` per length: ``first_batch_s`` (includes compilation), ``prefill_s``
    and ``decode_ms_per_token`` (medians over the later batches; None with one batch),
    ``prefill_tokens_per_s``, ``kv_cache_bytes`` (allocated here), ``kv_cache_bytes_method``
    (the method's own), ``prefill_memory`` (:func:`prefill_memory`, for ``memory_lengths``) and
    ``peak_device_bytes`` (process-wide peak so far, GPU only).
    """
    from tqdm.auto import tqdm

    from jax_cca.generation import check_generate_args, run_generation

    tasks = _check_list(tasks, "tasks", _check_task)
    lengths = _check_list(lengths, "lengths", lambda n: _check_int(n, "every length", 1))
    depths = _check_list(depths, "depths", _check_depth)
    samples = _check_int(samples, "samples", 1)
    batch_size = _check_int(batch_size, "batch_size", 1)
    options = task_options or TaskOptions()
    vocab_size = model.config.vocab_size
    # Build every prompt first: a length too short for a task fails before any compilation.
    examples = {n: [e for t in tasks for e in make_examples(t, n, depths, samples,
                                                            vocab_size=vocab_size, seed=seed,
                                                            options=options)]
                for n in lengths}
    runner, resolved = prepare_model(model, method, method_options)
    new_tokens = max(options.answer_length(t) for t in tasks)
    run = MethodRun(method=method, options=resolved, config=json.loads(runner.config.to_json()),
                    tasks=tasks, lengths=lengths, depths=depths, samples=samples, seed=seed,
                    task_options=dataclasses.asdict(options), label=label)
    total = sum(-(-len(v) // batch_size) for v in examples.values())
    bar = tqdm(total=total, desc=f"eval {run.name}", unit="batch", disable=not progress,
               leave=False)
    with bar:
        for length in lengths:
            rows = examples[length]
            check_generate_args(runner, rows[0].prompt[None], new_tokens, 0.0, None, None, 0,
                                None)
            predictions, timings = [], []
            for b0 in range(0, len(rows), batch_size):
                batch = rows[b0 : b0 + batch_size]
                ids = np.stack([e.prompt for e in batch]
                               + [batch[-1].prompt] * (batch_size - len(batch)))
                tokens, stats = run_generation(runner, ids, np.full(batch_size, length),
                                               new_tokens, prefill_chunk=prefill_chunk)
                predictions += tokens[: len(batch)].tolist()
                timings.append(stats)
                bar.update(1)
            run.cells += _score_cells(rows, predictions, tasks, depths, length)
            run.speed.append(_speed_entry(runner, method, resolved, length, batch_size,
                                          new_tokens, timings, length in memory_lengths))
    return run


def _score_cells(rows: list[Example], predictions: list[list[int]], tasks, depths,
                 length: int) -> list[dict]:
    cells = []
    for task in tasks:
        for depth in depths:
            pairs = [(e, p) for e, p in zip(rows, predictions)
                     if e.task == task and e.depth == depth]
            answers = [e.answer.tolist() for e, _ in pairs]
            preds = [p[: len(e.answer)] for e, p in pairs]
            correct = sum(exact_match(p, a) for p, a in zip(preds, answers))
            cells.append({"task": task, "length": length, "depth": depth, "samples": len(pairs),
                          "correct": correct, "em": correct / len(pairs),
                          "token_acc": float(np.mean([token_accuracy(p, a)
                                                      for p, a in zip(preds, answers)])),
                          "answers": answers, "predictions": preds})
    return cells


def _speed_entry(runner, method, options, length, batch_size, new_tokens, timings,
                 with_memory: bool) -> dict:
    later = timings[1:]
    prefill = _median([t.prefill_seconds for t in later])
    decode = _median([t.decode_seconds / t.decode_steps for t in later if t.decode_steps])
    allocated, own = method_cache_bytes(runner, method, options, batch_size,
                                        length + new_tokens)
    first = timings[0]
    return {
        "length": length, "batch_size": batch_size, "batches": len(timings),
        "new_tokens": new_tokens,
        "first_batch_s": first.prefill_seconds + first.decode_seconds,
        "prefill_s": prefill,
        "prefill_tokens_per_s": batch_size * length / prefill if prefill else None,
        "decode_ms_per_token": None if decode is None else decode * 1e3,
        "kv_cache_bytes": allocated, "kv_cache_bytes_method": own,
        "prefill_memory": (prefill_memory(runner, batch_size, length, length + new_tokens)
                           if with_memory else None),
        "peak_device_bytes": _peak_device_bytes(),
    }


def evaluate_methods(model, methods: Sequence[str | tuple[str, dict]], *,
                     on_skip=None, **kwargs) -> list[MethodRun]:
    """:func:`evaluate` for each method (a name, or (name, options)); a method that raises
    :class:`MethodUnavailable` becomes a run with status "skipped" and its reason (reported to
    ``on_skip(method, reason)`` when given) instead of stopping the others."""
    runs = []
    for entry in methods:
        name, options = (entry, None) if isinstance(entry, str) else entry
        try:
            runs.append(evaluate(model, name, method_options=options, **kwargs))
        except MethodUnavailable as e:
            runs.append(MethodRun(method=name, options=dict(options or {}), status="skipped",
                                  reason=str(e), label=kwargs.get("label")))
            if on_skip is not None:
                on_skip(name, str(e))
    return runs


# ------------------------------------------------------------------------------ tables, plots
def em_table(runs: Sequence[MethodRun], task: str) -> str:
    """Markdown: one row per length, one column per run: EM over depths and samples, with the
    count of exact matches."""
    done = [r for r in runs if r.status == "ok" and task in r.tasks]
    if not done:
        return f"(no {task} results)"
    lengths = sorted({n for r in done for n in r.lengths})
    lines = ["| length | " + " | ".join(r.name for r in done) + " |",
             "| --- |" + " --- |" * len(done)]
    for n in lengths:
        row = []
        for r in done:
            cells = [c for c in r.cells if c["task"] == task and c["length"] == n]
            if not cells:
                row.append("-")
                continue
            hit, total = sum(c["correct"] for c in cells), sum(c["samples"] for c in cells)
            row.append(f"{hit / total:.2f} ({hit}/{total})")
        lines.append(f"| {n} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(f"plots need matplotlib, which is not installed: {PLOT_HINT}") from None
    return plt


def plot_heatmap(run: MethodRun, task: str, path: str | os.PathLike,
                 title: str | None = None) -> Path:
    """Depth (rows, 0 on top) x length (columns) EM heat-map of one run and task, red (0) to
    green (1), each cell annotated: the papers' needle-in-a-haystack figure."""
    if run.status != "ok" or task not in run.tasks:
        raise ValueError(f"the {run.name} run has no {task} results")
    plt = _pyplot()
    grid = run.em_grid(task)
    fig, ax = plt.subplots(figsize=(2.8 + 0.9 * len(run.lengths), 1.6 + 0.45 * len(run.depths)))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(run.lengths)), [_short(n) for n in run.lengths])
    ax.set_yticks(range(len(run.depths)), [f"{d:.0%}" for d in run.depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("depth of the asked fact")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="exact match")
    ax.set_title(title or f"{task}: {run.name}")
    return _save(fig, plt, path)


def plot_em_by_length(runs: Sequence[MethodRun], task: str, path: str | os.PathLike,
                      title: str | None = None, train_length: int | None = None) -> Path:
    """EM (over depths and samples) against context length, one line per run."""
    done = [r for r in runs if r.status == "ok" and task in r.tasks]
    if not done:
        raise ValueError(f"no run has {task} results")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in done:
        em = r.em_by_length(task)
        ax.plot(list(em), list(em.values()), marker="o", label=r.name)
    if train_length:
        ax.axvline(train_length, color="gray", ls="--", lw=1, label="training length")
    ax.set_xscale("log", base=2)
    lengths = sorted({n for r in done for n in r.lengths})
    ax.set_xticks(lengths, [_short(n) for n in lengths])
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("exact match")
    ax.set_title(title or task)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, plt, path)


def _short(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 and n >= 1024 else str(n)


def _save(fig, plt, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
