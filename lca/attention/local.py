"""Sliding-window (local) attention and the ModernBERT local/global alternation.

Key s is visible to query t iff t - w < s <= t. ModernBERT (arXiv 2412.13663) puts
a global layer every third layer and a 128-token window elsewhere; in lca that is
the model's `layer_pattern="GLL"` (see `lca.attention.LAYER_KINDS`).

  local_attention_reference(...)    the full reference with a window mask;
  local_attention(..., implementation=)  "xla_chunked" (O(L*w) memory and FLOPs) or
                                    any implementation of `full.attention`;
  LocalAttention                    the layer: `full.Attention` with a window and a
                                    window-sized ring-buffer cache.
"""

import functools

import jax
import jax.numpy as jnp

from lca.attention import common, full


def local_attention_reference(q, k, v, *, window: int, scale=None, segment_ids=None) -> jax.Array:
  """Causal sliding-window attention. q: [B, L, H, D], k/v: [B, L, H_kv, D] -> [B, L, H, D]."""
  return full.attention_reference(q, k, v, causal=True, window=window, scale=scale,
                                  segment_ids=segment_ids)


def _blocks(x, block: int, fill):
  """[B, L, ...] -> [B, n, block, ...] padded with `fill` at the end."""
  pad = -x.shape[1] % block
  x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
  return x.reshape(x.shape[0], -1, block, *x.shape[2:])


def _with_previous(blocks, fill):
  """[B, n, c, ...] -> [B, n, 2c, ...]: each block preceded by the one before it."""
  prev = jnp.pad(blocks, [(0, 0), (1, 0)] + [(0, 0)] * (blocks.ndim - 2), constant_values=fill)[:, :-1]
  return jnp.concatenate([prev, blocks], axis=2)


def local_attention_chunked(q, k, v, *, window: int, scale=None, segment_ids=None) -> jax.Array:
  """Causal window attention in O(L*w): blocks of w queries see their block and the previous one.

  Every block is computed by the reference on [2w] keys, so the math is the same
  as `local_attention_reference` up to float summation order.
  """
  common.check_qkv(q, k, v)
  common.check_window(window)
  batch, length = q.shape[:2]
  pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  q_pos = _blocks(pos, window, -1)                       # padded queries are dropped below
  kv_pos = _with_previous(_blocks(pos, window, -1), -1)  # -1: no key there
  flat = lambda x: x.reshape(-1, *x.shape[2:])
  q_b = _blocks(q, window, 0)
  k_b = _with_previous(_blocks(k, window, 0), 0)
  v_b = _with_previous(_blocks(v, window, 0), 0)
  seg_q = seg_kv = None
  if segment_ids is not None:
    seg_q = flat(_blocks(segment_ids, window, -1))
    seg_kv = flat(_with_previous(_blocks(segment_ids, window, -1), -1))
  out = full.attention_reference(flat(q_b), flat(k_b), flat(v_b), causal=True, window=window,
                                 scale=scale, segment_ids=seg_q, kv_segment_ids=seg_kv,
                                 q_positions=flat(q_pos), kv_positions=flat(kv_pos))
  return out.reshape(batch, -1, *out.shape[2:])[:, :length]


def _chunked(q, k, v, *, causal, window, scale, segment_ids, kv_segment_ids, q_positions, kv_positions):
  if not causal or window is None:
    raise NotImplementedError("implementation='xla_chunked' is causal sliding-window attention only")
  if q_positions is not None or kv_positions is not None or q.shape[1] != k.shape[1]:
    raise NotImplementedError("implementation='xla_chunked' is for self-attention without positions")
  if kv_segment_ids is not None and kv_segment_ids is not segment_ids:
    raise NotImplementedError("implementation='xla_chunked' needs kv_segment_ids == segment_ids")
  return local_attention_chunked(q, k, v, window=window, scale=scale, segment_ids=segment_ids)


IMPLEMENTATIONS = {**full.IMPLEMENTATIONS, "xla_chunked": _chunked}


def local_attention(q, k, v, *, window: int, scale=None, segment_ids=None,
                    implementation=None) -> jax.Array:
  """Causal sliding-window attention through the chosen implementation.

  implementation: "xla_chunked", or any of `full.IMPLEMENTATIONS`; None tries the
  GPU defaults of `full.attention`, then "xla_chunked".
  """
  common.check_qkv(q, k, v)
  common.check_window(window)
  if implementation is None:
    implementation = (*full.default_implementations(), "xla_chunked")
    if jax.default_backend() != "gpu":
      implementation = ("xla_chunked",)
  return full.dispatch(IMPLEMENTATIONS, implementation, q, k, v, causal=True, window=window,
                       scale=scale, segment_ids=segment_ids, kv_segment_ids=None,
                       q_positions=None, kv_positions=None, what="local attention")


class LocalAttention(full.Attention):
  """`full.Attention` with a sliding window (ring-buffer cache of `window` slots)."""

  def __init__(self, *args, window: int, **kwargs):
    if window is None:
      raise ValueError("LocalAttention needs a window, got window=None")
    super().__init__(*args, window=window, **kwargs)

  def attend(self, q, k, v, segment_ids):
    return local_attention(q, k, v, window=self.window, segment_ids=segment_ids,
                           implementation=self.implementation)
