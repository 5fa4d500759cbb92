"""Training data: packed text from files, and a built-in synthetic long-context retrieval set.

Every data set yields numpy batches ``{"inputs", "targets", "mask"}`` of shape (B, T): targets
are the inputs shifted by one token, and ``mask`` (float32, 0 or 1) says which targets count in
the loss (0 for padding, and for prompt tokens in the synthetic tasks). Both are deterministic
functions of a seed and a position, and ``state_dict()`` / ``load_state_dict()`` save and
restore that position, so a resumed run sees exactly the batches an uninterrupted one would.

* ``TextDataset``: plain text files (one document per file) and JSONL files (one document per
  line, in its "text" field), tokenized with a Hugging Face ``tokenizer.json`` (the
  ``tokenizers`` package), each document followed by EOS, concatenated and cut into sequences of
  T + 1 tokens (the last one padded with mask 0). Every epoch visits the sequences in a fresh
  order drawn from (seed, epoch). Problems raise DataError naming the file (and line).
* ``SyntheticRetrieval``: passkey retrieval and key-value retrieval of exactly T + 1 tokens,
  generated from (seed, example index) over a tiny built-in token scheme (``SyntheticVocab``),
  so it needs no tokenizer and no download. Only the answer tokens are in the loss.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


class DataError(ValueError):
    """A data file is missing, empty or malformed (the message names it)."""


def _batch_from_sequences(seqs: np.ndarray, masks: np.ndarray) -> dict:
    """(B, T + 1) tokens and their (B, T + 1) loss mask -> inputs, targets, mask (B, T)."""
    return {"inputs": seqs[:, :-1].astype(np.int32), "targets": seqs[:, 1:].astype(np.int32),
            "mask": masks[:, 1:].astype(np.float32)}


# ------------------------------------------------------------------------------ text files
def find_data_files(path: str | os.PathLike) -> list[Path]:
    """``path`` itself, or the text and JSONL files under a directory (sorted)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*")
                   if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES)
    if not files:
        raise DataError(f"data directory {path} holds no {'/'.join(TEXT_SUFFIXES)} or "
                        f"{'/'.join(JSONL_SUFFIXES)} files")
    return files


def read_documents(path: Path) -> list[str]:
    """The documents of one file: a JSONL file's "text" fields (blank lines skipped), or a text
    file's whole content."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read data file {path}: {e.strerror or e}") from None
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data file {path} is not UTF-8 text (byte {e.start})") from None
    if not content.strip():
        raise DataError(f"data file {path} is empty")
    if path.suffix.lower() not in JSONL_SUFFIXES:
        return [content]
    docs = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {number}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or "text" not in record:
            raise DataError(f'{path}, line {number}: no "text" field')
        if not isinstance(record["text"], str):
            raise DataError(f'{path}, line {number}: "text" is {type(record["text"]).__name__}, '
                            "not a string")
        docs.append(record["text"])
    return docs


def load_tokenizer(path: str | os.PathLike):
    """A ``tokenizers.Tokenizer`` from a tokenizer.json file or a directory holding one."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"tokenizer not found: {file}")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise DataError("text data needs the 'tokenizers' package: "
                        "pip install 'jax-cca[tokenizers]'") from None
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a plain Exception for bad files
        raise DataError(f"cannot read tokenizer {file}: {e}") from None


def tokenize_files(files: list[Path], tokenizer, eos_id: int) -> np.ndarray:
    """All documents of ``files`` tokenized (with the tokenizer's own special tokens, e.g. BOS)
    and each followed by ``eos_id``: one int32 stream."""
    parts = []
    for path in files:
        docs = read_documents(path)
        encodings = tokenizer.encode_batch(docs)
        n_tokens = 0
        for enc in encodings:
            parts.append(np.asarray(enc.ids, np.int32))
            parts.append(np.asarray([eos_id], np.int32))
            n_tokens += len(enc.ids)
        if n_tokens == 0:
            raise DataError(f"data file {path} holds no tokens (empty documents)")
    return np.concatenate(parts)


