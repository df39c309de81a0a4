"""Attention mechanisms, one file each, and the registry of layer kinds.

A model's `layer_pattern` is a string of one letter per layer (or comma-separated
kind names), repeated to `num_layers`. Kinds registered so far:

| letter | name   | layer |
|--------|--------|-------|
| G      | global | full causal attention (`full.Attention`), RoPE base `global_rope_base` |
| L      | local  | sliding window of `window` tokens (`local.LocalAttention`) |
| D      | dsa    | DeepSeek Sparse Attention: lightning indexer + top-`dsa_top_k` tokens (`dsa.DSAttention`) |
| M      | mla    | Multi-head Latent Attention: cache d_c + d_R per token (`mla.MLAttention`, `mla_*` fields) |
| S      | mla_dsa | DeepSeek-V3.2: MLA whose absorbed form attends over DSA's top-k keys (`dsa.MLASparseAttention`, `mla_*` + `dsa_*` fields) |
| N      | nsa    | Native Sparse Attention: compression + top-n blocks + window, gated (`nsa.NSAttention`, `nsa_*` fields) |
| E      | gdn    | Gated DeltaNet (gated delta rule, Qwen3-Next layer; `gated_deltanet.GatedDeltaNet`, `gdn_*` fields) |
| R      | gla    | gated linear attention, per-head scalar decay (same layer with `delta=False`) |

ModernBERT's alternation (global every third layer) is `layer_pattern="GLL"`.
Qwen3-Next's hybrid (3 Gated DeltaNet : 1 gated attention) is `layer_pattern="EEEG"`
with `output_gate=True, qk_norm=True`.
Each factory takes the model config (`lca.model.ModelConfig`) and `nnx.Rngs`.
"""

from lca.attention import full, local


def _global(cfg, rngs):
  return full.Attention(cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, rngs=rngs,
                        rope_base=cfg.global_rope_base or cfg.rope_base, qk_norm=cfg.qk_norm,
                        output_gate=cfg.output_gate, implementation=cfg.implementation,
                        dtype=cfg.compute_dtype, rope_scaling=cfg.rope_scaling,
                        rope_scaling_factor=cfg.rope_scaling_factor,
                        rope_original_length=cfg.rope_original_length,
                        conv_size=cfg.attn_conv_size)


def _local(cfg, rngs):
  return local.LocalAttention(cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                              rngs=rngs, window=cfg.window, rope_base=cfg.rope_base,
                              qk_norm=cfg.qk_norm, output_gate=cfg.output_gate,
                              implementation=cfg.implementation, dtype=cfg.compute_dtype,
                              conv_size=cfg.attn_conv_size)


def _mla(cfg, rngs):
  from lca.attention import mla  # pylint: disable=g-import-not-at-top
  return mla.MLAttention(cfg.d_model, cfg.num_heads, rngs=rngs, **mla.layer_kwargs(cfg))


def _dsa(cfg, rngs):
  from lca.attention import dsa  # pylint: disable=g-import-not-at-top
  return dsa.DSAttention.from_model_config(cfg, rngs)


def _mla_dsa(cfg, rngs):
  from lca.attention import dsa  # pylint: disable=g-import-not-at-top
  return dsa.MLASparseAttention.from_model_config(cfg, rngs)


def _nsa(cfg, rngs):
  from lca.attention import nsa  # pylint: disable=g-import-not-at-top
  return nsa.NSAttention.from_model_config(cfg, rngs)


def _gated_deltanet(cfg, rngs, delta=True):
  from lca.attention import gated_deltanet  # pylint: disable=g-import-not-at-top
  return gated_deltanet.GatedDeltaNet(cfg.d_model, cfg.num_heads, cfg.gdn_head_dim or cfg.head_dim,
                                      rngs=rngs, delta=delta, conv_size=cfg.gdn_conv_size,
                                      chunk_size=cfg.gdn_chunk_size,
                                      implementation=cfg.gdn_implementation, dtype=cfg.compute_dtype)


# letter -> (name, factory(cfg, rngs) -> layer module)
LAYER_KINDS = {
    "G": ("global", _global),
    "L": ("local", _local),
    "D": ("dsa", _dsa),
    "M": ("mla", _mla),
    "S": ("mla_dsa", _mla_dsa),
    "N": ("nsa", _nsa),
    "E": ("gdn", _gated_deltanet),
    "R": ("gla", lambda cfg, rngs: _gated_deltanet(cfg, rngs, delta=False)),
}


def parse_layer_pattern(pattern: str, num_layers: int) -> list[str]:
  """"GLL" or "global,local,local", repeated to num_layers -> list of letters."""
  names = {name: letter for letter, (name, _) in LAYER_KINDS.items()}
  tokens = pattern.split(",") if "," in pattern else list(pattern)
  letters = []
  for token in (t.strip() for t in tokens):
    letter = token if token in LAYER_KINDS else names.get(token)
    if letter is None:
      known = ", ".join(f"{l} ({n})" for l, (n, _) in LAYER_KINDS.items())
      raise ValueError(f"unknown layer kind {token!r} in layer_pattern={pattern!r}; known: {known}")
    letters.append(letter)
  if not letters or num_layers <= 0:
    raise ValueError(f"need a non-empty layer_pattern and num_layers > 0, got {pattern!r}, {num_layers}")
  return [letters[i % len(letters)] for i in range(num_layers)]
