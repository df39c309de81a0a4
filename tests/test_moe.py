"""DeepSeekMoE: routing, ragged dispatch against the dense reference, the aux-loss-free
bias (routes without entering the gates, balances load, gets no gradient), model wiring."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from ml_collections import config_dict

from lca import model as model_lib
from lca import train as train_lib
from lca.layers import mlp, moe

N, D, F, E, K = 13, 6, 5, 7, 3


def materialize(make, seed=0):
  """The module `make()` builds, filled with numpy random values (no RNG compilations);
  routing biases start at zero."""
  graphdef, state = nnx.split(nnx.eval_shape(make))
  rng = np.random.default_rng(seed)
  def fill(v):
    if isinstance(v, moe.RoutingBias):
      return v.replace(jnp.zeros(v.shape, v.dtype))
    if len(v.shape) == 1:
      return v.replace(jnp.asarray(1 + 0.1 * rng.standard_normal(v.shape), v.dtype))
    return v.replace(jnp.asarray(rng.standard_normal(v.shape) / np.sqrt(v.shape[-2]), v.dtype))
  return nnx.merge(graphdef, jax.tree.map(fill, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def _normal(rng, *shape, scale=1.0):
  return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)


def test_route_picks_k_distinct_experts_and_normalized_gates():
  rng = np.random.default_rng(0)
  x, w, bias = _normal(rng, N, D), _normal(rng, D, E), _normal(rng, E, scale=0.1)
  gates, experts, scores = jax.jit(lambda *a: moe.route(*a, top_k=K, route_scale=2.5))(x, w, bias)
  chex.assert_shape([gates, experts, scores], [(N, K), (N, K), (N, E)])
  assert all(len(set(row)) == K for row in np.asarray(experts))
  np.testing.assert_allclose(gates.sum(-1), 2.5, rtol=1e-5)
  # top-K of score + bias
  top = np.argsort(-(np.asarray(scores) + np.asarray(bias)), axis=-1)[:, :K]
  np.testing.assert_array_equal(np.sort(experts, -1), np.sort(top, -1))


def test_bias_changes_routing_but_not_gate_values():
  rng = np.random.default_rng(1)
  x, w = _normal(rng, N, D), _normal(rng, D, E)
  bias = jnp.zeros(E).at[4].set(10.0)  # expert 4 always chosen
  route = jax.jit(lambda b: moe.route(x, w, b, top_k=K))
  (g0, e0, s0), (g1, e1, s1) = route(jnp.zeros(E)), route(bias)
  assert bool(jnp.all(jnp.any(e1 == 4, axis=-1)))
  assert not bool(jnp.all(e0 == e1))
  chex.assert_trees_all_close(s0, s1)
  chosen = jnp.take_along_axis(s1, e1, axis=-1)  # gate = s / sum of chosen s: no bias inside
  chex.assert_trees_all_close(g1, chosen / chosen.sum(-1, keepdims=True), atol=1e-6)


def test_group_limited_routing():
  rng = np.random.default_rng(2)
  x, w = _normal(rng, 40, D), _normal(rng, D, 8)
  _, experts, _ = jax.jit(lambda x, w: moe.route(x, w, jnp.zeros(8), top_k=3, num_groups=4,
                                                  top_groups=2))(x, w)
  groups_used = [len(set(row // 2)) for row in np.asarray(experts)]
  assert max(groups_used) <= 2


@pytest.mark.parametrize("impl", ["blocked", "ragged"])
def test_dispatch_matches_dense_reference_forward_and_grads(impl):
  rng = np.random.default_rng(3)
  x, wr = _normal(rng, N, D), _normal(rng, D, E)
  wg, wu, wd = _normal(rng, E, D, F), _normal(rng, E, D, F), _normal(rng, E, F, D)
  gates, experts, _ = jax.jit(lambda x, w: moe.route(x, w, jnp.zeros(E), top_k=K))(x, wr)
  def loss(impl):
    f = lambda x, g, a, b, c: jnp.sum(jnp.sin(moe.moe_experts(x, g, experts, a, b, c, implementation=impl)))
    return jax.jit(jax.value_and_grad(f, argnums=range(5)))(x, gates, wg, wu, wd)
  (l_r, g_r), (l_d, g_d) = loss(impl), loss("dense")
  np.testing.assert_allclose(l_r, l_d, rtol=1e-5)
  chex.assert_trees_all_close(g_r, g_d, atol=1e-4, rtol=1e-4)


def _layer(**kw):
  kw = dict(num_experts=E, top_k=K, d_ff=F, num_shared=2, bias_speed=0.01) | kw
  return materialize(lambda: moe.MoE(D, rngs=nnx.Rngs(0), **kw))


def test_blocked_handles_skewed_routing_and_small_blocks():
  rng = np.random.default_rng(7)
  x, w = _normal(rng, 20, D), _normal(rng, E, D, F)
  experts = jnp.asarray(np.stack([np.zeros(20), rng.integers(1, E, 20)], 1), jnp.int32)  # all use 0
  gates = _normal(rng, 20, 2)
  out = jax.jit(lambda *a: moe.experts_blocked(*a, block_rows=4))(x, gates, experts, w, w, w.swapaxes(1, 2))
  ref = jax.jit(moe.experts_reference)(x, gates, experts, w, w, w.swapaxes(1, 2))
  chex.assert_trees_all_close(out, ref, atol=1e-5)


def test_layer_is_shared_plus_k_routed_experts():
  layer = _layer()
  x = _normal(np.random.default_rng(4), 2, 5, D)
  @nnx.jit
  def both(layer, x):
    flat = x.reshape(-1, D)
    gates, experts, _ = moe.route(flat, layer.router[...], layer.bias[...], top_k=K)
    routed = moe.experts_reference(flat, gates, experts, layer.w_gate[...], layer.w_up[...],
                                   layer.w_down[...])
    return layer(x), layer.shared(x) + routed.reshape(x.shape)
  (y, stats), expected = both(layer, x)
  assert layer.shared.w_gate.shape == (D, 2 * F)  # two shared experts
  chex.assert_trees_all_close(y, expected, atol=1e-5)
  assert float(stats["counts"].sum()) == 10 * K
  np.testing.assert_array_equal(layer.bias[...], 0.0)  # not training: no bias step


def test_bias_update_moves_load_towards_balance():
  layer = _layer(bias_speed=0.02)
  layer.router[...] = layer.router[...].at[:, 0].add(3.0)  # skew: expert 0 favoured
  x = _normal(np.random.default_rng(5), 4, 32, D) + 1.0
  step = nnx.jit(lambda m, x: m(x, train=True)[1]["max_violation"])
  first = float(step(layer, x))
  for _ in range(60):
    last = float(step(layer, x))
  assert first > 0.5 and last < 0.5 * first, (first, last)
  assert float(layer.bias[0]) < 0  # the overloaded expert's bias went down


def test_sequence_balance_loss_is_one_when_uniform():
  scores = jnp.full((2, 4, 4), 0.5)
  experts = jnp.array([[[0, 1], [2, 3], [0, 1], [2, 3]]] * 2)
  assert float(moe.sequence_balance_loss(scores, experts, 2)) == pytest.approx(1.0)
  skewed = jnp.array([[[0, 1]] * 4] * 2)
  skewed_scores = jnp.broadcast_to(jnp.array([0.9, 0.9, 0.1, 0.1]), (2, 4, 4))
  # f = (2, 2, 0, 0), P = (0.45, 0.45, 0.05, 0.05)
  assert float(moe.sequence_balance_loss(skewed_scores, skewed, 2)) == pytest.approx(1.8)


def _moe_config(**kw):
  return model_lib.ModelConfig(**(dict(d_model=12, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=6,
                                       d_ff=16, moe_num_experts=4, moe_top_k=2, moe_d_ff=8,
                                       moe_bias_speed=0.01, moe_first_dense_layers=1) | kw))


def test_train_step_moves_bias_and_never_differentiates_it():
  cfg = _moe_config()
  model = materialize(lambda: model_lib.Transformer(cfg, rngs=nnx.Rngs(0)))
  assert isinstance(model.blocks[0].mlp, mlp.SwiGLU) and isinstance(model.blocks[1].mlp, moe.MoE)
  tc = config_dict.ConfigDict(dict(num_steps=10, warmup_steps=1, learning_rate=1e-3, min_lr_ratio=0.1,
                                   weight_decay=0.0, b1=0.9, b2=0.95, clip_norm=1.0))
  tx, _ = train_lib.make_optimizer(tc)
  graphdef, state = train_lib.init_state(model, tx)
  assert not any(isinstance(v, moe.RoutingBias) for v in jax.tree.leaves(
      state["params"], is_leaf=lambda x: isinstance(x, nnx.Variable)))
  tokens = jnp.asarray(np.random.default_rng(6).integers(0, 256, (2, 9)), jnp.int32)
  batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, 1)}
  new_state, metrics = train_lib.make_train_step(graphdef, tx)(state, batch)
  before = nnx.merge(graphdef, state["params"], state["rest"]).blocks[1].mlp.bias[...]
  after = nnx.merge(graphdef, new_state["params"], new_state["rest"]).blocks[1].mlp.bias[...]
  np.testing.assert_allclose(np.abs(after - before), 0.01, rtol=1e-5)  # one sign step each
  assert {"moe_max_violation", "moe_balance_loss"} <= set(metrics)

  def loss_of_rest(rest):  # the loss as a function of the non-Param state, bias included
    return nnx.merge(graphdef, state["params"], rest).loss(batch)[0]
  grads = jax.jit(jax.grad(loss_of_rest))(state["rest"])
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("kw, match", [
    (dict(moe_top_k=5), "moe_top_k"),
    (dict(moe_num_groups=3), "moe_num_groups"),
    (dict(moe_num_groups=2, moe_top_groups=3), "moe_top_groups"),
    (dict(moe_num_groups=2, moe_top_groups=1, moe_top_k=3), "moe_top_k"),
    (dict(moe_bias_speed=-1.0), "moe_bias_speed"),
    (dict(moe_implementation="megablocks"), "moe_implementation"),
])
def test_bad_configs_raise(kw, match):
  with pytest.raises(ValueError, match=match):
    _moe_config(**kw)
