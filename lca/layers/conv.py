"""Short causal depthwise convolution over time (Qwen3-Next's linear-attention layers,
H3/Based "short conv", Canon layers): each channel mixes the last few tokens."""

import jax.numpy as jnp


def causal_conv(x, weight, tail, segment_ids=None):
  """Causal depthwise conv over time.

  x: [B, L, C]; weight: [W, C] (tap W-1 multiplies the current token); tail: [B, W-1, C],
  the inputs before x (zeros at the start). segment_ids [B, L]: taps never cross a
  document boundary. Returns (y [B, L, C], new tail [B, W-1, C]).
  """
  width, length = weight.shape[0], x.shape[1]
  xp = jnp.concatenate([tail.astype(x.dtype), x], axis=1)
  if segment_ids is not None:
    segp = jnp.pad(segment_ids, [(0, 0), (width - 1, 0)], constant_values=-1)
  y = jnp.zeros(x.shape, jnp.float32)
  for i in range(width):
    tap = xp[:, i:i + length].astype(jnp.float32) * weight[i].astype(jnp.float32)
    if segment_ids is not None:
      tap = jnp.where((segp[:, i:i + length] == segment_ids)[..., None], tap, 0.0)
    y = y + tap
  return y.astype(x.dtype), xp[:, xp.shape[1] - (width - 1):]
