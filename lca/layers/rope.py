"""Rotary position embedding (RoPE, Su et al. 2021).

Convention: the head dimension is split in halves and dimension i is rotated with
dimension i + D/2 (the "rotate half" layout of GPT-NeoX / Llama / Qwen), by angle
t * theta_i with theta_i = base^(-2i/D). Context-extension scalings (PI, NTK, YaRN)
change `theta` and the attention temperature; they plug in through `frequencies`.
"""

import math

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


# ----------------------------------------------------------------------------- context extension

ROPE_SCALINGS = ("none", "pi", "ntk", "yarn")


def yarn_ramp(ratio: jax.Array, alpha: float = 1.0, beta: float = 32.0) -> jax.Array:
  """YaRN's ramp gamma(r): 0 for r < alpha, 1 for r > beta, linear in between."""
  return jnp.clip((ratio - alpha) / (beta - alpha), 0.0, 1.0)


def yarn_attention_factor(factor: float) -> float:
  """YaRN's temperature 0.1 ln s + 1 (1 for s <= 1): multiply q and k by it, i.e. logits by its square."""
  return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def scaled_rope_frequencies(head_dim: int, base: float = 10_000.0, scaling: str = "none",
                            factor: float = 1.0, original_length: int | None = None, *,
                            alpha: float = 1.0, beta: float = 32.0) -> tuple[jax.Array, float]:
  """RoPE frequencies for context extension -> (theta' [D/2] float32, attention_factor).

  scaling (s = factor = L_new / L_train):
    "none": plain RoPE, theta_i = base^(-2i/D).
    "pi":   position interpolation (arXiv 2306.15595): t -> t / s, i.e. theta' = theta / s.
    "ntk":  NTK-aware: base' = base * s^(D / (D - 2)).
    "yarn": (arXiv 2309.00071) r_i = L_train / (2 pi / theta_i) rotations over the
            training length; theta' = (1 - gamma(r)) theta / s + gamma(r) theta with the
            ramp `yarn_ramp(r, alpha, beta)`: fast dimensions (r > beta) keep their
            frequency, slow ones (r < alpha) are interpolated. Needs original_length.
  attention_factor: YaRN's 0.1 ln s + 1, 1.0 for the others. Multiply q and k by it
  (logits by its square); DeepSeek-V3 folds its square into the softmax scale.
  Every scaling reduces to plain RoPE (and factor 1.0) at s = 1.
  """
  if scaling not in ROPE_SCALINGS:
    raise ValueError(f"rope scaling must be one of {ROPE_SCALINGS}, got scaling={scaling!r}")
  if not factor >= 1.0:
    raise ValueError(f"rope scaling factor must be >= 1 (L_new / L_train), got factor={factor}")
  theta = rope_frequencies(head_dim, base)
  if scaling == "none":
    return theta, 1.0
  if scaling == "pi":
    return theta / factor, 1.0
  if scaling == "ntk":
    return rope_frequencies(head_dim, base * factor ** (head_dim / (head_dim - 2))), 1.0
  if original_length is None or original_length <= 0:
    raise ValueError(f"yarn scaling needs the training length original_length > 0, "
                     f"got original_length={original_length}")
  if not 0 < alpha < beta:
    raise ValueError(f"yarn needs 0 < alpha < beta, got alpha={alpha}, beta={beta}")
  ratio = original_length * theta / (2 * math.pi)
  gamma = yarn_ramp(ratio, alpha, beta)
  return (1 - gamma) * theta / factor + gamma * theta, yarn_attention_factor(factor)
