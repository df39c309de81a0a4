"""Tiny byte-level LM with DeepSeek Sparse Attention (layer kind "D") in every layer.

Train from scratch (sparse from step 0, no indexer loss):
    python -m experiments.train --config=configs/dsa_tiny.py --workdir=results/dsa_tiny
Convert a dense checkpoint of the same LM to DSA, stage 1 then stage 2 (the report's recipe):
    python -m experiments.dsa_convert --config=configs/dsa_tiny.py --workdir=results/dsa_convert
The ":mla" variant is DeepSeek-V3.2's layer, DSA under MLA (kind "S", MLA sizes as
configs/deepseek_tiny.py); converting it starts from the same LM with plain MLA ("M"):
    python -m experiments.dsa_convert --config=configs/dsa_tiny.py:mla --workdir=results/dsa_convert_mla

A few minutes on a 2-core CPU. The widths are shrunk (V3.2: 64 indexer heads x 128,
top-k 2048), the structure is not: top-k 64 of 256 tokens keeps attention sparse.
"""

from ml_collections import config_dict

from configs import base


VARIANTS = ("", "mla")


def get_config(variant: str = ""):
  if variant not in VARIANTS:
    raise ValueError(f"configs/dsa_tiny.py takes one of {VARIANTS} after ':', got {variant!r}")
  c = base.get_config()
  c.model.layer_pattern = "D"
  if variant == "mla":                  # V3.2: DSA under MLA, sizes as configs/deepseek_tiny.py
    c.model.layer_pattern = "S"
    c.model.num_kv_heads = c.model.num_heads   # unused by MLA
    c.model.mla_q_rank = 96               # d_c' (V3: 1536)
    c.model.mla_kv_rank = 64              # d_c (V3: 512): the latent, every head's k and v
    c.model.mla_rope_dim = 16             # d_h^R (V3: 64)
  c.model.dsa_index_heads = 4           # V3.2: 64
  c.model.dsa_index_dim = 32            # V3.2: 128
  c.model.dsa_top_k = 64                # V3.2: 2048; a quarter of seq_len here
  c.model.dsa_rope_dim = 16             # V3.2: 64 (half of index_dim)
  c.model.dsa_fp8 = config_dict.placeholder(bool)  # None = FP8 selection on GPU only
  c.model.dsa_stage = 0                 # experiments.train: sparse from scratch
  c.model.dsa_chunk = 0                 # 0: score all queries at once (fine at 256 tokens)

  # --- convert: experiments/dsa_convert.py ------------------------------------------------
  c.convert = config_dict.ConfigDict()
  c.convert.dense_workdir = config_dict.placeholder(str)  # a dense run to convert; None = train one
  c.convert.dense_steps = 300           # steps of the dense LM trained when there is none
  c.convert.stage1_steps = 60           # report: 1000 steps, lr 1e-3, indexer only
  c.convert.stage1_lr = 1e-3
  c.convert.stage2_steps = 60           # report: 15000 steps, lr 7.3e-6, everything
  c.convert.stage2_lr = 3e-4            # tiny model, few steps: larger than the report's
  return c
