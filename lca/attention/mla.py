"""Multi-head Latent Attention (MLA; DeepSeek-V2 arXiv 2405.04434, V3 arXiv 2412.19437).

Keys and values of all heads come from one low-rank latent per token,
c_KV = RMSNorm(x W_DKV) [d_c], plus one RoPE key shared by all heads,
k_R = RoPE(x W_KR) [d_R]; only these d_c + d_R values per token are cached.
Per head i: k_i = [c_KV W_UK_i ; k_R], v_i = c_KV W_UV_i. Queries are compressed too:
c_Q = RMSNorm(x W_DQ), q_i = [c_Q W_UQ_i ; RoPE(c_Q W_QR_i)]. Logit scale
1/sqrt(d_h + d_R) (times YaRN's temperature squared under context extension).

Two ways to attend, equal up to float rounding:
  mla_attention_naive     up-project the latents to per-head k, v: MHA with
                          q/k dim d_h + d_R and v dim d_v (the training form);
  mla_attention_absorbed  q_C . (c W_UK) = (q_C W_UK^T) . c: fold W_UK into the query
                          and W_UV into the output, attend over the latents directly:
                          MQA with a (d_c + d_R)-dim key and a d_c-dim value (decoding).
  mla_attention(..., implementation="naive" | "absorbed")  dispatches between them.
  MLAttention(nnx.Module) projections, RoPE, the latent cache; layer letter "M".
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lca.attention import common, full
from lca.layers import norms, rope

DECODE_FORMS = ("absorbed", "naive")


def mla_attention_naive(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, *, scale, causal=True,
                        segment_ids=None, q_positions=None, kv_positions=None,
                        attention_implementation=None) -> jax.Array:
  """MLA by up-projecting the latents to per-head keys and values.

  Args:
    q_nope: [B, T, H, d_h]; q_rope: [B, T, H, d_R] (RoPE already applied).
    c_kv: [B, S, d_c] normalized latents; k_rope: [B, S, d_R] (RoPE applied).
    w_uk: [d_c, H, d_h]; w_uv: [d_c, H, d_v].
    scale: logit scale. Masking arguments as `full.attention_reference`.
  Returns:
    [B, T, H, d_v] in q_nope's dtype.
  """
  k_nope = jnp.einsum("bsc,chd->bshd", c_kv, w_uk.astype(c_kv.dtype))
  k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None, :], (*k_nope.shape[:3], k_rope.shape[-1]))],
                      axis=-1)
  v = jnp.einsum("bsc,chd->bshd", c_kv, w_uv.astype(c_kv.dtype))
  q = jnp.concatenate([q_nope, q_rope], axis=-1)
  # v's head dim d_v is not q's d_h + d_R: cuDNN (>= 9.10) and the flash kernel take both as
  # they are, XLA's call gets v zero-padded (full.attention; before session 23 v was always
  # padded here, which cost cuDNN 15% at 128k)
  return full.attention(q, k.astype(q.dtype), v.astype(q.dtype), causal=causal, scale=scale,
                        segment_ids=segment_ids, q_positions=q_positions, kv_positions=kv_positions,
                        implementation=attention_implementation)


def mla_attention_absorbed(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, *, scale, causal=True,
                           segment_ids=None, q_positions=None, kv_positions=None,
                           attention_implementation=None) -> jax.Array:
  """MLA in the latent space: MQA over [c_KV ; k_R] with the up-projections absorbed.

  Same arguments and result as `mla_attention_naive` (attention_implementation is
  ignored: this is its own XLA form). logits = (q_C W_UK^T) . c_KV + q_R . k_R, so the
  cache is read as it is stored (no [c_KV ; k_R] concatenation, no fp32 copy): d_c + d_R
  values per cached token, once for all heads, instead of H (d_h + d_R + d_v).
  Operands stay in the cache's dtype with fp32 accumulation.
  """
  del attention_implementation
  batch, q_len, _, _ = q_nope.shape
  kv_len = c_kv.shape[1]
  q_latent = jnp.einsum("bthd,chd->bthc", q_nope, w_uk.astype(q_nope.dtype)).astype(c_kv.dtype)
  logits = (jnp.einsum("bthc,bsc->bhts", q_latent, c_kv, preferred_element_type=jnp.float32)
            + jnp.einsum("bthr,bsr->bhts", q_rope.astype(k_rope.dtype), k_rope,
                         preferred_element_type=jnp.float32)) * scale
  default_q, default_kv = common.default_positions(batch, q_len, kv_len)
  if segment_ids is not None and kv_positions is not None:
    raise ValueError("mla_attention_absorbed takes segment_ids only for self-attention (no kv_positions)")
  mask = common.attention_mask(default_q if q_positions is None else q_positions,
                               default_kv if kv_positions is None else kv_positions, causal=causal,
                               q_segment_ids=segment_ids, kv_segment_ids=segment_ids)[:, None]
  logits = jnp.where(mask, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  p = jnp.where(mask, jnp.exp(logits - jnp.where(jnp.isfinite(row_max), row_max, 0.0)), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom > 0, denom, 1.0)
  o_latent = jnp.einsum("bhts,bsc->bthc", p.astype(c_kv.dtype), c_kv, preferred_element_type=jnp.float32)
  return jnp.einsum("bthc,chd->bthd", o_latent, w_uv.astype(jnp.float32)).astype(q_nope.dtype)


IMPLEMENTATIONS = {"naive": mla_attention_naive, "absorbed": mla_attention_absorbed}


def mla_attention(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, *, scale, implementation="naive",
                  **kwargs) -> jax.Array:
  """MLA through the chosen form ("naive" or "absorbed"); arguments as `mla_attention_naive`."""
  _check_shapes(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv)
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown MLA implementation={implementation!r}; known: {sorted(IMPLEMENTATIONS)}")
  return IMPLEMENTATIONS[implementation](q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, scale=scale, **kwargs)


def _check_shapes(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv):
  if q_nope.ndim != 4 or q_rope.ndim != 4 or q_nope.shape[:3] != q_rope.shape[:3]:
    raise ValueError(f"q_nope and q_rope must be [B, T, H, *] with equal [B, T, H], got "
                     f"{q_nope.shape} and {q_rope.shape}")
  if c_kv.ndim != 3 or k_rope.ndim != 3 or c_kv.shape[:2] != k_rope.shape[:2]:
    raise ValueError(f"c_kv and k_rope must be [B, S, *] with equal [B, S], got {c_kv.shape} and {k_rope.shape}")
  if k_rope.shape[-1] != q_rope.shape[-1]:
    raise ValueError(f"RoPE dims differ: q_rope {q_rope.shape}, k_rope {k_rope.shape}")
  _, _, heads, d_h = q_nope.shape
  if w_uk.shape != (c_kv.shape[-1], heads, d_h):
    raise ValueError(f"w_uk must be [d_c, H, d_h]={(c_kv.shape[-1], heads, d_h)}, got {w_uk.shape}")
  if w_uv.ndim != 3 or w_uv.shape[:2] != (c_kv.shape[-1], heads):
    raise ValueError(f"w_uv must be [d_c, H, d_v] with d_c={c_kv.shape[-1]}, H={heads}, got {w_uv.shape}")


# ----------------------------------------------------------------------------- cache


def init_latent_cache(batch: int, capacity: int, kv_rank: int, rope_dim: int, dtype) -> dict:
  """c_kv [B, C, d_c], k_rope [B, C, d_R], pos [B, C] (-1 = empty slot)."""
  return dict(c_kv=jnp.zeros((batch, capacity, kv_rank), dtype),
              k_rope=jnp.zeros((batch, capacity, rope_dim), dtype),
              pos=jnp.full((batch, capacity), -1, jnp.int32))


def write_latent_cache(cache: dict, c_kv, k_rope, positions) -> dict:
  """Writes c_kv [B, T, d_c], k_rope [B, T, d_R] at slots `positions` [B, T]."""
  capacity = cache["c_kv"].shape[1]
  slots = positions % capacity
  b = jnp.arange(c_kv.shape[0])[:, None]
  return dict(c_kv=cache["c_kv"].at[b, slots].set(c_kv.astype(cache["c_kv"].dtype)),
              k_rope=cache["k_rope"].at[b, slots].set(k_rope.astype(cache["k_rope"].dtype)),
              pos=cache["pos"].at[b, slots].set(positions.astype(jnp.int32)))


def cache_values_per_token(kv_rank: int, rope_dim: int) -> int:
  """Cached values per token per layer: d_c + d_R (V3: 512 + 64 = 576)."""
  return kv_rank + rope_dim


# ----------------------------------------------------------------------------- module


def check_config(cfg) -> None:
  """Raises ValueError for bad mla_* fields of a ModelConfig."""
  if cfg.mla_kv_rank <= 0 or cfg.mla_q_rank < 0:
    raise ValueError(f"model.mla_kv_rank must be > 0 and model.mla_q_rank >= 0, got "
                     f"mla_kv_rank={cfg.mla_kv_rank}, mla_q_rank={cfg.mla_q_rank}")
  if cfg.mla_rope_dim <= 0 or cfg.mla_rope_dim % 2:
    raise ValueError(f"model.mla_rope_dim must be a positive even int, got {cfg.mla_rope_dim}")
  if cfg.mla_head_dim < 0 or cfg.mla_v_head_dim < 0:
    raise ValueError(f"model.mla_head_dim and model.mla_v_head_dim must be >= 0 (0: head_dim), got "
                     f"{cfg.mla_head_dim}, {cfg.mla_v_head_dim}")
  if cfg.mla_decode not in DECODE_FORMS:
    raise ValueError(f"model.mla_decode must be one of {DECODE_FORMS}, got {cfg.mla_decode!r}")


def layer_kwargs(cfg) -> dict:
  """MLAttention's keyword arguments from a `lca.model.ModelConfig` (fields mla_*, rope_*)."""
  return dict(q_rank=cfg.mla_q_rank, kv_rank=cfg.mla_kv_rank, rope_dim=cfg.mla_rope_dim,
              head_dim=cfg.mla_head_dim or cfg.head_dim, v_head_dim=cfg.mla_v_head_dim or cfg.head_dim,
              rope_base=cfg.rope_base, rope_scaling=cfg.rope_scaling,
              rope_scaling_factor=cfg.rope_scaling_factor, rope_original_length=cfg.rope_original_length,
              decode=cfg.mla_decode, implementation=cfg.implementation, dtype=cfg.compute_dtype)


