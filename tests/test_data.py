"""jax_cca.data: the synthetic retrieval tasks, packed text / JSONL data, shuffling, resumable
positions, and the errors a bad data file gives (always naming the file, and the line)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jax_cca.data import DataError, SyntheticRetrieval, SyntheticVocab, TextDataset

tokenizers = pytest.importorskip("tokenizers")

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "home",
         "red", "blue", "green", "sky", "sea", "sun"]
EOS = 2


def write_tokenizer(directory: Path) -> Path:
    """A whitespace word-level tokenizer.json: [UNK]=0, <s>=1, </s>=2, then WORDS."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = directory / "tokenizer.json"
    tok.save(str(path))
    return path


def ids_of(text: str) -> list[int]:
    return [WORDS.index(w) + 3 for w in text.split()]


@pytest.fixture
def corpus(tmp_path) -> tuple[Path, Path, list[str]]:
    """A directory with a text file and a JSONL file, its tokenizer, and the documents in the
    order the data set reads them (files sorted by name)."""
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 30)))) for _ in range(9)]
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text(docs[0] + "\n")
    (data / "b.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n"
                                          for i, d in enumerate(docs[1:])) + "\n")
    return data, write_tokenizer(tmp_path), docs


# ------------------------------------------------------------------------------ synthetic
def test_synthetic_is_a_function_of_seed_and_index():
    a = SyntheticRetrieval(seq_len=100, vocab_size=128, seed=3)
    b = SyntheticRetrieval(seq_len=100, vocab_size=128, seed=3)
    c = SyntheticRetrieval(seq_len=100, vocab_size=128, seed=4)
    ba, bb, bc = a.next_batch(6), b.next_batch(6), c.next_batch(6)
    for key in ("inputs", "targets", "mask"):
        np.testing.assert_array_equal(ba[key], bb[key])
    assert not np.array_equal(ba["inputs"], bc["inputs"])
    assert ba["inputs"].shape == ba["targets"].shape == ba["mask"].shape == (6, 100)
    assert ba["inputs"].dtype == np.int32 and ba["mask"].dtype == np.float32
    np.testing.assert_array_equal(ba["inputs"][:, 1:], ba["targets"][:, :-1])
    # Random access: example i is the same wherever a batch starts.
    tokens, _ = a.example(4)
    np.testing.assert_array_equal(tokens[:-1], ba["inputs"][4])


@pytest.mark.parametrize("seq_len,vocab", [(61, 64), (300, 97), (2000, 64)])
def test_passkey_answer_is_the_hidden_key(seq_len, vocab):
    data = SyntheticRetrieval(seq_len=seq_len, vocab_size=vocab, seed=1, task="passkey")
    v = SyntheticVocab(vocab)
    depths = set()
    for i in range(20):
        tokens, mask = data.example(i)
        assert len(tokens) == seq_len + 1 and tokens.max() < vocab and tokens.min() >= 0
        assert tokens[0] == v.bos and tokens[-1] == v.eos
        n = data.passkey_digits
        answer = tokens[-1 - n:-1]
        np.testing.assert_array_equal(np.flatnonzero(mask), np.arange(seq_len - n, seq_len + 1))
        assert ((answer >= v.first_digit) & (answer < v.first_digit + 10)).all()
        where = int(np.flatnonzero(tokens == v.passkey)[0])  # the fact, before the question
        np.testing.assert_array_equal(tokens[where + 1:where + 1 + n], answer)
        assert tokens[where + 1 + n] == v.period
        depths.add(where)
    assert len(depths) > 5  # the key sits at varying depths


@pytest.mark.parametrize("seq_len,vocab", [(80, 64), (700, 64), (5000, 64), (3000, 512)])
def test_key_value_answer_is_the_value_of_the_asked_key(seq_len, vocab):
    data = SyntheticRetrieval(seq_len=seq_len, vocab_size=vocab, seed=2, task="kv")
    v = SyntheticVocab(vocab)
    kw, m = data.key_words, data.value_digits
    for i in range(10):
        tokens, mask = data.example(i)
        assert len(tokens) == seq_len + 1 and tokens.max() < vocab
        assert mask.sum() == m + 1 and tokens[-1] == v.eos
        q = int(np.flatnonzero(tokens == v.query)[-1])
        key, answer = tokens[q + 1:q + 1 + kw], tokens[q + 2 + kw:q + 2 + kw + m]
        records = {}
        for start in np.flatnonzero(tokens[:q] == v.kv_pair):
            k = tuple(tokens[start + 1:start + 1 + kw])
            assert tokens[start + 1 + kw] == v.sep
            assert k not in records, "keys must be distinct"
            records[k] = tokens[start + 2 + kw:start + 2 + kw + m]
        assert len(records) >= 2
        np.testing.assert_array_equal(records[tuple(key)], answer)


