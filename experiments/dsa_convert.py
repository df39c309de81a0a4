"""Converts a dense checkpoint of the demo LM to DeepSeek Sparse Attention, in two stages.

    python -m experiments.dsa_convert --config=configs/dsa_tiny.py --workdir=results/dsa_convert
    python -m experiments.dsa_convert --config=configs/dsa_tiny.py:mla --workdir=results/dsa_convert_mla

The same three runs as configs/dsa_convert.py's commands, chained with `lca.train.run`
(each can be run and resumed on its own with experiments/train.py):
  0. the dense LM: restored from --config.convert.dense_workdir, or trained here in
     workdir/dense (layer_pattern "G", convert.dense_steps; "M" for the ":mla" variant,
     DeepSeek-V3.1 -> V3.2);
  1. workdir/stage1, dense warm-up: every attention layer becomes a DSA layer ("D", or "S":
     DSA under MLA) with the dense weights and a fresh indexer; the main model is frozen and only
     the indexer is trained, on sum_layers KL(p_t || softmax(I_t)), attention dense;
  2. workdir/stage2, sparse training: top-k attention, all parameters trained on
     CE + the indexer KL over the selected set (the indexer's input detached, so
     each term trains only its own parameters).
Reports the validation CE of the dense model, of the DSA model before stage 1 (a
random indexer), after stage 1 and after stage 2, to stdout and to
workdir/convert.json (+ convert.json and convert.md under --results when set).
"""

import copy
import datetime
import json
import pathlib

from absl import app, flags
import jax
from flax import nnx
from ml_collections import config_flags

from configs import dsa_convert as stages
from lca import data as data_lib
from lca import train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/dsa_tiny.py", "Config file.")
_WORKDIR = flags.DEFINE_string("workdir", "results/dsa_convert", "Where runs and results go.")
_RESULTS = flags.DEFINE_string("results", None, "Also write convert.json + .md here.")


def _evals(workdir: pathlib.Path) -> list[dict]:
  """The run's validation records, in step order (a finished run's, when resumed)."""
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return sorted((r for r in records if "val_loss" in r), key=lambda r: r["step"])


def random_indexer_val(config, dense_dir: str, log) -> dict:
  """Validation metrics of the sparse DSA model (stage 0) with the dense weights and a
  fresh indexer: what converting costs before any indexer training."""
  c = copy.deepcopy(config)
  c.model.dsa_stage = 0
  model = train.build_model(c)
  train.init_from_run(model, dense_dir, log=log)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  corpus = data_lib.load_corpus(c.data.path, c.data.glob, c.data.max_bytes)
  return train.evaluate(train.make_eval_step(graphdef), {"params": params, "rest": rest},
                        train.validation_batches(c, corpus))


def convert(config, workdir: str, log=print) -> dict:
  workdir = pathlib.Path(workdir)
  dense_dir = config.convert.dense_workdir or str(workdir / "dense")
  if not (pathlib.Path(dense_dir) / "checkpoints").exists():
    log(f"training the dense LM in {dense_dir}")
    train.run(stages.dense_config(config), dense_dir, log=log)
  random = random_indexer_val(config, dense_dir, log)
  log(f"DSA, random indexer (top-{config.model.dsa_top_k}): val CE {random['ce']:.4f}")
  for stage, init_from in ((1, dense_dir), (2, str(workdir / "stage1"))):
    log(f"stage {stage} in {workdir / f'stage{stage}'} from {init_from}")
    train.run(stages.stage_config(config, stage, init_from), workdir / f"stage{stage}", log=log)
  one, two = _evals(workdir / "stage1"), _evals(workdir / "stage2")
  out = {"dense_val_loss": one[0]["val_ce"],      # stage 1 at step 0: dense attention, dense weights
         "dsa_val_loss_before": random["ce"],
         "dsa_val_loss_after_stage1": two[0]["val_ce"],
         "dsa_val_loss_after_stage2": two[-1]["val_ce"],
         "stage1": {"val_kl_first": one[0]["val_indexer_kl"], "val_kl_last": one[-1]["val_indexer_kl"]},
         "stage2": {"val_kl_first": two[0]["val_indexer_kl"], "val_kl_last": two[-1]["val_indexer_kl"]}}
  for name, key in (("dense LM", "dense_val_loss"), ("after stage 1 (dense warm-up)",
                    "dsa_val_loss_after_stage1"), ("after stage 2 (sparse training)",
                                                   "dsa_val_loss_after_stage2")):
    log(f"{name}: val CE {out[key]:.4f}")
  out["config"] = {k: v for k, v in config.model.to_dict().items() if k.startswith("dsa_")} | dict(
      seq_len=config.data.seq_len, **config.convert.to_dict(), device=jax.devices()[0].device_kind,
      jax=jax.__version__, date=datetime.date.today().isoformat())
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
    (res / "convert.md").write_text("| model | val CE (nats/byte) |\n|---|---|\n" +
                                    "".join(f"| {n} | {v:.4f} |\n" for n, v in rows))


if __name__ == "__main__":
  app.run(main)
