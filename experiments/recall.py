"""Recall: multi-query associative recall (MQAR) and passkey retrieval across mixers.

    python -m experiments.recall --config=configs/recall.py            # CPU default, a few minutes
    python -m experiments.recall --config=configs/recall.py:gpu        # L = 256..4096

Trains one small model per (mixer, task, length) with lca.train's optimizer and jitted
step (same size, steps and tokens for every mixer), then measures exact-recall
accuracy on fresh sequences. The question (Zoology, arXiv 2312.04927; Qwen3-Next): does
pure linear attention fail at exact recall while a 3:1 Gated DeltaNet / attention
hybrid recovers it?

Tasks (byte vocabulary; 1 needle marker, 2 query marker, 3..12 digits, keys 16..79,
values 80..143, filler 144..255):
  mqar     k1 v1 ... kN vN, then queries q1 q2 ... (keys drawn from the N shown) up to the
           end; the target at each query is its key's value (values are never repeated in
           the input). N = length * pairs_per_token, capped at 64.
  passkey  filler with "NEEDLE d1..d5" at a random place, ending "QUERY d1..d5"; a sequence
           counts as correct when all five digits are.
Writes experiments/results/recall/{results.jsonl, results.md, recall.png}.

Cells are independent: on one GPU, run one process per model or length (small models
leave the GPU mostly idle), each with its own --out, then merge their results with
    python -m experiments.recall --merge_from=dir1,dir2,... --out=experiments/results/recall
"""

import copy
import datetime
import json
import pathlib
import time
import zlib

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import config_flags

from configs import recall as recall_config
from lca import model as model_lib
from lca import train as train_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/recall.py", "Recall config.")
_OUT = flags.DEFINE_string("out", "experiments/results/recall", "Output directory.")
_MERGE_FROM = flags.DEFINE_list("merge_from", [], "Output directories of earlier runs: merge "
                                "their results.jsonl into --out (table, plot) instead of training.")

NEEDLE, QUERY, DIGITS = 1, 2, 3
KEYS, VALUES, FILLER = (16, 80), (80, 144), (144, 256)


def mqar_batch(rng: np.random.Generator, batch: int, length: int, pairs: int) -> dict:
  """MQAR sequences -> inputs, targets [B, L] int32 and weights [B, L] (1 on the queries).

  As Zoology's MQAR (arXiv 2312.04927), with every position after the key-value section a
  query: inputs are k1 v1 ... kP vP q1 q2 ... with each q a key drawn (with replacement)
  from the P shown; the target at a query is its key's value, and values never reappear
  in the input, so each answer must come from the key-value section. Dense queries give
  L - 2P labels per sequence (a few per sequence made training take ~100x longer).
  """
  if 2 * pairs >= length:
    raise ValueError(f"mqar: {pairs} key-value pairs leave no room for queries in length {length}")
  if not 1 <= pairs <= KEYS[1] - KEYS[0]:
    raise ValueError(f"mqar: pairs must be in [1, {KEYS[1] - KEYS[0]}], got {pairs}")
  keys = np.argsort(rng.random((batch, KEYS[1] - KEYS[0])), axis=1)[:, :pairs] + KEYS[0]
  values = rng.integers(*VALUES, size=(batch, pairs))
  pick = rng.integers(0, pairs, size=(batch, length - 2 * pairs))
  inputs = np.empty((batch, length), np.int64)
  inputs[:, 0:2 * pairs:2], inputs[:, 1:2 * pairs:2] = keys, values
  inputs[:, 2 * pairs:] = np.take_along_axis(keys, pick, 1)
  targets = np.zeros((batch, length), np.int64)  # 0 where unscored
  targets[:, 2 * pairs:] = np.take_along_axis(values, pick, 1)
  weights = np.zeros((batch, length), np.float32)
  weights[:, 2 * pairs:] = 1.0
  return dict(inputs=inputs.astype(np.int32), targets=targets.astype(np.int32), weights=weights)


