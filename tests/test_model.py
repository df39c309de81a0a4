"""The LM: shapes, causality, cached decoding equals the full forward, errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lca import decode, model as model_lib
from lca.attention import parse_layer_pattern


def _model(**overrides):
  cfg = dict(d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64,
             layer_pattern="GLL", window=8)
  cfg.update(overrides)
  return model_lib.Transformer(model_lib.ModelConfig(**cfg), rngs=nnx.Rngs(0))


def _tokens(key, batch=2, length=29):
  return jax.random.randint(key, (batch, length), 0, 256)


def test_logits_shape_and_finite():
  m = _model()
  logits = jax.jit(lambda t: m(t))(_tokens(jax.random.key(0)))
  chex.assert_shape(logits, (2, 29, 256))
  chex.assert_type(logits, jnp.float32)
  chex.assert_tree_all_finite(logits)


@pytest.mark.parametrize("conv", [0, 4])
def test_model_is_causal(conv):
  m = _model(attn_conv_size=conv)
  tokens = _tokens(jax.random.key(1))
  changed = tokens.at[:, 17:].set((tokens[:, 17:] + 1) % 256)
  f = jax.jit(lambda t: m(t))
  a, b = f(tokens), f(changed)
  np.testing.assert_array_equal(a[:, :17], b[:, :17])
  assert not np.allclose(a[:, 17:], b[:, 17:])


@pytest.mark.parametrize("pattern,conv", [("G", 0), ("L", 0), ("GLL", 0), ("GLL", 4)])
def test_cached_decoding_reproduces_forward_logits(pattern, conv):
  """A prompt longer than the window, then one token at a time (ring buffers wrap; the
  short conv's tail crosses from the prompt into the steps). The steps run in a scan
  with a traced position, as decode.generate runs them (one compiled step)."""
  m = _model(layer_pattern=pattern, attn_conv_size=conv)
  tokens = _tokens(jax.random.key(2), length=23)
  graphdef, state = nnx.split(m)

  @jax.jit
  def incremental(state, tokens):
    model = nnx.merge(graphdef, state)
    caches = model.init_caches(tokens.shape[0], 32)
    logits, caches = decode.prefill(model, tokens[:, :11], caches)

    def step(caches, t):
      step_logits, caches = decode.decode_step(model, tokens[:, t], t, caches)
      return caches, step_logits

    caches, steps = jax.lax.scan(step, caches, jnp.arange(11, tokens.shape[1]))
    return jnp.concatenate([logits, steps.transpose(1, 0, 2)], axis=1), caches

  logits, caches = incremental(state, tokens)
  np.testing.assert_allclose(logits, jax.jit(lambda t: m(t))(tokens), rtol=1e-4, atol=1e-4)
  for kind, cache in zip(m.cfg.layer_kinds, caches):
    assert cache["k"].shape[1] == (8 if kind == "L" else 32)  # local: ring buffer of window slots


def test_chunked_prefill_equals_one_prefill():
  m = _model()
  tokens = _tokens(jax.random.key(3), length=20)
  positions = jnp.broadcast_to(jnp.arange(20), (2, 20))

  @jax.jit
  def both(tokens):
    caches = m.init_caches(2, 24)
    whole, _ = m(tokens, positions, caches=caches)
    a, caches = m(tokens[:, :13], positions[:, :13], caches=caches)
    b, _ = m(tokens[:, 13:], positions[:, 13:], caches=caches)
    return whole, jnp.concatenate([a, b], 1)

  whole, chunked = both(tokens)
  np.testing.assert_allclose(chunked, whole, rtol=1e-4, atol=1e-4)


def test_greedy_generate_equals_argmax_of_forward():
  m = _model()
  prompt = _tokens(jax.random.key(4), length=9)
  out = decode.generate(m, prompt, 6)
  chex.assert_shape(out, (2, 15))
  np.testing.assert_array_equal(out[:, :9], prompt)
  forward = jax.jit(lambda t: m(t))(out)
  np.testing.assert_array_equal(out[:, 9:], jnp.argmax(forward[:, 8:-1], axis=-1))


def test_sampling_is_seeded_and_respects_top_k():
  logits = jax.random.normal(jax.random.key(5), (4, 256))
  a = decode.sample_token(logits, jax.random.key(6), temperature=1.0, top_k=3)
  b = decode.sample_token(logits, jax.random.key(6), temperature=1.0, top_k=3)
  np.testing.assert_array_equal(a, b)
  top3 = jax.lax.top_k(logits, 3)[1]
  assert all(int(a[i]) in set(np.asarray(top3[i]).tolist()) for i in range(4))


def test_local_layers_bound_the_cache():
  full_model, lg = _model(layer_pattern="G"), _model(layer_pattern="GLL")
  assert lg.cache_bytes_per_token(1024) < full_model.cache_bytes_per_token(1024)
  expected = 2 * 2 * 8 * 2 * (1 + 2 * 8 / 1024)  # k+v, kv heads, head_dim, bf16 bytes
  assert lg.cache_bytes_per_token(1024) == pytest.approx(expected)


@pytest.mark.parametrize("conv", [0, 3])
def test_segment_ids_keep_packed_documents_apart(conv):
  m = _model(attn_conv_size=conv)
  a, b = _tokens(jax.random.key(7), 1, 12), _tokens(jax.random.key(8), 1, 17)
  packed = jnp.concatenate([a, b], axis=1)
  seg = jnp.asarray([[0] * 12 + [1] * 17])
  pos = jnp.asarray([list(range(12)) + list(range(17))])
  logits = jax.jit(lambda t: m(t, pos, segment_ids=seg))(packed)
  forward = jax.jit(lambda t: m(t))
  np.testing.assert_allclose(logits[:, :12], forward(a), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(logits[:, 12:], forward(b), rtol=1e-4, atol=1e-4)


def test_layer_pattern_by_letters_or_names():
  assert parse_layer_pattern("GLL", 7) == list("GLLGLLG")
  assert parse_layer_pattern("global,local", 3) == list("GLG")


@pytest.mark.parametrize("overrides,match", [
    ({"layer_pattern": "GX"}, "unknown layer kind 'X'"),
    ({"num_heads": 6, "num_kv_heads": 4}, "num_heads=6 must be a multiple of model.num_kv_heads=4"),
    ({"window": 0}, "window must be positive"),
    ({"dtype": "float64"}, "model.dtype must be one of"),
    ({"attn_conv_size": 1}, "conv_size must be 0 \\(off\\) or >= 2, got 1"),
])
def test_bad_config_raises(overrides, match):
  with pytest.raises(ValueError, match=match):
    _model(**overrides)


def test_sequence_longer_than_cache_raises():
  with pytest.raises(ValueError, match="longer than the cache capacity=10"):
    decode.generate(_model(), jnp.zeros((1, 8), jnp.int32), 5, capacity=10)


def test_stepwise_logits_rejects_a_bad_prompt_length():
  tokens = jnp.zeros((1, 5), jnp.int32)
  for bad in (0, 6):
    with pytest.raises(ValueError, match="prompt_len"):
      decode.stepwise_logits(_model(), tokens, bad)


def test_unknown_model_config_field_raises():
  with pytest.raises(ValueError, match="unknown config.model fields: \\['num_layer'\\]"):
    model_lib.ModelConfig.from_config({"num_layer": 3})
