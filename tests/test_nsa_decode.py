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


@pytest.mark.parametrize("capacity,heads,kv_heads,dim,positions,topn", [
    # 2 compressed splits; t = 259 = 63·4 + 7: block 63 (last of split 0) just completed and
    # spills into selection block 16 (split 1); t = 5: no compressed block yet; t = 20: window
    # reaches position 0
    (300, 6, 2, 16, (299, 259, 5, 20), "argmax"),
    (75, 8, 2, 32, (74, 39), "rank"),          # one split, group of 4, odd capacity
    (4100, 2, 1, 16, (4099, 2000), "rank"),    # 257 blocks (padded to 512): grouped rank search
])
def test_kernel_matches_xla_decode(capacity, heads, kv_heads, dim, positions, topn):
  q, gates, cache = _cache(jax.random.key(capacity), len(positions), capacity, heads, kv_heads, dim)
  pos = jnp.asarray(positions, jnp.int32)[:, None]
  ref = _decode("xla")(q, gates, pos, cache)
  if topn == "argmax":   # the default, through `nsa.decode_attention`
    out = _decode("pallas")(q, gates, pos, cache)
  else:
    out = jax.jit(lambda q, g, p, c: nsa_decode.nsa_decode(q, g, p, c, sizes=SIZES, topn=topn))(
        q, gates, pos, cache)
  assert out.shape == (len(positions), 1, heads, dim) and out.dtype == q.dtype
  np.testing.assert_allclose(out, ref, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("topn,capacity,num_initial,num_local", [
    ("argmax", 300, 1, 2), ("rank", 300, 0, 1), ("rank", 300, 3, 4),
    ("rank", 4000, 0, 1),     # 250 blocks: grouped rank search, 2 blocks per group
    ("rank", 16000, 1, 2),    # 1000 blocks: 8 per group
])
def test_select_one_matches_select_blocks(topn, capacity, num_initial, num_local):
  """The kernel's per-program pick (forced blocks without search, then the rank search or
  argmax rounds) gives the set of `nsa.select_blocks`, with ties (importance in {0, 1, 2}
  on half the rows), and early positions where the initial and local blocks overlap."""
  sizes = nsa.NSASizes(block_len=8, block_stride=4, select_block=16, num_selected=8, window=24,
                       num_initial=num_initial, num_local=num_local)
  geo = nsa_decode.DecodeGeometry(length=capacity, num_kv_heads=1, group=1, block_len=8, block_stride=4,
                                  select_block=16, num_selected=8, num_initial=num_initial,
                                  num_local=num_local, scale=1.0, value_dim=16, window=24)
  ns, nsp = geo.num_select_blocks, geo.padded_select_blocks
  positions = jnp.asarray([0, 5, 16, 20, 33, 47, 50, 100, 160, capacity - 1, capacity // 2,
                           capacity - 200], jnp.int32)
  k1, k2 = jax.random.split(jax.random.key(capacity + num_initial))
  ties = jax.random.randint(k1, (len(positions), ns), 0, 3).astype(jnp.float32)
  imp = jnp.where(jnp.arange(len(positions))[:, None] % 2 == 0, ties, jax.random.uniform(k2, ties.shape))
  ref = nsa.select_blocks(imp[None, None], sizes=sizes, q_positions=positions[None])[0, 0]   # [T, n]
  j = jnp.arange(nsp)

  def picks(row, t):
    cur = t // geo.select_block
    row = jnp.pad(row, (0, nsp - ns))
    valid_j = (j <= cur) & (j < ns)
    spill = lambda score: (lambda idx: score[idx])
    return jax.vmap(lambda p: nsa_decode._select_one(row, j, valid_j, cur, p, geo, topn, spill))(   # pylint: disable=protected-access
        jnp.arange(geo.num_selected))

  got = jax.jit(jax.vmap(picks))(imp, positions)
  got = jnp.sort(jnp.where(got < 0, nsp, got), axis=-1)      # ascending, -1 (none) last, as ref
  np.testing.assert_array_equal(jnp.where(got == nsp, -1, got), ref)
  assert int((ref >= 0).sum()) > len(positions) * 3   # free picks happened, not only forced ones


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
@pytest.mark.parametrize("topn", ["rank", "argmax"])
def test_gpu_bf16_paper_sizes(topn):
  sizes = nsa.NSASizes()
  capacity = 8000
  q, gates, cache = _cache(jax.random.key(1), 2, capacity, 64, 4, 128, jnp.bfloat16, sizes)
  pos = jnp.asarray([[capacity - 1], [4127]], jnp.int32)   # 4127 = 256·16 + 31: block 256 just ended
  out = jax.jit(lambda q, g, p, c: nsa_decode.nsa_decode(q, g, p, c, sizes=sizes, topn=topn))(
      q, gates, pos, cache).astype(jnp.float32)
  ref = _decode("xla", sizes)(q, gates, pos, cache).astype(jnp.float32)
  rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
  assert rel < 1e-2, rel
