"""Attention mechanisms, one file each, and the registry of layer kinds.

A model's `layer_pattern` is a string of one letter per layer (or comma-separated
kind names), repeated to `num_layers`. Kinds registered so far:

| letter | name   | layer |
|--------|--------|-------|
| G      | global | full causal attention (`full.Attention`), RoPE base `global_rope_base` |
| L      | local  | sliding window of `window` tokens (`local.LocalAttention`) |

ModernBERT's alternation (global every third layer) is `layer_pattern="GLL"`.
Each factory takes the model config (`lca.model.ModelConfig`) and `nnx.Rngs`.
"""

from lca.attention import full, local


def _global(cfg, rngs):
  return full.Attention(cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, rngs=rngs,
                        rope_base=cfg.global_rope_base or cfg.rope_base, qk_norm=cfg.qk_norm,
                        output_gate=cfg.output_gate, implementation=cfg.implementation,
                        dtype=cfg.compute_dtype)


def _local(cfg, rngs):
  return local.LocalAttention(cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                              rngs=rngs, window=cfg.window, rope_base=cfg.rope_base,
                              qk_norm=cfg.qk_norm, output_gate=cfg.output_gate,
                              implementation=cfg.implementation, dtype=cfg.compute_dtype)


# letter -> (name, factory(cfg, rngs) -> layer module)
LAYER_KINDS = {
    "G": ("global", _global),
    "L": ("local", _local),
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
