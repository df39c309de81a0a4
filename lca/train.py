"""Training: state, jitted step, loop with eval, metrics and exact-resume checkpoints.

The train state is a plain pytree {step, params, opt_state, rest}: `params` are the
model's nnx.Param leaves (the only thing differentiated), `rest` every other NNX
variable (e.g. MoE routing biases), carried and updated by the loss call itself.
The batch of step i is a pure function of (seed, i) (`lca.data`), so restoring a
checkpoint at step i continues the exact same loss curve.

`train.init_from` (a workdir) starts a new run from another run's parameters, matched
by path, e.g. a dense LM converted to DSA (configs/dsa_convert.py): parameters the
other run lacks (a new indexer) keep their fresh init. A run that already has its own
checkpoint resumes from it and ignores init_from.
"""

import json
import math
import pathlib
import re
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from lca import data as data_lib
from lca import model as model_lib


def build_model(config, seed: int | None = None) -> model_lib.Transformer:
  cfg = model_lib.ModelConfig.from_config(config.model)
  return model_lib.Transformer(cfg, rngs=nnx.Rngs(config.seed if seed is None else seed))


def make_optimizer(train_cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with linear warm-up then cosine decay to min_lr_ratio * lr, and global-norm clipping.

  Weight decay applies to matrices only (not norms' scales). `train_cfg.trainable`, a
  regex, freezes every parameter whose path does not match it.
  """
  if train_cfg.num_steps <= 0:
    raise ValueError(f"train.num_steps must be positive, got {train_cfg.num_steps}")
  warmup = min(train_cfg.warmup_steps, train_cfg.num_steps)
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train_cfg.learning_rate, warmup_steps=warmup,
      decay_steps=max(train_cfg.num_steps, warmup + 1),
      end_value=train_cfg.learning_rate * train_cfg.min_lr_ratio)
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
  tx = optax.chain(
      optax.clip_by_global_norm(train_cfg.clip_norm),
      optax.adamw(schedule, b1=train_cfg.b1, b2=train_cfg.b2,
                  weight_decay=train_cfg.weight_decay, mask=decay_mask))
  trainable = train_cfg.get("trainable")
  if trainable:  # freeze every parameter whose path does not match (e.g. DSA stage 1: "indexer")
    pattern = re.compile(trainable)
    labels = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: "train" if pattern.search(jax.tree_util.keystr(path)) else "freeze", params)
    tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
  return tx, schedule


def init_state(model: nnx.Module, tx) -> tuple[nnx.GraphDef, dict]:
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  state = {"step": jnp.zeros((), jnp.int32), "params": params,
           "opt_state": tx.init(params), "rest": rest}
  return graphdef, state


def make_train_step(graphdef, tx):
  """-> jitted (state, batch) -> (state, metrics)."""

  def loss_fn(params, rest, batch):
    model = nnx.merge(graphdef, params, rest)
    loss, metrics = model.loss(batch)
    _, _, new_rest = nnx.split(model, nnx.Param, ...)
    return loss, (metrics, new_rest)

  @jax.jit
  def train_step(state, batch):
    (_, (metrics, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], state["rest"], batch)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
            "rest": rest}, metrics

  return train_step


def make_eval_step(graphdef):
  @jax.jit
  def eval_step(state, batch):
    model = nnx.merge(graphdef, state["params"], state["rest"])
    return model.loss(batch)[1]
  return eval_step


def evaluate(eval_step, state, batches) -> dict:
  """Mean of each metric over the fixed eval batches; adds bits per byte."""
  totals = {}
  for batch in batches:
    for k, v in eval_step(state, batch).items():
      totals[k] = totals.get(k, 0.0) + float(v)
  out = {k: v / len(batches) for k, v in totals.items()}
  out["bpb"] = out["ce"] / math.log(2)
  return out


def checkpoint_manager(workdir: pathlib.Path, keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(workdir.resolve() / "checkpoints",
                               options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


def restore_latest(manager: ocp.CheckpointManager, state: dict) -> dict | None:
  """The latest checkpoint restored into `state`'s structure, or None if there is none."""
  step = manager.latest_step()
  if step is None:
    return None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def init_from_run(model: nnx.Module, source: str, *, log=print) -> dict:
  """Copies into `model` the parameters of the run in workdir `source` (its latest checkpoint).

  Every parameter of `model` whose path exists in the source gets the source's value
  (the shapes must agree); the others keep their initialization. Source parameters
  with no counterpart in `model` are left out. Returns {"copied", "fresh", "unused"}:
  lists of parameter paths ("blocks/0/mixer/wq").
  """
  source = pathlib.Path(source)
  if not (source / "config.json").exists():
    raise ValueError(f"train.init_from={str(source)!r} is not a training workdir (no config.json)")
  try:
    source_model, _ = load_model(source)
  except ValueError as e:
    raise ValueError(f"train.init_from={str(source)!r}: {e}") from e
  theirs = dict(nnx.to_flat_state(nnx.state(source_model, nnx.Param)))
  name = lambda path: "/".join(map(str, path))
  report = {"copied": [], "fresh": [], "unused": []}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if path not in theirs:
      report["fresh"].append(name(path))
      continue
    value = theirs.pop(path).get_value()
    if value.shape != var.get_value().shape:
      raise ValueError(f"train.init_from={str(source)!r}: parameter {name(path)} has shape "
                       f"{value.shape} there but {var.get_value().shape} in this model")
    var.set_value(jnp.asarray(np.asarray(value)))  # uncommitted like a fresh init: one compile
    report["copied"].append(name(path))
  report["unused"] = [name(path) for path in theirs]
  log(f"initialized from {source}: {len(report['copied'])} parameters copied, "
      f"{len(report['fresh'])} left fresh" + (f" ({_summarize(report['fresh'])})" if report["fresh"] else "")
      + (f", {len(report['unused'])} of the source unused" if report["unused"] else ""))
  return report


def _summarize(paths: list[str], most: int = 4) -> str:
  return ", ".join(paths[:most]) + (", ..." if len(paths) > most else "")


def _model_batch(batch: dict, document_mask: bool) -> dict:
  """Drops segment ids and per-document positions unless documents are kept apart."""
  keep = ("inputs", "targets") + (("segment_ids", "positions") if document_mask else ())
  return {k: jnp.asarray(batch[k]) for k in keep}


def validation_batches(config, corpus) -> list[dict]:
  """The fixed validation batches of `config` (train.eval_batches of data.batch_size)."""
  dc = config.data
  return [_model_batch(b, dc.document_mask) for b in data_lib.eval_batches(
      corpus.val, num_batches=config.train.eval_batches, batch_size=dc.batch_size,
      seq_len=dc.seq_len)]


class _Progress:
  """One line per log interval: step, loss, throughput, ETA."""

  def __init__(self, total: int, start: int, tokens_per_step: int):
    self.total, self.tokens_per_step = total, tokens_per_step
    self.t0, self.s0 = None, start

  def tokens_per_s(self, step: int) -> float:
    if self.t0 is None or step <= self.s0:
      return float("nan")
    return (step - self.s0) * self.tokens_per_step / (time.perf_counter() - self.t0)

  def start_clock(self, step: int):  # after the first (compiling) step
    self.t0, self.s0 = time.perf_counter(), step

  def line(self, step: int, metrics: dict) -> str:
    tps = self.tokens_per_s(step)
    eta = (self.total - step) * self.tokens_per_step / tps if tps == tps and tps > 0 else float("nan")
    bar = "#" * int(20 * step / self.total)
    return (f"[{bar:<20}] step {step}/{self.total} loss {metrics['loss']:.4f} "
            f"{tps / 1e3:.1f}k tok/s eta {eta:.0f}s")


def run(config, workdir: str, *, log=print) -> dict:
  """Trains `config` in `workdir` (resuming from its latest checkpoint) -> summary dict.

  Writes workdir/config.json, workdir/metrics.jsonl (one JSON object per log or
  eval step), workdir/checkpoints/. An interrupt (Ctrl-C, SIGTERM) saves a
  checkpoint of the last finished step before leaving. A fresh run starts from the
  parameters of the run in `train.init_from` when set (`init_from_run`) and then
  evaluates at step 0 (also when `train.eval_at_start`), so the summary holds the
  validation metrics before training ("start_val_*") and after ("val_*").
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  tc, dc = config.train, config.data

  corpus = data_lib.load_corpus(dc.path, dc.glob, dc.max_bytes)
  log(f"data: {corpus.description}")
  model = build_model(config)
  log(f"model: {model_lib.num_params(model):,} parameters, layers "
      f"{''.join(model.cfg.layer_kinds)}")
  manager = checkpoint_manager(workdir, tc.keep_checkpoints)
  fresh_run = manager.latest_step() is None
  if fresh_run and tc.get("init_from"):
    init_from_run(model, tc.init_from, log=log)
  tx, schedule = make_optimizer(tc)
  graphdef, state = init_state(model, tx)
  restored = restore_latest(manager, state)
  if restored is not None:
    state = restored
    log(f"resumed from step {int(state['step'])}")
  train_step, eval_step = make_train_step(graphdef, tx), make_eval_step(graphdef)
  val_batches = validation_batches(config, corpus)

  metrics_file = (workdir / "metrics.jsonl").open("a")
  write = lambda record: (metrics_file.write(json.dumps(record) + "\n"), metrics_file.flush())
  start = int(state["step"])
  progress = _Progress(tc.num_steps, start, dc.batch_size * dc.seq_len)
  stop = {"signal": None}
  previous_handler = signal.signal(signal.SIGTERM, lambda s, f: stop.update(signal=s))
  summary = {}

  def run_eval(step):
    ev = evaluate(eval_step, state, val_batches)
    write({"step": step, **{f"val_{k}": v for k, v in ev.items()}})
    extra = f" (CE {ev['ce']:.4f} + indexer KL {ev['indexer_kl']:.4f})" if "indexer_kl" in ev else ""
    log(f"  eval step {step}{' (before training)' if step == 0 else ''}: val loss "
        f"{ev['loss']:.4f}{extra}, {ev['bpb']:.3f} bits/byte")
    return ev

  if fresh_run and (tc.get("init_from") or tc.get("eval_at_start")):
    summary.update({f"start_val_{k}": v for k, v in run_eval(0).items()})
  try:
    for step in range(start, tc.num_steps):
      batch = _model_batch(data_lib.train_batch(corpus.train, step, batch_size=dc.batch_size,
                                                seq_len=dc.seq_len, seed=config.seed), dc.document_mask)
      state, metrics = train_step(state, batch)
      done = step + 1
      if step == start:
        jax.block_until_ready(state)
        progress.start_clock(done)
      if done % tc.log_every == 0 or done == tc.num_steps:
        metrics = {k: float(v) for k, v in metrics.items()}
        record = {"step": done, **{f"train_{k}": v for k, v in metrics.items()},
                  "lr": float(schedule(step)), "tokens_per_s": progress.tokens_per_s(done)}
        write(record)
        log(progress.line(done, metrics))
        summary.update(record)
      if done % tc.eval_every == 0 or done == tc.num_steps:
        summary.update({f"val_{k}": v for k, v in run_eval(done).items()})
      if done % tc.checkpoint_every == 0 or done == tc.num_steps:
        manager.save(done, args=ocp.args.StandardSave(state))
      if stop["signal"] is not None:
        raise KeyboardInterrupt
  except KeyboardInterrupt:
    step_now = int(state["step"])
    if manager.latest_step() != step_now:
      manager.save(step_now, args=ocp.args.StandardSave(state), force=True)
    manager.wait_until_finished()
    log(f"interrupted: checkpoint saved at step {step_now}; run again to resume")
    raise
  finally:
    signal.signal(signal.SIGTERM, previous_handler)
    manager.wait_until_finished()
    metrics_file.close()
  summary["step"] = int(state["step"])
  summary["num_params"] = model_lib.num_params(model)
  summary["cache_bytes_per_token"] = model.cache_bytes_per_token(dc.seq_len)
  return summary


def load_model(workdir: str, step: int | None = None):
  """(model with the checkpoint's parameters, config) from a training workdir."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  workdir = pathlib.Path(workdir)
  config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  model = build_model(config)
  tx, _ = make_optimizer(config.train)
  graphdef, state = init_state(model, tx)
  manager = checkpoint_manager(workdir, config.train.keep_checkpoints)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise ValueError(f"no checkpoint under {workdir / 'checkpoints'}")
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  return nnx.merge(graphdef, state["params"], state["rest"]), config
