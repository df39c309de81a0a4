"""Recall experiment: MQAR and passkey retrieval for full / local / linear / Gated DeltaNet / hybrid.

    python -m experiments.recall --config=configs/recall.py            # CPU smoke run, ~5-10 minutes
    python -m experiments.recall --config=configs/recall.py:gpu        # MQAR at 256 and 1024 (GPU)
    python -m experiments.recall --config=configs/recall.py:gpu --config.recall.lengths=256,512,1024,2048,4096 \
        --config.recall.tasks=mqar,passkey                          # the full sweep

Every model has the same width and depth (4 layers; d_model 128, 2 heads x 64 on GPU;
64 and 2 x 32 on CPU), the
same optimizer and the same number of steps and tokens; only the mixer letters of
`layer_pattern` differ (lca.attention.LAYER_KINDS). One model is trained per
(task, length); accuracy is on fresh sequences. Writes experiments/results/recall/.
"""

from ml_collections import config_dict

from configs import base

# name -> layer_pattern (4 layers each)
MODELS = {
    "full": "G",        # causal softmax attention
    "local": "L",       # sliding window (recall.window tokens)
    "linear": "R",      # gated linear attention (scalar decay), lca.attention.gated_deltanet
    "gdn": "E",         # Gated DeltaNet
    "hybrid": "EEEG",   # Qwen3-Next: 3 Gated DeltaNet : 1 gated attention
    "nsa": "N",         # Native Sparse Attention (model.nsa_* sizes)
    "dsa": "D",         # DeepSeek Sparse Attention, top-k = model.dsa_top_k tokens
}


def get_config(arg: str = "cpu") -> config_dict.ConfigDict:
  if arg not in ("cpu", "gpu"):
    raise ValueError(f"configs/recall.py takes 'cpu' or 'gpu', got {arg!r}")
  gpu = arg == "gpu"
  c = base.get_config()

  # --- model (shared by all variants; layer_pattern is set per variant) -----------------
  c.model.d_model = 128 if gpu else 64
  c.model.num_layers = 4
  c.model.num_heads = 2
  c.model.num_kv_heads = 2
  c.model.head_dim = 64 if gpu else 32
  c.model.d_ff = 384 if gpu else 192
  c.model.window = 64                    # local layers: far shorter than the recall distance
  c.model.output_gate = True             # Qwen3-Next gated attention on G layers
  c.model.qk_norm = True
  c.model.attn_conv_size = 4             # G/L layers get the short conv E/R layers have (Canon-A)
  c.model.dsa_index_heads = 4            # D layers: a small indexer, top-64 tokens
  c.model.dsa_index_dim = 32
  c.model.dsa_rope_dim = 16
  c.model.dsa_top_k = 64
  c.model.dtype = "bfloat16" if gpu else "float32"

  # --- recall tasks ---------------------------------------------------------------------
  c.recall = config_dict.ConfigDict()
  c.recall.models = "full,local,linear,gdn,hybrid"  # comma-separated names of MODELS
  c.recall.tasks = "mqar"               # also "passkey"
  c.recall.lengths = "256,1024" if gpu else "128"  # the sweep: 256,512,1024,2048,4096
  c.recall.pairs_per_token = 1 / 32      # MQAR key-value pairs = length / 32 (256 -> 8, 2048 -> 64)
  c.recall.max_pairs = 64                # cap: keys and values come from 64-token ranges
  c.recall.passkey_digits = 5
  c.recall.eval_sequences = 256
  c.recall.tokens_per_step = 32768 if gpu else 2048  # batch = tokens_per_step // length

  # --- train (the same budget for every model) ------------------------------------------
  c.data.batch_size = 32 if gpu else 16
  c.train.num_steps = 1500 if gpu else 150  # CPU: a smoke run, too short to learn recall
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 50
  c.train.weight_decay = 0.0
  c.train.log_every = 50
  return c
