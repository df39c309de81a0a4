"""Multi-token prediction: shifted targets, shared embedding/head, the causal chain,
off at inference, and self-speculative decoding that reproduces greedy decoding."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lca import model as model_lib
from lca.layers import mtp


def materialize(make, seed=0):
  """The module `make()` builds, filled with numpy random values (no RNG compilations)."""
  graphdef, state = nnx.split(nnx.eval_shape(make))
  rng = np.random.default_rng(seed)
  def fill(v):
    if len(v.shape) == 1:
      return v.replace(jnp.asarray(1 + 0.1 * rng.standard_normal(v.shape), v.dtype))
    return v.replace(jnp.asarray(rng.standard_normal(v.shape) / np.sqrt(v.shape[-2]), v.dtype))
  return nnx.merge(graphdef, jax.tree.map(fill, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def _config(**kw):
  return model_lib.ModelConfig(**(dict(vocab_size=40, d_model=16, num_layers=1, num_heads=2, num_kv_heads=2,
                                       head_dim=8, d_ff=24, mtp_depth=2, mtp_weight=0.5) | kw))


def test_mtp_targets_shift():
  targets = jnp.arange(10, 16)[None]  # targets[i] = t_{i+1}
  weights = jnp.ones((1, 6))
  tok2, tgt2, w2 = mtp.mtp_targets(targets, weights, 2)
  np.testing.assert_array_equal(tok2[0, :4], [11, 12, 13, 14])  # t_{i+2} = targets[i+1]
  np.testing.assert_array_equal(tgt2[0, :4], [12, 13, 14, 15])  # t_{i+3} = targets[i+2]
  np.testing.assert_array_equal(w2[0], [1, 1, 1, 1, 0, 0])
  tok1, tgt1, w1 = mtp.mtp_targets(targets, weights, 1)
  np.testing.assert_array_equal(tok1, targets)
  np.testing.assert_array_equal(w1[0], [1, 1, 1, 1, 1, 0])
  seg = jnp.array([[0, 0, 0, 1, 1, 1]])
  _, _, ws = mtp.mtp_targets(targets, weights, 1, seg)
  np.testing.assert_array_equal(ws[0], [1, 1, 0, 1, 1, 0])  # no prediction across documents
  with pytest.raises(ValueError, match="k"):
    mtp.mtp_targets(targets, weights, 0)


def test_loss_uses_shifted_targets_and_shared_embedding_and_head():
  model = materialize(lambda: model_lib.Transformer(_config(), rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(1)
  seq = jnp.asarray(rng.integers(0, 32, (2, 11)), jnp.int32)  # t_0 .. t_10
  tokens, targets = seq[:, :8], seq[:, 1:9]

  @nnx.jit
  def both(model, tokens, targets, seq):
    loss, metrics = model.loss({"inputs": tokens, "targets": targets})
    # The chain written out with explicit slices: module k sees positions i < L - k.
    pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
    h, manual = model.trunk(tokens), []
    for k, module in enumerate(model.mtp, start=1):
      h = module(h, model.embed[...][seq[:, k:k + 8]], pos)  # Emb(t_{i+k}); the tail is masked
      logp = jax.nn.log_softmax(model.logits(module.out_norm(h))[:, :8 - k])
      nll = -jnp.take_along_axis(logp, seq[:, k + 1:9, None], axis=-1)  # t_{i+k+1}, i + k < 8
      manual.append(jnp.mean(nll))
    return loss, metrics, manual
  loss, metrics, manual = both(model, tokens, targets, seq)
  np.testing.assert_allclose([metrics["mtp_ce_1"], metrics["mtp_ce_2"]], manual, rtol=1e-5)
  np.testing.assert_allclose(loss, metrics["ce"] + 0.5 * (manual[0] + manual[1]) / 2, rtol=1e-5)
  # Sharing: no MTP parameter has the vocabulary dimension (embedding and head are the model's).
  for module in model.mtp:
    assert all(40 not in p.shape for p in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_off_at_inference_and_causal():
  with_mtp = materialize(lambda: model_lib.Transformer(_config(), rngs=nnx.Rngs(0)))
  without = materialize(lambda: model_lib.Transformer(_config(mtp_depth=0), rngs=nnx.Rngs(0)))
  nnx.update(without, nnx.state(with_mtp, nnx.Not(nnx.PathContains("mtp"))))
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 32, (1, 8)), jnp.int32)
  fwd = nnx.jit(lambda m, t: m(t))
  chex.assert_trees_all_close(fwd(with_mtp, tokens), fwd(without, tokens))
  # Causal chain: the MTP losses at position i never see tokens after i + k + 1.
  grad = nnx.jit(lambda m, t: jax.grad(lambda e: m.mtp[0](m.trunk(t), e, jnp.arange(8)[None])[0, 2].sum())(
      m.embed[...][t]))
  g = grad(with_mtp, tokens)
  assert float(jnp.abs(g[0, 3:]).max()) == 0.0 and float(jnp.abs(g[0, :3]).max()) > 0


def test_speculative_decoding_equals_greedy():
  model = materialize(lambda: model_lib.Transformer(_config(mtp_depth=1), rngs=nnx.Rngs(0)), seed=3)
  prompt = np.array([1, 5, 7, 2])
  greedy = mtp.greedy_generate(model, prompt, 7)
  spec, stats = mtp.speculative_generate(model, prompt, 7)
  np.testing.assert_array_equal(spec, greedy)
  assert 0.0 <= stats["acceptance_rate"] <= 1.0 and stats["drafts"] > 0
  assert 1.0 <= stats["tokens_per_forward"] <= 2.0
  with pytest.raises(ValueError, match="mtp_depth"):
    mtp.speculative_generate(materialize(lambda: model_lib.Transformer(_config(mtp_depth=0), rngs=nnx.Rngs(0))),
                             prompt, 3)


def test_bad_config_raises():
  with pytest.raises(ValueError, match="mtp_depth"):
    _config(mtp_depth=-1)
