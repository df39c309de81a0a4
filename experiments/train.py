"""Trains an LM from a config file.

    python -m experiments.train --config=configs/local_global_tiny.py --workdir=results/lg \
        --config.train.num_steps=100 --config.model.num_layers=3

Resumes from the workdir's latest checkpoint; Ctrl-C saves one and exits. A new run
can start from another run's parameters (`--config.train.init_from=<workdir>`), e.g.
the two DSA training stages from a dense LM: see configs/dsa_convert.py.
"""

from absl import app, flags
from ml_collections import config_flags

from lca import train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/full_tiny.py", "Config file.")
_WORKDIR = flags.DEFINE_string("workdir", "results/train", "Where checkpoints and metrics go.")

_SHOWN = ("step", "train_loss", "start_val_loss", "start_val_ce", "start_val_indexer_kl",
          "val_loss", "val_ce", "val_indexer_kl", "val_bpb")


def main(argv):
  del argv
  summary = train.run(_CONFIG.value, _WORKDIR.value)
  print({k: summary[k] for k in _SHOWN if k in summary})


if __name__ == "__main__":
  app.run(main)
