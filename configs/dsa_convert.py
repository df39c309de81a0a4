"""DSA's two training stages (DeepSeek-V3.2-Exp): convert a dense LM to DeepSeek Sparse Attention.

    # 0. the dense LM (the demo's full-attention model; `make demo` leaves one in results/demo/full)
    python -m experiments.train --config=configs/full_tiny.py --workdir=results/dsa_dense
    # 1. dense warm-up: every layer "D", dense attention, main model frozen, indexer trained on its KL
    python -m experiments.train --config=configs/dsa_convert.py:stage1 --workdir=results/dsa_stage1
    # 2. sparse training: top-k attention, everything trained on CE + the KL over the selected set
    python -m experiments.train --config=configs/dsa_convert.py:stage2 --workdir=results/dsa_stage2

Each stage starts from the previous run's parameters (`train.init_from`, the defaults
above; e.g. `--config.train.init_from=results/demo/full`); the indexer, absent from
the dense LM, starts fresh. Each run evaluates at step 0 and at the end: stage 1's
val_ce at step 0 is the dense LM's (same weights, dense attention), stage 2's step-0
val_ce is the sparse model after stage 1 and its last one the sparse model after
stage 2; val_indexer_kl shows the indexer learning. `experiments/dsa_convert.py`
runs all three and tabulates them. The model sizes must match the dense run's
(configs/base.py); DSA fields as configs/dsa_tiny.py. A few minutes on a 2-core CPU.
"""

import copy

from ml_collections import config_dict

from configs import dsa_tiny
from lca import attention

STAGES = {"stage1": 1, "stage2": 2}
DEFAULT_INIT = {1: "results/dsa_dense", 2: "results/dsa_stage1"}


DENSE_KIND = {"D": "G", "S": "M"}   # each DSA layer kind and the dense layer it converts from


def dense_config(config: config_dict.ConfigDict) -> config_dict.ConfigDict:
  """The dense LM that `config` (DSA layers, a `convert` section) converts from: "D" layers
  become full attention ("G"), "S" layers (V3.2: DSA under MLA) plain MLA ("M"); trained for
  convert.dense_steps."""
  c = copy.deepcopy(config).unlock()
  kinds = attention.parse_layer_pattern(c.model.layer_pattern, c.model.num_layers)
  c.model.layer_pattern = "".join(DENSE_KIND.get(k, k) for k in kinds)
  c.train.num_steps = config.convert.dense_steps
  del c["convert"]
  return c


def stage_config(config: config_dict.ConfigDict, stage: int, init_from: str) -> config_dict.ConfigDict:
  """A copy of `config` (a DSA config with a `convert` section, as configs/dsa_tiny.py)
  set up to train DSA stage 1 or 2 starting from the run in workdir `init_from`."""
  c = copy.deepcopy(config).unlock()     # config_flags locks the original; fields are added
  cc = c.convert
  steps, lr = cc[f"stage{stage}_steps"], cc[f"stage{stage}_lr"]
  c.seed = config.seed + stage          # other batches than the dense run's (and a fresh indexer)
  c.model.dsa_stage = stage             # 1: dense attention + indexer KL; 2: top-k + KL
  c.model.dsa_kl_weight = 1.0           # loss = CE + weight * sum over layers of the indexer KL
  c.train.init_from = init_from         # parameters copied by path; the indexer starts fresh
  c.train.eval_at_start = True          # the val loss before training, at step 0
  c.train.trainable = "indexer" if stage == 1 else None  # stage 1: main model frozen
  c.train.num_steps = steps
  c.train.learning_rate = lr
  c.train.warmup_steps = max(1, steps // 10)
  c.train.weight_decay = 0.0
  c.train.log_every = max(1, steps // 6)
  c.train.eval_every = max(1, steps // 3)
  c.train.checkpoint_every = steps
  return c


def get_config(arg: str = "stage1") -> config_dict.ConfigDict:
  if arg not in STAGES:
    raise ValueError(f"configs/dsa_convert.py takes one of {sorted(STAGES)}, got {arg!r}")
  stage = STAGES[arg]
  return stage_config(dsa_tiny.get_config(), stage, DEFAULT_INIT[stage])
