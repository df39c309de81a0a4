"""Recall tasks: every MQAR answer is the value paired with its key, values never leak
into the query section, passkey weights cover exactly the digits; merge of runs."""

import json

import numpy as np
import pytest

from configs import recall as recall_config
from experiments import recall


def test_mqar_answers_are_the_paired_values():
  rng = np.random.default_rng(0)
  b = recall.mqar_batch(rng, batch=3, length=61, pairs=9)
  for name in ("inputs", "targets", "weights"):
    assert b[name].shape == (3, 61)
  for row in range(3):
    inp, tgt, w = b["inputs"][row], b["targets"][row], b["weights"][row]
    table = dict(zip(inp[0:18:2].tolist(), inp[1:18:2].tolist()))
    assert len(table) == 9  # distinct keys
    assert all(recall.KEYS[0] <= k < recall.KEYS[1] for k in table)
    np.testing.assert_array_equal(w, (np.arange(61) >= 18).astype(np.float32))
    for t in range(18, 61):
      assert tgt[t] == table[int(inp[t])]  # a query's target is its key's value
    assert not np.isin(inp[18:], list(table.values())).any()  # values only in the pairs


def test_mqar_rejects_sizes_that_do_not_fit():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="leave no room for queries"):
    recall.mqar_batch(rng, 1, 16, pairs=8)
  with pytest.raises(ValueError, match="pairs must be in"):
    recall.mqar_batch(rng, 1, 1024, pairs=65)


def test_passkey_weights_cover_the_answer_digits():
  b = recall.passkey_batch(np.random.default_rng(1), batch=4, length=50, digits=5)
  for row in range(4):
    inp, tgt = b["inputs"][row], b["targets"][row]
    at = int(np.flatnonzero(inp == recall.NEEDLE)[0])
    key = inp[at + 1:at + 6]
    assert np.flatnonzero(b["weights"][row]).tolist() == list(range(45, 50))
    np.testing.assert_array_equal(tgt[45:50], key)


def test_equal_tokens_per_step_and_pairs_per_length():
  c = recall_config.get_config("gpu")
  assert [recall.batch_size(L, c) for L in (256, 4096)] == [128, 8]
  assert [recall.mqar_pairs(L, c.recall) for L in (256, 1024, 4096)] == [8, 32, 64]
  c.recall.tokens_per_step = 0
  assert recall.batch_size(4096, c) == c.data.batch_size


def test_merge_joins_runs(tmp_path):
  meta = dict(device="cpu", date="d", jax="x", steps=1, batch="batch 2")
  row = dict(layer_pattern="G", task="mqar", token_accuracy=0.5, sequence_accuracy=0.0,
             num_params=10)
  for i, (name, length) in enumerate([("full", 64), ("gdn", 128)]):
    (tmp_path / f"r{i}").mkdir()
    (tmp_path / f"r{i}" / "results.jsonl").write_text(
        json.dumps(dict(meta=meta)) + "\n" + json.dumps(dict(row, model=name, length=length)) + "\n")
  recall.merge([str(tmp_path / "r0"), str(tmp_path / "r1")], tmp_path / "out")
  table = (tmp_path / "out" / "results.md").read_text()
  assert "| full | G | 10 | 0.50 | - |" in table and "| gdn | G | 10 | - | 0.50 |" in table
  with pytest.raises(FileNotFoundError, match="no results.jsonl"):
    recall.merge([str(tmp_path / "missing")], tmp_path / "out")
