"""DSA's two training stages through lca.train: a dense run converted by train.init_from."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from configs import dsa_convert, dsa_tiny, full_tiny
from lca import train

_SIZES = dict(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, d_ff=64)


def _shrink(c, steps=2):
  c.data.update(seq_len=32, batch_size=4, max_bytes=100_000)
  c.train.update(num_steps=steps, log_every=1, eval_every=steps, eval_batches=1,
                 checkpoint_every=steps)
  return c


def _dense_config():
  c = full_tiny.get_config()
  c.model.update(_SIZES)
  c.train.warmup_steps = 1
  return _shrink(c)


def _stage_config(stage, init_from):
  c = dsa_tiny.get_config()
  c.model.update(_SIZES, dsa_index_heads=2, dsa_index_dim=16, dsa_top_k=4, dsa_rope_dim=8)
  c.convert.update(stage1_steps=2, stage2_steps=2)
  c = _shrink(dsa_convert.stage_config(c, stage, str(init_from)))
  c.model.dsa_kl_weight = 0.5 if stage == 2 else 1.0
  return c


def _params(model):
  return {"/".join(map(str, p)): np.asarray(v.get_value())
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _records(workdir):
  return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("dsa_train")
  quiet = lambda _: None
  summaries = {"dense": train.run(_dense_config(), root / "dense", log=quiet)}
  lines = []
  summaries["stage1"] = train.run(_stage_config(1, root / "dense"), root / "stage1", log=lines.append)
  summaries["stage2"] = train.run(_stage_config(2, root / "stage1"), root / "stage2", log=quiet)
  return root, summaries, lines


def test_stage1_trains_only_the_indexer_on_its_kl(runs):
  root, summaries, lines = runs
  dense, _ = train.load_model(root / "dense")
  stage1, config = train.load_model(root / "stage1")
  assert config.model.dsa_stage == 1 and config.train.trainable == "indexer"
  dense_p, stage1_p = _params(dense), _params(stage1)
  fresh_p = _params(train.build_model(config))          # the run's own init, before copying
  indexer = {k for k in stage1_p if "/indexer/" in k}
  assert indexer and set(stage1_p) - indexer == set(dense_p)
  for k in dense_p:                                      # copied, then frozen
    np.testing.assert_array_equal(stage1_p[k], dense_p[k], err_msg=k)
  for k in indexer:                                      # fresh init, then trained
    assert np.any(stage1_p[k] != fresh_p[k]), k
  assert any("initialized from" in l and f"{len(dense_p)} parameters copied" in l
             and f"{len(indexer)} left fresh" in l for l in lines), lines
  s = summaries["stage1"]
  assert s["train_indexer_kl"] > 0
  assert s["train_loss"] == pytest.approx(s["train_ce"] + s["train_indexer_kl"], rel=1e-5)
  # step 0: dense attention with the dense weights gives the dense run's loss
  assert s["start_val_ce"] == pytest.approx(summaries["dense"]["val_loss"], rel=1e-5)
  assert s["start_val_loss"] == pytest.approx(s["start_val_ce"] + s["start_val_indexer_kl"], rel=1e-5)
  steps = [r["step"] for r in _records(root / "stage1") if "val_loss" in r]
  assert steps == [0, 2]


def test_copied_parameters_equal_the_dense_ones_at_step_0(runs):
  root, _, _ = runs
  dense_p = _params(train.load_model(root / "dense")[0])
  model = train.build_model(_stage_config(1, root / "dense"))
  fresh_p = _params(model)
  report = train.init_from_run(model, root / "dense", log=lambda _: None)
  got = _params(model)
  assert set(report["copied"]) == set(dense_p) and not report["unused"]
  assert report["fresh"] and all("/indexer/" in k for k in report["fresh"])
  for k in got:
    np.testing.assert_array_equal(got[k], dense_p[k] if k in dense_p else fresh_p[k], err_msg=k)


def test_stage2_trains_every_parameter_on_ce_plus_kl(runs):
  root, summaries, _ = runs
  stage1_p = _params(train.load_model(root / "stage1")[0])
  stage2_p = _params(train.load_model(root / "stage2")[0])
  assert set(stage1_p) == set(stage2_p)
  unchanged = [k for k in stage1_p if np.array_equal(stage1_p[k], stage2_p[k])]
  assert not unchanged, unchanged
  s = summaries["stage2"]                               # dsa_kl_weight = 0.5
  assert s["train_indexer_kl"] > 0
  assert s["train_loss"] == pytest.approx(s["train_ce"] + 0.5 * s["train_indexer_kl"], rel=1e-5)
  assert s["start_val_loss"] == pytest.approx(s["start_val_ce"] + 0.5 * s["start_val_indexer_kl"], rel=1e-5)


def test_resume_ignores_init_from_and_continues_exactly(runs, tmp_path):
  root, _, _ = runs

  def stop_after_step_1(line):
    if "step 1/" in line:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    train.run(_stage_config(1, root / "dense"), tmp_path, log=stop_after_step_1)
  lines = []
  train.run(_stage_config(1, tmp_path / "no_such_run"), tmp_path, log=lines.append)
  assert "resumed from step 1" in lines and not any("initialized from" in l for l in lines)
  losses = lambda d: {r["step"]: r["train_loss"] for r in _records(d) if "train_loss" in r}
  got, want = losses(tmp_path), losses(root / "stage1")
  assert set(got) == set(want) == {1, 2}
  if jax.default_backend() == "cpu":
    assert got == want
  else:
    np.testing.assert_allclose([got[s] for s in (1, 2)], [want[s] for s in (1, 2)], rtol=1e-4)


def test_init_from_errors_name_the_problem(runs, tmp_path):
  root, _, _ = runs
  model = train.build_model(_stage_config(1, root / "dense"))
  with pytest.raises(ValueError, match="train.init_from=.*no config.json"):
    train.init_from_run(model, tmp_path / "missing")
  (tmp_path / "config.json").write_text((root / "dense" / "config.json").read_text())
  with pytest.raises(ValueError, match="train.init_from=.*no checkpoint"):
    train.init_from_run(model, tmp_path)
  c = _stage_config(1, root / "dense")
  c.model.d_ff = 48
  with pytest.raises(ValueError, match=r"blocks/0/mlp/w_\w+ has shape \(\d+, \d+\) there but"):
    train.init_from_run(train.build_model(c), root / "dense", log=lambda _: None)


def test_config_file_stages():
  one, two = dsa_convert.get_config("stage1"), dsa_convert.get_config("stage2")
  assert (one.model.dsa_stage, one.train.trainable, one.train.init_from) == (1, "indexer", "results/dsa_dense")
  assert (two.model.dsa_stage, two.train.trainable, two.train.init_from) == (2, None, "results/dsa_stage1")
  base = full_tiny.get_config().model
  for k in ("d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "d_ff"):
    assert one.model[k] == base[k], k          # the dense run's parameters fit
  with pytest.raises(ValueError, match="stage3"):
    dsa_convert.get_config("stage3")


def test_mla_lm_converts_to_dsa_under_mla(tmp_path):
  """DeepSeek-V3.1 -> V3.2 in miniature: an "M" LM trained, converted to "S" in two stages
  (experiments/dsa_convert.py's chain; that script is not imported: its absl flags would clash)."""
  c = dsa_tiny.get_config("mla")
  c.model.update(_SIZES, num_kv_heads=2, mla_q_rank=16, mla_kv_rank=16, mla_rope_dim=8,
                 dsa_index_heads=2, dsa_index_dim=16, dsa_top_k=4, dsa_rope_dim=8)
  c.convert.update(dense_steps=2, stage1_steps=2, stage2_steps=2)
  c = _shrink(c)
  dense = dsa_convert.dense_config(c)
  assert dense.model.layer_pattern == "M" and "convert" not in dense
  quiet = lambda _: None
  train.run(dense, tmp_path / "dense", log=quiet)
  for stage, init_from in ((1, "dense"), (2, "stage1")):
    train.run(_shrink(dsa_convert.stage_config(c, stage, str(tmp_path / init_from))), tmp_path / f"stage{stage}",
              log=quiet)
  val = lambda run: [r["val_ce"] for r in _records(tmp_path / run) if "val_ce" in r]
  np.testing.assert_allclose(val("stage1")[0], val("dense")[-1], rtol=1e-5)   # step 0: the MLA LM itself
  assert np.isfinite(val("stage2")[-1]) and _records(tmp_path / "stage2")[-1]["val_indexer_kl"] > 0
  with pytest.raises(ValueError, match="after ':'"):
    dsa_tiny.get_config("nope")
