"""DSA Pallas kernels against the references (interpret mode on CPU; few, small cases)."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lca.attention import dsa
from pallas_kernels import dsa_attention, dsa_attention_mgpu, dsa_indexer, dsa_indexer_mgpu


def _normal(seed, shape, dtype=jnp.float32):
  """Fresh random inputs (numpy: no per-shape RNG compilation on CPU)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _out_and_grads(f, ct, *args):
  """(f(*args), d sum(f(*args) * ct) / d args) from one jitted program: one compile, not one
  per eager op (CPU suite time). The output is the forward the gradient runs: the kernels'
  custom_vjp forward rule launches the same forward kernel as the plain call."""
  def loss(*a):
    out = f(*a)
    return jnp.sum(out * ct), out
  grads, out = jax.jit(jax.grad(loss, argnums=tuple(range(len(args))), has_aux=True))(*args)
  return out, grads


def _assert_scores_close(got, ref, tol):
  got, ref = np.asarray(got), np.asarray(ref)
  np.testing.assert_array_equal(np.isfinite(got), np.isfinite(ref))
  fin = np.isfinite(ref)
  np.testing.assert_allclose(got[fin], ref[fin], rtol=tol, atol=tol)


@pytest.mark.parametrize("fp8", [False, True])
def test_indexer_kernel_matches_reference(fp8):
  q, k, w = _normal(0, (1, 37, 3, 32)), _normal(1, (1, 37, 32)), _normal(2, (1, 37, 3))
  pos = jnp.broadcast_to(jnp.arange(37, dtype=jnp.int32), (1, 37))
  got = dsa_indexer.indexer_scores(q, k, w, pos, pos, fp8=fp8,
                                   blocks=dsa_indexer.IndexerBlocks(block_q=32, block_k=32))
  _assert_scores_close(got, dsa.indexer_scores_reference(q, k, w, fp8=fp8), 1e-4)


def test_indexer_kernel_may_skip_the_wholly_future_tiles():
  """fill_future=False leaves the tiles no query of theirs sees unwritten (NaN in interpret mode)
  and writes every other entry as before; the chunked indexer + top-k (which reads below t + 1
  only) then picks the same keys as the XLA scores, with either top-k."""
  q, k, w = _normal(86, (1, 40, 2, 16)), _normal(87, (1, 40, 16)), _normal(88, (1, 40, 2))
  pos = jnp.broadcast_to(jnp.arange(40, dtype=jnp.int32), (1, 40))
  kw = dict(blocks=dsa_indexer.IndexerBlocks(block_q=16, block_k=16))
  filled = np.asarray(dsa_indexer.indexer_scores(q, k, w, pos, pos, **kw))
  skipped = np.asarray(dsa_indexer.indexer_scores(q, k, w, pos, pos, fill_future=False, **kw))
  t, s = np.meshgrid(np.arange(40), np.arange(40), indexing="ij")
  differs = ~((skipped == filled) | (np.isinf(skipped) & np.isinf(filled)))[0]
  assert differs.any() and (s[differs] > t[differs]).all()
  q, k, w = _normal(89, (1, 300, 2, 16)), _normal(90, (1, 300, 16)), _normal(91, (1, 300, 2))
  for topk in ("pallas", "xla"):   # default tiles [64, 128]: chunk 0 skips key tiles 1 and 2
    got = dsa.indexer_top_k(q, k, w, top_k=5, fp8=False, chunk=128, implementation="pallas",
                            topk_implementation=topk)
    want = dsa.indexer_top_k(q, k, w, top_k=5, fp8=False, chunk=128, implementation="xla",
                             topk_implementation="xla")
    np.testing.assert_array_equal(np.sort(np.asarray(got), -1), np.sort(np.asarray(want), -1))
  # explicit key positions (a cache): the top-k reads whole rows, so every tile is written
  explicit = dsa.indexer_top_k(q, k, w, top_k=5, fp8=False, chunk=128, implementation="pallas",
                               kv_positions=jnp.arange(300)[None])
  np.testing.assert_array_equal(np.sort(np.asarray(explicit), -1), np.sort(np.asarray(want), -1))


def test_indexer_kernel_writes_bf16_scores_rounded_once():
  """out_dtype=bfloat16 (the FP8 path's selection scores): the fp32 sums rounded when written,
  -inf kept; prefill tiles and the decode kernel."""
  q, k, w = _normal(83, (1, 37, 3, 32)), _normal(84, (1, 37, 32)), _normal(85, (1, 37, 3))
  pos = jnp.broadcast_to(jnp.arange(37, dtype=jnp.int32), (1, 37))
  for rows in (slice(None), slice(36, 37)):           # 37 queries: tiles; 1 query: decode kernel
    kw = dict(fp8=True, blocks=dsa_indexer.IndexerBlocks(block_q=16, block_k=16))
    f32 = dsa_indexer.indexer_scores(q[:, rows], k, w[:, rows], pos[:, rows], pos, **kw)
    bf16 = dsa_indexer.indexer_scores(q[:, rows], k, w[:, rows], pos[:, rows], pos,
                                      out_dtype=jnp.bfloat16, **kw)
    assert bf16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(bf16, np.float32), np.asarray(f32.astype(jnp.bfloat16), np.float32))


@pytest.mark.parametrize("fp8", [False, True])
def test_indexer_kernel_two_heads_per_step(fp8):
  """heads_per_step=2 over 5 heads: two loop steps + a one-head remainder; same sums as 1."""
  q, k, w = _normal(80, (1, 21, 5, 16)), _normal(81, (1, 21, 16)), _normal(82, (1, 21, 5))
  pos = jnp.broadcast_to(jnp.arange(21, dtype=jnp.int32), (1, 21))
  blocks = lambda hps: dsa_indexer.IndexerBlocks(block_q=16, block_k=16, heads_per_step=hps)
  got = dsa_indexer.indexer_scores(q, k, w, pos, pos, fp8=fp8, blocks=blocks(2))
  _assert_scores_close(got, dsa.indexer_scores_reference(q, k, w, fp8=fp8), 1e-4)
  _assert_scores_close(got, dsa_indexer.indexer_scores(q, k, w, pos, pos, fp8=fp8, blocks=blocks(1)), 1e-6)
  with pytest.raises(ValueError, match="heads_per_step"):
    dsa_indexer.IndexerBlocks(heads_per_step=0)


