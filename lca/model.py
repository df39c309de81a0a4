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
from lca.attention import dsa, mla
from lca.layers import mlp, moe, mtp, norms, rope

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
  attn_conv_size: int = 0          # G/L layers: x + short causal conv(x) first (Canon-A); 0 = off
  tie_embeddings: bool = True
  dtype: str = "float32"           # compute dtype; parameters stay float32
  implementation: str | None = None  # attention implementation; None = fastest available
  # RoPE scaling for context extension (lca.layers.rope.scaled_rope_frequencies); used by
  # global attention and MLA (local layers only see relative distances < window).
  rope_scaling: str = "none"        # "none" | "pi" | "ntk" | "yarn"
  rope_scaling_factor: float = 1.0  # s = L_new / L_train
  rope_original_length: int = 0     # L_train (YaRN's ramp needs it)
  # MLA (lca.attention.mla, layer letter "M"); V3: 1536, 512, 64, 128, 128.
  mla_q_rank: int = 96              # d_c' of the query compression (0: no q compression)
  mla_kv_rank: int = 64             # d_c, the cached KV latent
  mla_rope_dim: int = 16            # d_h^R, the decoupled RoPE key/query dims
  mla_head_dim: int = 0             # d_h of the compressed q/k part (0: head_dim)
  mla_v_head_dim: int = 0           # value head dim (0: head_dim)
  mla_decode: str = "absorbed"      # decode form: "absorbed" or "naive" (same outputs)
  # DeepSeekMoE (lca.layers.moe); V3: 256 experts, 8 active, 1 shared, 8 groups / 4.
  moe_num_experts: int = 0          # routed experts; 0 = dense SwiGLU everywhere
  moe_top_k: int = 2                # routed experts per token
  moe_num_shared: int = 1           # shared experts (always active)
  moe_d_ff: int = 96                # each expert's SwiGLU hidden width
  moe_num_groups: int = 1           # node-limited routing: expert groups...
  moe_top_groups: int = 1           # ...of which a token uses its best moe_top_groups
  moe_route_scale: float = 1.0      # multiplies the normalized gates (V3: 2.5)
  moe_bias_speed: float = 1e-3      # gamma of the aux-loss-free bias update (0 = off)
  moe_balance_weight: float = 1e-4  # alpha of the sequence-wise balance loss (0 = off)
  moe_first_dense_layers: int = 1   # layers < this keep the dense SwiGLU (V3: 3)
  moe_implementation: str | None = None  # "blocked" | "ragged" | "dense"; None = blocked
  # Gated DeltaNet ("E") / gated linear attention ("R") layers (lca.attention.gated_deltanet).
  gdn_head_dim: int | None = None   # q/k/v head dim of E/R layers; None = head_dim
  gdn_conv_size: int = 4            # short causal depthwise conv on q/k/v (Qwen3-Next: 4)
  gdn_chunk_size: int = 64          # chunk of the chunkwise-parallel form (power of two >= 16)
  gdn_implementation: str | None = None  # "pallas" | "chunked" | "reference"; None = fastest
  # Multi-token prediction (lca.layers.mtp); V3: depth 1, weight 0.3 then 0.1.
  mtp_depth: int = 0                # D sequential MTP modules; 0 = off
  mtp_weight: float = 0.3           # lambda: loss += lambda / D * sum_k CE_k
  # DSA (lca.attention.dsa, layer letter "D"); V3.2-Exp: 64 heads x 128, top-k 2048, RoPE 64.
  dsa_index_heads: int = 64         # H_I lightning-indexer heads
  dsa_index_dim: int = 128          # d_I per indexer head (one shared key of d_I per token)
  dsa_top_k: int = 2048             # tokens attended per query (capped by t + 1)
  dsa_rope_dim: int = 64            # indexer dims rotated by RoPE (the first ones)
  dsa_fp8: bool | None = None       # FP8 indexer for selection; None = on GPU only
  dsa_stage: int = 0                # 0 sparse; 1 dense warm-up + indexer KL; 2 sparse + KL
  dsa_chunk: int = 0                # queries per indexer chunk ([chunk, S] scores); 0 = all
  dsa_kl_weight: float = 1.0        # stages 1, 2: loss += weight * sum over D layers of the indexer KL
  # NSA (lca.attention.nsa, layer letter "N"); paper: l=32, d=16, l'=64, n=16, w=512.
  nsa_block_len: int = 16           # l: compression block length (multiple of nsa_block_stride)
  nsa_block_stride: int = 8         # d: compression stride
  nsa_select_block: int = 32        # l': selection block length (multiple of nsa_block_stride)
  nsa_num_selected: int = 4         # n: selected blocks per query and group, forced ones included
  nsa_window: int = 64              # w: sliding-window branch
  nsa_num_initial: int = 1          # always-selected initial blocks
  nsa_num_local: int = 2            # always-selected blocks ending at the query
  nsa_compress_hidden: int = 0      # φ's hidden width; 0 = 2 * head_dim
  nsa_gate_hidden: int = 32         # hidden width of the gate MLP
  # the Pallas kernels' launch shapes and paths: comma-separated field=value of
  # pallas_kernels.nsa.Tuning, e.g. "sel_dq_from_ds=True" ("" = its defaults)
  nsa_kernel_tuning: str = ""

  def __post_init__(self):
    if self.dtype not in _DTYPES:
      raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"model.num_heads={self.num_heads} must be a multiple of "
                       f"model.num_kv_heads={self.num_kv_heads}")
    if self.window <= 0:
      raise ValueError(f"model.window must be positive, got {self.window}")
    attention_lib.parse_layer_pattern(self.layer_pattern, self.num_layers)
    _check_deepseek_fields(self)

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

  def __init__(self, cfg: ModelConfig, kind: str, *, rngs: nnx.Rngs, layer_index: int = 0):
    self.kind = kind
    self.mixer_norm = norms.RMSNorm(cfg.d_model)
    self.mixer = attention_lib.LAYER_KINDS[kind][1](cfg, rngs)
    self.mlp_norm = norms.RMSNorm(cfg.d_model)
    if cfg.moe_num_experts > 0 and layer_index >= cfg.moe_first_dense_layers:
      self.mlp = moe.MoE(cfg.d_model, num_experts=cfg.moe_num_experts, top_k=cfg.moe_top_k,
                         d_ff=cfg.moe_d_ff, num_shared=cfg.moe_num_shared,
                         num_groups=cfg.moe_num_groups, top_groups=cfg.moe_top_groups,
                         route_scale=cfg.moe_route_scale, bias_speed=cfg.moe_bias_speed,
                         implementation=cfg.moe_implementation, rngs=rngs, dtype=cfg.compute_dtype)
    else:
      self.mlp = mlp.SwiGLU(cfg.d_model, cfg.d_ff, rngs=rngs, dtype=cfg.compute_dtype)

  def __call__(self, x, positions, *, cache=None, segment_ids=None, aux=None):
    """aux: a list during training (`Transformer.loss`): MoE layers append their stats
    and take their routing-bias step; None otherwise."""
    y, cache = self.mixer(self.mixer_norm(x), positions, cache=cache, segment_ids=segment_ids)
    x = x + y.astype(x.dtype)
    if isinstance(self.mlp, moe.MoE):
      y, stats = self.mlp(self.mlp_norm(x), train=aux is not None)
      if aux is not None:
        aux.append(stats)
    else:
      y = self.mlp(self.mlp_norm(x))
    x = x + y.astype(x.dtype)
    return x, cache


