"""DSA under MLA (layer kind "S", DeepSeek-V3.2): the absorbed MLA form over the top-k keys."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lca import decode, model as model_lib
from lca.attention import dsa, mla

SIZES = dict(q_rank=24, kv_rank=16, rope_dim=8, head_dim=8, v_head_dim=12)


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _layer(stage=0, top_k=4, seed=0, **kwargs):
  return dsa.MLASparseAttention(32, 4, rngs=nnx.Rngs(seed), index_heads=2, index_dim=16,
                                index_rope_dim=8, top_k=top_k, stage=stage, fp8=False,
                                **(SIZES | kwargs))


def _pos(length, batch=2):
  return jnp.broadcast_to(jnp.arange(length), (batch, length))


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_large_k_equals_dense_mla_forward_and_gradients(implementation):
  """top_k >= every t+1: the absorbed sparse form over all visible latents is MLA itself."""
  layer = _layer(top_k=64, implementation=implementation)
  x, pos = _normal(1, (2, 11, 32)), _pos(11)
  dense = lambda m, x: mla.MLAttention.__call__(m, x, pos)[0]     # MLA's naive (training) form
  sparse = lambda m, x: m(x, pos)[0]
  ct = _normal(2, (2, 11, 32))

  def out_and_grads(f):
    """The output and the gradients of sum(output * ct), from one jitted program (CPU suite
    time: eager NNX calls compile op by op)."""
    def loss(m, x):
      out = f(m, x)
      return jnp.sum(out * ct), out
    return nnx.jit(nnx.grad(loss, argnums=(0, 1), has_aux=True))(layer, x)

  (g_sparse, gx_sparse), out_sparse = out_and_grads(sparse)
  (g_dense, gx_dense), out_dense = out_and_grads(dense)
  chex.assert_shape(out_sparse, (2, 11, 32))
  chex.assert_trees_all_close(out_sparse, out_dense, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(gx_sparse, gx_dense, atol=1e-5, rtol=1e-5)
  main = lambda g: {k: v for k, v in nnx.to_flat_state(g) if k[0] != "indexer"}
  chex.assert_trees_all_close(main(g_sparse), main(g_dense), atol=1e-5, rtol=1e-5)


def test_small_k_attends_only_the_selected_latents():
  """The layer's output equals the masked reference over the indexer's own top-k set."""
  layer = _layer(top_k=3)
  x, pos = _normal(3, (2, 9, 32)), _pos(9)

  @nnx.jit   # one compile, not one per eager op (CPU suite time); likewise below
  def masked_reference(layer, x):
    q_nope, q_rope, c_kv, k_rope, scale = layer.project(x, pos)
    q_idx, w = layer.indexer.queries(x, pos, layer.query_latent(x))
    idx = dsa.top_k_indices(dsa.indexer_scores_reference(q_idx, layer.indexer.keys(x, pos), w), 3)
    q = jnp.concatenate([jnp.einsum("bthd,chd->bthc", q_nope, layer.w_uk[...]), q_rope], -1)
    key = jnp.concatenate([c_kv, k_rope], -1)[:, :, None]
    o_latent = dsa.sparse_attention_reference(q, key, c_kv[:, :, None], idx, scale=scale)
    return jnp.einsum("bthc,chd->bthd", o_latent, layer.w_uv[...]).reshape(2, 9, -1) @ layer.wo[...]

  got = nnx.jit(lambda m, x: m(x, pos)[0])(layer, x)
  chex.assert_trees_all_close(got, masked_reference(layer, x), atol=1e-5, rtol=1e-5)
  dense = nnx.jit(lambda m, x: mla.MLAttention.__call__(m, x, pos)[0])(layer, x)
  assert float(jnp.abs(got - dense).max()) > 1e-3


@pytest.mark.parametrize("stage", [1, 2])
def test_kl_gradient_reaches_only_the_indexer(stage):
  layer = _layer(stage)
  x, pos = _normal(4, (2, 10, 32)), _pos(10)

  def kl_loss(layer, x):
    layer(x, pos)
    return dsa.indexer_kl(layer)

  grads, gx = nnx.jit(nnx.grad(kl_loss, argnums=(0, 1)))(layer, x)
  names = {".".join(map(str, p)) for p, v in nnx.to_flat_state(grads) if float(jnp.abs(v.get_value()).max()) > 0}
  assert {"indexer.wq", "indexer.wk", "indexer.ww"} <= names and all(n.startswith("indexer.") for n in names)
  np.testing.assert_array_equal(gx, 0.0)      # c_Q and x reach the indexer detached
  assert float(dsa.indexer_kl(layer)) > 0


def test_model_decode_equals_forward_and_cache_size():
  cfg = model_lib.ModelConfig(layer_pattern="S", num_layers=2, d_model=32, d_ff=64, num_heads=2,
                              num_kv_heads=2, head_dim=8, mla_q_rank=16, mla_kv_rank=16,
                              mla_rope_dim=8, dsa_index_heads=2, dsa_index_dim=16, dsa_top_k=4,
                              dsa_rope_dim=8, dsa_fp8=False)
  model = model_lib.Transformer(cfg, rngs=nnx.Rngs(1))
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 256, (2, 11)), jnp.int32)
  want = nnx.jit(lambda m, t: m(t))(model, tokens)
  got, _ = decode.stepwise_logits(model, tokens, 8, capacity=16)
  chex.assert_trees_all_close(got, want, atol=1e-4, rtol=1e-4)
  # per layer: the latent (16 + 8 values) and one bf16 indexer key (16 values)
  assert model.cache_bytes_per_token(16) == 2 * ((16 + 8) * 2 + 16 * 2)


def test_mla_parameters_load_by_path():
  """An "M" layer's parameters are the "S" layer's minus the indexer: a dense MLA run converts."""
  dense = mla.MLAttention(32, 4, rngs=nnx.Rngs(0), **SIZES)
  names = lambda m: {p for p, _ in nnx.to_flat_state(nnx.state(m, nnx.Param))}
  sparse_names = names(_layer())
  assert names(dense) < sparse_names
  assert {p[0] for p in sparse_names - names(dense)} == {"indexer"}


@pytest.mark.parametrize("field,value,match", [("dsa_top_k", 0, "top_k"), ("dsa_stage", 3, "stage"),
                                               ("mla_kv_rank", 0, "mla_kv_rank")])
def test_bad_configs_raise(field, value, match):
  with pytest.raises(ValueError, match=match):
    cfg = model_lib.ModelConfig(layer_pattern="S", d_model=32, num_heads=2, num_kv_heads=2, head_dim=8,
                                dsa_index_heads=2, dsa_index_dim=16, dsa_rope_dim=8, **{field: value})
    model_lib.Transformer(cfg, rngs=nnx.Rngs(0))
