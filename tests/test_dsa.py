"""DSA: indexer, top-k, sparse attention, training losses, layer and decode (CPU)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lca import decode, model as model_lib
from lca.attention import dsa, full


def _normal(seed, shape, dtype=jnp.float32):
  """Fresh random inputs (numpy: no per-shape RNG compilation on CPU)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _indexer_inputs(seed, batch=2, q_len=13, kv_len=13, heads=3, dim=16):
  return (_normal(seed, (batch, q_len, heads, dim)), _normal(seed + 1, (batch, kv_len, dim)),
          _normal(seed + 2, (batch, q_len, heads)))


def _qkv(seed, batch=2, length=13, heads=4, kv_heads=2, dim=8, dv=8):
  return (_normal(seed, (batch, length, heads, dim)), _normal(seed + 1, (batch, length, kv_heads, dim)),
          _normal(seed + 2, (batch, length, kv_heads, dv)))


# ----------------------------------------------------------------------------- indexer


def test_indexer_reference_matches_formula():
  q, k, w = _indexer_inputs(0, batch=1, q_len=5, kv_len=5, heads=2, dim=4)
  got = dsa.indexer_scores_reference(q, k, w)
  qn, kn, wn = map(np.asarray, (q, k, w))
  want = np.full((1, 5, 5), -np.inf, np.float32)
  for t in range(5):
    for s in range(t + 1):
      want[0, t, s] = sum(wn[0, t, j] * max(qn[0, t, j] @ kn[0, s], 0.0) for j in range(2))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fp8", [False, True])
def test_indexer_xla_matches_reference(fp8):
  q, k, w = _indexer_inputs(3, dim=32)
  seg = jnp.array([[0] * 6 + [1] * 7, [0] * 13])
  for kw in (dict(), dict(segment_ids=seg)):
    ref = dsa.indexer_scores_reference(q, k, w, fp8=fp8, **kw)
    got = dsa.indexer_scores(q, k, w, fp8=fp8, implementation="xla", **kw)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(ref))
    fin = np.isfinite(ref)
    np.testing.assert_allclose(np.asarray(got)[fin], np.asarray(ref)[fin], rtol=1e-4, atol=1e-4)


def test_fp8_indexer_close_to_fp32():
  q, k, w = _indexer_inputs(5, dim=32)
  exact = np.asarray(dsa.indexer_scores_reference(q, k, w))
  fp8 = np.asarray(dsa.indexer_scores_reference(q, k, w, fp8=True))
  fin = np.isfinite(exact)
  err = np.linalg.norm(fp8[fin] - exact[fin]) / np.linalg.norm(exact[fin])
  assert 1e-4 < err < 0.1, err   # quantized (not exact), but close


def test_fp8_path_selects_on_bf16_scores():
  """indexer_top_k's FP8 path selects on the fp8 scores rounded to bf16 (`selection_dtype`);
  score_dtype=float32 selects on the unrounded ones; the reference agrees with both choices."""
  q, k, w = _indexer_inputs(30, batch=1, q_len=40, kv_len=40, heads=4, dim=32)
  fp8 = dsa.indexer_scores_reference(q, k, w, fp8=True)
  for score_dtype, rounded in ((None, fp8.astype(jnp.bfloat16)), (jnp.float32, fp8)):
    got = dsa.indexer_top_k(q, k, w, top_k=7, fp8=True, chunk=16, score_dtype=score_dtype)
    want = dsa.top_k_indices(rounded, 7)
    np.testing.assert_array_equal(np.sort(np.asarray(got), -1), np.sort(np.asarray(want), -1))
  _, ref_idx = dsa.dsa_attention_reference(*_qkv(31, batch=1, length=40), q, k, w, top_k=7, fp8=True)
  np.testing.assert_array_equal(ref_idx, dsa.top_k_indices(fp8.astype(jnp.bfloat16), 7))
  with pytest.raises(ValueError, match="score_dtype"):
    dsa.indexer_scores(q, k, w, score_dtype=jnp.float16)