class TextDataset:
    """Fixed-length sequences packed from text / JSONL files (see the module docstring).

    ``path``: a file or a directory (its .txt/.md/.jsonl/.json files, recursively, sorted).
    ``tokenizer``: a ``tokenizers.Tokenizer`` or the path of a tokenizer.json (or its dir).
    """

    kind = "text"

    def __init__(self, path: str | os.PathLike, tokenizer, *, seq_len: int, eos_id: int,
                 seed: int = 0, pad_id: int = 0, vocab_size: int | None = None):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1; got {seq_len}")
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(tokenizer)
        self.files = find_data_files(path)
        self.seq_len, self.seed = seq_len, seed
        tokens = tokenize_files(self.files, tokenizer, eos_id)
        if vocab_size is not None and tokens.max() >= vocab_size:
            raise DataError(f"the tokenizer produced id {int(tokens.max())} for {path}, outside "
                            f"the model's vocabulary of {vocab_size}")
        span = seq_len + 1
        n = -(-len(tokens) // span)
        seqs = np.full((n, span), pad_id, np.int32)
        seqs.reshape(-1)[: len(tokens)] = tokens
        masks = np.zeros((n, span), np.float32)
        masks.reshape(-1)[: len(tokens)] = 1.0
        self._seqs, self._masks = seqs, masks
        self.num_tokens = int(len(tokens))
        self.fingerprint = hashlib.sha256(tokens.tobytes()).hexdigest()[:16]
        self.epoch, self.index = 0, 0
        self._order = self._epoch_order(0)

    def __len__(self) -> int:
        return len(self._seqs)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self._seqs))

    def next_batch(self, batch_size: int) -> dict:
        rows = []
        for _ in range(batch_size):
            if self.index == len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            rows.append(self._order[self.index])
            self.index += 1
        return _batch_from_sequences(self._seqs[rows], self._masks[rows])

    def state_dict(self) -> dict:
        return {"kind": self.kind, "seed": self.seed, "seq_len": self.seq_len,
                "fingerprint": self.fingerprint, "epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("kind", "seed", "seq_len", "fingerprint"):
            if state.get(key) != mine[key]:
                raise DataError(
                    f"the saved data position is for other data ({key} {state.get(key)!r}, "
                    f"now {mine[key]!r}): resume with the same data, seed and sequence length")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._epoch_order(self.epoch)


# ------------------------------------------------------------------------------ synthetic
@dataclasses.dataclass(frozen=True)
class SyntheticVocab:
    """The token scheme of the synthetic tasks (ids below ``vocab_size``): 0 pad, 1 BOS,
    2 EOS, markers 3-8, digits 10-19, and every id from 20 up is a "word" (filler and keys)."""

    vocab_size: int
    pad: int = 0
    bos: int = 1
    eos: int = 2
    passkey: int = 3   # "the pass key is"
    kv_pair: int = 4   # starts a "key : value" record
    sep: int = 5       # ":" between key and value
    query: int = 6     # "what is ..."
    answer: int = 7    # "... ? answer:"
    period: int = 8    # end of a fact
    first_digit: int = 10
    first_word: int = 20
    min_vocab: int = 64

    def __post_init__(self):
        if self.vocab_size < self.min_vocab:
            raise ValueError(f"the synthetic tasks need a vocabulary of at least "
                             f"{self.min_vocab} ids; the model has {self.vocab_size}")

    def digits(self, values: np.ndarray) -> np.ndarray:
        return self.first_digit + values

    @property
    def num_words(self) -> int:
        return self.vocab_size - self.first_word


class SyntheticRetrieval:
    """Passkey and key-value retrieval sequences of exactly ``seq_len + 1`` tokens.

    passkey: ``BOS filler.. PASSKEY d1..dn PERIOD filler.. QUERY PASSKEY ANSWER d1..dn EOS``,
    the passkey (n random digits) at a random depth in random filler words.
    kv: ``BOS filler (KV key.. SEP v1..vm PERIOD)* QUERY key.. ANSWER v1..vm EOS``: as many
    records with distinct keys (1 to 3 words: enough that random keys rarely collide) as fit, one
    of them asked for.
    ``task="mix"`` draws one of the two per example. The loss counts the answer tokens and EOS.
    Example i is generated from (seed, i) alone; the position is the next example index.
    """

    kind = "synthetic"
    TASKS = ("passkey", "kv", "mix")

    def __init__(self, *, seq_len: int, vocab_size: int, seed: int = 0, task: str = "mix",
                 passkey_digits: int = 5, value_digits: int = 4):
        if task not in self.TASKS:
            raise ValueError(f"task must be one of {self.TASKS}; got {task!r}")
        self.vocab = SyntheticVocab(vocab_size)
        self.seq_len, self.seed, self.task = seq_len, seed, task
        self.passkey_digits, self.value_digits = passkey_digits, value_digits
        passkey_len = 2 * passkey_digits + 7
        if task != "kv" and seq_len + 1 < passkey_len:
            raise ValueError(f"seq_len {seq_len} is too short for the passkey task "
                             f"(at least {passkey_len - 1})")
        # Keys are as many words as make collisions rare: distinct keys are drawn by rejection.
        self.key_words = 1
        while self.vocab.num_words ** self.key_words < 4 * self._num_records(self.key_words):
            self.key_words += 1
        if task != "passkey" and self._num_records(self.key_words) < 2:
            raise ValueError(f"seq_len {seq_len} is too short for the key-value task (it "
                             "needs room for two records and the question)")
        self.index = 0

    def _num_records(self, key_words: int) -> int:
        record_len = key_words + self.value_digits + 3  # KV key.. SEP value.. PERIOD
        question_len = key_words + 2                      # QUERY key.. ANSWER
        room = self.seq_len + 1 - 1 - question_len - self.value_digits - 1
        return max(0, room // record_len)

    def example(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, loss mask), each of seq_len + 1 entries, of example ``index``."""
        rng = np.random.default_rng([self.seed, index])
        task = self.task if self.task != "mix" else ("passkey", "kv")[int(rng.integers(2))]
        if task == "passkey":
            return self._passkey(rng)
        return self._key_value(rng)

    def _words(self, rng, n: int) -> np.ndarray:
        return self.vocab.first_word + rng.integers(0, self.vocab.num_words, n)

    def _finish(self, body: list[np.ndarray], answer: np.ndarray) -> tuple[np.ndarray, ...]:
        v = self.vocab
        tokens = np.concatenate([*body, answer, [v.eos]]).astype(np.int32)
        mask = np.zeros(len(tokens), np.float32)
        mask[len(tokens) - len(answer) - 1:] = 1.0
        assert len(tokens) == self.seq_len + 1
        return tokens, mask

    def _passkey(self, rng):
        v, n = self.vocab, self.passkey_digits
        key = v.digits(rng.integers(0, 10, n))
        fact = np.concatenate([[v.passkey], key, [v.period]])
        question = np.asarray([v.query, v.passkey, v.answer])
        filler = self.seq_len + 1 - 1 - len(fact) - len(question) - n - 1
        before = int(rng.integers(0, filler + 1))
        body = [[v.bos], self._words(rng, before), fact, self._words(rng, filler - before),
                question]
        return self._finish(body, key)

    def _key_value(self, rng):
        v, m, kw = self.vocab, self.value_digits, self.key_words
        n_records = self._num_records(kw)
        keys: set[tuple] = set()
        while len(keys) < n_records:
            keys.add(tuple(self._words(rng, kw).tolist()))
        keys = [np.asarray(k) for k in sorted(keys)]
        rng.shuffle(keys)
        values = [v.digits(rng.integers(0, 10, m)) for _ in keys]
        records = [np.concatenate([[v.kv_pair], k, [v.sep], val, [v.period]])
                   for k, val in zip(keys, values)]
        asked = int(rng.integers(n_records))
        question = np.concatenate([[v.query], keys[asked], [v.answer]])
        filler = self.seq_len + 1 - 1 - sum(map(len, records)) - len(question) - m - 1
        body = [[v.bos], self._words(rng, filler), *records, question]
        return self._finish(body, values[asked])

    def next_batch(self, batch_size: int) -> dict:
        pairs = [self.example(self.index + i) for i in range(batch_size)]
        self.index += batch_size
        return _batch_from_sequences(np.stack([p[0] for p in pairs]),
                                     np.stack([p[1] for p in pairs]))

    def state_dict(self) -> dict:
        return {"kind": self.kind, "seed": self.seed, "seq_len": self.seq_len, "task": self.task,
                "vocab_size": self.vocab.vocab_size, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("kind", "seed", "seq_len", "task", "vocab_size"):
            if state.get(key) != mine[key]:
                raise DataError(
                    f"the saved data position is for other data ({key} {state.get(key)!r}, "
                    f"now {mine[key]!r}): resume with the same data, seed and sequence length")
        self.index = int(state["index"])
