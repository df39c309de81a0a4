"""Full and local attention: reference properties, fast paths against the reference, errors."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lca.attention import common, full, local


def _qkv(key, batch=2, q_len=37, kv_len=None, heads=6, kv_heads=2, dim=16, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(key, 3)
  kv_len = q_len if kv_len is None else kv_len
  return (jax.random.normal(kq, (batch, q_len, heads, dim), dtype),
          jax.random.normal(kk, (batch, kv_len, kv_heads, dim), dtype),
          jax.random.normal(kv, (batch, kv_len, kv_heads, dim), dtype))


def test_reference_shapes_and_dtype():
  q, k, v = _qkv(jax.random.key(0), dtype=jnp.bfloat16)
  out = full.attention_reference(q, k, v)
  chex.assert_shape(out, q.shape)
  chex.assert_type(out, jnp.bfloat16)
  chex.assert_tree_all_finite(out)


def test_reference_matches_naive_softmax_loop():
  q, k, v = _qkv(jax.random.key(1), batch=1, q_len=7, heads=2, kv_heads=1, dim=4)
  out = np.asarray(full.attention_reference(q, k, v, scale=0.3))
  qn, kn, vn = map(np.asarray, (q, k, v))
  for h, t in itertools.product(range(2), range(7)):
    logits = np.array([qn[0, t, h] @ kn[0, s, 0] * 0.3 for s in range(t + 1)])
    p = np.exp(logits - logits.max())
    p /= p.sum()
    np.testing.assert_allclose(out[0, t, h], p @ vn[0, : t + 1, 0], rtol=1e-5, atol=1e-5)


def test_gqa_equals_mha_on_repeated_kv_heads():
  q, k, v = _qkv(jax.random.key(2), heads=6, kv_heads=2)
  gqa = full.attention_reference(q, k, v)
  mha = full.attention_reference(q, jnp.repeat(k, 3, axis=2), jnp.repeat(v, 3, axis=2))
  np.testing.assert_allclose(gqa, mha, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal,window", [(True, None), (True, 5), (False, None), (False, 4)])
def test_mask_equals_brute_force(causal, window):
  length = 13
  pos = jnp.arange(length)[None]
  seg = jnp.asarray([[0] * 6 + [1] * 7])
  mask = np.asarray(common.attention_mask(pos, pos, causal=causal, window=window,
                                          q_segment_ids=seg, kv_segment_ids=seg))[0]
  for t, s in itertools.product(range(length), range(length)):
    visible = (s <= t or not causal) and int(seg[0, t]) == int(seg[0, s])
    if window is not None:
      visible &= (t - window < s <= t) if causal else abs(t - s) < window
    assert mask[t, s] == visible, (t, s)


def test_causality_future_tokens_never_change_the_past():
  q, k, v = _qkv(jax.random.key(3))
  out = full.attention_reference(q, k, v, window=9)
  k2 = k.at[:, 20:].set(jax.random.normal(jax.random.key(4), k[:, 20:].shape))
  v2 = v.at[:, 20:].set(jax.random.normal(jax.random.key(5), v[:, 20:].shape))
  out2 = full.attention_reference(q, k2, v2, window=9)
  np.testing.assert_array_equal(out[:, :20], out2[:, :20])
  assert not np.allclose(out[:, 20:], out2[:, 20:])


def test_segment_ids_equal_separate_sequences():
  q, k, v = _qkv(jax.random.key(6), batch=1, q_len=30)
  seg = jnp.asarray([[0] * 11 + [1] * 19])
  packed = full.attention(q, k, v, segment_ids=seg, implementation="xla")
  first = full.attention_reference(q[:, :11], k[:, :11], v[:, :11])
  second = full.attention_reference(q[:, 11:], k[:, 11:], v[:, 11:])
  np.testing.assert_allclose(packed, jnp.concatenate([first, second], axis=1), rtol=1e-5, atol=1e-5)


def test_fully_masked_rows_are_zero():
  q, k, v = _qkv(jax.random.key(7), batch=1, q_len=4, kv_len=6)
  kv_pos = jnp.asarray([[5, 6, 7, -1, -1, 9]])  # query positions 0..3 see nothing
  out = full.attention_reference(q, k, v, q_positions=jnp.arange(4)[None], kv_positions=kv_pos)
  np.testing.assert_array_equal(out, jnp.zeros_like(out))


@pytest.mark.parametrize("causal,window", [(True, None), (False, None), (True, 33), (False, 8)])
def test_xla_matches_reference(causal, window):
  q, k, v = _qkv(jax.random.key(8), q_len=67)
  ref = full.attention_reference(q, k, v, causal=causal, window=window)
  out = full.attention(q, k, v, causal=causal, window=window, implementation="xla")
  np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("length,window", [(197, 33), (5, 8)])
def test_local_chunked_matches_reference_forward_and_gradients(length, window):
  q, k, v = _qkv(jax.random.key(9), q_len=length)
  seg = (jnp.arange(length)[None] >= length // 2).astype(jnp.int32).repeat(2, axis=0)
  ref_fn = lambda q, k, v: local.local_attention_reference(q, k, v, window=window, segment_ids=seg)
  fast_fn = lambda q, k, v: local.local_attention(q, k, v, window=window, segment_ids=seg,
                                                  implementation="xla_chunked")
  cot = jax.random.normal(jax.random.key(10), q.shape)
  value_and_grads = lambda f: jax.jit(jax.value_and_grad(
      lambda *a: jnp.sum(f(*a) * cot), argnums=(0, 1, 2)))
  np.testing.assert_allclose(jax.jit(fast_fn)(q, k, v), jax.jit(ref_fn)(q, k, v), rtol=2e-5, atol=2e-5)
  _, g_ref = value_and_grads(ref_fn)(q, k, v)
  _, g_fast = value_and_grads(fast_fn)(q, k, v)
  for a, b in zip(g_fast, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_bf16_reference_is_close_to_fp32():
  q, k, v = _qkv(jax.random.key(11))
  ref = full.attention_reference(q, k, v)
  low = full.attention_reference(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
  assert float(jnp.max(jnp.abs(low.astype(jnp.float32) - ref))) < 0.05


@pytest.mark.parametrize("args,kwargs,error,match", [
    (((1, 8, 5, 16), (1, 8, 2, 16)), {}, ValueError, "num_q_heads=5 must be a multiple of num_kv_heads=2"),
    (((1, 8, 4, 16), (1, 8, 2, 8)), {}, ValueError, "head_dim mismatch"),
    (((1, 8, 4, 16), (1, 8, 2, 16)), {"window": 0}, ValueError, "window must be a positive int"),
    (((1, 8, 4, 16), (1, 8, 2, 16)), {"implementation": "magic"}, ValueError, "unknown attention implementation='magic'"),
    (((8, 4, 16), (1, 8, 2, 16)), {}, ValueError, "q must be"),
])
def test_bad_arguments_raise_clear_errors(args, kwargs, error, match):
  q = jnp.ones(args[0]) * 0.1
  k = jnp.ones(args[1]) * 0.1
  with pytest.raises(error, match=match):
    full.attention(q, k, k, **kwargs)


def test_integer_inputs_raise_type_error():
  x = jnp.ones((1, 4, 2, 8), jnp.int32)
  with pytest.raises(TypeError, match="q must be float32"):
    full.attention_reference(x, x, x)


def test_v_head_dim_other_than_q_through_xla_matches_reference():
  """MLA's shape (v narrower than q.k): the XLA path pads v for jax's call and cuts the output
  back; a wider v names the problem."""
  q, k, _ = _qkv(jax.random.key(15), q_len=29, heads=6, kv_heads=2, dim=24)
  v = jax.random.normal(jax.random.key(16), (*k.shape[:3], 16))
  for window in (None, 7):
    got = full.attention(q, k, v, window=window, implementation="xla")
    want = full.attention_reference(q, k, v, window=window)
    assert got.shape == (2, 29, 6, 16)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  with pytest.raises(NotImplementedError, match="v's head_dim <= q's"):
    full.attention(q, k, jnp.concatenate([v, v], -1), implementation="xla")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU error")
def test_cudnn_on_cpu_names_the_problem():
  q, k, v = _qkv(jax.random.key(12), dtype=jnp.bfloat16)
  with pytest.raises(NotImplementedError, match="cudnn.*needs a GPU"):
    full.attention(q, k, v, implementation="cudnn")


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("window", [None, 33])
def test_cudnn_matches_reference_on_gpu(window):
  q, k, v = _qkv(jax.random.key(13), q_len=256, heads=8, kv_heads=2, dim=64, dtype=jnp.bfloat16)
  ref32 = full.attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), window=window)
  ref16 = full.attention_reference(q, k, v, window=window).astype(jnp.float32)
  out = full.attention(q, k, v, window=window, implementation="cudnn").astype(jnp.float32)
  err, ref_err = jnp.max(jnp.abs(out - ref32)), jnp.max(jnp.abs(ref16 - ref32))
  assert err <= 2 * ref_err + 1e-3, (err, ref_err)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_cudnn_with_v_dim_other_than_q_matches_reference_on_gpu():
  """MLA's dense shape (q.k 192, v 128; here 200 queries, GQA 8 / 2): cuDNN takes v unpadded,
  forward and gradients as the reference's."""
  ks = jax.random.split(jax.random.key(14), 4)
  q = jax.random.normal(ks[0], (1, 200, 8, 192), jnp.bfloat16)
  k = jax.random.normal(ks[1], (1, 200, 2, 192), jnp.bfloat16)
  v = jax.random.normal(ks[2], (1, 200, 2, 128), jnp.bfloat16)
  ct = jax.random.normal(ks[3], (1, 200, 8, 128), jnp.float32)
  loss = lambda q, k, v: jnp.sum(full.attention(q, k, v, implementation="cudnn").astype(jnp.float32) * ct)
  ref32 = lambda q, k, v: jnp.sum(full.attention_reference(q, k, v) * ct)
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  got, got_grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)
  want, want_grads = jax.value_and_grad(ref32, argnums=(0, 1, 2))(*f32)
  out = full.attention(q, k, v, implementation="cudnn").astype(jnp.float32)
  assert out.shape == (1, 200, 8, 128)
  ref16 = full.attention_reference(q, k, v).astype(jnp.float32)
  ref = full.attention_reference(*f32)
  assert jnp.max(jnp.abs(out - ref)) <= 2 * jnp.max(jnp.abs(ref16 - ref)) + 1e-3
  for g, w in zip(got_grads, want_grads):
    g = g.astype(jnp.float32)
    assert jnp.linalg.norm(g - w) <= 2e-2 * jnp.linalg.norm(w), (jnp.linalg.norm(g - w), jnp.linalg.norm(w))
  assert abs(got - want) <= 2e-2 * jnp.sum(jnp.abs(ref * ct))
