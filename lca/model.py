"""Decoder-only language model whose attention kind is chosen per layer.

    tokens -> embed -> [RMSNorm -> mixer -> + -> RMSNorm -> SwiGLU -> +] x N -> RMSNorm -> logits

The mixer of layer i is `lca.attention.LAYER_KINDS[pattern[i]]`; every mixer has
the same interface: `__call__(x, positions, cache=, segment_ids=) -> (y, cache)`,
`init_cache(batch, capacity)` and `cache_bytes_per_token(context)`.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lca import attention as attention_lib
from lca.layers import mlp, norms

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Every field of `config.model`; defaults are a tiny CPU model."""

  vocab_size: int = 256            # bytes
  d_model: int = 128
  num_layers: int = 3
  num_heads: int = 4
  num_kv_heads: int = 4            # GQA when smaller than num_heads, MQA at 1
  head_dim: int = 32
  d_ff: int = 384                  # SwiGLU hidden width
  layer_pattern: str = "G"         # letters of lca.attention.LAYER_KINDS, repeated
  window: int = 128                # local layers' sliding window
  rope_base: float = 10_000.0
  global_rope_base: float | None = None  # global layers' RoPE base (ModernBERT: 160k); None = rope_base
  qk_norm: bool = False            # RMSNorm on q and k per head (Qwen3)
  output_gate: bool = False        # sigmoid output gate per head (Qwen3-Next gated attention)
  tie_embeddings: bool = True
  dtype: str = "float32"           # compute dtype; parameters stay float32
  implementation: str | None = None  # attention implementation; None = fastest available

  def __post_init__(self):
    if self.dtype not in _DTYPES:
      raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"model.num_heads={self.num_heads} must be a multiple of "
                       f"model.num_kv_heads={self.num_kv_heads}")
    if self.window <= 0:
      raise ValueError(f"model.window must be positive, got {self.window}")
    attention_lib.parse_layer_pattern(self.layer_pattern, self.num_layers)

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def layer_kinds(self) -> list[str]:
    return attention_lib.parse_layer_pattern(self.layer_pattern, self.num_layers)

  @classmethod
  def from_config(cls, config) -> "ModelConfig":
    """From an ml_collections.ConfigDict (or dict); unknown fields raise ValueError."""
    fields = dict(config)
    unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"unknown config.model fields: {sorted(unknown)}")
    return cls(**fields)


class Block(nnx.Module):
  """Pre-norm residual block: x + mixer(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: ModelConfig, kind: str, *, rngs: nnx.Rngs):
    self.kind = kind
    self.mixer_norm = norms.RMSNorm(cfg.d_model)
    self.mixer = attention_lib.LAYER_KINDS[kind][1](cfg, rngs)
    self.mlp_norm = norms.RMSNorm(cfg.d_model)
    self.mlp = mlp.SwiGLU(cfg.d_model, cfg.d_ff, rngs=rngs, dtype=cfg.compute_dtype)

  def __call__(self, x, positions, *, cache=None, segment_ids=None):
    y, cache = self.mixer(self.mixer_norm(x), positions, cache=cache, segment_ids=segment_ids)
    x = x + y.astype(x.dtype)
    x = x + self.mlp(self.mlp_norm(x)).astype(x.dtype)
    return x, cache


class Transformer(nnx.Module):
  """The LM. `__call__(tokens, positions)` -> logits [B, L, vocab] in float32."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Param(nnx.initializers.normal(1.0)(rngs.params(), (cfg.vocab_size, cfg.d_model)))
    self.blocks = nnx.List([Block(cfg, kind, rngs=rngs) for kind in cfg.layer_kinds])
    self.final_norm = norms.RMSNorm(cfg.d_model)
    self.head = None if cfg.tie_embeddings else nnx.Param(
        nnx.initializers.lecun_normal()(rngs.params(), (cfg.d_model, cfg.vocab_size)))

  def hidden(self, tokens, positions=None, *, caches=None, segment_ids=None):
    """tokens: [B, L] int -> (final hidden states [B, L, d_model], new caches or None)."""
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    x = self.embed[...][tokens].astype(self.cfg.compute_dtype)
    new_caches = [] if caches is not None else None
    for i, block in enumerate(self.blocks):
      x, cache = block(x, positions, cache=None if caches is None else caches[i],
                       segment_ids=segment_ids)
      if caches is not None:
        new_caches.append(cache)
    return self.final_norm(x), new_caches

  def logits(self, h):
    head = self.embed[...].T if self.head is None else self.head[...]
    return jnp.einsum("bld,dv->blv", h, head.astype(h.dtype), preferred_element_type=jnp.float32)

  def __call__(self, tokens, positions=None, *, caches=None, segment_ids=None):
    """-> logits [B, L, vocab] float32 (and the new caches when `caches` is given)."""
    h, new_caches = self.hidden(tokens, positions, caches=caches, segment_ids=segment_ids)
    logits = self.logits(h)
    return logits if caches is None else (logits, new_caches)

  def init_caches(self, batch: int, capacity: int, dtype=None) -> list:
    """One cache per layer for up to `capacity` tokens (local layers keep a window)."""
    return [block.mixer.init_cache(batch, capacity, dtype) for block in self.blocks]

  def cache_bytes_per_token(self, context: int, bytes_per_value: int = 2) -> float:
    """Decode-cache bytes per token at this context, summed over layers (bf16 by default)."""
    return sum(b.mixer.cache_bytes_per_token(context, bytes_per_value) for b in self.blocks)


def num_params(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
