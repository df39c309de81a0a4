"""Defaults shared by every LM config: a tiny byte-level model that trains on a CPU.

Not run directly; the model-family configs (configs/*_tiny.py) start from this.
"""

from ml_collections import config_dict


def get_config() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.seed = 0

  # --- model: every field of lca.model.ModelConfig -------------------------------------
  c.model = config_dict.ConfigDict()
  c.model.vocab_size = 256              # bytes
  c.model.d_model = 128
  c.model.num_layers = 6
  c.model.num_heads = 4
  c.model.num_kv_heads = 2              # GQA 4:2
  c.model.head_dim = 32
  c.model.d_ff = 384                    # SwiGLU hidden width (3x d_model)
  c.model.layer_pattern = "G"           # lca.attention.LAYER_KINDS letters, repeated
  c.model.window = 128                  # local layers' window (ModernBERT: 128)
  c.model.rope_base = 10_000.0
  c.model.global_rope_base = config_dict.placeholder(float)  # ModernBERT global: 160k
  c.model.qk_norm = False
  c.model.output_gate = False
  c.model.tie_embeddings = True
  c.model.dtype = "float32"             # "bfloat16" for bf16 compute (fp32 params)
  c.model.implementation = config_dict.placeholder(str)  # None = fastest available

  # --- data: lca.data -------------------------------------------------------------------
  c.data = config_dict.ConfigDict()
  c.data.path = config_dict.placeholder(str)  # None = Python stdlib sources; or a file/dir
  c.data.glob = "*.py"                  # files taken from a directory
  c.data.max_bytes = config_dict.placeholder(int)  # cap on training bytes (None = all)
  c.data.seq_len = 256
  c.data.batch_size = 16                # 4096 tokens per step
  c.data.document_mask = False          # True: attention never crosses packed documents

  # --- train: lca.train -----------------------------------------------------------------
  c.train = config_dict.ConfigDict()
  c.train.num_steps = 300
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 30
  c.train.min_lr_ratio = 0.1            # cosine decays to lr * min_lr_ratio
  c.train.weight_decay = 0.1
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.clip_norm = 1.0
  c.train.log_every = 10
  c.train.eval_every = 100
  c.train.eval_batches = 4              # fixed validation windows: eval_batches * batch_size
  c.train.checkpoint_every = 100
  c.train.keep_checkpoints = 2
  c.train.trainable = config_dict.placeholder(str)  # regex on parameter paths; None = all
  return c
