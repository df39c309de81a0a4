"""Fused NSA decode (pallas_kernels/nsa_decode.py) against `nsa.decode_attention`'s XLA path.

CPU runs the kernels in interpret mode, so sizes are small; selection blocks of 16
tokens make several compressed splits (16 selection blocks each) at C = 300."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lca.attention import nsa
from pallas_kernels import nsa_decode

# n = 8 with 3 forced blocks: 5 free picks among up to 19 blocks, so the importance matters
SIZES = nsa.NSASizes(block_len=8, block_stride=4, select_block=16, num_selected=8, window=24)


def _cache(key, batch, capacity, heads, kv_heads, dim, dtype=jnp.float32, sizes=SIZES):
  ks = jax.random.split(key, 6)
  nc = max(1, sizes.num_compressed(capacity))
  raw = lambda k, n: jax.random.normal(k, (batch, n, kv_heads, dim), dtype)
  cache = dict(k=raw(ks[0], capacity), v=raw(ks[1], capacity), kc=raw(ks[2], nc), vc=raw(ks[3], nc),
               pos=jnp.zeros((batch, capacity), jnp.int32))
  q = jax.random.normal(ks[4], (batch, 1, heads, dim), dtype)
  gates = jax.nn.sigmoid(jax.random.normal(ks[5], (batch, 1, heads, 3))).astype(dtype)
  return q, gates, cache


def _decode(implementation, sizes=SIZES):
  return jax.jit(lambda q, g, p, c: nsa.decode_attention(q, g, p, c, sizes=sizes,
                                                         implementation=implementation))


@pytest.mark.parametrize("capacity,heads,kv_heads,dim,positions", [
    # 2 compressed splits; t = 259 = 63·4 + 7: block 63 (last of split 0) just completed and
    # spills into selection block 16 (split 1); t = 5: no compressed block yet; t = 20: window
    # reaches position 0
    (300, 6, 2, 16, (299, 259, 5, 20)),
    (75, 8, 2, 32, (74, 39)),          # one split, group of 4, odd capacity
])
def test_kernel_matches_xla_decode(capacity, heads, kv_heads, dim, positions):
  q, gates, cache = _cache(jax.random.key(capacity), len(positions), capacity, heads, kv_heads, dim)
  pos = jnp.asarray(positions, jnp.int32)[:, None]
  ref = _decode("xla")(q, gates, pos, cache)
  out = _decode("pallas")(q, gates, pos, cache)
  assert out.shape == (len(positions), 1, heads, dim) and out.dtype == q.dtype
  np.testing.assert_allclose(out, ref, atol=2e-6, rtol=2e-6)


def test_decode_dispatch():
  q, gates, cache = _cache(jax.random.key(0), 1, 40, 4, 2, 16)
  q2, g2 = jnp.concatenate([q, q], 1), jnp.concatenate([gates, gates], 1)
  pos2 = jnp.asarray([[38, 39]], jnp.int32)
  with pytest.raises(NotImplementedError, match="one query token per sequence"):
    nsa.decode_attention(q2, g2, pos2, cache, sizes=SIZES, implementation="pallas")
  np.testing.assert_array_equal(   # a prompt chunk falls back to XLA
      _decode(("pallas", "xla"))(q2, g2, pos2, cache), _decode("xla")(q2, g2, pos2, cache))
  bad = nsa.NSASizes(block_len=8, block_stride=4, select_block=24, num_selected=4, window=16)
  with pytest.raises(NotImplementedError, match="power-of-two select_block"):
    nsa_decode.geometry(q, cache, sizes=bad)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_gpu_bf16_paper_sizes():
  sizes = nsa.NSASizes()
  capacity = 8000
  q, gates, cache = _cache(jax.random.key(1), 2, capacity, 64, 4, 128, jnp.bfloat16, sizes)
  pos = jnp.asarray([[capacity - 1], [4127]], jnp.int32)   # 4127 = 256·16 + 31: block 256 just ended
  out = _decode("pallas", sizes)(q, gates, pos, cache).astype(jnp.float32)
  ref = _decode("xla", sizes)(q, gates, pos, cache).astype(jnp.float32)
  rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
  assert rel < 1e-2, rel
