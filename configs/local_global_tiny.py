"""Tiny byte-level LM with ModernBERT-style local/global attention.

    python -m experiments.train --config=configs/local_global_tiny.py --workdir=results/local_global_tiny

ModernBERT (arXiv 2412.13663): a global layer every third layer (layers 0, 3, ...),
a 128-token sliding window elsewhere (causal here, for an LM), and a larger RoPE
base on the global layers (160k vs 10k).
"""

from configs import base


def get_config():
  c = base.get_config()
  c.model.layer_pattern = "GLL"
  c.model.window = 128
  c.model.global_rope_base = 160_000.0
  return c
