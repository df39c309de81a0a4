"""Tiny byte-level LM with Native Sparse Attention (layer kind "N") in every layer.

    python -m experiments.train --config=configs/nsa_tiny.py --workdir=results/nsa_tiny

Same model, data and budget as configs/full_tiny.py (compare the two runs' losses).
A few minutes on a 2-core CPU. The sizes are shrunk (paper: l=32, d=16, l'=64, n=16,
w=512 at 64k), the structure is not: at seq_len 256 a query sees 31 compressed
blocks, its 4 best selection blocks of 32 (half of the context at the end) and a
64-token window.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.model.layer_pattern = "N"
  c.model.nsa_block_len = 16            # l (paper 32)
  c.model.nsa_block_stride = 8          # d (paper 16)
  c.model.nsa_select_block = 32         # l' (paper 64)
  c.model.nsa_num_selected = 4          # n, incl. 1 initial + 2 local blocks (paper 16)
  c.model.nsa_window = 64               # w (paper 512)
  c.model.nsa_num_initial = 1
  c.model.nsa_num_local = 2
  c.model.nsa_compress_hidden = 0       # φ hidden width; 0 = 2 * head_dim
  c.model.nsa_gate_hidden = 32          # gate MLP hidden width
  return c