class MLAttention(nnx.Module):
  """MLA layer. Training uses the naive form (through `full.attention`, any
  implementation); decoding caches only (c_KV, k_R) and attends in `decode` form."""

  def __init__(self, d_model: int, num_heads: int, *, q_rank: int, kv_rank: int, rope_dim: int,
               head_dim: int, v_head_dim: int, rngs: nnx.Rngs, rope_base: float = 10_000.0,
               rope_scaling: str = "none", rope_scaling_factor: float = 1.0,
               rope_original_length: int = 0, decode: str = "absorbed",
               implementation=None, dtype=jnp.float32):
    if decode not in DECODE_FORMS:
      raise ValueError(f"decode must be one of {DECODE_FORMS}, got decode={decode!r}")
    if min(num_heads, kv_rank, rope_dim, head_dim, v_head_dim) <= 0 or q_rank < 0 or rope_dim % 2:
      raise ValueError(f"MLA sizes must be positive (rope_dim even, q_rank >= 0), got num_heads={num_heads}, "
                       f"q_rank={q_rank}, kv_rank={kv_rank}, rope_dim={rope_dim}, head_dim={head_dim}, "
                       f"v_head_dim={v_head_dim}")
    init = nnx.initializers.lecun_normal()
    p = lambda *shape: nnx.Param(init(rngs.params(), shape))
    q_in = q_rank or d_model
    self.w_dq = p(d_model, q_rank) if q_rank else None
    self.q_norm = norms.RMSNorm(q_rank) if q_rank else None
    self.w_uq = p(q_in, num_heads * head_dim)
    self.w_qr = p(q_in, num_heads * rope_dim)
    self.w_dkv = p(d_model, kv_rank)
    self.kv_norm = norms.RMSNorm(kv_rank)
    self.w_kr = p(d_model, rope_dim)
    # Up-projections stored [d_c, H, d] with fan-in d_c.
    self.w_uk = nnx.Param(init(rngs.params(), (kv_rank, num_heads * head_dim)).reshape(kv_rank, num_heads, head_dim))
    self.w_uv = nnx.Param(init(rngs.params(), (kv_rank, num_heads * v_head_dim)).reshape(kv_rank, num_heads, v_head_dim))
    self.wo = p(num_heads * v_head_dim, d_model)
    self.num_heads, self.head_dim, self.v_head_dim = num_heads, head_dim, v_head_dim
    self.kv_rank, self.rope_dim = kv_rank, rope_dim
    self.rope_args = (rope_base, rope_scaling, rope_scaling_factor, rope_original_length or None)
    self.decode = decode
    self.implementation = implementation
    self.dtype = dtype

  def rope(self):
    """(frequencies [d_R/2], logit scale): 1/sqrt(d_h + d_R) times YaRN's temperature squared."""
    freqs, mscale = rope.scaled_rope_frequencies(self.rope_dim, *self.rope_args)
    return freqs, mscale ** 2 / math.sqrt(self.head_dim + self.rope_dim)

  def init_cache(self, batch: int, capacity: int, dtype=None) -> dict:
    return init_latent_cache(batch, capacity, self.kv_rank, self.rope_dim, dtype or self.dtype)

  def cache_bytes_per_token(self, context: int, bytes_per_value: int = 2) -> float:
    """(d_c + d_R) values per token, whatever the context."""
    del context
    return cache_values_per_token(self.kv_rank, self.rope_dim) * bytes_per_value

  def query_latent(self, x):
    """x [B, L, d_model] -> c_Q = RMSNorm(x W_DQ) [B, L, d_c'] (x itself when q_rank = 0)."""
    return x if self.w_dq is None else self.q_norm(x @ self.w_dq[...].astype(self.dtype))

  def project(self, x, positions, c_q=None):
    """x [B, L, d_model] -> q_nope [B, L, H, d_h], q_rope [B, L, H, d_R], c_kv [B, L, d_c],
    k_rope [B, L, d_R] (RoPE applied), and the logit scale. c_q: `query_latent(x)` when the
    caller already has it."""
    batch, length, _ = x.shape
    w = lambda param: param[...].astype(self.dtype)
    freqs, scale = self.rope()
    c_q = self.query_latent(x) if c_q is None else c_q
    q_nope = (c_q @ w(self.w_uq)).reshape(batch, length, self.num_heads, self.head_dim)
    q_rope = (c_q @ w(self.w_qr)).reshape(batch, length, self.num_heads, self.rope_dim)
    q_rope = rope.apply_rope(q_rope, positions, freqs)
    c_kv = self.kv_norm(x @ w(self.w_dkv))
    k_rope = rope.apply_rope((x @ w(self.w_kr))[:, :, None, :], positions, freqs)[:, :, 0]
    return q_nope, q_rope, c_kv, k_rope, scale

  def __call__(self, x, positions, *, cache: dict | None = None, segment_ids=None):
    """x: [B, L, d_model], positions: [B, L] -> ([B, L, d_model], new cache or None)."""
    batch, length, _ = x.shape
    x = x.astype(self.dtype)
    q_nope, q_rope, c_kv, k_rope, scale = self.project(x, positions)
    w_uk, w_uv = self.w_uk[...].astype(self.dtype), self.w_uv[...].astype(self.dtype)
    if cache is None:
      out = mla_attention(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, scale=scale, implementation="naive",
                          segment_ids=segment_ids, attention_implementation=self.implementation)
    else:
      cache = write_latent_cache(cache, c_kv, k_rope, positions)
      out = mla_attention(q_nope, q_rope, cache["c_kv"].astype(self.dtype), cache["k_rope"].astype(self.dtype),
                          w_uk, w_uv, scale=scale, implementation=self.decode, q_positions=positions,
                          kv_positions=cache["pos"], attention_implementation=self.implementation)
    out = out.reshape(batch, length, self.num_heads * self.v_head_dim)
    return out @ self.wo[...].astype(self.dtype), cache