def test_indexer_kernel_decode_over_a_cache_with_empty_slots():
  q, k, w = _normal(3, (1, 1, 2, 16)), _normal(4, (1, 24, 16)), _normal(5, (1, 1, 2))
  kv_pos = jnp.where(jnp.arange(24) < 19, jnp.arange(24), -1)[None].astype(jnp.int32)
  q_pos = jnp.full((1, 1), 18, jnp.int32)
  got = dsa.indexer_scores(q, k, w, q_positions=q_pos, kv_positions=kv_pos, fp8=False,
                           implementation="pallas")
  ref = dsa.indexer_scores_reference(q, k, w, q_positions=q_pos, kv_positions=kv_pos)
  _assert_scores_close(got, ref, 1e-5)
  assert np.isinf(np.asarray(got)[:, :, 19:]).all()


def _case(seed, length, heads, kv_heads, dim, dv, top_k, batch=2):
  q = _normal(seed, (batch, length, heads, dim))
  k = _normal(seed + 1, (batch, length, kv_heads, dim))
  v = _normal(seed + 2, (batch, length, kv_heads, dv))
  scores = dsa.indexer_scores_reference(_normal(seed + 3, (batch, length, 2, 16)),
                                        _normal(seed + 4, (batch, length, 16)),
                                        _normal(seed + 5, (batch, length, 2)))
  return q, k, v, dsa.top_k_indices(scores, top_k)


def test_sparse_kernel_forward_and_gradients_gqa_odd_length():
  q, k, v, idx = _case(10, 7, 4, 2, 8, 12, 5, batch=2)  # dims 8, 12 -> 16; K 5 -> 16; 28 programs
  ref = lambda q, k, v: dsa.sparse_attention_reference(q, k, v, idx)
  ct = _normal(20, (2, 7, 4, 12))
  want, want_grads = _out_and_grads(ref, ct, q, k, v)
  for blocks in (dsa_attention.SparseBlocks(block_h=16, block_k=16),
                 dsa_attention.SparseBlocks(block_h=16, block_k=16, heads_together=True)):
    fast = lambda q, k, v, blocks=blocks: dsa_attention.sparse_attention(q, k, v, idx, blocks=blocks)
    got, grads = _out_and_grads(fast, ct, q, k, v)
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(grads, want_grads, atol=1e-5, rtol=1e-5)


def test_sparse_kernel_forward_over_many_steps():
  """Several gather steps per program (K = 37 of 40 at 8 rows a step: 5 steps, the last partly
  empty): separate v (GQA), and MLA's shared latent with a RoPE key part."""
  blocks = dsa_attention.SparseBlocks(block_h=16, block_k=8)
  q, k, v, idx = _case(70, 40, 4, 2, 16, 16, 37, batch=1)
  chex.assert_trees_all_close(dsa_attention.sparse_attention(q, k, v, idx, blocks=blocks),
                              dsa.sparse_attention_reference(q, k, v, idx), atol=1e-5, rtol=1e-5)
  q, kv, _, idx = _case(71, 40, 16, 1, 48, 32, 37, batch=1)
  kr = _normal(72, (1, 40, 1, 16))
  chex.assert_trees_all_close(
      dsa_attention.sparse_attention(q, kv[..., :32], None, idx, k_rope=kr, blocks=blocks),
      dsa.sparse_attention_reference(q, jnp.concatenate([kv[..., :32], kr], -1), kv[..., :32], idx),
      atol=1e-5, rtol=1e-5)


def test_sparse_kernel_shared_kv_forward_and_gradient():
  """k = v (MLA's latent): one gather for both MMAs, dk + dv into one buffer; 20 heads -> 2 blocks."""
  q, kv, _, idx = _case(60, 6, 20, 1, 24, 24, 5, batch=1)
  ref = lambda q, kv: dsa.sparse_attention_reference(q, kv, kv, idx)
  ct = _normal(61, (1, 6, 20, 24))
  want, want_grads = _out_and_grads(ref, ct, q, kv)
  # other head blocks in the backward: 20 heads padded to 64 forward and to 32 backward, or back
  for blocks in (dsa_attention.SparseBlocks(block_h=16, block_k=16),
                 dsa_attention.SparseBlocks(block_h=64, block_k=16, bwd_block_h=16),
                 dsa_attention.SparseBlocks(block_h=16, block_k=16, bwd_block_h=64),
                 # the value dims over 2 programs, each gathering the latent as 2 column blocks
                 # (its own first, the value tile), a query's 2 head blocks side by side
                 dsa_attention.SparseBlocks(block_h=16, block_k=16, dv_splits=2, heads_together=True)):
    fast = lambda q, kv, blocks=blocks: dsa_attention.sparse_attention(q, kv, kv, idx, blocks=blocks)
    got, grads = _out_and_grads(fast, ct, q, kv)
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(grads, want_grads, atol=1e-5, rtol=1e-5)
  split = dsa_attention.SparseBlocks(block_h=32, block_k=16, num_splits=2)   # v=None: shared too
  chex.assert_trees_all_close(dsa_attention.sparse_attention(q, kv, None, idx, blocks=split),
                              want, atol=1e-5, rtol=1e-5)