def test_bf16_rounding_is_far_below_the_fp8_error():
  """Why the FP8 path may select on bf16: rounding moves the scores >10x less than fp8 does, and
  the top-32 sets overlap the exact (fp32) ones as much with it as without it."""
  q, k, w = _indexer_inputs(32, batch=1, q_len=256, kv_len=256, heads=8, dim=128)
  exact = np.asarray(dsa.indexer_scores_reference(q, k, w))[0]
  fp8 = dsa.indexer_scores_reference(q, k, w, fp8=True)
  rounded = np.asarray(fp8.astype(jnp.bfloat16), np.float32)[0]
  fp8 = np.asarray(fp8)[0]
  fin = np.isfinite(exact)
  rel = lambda a, b: np.linalg.norm(a[fin] - b[fin]) / np.linalg.norm(b[fin])
  assert 10 * rel(rounded, fp8) < rel(fp8, exact) < 0.1
  top = lambda s, t: set(np.argsort(-s[t, :t + 1], kind="stable")[:32].tolist())
  overlap = lambda s: np.mean([len(top(s, t) & top(exact, t)) for t in range(64, 256)]) / 32
  assert abs(overlap(rounded) - overlap(fp8)) < 0.01 and overlap(fp8) > 0.9


def test_quantize_fp8_blocks():
  x = _normal(7, (3, 256)) * 10
  x8, scale = dsa.quantize_fp8(x)
  assert x8.dtype == jnp.float8_e4m3fn and scale.shape == (3, 2)
  back = x8.astype(jnp.float32).reshape(3, 2, 128) * scale[..., None]
  np.testing.assert_allclose(back.reshape(3, 256), x, rtol=0.07, atol=1e-6)
  h = dsa.hadamard_matrix(8)
  np.testing.assert_allclose(h @ h.T, np.eye(8), atol=1e-6)


# ----------------------------------------------------------------------------- top-k


def test_top_k_equals_brute_force_and_is_capped():
  q, k, w = _indexer_inputs(11, batch=2, q_len=17, kv_len=17)
  scores = dsa.indexer_scores_reference(q, k, w)
  top_k = 5
  idx = np.asarray(dsa.top_k_indices(scores, top_k))
  sn = np.asarray(scores)
  for b in range(2):
    for t in range(17):
      visible = t + 1
      want = np.argsort(-sn[b, t, :visible], kind="stable")[:top_k]
      n = min(top_k, visible)
      np.testing.assert_array_equal(idx[b, t, :n], want[:n])
      assert (idx[b, t, n:] == -1).all()


def test_indexer_top_k_chunked_equals_unchunked():
  q, k, w = _indexer_inputs(13, q_len=19, kv_len=19)
  seg = jnp.array([[0] * 9 + [1] * 10, [0] * 19])
  whole = dsa.indexer_top_k(q, k, w, top_k=4, fp8=False, segment_ids=seg)
  chunked = dsa.indexer_top_k(q, k, w, top_k=4, fp8=False, segment_ids=seg, chunk=6)
  np.testing.assert_array_equal(whole, chunked)
  # the second document never selects the first one's tokens
  assert (np.asarray(whole)[0, 9:] != np.arange(9)[:, None, None]).all()


# ----------------------------------------------------------------------------- sparse attention


def test_sparse_gather_matches_reference_fwd_and_grad():
  q, k, v = _qkv(17, length=11, heads=4, kv_heads=2, dv=6)
  qi, ki, w = _indexer_inputs(20, q_len=11, kv_len=11)
  idx = dsa.top_k_indices(dsa.indexer_scores_reference(qi, ki, w), 4)
  ref = dsa.sparse_attention_reference(q, k, v, idx)
  got = dsa.sparse_attention(q, k, v, idx, implementation="xla")
  chex.assert_trees_all_close(got, ref, atol=1e-5, rtol=1e-5)
  ct = _normal(30, ref.shape)
  loss = lambda f: lambda *a: jnp.sum(f(*a, idx) * ct)
  g_ref = jax.jit(jax.grad(loss(dsa.sparse_attention_reference), argnums=(0, 1, 2)))(q, k, v)
  g_got = jax.jit(jax.grad(loss(lambda *a: dsa.sparse_attention(*a, implementation="xla")),
                           argnums=(0, 1, 2)))(q, k, v)
  chex.assert_trees_all_close(g_got, g_ref, atol=1e-5, rtol=1e-5)


