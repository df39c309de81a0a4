"""The Gated DeltaNet layer (Qwen3-Next style) and its gated-linear-attention twin.

    x -> q, k, v projections -> causal depthwise conv (kernel 4) + SiLU -> L2-norm q, k
      -> gated delta rule (b = sigmoid(x W_b), log a = -exp(A_log) softplus(x W_a + dt_bias))
      -> RMSNorm(o) * SiLU(x W_gate) per head -> W_o

Sources: Gated DeltaNet (arXiv 2412.06464), Qwen3-Next modeling code in
huggingface/transformers (qwen3_next). With `delta=False` the layer is gated linear
attention (S_t = a_t S_{t-1} + k_t v_t^T, the Mamba-2 / RetNet family) with the same
conv, norms and gate. The decode cache is fixed-size whatever the context: the
state [B, H, K, V] (float32) and the last conv_size - 1 conv inputs.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lca.attention import linear
from lca.layers import conv as conv_lib
from lca.layers import norms

# log a at the first token of a packed document: e^-60 wipes the previous document's state.
_RESET_LOG_ALPHA = -60.0


def document_starts(segment_ids):
  """[B, L] ids -> bool [B, L], True at the first token of each packed document."""
  prev = jnp.pad(segment_ids, [(0, 0), (1, 0)], constant_values=-1)[:, :-1]
  return segment_ids != prev


class GatedDeltaNet(nnx.Module):
  """Gated DeltaNet mixer (`delta=True`, layer "E") or gated linear attention ("R").

  Call: `(y, cache) = layer(x [B, L, d_model], positions [B, L], cache=, segment_ids=)`.
  With a cache, L tokens continue the sequence the cache holds (L == 1: the recurrent
  step; L > 1: the chunked form from the cached state). segment_ids (packed documents)
  reset the state at each document start; they are for training (cache=None).
  """

  def __init__(self, d_model: int, num_heads: int, head_dim: int, *, rngs: nnx.Rngs,
               delta: bool = True, head_dim_v: int | None = None, conv_size: int = 4,
               chunk_size: int = 64, implementation=None, dtype=jnp.float32):
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    for name, value in (("num_heads", num_heads), ("head_dim", head_dim), ("head_dim_v", head_dim_v),
                        ("conv_size", conv_size), ("d_model", d_model)):
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"GatedDeltaNet needs a positive int {name}, got {name}={value!r}")
    linear.check_chunk_size(chunk_size)
    init = nnx.initializers.lecun_normal()
    p = lambda *shape: nnx.Param(init(rngs.params(), shape))
    self.channels = num_heads * (2 * head_dim + head_dim_v)
    self.w_qkv = p(d_model, self.channels)
    bound = 1.0 / math.sqrt(conv_size)
    self.conv = nnx.Param(jax.random.uniform(rngs.params(), (conv_size, self.channels),
                                             minval=-bound, maxval=bound))
    self.w_a = p(d_model, num_heads)
    # Mamba-2 init: A in [1, 16], dt = softplus(dt_bias) log-uniform in [1e-3, 1e-1].
    self.a_log = nnx.Param(jnp.log(jax.random.uniform(rngs.params(), (num_heads,), minval=1.0, maxval=16.0)))
    dt = jnp.exp(jax.random.uniform(rngs.params(), (num_heads,), minval=math.log(1e-3), maxval=math.log(1e-1)))
    self.dt_bias = nnx.Param(dt + jnp.log(-jnp.expm1(-dt)))
    self.w_b = p(d_model, num_heads) if delta else None
    self.w_gate = p(d_model, num_heads * head_dim_v)
    self.o_norm = norms.RMSNorm(head_dim_v)
    self.w_o = p(num_heads * head_dim_v, d_model)
    self.num_heads, self.head_dim, self.head_dim_v = num_heads, head_dim, head_dim_v
    self.delta, self.conv_size, self.chunk_size = delta, conv_size, chunk_size
    self.implementation = implementation
    self.dtype = dtype

  def init_cache(self, batch: int, capacity: int, dtype=None) -> dict:
    """Fixed size whatever `capacity`: state [B, H, K, V] float32, conv tail [B, W-1, C]."""
    del capacity  # the point of the mechanism
    return dict(state=jnp.zeros((batch, self.num_heads, self.head_dim, self.head_dim_v), jnp.float32),
                conv=jnp.zeros((batch, self.conv_size - 1, self.channels), dtype or self.dtype))

  def cache_bytes_per_token(self, context: int, bytes_per_value: int = 2) -> float:
    """Decode-cache bytes per token: the float32 state plus the conv tail, over `context`."""
    state = self.num_heads * self.head_dim * self.head_dim_v * 4
    conv = (self.conv_size - 1) * self.channels * bytes_per_value
    return (state + conv) / context

  def __call__(self, x, positions, *, cache: dict | None = None, segment_ids=None):
    """x: [B, L, d_model], positions: [B, L] (unused: no RoPE) -> (y, new cache or None)."""
    del positions
    if cache is not None and segment_ids is not None:
      raise ValueError("GatedDeltaNet: segment_ids (packed documents) are for training, not with a cache")
    batch, length, _ = x.shape
    heads, dk, dv = self.num_heads, self.head_dim, self.head_dim_v
    x = x.astype(self.dtype)
    w = lambda param: param[...].astype(self.dtype)
    tail = (jnp.zeros((batch, self.conv_size - 1, self.channels), self.dtype) if cache is None
            else cache["conv"])
    qkv, tail = conv_lib.causal_conv(x @ w(self.w_qkv), self.conv[...], tail, segment_ids)
    qkv = jax.nn.silu(qkv)
    q, k, v = jnp.split(qkv, [heads * dk, 2 * heads * dk], axis=-1)
    q = linear.l2_normalize(q.reshape(batch, length, heads, dk))
    k = linear.l2_normalize(k.reshape(batch, length, heads, dk))
    v = v.reshape(batch, length, heads, dv)

    x32 = x.astype(jnp.float32)
    log_alpha = -jnp.exp(self.a_log[...]) * jax.nn.softplus(x32 @ self.w_a[...] + self.dt_bias[...])
    if segment_ids is not None:
      log_alpha = jnp.where(document_starts(segment_ids)[..., None], _RESET_LOG_ALPHA, log_alpha)
    beta = jax.nn.sigmoid(x32 @ self.w_b[...]) if self.delta else None

    if cache is not None and length == 1:
      o, state = linear.gated_delta_rule_step(cache["state"], q[:, 0], k[:, 0], v[:, 0],
                                              None if beta is None else beta[:, 0], log_alpha[:, 0])
      o = o[:, None]
    else:
      o, state = linear.gated_delta_rule(q, k, v, beta, log_alpha,
                                         initial_state=None if cache is None else cache["state"],
                                         chunk_size=self.chunk_size, implementation=self.implementation)
    gate = jax.nn.silu(x @ w(self.w_gate)).reshape(batch, length, heads, dv)
    o = (self.o_norm(o) * gate).reshape(batch, length, heads * dv)
    new_cache = None if cache is None else dict(state=state, conv=tail.astype(cache["conv"].dtype))
    return o @ w(self.w_o), new_cache