def passkey_batch(rng: np.random.Generator, batch: int, length: int, digits: int) -> dict:
  """Passkey sequences; weights 1 on the answer digits after the final QUERY marker."""
  seq = rng.integers(*FILLER, size=(batch, length + 1))
  key = rng.integers(DIGITS, DIGITS + 10, size=(batch, digits))
  where = rng.integers(0, length - 2 * digits - 2, size=batch)
  rows = np.arange(batch)[:, None]
  seq[rows[:, 0], where] = NEEDLE
  seq[rows, where[:, None] + 1 + np.arange(digits)] = key
  seq[:, length - digits] = QUERY
  seq[:, length - digits + 1:] = key
  weights = np.zeros((batch, length), np.float32)
  weights[:, length - digits:] = 1.0
  return dict(inputs=seq[:, :-1].astype(np.int32), targets=seq[:, 1:].astype(np.int32), weights=weights)


def mqar_pairs(length: int, rc) -> int:
  """Key-value pairs at this length: length * pairs_per_token, capped at max_pairs."""
  return max(1, min(rc.max_pairs, int(length * rc.pairs_per_token)))


def batch_size(length: int, config) -> int:
  """Sequences per step: recall.tokens_per_step // length when set (equal tokens at every
  length), else data.batch_size."""
  tokens = config.recall.tokens_per_step
  return max(1, tokens // length) if tokens else config.data.batch_size


def make_batch(task, rng, batch, length, rc):
  if task == "mqar":
    return mqar_batch(rng, batch, length, mqar_pairs(length, rc))
  if task == "passkey":
    return passkey_batch(rng, batch, length, rc.passkey_digits)
  raise ValueError(f"unknown recall task {task!r}; known: mqar, passkey")


def make_accuracy(graphdef):
  @jax.jit
  def accuracy(state, batch):
    model = nnx.merge(graphdef, state["params"], state["rest"])
    pred = jnp.argmax(model(batch["inputs"]), axis=-1)
    hit = (pred == batch["targets"]) | (batch["weights"] == 0)
    return jnp.sum(jnp.all(hit, axis=1)), jnp.sum((pred == batch["targets"]) * batch["weights"])
  return accuracy


def run_one(config, name, pattern, task, length, log):
  """Trains one model -> result dict (accuracies, loss, params, seconds)."""
  cfg = copy.deepcopy(config)
  cfg.model.layer_pattern = pattern
  rc, tc = cfg.recall, cfg.train
  model = train_lib.build_model(cfg)
  tx, _ = train_lib.make_optimizer(tc)
  graphdef, state = train_lib.init_state(model, tx)
  step_fn, accuracy = train_lib.make_train_step(graphdef, tx), make_accuracy(graphdef)
  rng = np.random.default_rng([cfg.seed, length, zlib.crc32(task.encode()) % 1000])
  bs = batch_size(length, cfg)
  t0, loss = time.perf_counter(), float("nan")
  for step in range(tc.num_steps):
    batch = make_batch(task, rng, bs, length, rc)
    state, metrics = step_fn(state, {k: jnp.asarray(v) for k, v in batch.items()})
    if (step + 1) % tc.log_every == 0 or step + 1 == tc.num_steps:
      loss = float(metrics["loss"])
      log(f"  {name:7s} {task:7s} L={length:5d} step {step + 1}/{tc.num_steps} loss {loss:.4f}")
  eval_rng = np.random.default_rng([cfg.seed + 1, length, zlib.crc32(task.encode()) % 1000])
  seqs = hits = scored = 0
  num_eval = max(1, rc.eval_sequences // bs)
  for _ in range(num_eval):
    batch = make_batch(task, eval_rng, bs, length, rc)
    s, h = accuracy(state, {k: jnp.asarray(v) for k, v in batch.items()})
    seqs, hits, scored = seqs + int(s), hits + float(h), scored + float(batch["weights"].sum())
  n = num_eval * bs
  return dict(model=name, layer_pattern=pattern, task=task, length=length,
              token_accuracy=hits / scored, sequence_accuracy=seqs / n, final_loss=loss,
              num_params=model_lib.num_params(model), steps=tc.num_steps,
              batch_size=bs, seconds=time.perf_counter() - t0)


def write_table(rows, out: pathlib.Path, meta: dict):
  tasks = sorted({r["task"] for r in rows})
  lengths = sorted({r["length"] for r in rows})
  names = list(dict.fromkeys(r["model"] for r in rows))
  cell = {(r["model"], r["task"], r["length"]): r for r in rows}
  lines = [f"{meta['device']}, jax {meta['jax']}, {meta['date']}; {meta['steps']} steps x "
           f"{meta['batch']} per cell; MQAR: token accuracy on recalled values; passkey: "
           "all 5 digits right", "",
           "| model | pattern | params | " + " | ".join(f"{t} L={l}" for t in tasks for l in lengths) + " |",
           "|---|---|---|" + "---|" * (len(tasks) * len(lengths))]
  for name in names:
    first = next(r for r in rows if r["model"] == name)
    vals = []
    for t in tasks:
      for l in lengths:
        r = cell.get((name, t, l))
        key = "token_accuracy" if t == "mqar" else "sequence_accuracy"
        vals.append("-" if r is None else f"{r[key]:.2f}")
    lines.append(f"| {name} | {first['layer_pattern']} | {first['num_params']:,} | " + " | ".join(vals) + " |")
  (out / "results.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.8), squeeze=False)
    for ax, t in zip(axes[0], tasks):
      key = "token_accuracy" if t == "mqar" else "sequence_accuracy"
      for name in names:
        pts = [(l, cell[(name, t, l)][key]) for l in lengths if (name, t, l) in cell]
        ax.plot(*zip(*pts), marker="o", label=name)
      ax.set(xscale="log", xlabel="sequence length", ylabel="accuracy", ylim=(-0.02, 1.02), title=t)
      ax.set_xticks(lengths, [str(l) for l in lengths])
      ax.legend()
    fig.suptitle(f"recall, equal-size models ({meta['device']})")
    fig.tight_layout()
    fig.savefig(out / "recall.png", dpi=120)
  except ImportError:
    pass


def merge(dirs: list[str], out: pathlib.Path):
  """Results of several runs (one results.jsonl each) -> one results.jsonl, table and plot."""
  metas, rows = [], []
  for d in dirs:
    path = pathlib.Path(d) / "results.jsonl"
    if not path.exists():
      raise FileNotFoundError(f"--merge_from: no results.jsonl in {d!r}")
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    metas.append(lines[0]["meta"])
    rows += lines[1:]
  out.mkdir(parents=True, exist_ok=True)
  with (out / "results.jsonl").open("w") as f:
    f.write(json.dumps(dict(meta=metas[0], merged_from=dirs)) + "\n")
    for row in rows:
      f.write(json.dumps(row) + "\n")
  write_table(rows, out, metas[0])


def main(argv):
  del argv
  if _MERGE_FROM.value:
    merge(_MERGE_FROM.value, pathlib.Path(_OUT.value))
    return
  config = _CONFIG.value
  rc = config.recall
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  names = [n.strip() for n in rc.models.split(",")]
  unknown = [n for n in names if n not in recall_config.MODELS]
  if unknown:
    raise ValueError(f"unknown recall.models {unknown}; known: {sorted(recall_config.MODELS)}")
  tokens = rc.tokens_per_step
  meta = dict(device=str(jax.devices()[0].device_kind), date=datetime.date.today().isoformat(),
              jax=jax.__version__, steps=config.train.num_steps,
              batch=(f"{tokens} tokens (batch {tokens} // length)" if tokens
                     else f"batch {config.data.batch_size}"))
  rows = []
  with (out / "results.jsonl").open("w") as f:
    f.write(json.dumps(dict(meta=meta, config=json.loads(config.to_json_best_effort()))) + "\n")
    for task in rc.tasks.split(","):
      for length in (int(x) for x in rc.lengths.split(",")):
        for name in names:
          row = run_one(config, name, recall_config.MODELS[name], task.strip(), length, print)
          print(f"{name} {task} L={length}: token acc {row['token_accuracy']:.3f}, "
                f"sequence acc {row['sequence_accuracy']:.3f} ({row['seconds']:.0f}s)", flush=True)
          rows.append(row)
          f.write(json.dumps(row) + "\n")
          f.flush()
  write_table(rows, out, meta)


if __name__ == "__main__":
  app.run(main)
