"""Multi-token prediction (MTP; DeepSeek-V3, arXiv 2412.19437, section 2.2).

D sequential modules share the embedding and output head with the main model.
Module k (k = 1..D) at position i:

    h'_i^k = [RMSNorm(h_i^{k-1}) ; RMSNorm(Emb(t_{i+k}))] W_k       [2d -> d]
    h_i^k  = Block_k(h'^k)_i                                         (causal over i)
    P(t_{i+k+1}) = softmax(Head(RMSNorm_k(h_i^k)))

h^0 is the main model's last hidden state before its final norm. The loss adds
(lambda / D) sum_k CE_k. At inference the modules are dropped, or module 1 drafts
one token ahead for self-speculative decoding (`speculative_generate`).

Index bookkeeping with batch["targets"][i] = t_{i+1}: module k embeds
targets[i + k - 1] = t_{i+k} and predicts targets[i + k] = t_{i+k+1}; positions
i >= L - k (and pairs crossing a packed-document boundary) get weight 0.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lca.layers import norms


def shift_left(x, k: int, fill=0):
  """x [B, L, ...] -> x[:, k:] padded at the end with `fill` to length L."""
  if k == 0:
    return x
  pad = jnp.full((x.shape[0], min(k, x.shape[1]), *x.shape[2:]), fill, x.dtype)
  return jnp.concatenate([x[:, k:], pad], axis=1)


def mtp_targets(targets, weights, k: int, segment_ids=None):
  """Inputs and targets of MTP module k (k >= 1) from the next-token targets.

  targets, weights, segment_ids: [B, L]. Returns (embedded tokens t_{i+k} [B, L],
  targets t_{i+k+1} [B, L], weights [B, L]) with weight 0 where i + k >= L or where
  position i + k lies in another packed document than i.
  """
  if k < 1:
    raise ValueError(f"MTP depth index k must be >= 1, got k={k}")
  tokens_k = shift_left(targets, k - 1)
  targets_k = shift_left(targets, k)
  weights_k = shift_left(weights.astype(jnp.float32), k, 0.0)
  if segment_ids is not None:
    weights_k = weights_k * (shift_left(segment_ids, k, -1) == segment_ids)
  return tokens_k, targets_k, weights_k


class MTPModule(nnx.Module):
  """One MTP depth: norms, the [2d -> d] projection, its own transformer block, an output norm."""

  def __init__(self, d_model: int, block: nnx.Module, *, rngs: nnx.Rngs):
    self.h_norm = norms.RMSNorm(d_model)
    self.e_norm = norms.RMSNorm(d_model)
    self.proj = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (2 * d_model, d_model)))
    self.block = block
    self.out_norm = norms.RMSNorm(d_model)

  def __call__(self, h_prev, emb, positions, *, segment_ids=None, aux=None):
    """h_prev [B, L, d] (pre-norm), emb [B, L, d] = Emb(t_{i+k}) -> h^k [B, L, d] (pre-norm)."""
    x = jnp.concatenate([self.h_norm(h_prev), self.e_norm(emb.astype(h_prev.dtype))], axis=-1)
    x = x @ self.proj[...].astype(x.dtype)
    x, _ = self.block(x, positions, segment_ids=segment_ids, aux=aux)
    return x


def mtp_losses(modules, h, embed_fn, logits_fn, cross_entropy_fn, batch, positions, weights, *, aux=None):
  """Cross-entropies of the D MTP modules -> list of D scalars.

  modules: the MTPModules; h: main model's pre-norm hidden [B, L, d];
  embed_fn(tokens) -> [B, L, d] and logits_fn(h) -> [B, L, V]: the shared embedding and head.
  """
  losses = []
  segment_ids = batch.get("segment_ids")
  for k, module in enumerate(modules, start=1):
    tokens_k, targets_k, weights_k = mtp_targets(batch["targets"], weights, k, segment_ids)
    h = module(h, embed_fn(tokens_k), positions, segment_ids=segment_ids, aux=aux)
    losses.append(cross_entropy_fn(logits_fn(module.out_norm(h)), targets_k, weights_k))
  return losses


# ----------------------------------------------------------------------------- self-speculative decoding


def greedy_generate(model, prompt, num_tokens: int) -> np.ndarray:
  """Plain greedy decoding by full forwards (no cache): prompt [P] ints -> [P + num_tokens]."""
  buf, n = _buffer(prompt, num_tokens)
  main = _main_fn(model)
  while n < len(prompt) + num_tokens:
    _, pred = main(jnp.asarray(buf)[None])
    buf[n] = int(pred[0, n - 1])
    n += 1
  return buf[:n]


def speculative_generate(model, prompt, num_tokens: int):
  """Greedy self-speculative decoding with MTP module 1 as the drafter.

  Every iteration runs the main model once on the confirmed tokens plus the draft:
  it confirms the next token and, if the draft equals the main model's own choice,
  the one after it as well; then MTP module 1 drafts the token after the last
  confirmed one. The output equals `greedy_generate` exactly. Full forwards without
  cache: a demonstration of the acceptance rate, not a fast decoder.
  Returns (tokens [P + num_tokens], {"acceptance_rate", "tokens_per_forward", "drafts"}).
  """
  if not len(model.mtp):
    raise ValueError("speculative_generate needs a model with mtp_depth >= 1")
  buf, c = _buffer(prompt, num_tokens)
  end = len(prompt) + num_tokens
  main, draft_fn = _main_fn(model), _draft_fn(model)
  has_draft, drafts, accepted, forwards = False, 0, 0, 0
  while c < end:
    h, pred = main(jnp.asarray(buf)[None])
    pred = np.asarray(pred[0])
    forwards += 1
    if has_draft and pred[c - 1] == buf[c]:
      accepted += 1
      buf[c + 1] = pred[c]
      c += 2
    else:
      buf[c] = pred[c - 1]
      c += 1
    drafts += has_draft
    buf[c] = int(draft_fn(h, jnp.asarray(buf)[None])[0, c - 2])
    has_draft = True
  stats = {"acceptance_rate": accepted / max(drafts, 1), "tokens_per_forward": num_tokens / forwards,
           "drafts": drafts}
  return buf[:end], stats


def _buffer(prompt, num_tokens):
  prompt = np.asarray(prompt, np.int32)
  if prompt.ndim != 1 or not len(prompt):
    raise ValueError(f"prompt must be a non-empty 1-D token array, got shape {prompt.shape}")
  buf = np.zeros(len(prompt) + num_tokens + 2, np.int32)
  buf[:len(prompt)] = prompt
  return buf, len(prompt)


def _main_fn(model):
  @jax.jit
  def main(tokens):
    h = model.trunk(tokens)
    return h, jnp.argmax(model.logits(model.final_norm(h)), axis=-1)
  return main


def _draft_fn(model):
  @jax.jit
  def draft(h, tokens):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    module = model.mtp[0]
    h1 = module(h, model.embed_tokens(shift_left(tokens, 1)), positions)
    return jnp.argmax(model.logits(module.out_norm(h1)), axis=-1)
  return draft
