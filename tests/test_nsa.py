"""NSA (lca.attention.nsa): reference vs XLA fast path, selection rules, causality,
gradients, decode == forward, config validation. Kernels: tests/test_nsa_kernels.py."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lca import model as model_lib
from lca.attention import nsa

SIZES = nsa.NSASizes(block_len=8, block_stride=4, select_block=16, num_selected=4, window=16)


def _inputs(key, batch, length, heads, kv_heads, dim, sizes=SIZES):
  ks = jax.random.split(key, 6)
  q = jax.random.normal(ks[0], (batch, length, heads, dim))
  k = jax.random.normal(ks[1], (batch, length, kv_heads, dim))
  v = jax.random.normal(ks[2], (batch, length, kv_heads, dim))
  kw = dict(block_len=sizes.block_len, block_stride=sizes.block_stride)
  pk = nsa.init_compress_params(ks[3], sizes.block_len, dim, 2 * dim)
  pv = nsa.init_compress_params(ks[4], sizes.block_len, dim, 2 * dim)
  gates = jax.nn.sigmoid(jax.random.normal(ks[5], (batch, length, heads, 3)))
  return q, k, v, nsa.compress(k, pk, **kw), nsa.compress(v, pv, **kw), gates


@pytest.mark.parametrize("heads,kv_heads,length", [(6, 2, 75)])
def test_xla_matches_reference_forward_and_grads(heads, kv_heads, length):
  args = _inputs(jax.random.key(length), 2, length, heads, kv_heads, 8)
  w = jax.random.normal(jax.random.key(1), (2, length, heads, 8))

  def output_and_grads(f):
    """One compile each: the output (as aux) and the gradients of a weighted sum of it."""
    def loss(*a):
      out = f(*a)
      return jnp.sum(out * w), out
    return jax.jit(jax.grad(loss, argnums=tuple(range(6)), has_aux=True))(*args)

  g_ref, out_ref = output_and_grads(lambda *a: nsa.nsa_reference(*a, sizes=SIZES))
  g, out = output_and_grads(lambda *a: nsa.nsa(*a, sizes=SIZES, implementation="xla"))
  chex.assert_shape(out, (2, length, heads, 8))
  np.testing.assert_allclose(out, out_ref, atol=2e-5, rtol=2e-5)
  for a, b in zip(g, g_ref):
    assert float(jnp.abs(b).max()) > 0
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_overlap_matrix_is_the_spec_formula():
  l, d, lp = 32, 16, 64
  nc, ns = 30, 8
  m = nsa.overlap_matrix(nc, ns, l, d, lp)
  p = np.random.default_rng(0).random(nc)
  by_formula = [sum(p[(lp // d) * j + a - b] for a in range(lp // d) for b in range(l // d)
                    if 0 <= (lp // d) * j + a - b < nc) for j in range(ns)]
  np.testing.assert_allclose(p @ m, by_formula, rtol=1e-6)
  sizes = nsa.NSASizes(block_len=l, block_stride=d, select_block=lp)
  np.testing.assert_allclose(nsa.rebin(jnp.asarray(p), num_select=ns, sizes=sizes), by_formula, rtol=1e-5)
  np.testing.assert_array_equal(nsa.overlap_matrix(5, 5, 4, 4, 4), np.eye(5))  # l = l' = d


def test_forced_blocks_always_selected_and_never_future():
  sizes = nsa.NSASizes(block_len=8, block_stride=4, select_block=8, num_selected=4, window=8)
  length = 70
  # adversarial importance: forced blocks score lowest, future blocks highest
  imp = jnp.broadcast_to(jnp.arange(9, dtype=jnp.float32)[::-1] * -1.0, (1, 2, length, 9))
  idx = np.asarray(nsa.select_blocks(imp, sizes=sizes))
  for t in range(length):
    chosen = set(idx[0, 0, t]) - {-1}
    cur = t // 8
    assert {0, cur, max(cur - 1, 0)} <= chosen, (t, chosen)
    assert max(chosen) <= cur
    assert len(chosen) == min(4, cur + 1)


def _layer(sizes=SIZES, heads=4, kv_heads=2):
  return nsa.NSAttention(32, heads, kv_heads, 8, rngs=nnx.Rngs(0), sizes=sizes, gate_hidden=16)


def _jitted(layer):
  """layer(x, positions, cache=None) under one jax.jit (eager NNX calls compile op by op)."""
  graphdef, state = nnx.split(layer)

  @jax.jit
  def call(x, pos, cache=None):
    return nnx.merge(graphdef, state)(x, pos, cache=cache)
  return call


def test_causal_through_every_branch():
  layer = _jitted(_layer())
  x = jax.random.normal(jax.random.key(0), (1, 60, 32))
  pos = jnp.arange(60)[None]
  y = layer(x, pos)[0]
  for cut in (17, 40):  # a change at `cut` must not move outputs before it
    x2 = x.at[:, cut:].add(jax.random.normal(jax.random.key(cut), (1, 60 - cut, 32)))
    y2 = layer(x2, pos)[0]
    np.testing.assert_allclose(y2[:, :cut], y[:, :cut], atol=1e-5)
    assert float(jnp.abs(y2[:, cut:] - y[:, cut:]).max()) > 1e-3
  # the compression branch alone: a compressed block is seen only once it has ended
  q, k, v, kc, vc, _ = _inputs(jax.random.key(3), 1, 40, 2, 1, 8)
  o = nsa.compressed_attention_reference(q, kc, vc, sizes=SIZES)
  k2 = k.at[:, 30:].set(0.0)
  kc2 = nsa.compress(k2, nsa.init_compress_params(jax.random.key(9), 8, 8, 16), block_len=8, block_stride=4)
  kc_mixed = kc.at[:, 6:].set(kc2[:, 6:])  # blocks 6.. contain position >= 24
  o2 = nsa.compressed_attention_reference(q, kc_mixed, vc, sizes=SIZES)
  np.testing.assert_allclose(o2[:, :6 * 4 + 8 - 1], o[:, :31], atol=1e-6)
  assert float(jnp.abs(o[:, :7]).max()) == 0.0  # no block has ended before position 7


def test_gradients_reach_compression_mlp_and_gates():
  layer = _layer()
  x = jax.random.normal(jax.random.key(1), (2, 48, 32))
  pos = jnp.broadcast_to(jnp.arange(48), (2, 48))
  graphdef, params = nnx.split(layer, nnx.Param)

  def loss(p):
    return jnp.sum(nnx.merge(graphdef, p)(x, pos)[0] ** 2)

  grads = jax.jit(jax.grad(loss))(params)
  flat = {"/".join(map(str, path)): g for path, g in jax.tree_util.tree_leaves_with_path(grads)}
  for name in ("phi_k", "phi_v", "wg1", "wg2", "bg2"):
    got = [float(jnp.abs(g).max()) for path, g in flat.items() if name in path]
    assert got and min(got) > 0, (name, got)


def test_decode_equals_forward():
  layer = _layer()
  call = _jitted(layer)
  batch, length, prompt = 2, 45, 13
  x = jax.random.normal(jax.random.key(2), (batch, length, 32))
  pos = jnp.broadcast_to(jnp.arange(length), (batch, length))
  full_out = call(x, pos)[0]
  step = call
  cache = layer.init_cache(batch, 64)
  out, cache = call(x[:, :prompt], pos[:, :prompt], cache)
  outs = [out]
  for t in range(prompt, length):
    out, cache = step(x[:, t:t + 1], pos[:, t:t + 1], cache)
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full_out, atol=2e-5, rtol=2e-5)
  assert layer.cache_bytes_per_token(4096) > 2 * 2 * 8 * 2


def test_layer_in_the_model():
  cfg = model_lib.ModelConfig(layer_pattern="N", num_layers=1, d_model=32, num_heads=4,
                              num_kv_heads=2, head_dim=8, d_ff=64)
  graphdef, state = nnx.split(model_lib.Transformer(cfg, rngs=nnx.Rngs(0)))
  tokens = jax.random.randint(jax.random.key(0), (2, 40), 0, 256)
  loss, _ = jax.jit(lambda s, b: nnx.merge(graphdef, s).loss(b))(state, {"inputs": tokens, "targets": tokens})
  assert np.isfinite(float(loss))


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_len=24, block_stride=16), "block_len=24 must be a multiple of block_stride=16"),
    (dict(select_block=40), "select_block=40 must be a multiple of block_stride=16"),
    (dict(window=0), "window must be a positive int"),
    (dict(window=-3), "window must be a positive int"),
    (dict(num_selected=2), "num_selected=2 must be at least"),
])
def test_invalid_sizes_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    nsa.NSASizes(**kwargs)


def test_too_many_selected_blocks_raise():
  args = _inputs(jax.random.key(0), 1, 40, 2, 1, 8)   # 3 selection blocks of 16 < n = 4
  with pytest.raises(ValueError, match="num_selected=4 is larger than the number of selection blocks"):
    nsa.nsa(*args, sizes=SIZES)
  with pytest.raises(ValueError, match="must be a multiple of model.nsa_block_stride|block_len=12"):
    cfg = model_lib.ModelConfig(layer_pattern="N", nsa_block_len=12, nsa_block_stride=8)
    model_lib.Transformer(cfg, rngs=nnx.Rngs(0))


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("head_sum", ["reshape", "bf16", "tf32", "rebin"])
def test_gpu_importance_head_sum_variants(head_sum):
  """pallas_kernels.nsa's importance kernel, each way of summing a group's heads, bf16."""
  from pallas_kernels import nsa as kernels  # pylint: disable=g-import-not-at-top
  sizes = nsa.NSASizes()
  ks = jax.random.split(jax.random.key(3), 2)
  q = jax.random.normal(ks[0], (1, 2000, 64, 128), jnp.bfloat16)
  kc = jax.random.normal(ks[1], (1, sizes.num_compressed(2000), 4, 128), jnp.bfloat16)
  imp = kernels.block_importance(q, kc, sizes=sizes, tuning=kernels.Tuning(importance_sum=head_sum))
  ref = nsa.block_importance_reference(q.astype(jnp.float32), kc.astype(jnp.float32), sizes=sizes,
                                       num_select=sizes.num_select_blocks(2000))
  visible = jnp.arange(ref.shape[-1])[None, :] <= (jnp.arange(2000) // 64)[:, None]
  err = jnp.linalg.norm(jnp.where(visible, imp - ref, 0.0)) / jnp.linalg.norm(ref)
  assert float(err) < 1e-2, float(err)
