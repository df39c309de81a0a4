"""Tiny byte-level LM with full causal attention in every layer.

    python -m experiments.train --config=configs/full_tiny.py --workdir=results/full_tiny

About a minute or two on a 2-core CPU. Any field can be overridden, e.g.
`--config.model.num_layers=4 --config.train.num_steps=50`.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.model.layer_pattern = "G"
  return c