def test_mix_draws_both_tasks_and_resumes_exactly():
    data = SyntheticRetrieval(seq_len=120, vocab_size=100, seed=5)
    first = data.next_batch(3)
    state = data.state_dict()
    expected = data.next_batch(16)
    v = SyntheticVocab(100)
    kinds = {(row == v.kv_pair).any() for row in expected["inputs"]}
    assert kinds == {True, False}
    resumed = SyntheticRetrieval(seq_len=120, vocab_size=100, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives JSON (checkpoint meta)
    got = resumed.next_batch(16)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])
    assert not np.array_equal(first["inputs"], expected["inputs"][:3])
    with pytest.raises(DataError, match="seed"):
        SyntheticRetrieval(seq_len=120, vocab_size=100, seed=6).load_state_dict(state)


def test_synthetic_rejects_tiny_vocab_and_length():
    with pytest.raises(ValueError, match="vocabulary of at least 64"):
        SyntheticRetrieval(seq_len=100, vocab_size=50)
    with pytest.raises(ValueError, match="too short"):
        SyntheticRetrieval(seq_len=12, vocab_size=100, task="passkey")
    with pytest.raises(ValueError, match="too short"):
        SyntheticRetrieval(seq_len=20, vocab_size=100, task="kv")
    with pytest.raises(ValueError, match="task"):
        SyntheticRetrieval(seq_len=100, vocab_size=100, task="needle")


# ------------------------------------------------------------------------------ text
def test_text_packing_covers_the_stream_once_per_epoch(corpus):
    data_dir, tokenizer, docs = corpus
    seq_len = 11
    ds = TextDataset(data_dir, tokenizer, seq_len=seq_len, eos_id=EOS, seed=0)
    stream = [t for d in docs for t in ids_of(d) + [EOS]]
    assert ds.num_tokens == len(stream)
    n = len(ds)
    assert n == -(-len(stream) // (seq_len + 1)) and n > 4
    seen = []
    for _ in range(n):
        b = ds.next_batch(1)
        seen.append((b["inputs"][0], b["targets"][0], b["mask"][0]))
    assert ds.epoch == 0 and ds.index == n
    # Put the epoch's sequences back in stream order: the first input token identifies each.
    rebuilt, order = [], []
    for start in range(0, len(stream), seq_len + 1):
        matches = [i for i, (x, y, m) in enumerate(seen)
                   if x[0] == stream[start] and list(y[:len(stream[start + 1:start + seq_len + 1])])
                   == stream[start + 1:start + seq_len + 1]]
        assert matches, f"the sequence starting at token {start} was not served"
        i = next(i for i in matches if i not in order)
        order.append(i)
        x, y, m = seen[i]
        rebuilt += [int(x[0])] + [int(t) for t, k in zip(y, m) if k]
    assert rebuilt == stream
    assert sorted(order) == list(range(n))
    assert order != list(range(n))  # shuffled
    # The last sequence is padded, and its padding is out of the loss.
    last = seen[order[-1]]
    tail = len(stream) - (n - 1) * (seq_len + 1)
    assert last[2].sum() == tail - 1 and last[2][tail - 1:].sum() == 0


def test_text_epochs_reshuffle_and_resume_exactly(corpus):
    data_dir, tokenizer, _ = corpus
    ds = TextDataset(data_dir, tokenizer, seq_len=7, eos_id=EOS, seed=1)
    n = len(ds)
    epoch0 = ds.next_batch(n)
    epoch1 = ds.next_batch(n)
    assert ds.epoch == 1
    assert not np.array_equal(epoch0["inputs"], epoch1["inputs"])
    assert sorted(map(tuple, epoch0["inputs"].tolist())) == sorted(
        map(tuple, epoch1["inputs"].tolist()))
    # Resume in the middle of an epoch, across the next epoch boundary.
    ds = TextDataset(data_dir, tokenizer, seq_len=7, eos_id=EOS, seed=1)
    ds.next_batch(n - 2)
    state = json.loads(json.dumps(ds.state_dict()))
    expected = ds.next_batch(5)
    resumed = TextDataset(data_dir, tokenizer, seq_len=7, eos_id=EOS, seed=1)
    resumed.load_state_dict(state)
    got = resumed.next_batch(5)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])
    other_seed = TextDataset(data_dir, tokenizer, seq_len=7, eos_id=EOS, seed=2)
    assert not np.array_equal(other_seed.next_batch(n)["inputs"], epoch0["inputs"])
    with pytest.raises(DataError, match="seed"):
        other_seed.load_state_dict(state)


