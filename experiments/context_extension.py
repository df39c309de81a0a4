"""Taking a model from L_train to 8 L_train: RoPE scaling (none / PI / NTK / YaRN), with
and without a short fine-tune at the long length.

    python -m experiments.context_extension --config=configs/context_extension.py

Protocol:
  1. Train one tiny byte-level LM at L_train = 256 on a mix of real text (lca.data)
     and passkey documents (filler sentences, "The pass key is 48213." at a random
     depth, then "What is the pass key? The pass key is" + the 5 digits).
  2. For each scaling method, load those weights into a model whose RoPE uses the
     method with s = 8 and L_train = 256 (`lca.layers.rope.scaled_rope_frequencies`),
     and evaluate at 8 L_train: perplexity of held-out text by position bucket and
     passkey accuracy (all 5 digits right under greedy decoding) by length.
  3. Fine-tune a copy for a few steps at 8 L_train with the same method and evaluate again.
"none" evaluated past L_train shows the failure being fixed (positions never seen in
training); PI compresses positions into the trained range; NTK stretches the base;
YaRN interpolates only the slow dimensions and sharpens the softmax. Writes
results.jsonl, results.md and context_extension.png under the config's out_dir.
"""

import copy
import json
import math
import os
import time

from absl import app
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import config_flags

from experiments import bench_common
from lca import data as data_lib
from lca import model as model_lib
from lca import train as train_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/context_extension.py", "Config file.")

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = " What is the pass key? The pass key is "
KEY_DIGITS = 5


# ----------------------------------------------------------------------------- data


def passkey_document(rng: np.random.Generator, length: int) -> tuple[np.ndarray, str]:
  """length + 1 byte tokens ending in the 5-digit key -> (tokens, key)."""
  key = "".join(str(d) for d in rng.integers(0, 10, KEY_DIGITS))
  needle, tail = NEEDLE.format(key=key), QUESTION + key
  filler_len = length + 1 - len(needle) - len(tail)
  if filler_len < 0:
    raise ValueError(f"passkey documents need length >= {len(needle) + len(tail)}, got {length}")
  start = int(rng.integers(0, len(FILLER)))
  filler = (FILLER * (filler_len // len(FILLER) + 2))[start:start + filler_len]
  depth = int(rng.integers(0, filler_len + 1))
  text = filler[:depth] + needle + filler[depth:] + tail
  return data_lib.encode(text), key


def passkey_batch(rng, batch: int, length: int) -> dict:
  docs = np.stack([passkey_document(rng, length)[0] for _ in range(batch)]).astype(np.int32)
  return {"inputs": docs[:, :-1], "targets": docs[:, 1:]}


def mixed_batch(corpus, step: int, *, batch: int, length: int, passkey_fraction: float, seed: int) -> dict:
  """Text windows (lca.data) and passkey documents, batch rows in a fixed split."""
  n_key = int(round(batch * passkey_fraction))
  text = data_lib.train_batch(corpus.train, step, batch_size=batch - n_key, seq_len=length, seed=seed)
  keys = passkey_batch(np.random.default_rng([seed, step, length]), n_key, length)
  return {k: jnp.asarray(np.concatenate([np.asarray(text[k], np.int32), keys[k]])) for k in ("inputs", "targets")}


# ----------------------------------------------------------------------------- model


def model_config(config, method: str) -> model_lib.ModelConfig:
  fields = dict(config.model)
  if method != "none":
    fields.update(rope_scaling=method, rope_scaling_factor=float(config.extend.factor),
                  rope_original_length=config.data.seq_len)
  return model_lib.ModelConfig(**fields)


def train(graphdef, params_rest, train_cfg, batches, *, log_every: int, name: str):
  """Runs lca.train's step over `batches(step)`; returns the new (params, rest)."""
  tx, _ = train_lib.make_optimizer(train_cfg)
  model = nnx.merge(graphdef, *params_rest)
  graphdef, state = train_lib.init_state(model, tx)
  step_fn = train_lib.make_train_step(graphdef, tx)
  t0 = time.perf_counter()
  for step in range(train_cfg.num_steps):
    state, metrics = step_fn(state, batches(step))
    if (step + 1) % log_every == 0 or step + 1 == train_cfg.num_steps:
      print(f"  [{name}] step {step + 1}/{train_cfg.num_steps} loss {float(metrics['loss']):.3f} "
            f"({time.perf_counter() - t0:.0f}s)", flush=True)
  return graphdef, (state["params"], state["rest"])


_JITTED = {}


def _jitted(graphdef):
  """(forward, nll) jitted once per model structure, the state an argument."""
  if graphdef not in _JITTED:
    forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, *state)(tokens))
    def nll(state, tokens, targets):
      logp = jax.nn.log_softmax(nnx.merge(graphdef, *state)(tokens), axis=-1)
      return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    _JITTED[graphdef] = (forward, jax.jit(nll))
  return _JITTED[graphdef]


