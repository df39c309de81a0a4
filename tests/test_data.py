"""Byte tokenizer, corpus split, deterministic packed batches."""

import numpy as np
import pytest

from lca import data


def _split(tmp_path):
  for i in range(30):
    (tmp_path / f"mod_{i:02d}.py").write_text(f"# module {i}\n" + "x = 1\n" * (5 + i))
  (tmp_path / "tests").mkdir(exist_ok=True)
  (tmp_path / "tests" / "skip.py").write_text("never read\n")
  return data.load_corpus(str(tmp_path))


def test_encode_decode_round_trip():
  text = "def f(x):\n    return 'héllo → ∑'\n"
  ids = data.encode(text)
  assert ids.dtype == np.uint8 and len(ids) == len(text.encode())
  assert data.decode(ids) == text
  assert data.decode([0xff, 0x41]) == "\ufffdA"  # invalid UTF-8 replaced, never raised


def test_directory_split_is_deterministic_and_disjoint(tmp_path):
  a, b = _split(tmp_path), _split(tmp_path)
  np.testing.assert_array_equal(a.train.tokens, b.train.tokens)
  np.testing.assert_array_equal(a.val.tokens, b.val.tokens)
  train, val = data.decode(a.train.tokens), data.decode(a.val.tokens)
  assert "never read" not in train + val
  modules = lambda text: {line for line in text.splitlines() if line.startswith("# module")}
  assert modules(train).isdisjoint(modules(val)) and len(modules(train) | modules(val)) == 30
  assert 0 < len(a.val.tokens) < len(a.train.tokens)


def test_default_corpus_is_the_stdlib():
  corpus = data.load_corpus(max_bytes=200_000)
  assert corpus.description.startswith("python-stdlib")
  assert len(corpus.train.tokens) == 200_000 and "def " in data.decode(corpus.train.tokens)


def test_batches_are_a_pure_function_of_step(tmp_path):
  split = _split(tmp_path).train
  kw = dict(batch_size=4, seq_len=16, seed=3)
  b1, b2 = data.train_batch(split, 5, **kw), data.train_batch(split, 5, **kw)
  for key in b1:
    np.testing.assert_array_equal(b1[key], b2[key])
  other = data.train_batch(split, 6, **kw)
  assert not np.array_equal(b1["inputs"], other["inputs"])
  np.testing.assert_array_equal(b1["inputs"][:, 1:], b1["targets"][:, :-1])  # shifted by one


def test_an_epoch_visits_every_window_once():
  rng = np.random.default_rng(0)
  split = data.Split(rng.integers(0, 256, 17 * 40, dtype=np.uint8), np.asarray([0]))
  all_windows = {tuple(split.tokens[i * 17: i * 17 + 16]) for i in range(40)}
  seen = [tuple(row) for s in range(10)
          for row in data.train_batch(split, s, batch_size=4, seq_len=16, seed=0)["inputs"]]
  assert len(set(seen)) == 40 and set(seen) == all_windows
  next_epoch = data.train_batch(split, 10, batch_size=4, seq_len=16, seed=0)["inputs"]
  assert {tuple(r) for r in next_epoch} <= all_windows


def test_segment_ids_and_positions_follow_documents():
  split = data.Split(np.arange(40, dtype=np.uint8), np.asarray([0, 5, 23]))
  batch = data._window_batch(split, np.asarray([0, 1]), seq_len=19)  # windows [0, 20), [20, 40)
  np.testing.assert_array_equal(batch["segment_ids"][0], [0] * 5 + [1] * 14)
  np.testing.assert_array_equal(batch["positions"][0], list(range(5)) + list(range(14)))
  np.testing.assert_array_equal(batch["segment_ids"][1], [0] * 3 + [1] * 16)
  np.testing.assert_array_equal(batch["positions"][1], [0, 1, 2] + list(range(16)))


def test_single_file_corpus(tmp_path):
  f = tmp_path / "book.txt"
  f.write_text("abcdefghij" * 100)
  corpus = data.load_corpus(str(f))
  assert data.decode(corpus.train.tokens).rstrip("\n") == "abcdefghij" * 90
  assert data.decode(corpus.val.tokens).rstrip("\n") == "abcdefghij" * 10


@pytest.mark.parametrize("path,match", [("/no/such/dir", "does not exist")])
def test_bad_path_raises(path, match):
  with pytest.raises(ValueError, match=match):
    data.load_corpus(path)


def test_too_small_corpus_names_the_problem(tmp_path):
  split = _split(tmp_path).train
  with pytest.raises(ValueError, match="fewer than batch_size=100000"):
    data.train_batch(split, 0, batch_size=100_000, seq_len=16, seed=0)
