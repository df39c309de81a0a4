"""Context extension in miniature: train at 256 tokens, evaluate at 8x with RoPE scaling.

    python -m experiments.context_extension --config=configs/context_extension.py
    python -m experiments.context_extension --config=configs/context_extension.py:gpu   # larger

The default ("cpu") takes a few minutes on a 2-core CPU; "gpu" trains a larger model
longer (about a minute on an H100). See experiments/context_extension.py for the
protocol; results go to experiments/results/context_extension/.
"""

from configs import base


def get_config(arg: str = "cpu"):
  if arg not in ("cpu", "gpu"):
    raise ValueError(f"configs/context_extension.py takes 'cpu' or 'gpu', got {arg!r}")
  gpu = arg == "gpu"
  c = base.get_config()
  c.size = arg

  # --- model: plain causal attention, RoPE; the scaling is switched at evaluation ---------
  c.model.layer_pattern = "G"
  c.model.d_model = 256 if gpu else 96
  c.model.num_layers = 4 if gpu else 2
  c.model.num_heads = 4 if gpu else 3
  c.model.num_kv_heads = 4 if gpu else 3
  c.model.head_dim = 64 if gpu else 32
  c.model.d_ff = 3 * c.model.d_model
  c.model.rope_base = 10_000.0

  # --- data -----------------------------------------------------------------------------------
  c.data.max_bytes = None if gpu else 2_000_000
  c.data.seq_len = 256                  # L_train
  c.data.batch_size = 32 if gpu else 8
  c.passkey_fraction = 0.5              # share of each batch that is passkey documents

  # --- training at L_train ----------------------------------------------------------------------
  c.train.num_steps = 3000 if gpu else 200
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 50 if gpu else 20
  c.train.weight_decay = 0.0

  # --- extension ---------------------------------------------------------------------------------
  c.extend = c.data.__class__()
  c.extend.factor = 8                   # evaluate at factor * L_train (s = 8)
  c.extend.methods = "none,pi,ntk,yarn"
  c.extend.finetune_steps = 100 if gpu else 10   # short fine-tune at the long length (V3: 1000 steps/phase)
  c.extend.finetune_batch = 8 if gpu else 2
  c.extend.finetune_lr = 1e-3
  c.extend.eval_batches = 4 if gpu else 2        # text windows of the long length (x batch 4)
  c.extend.passkey_lengths = "256,512,1024,2048,4096" if gpu else "256,512,1024,2048"
  c.extend.passkey_samples = 32 if gpu else 12
  c.out_dir = "experiments/results/context_extension"
  return c
