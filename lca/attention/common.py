"""Argument checks and masks shared by every softmax-attention mechanism.

Layout everywhere: q [B, Lq, H, D], k [B, Lk, H_kv, D], v [B, Lk, H_kv, D_v]
(the layout of `jax.nn.dot_product_attention`). H must be a multiple of H_kv
(GQA; MQA when H_kv == 1); query head h reads KV head h // (H // H_kv).
"""

import jax
import jax.numpy as jnp
import numpy as np

FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def check_qkv(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
  """Raises ValueError/TypeError naming the argument when shapes or dtypes are wrong."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"{name} must be [batch, seq, heads, head_dim], got shape {x.shape}")
    if x.dtype not in FLOAT_DTYPES:
      raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
  if not (q.dtype == k.dtype == v.dtype):
    raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
  if k.shape[:3] != v.shape[:3]:
    raise ValueError(f"k and v must agree on [batch, seq, heads], got k {k.shape} and v {v.shape}")
  if q.shape[0] != k.shape[0]:
    raise ValueError(f"q and k batch sizes differ: q {q.shape}, k {k.shape}")
  if q.shape[3] != k.shape[3]:
    raise ValueError(f"head_dim mismatch: q has {q.shape[3]}, k has {k.shape[3]}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(
        f"num_q_heads={q.shape[2]} must be a multiple of num_kv_heads={k.shape[2]} (q {q.shape}, k {k.shape})")


def check_window(window) -> None:
  if window is not None and (not isinstance(window, (int, np.integer)) or window <= 0):
    raise ValueError(f"window must be a positive int or None, got window={window!r}")


def default_positions(batch: int, q_len: int, kv_len: int):
  """Bottom-right aligned positions: the last query sits at the last key.

  Returns q_positions [B, Lq] = kv_len - q_len + arange(q_len) and kv_positions
  [B, Lk] = arange(kv_len), both int32.
  """
  q_pos = jnp.arange(kv_len - q_len, kv_len, dtype=jnp.int32)
  kv_pos = jnp.arange(kv_len, dtype=jnp.int32)
  return (jnp.broadcast_to(q_pos, (batch, q_len)), jnp.broadcast_to(kv_pos, (batch, kv_len)))


def attention_mask(q_positions, kv_positions, *, causal: bool, window=None,
                   q_segment_ids=None, kv_segment_ids=None) -> jax.Array:
  """Which keys each query may see -> bool [B, Lq, Lk].

  A key with a negative position is an empty cache slot and is never visible.
  causal: s <= t. window w: causal t - w < s <= t; non-causal |t - s| < w.
  Segment ids (packed sequences): only keys of the query's own segment.
  """
  t = q_positions[:, :, None]
  s = kv_positions[:, None, :]
  mask = s >= 0
  if causal:
    mask &= s <= t
  if window is not None:
    mask &= (t - s < window) & (causal | (s - t < window))
  if q_segment_ids is not None:
    mask &= q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  return mask
