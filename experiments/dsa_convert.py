"""Converts a dense checkpoint of the demo LM to DeepSeek Sparse Attention, in two stages.

    python -m experiments.dsa_convert --config=configs/dsa_tiny.py --workdir=results/dsa_convert

  0. the dense LM: restored from --config.convert.dense_workdir, or trained here
     (layer_pattern "G", convert.dense_steps) with `lca.train.run`;
  1. dense warm-up: every attention layer becomes a DSA layer ("D") with the dense
     weights and a fresh indexer; the main model is frozen and only the indexer is
     trained, on sum_layers KL(p_t || softmax(I_t)) with dense attention;
  2. sparse training: top-k attention, all parameters trained on CE + the indexer
     KL over the selected set (the indexer's input detached, so each term trains
     only its own parameters).
Reports the validation loss of the dense model, of the DSA model before stage 1
(a random indexer), after stage 1 and after stage 2, to stdout and to
workdir/convert.json (+ experiments/results/dsa_convert/ when --results is set).
"""

import json
import pathlib
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from ml_collections import config_flags

from lca import data as data_lib
from lca import train
from lca.attention import dsa

_CONFIG = config_flags.DEFINE_config_file("config", "configs/dsa_tiny.py", "Config file.")
_WORKDIR = flags.DEFINE_string("workdir", "results/dsa_convert", "Where runs and results go.")
_RESULTS = flags.DEFINE_string("results", None, "Also write convert.json + .md here.")


def dense_config(config) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(config.to_dict())
  c.model.layer_pattern = "G"
  c.train.num_steps = config.convert.dense_steps
  del c["convert"]
  return c


def dense_to_dsa(dense_model, config):
  """A DSA model (stage 0) with every parameter of the dense model copied in."""
  model = train.build_model(config)
  dense = nnx.to_flat_state(nnx.state(dense_model, nnx.Param))
  target = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  for path, var in dense:
    if path not in target or target[path].get_value().shape != var.get_value().shape:
      raise ValueError(f"dense parameter {path} has no counterpart in the DSA model")
    target[path].set_value(var.get_value())
  return model


def _batch(batch):
  return {"inputs": jnp.asarray(batch["inputs"]), "targets": jnp.asarray(batch["targets"])}


def make_step(graphdef, tx, stage: int):
  """Jitted step: stage 1 minimizes the indexer KL, stage 2 CE + KL."""

  def loss_fn(params, rest, batch):
    model = nnx.merge(graphdef, params, rest)
    ce, _ = model.loss(batch)
    kl = dsa.indexer_kl(model)
    return (kl if stage == 1 else ce + kl), {"ce": ce, "kl": kl}

  @jax.jit
  def step(params, opt_state, rest, batch):
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  return step


def optimizer(lr: float, steps: int, params, only_indexer: bool):
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), max(steps, 2), lr * 0.1)
  adam = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))
  if not only_indexer:
    return adam
  labels = jax.tree_util.tree_map_with_path(
      lambda path, _: "train" if "indexer" in jax.tree_util.keystr(path) else "frozen", params)
  return optax.multi_transform({"train": adam, "frozen": optax.set_to_zero()}, labels)