def evaluate(graphdef, params_rest, corpus, ext, long_len: int, train_len: int) -> dict:
  """Perplexity per position bucket of L_train tokens at long_len; passkey accuracy by length."""
  forward, nll_fn = _jitted(graphdef)
  nll = lambda tokens, targets: nll_fn(params_rest, tokens, targets)
  losses = [nll(jnp.asarray(b["inputs"], jnp.int32), jnp.asarray(b["targets"], jnp.int32))
            for b in data_lib.eval_batches(corpus.val, num_batches=ext.eval_batches, batch_size=4,
                                           seq_len=long_len)]
  per_pos = jnp.concatenate(losses).mean(0)
  buckets = per_pos.reshape(-1, train_len).mean(-1)
  out = {"ppl_by_position": [float(math.exp(b)) for b in buckets],
         "ppl_beyond_train": float(math.exp(per_pos[train_len:].mean())),
         "ppl_within_train": float(math.exp(per_pos[:train_len].mean())), "passkey": {}}
  rng = np.random.default_rng(1234)
  for length in (int(l) for l in ext.passkey_lengths.split(",")):
    batch = passkey_batch(rng, ext.passkey_samples, length)
    logits = forward(params_rest, jnp.asarray(batch["inputs"]))
    pred = np.asarray(jnp.argmax(logits[:, -KEY_DIGITS:], -1))
    hits = np.all(pred == batch["targets"][:, -KEY_DIGITS:], axis=-1)  # teacher-forced = greedy when all right
    out["passkey"][length] = float(hits.mean())
  return out


# ----------------------------------------------------------------------------- report


def write_report(rows, meta, out_dir, train_len, factor):
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "results.jsonl"), "w") as f:
    for r in rows:
      f.write(json.dumps({**meta, **r}) + "\n")
  lengths = list(rows[0]["passkey"])
  lines = [f"# context extension: L_train {train_len} -> {factor * train_len} "
           f"({meta['device']}, {meta['date']}, jax {meta['jax']}, config {meta['size']})", "",
           "| RoPE scaling | fine-tune at long length | ppl [0, L_train) | ppl [L_train, 8 L_train) | "
           + " | ".join(f"passkey @{l}" for l in lengths) + " |",
           "|---|---|---|---|" + "---|" * len(lengths)]
  for r in rows:
    lines.append(f"| {r['method']} | {r['finetune_steps'] or 'no'} | {r['ppl_within_train']:.2f} | "
                 f"{r['ppl_beyond_train']:.2f} | " + " | ".join(f"{r['passkey'][l]:.2f}" for l in lengths) + " |")
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))

  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
  colors = dict(zip(["none", "pi", "ntk", "yarn"], ["tab:gray", "tab:blue", "tab:green", "tab:red"]))
  for r in rows:
    style = "--" if r["finetune_steps"] else "-"
    label = f"{r['method']}{' + FT' if r['finetune_steps'] else ''}"
    centers = [(i + 0.5) * train_len for i in range(len(r["ppl_by_position"]))]
    a1.plot(centers, r["ppl_by_position"], style, color=colors.get(r["method"]), marker="o", ms=3, label=label)
    a2.plot(lengths, [r["passkey"][l] for l in lengths], style, color=colors.get(r["method"]), marker="o",
            ms=3, label=label)
  a1.axvline(train_len, color="k", lw=0.8, ls=":")
  a1.set_yscale("log")
  a1.set_xlabel("position (tokens)")
  a1.set_ylabel("perplexity (bytes)")
  a1.set_title(f"held-out text at {factor}x L_train")
  a2.set_xscale("log", base=2)
  a2.set_xlabel("passkey document length")
  a2.set_ylabel("accuracy (5 digits)")
  a2.set_ylim(-0.05, 1.05)
  a2.axvline(train_len, color="k", lw=0.8, ls=":")
  a2.set_title("passkey retrieval")
  a2.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "context_extension.png"), dpi=120)


