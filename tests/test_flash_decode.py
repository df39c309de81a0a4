"""pallas_kernels.flash_decode against its reference over random cache lengths.

In interpret mode the kernel's outputs start as NaN, and the combine multiplies every
partial output (even of an empty split) by its weight, so an unwritten element of the
partials shows up as NaN in the result.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lca.attention import full
from pallas_kernels import flash_decode as fd


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _inputs(seed, batch, tokens, heads, kv_heads, head_dim, capacity, dtype=jnp.float32):
  kq, kk, kv, kl = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(kq, (batch, tokens, heads, head_dim), dtype)
  k = jax.random.normal(kk, (batch, capacity, kv_heads, head_dim), dtype)
  v = jax.random.normal(kv, (batch, capacity, kv_heads, head_dim), dtype)
  lengths = jax.random.randint(kl, (batch,), tokens, capacity + 1)
  return q, k, v, lengths


@pytest.mark.parametrize("batch,tokens,heads,kv_heads,head_dim,capacity,num_splits", [
    pytest.param(4, 1, 8, 2, 32, 300, 3, id="T1-gqa8:2-C300-3splits"),
    pytest.param(3, 3, 6, 2, 64, 257, None, id="T3-gqa6:2-C257"),
])
def test_matches_reference(batch, tokens, heads, kv_heads, head_dim, capacity, num_splits):
  q, k, v, lengths = _inputs(capacity, batch, tokens, heads, kv_heads, head_dim, capacity)
  lengths = lengths.at[0].set(tokens)  # a sequence that is all new tokens
  got = fd.flash_decode(q, k, v, lengths, num_splits=num_splits, block_r=32)
  want = fd.flash_decode_reference(q, k, v, lengths)
  chex.assert_shape(got, q.shape)
  assert not np.isnan(np.asarray(got)).any()
  assert _rel(got, want) < 2e-5, _rel(got, want)


def test_value_head_dim_differs_from_qk(qk_dim=24, v_dim=48):
  """v wider than q·k's padding (48 vs 24 -> 32): padded on its own, returned at its width."""
  q, k, _, lengths = _inputs(5, 2, 2, 4, 2, qk_dim, 70)
  _, _, v, _ = _inputs(6, 2, 2, 4, 2, v_dim, 70)
  got = fd.flash_decode(q, k, v, lengths, num_splits=2)
  chex.assert_shape(got, (*q.shape[:3], v_dim))
  assert _rel(got, fd.flash_decode_reference(q, k, v, lengths)) < 2e-5


def test_combine_splits_handles_empty_splits():
  o = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 5, 8))
  lse = jnp.array([[[1.0] * 5, [-jnp.inf] * 5]] * 3).at[1, 0].set(-jnp.inf)
  out = fd.combine_splits(o, lse)
  np.testing.assert_array_equal(np.asarray(out[1]), 0.0)  # every split empty -> zeros
  w = np.array([1.0, 0.0, 1.0])
  np.testing.assert_allclose(out[0], np.einsum("s,srd->rd", w, np.asarray(o[:, 0])) / 2,
                             rtol=1e-6)


@pytest.mark.parametrize("args,error,match", [
    (dict(kv_lengths=jnp.ones((3,), jnp.int32)), ValueError, "kv_lengths"),
    (dict(kv_lengths=jnp.ones((2,), jnp.float32)), TypeError, "kv_lengths"),
    (dict(k_cache=jnp.ones((2, 16, 3, 16))), ValueError, "multiple of num_kv_heads"),
    (dict(q=jnp.ones((2, 1, 4, 16), jnp.bfloat16)), TypeError, "share a dtype"),
    (dict(num_splits=0), ValueError, "num_splits"),
])
def test_bad_arguments_raise(args, error, match):
  kw = dict(q=jnp.ones((2, 1, 4, 16)), k_cache=jnp.ones((2, 16, 2, 16)),
            v_cache=jnp.ones((2, 16, 2, 16)), kv_lengths=jnp.array([3, 16]))
  kw.update(args)
  if kw["k_cache"].shape[2] == 3:
    kw["v_cache"] = kw["k_cache"]
  with pytest.raises(error, match=match):
    fd.flash_decode(kw.pop("q"), kw.pop("k_cache"), kw.pop("v_cache"), kw.pop("kv_lengths"), **kw)


def test_cached_attention_uses_the_kernel_for_full_caches():
  """full.cached_attention with implementation='pallas': a prompt chunk of 20 tokens
  (80 query rows per KV head: two row blocks), then one step; MQA."""
  batch, heads, kv_heads, head_dim, capacity = 2, 4, 1, 16, 40
  cache = full.init_kv_cache(batch, capacity, kv_heads, head_dim, jnp.float32)
  ref_cache = cache
  # jitted: one compile, not one per eager op (CPU suite time)
  attend = lambda impl: jax.jit(lambda *a: full.cached_attention(*a, window=None, scale=None,
                                                                 implementation=impl))
  key = jax.random.PRNGKey(5)
  for start, tokens in ((0, 20), (20, 1)):
    key, *ks = jax.random.split(key, 4)
    q = jax.random.normal(ks[0], (batch, tokens, heads, head_dim))
    k = jax.random.normal(ks[1], (batch, tokens, kv_heads, head_dim))
    v = jax.random.normal(ks[2], (batch, tokens, kv_heads, head_dim))
    pos = jnp.broadcast_to(jnp.arange(start, start + tokens), (batch, tokens))
    got, cache = attend("pallas")(q, k, v, pos, cache)
    want, ref_cache = attend("reference")(q, k, v, pos, ref_cache)
    assert _rel(got, want) < 2e-5


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("tokens,capacity", [(1, 8192), (4, 5000), (1, 131072)])
def test_gpu_bf16(tokens, capacity):
  q, k, v, lengths = _inputs(tokens, 4, tokens, 32, 8, 128, capacity, jnp.bfloat16)
  got = jax.jit(fd.flash_decode)(q, k, v, lengths)
  up = lambda x: x.astype(jnp.float32)
  want = fd.flash_decode_reference(up(q), up(k), up(v), lengths)
  assert _rel(got, want) < 1e-2