def run_stage(model, corpus, config, stage, steps, lr, log):
  dsa.set_stage(model, stage)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optimizer(lr, steps, params, only_indexer=stage == 1)
  # committed like the step's outputs, so the second step does not compile again
  params, opt_state, rest = jax.device_put((params, tx.init(params), rest), jax.devices()[0])
  step = make_step(graphdef, tx, stage)
  dc = config.data
  first = last = None
  t0 = time.perf_counter()
  for i in range(steps):
    batch = _batch(data_lib.train_batch(corpus.train, 10_000 + i, batch_size=dc.batch_size,
                                        seq_len=dc.seq_len, seed=config.seed))
    params, opt_state, metrics = step(params, opt_state, rest, batch)
    metrics = {k: float(v) for k, v in metrics.items()}
    first = first or metrics
    last = metrics
    if (i + 1) % max(1, steps // 5) == 0:
      log(f"  stage {stage} step {i + 1}/{steps}: ce {metrics['ce']:.4f} indexer KL {metrics['kl']:.4f} "
          f"({time.perf_counter() - t0:.0f}s)")
  nnx.update(model, params)
  dsa.set_stage(model, 0)
  return {"kl_first": first["kl"], "kl_last": last["kl"], "ce_last": last["ce"]}


def val_loss(model, corpus, config) -> float:
  dc, tc = config.data, config.train
  graphdef, state = nnx.split(model)

  @jax.jit
  def loss(state, batch):
    return nnx.merge(graphdef, state).loss(batch)[0]

  batches = data_lib.eval_batches(corpus.val, num_batches=tc.eval_batches, batch_size=dc.batch_size,
                                  seq_len=dc.seq_len)
  return sum(float(loss(state, _batch(b))) for b in batches) / len(batches)


def convert(config, workdir: str, log=print) -> dict:
  workdir = pathlib.Path(workdir)
  dc = config.data
  corpus = data_lib.load_corpus(dc.path, dc.glob, dc.max_bytes)
  dense_dir = config.convert.dense_workdir or str(workdir / "dense")
  if not (pathlib.Path(dense_dir) / "checkpoints").exists():
    log(f"training the dense LM in {dense_dir}")
    train.run(dense_config(config), dense_dir, log=log)
  dense_model, _ = train.load_model(dense_dir)
  out = {"dense_val_loss": val_loss(dense_model, corpus, config)}
  log(f"dense LM: val loss {out['dense_val_loss']:.4f}")
  model = dense_to_dsa(dense_model, config)
  out["dsa_val_loss_before"] = val_loss(model, corpus, config)
  log(f"DSA, random indexer (top-{config.model.dsa_top_k}): val loss {out['dsa_val_loss_before']:.4f}")
  cc = config.convert
  out["stage1"] = run_stage(model, corpus, config, 1, cc.stage1_steps, cc.stage1_lr, log)
  out["dsa_val_loss_after_stage1"] = val_loss(model, corpus, config)
  log(f"after stage 1 (dense warm-up): val loss {out['dsa_val_loss_after_stage1']:.4f}")
  out["stage2"] = run_stage(model, corpus, config, 2, cc.stage2_steps, cc.stage2_lr, log)
  out["dsa_val_loss_after_stage2"] = val_loss(model, corpus, config)
  log(f"after stage 2 (sparse training): val loss {out['dsa_val_loss_after_stage2']:.4f}")
  out["config"] = {k: v for k, v in config.model.to_dict().items() if k.startswith("dsa_")} | dict(
      seq_len=dc.seq_len, **cc.to_dict(), device=jax.devices()[0].device_kind, jax=jax.__version__,
      date="2026-11-23")
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "convert.json").write_text(json.dumps(out, indent=1))
  return out


def main(argv):
  del argv
  out = convert(_CONFIG.value, _WORKDIR.value)
  if _RESULTS.value:
    res = pathlib.Path(_RESULTS.value)
    res.mkdir(parents=True, exist_ok=True)
    (res / "convert.json").write_text(json.dumps(out, indent=1))
    rows = [("dense (full attention)", out["dense_val_loss"]),
            ("DSA, random indexer", out["dsa_val_loss_before"]),
            ("DSA after stage 1 (dense warm-up)", out["dsa_val_loss_after_stage1"]),
            ("DSA after stage 2 (sparse training)", out["dsa_val_loss_after_stage2"])]
    (res / "convert.md").write_text("| model | val loss (nats/byte) |\n|---|---|\n" +
                                    "".join(f"| {n} | {v:.4f} |\n" for n, v in rows))


if __name__ == "__main__":
  app.run(main)