def test_dsa_with_k_covering_all_tokens_is_dense_causal():
  q, k, v = _qkv(40, length=12, heads=4, kv_heads=2)
  qi, ki, w = _indexer_inputs(43, q_len=12, kv_len=12)
  dense = full.attention_reference(q, k, v, causal=True)
  out_ref, idx = dsa.dsa_attention_reference(q, k, v, qi, ki, w, top_k=12)
  np.testing.assert_array_equal(out_ref, dense)           # same masked softmax, same mask
  out, _ = dsa.dsa_attention(q, k, v, qi, ki, w, top_k=64, implementation="xla",
                             index_implementation="xla", fp8=False)
  chex.assert_trees_all_close(out, dense, atol=1e-6, rtol=1e-6)
  assert (np.sort(np.asarray(idx), -1)[:, :, ::-1][0, 5, :6] == np.arange(5, -1, -1)).all()


def test_dsa_small_k_differs_from_dense():
  q, k, v = _qkv(50, length=12)
  qi, ki, w = _indexer_inputs(53, q_len=12, kv_len=12)
  out, _ = dsa.dsa_attention_reference(q, k, v, qi, ki, w, top_k=3)
  dense = full.attention_reference(q, k, v, causal=True)
  np.testing.assert_allclose(out[:, :3], dense[:, :3], atol=1e-6)   # t < 3 sees everything
  assert np.abs(np.asarray(out[:, 6:] - dense[:, 6:])).max() > 1e-2


# ----------------------------------------------------------------------------- losses


def test_kl_is_zero_when_indexer_matches_attention():
  q, k, _ = _qkv(60, length=9, heads=2, kv_heads=2)
  mask = dsa.visible_mask(2, 9, 9)
  logits = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
  p = jax.nn.softmax(jnp.where(mask[:, None], logits, -jnp.inf), -1).mean(1)
  scores = jnp.where(mask, jnp.log(jnp.maximum(p, 1e-30)), -jnp.inf)
  assert abs(float(dsa.indexer_kl_dense(q, k, scores))) < 1e-5
  assert float(dsa.indexer_kl_dense(q, k, scores * 0.3)) > 1e-3


def _layer(stage, seed=0):
  return dsa.DSAttention(32, 4, 2, 8, rngs=nnx.Rngs(seed), index_heads=2, index_dim=16, top_k=4,
                         rope_dim=8, stage=stage, fp8=False)


def _nonzero_params(grads):
  flat = nnx.to_flat_state(grads)
  return {".".join(map(str, p)) for p, v in flat if float(jnp.abs(v.get_value()).max()) > 0}


@pytest.mark.parametrize("stage", [1, 2])
def test_kl_gradient_reaches_only_the_indexer(stage):
  layer = _layer(stage)
  x = _normal(70, (2, 10, 32))
  pos = jnp.broadcast_to(jnp.arange(10), (2, 10))

  def kl_loss(layer, x):
    layer(x, pos)
    return dsa.indexer_kl(layer)

  grads, gx = nnx.jit(nnx.grad(kl_loss, argnums=(0, 1)))(layer, x)
  names = _nonzero_params(grads)
  assert names and all(n.startswith("indexer.") for n in names), names
  assert {"indexer.wq", "indexer.wk", "indexer.ww"} <= names
  np.testing.assert_array_equal(gx, 0.0)      # indexer input detached from the main graph
  if stage == 1:
    return

  def lm_loss(layer, x):
    y, _ = layer(x, pos)
    return jnp.sum(y ** 2)

  names = _nonzero_params(nnx.jit(nnx.grad(lm_loss))(layer, x))
  assert not any(n.startswith("indexer.") for n in names) and "wq" in names, names


# ----------------------------------------------------------------------------- layer, model, decode


def test_layer_with_large_k_equals_full_attention_layer():
  layer = _layer(0)
  layer.top_k = 1000
  dense = full.Attention(32, 4, 2, 8, rngs=nnx.Rngs(0))
  for name in ("wq", "wk", "wv", "wo"):
    getattr(dense, name).set_value(getattr(layer, name)[...])
  x = _normal(80, (2, 10, 32))
  pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
  call = nnx.jit(lambda m, x: m(x, pos)[0])   # one compile, not one per eager op (CPU suite time)
  chex.assert_trees_all_close(call(layer, x), call(dense, x), atol=1e-5, rtol=1e-5)


