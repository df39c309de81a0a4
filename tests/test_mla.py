"""MLA: naive and absorbed forms agree with each other, with a direct reference and with
the training forward; the cache holds d_c + d_R values per token."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lca import decode, model as model_lib
from lca.attention import mla

B, T, H, DH, DR, DC, DV = 2, 7, 3, 5, 4, 6, 7


def materialize(make, seed=0):
  """The module `make()` builds, filled with numpy random values: no per-shape RNG
  compilations (XLA:CPU takes ~0.8 s of CPU for each), so the tests stay fast."""
  graphdef, state = nnx.split(nnx.eval_shape(make))
  rng = np.random.default_rng(seed)
  def fill(v):
    if len(v.shape) == 1:  # norm scales
      return v.replace(jnp.asarray(1 + 0.1 * rng.standard_normal(v.shape), v.dtype))
    return v.replace(jnp.asarray(rng.standard_normal(v.shape) / np.sqrt(v.shape[-2]), v.dtype))
  return nnx.merge(graphdef, jax.tree.map(fill, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def _normal(rng, *shape):
  return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _inputs(seed, s=T):
  rng = np.random.default_rng(seed)
  return (_normal(rng, B, T, H, DH), _normal(rng, B, T, H, DR), _normal(rng, B, s, DC),
          _normal(rng, B, s, DR), _normal(rng, DC, H, DH), _normal(rng, DC, H, DV))


def _direct(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, scale):
  """MLA written out in numpy, causal, bottom-right aligned."""
  q_nope, q_rope, c_kv, k_rope, w_uk, w_uv = map(np.asarray, (q_nope, q_rope, c_kv, k_rope, w_uk, w_uv))
  k = np.einsum("bsc,chd->bshd", c_kv, w_uk)
  v = np.einsum("bsc,chd->bshd", c_kv, w_uv)
  logits = (np.einsum("bthd,bshd->bhts", q_nope, k) + np.einsum("bthd,bsd->bhts", q_rope, k_rope)) * scale
  t, s = q_nope.shape[1], c_kv.shape[1]
  mask = np.arange(s)[None] <= (s - t + np.arange(t))[:, None]
  logits = np.where(mask, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", p, v)


@pytest.mark.parametrize("form", ["naive", "absorbed"])
def test_forms_match_direct_reference(form):
  args = _inputs(0)
  scale = 1 / math.sqrt(DH + DR)
  out = jax.jit(functools.partial(mla.mla_attention, scale=scale, implementation=form))(*args)
  chex.assert_shape(out, (B, T, H, DV))
  np.testing.assert_allclose(out, _direct(*args, scale), atol=2e-5, rtol=2e-5)


def test_naive_and_absorbed_agree_with_cache_positions_and_gradients():
  args = _inputs(1, s=11)
  kv_pos = jnp.broadcast_to(jnp.where(jnp.arange(11) < 9, jnp.arange(11), -1), (B, 11))  # 2 empty slots
  q_pos = jnp.broadcast_to(jnp.arange(2, 2 + T), (B, T))
  kw = dict(scale=0.3, q_positions=q_pos, kv_positions=kv_pos)
  naive = lambda *a: mla.mla_attention(*a, implementation="naive", **kw)
  absorbed = lambda *a: mla.mla_attention(*a, implementation="absorbed", **kw)
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
  both = lambda f: jax.jit(jax.value_and_grad(loss(f), argnums=range(6)))(*args)
  (l_naive, g_naive), (l_abs, g_abs) = both(naive), both(absorbed)
  np.testing.assert_allclose(l_naive, l_abs, atol=1e-4)
  chex.assert_trees_all_close(g_naive, g_abs, atol=1e-4, rtol=1e-4)


def _layer(decode, q_rank=8):
  return materialize(lambda: mla.MLAttention(12, H, q_rank=q_rank, kv_rank=DC, rope_dim=DR, head_dim=DH,
                                             v_head_dim=DV, decode=decode, rngs=nnx.Rngs(3)))


@pytest.mark.parametrize("decode, q_rank", [("absorbed", 8), ("naive", 0)])
def test_decode_matches_training_forward(decode, q_rank):
  layer = _layer(decode, q_rank)
  length, prompt = 9, 4
  x = _normal(np.random.default_rng(2), B, length, 12)
  pos = jnp.broadcast_to(jnp.arange(length), (B, length))
  full_out, none = nnx.jit(lambda m, x, p: m(x, p))(layer, x, pos)
  assert none is None
  step = nnx.jit(lambda m, x, p, c: m(x, p, cache=c))
  out, cache = step(layer, x[:, :prompt], pos[:, :prompt], layer.init_cache(B, 16))
  outs = [out]
  for t in range(prompt, length):
    out, cache = step(layer, x[:, t:t + 1], pos[:, t:t + 1], cache)
    outs.append(out)
  chex.assert_trees_all_close(jnp.concatenate(outs, axis=1), full_out, atol=2e-5)
  assert set(cache) == {"c_kv", "k_rope", "pos"}


def test_cache_sizes():
  layer = _layer("absorbed")
  cache = layer.init_cache(3, 20)
  chex.assert_shape([cache["c_kv"], cache["k_rope"], cache["pos"]], [(3, 20, DC), (3, 20, DR), (3, 20)])
  assert layer.cache_bytes_per_token(1000, bytes_per_value=2) == 2 * (DC + DR)
  assert mla.cache_values_per_token(512, 64) == 576            # DeepSeek-V3
  assert 2 * 128 * 128 / mla.cache_values_per_token(512, 64) == pytest.approx(56.9, abs=0.1)  # vs MHA
  cfg = model_lib.ModelConfig(layer_pattern="MG", num_layers=2, mla_kv_rank=DC, mla_rope_dim=DR)
  model = nnx.eval_shape(lambda: model_lib.Transformer(cfg, rngs=nnx.Rngs(0)))
  mha = 2 * cfg.num_kv_heads * cfg.head_dim
  assert model.cache_bytes_per_token(64, 2) == 2 * (DC + DR) + 2 * mha


def test_model_with_mla_decodes_like_forward():
  cfg = model_lib.ModelConfig(layer_pattern="M", num_layers=2, d_model=32, num_heads=2, num_kv_heads=2, head_dim=8,
                              d_ff=48, mla_q_rank=16, mla_kv_rank=12, mla_rope_dim=4)
  model = materialize(lambda: model_lib.Transformer(cfg, rngs=nnx.Rngs(0)))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, 6)), jnp.int32)
  logits = nnx.jit(lambda m, t: m(t))(model, tokens)
  got, _ = decode.stepwise_logits(model, tokens, 3, capacity=8)
  chex.assert_trees_all_close(got, logits, atol=1e-4)


def test_yarn_temperature_in_softmax_scale():
  base = _layer("absorbed")
  ext = nnx.eval_shape(lambda: mla.MLAttention(
      12, H, q_rank=8, kv_rank=DC, rope_dim=DR, head_dim=DH, v_head_dim=DV, rope_scaling="yarn",
      rope_scaling_factor=4.0, rope_original_length=16, rngs=nnx.Rngs(3)))
  assert base.rope()[1] == pytest.approx(1 / math.sqrt(DH + DR))
  assert ext.rope()[1] == pytest.approx((0.1 * math.log(4) + 1) ** 2 / math.sqrt(DH + DR))


def test_bad_arguments_raise():
  args = list(_inputs(0))
  args[4] = args[4][:, :, :-1]
  with pytest.raises(ValueError, match="w_uk"):
    mla.mla_attention(*args, scale=1.0)
  with pytest.raises(ValueError, match="implementation"):
    mla.mla_attention(*_inputs(0), scale=1.0, implementation="fast")
  with pytest.raises(ValueError, match="mla_rope_dim"):
    model_lib.ModelConfig(layer_pattern="M", mla_rope_dim=5)
  with pytest.raises(ValueError, match="mla_decode"):
    model_lib.ModelConfig(layer_pattern="M", mla_decode="latent")
