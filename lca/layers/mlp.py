"""SwiGLU feed-forward block (Shazeer 2020, as in Llama / Qwen / DeepSeek dense layers)."""

import jax
import jax.numpy as jnp
from flax import nnx


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
  """x: [..., D]; w_gate, w_up: [D, F]; w_down: [F, D] -> [..., D]."""
  return (jax.nn.silu(x @ w_gate) * (x @ w_up)) @ w_down


class SwiGLU(nnx.Module):
  """SwiGLU MLP; weights are stored in fp32 and cast to `dtype` for compute."""

  def __init__(self, d_model: int, d_ff: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    init = nnx.initializers.lecun_normal()
    self.w_gate = nnx.Param(init(rngs.params(), (d_model, d_ff)))
    self.w_up = nnx.Param(init(rngs.params(), (d_model, d_ff)))
    self.w_down = nnx.Param(init(rngs.params(), (d_ff, d_model)))
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    cast = lambda w: w[...].astype(self.dtype)
    return swiglu(x.astype(self.dtype), cast(self.w_gate), cast(self.w_up), cast(self.w_down))