def test_decode_equals_forward():
  cfg = model_lib.ModelConfig(layer_pattern="D", num_layers=1, d_model=32, d_ff=64, num_heads=2,
                              num_kv_heads=1, head_dim=16, dsa_index_heads=2, dsa_index_dim=16,
                              dsa_top_k=4, dsa_rope_dim=8, dsa_fp8=False)
  model = model_lib.Transformer(cfg, rngs=nnx.Rngs(1))
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 256, (2, 10)), jnp.int32)
  want = nnx.jit(lambda m, t: m(t))(model, tokens)
  got, _ = decode.stepwise_logits(model, tokens, 8, capacity=16)
  chex.assert_trees_all_close(got, want, atol=1e-4, rtol=1e-4)
  assert model.cache_bytes_per_token(16) > 0


def test_decode_with_quantized_key_cache_equals_fp8_forward():
  """FP8 indexer (Pallas, interpret): the cache holds fp8 keys + scales written once per token;
  prompt chunk + steps equal the fp8 forward over the whole sequence."""
  layer = dsa.DSAttention(32, 2, 1, 16, rngs=nnx.Rngs(3), index_heads=2, index_dim=16, top_k=4,
                          rope_dim=8, fp8=True, index_implementation="pallas")
  x = _normal(95, (2, 10, 32))
  pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
  run = nnx.jit(lambda m, x, p, c: m(x, p, cache=c))
  want = nnx.jit(lambda m, x, p: m(x, p)[0])(layer, x, pos)
  cache = layer.init_cache(2, 16)
  assert cache["k_idx"].dtype == dsa.FP8 and cache["k_idx_scale"].shape == (2, 16, 1)
  assert layer.cache_bytes_per_token(16) == 2 * 16 * 2 + 16 + 4
  outs = []
  for lo, hi in ((0, 8), (8, 9), (9, 10)):
    y, cache = run(layer, x[:, lo:hi], pos[:, lo:hi], cache)
    outs.append(y)
  chex.assert_trees_all_close(jnp.concatenate(outs, 1), want, atol=1e-5, rtol=1e-5)
  keys = dsa.quantize_index_keys(layer.indexer.keys(x, pos))
  np.testing.assert_array_equal(np.asarray(cache["k_idx"][:, :10], np.float32), np.asarray(keys.values, np.float32))
  with pytest.raises(ValueError, match="fp8"):
    dsa.indexer_scores(_normal(96, (2, 1, 2, 16)), keys, _normal(97, (2, 1, 2)), fp8=False)


@pytest.mark.parametrize("kwargs,match", [
    (dict(top_k=0), "top_k"), (dict(top_k=-3), "top_k"), (dict(index_dim=0), "index_dim"),
    (dict(index_heads=0), "index_heads"), (dict(rope_dim=32), "rope_dim"),
    (dict(rope_dim=3), "rope_dim"), (dict(stage=3), "stage")])
def test_bad_configs_raise(kwargs, match):
  args = dict(index_heads=2, index_dim=16, top_k=4, rope_dim=8) | kwargs
  with pytest.raises(ValueError, match=match):
    dsa.DSAttention(32, 4, 2, 8, rngs=nnx.Rngs(0), **args)
  with pytest.raises(ValueError, match=match):
    cfg = model_lib.ModelConfig(layer_pattern="D", **{f"dsa_{k}": v for k, v in args.items()})
    model_lib.Transformer(cfg, rngs=nnx.Rngs(0))


def test_bad_arguments_raise():
  q, k, w = _indexer_inputs(90)
  with pytest.raises(ValueError, match="k_idx"):
    dsa.indexer_scores(q, k[..., :5], w)
  with pytest.raises(ValueError, match="weights"):
    dsa.indexer_scores(q, k, w[..., :1])
  with pytest.raises(ValueError, match="index_dim % 128"):
    dsa.quantize_fp8(_normal(0, (2, 200)))
  qq, kk, vv = _qkv(91)
  with pytest.raises(ValueError, match="indices"):
    dsa.sparse_attention(qq, kk, vv, jnp.zeros((2, 5, 3), jnp.int32))