def test_sparse_kernel_mla_split_key_forward_gradients_and_decode():
  """MLA's key [latent ; RoPE] with the latent as the value: 24 + 6 dims (both padded), 20 heads."""
  q, kv, _, idx = _case(80, 9, 20, 1, 30, 24, 6, batch=1)
  latent, rope_dim = 24, 6
  k_rope = _normal(81, (1, 9, 1, rope_dim))
  scale = 0.3
  ref = lambda q, kv, kr: dsa.sparse_attention_reference(q, jnp.concatenate([kv, kr], -1), kv, idx,
                                                         scale=scale)
  ct = _normal(82, (1, 9, 20, latent))
  args = (q, kv[..., :latent], k_rope)
  want, want_grads = _out_and_grads(ref, ct, *args)
  for blocks in (dsa_attention.SparseBlocks(block_h=16, block_k=16),
                 dsa_attention.SparseBlocks(block_h=32, block_k=16, bwd_block_h=16),
                 dsa_attention.SparseBlocks(block_h=32, block_k=16, dv_splits=2)):   # 2 x 16 value dims
    fast = lambda q, kv, kr, blocks=blocks: dsa_attention.sparse_attention(
        q, kv, None, idx, k_rope=kr, scale=scale, blocks=blocks)
    got, grads = _out_and_grads(fast, ct, *args)
    chex.assert_shape(got, (1, 9, 20, latent))
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(grads, want_grads, atol=1e-5, rtol=1e-5)
  split = dsa_attention.SparseBlocks(block_h=32, block_k=16, num_splits=2)
  chex.assert_trees_all_close(
      dsa_attention.sparse_attention(q, kv[..., :latent], None, idx, k_rope=k_rope, scale=scale, blocks=split),
      want, atol=1e-5, rtol=1e-5)
  # powers of two with R | D (V3.2's 512 + 64): the kernels read q's two parts in place
  q2, kv2, _, idx2 = _case(83, 9, 16, 1, 48, 24, 6, batch=1)
  kr2 = _normal(84, (1, 9, 1, 16))
  fast2 = lambda q, kv, kr: dsa_attention.sparse_attention(q, kv, None, idx2, k_rope=kr,
                                                           blocks=dsa_attention.SparseBlocks(16, 16))
  ref2 = lambda q, kv, kr: dsa.sparse_attention_reference(q, jnp.concatenate([kv, kr], -1), kv, idx2)
  ct2 = _normal(85, (1, 9, 16, 32))
  args2 = (q2, kv2[..., :32], kr2)
  (got2, grads2), (want2, want_grads2) = (_out_and_grads(f, ct2, *args2) for f in (fast2, ref2))
  chex.assert_trees_all_close(got2, want2, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(grads2, want_grads2, atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="q's head dim"):
    dsa_attention.sparse_attention(q[..., :28], kv[..., :latent], None, idx, k_rope=k_rope)
  with pytest.raises(ValueError, match="dv_splits"):   # 32 padded value dims: parts of 16 at most
    dsa_attention.sparse_attention(q, kv[..., :latent], None, idx, k_rope=k_rope,
                                   blocks=dsa_attention.SparseBlocks(16, 16, dv_splits=4))
  with pytest.raises(ValueError, match="shared form"):
    dsa_attention.sparse_attention(q, kv[..., :latent], kv[..., :latent] + 1, idx, k_rope=k_rope)


def test_indexer_kernel_on_quantized_and_transposed_keys():
  """FP8Keys quantized once = the fp8 path quantizing per call; k stored [d, S] likewise."""
  q, k, w = _normal(70, (1, 21, 2, 16)), _normal(71, (1, 21, 16)), _normal(72, (1, 21, 2))
  pos = jnp.broadcast_to(jnp.arange(21, dtype=jnp.int32), (1, 21))
  want = dsa_indexer.indexer_scores(q, k, w, pos, pos, fp8=True,
                                    blocks=dsa_indexer.IndexerBlocks(block_q=16, block_k=16))
  keys = dsa.quantize_index_keys(k)
  got = dsa_indexer.indexer_scores(q, keys, w, pos, pos,
                                   blocks=dsa_indexer.IndexerBlocks(block_q=16, block_k=16, k_transposed=True))
  _assert_scores_close(got, want, 1e-6)
  _assert_scores_close(got, dsa.indexer_scores_reference(q, k, w, fp8=True), 1e-4)


def test_sparse_kernel_mqa_split_k_decode_form():
  """MQA: one row serves all 4 heads; 2 steps a split. Early queries see fewer keys than a split
  holds (a split of only -1 slots: lse -inf); outputs and gradients through the merged lse."""
  q, k, v, idx = _case(30, 45, 4, 1, 16, 16, 40, batch=1)
  ct = _normal(31, (1, 45, 4, 16))
  want, want_grads = _out_and_grads(lambda *a: dsa.sparse_attention_reference(*a, idx), ct, q, k, v)
  blocks = dsa_attention.SparseBlocks(block_h=16, block_k=16, num_splits=2)
  got, grads = _out_and_grads(lambda *a: dsa_attention.sparse_attention(*a, idx, blocks=blocks), ct, q, k, v)
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(grads, want_grads, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_kernels_on_gpu_bf16():
  q, k, v, idx = _case(40, 300, 16, 1, 128, 128, 64)
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  got = dsa.sparse_attention(q, k, v, idx, implementation="pallas")
  ref = dsa.sparse_attention_reference(q, k, v, idx)
  err = jnp.linalg.norm((got - ref).astype(jnp.float32)) / jnp.linalg.norm(ref.astype(jnp.float32))
  assert err < 1e-2, err
  ct = _normal(41, ref.shape, jnp.bfloat16)
  gf = jax.grad(lambda *a: jnp.sum((dsa.sparse_attention(*a, idx, implementation="pallas") * ct)
                                   .astype(jnp.float32)), argnums=(0, 1, 2))(q, k, v)
  gr = jax.grad(lambda *a: jnp.sum((dsa.sparse_attention_reference(*a, idx) * ct)
                                   .astype(jnp.float32)), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(gf, gr):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    assert jnp.linalg.norm(a - b) / jnp.linalg.norm(b) < 2e-2
  # shared k = v (MQA latent), forward and gradients, at the benchmark's head block sizes
  for blocks in (None, dsa_attention.SparseBlocks(block_h=64, block_k=16, num_warps=8)):
    fs = lambda q, kv, blocks=blocks: dsa_attention.sparse_attention(q, kv, kv, idx, blocks=blocks)
    rs = lambda q, kv: dsa.sparse_attention_reference(q, kv, kv, idx)
    got, ref = fs(q, k), rs(q, k)
    err = jnp.linalg.norm((got - ref).astype(jnp.float32)) / jnp.linalg.norm(ref.astype(jnp.float32))
    assert err < 1e-2, (blocks, err)
    gf = jax.grad(lambda *a: jnp.sum((fs(*a) * ct).astype(jnp.float32)), argnums=(0, 1))(q, k)
    gr = jax.grad(lambda *a: jnp.sum((rs(*a) * ct).astype(jnp.float32)), argnums=(0, 1))(q, k)
    for a, b in zip(gf, gr):
      a, b = a.astype(jnp.float32), b.astype(jnp.float32)
      assert jnp.linalg.norm(a - b) / jnp.linalg.norm(b) < 2e-2, blocks
  qi, ki, w = _normal(42, (1, 300, 8, 128)), _normal(43, (1, 300, 128)), _normal(44, (1, 300, 8))
  for fp8 in (False, True, "keys"):   # "keys": a quantized key cache (FP8Keys)
    kb = ki.astype(jnp.bfloat16)
    got = dsa.indexer_scores(qi.astype(jnp.bfloat16), dsa.quantize_index_keys(kb) if fp8 == "keys" else kb,
                             w, fp8=bool(fp8), implementation="pallas")
    ref = dsa.indexer_scores_reference(qi, ki, w, fp8=bool(fp8))
    fin = np.isfinite(np.asarray(ref))
    err = np.linalg.norm(np.asarray(got)[fin] - np.asarray(ref)[fin]) / np.linalg.norm(np.asarray(ref)[fin])
    assert err < 3e-2, (fp8, err)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("rope_dim", [0, 64])
def test_sparse_kernel_mla_latent_default_blocks_on_gpu(rope_dim):
  """The benchmark's MLA shape (128 heads over one 512-dim latent, k = v; with rope_dim, V3.2's
  key [latent ; 64 RoPE dims]) with default_blocks (latent alone: 64 heads a program at 8 warps
  in the forward; with RoPE: 32 at 4), forward and gradients against the reference."""
  blocks = dsa_attention.default_blocks(300, 64, 512, 128, rope_dim)
  assert (blocks.block_h, blocks.num_warps) == ((32, 4) if rope_dim else (64, 8))
  q, kv, _, idx = _case(50, 300, 128, 1, 512 + rope_dim, 512, 64, batch=1)
  q, kv = q.astype(jnp.bfloat16) * 0.1, kv[..., :512].astype(jnp.bfloat16)
  kr = _normal(52, (1, 300, 1, rope_dim), jnp.bfloat16) if rope_dim else None
  fast = lambda q, kv, kr: dsa_attention.sparse_attention(q, kv, None, idx, k_rope=kr)
  ref = lambda q, kv, kr: dsa.sparse_attention_reference(
      q, kv if kr is None else jnp.concatenate([kv, kr], -1), kv, idx)
  rel = lambda a, b: float(jnp.linalg.norm((a - b).astype(jnp.float32)) / jnp.linalg.norm(b.astype(jnp.float32)))
  assert rel(jax.jit(fast)(q, kv, kr), ref(q, kv, kr)) < 1e-2
  # the Triton forward (with RoPE the default is the Mosaic one), the value dims split over 2
  # programs of 64 heads at 4 warps (an M = 64 MMA), and a query's head blocks side by side
  for variant in (dataclasses.replace(blocks, forward_kernel="triton"),
                  dsa_attention.SparseBlocks(block_h=64, block_k=32, num_warps=4, num_stages=2, dv_splits=2),
                  dsa_attention.SparseBlocks(block_h=32, block_k=64, num_warps=4, heads_together=True,
                                             forward_kernel="triton")):
    got_v = jax.jit(lambda q, kv, kr, b=variant: dsa_attention.sparse_attention(q, kv, None, idx, k_rope=kr, blocks=b))
    assert rel(got_v(q, kv, kr), ref(q, kv, kr)) < 1e-2, variant
  ct = _normal(51, (*q.shape[:3], 512), jnp.bfloat16)
  argnums = (0, 1, 2) if rope_dim else (0, 1)
  grads = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum((f(*a) * ct).astype(jnp.float32)), argnums=argnums))(
      q, kv, kr)
  for a, b in zip(grads(fast), grads(ref)):
    assert rel(a, b) < 2e-2
  # decode: one query over top-k 2048 of the 300 + 4000 keys, split K (64 rows a step with RoPE)
  q1 = _normal(53, (1, 1, 128, 512 + rope_dim), jnp.bfloat16) * 0.1
  kv1 = _normal(54, (1, 4300, 1, 512), jnp.bfloat16)
  idx1 = jax.random.permutation(jax.random.key(54), 4300)[:2048].astype(jnp.int32)[None, None]
  kr1 = _normal(55, (1, 4300, 1, rope_dim), jnp.bfloat16) if rope_dim else None
  decode_blocks = dsa_attention.default_blocks(1, 2048, 512, 128, rope_dim)
  assert (decode_blocks.block_k, decode_blocks.num_stages) == ((64, 2) if rope_dim else (32, 2))
  got1 = jax.jit(lambda q, kv, kr: dsa_attention.sparse_attention(q, kv, None, idx1, k_rope=kr))(q1, kv1, kr1)
  ref1 = dsa.sparse_attention_reference(q1, kv1 if kr1 is None else jnp.concatenate([kv1, kr1], -1), kv1, idx1)
  assert rel(got1, ref1) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_chunked_indexer_top_k_on_gpu_skips_future_tiles_safely():
  """The prefill path at the benchmark's indexer shape (fp8, bf16 scores, future tiles unwritten:
  garbage on a GPU; the Mosaic kernel on Hopper) selects what the Triton kernel selects with
  every tile written (explicit key positions). The two kernels sum the heads in different
  orders, so a bf16 score at a rounding boundary may differ and swap a near-tie at the
  top-k's edge: at most 0.1% of the indices may differ, and none may be in the future."""
  length = 4096
  qi = _normal(92, (1, length, 64, 128)).astype(jnp.bfloat16)
  ki = _normal(93, (1, length, 128)).astype(jnp.bfloat16)
  w = _normal(94, (1, length, 64)) * (64 * 128) ** -0.5
  run = jax.jit(lambda qi, ki, w, kv=None: dsa.indexer_top_k(
      qi, ki, w, top_k=256, fp8=True, chunk=1024, implementation="pallas", topk_implementation="pallas",
      kv_positions=kv))
  got = np.asarray(run(qi, ki, w))[0]
  want = np.asarray(run(qi, ki, w, jnp.arange(length)[None]))[0]
  t = np.broadcast_to(np.arange(length)[:, None], got.shape)
  assert (got[got >= 0] <= t[got >= 0]).all()
  np.testing.assert_array_equal((got >= 0).sum(-1), (want >= 0).sum(-1))
  common = sum(len(np.intersect1d(a[a >= 0], b[b >= 0])) for a, b in zip(got, want))
  assert common >= 0.999 * (want >= 0).sum(), (common, (want >= 0).sum())


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_indexer_kernel_variants_on_gpu():
  """The prefill scoring kernel at the benchmark's head shape (64 x 128) under the swept launch
  parameters (two heads per step, 256-key tiles, 128-query tiles), bf16 and fp8 operands."""
  qi, ki, w = _normal(90, (1, 300, 64, 128)), _normal(91, (1, 300, 128)), _normal(92, (1, 300, 64)) * 0.01
  pos = jnp.broadcast_to(jnp.arange(300, dtype=jnp.int32), (1, 300))
  for fp8 in (False, True):
    ref = np.asarray(dsa.indexer_scores_reference(qi, ki, w, fp8=fp8))
    fin = np.isfinite(ref)
    for blocks in (dsa_indexer.IndexerBlocks(heads_per_step=2),
                   dsa_indexer.IndexerBlocks(block_k=256, num_warps=8, heads_per_step=2),
                   dsa_indexer.IndexerBlocks(block_q=128, num_warps=8, num_stages=3),
                   None):   # None: default_indexer_blocks
      got = np.asarray(dsa_indexer.indexer_scores(qi.astype(jnp.bfloat16), ki.astype(jnp.bfloat16), w, pos, pos,
                                                  fp8=fp8, blocks=blocks))
      np.testing.assert_array_equal(np.isfinite(got), fin)
      err = np.linalg.norm(got[fin] - ref[fin]) / np.linalg.norm(ref[fin])
      assert err < 3e-2, (fp8, blocks, err)


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.bfloat16])
def test_mosaic_indexer_lowers_for_hopper_on_cpu(dtype):
  """The Mosaic GPU kernel cannot run on CPU, but it lowers for CUDA here: CI checks its
  tracing and Mosaic lowering (layouts, slices, barriers) on every change."""
  s = jax.ShapeDtypeStruct
  f = jax.jit(lambda *a: dsa_indexer_mgpu.scores(*a, kv_len=200, out_dtype=jnp.bfloat16))
  args = (s((1, 40, 64, 128), dtype), s((1, 256, 128), dtype), s((1, 40, 64), jnp.float32),
          s((1, 256), jnp.float32), s((1, 40), jnp.int32))
  assert "lca_dsa_indexer_mgpu" in f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  tile = jax.jit(lambda *a: dsa_indexer_mgpu.scores(*a, kv_len=200, out_dtype=jnp.bfloat16,
                                                    config=dsa_indexer_mgpu.Config(direct_store=False)))
  assert "lca_dsa_indexer_mgpu" in tile.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  with pytest.raises(ValueError, match="multiples of 8"):
    f.trace(s((1, 36, 64, 128), dtype), s((1, 256, 128), dtype), s((1, 36, 64), jnp.float32),
            s((1, 256), jnp.float32), s((1, 36), jnp.int32))
  for cfg in (dsa_indexer_mgpu.Config(prefetch_scale=False), dsa_indexer_mgpu.Config(pingpong=False)):
    g = jax.jit(lambda *a, cfg=cfg: dsa_indexer_mgpu.scores(*a, kv_len=200, out_dtype=jnp.bfloat16, config=cfg))
    assert "lca_dsa_indexer_mgpu" in g.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def test_indexer_kernel_choice_errors_name_the_reason():
  q, k, w = _normal(95, (1, 40, 2, 16)), _normal(96, (1, 40, 16)), _normal(97, (1, 40, 2))
  pos = jnp.broadcast_to(jnp.arange(40, dtype=jnp.int32), (1, 40))
  with pytest.raises(ValueError, match="kernel must be"):
    dsa_indexer.indexer_scores(q, k, w, pos, kernel="cuda")
  with pytest.raises(ValueError, match="kernel='mosaic' cannot run this case: interpret mode"):
    dsa_indexer.indexer_scores(q, k, w, pos, fill_future=False, kernel="mosaic")
  assert dsa_indexer_mgpu.supported(q, k, fill_future=True, default_kv=True, interpret=False) is not None


