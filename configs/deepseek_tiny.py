"""Tiny DeepSeek-V3-style LM: MLA in every layer, DeepSeekMoE after the first dense layer,
one multi-token-prediction module.

    python -m experiments.train --config=configs/deepseek_tiny.py --workdir=results/deepseek_tiny

A few minutes on a 2-core CPU. The structure is V3's (arXiv 2412.19437); widths shrink:
V3 has d_c = 512, d_c' = 1536, d_h^R = 64, 256 routed experts (8 active, 1 shared),
3 dense layers, D = 1 MTP module. Metrics add mtp_ce_1, moe_max_violation (max expert
load over mean, minus 1) and moe_balance_loss.
"""

from configs import base


def get_config():
  c = base.get_config()

  # --- attention: MLA everywhere (lca.attention.mla) --------------------------------------
  c.model.layer_pattern = "M"
  c.model.num_heads = 4
  c.model.num_kv_heads = 4              # unused by MLA; kept equal to num_heads
  c.model.head_dim = 32                 # d_h of the compressed q/k part and of v
  c.model.mla_q_rank = 96               # d_c' (V3: 1536 = 12 d_h)
  c.model.mla_kv_rank = 64              # d_c (V3: 512 = 4 d_h): cache 64 + 16 values/token/layer
  c.model.mla_rope_dim = 16             # d_h^R (V3: 64 = d_h / 2)
  c.model.mla_decode = "absorbed"

  # --- MoE (lca.layers.moe) -----------------------------------------------------------------
  c.model.moe_num_experts = 8           # routed (V3: 256)
  c.model.moe_top_k = 2                 # active routed (V3: 8)
  c.model.moe_num_shared = 1
  c.model.moe_d_ff = 96                 # per expert; active FFN width 3 x 96 = 288 (dense: 384)
  c.model.moe_num_groups = 1            # V3: 8 groups, top 4
  c.model.moe_top_groups = 1
  c.model.moe_route_scale = 1.0         # V3: 2.5 (with 8 of 256 experts)
  c.model.moe_bias_speed = 1e-3         # gamma (V3: 0.001)
  c.model.moe_balance_weight = 1e-4     # alpha (V3: 0.0001)
  c.model.moe_first_dense_layers = 1    # V3: 3 of 61
  c.model.moe_implementation = "blocked"  # sorted, padded to blocks; only chosen experts

  # --- MTP (lca.layers.mtp) -----------------------------------------------------------------
  c.model.mtp_depth = 1                 # V3: 1
  c.model.mtp_weight = 0.3              # V3: 0.3 early, 0.1 later

  # --- RoPE scaling (lca.layers.rope); "yarn" with factor s extends L_train to s L_train ----
  c.model.rope_scaling = "none"
  c.model.rope_scaling_factor = 1.0
  c.model.rope_original_length = 0
  return c