class Transformer(nnx.Module):
  """The LM. `__call__(tokens, positions)` -> logits [B, L, vocab] in float32."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Param(nnx.initializers.normal(cfg.d_model ** -0.5)(rngs.params(), (cfg.vocab_size, cfg.d_model)))
    self.blocks = nnx.List([Block(cfg, kind, rngs=rngs, layer_index=i)
                            for i, kind in enumerate(cfg.layer_kinds)])
    # MTP modules (DeepSeek-V3): each has its own block of the last layer's kind.
    self.mtp = nnx.List([mtp.MTPModule(cfg.d_model, Block(cfg, cfg.layer_kinds[-1], rngs=rngs,
                                                          layer_index=cfg.num_layers), rngs=rngs)
                         for _ in range(cfg.mtp_depth)])
    self.final_norm = norms.RMSNorm(cfg.d_model)
    self.head = None if cfg.tie_embeddings else nnx.Param(
        nnx.initializers.lecun_normal()(rngs.params(), (cfg.d_model, cfg.vocab_size)))

  def hidden(self, tokens, positions=None, *, caches=None, segment_ids=None):
    """tokens: [B, L] int -> (final hidden states [B, L, d_model], new caches or None)."""
    x, new_caches = self.trunk(tokens, positions, caches=caches, segment_ids=segment_ids,
                               return_caches=True)
    return self.final_norm(x), new_caches

  def embed_tokens(self, tokens):
    return self.embed[...][tokens].astype(self.cfg.compute_dtype)

  def trunk(self, tokens, positions=None, *, caches=None, segment_ids=None, aux=None,
            return_caches=False):
    """The blocks without the final norm -> x [B, L, d_model] (and new caches or None).

    aux: a list that MoE layers append their stats to (training; see `Block`)."""
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    x = self.embed_tokens(tokens)
    new_caches = [] if caches is not None else None
    for i, block in enumerate(self.blocks):
      x, cache = block(x, positions, cache=None if caches is None else caches[i],
                       segment_ids=segment_ids, aux=aux)
      if caches is not None:
        new_caches.append(cache)
    return (x, new_caches) if return_caches else x

  def logits(self, h):
    head = self.embed[...].T if self.head is None else self.head[...]
    return jnp.einsum("bld,dv->blv", h, head.astype(h.dtype), preferred_element_type=jnp.float32)

  def __call__(self, tokens, positions=None, *, caches=None, segment_ids=None):
    """-> logits [B, L, vocab] float32 (and the new caches when `caches` is given)."""
    h, new_caches = self.hidden(tokens, positions, caches=caches, segment_ids=segment_ids)
    logits = self.logits(h)
    return logits if caches is None else (logits, new_caches)

  def loss(self, batch: dict):
    """Next-token cross-entropy -> (scalar loss, metrics dict of scalars).

    batch: "inputs", "targets" [B, L] int; optional "positions", "segment_ids" [B, L]
    and "weights" [B, L] float (0 drops a target, e.g. padding). Mechanisms that add
    terms (MoE balance, MTP, the DSA indexer KL) add them here, so the train step stays generic.
    """
    aux = []  # MoE stats; MoE layers also take their routing-bias step in this call
    tokens, positions = batch["inputs"], batch.get("positions")
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    x = self.trunk(tokens, positions, segment_ids=batch.get("segment_ids"), aux=aux)
    logits = self.logits(self.final_norm(x))
    weights = batch.get("weights")
    if weights is None:
      weights = jnp.ones(batch["targets"].shape, jnp.float32)
    ce = cross_entropy(logits, batch["targets"], weights)
    loss, metrics = ce, {"ce": ce}
    if len(self.mtp):
      mtp_ces = mtp.mtp_losses(self.mtp, x, self.embed_tokens, self.logits, cross_entropy, batch,
                               positions, weights, aux=aux)
      loss = loss + self.cfg.mtp_weight * sum(mtp_ces) / len(mtp_ces)
      metrics.update({f"mtp_ce_{k + 1}": c for k, c in enumerate(mtp_ces)})
    if aux:
      balance = sum(s["balance_loss"] for s in aux)
      loss = loss + self.cfg.moe_balance_weight * balance
      metrics["moe_balance_loss"] = balance / len(aux)
      metrics["moe_max_violation"] = sum(s["max_violation"] for s in aux) / len(aux)
      metrics["moe_max_violation_worst_layer"] = jnp.max(jnp.stack([s["max_violation"] for s in aux]))
    kl_layers = [m for _, m in nnx.iter_graph(self) if isinstance(m, dsa.DSA_LAYERS) and m.stage > 0]
    if kl_layers:  # DSA stages 1, 2: the indexer KL (it only reaches the indexer's parameters)
      kl = sum(m.indexer_kl[...] for m in kl_layers)
      loss = loss + self.cfg.dsa_kl_weight * kl
      metrics["indexer_kl"] = kl
    metrics["loss"] = loss
    return loss, metrics

  def init_caches(self, batch: int, capacity: int, dtype=None) -> list:
    """One cache per layer for up to `capacity` tokens (local layers keep a window)."""
    return [block.mixer.init_cache(batch, capacity, dtype) for block in self.blocks]

  def cache_bytes_per_token(self, context: int, bytes_per_value: int = 2) -> float:
    """Decode-cache bytes per token at this context, summed over layers (bf16 by default)."""
    return sum(b.mixer.cache_bytes_per_token(context, bytes_per_value) for b in self.blocks)


def cross_entropy(logits, targets, weights) -> jax.Array:
  """Weighted mean next-token cross-entropy in nats. logits [B, L, V] f32, targets/weights [B, L]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _check_deepseek_fields(cfg: ModelConfig) -> None:
  """Clear errors for bad rope_scaling_*, mla_*, moe_*, mtp_* fields."""
  rope.scaled_rope_frequencies(2 * max(cfg.mla_rope_dim // 2, 1), cfg.rope_base, cfg.rope_scaling,
                               cfg.rope_scaling_factor, cfg.rope_original_length or None)
  if "M" in cfg.layer_kinds or "S" in cfg.layer_kinds:
    mla.check_config(cfg)
  moe.check_config(cfg)
  if cfg.mtp_depth < 0 or cfg.mtp_weight < 0:
    raise ValueError(f"model.mtp_depth and model.mtp_weight must be >= 0, got "
                     f"mtp_depth={cfg.mtp_depth}, mtp_weight={cfg.mtp_weight}")


def num_params(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