# ----------------------------------------------------------------------------- main


def run(config) -> list[dict]:
  train_len, factor = config.data.seq_len, config.extend.factor
  long_len = train_len * factor
  corpus = data_lib.load_corpus(config.data.path, config.data.glob, config.data.max_bytes)
  print(f"data: {corpus.description}")
  base_model = model_lib.Transformer(model_config(config, "none"), rngs=nnx.Rngs(config.seed))
  graphdef, params, rest = nnx.split(base_model, nnx.Param, ...)
  print(f"model: {model_lib.num_params(base_model):,} parameters; training at {train_len}")
  batches = lambda step: mixed_batch(corpus, step, batch=config.data.batch_size, length=train_len,
                                     passkey_fraction=config.passkey_fraction, seed=config.seed)
  _, trained = train(graphdef, (params, rest), config.train, batches,
                     log_every=max(1, config.train.num_steps // 10), name=f"train @{train_len}")

  ft_cfg = copy.deepcopy(config.train)
  ft_cfg.num_steps = config.extend.finetune_steps
  ft_cfg.learning_rate = config.extend.finetune_lr
  ft_cfg.warmup_steps = min(5, ft_cfg.num_steps)
  ft_batches = lambda step: mixed_batch(corpus, 10**6 + step, batch=config.extend.finetune_batch,
                                        length=long_len, passkey_fraction=config.passkey_fraction,
                                        seed=config.seed)
  rows = []
  for method in config.extend.methods.split(","):
    model = model_lib.Transformer(model_config(config, method), rngs=nnx.Rngs(0))
    graphdef_m = nnx.graphdef(model)
    for steps in (0, ft_cfg.num_steps):
      state = trained
      if steps:
        _, state = train(graphdef_m, trained, ft_cfg, ft_batches, log_every=max(1, steps // 3),
                         name=f"{method} fine-tune @{long_len}")
      result = evaluate(graphdef_m, state, corpus, config.extend, long_len, train_len)
      rows.append({"method": method, "finetune_steps": steps, **result})
      print(f"{method:>5} ft={steps:<4} ppl<L {result['ppl_within_train']:.2f} ppl>L "
            f"{result['ppl_beyond_train']:.2f} passkey {result['passkey']}", flush=True)
  return rows


def main(argv):
  del argv
  config = _CONFIG.value
  t0 = time.perf_counter()
  rows = run(config)
  meta = {"device": jax.devices()[0].device_kind, "date": bench_common.today(), "jax": jax.__version__,
          "size": config.size, "seconds": round(time.perf_counter() - t0, 1),
          "train_len": config.data.seq_len, "factor": config.extend.factor}
  write_report(rows, meta, config.out_dir, config.data.seq_len, config.extend.factor)


if __name__ == "__main__":
  app.run(main)
