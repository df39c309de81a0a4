"""The default experiment (`make demo`): full vs ModernBERT-style local/global attention.

    python -m experiments.demo                  # about 5 minutes on a 2-core CPU
    python -m experiments.demo --steps=30       # a quick look
    python -m experiments.demo --steps=2 --batch_size=2 --sample_length=8  # a smoke test

Trains two byte-level LMs of the same size on the same data for the same number of
steps (configs/full_tiny.py and configs/local_global_tiny.py), then prints a table
(final train/val loss, bits per byte, tokens/s, decode-cache bytes per token) and
writes under --out: results.jsonl (one line per model), each run's metrics.jsonl,
and loss_curves.png.
"""

import json
import pathlib
import shutil

from absl import app, flags, logging
import jax
import jax.numpy as jnp

from configs import full_tiny, local_global_tiny
from lca import data, decode, train

_STEPS = flags.DEFINE_integer("steps", 120, "Training steps per model.")
_OUT = flags.DEFINE_string("out", "results/demo", "Results folder (its runs are replaced).")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", None, "Sequences per training step and per eval batch (default: the configs' 16).")
_SAMPLE_LENGTH = flags.DEFINE_integer("sample_length", 80, "Bytes of each model's greedy sample.")
_LONG_CONTEXT = 131_072  # context at which the cache column is also reported

MODELS = {"full": full_tiny, "local_global": local_global_tiny}


def _config(module, steps, batch_size=None):
  c = module.get_config()
  if batch_size is not None:
    c.data.batch_size = batch_size
  c.train.num_steps = steps
  c.train.warmup_steps = max(1, steps // 10)
  c.train.eval_every = max(1, steps // 3)
  c.train.checkpoint_every = steps
  c.train.log_every = max(1, steps // 15)
  return c


def _sample(model, length, prompt="def ") -> str:
  out = decode.generate(model, jnp.asarray(data.encode(prompt))[None].astype(jnp.int32), length)
  return data.decode(out[0])


def _plot(out: pathlib.Path, names):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name in names:
    records = [json.loads(l) for l in (out / name / "metrics.jsonl").read_text().splitlines()]
    train_pts = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val_pts = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    line, = ax.plot(*zip(*train_pts), label=f"{name} train")
    ax.plot(*zip(*val_pts), "o--", color=line.get_color(), label=f"{name} val")
  ax.set(xlabel="step", ylabel="cross-entropy (nats/byte)", yscale="log",
         title="byte-level LM on the Python stdlib: full vs local/global attention")
  ax.legend()
  fig.tight_layout()
  fig.savefig(out / "loss_curves.png", dpi=120)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind}; results in {out}/")
  rows = []
  for name, module in MODELS.items():
    workdir = out / name
    shutil.rmtree(workdir, ignore_errors=True)
    config = _config(module, _STEPS.value, _BATCH_SIZE.value)
    print(f"\n=== {name}: layer_pattern={config.model.layer_pattern!r} ===")
    summary = train.run(config, workdir)
    model, _ = train.load_model(workdir)
    rows.append({
        "model": name, "layer_pattern": config.model.layer_pattern, "steps": summary["step"],
        "params": summary["num_params"], "train_loss": summary["train_loss"],
        "val_loss": summary["val_loss"], "val_bpb": summary["val_bpb"],
        "tokens_per_s": summary["tokens_per_s"],
        f"cache_bytes_per_token@{config.data.seq_len}": model.cache_bytes_per_token(config.data.seq_len),
        f"cache_bytes_per_token@{_LONG_CONTEXT}": model.cache_bytes_per_token(_LONG_CONTEXT),
        "sample": _sample(model, _SAMPLE_LENGTH.value),
    })
  with (out / "results.jsonl").open("w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  _plot(out, MODELS)

  seq_len = _config(full_tiny, 1).data.seq_len
  print(f"\n| model | layers | params | train loss | val loss | val bits/byte | tokens/s | "
        f"cache B/token @{seq_len} | cache B/token @128K |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['model']} | {r['layer_pattern']} | {r['params']:,} | {r['train_loss']:.3f} | "
          f"{r['val_loss']:.3f} | {r['val_bpb']:.3f} | {r['tokens_per_s']:,.0f} | "
          f"{r[f'cache_bytes_per_token@{seq_len}']:,.0f} | "
          f"{r[f'cache_bytes_per_token@{_LONG_CONTEXT}']:,.1f} |")
  for r in rows:
    print(f"\n{r['model']} sample (greedy): {r['sample']!r}")
  print(f"\nwrote {out / 'results.jsonl'}, {out / 'loss_curves.png'} and each run's metrics.jsonl")


if __name__ == "__main__":
  app.run(main)