def test_text_resume_with_changed_data_is_refused(corpus, tmp_path):
    data_dir, tokenizer, _ = corpus
    ds = TextDataset(data_dir, tokenizer, seq_len=7, eos_id=EOS)
    state = ds.state_dict()
    (data_dir / "c.txt").write_text("sky sea sun\n")
    with pytest.raises(DataError, match="fingerprint"):
        TextDataset(data_dir, tokenizer, seq_len=7, eos_id=EOS).load_state_dict(state)


def test_single_files_and_tokenizer_dir(corpus, tmp_path):
    data_dir, tokenizer, docs = corpus
    ds = TextDataset(data_dir / "a.txt", tokenizer.parent, seq_len=200, eos_id=EOS)
    assert len(ds) == 1
    b = ds.next_batch(2)  # one sequence: served twice, one per epoch
    want = ids_of(docs[0]) + [EOS]
    assert b["inputs"][0, :len(want)].tolist() == want[:200]
    assert b["mask"][0].sum() == len(want) - 1


@pytest.mark.parametrize("content,message", [
    ('{"text": "the cat"}\n{"text": "a dog"}\n{"text": "sat on\n',
     "b.jsonl, line 3: not valid JSON"),
    ('{"text": "the cat"}\n{"body": "a dog"}\n', 'b.jsonl, line 2: no "text" field'),
    ('{"text": "the cat"}\n\n[1, 2]\n', 'b.jsonl, line 3: no "text" field'),
    ('{"text": 7}\n', 'b.jsonl, line 1: "text" is int, not a string'),
    ("  \n\n", "b.jsonl is empty"),
    ('{"text": ""}\n', "b.jsonl holds no tokens"),
])
def test_bad_jsonl_names_file_and_line(content, message, tmp_path):
    tokenizer = write_tokenizer(tmp_path)
    bad = tmp_path / "b.jsonl"
    bad.write_text(content)
    with pytest.raises(DataError) as info:
        TextDataset(bad, tokenizer, seq_len=8, eos_id=EOS)
    assert message in str(info.value)
    assert str(bad) in str(info.value)


def test_other_bad_inputs(tmp_path):
    tokenizer = write_tokenizer(tmp_path)
    with pytest.raises(DataError, match="data file not found: .*missing.jsonl"):
        TextDataset(tmp_path / "missing.jsonl", tokenizer, seq_len=8, eos_id=EOS)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.txt is empty"):
        TextDataset(empty, tokenizer, seq_len=8, eos_id=EOS)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"the cat \xff\xfe sat")
    with pytest.raises(DataError, match="bin.txt is not UTF-8"):
        TextDataset(binary, tokenizer, seq_len=8, eos_id=EOS)
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    (nothing / "notes.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="holds no .txt"):
        TextDataset(nothing, tokenizer, seq_len=8, eos_id=EOS)
    good = tmp_path / "good.txt"
    good.write_text("the cat sat")
    with pytest.raises(DataError, match="tokenizer not found"):
        TextDataset(good, tmp_path / "nowhere", seq_len=8, eos_id=EOS)
    broken = tmp_path / "broken" / "tokenizer.json"
    broken.parent.mkdir()
    broken.write_text("{not json")
    with pytest.raises(DataError, match="cannot read tokenizer"):
        TextDataset(good, broken, seq_len=8, eos_id=EOS)
    with pytest.raises(DataError, match="id 5 .*outside the model's vocabulary of 5"):
        TextDataset(good, tokenizer, seq_len=8, eos_id=EOS, vocab_size=5)  # "sat" is 5
