"""Rotary position embedding (RoPE, Su et al. 2021).

Convention: the head dimension is split in halves and dimension i is rotated with
dimension i + D/2 (the "rotate half" layout of GPT-NeoX / Llama / Qwen), by angle
t * theta_i with theta_i = base^(-2i/D). Context-extension scalings (PI, NTK, YaRN)
change `theta` and the attention temperature; they plug in through `frequencies`.
"""

import jax
import jax.numpy as jnp


def rope_frequencies(head_dim: int, base: float = 10_000.0) -> jax.Array:
  """theta_i = base^(-2i/D) for i < D/2 -> [D/2] float32."""
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head_dim, got head_dim={head_dim}")
  if base <= 1:
    raise ValueError(f"RoPE base must be > 1, got base={base}")
  return base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


def apply_rope(x: jax.Array, positions: jax.Array, frequencies: jax.Array) -> jax.Array:
  """Rotates x by its positions.

  Args:
    x: [B, L, H, D].
    positions: [B, L] integer (or float, for interpolated) positions.
    frequencies: [D/2] angular frequencies theta_i (or [R/2] to rotate only the
      first R dimensions and leave the rest untouched, as DSA's indexer does).
  Returns:
    [B, L, H, D] in x's dtype; the rotation itself runs in fp32.
  """
  rot = 2 * frequencies.shape[-1]
  if rot > x.shape[-1]:
    raise ValueError(f"frequencies cover {rot} dims but x has head_dim={x.shape[-1]}")
  if positions.shape != x.shape[:2]:
    raise ValueError(f"positions must be [B, L]={x.shape[:2]}, got {positions.shape}")
  angles = positions.astype(jnp.float32)[..., None] * frequencies  # [B, L, R/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x_rot, x_pass = x[..., :rot].astype(jnp.float32), x[..., rot:]
  x1, x2 = jnp.split(x_rot, 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return jnp.concatenate([rotated.astype(x.dtype), x_pass], axis=-1)