def _hopper() -> bool:
  return jax.default_backend() == "gpu" and str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9")


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU")
@pytest.mark.parametrize("fp8", [True, False])
def test_mosaic_indexer_matches_reference_and_triton_on_gpu(fp8):
  """700 queries at positions 800..1499 (3 of them padding, -1) over 1500 keys (neither a
  multiple of the kernel's tiles): visible scores match the reference and the Triton kernel,
  masked entries in written tiles are -inf, bf16 output is the f32 sums rounded."""
  length, keys = 700, 1500
  qi = _normal(98, (1, length, 64, 128)).astype(jnp.bfloat16)
  ki = _normal(99, (1, keys, 128)).astype(jnp.bfloat16)
  w = _normal(100, (1, length, 64)) * (64 * 128) ** -0.5
  qpos = jnp.arange(keys - length, keys, dtype=jnp.int32)[None].at[:, :3].set(-1)
  run = lambda kernel, out=jnp.float32: np.asarray(dsa_indexer.indexer_scores(
      qi, ki, w, qpos, fp8=fp8, fill_future=False, kernel=kernel, out_dtype=out)).astype(np.float32)[0]
  got, triton = run("mosaic"), run("triton")
  ref = np.asarray(dsa.indexer_scores_reference(qi, ki, w, q_positions=qpos, fp8=fp8))[0]
  t, s = np.asarray(qpos[0])[:, None], np.arange(keys)[None]
  visible = s <= t
  same_tile = (s > t) & (s < (np.maximum(t, 0) // 64 + 1) * 64)   # written by the kernel
  assert np.isfinite(got[visible]).all()
  assert np.isneginf(got[same_tile]).all() and np.isneginf(got[:3, :64]).all()
  err = np.linalg.norm(got[visible] - ref[visible]) / np.linalg.norm(ref[visible])
  assert err < (1e-3 if fp8 else 1e-5), err    # fp8 error is in both (same operands)
  # The same fp8 / bf16 products, summed in another order. Hopper's fp8 wgmma keeps fewer
  # accumulator bits than fp32 (DeepSeek-V3 report, 3.3.2: ~14), so fp8 scores differ by ~2e-4
  # of the largest (measured 1.9e-4 on an H200, session 22); bf16 ones by fp32 rounding.
  scale = np.abs(ref[visible]).max()
  np.testing.assert_allclose(got[visible], triton[visible], rtol=0, atol=(1e-3 if fp8 else 1e-5) * scale)
  rounded = run("mosaic", jnp.bfloat16)
  np.testing.assert_array_equal(rounded[visible], got[visible].astype(jnp.bfloat16).astype(np.float32))


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU")
@pytest.mark.parametrize("config", [dict(pingpong=False), dict(prefetch_scale=False), dict(num_stages=3),
                                    dict(direct_store=False)])
def test_mosaic_indexer_launch_configs_agree_on_gpu(config):
  """Other launch configurations give the default's scores (the same fp8 products); 997 queries (not a multiple of a CTA's 8), the first 11 of them
  padding (the first CTA's 8 queries all padding: it runs no key tile)."""
  length, keys = 997, 2100
  cfg = dsa_indexer_mgpu.Config(**config)
  q8 = _normal(101, (1, length, 64, 128)).astype(jnp.float8_e4m3fn)
  k8 = _normal(102, (1, keys, 128)).astype(jnp.float8_e4m3fn)
  w, ks = _normal(103, (1, length, 64)) * 0.01, jnp.abs(_normal(104, (1, keys))) + 0.5
  qpos = jnp.arange(keys - length, keys, dtype=jnp.int32)[None].at[:, :11].set(-1)
  run = lambda c: np.asarray(dsa_indexer.mosaic_scores(q8, k8, w, ks, qpos, config=c))[0]
  got, want = run(cfg), run(None)
  t, s = np.asarray(qpos[0])[:, None], np.arange(keys)[None]
  written = (s < (t // 64 + 1) * 64) & (t >= 0)   # a CTA of padding queries alone writes nothing
  np.testing.assert_array_equal(np.isneginf(got[written]), np.isneginf(want[written]))
  np.testing.assert_allclose(got[written & (s <= t)], want[written & (s <= t)], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fp8", [False, True])
def test_indexer_decode_kernel_matches_reference(fp8):
  """Few queries: heads as the MMA rows (5 heads padded to 16), odd cache length, batch 2."""
  q, k, w = _normal(50, (2, 2, 5, 32)), _normal(51, (2, 45, 32)), _normal(52, (2, 2, 5))
  q_pos = jnp.array([[30, 31], [43, 44]], jnp.int32)
  kv_pos = jnp.broadcast_to(jnp.arange(45, dtype=jnp.int32), (2, 45))
  got = dsa_indexer.indexer_scores(q, k, w, q_pos, kv_pos, fp8=fp8)
  ref = dsa.indexer_scores_reference(q, k, w, q_positions=q_pos, kv_positions=kv_pos, fp8=fp8)
  _assert_scores_close(got, ref, 1e-4)


def test_indexer_decode_kernel_quantizes_a_bf16_query_itself():
  """FP8 decode with a bf16 query: the kernel rotates and quantizes q per program (5 heads
  padded to 16, odd cache length); the same q8 and scores as `fp8_query_operands` ahead of the
  kernel, and as the reference; bf16 scores rounded once."""
  q = _normal(53, (2, 1, 5, 32), jnp.bfloat16)
  k, w = _normal(54, (2, 45, 32), jnp.bfloat16), _normal(55, (2, 1, 5))
  q_pos = jnp.array([[30], [44]], jnp.int32)
  kv_pos = jnp.broadcast_to(jnp.arange(45, dtype=jnp.int32), (2, 45))
  keys = dsa.quantize_index_keys(k)
  got = dsa_indexer.indexer_scores(q, keys, w, q_pos, kv_pos)
  q8, w8 = dsa_indexer.fp8_query_operands(q, w)
  ahead = dsa_indexer.indexer_scores_decode_kernel(q8, keys.values, w8, keys.scale[..., 0], q_pos, kv_pos,
                                                   interpret=True)
  scale = np.abs(np.asarray(got)[np.isfinite(got)]).max()
  _assert_scores_close(got / scale, ahead / scale, 1e-6)
  ref = dsa.indexer_scores_reference(q, k, w, q_positions=q_pos, kv_positions=kv_pos, fp8=True)
  _assert_scores_close(got / scale, ref / scale, 1e-6)
  bf16 = dsa_indexer.indexer_scores(q, keys, w, q_pos, kv_pos, out_dtype=jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(bf16, np.float32), np.asarray(got.astype(jnp.bfloat16), np.float32))
  # a program walking several key tiles (45 keys -> 3 tiles of 16, 1 or 3 a program)
  run = functools.partial(dsa_indexer.indexer_scores_decode_kernel, q, keys.values, w, keys.scale[..., 0],
                          q_pos, kv_pos, block_k=16, interpret=True)
  for tiles in (1, 3):
    _assert_scores_close(run(tiles_per_program=tiles) / scale, got / scale, 1e-6)
  with pytest.raises(ValueError, match="tiles_per_program"):
    run(tiles_per_program=2)
  assert [dsa_indexer.decode_tiles_per_program(r, t) for r, t in ((1, 512), (8, 512), (1, 64), (1, 3))] == [2, 8, 1, 1]


def test_mosaic_row_gather_probe_lowers_on_cpu():
  """experiments/probe_mosaic_gather.py (per-row TMA boxes into a RefUnion's flat view) lowers for CUDA."""
  from experiments import probe_mosaic_gather   # pylint: disable=g-import-not-at-top
  layout_size, rate_size = probe_mosaic_gather.lower_for_cuda()
  assert layout_size > 0 and rate_size > layout_size


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs a Hopper GPU")
def test_mosaic_row_gather_probe_layout_on_gpu():
  """The gathered rows read back through the tiled view equal kv[idx]."""
  from experiments import probe_mosaic_gather as probe   # pylint: disable=g-import-not-at-top
  kv = jax.random.normal(jax.random.key(0), (3000, probe.D), jnp.bfloat16)
  idx = jax.random.permutation(jax.random.key(1), 3000)[:probe.R].astype(jnp.int32)
  np.testing.assert_array_equal(np.asarray(probe.layout_kernel()(kv, idx)), np.asarray(kv[idx]))


def test_sparse_kernel_variants_lower_for_the_gpu(monkeypatch):
  """The forward's launch variants lower to Triton for an H100 on this machine (no GPU needed):
  the value dims split over 2 programs with the latent read as column blocks chosen by the
  program's part, and a query's head blocks side by side (a 5-axis grid folded into CUDA's x);
  with the latter, the backward's kernels too."""
  from jax._src.pallas.triton import gpu_info  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(gpu_info, "get_gpu_info",
                      lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100))
  sds = jax.ShapeDtypeStruct
  args = (sds((1, 70000, 128, 576), jnp.bfloat16), sds((1, 70000, 1, 512), jnp.bfloat16),
          sds((1, 70000, 1, 64), jnp.bfloat16), sds((1, 70000, 2048), jnp.int32))
  together = dsa_attention.SparseBlocks(block_h=32, block_k=64, num_stages=3, heads_together=True)
  for blocks in (dsa_attention.SparseBlocks(block_h=64, block_k=32, dv_splits=2), together):
    f = lambda q, kv, kr, idx, blocks=blocks: dsa_attention.sparse_attention(
        q, kv, None, idx, k_rope=kr, blocks=blocks, interpret=False)
    assert "dsa_sparse_attention_fwd" in jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  # the backward's two kernels in the heads_together order (5 axes of the forward's grid, 3 and 4 here)
  loss = lambda q, kv, kr, idx: jnp.sum(dsa_attention.sparse_attention(
      q, kv, None, idx, k_rope=kr, blocks=together, interpret=False).astype(jnp.float32))
  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert "dsa_sparse_attention_bwd_dq" in text and "dsa_sparse_attention_bwd_dkv" in text


def test_decode_probe_times_the_default_launch_first():
  """experiments/probe_dsa_decode.py labels its first split-K launch 'default': it must be the one
  default_blocks gives a V3.2 decode step (128 heads, 512 + 64 key dims, top-k 2048)."""
  from experiments import probe_dsa_decode   # pylint: disable=g-import-not-at-top
  name, first = next(iter(probe_dsa_decode.SPARSE_LAUNCHES.items()))
  assert name.startswith("default")
  forward = lambda b: (b.block_h, b.block_k, b.num_splits, b.num_warps, b.num_stages, b.dv_splits)
  assert forward(first) == forward(dsa_attention.default_blocks(1, 2048, 512, 128, 64)), first


def test_mosaic_profile_summary_reads_cycles_and_the_period():
  """bench_common.mosaic_profile_summary (probe_dsa_indexer --profile) reads Mosaic's trace (ts in
  SM cycles / 1e3, one tid a warpgroup): each region's cycles and the period between a
  warpgroup's entries to the period region."""
  from experiments import bench_common   # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(5)
  events, epilogues, periods = [], [], []
  for tid in (1, 2):
    t = float(rng.uniform(0, 50))
    for _ in range(4):
      start = t
      for name in ("k_wait", "epilogue"):
        cycles = float(rng.integers(100, 900))
        if name == "epilogue":
          epilogues.append(cycles)
        events += [dict(name=name, ph="B", ts=t / 1e3, tid=tid),
                   dict(name=name, ph="E", ts=(t + cycles) / 1e3, tid=tid)]
        t += cycles + 7
      periods.append(t - start)
  text = bench_common.mosaic_profile_summary({"traceEvents": events}, period_region="k_wait")
  row = lambda name: next(l for l in text.splitlines() if l.strip().startswith(name))
  assert f"median {np.median(epilogues):8.0f}" in row("epilogue") and "n 8" in row("epilogue"), text
  between = periods[:3] + periods[4:7]   # the last step of each warpgroup has no successor
  assert f"median {np.median(between):8.0f}" in row("period"), text


def _mla_sparse_case(batch, q_len, kv_len, heads, top_k, seed=90):
  """MLA's absorbed form in bf16: q [B, L, H, 576], latent [B, S, 1, 512], k_rope [B, S, 1, 64],
  distinct random indices with ~10% -1 anywhere in a row, and query 3 with none."""
  q = _normal(seed, (batch, q_len, heads, 576), jnp.bfloat16)
  kv = _normal(seed + 1, (batch, kv_len, 1, 512), jnp.bfloat16)
  kr = _normal(seed + 2, (batch, kv_len, 1, 64), jnp.bfloat16)
  rng = np.random.default_rng(seed + 3)
  idx = np.stack([np.stack([rng.permutation(kv_len)[:top_k] for _ in range(q_len)]) for _ in range(batch)])
  idx = np.where(rng.random(idx.shape) < 0.1, -1, idx)
  idx[:, 3] = -1
  return q, kv, kr, jnp.asarray(idx, jnp.int32)


def test_mosaic_sparse_forward_lowers_for_hopper_on_cpu():
  """Tracing and Mosaic lowering (the inline cp.async gather, layouts, barriers) run without a GPU."""
  sd = jax.ShapeDtypeStruct
  args = (sd((2, 37, 128, 576), jnp.bfloat16), sd((2, 300, 1, 512), jnp.bfloat16),
          sd((2, 300, 1, 64), jnp.bfloat16), sd((2, 37, 200), jnp.int32))
  for cfg in (None, dsa_attention_mgpu.Config(prefetch_ids=False)):
    f = jax.jit(lambda *a, cfg=cfg: dsa_attention_mgpu.forward(*a, scale=0.05, config=cfg))
    assert "lca_dsa_sparse_fwd_mgpu" in f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def test_sparse_forward_kernel_choice_names_the_reason():
  q, kv, kr, idx = _mla_sparse_case(1, 5, 40, 64, 16)
  call = lambda blocks, q=q, kr=kr: dsa_attention.sparse_attention(q, kv, None, idx, k_rope=kr, blocks=blocks)
  with pytest.raises(ValueError, match="interpret mode"):   # CPU: the Mosaic forward cannot run
    call(dsa_attention.SparseBlocks(forward_kernel="mosaic"))
  with pytest.raises(ValueError, match="forward_kernel must be"):
    call(dsa_attention.SparseBlocks(forward_kernel="cuda"))
  with pytest.raises(ValueError, match="RoPE"):
    call(dsa_attention.SparseBlocks(forward_kernel="mosaic"), q=q[..., :512], kr=None)
  assert "bf16" in dsa_attention_mgpu.supported(q.astype(jnp.float32), kv, kr, idx, scale=0.1, interpret=False)
  assert "multiple of 64" in dsa_attention_mgpu.supported(q[:, :, :32], kv, kr, idx, scale=0.1, interpret=False)
  assert "scale" in dsa_attention_mgpu.supported(q, kv, kr, idx, scale=-1.0, interpret=False)
  # "auto" falls back to the Triton forward here: the same output as forcing it
  chex.assert_trees_all_equal(call(dsa_attention.SparseBlocks(block_h=64, block_k=16)),
                              call(dsa_attention.SparseBlocks(block_h=64, block_k=16, forward_kernel="triton")))


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU")
def test_mosaic_sparse_forward_matches_reference_on_gpu():
  """Output and log-sum-exp of the Mosaic forward (batch 2, odd lengths, K = 200 padded to 256,
  -1 anywhere, a query with none) against plain jnp, and gradients through the Triton backward
  that reads them."""
  q, kv, kr, idx = _mla_sparse_case(2, 77, 301, 128, 200)
  scale = 576 ** -0.5
  out, lse = jax.jit(lambda *a: dsa_attention_mgpu.forward(*a, scale=scale))(q, kv, kr, idx)
  key = jnp.concatenate([kv, kr], -1)
  ref = dsa.sparse_attention_reference(q.astype(jnp.float32), key.astype(jnp.float32), kv.astype(jnp.float32),
                                       idx, scale=scale)
  ref_lse = jax.nn.logsumexp(dsa.gathered_logits(q.astype(jnp.float32), key.astype(jnp.float32), idx, scale),
                             axis=-1)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=2e-2, rtol=2e-2)
  assert bool(jnp.all(out[:, 3] == 0)) and bool(jnp.all(lse[:, 3] == -jnp.inf))
  fin = np.isfinite(np.asarray(ref_lse))
  np.testing.assert_allclose(np.asarray(lse)[fin], np.asarray(ref_lse)[fin], atol=1e-4, rtol=1e-4)
  ct = _normal(95, out.shape, jnp.bfloat16)
  def grads(kernel):
    blocks = dataclasses.replace(dsa_attention.default_blocks(77, 200, 512, 128, 64), forward_kernel=kernel)
    f = lambda q, kv, kr: jnp.sum((dsa_attention.sparse_attention(q, kv, None, idx, k_rope=kr, scale=scale,
                                                                  blocks=blocks) * ct).astype(jnp.float32))
    return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, kv, kr)
  for a, b in zip(grads("mosaic"), grads("triton")):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.linalg.norm(a - b) <= 1e-2 * np.linalg.norm(b)
