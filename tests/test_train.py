"""Training loop: loss goes down, interrupted runs resume onto the exact same loss curve."""

import json
import os
import signal

import jax
import numpy as np
import pytest

from configs import full_tiny
from lca import train


def _config(num_steps=6, **model):
  c = full_tiny.get_config()
  c.model.update(dict(d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                      d_ff=64, layer_pattern="GL", window=8), **model)
  c.data.update(seq_len=32, batch_size=4, max_bytes=100_000)
  c.train.update(num_steps=num_steps, warmup_steps=2, log_every=1, eval_every=3,
                 eval_batches=1, checkpoint_every=100, learning_rate=1e-2)
  return c


def _losses(workdir):
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["train_loss"] for r in records if "train_loss" in r}


def _interrupt_at(step, how):
  def log(line):
    if f"step {step}/" in line:
      if how == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)  # handled: stop after this step
      else:
        raise KeyboardInterrupt
  return log


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("straight")
  return workdir, train.run(_config(), workdir, log=lambda _: None)


@pytest.mark.parametrize("how", ["ctrl_c", "sigterm"])
def test_kill_and_resume_gives_the_same_losses(tmp_path, straight_run, how):
  straight_dir, straight = straight_run
  with pytest.raises(KeyboardInterrupt):
    train.run(_config(), tmp_path / "killed", log=_interrupt_at(3, how))
  assert set(_losses(tmp_path / "killed")) == {1, 2, 3}
  lines = []
  resumed = train.run(_config(), tmp_path / "killed", log=lines.append)
  assert "resumed from step 3" in lines
  killed, uninterrupted = _losses(tmp_path / "killed"), _losses(straight_dir)
  assert resumed["step"] == straight["step"] == 6 and set(killed) == set(uninterrupted)
  if jax.default_backend() == "cpu":  # bit-identical on CPU
    assert killed == uninterrupted and resumed["val_loss"] == straight["val_loss"]
  else:  # GPU reductions (atomics) are not bitwise deterministic from run to run
    np.testing.assert_allclose([killed[s] for s in sorted(killed)],
                               [uninterrupted[s] for s in sorted(killed)], rtol=1e-4)


def test_loss_decreases_and_metrics_are_written(tmp_path):
  summary = train.run(_config(num_steps=12), tmp_path, log=lambda _: None)
  losses = _losses(tmp_path)
  assert np.mean([losses[s] for s in (10, 11, 12)]) < np.mean([losses[s] for s in (1, 2, 3)]) - 0.5
  assert summary["val_bpb"] == pytest.approx(summary["val_ce"] / np.log(2))
  assert (tmp_path / "config.json").exists()
  model, config = train.load_model(tmp_path)
  assert config.train.num_steps == 12 and model.cfg.layer_pattern == "GL"


def test_bf16_compute_trains(tmp_path):
  summary = train.run(_config(num_steps=3, dtype="bfloat16"), tmp_path, log=lambda _: None)
  assert np.isfinite(summary["train_loss"])


def test_schedule_warms_up_then_decays():
  c = _config(num_steps=100)
  c.train.warmup_steps = 10
  _, schedule = train.make_optimizer(c.train)
  lrs = np.asarray([schedule(s) for s in range(101)])
  assert lrs[0] == 0 and lrs[10] == pytest.approx(c.train.learning_rate)
  assert np.all(np.diff(lrs[:11]) > 0) and np.all(np.diff(lrs[10:]) <= 1e-12)
  assert lrs[100] == pytest.approx(c.train.learning_rate * c.train.min_lr_ratio)


def test_bad_train_config_raises():
  c = _config(num_steps=0)
  with pytest.raises(ValueError, match="train.num_steps must be positive, got 0"):
    train.make_optimizer(c.train)


def test_trainable_regex_freezes_everything_else():
  import jax.numpy as jnp
  from lca import data
  c = _config()
  c.train.trainable = "mlp"
  model = train.build_model(c)
  tx, _ = train.make_optimizer(c.train)
  graphdef, state = train.init_state(model, tx)
  batch = {k: jnp.asarray(v) for k, v in data.train_batch(
      data.load_corpus(max_bytes=20_000).train, 0, batch_size=2, seq_len=16, seed=0).items()
      if k in ("inputs", "targets")}
  step = train.make_train_step(graphdef, tx)
  new_state = step(step(state, batch)[0], batch)[0]  # the learning rate is 0 at step 0
  flat = lambda s: jax.tree_util.tree_flatten_with_path(s["params"])[0]
  changed = {jax.tree_util.keystr(p): bool(jnp.any(a != b))
             for (p, a), (_, b) in zip(flat(state), flat(new_state))}
  assert all(v == ("mlp" in k) for k, v in changed.items()), changed
