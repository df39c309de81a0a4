"""Linear attention, gated linear attention, the gated delta rule and hybrid stacks (CPU)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lca import decode, model as model_lib
from lca.attention import gated_deltanet, linear


def _inputs(seed, batch=2, length=77, heads=2, dk=16, dv=8, delta=True, state=True):
  ks = jax.random.split(jax.random.key(seed), 6)
  q = linear.l2_normalize(jax.random.normal(ks[0], (batch, length, heads, dk)))
  k = linear.l2_normalize(jax.random.normal(ks[1], (batch, length, heads, dk)))
  v = jax.random.normal(ks[2], (batch, length, heads, dv))
  beta = jax.nn.sigmoid(jax.random.normal(ks[3], (batch, length, heads))) if delta else None
  log_alpha = -jax.nn.softplus(jax.random.normal(ks[4], (batch, length, heads)) - 1.0)
  s0 = jax.random.normal(ks[5], (batch, heads, dk, dv)) if state else None
  return q, k, v, beta, log_alpha, s0


def _loss(fn, beta_is_none, aux=False):
  """Scalar of (o, state) with random weights, differentiable in all array inputs; with
  aux=True, (scalar, (o, state))."""
  def loss(q, k, v, beta, log_alpha, s0):
    o, s = fn(q, k, v, None if beta_is_none else beta, log_alpha, initial_state=s0)
    wo = jnp.cos(jnp.arange(o.size, dtype=jnp.float32)).reshape(o.shape)
    ws = jnp.sin(jnp.arange(s.size, dtype=jnp.float32)).reshape(s.shape)
    scalar = jnp.sum(o * wo) + jnp.sum(s * ws)
    return (scalar, (o, s)) if aux else scalar
  return loss


@pytest.mark.parametrize("delta,chunk_size,length", [(True, 16, 77)])
def test_chunked_matches_recurrent_reference(delta, chunk_size, length):
  q, k, v, beta, log_alpha, s0 = _inputs(0, length=length, delta=delta)
  beta_arg = jnp.ones(q.shape[:3]) if beta is None else beta
  args = (q, k, v, beta_arg, log_alpha, s0)
  argnums = (0, 1, 2, 4, 5) if beta is None else (0, 1, 2, 3, 4, 5)
  # one compile each: (o, state) come out as aux of the gradient's forward pass
  both = lambda fn: jax.jit(jax.grad(_loss(fn, beta is None, aux=True), argnums, has_aux=True))(*args)
  g_ref, (o_ref, s_ref) = both(linear.gated_delta_rule_reference)
  g, (o, s) = both(lambda *a, **kw: linear.gated_delta_rule_chunked(*a, chunk_size=chunk_size, **kw))
  chex.assert_shape(o, v.shape)
  chex.assert_shape(s, s0.shape)
  np.testing.assert_allclose(o, o_ref, atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(s, s_ref, atol=2e-5, rtol=1e-4)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(a, b, atol=5e-5 * float(jnp.max(jnp.abs(b))) + 1e-6, rtol=1e-3)


def test_unit_lower_inverse_is_stable_for_repeated_keys():
  # Identical unit keys with beta = 1: I + A is all-ones lower triangular, whose powers
  # explode (the Neumann product cancels catastrophically); the inverse is bidiagonal.
  a = jnp.tril(jnp.ones((64, 64)), -1)
  t = linear.unit_lower_inverse(a)
  want = jnp.eye(64) - jnp.eye(64, k=-1)
  np.testing.assert_allclose(t, want, atol=1e-5)
  rand = jnp.tril(jax.random.normal(jax.random.key(1), (3, 32, 32)), -1) * 0.3
  np.testing.assert_allclose(linear.unit_lower_inverse(rand) @ (jnp.eye(32) + rand),
                             jnp.broadcast_to(jnp.eye(32), rand.shape), atol=1e-4)


@pytest.mark.parametrize("feature_map,normalize", [("elu1", True)])
def test_linear_attention_chunked_matches_quadratic(feature_map, normalize):
  q, k, v, *_ = _inputs(2, length=45)
  kw = dict(feature_map=feature_map, normalize=normalize)
  want = jax.jit(lambda *a: linear.linear_attention_reference(*a, **kw))(q, k, v)
  got = jax.jit(lambda *a: linear.linear_attention(*a, **kw, chunk_size=16))(q, k, v)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
  if normalize:  # each output is a convex combination of values
    assert float(jnp.max(jnp.abs(got))) <= float(jnp.max(jnp.abs(v))) + 1e-4


def test_decode_step_matches_forward_and_state_is_fixed_size():
  q, k, v, beta, log_alpha, _ = _inputs(3, batch=1, length=20)
  o_gla, s_gla = jax.jit(linear.gated_linear_attention, static_argnames="chunk_size")(
      q, k, v, log_alpha, chunk_size=16)
  o_gla_ref, s_gla_ref = jax.jit(linear.gated_linear_attention_reference)(q, k, v, log_alpha)
  np.testing.assert_allclose(o_gla, o_gla_ref, atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(s_gla, s_gla_ref, atol=2e-5, rtol=1e-4)
  o_full, s_full = jax.jit(linear.gated_delta_rule_chunked, static_argnames="chunk_size")(
      q, k, v, beta, log_alpha, chunk_size=16)
  state = jnp.zeros((1, 2, 16, 8))
  outs = []
  step = jax.jit(linear.gated_delta_rule_step)
  for t in range(20):
    o_t, state = step(state, q[:, t], k[:, t], v[:, t], beta[:, t],
                                              log_alpha[:, t])
    chex.assert_shape(state, (1, 2, 16, 8))
    outs.append(o_t)
  np.testing.assert_allclose(jnp.stack(outs, 1), o_full, atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(state, s_full, atol=2e-5, rtol=1e-4)


def _layer(delta=True):
  return gated_deltanet.GatedDeltaNet(32, 2, 16, rngs=nnx.Rngs(0), delta=delta, chunk_size=16)


@nnx.jit
def _call(module, *args, **kwargs):
  return module(*args, **kwargs)


@pytest.mark.parametrize("delta", [False])  # delta=True: test_hybrid_model_decodes_equal_to_forward
def test_layer_prefill_then_steps_matches_forward(delta):
  layer = _layer(delta)
  x = jax.random.normal(jax.random.key(4), (2, 23, 32))
  pos = jnp.broadcast_to(jnp.arange(23), (2, 23))
  y_full, none = _call(layer, x, pos)
  assert none is None
  cache = layer.init_cache(2, capacity=23)
  y_pre, cache = _call(layer, x[:, :17], pos[:, :17], cache=cache)
  ys = [y_pre]
  for t in range(17, 23):
    y_t, cache = _call(layer, x[:, t:t + 1], pos[:, t:t + 1], cache=cache)
    ys.append(y_t)
  np.testing.assert_allclose(jnp.concatenate(ys, 1), y_full, atol=3e-5, rtol=1e-4)


def test_cache_size_is_independent_of_context():
  layer = _layer()
  small, large = layer.init_cache(1, 128), layer.init_cache(1, 1 << 20)
  assert jax.tree.map(jnp.shape, small) == jax.tree.map(jnp.shape, large)
  bytes_per_ctx = [layer.cache_bytes_per_token(c) * c for c in (256, 4096, 131072)]
  np.testing.assert_allclose(bytes_per_ctx, bytes_per_ctx[0])
  # after decoding different numbers of tokens the cache keeps its shapes
  x = jax.random.normal(jax.random.key(5), (1, 40, 32))
  _, c40 = _call(layer, x, jnp.arange(40)[None], cache=small)
  assert jax.tree.map(jnp.shape, c40) == jax.tree.map(jnp.shape, small)


def test_packed_documents_do_not_leak():
  layer = _layer()
  x = jax.random.normal(jax.random.key(6), (1, 30, 32))
  seg = jnp.array([[0] * 12 + [1] * 18])
  pos = jnp.concatenate([jnp.arange(12), jnp.arange(18)])[None]
  y_packed, _ = _call(layer, x, pos, segment_ids=seg)
  y_second, _ = _call(layer, x[:, 12:], pos[:, 12:])
  np.testing.assert_allclose(y_packed[:, 12:], y_second, atol=2e-5, rtol=1e-4)
  y_first, _ = _call(layer, x[:, :12], pos[:, :12])
  np.testing.assert_allclose(y_packed[:, :12], y_first, atol=2e-5, rtol=1e-4)


def test_hybrid_model_decodes_equal_to_forward():
  cfg = model_lib.ModelConfig(d_model=32, num_layers=4, num_heads=2, num_kv_heads=2, head_dim=16,
                              d_ff=64, layer_pattern="EEEG", output_gate=True, qk_norm=True,
                              gdn_chunk_size=16)
  model = model_lib.Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(7), (2, 21), 0, cfg.vocab_size)
  want = _call(model, tokens)
  got, _ = decode.stepwise_logits(model, tokens, 13)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  gdn_bytes = model.blocks[0].mixer.cache_bytes_per_token(1024) * 1024
  assert gdn_bytes == model.blocks[0].mixer.cache_bytes_per_token(4096) * 4096


def test_bad_arguments_raise_clear_errors():
  q, k, v, beta, log_alpha, s0 = _inputs(8, length=10)
  with pytest.raises(ValueError, match="chunk_size"):
    linear.gated_delta_rule_chunked(q, k, v, beta, log_alpha, chunk_size=48)
  with pytest.raises(ValueError, match="beta"):
    linear.gated_delta_rule(q, k, v, beta[:, :5], log_alpha)
  with pytest.raises(ValueError, match="initial_state"):
    linear.gated_delta_rule(q, k, v, beta, log_alpha, initial_state=s0[:, :1])
  with pytest.raises(ValueError, match="q and k"):
    linear.gated_delta_rule(q, k[..., :8], v, beta, log_alpha)
  with pytest.raises(ValueError, match="implementation"):
    linear.gated_delta_rule(q, k, v, beta, log_alpha, implementation="cuda")
  with pytest.raises(ValueError, match="feature_map"):
    linear.linear_attention(q, k, v, feature_map="softmax")
  with pytest.raises(ValueError, match="conv_size"):
    gated_deltanet.GatedDeltaNet(32, 2, 16, rngs=nnx.Rngs(0), conv_size=0)
  with pytest.raises(ValueError, match="chunk_size"):
    model_lib.Transformer(model_lib.ModelConfig(layer_pattern="E", gdn_chunk_size=48), rngs=nnx.Rngs(0))
