"""DSA top-k by threshold search (pallas_kernels/dsa_topk.py, interpret mode on CPU) vs lax.top_k."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lca.attention import dsa
from pallas_kernels import dsa_topk


def _normal(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _assert_top_k_sets(got, scores, k, lengths=None):
  """Each row of got holds the top-k positions (as a set) of the finite entries, then -1s."""
  s = np.asarray(scores, np.float32).reshape(-1, scores.shape[-1]).copy()
  got = np.asarray(got).reshape(s.shape[0], -1)
  assert got.shape[1] == min(k, s.shape[1])
  if lengths is not None:
    lens = np.broadcast_to(np.asarray(lengths), scores.shape[:-1]).reshape(-1)
    for r, n in enumerate(lens):
      s[r, n:] = -np.inf
  _, want = jax.lax.top_k(jnp.asarray(s), got.shape[1])
  want = np.asarray(want)
  for r in range(s.shape[0]):
    n = min(got.shape[1], int(np.isfinite(s[r]).sum()))
    assert set(got[r, :n].tolist()) == set(want[r, :n].tolist()), f"row {r}"
    assert (got[r, n:] == -1).all(), f"row {r}: slots beyond the {n} finite entries"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_float_keys_preserve_order(dtype):
  big = jnp.finfo(dtype).max
  x = jnp.sort(jnp.concatenate([_normal(0, (200,)) * 1e3, _normal(1, (200,)) * 1e-3,
                                jnp.array([-jnp.inf, -0.0, 0.0, big, -big])]).astype(dtype))
  keys = np.asarray(dsa_topk.float_keys(x)).astype(np.int64)
  assert (np.diff(keys) >= 0).all() and keys[0] == dsa_topk._neg_inf_key(dtype)
  assert (np.diff(keys)[np.diff(np.asarray(x, np.float32)) > 0] > 0).all()   # strictly, where x is
  if dtype != jnp.float32:
    assert -2 ** 15 <= keys.min() and keys.max() < 2 ** 15


def _lowest_positions_top_k(scores, k, lengths):
  """Brute force: per row the k largest finite entries, ties to the lower position -> sorted sets."""
  s = np.asarray(scores, np.float32)
  out = []
  for row, n in zip(s, lengths):
    row = np.where(np.arange(row.size) < n, row, -np.inf)
    order = np.lexsort((np.arange(row.size), -row))[:k]
    out.append(np.sort(order[np.isfinite(row[order])]))
  return out


def _assert_exact_in_order(got, scores, k, lengths):
  """Row r of got is the brute-force top-k (ties to the lower position) in ascending order, then -1."""
  got = np.asarray(got)
  for r, w in enumerate(_lowest_positions_top_k(scores, k, np.asarray(lengths))):
    np.testing.assert_array_equal(got[r, :len(w)], w, err_msg=f"row {r}")
    assert (got[r, len(w):] == -1).all(), f"row {r}: slots beyond the {len(w)} finite entries"


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_top_k_kernel_on_16_bit_scores_is_exact_with_ties_to_lower_positions(dtype):
  """16-bit keys (the FP8 path selects on bf16 scores): rounding makes many ties; the kernel takes
  exactly the k largest, the lowest positions among those equal to the k-th, in one call and split."""
  x = jnp.concatenate([_normal(12, (3, 333)), -jnp.abs(_normal(13, (2, 333))) * 100 - 10,
                       jnp.round(_normal(14, (2, 333)) * 3) / 3], 0).astype(dtype)   # all < -10
  x = x.at[0, 100:].set(-jnp.inf)
  lengths = jnp.array([333, 300, 5, 0, 333, 200, 333])
  want = _lowest_positions_top_k(x, 37, np.asarray(lengths))
  for split, blocks in ((1, None), (3, None), (1, dsa_topk.TopKBlocks(bits=4))):   # default: 2 bits a pass
    got = np.asarray(dsa_topk.top_k(x, 37, lengths=lengths, split=split, blocks=blocks))
    for r, w in enumerate(want):
      assert np.array_equal(np.sort(got[r][got[r] >= 0]), w), (split, blocks, r)
      assert (got[r][len(w):] == -1).all()


def test_top_k_kernel_matches_lax_top_k_as_sets():
  # odd sizes; causal-like rows of lengths 0 .. S (some shorter than k), and -inf entries
  x = _normal(2, (2, 3, 333))
  lengths = jnp.array([[0, 1, 36], [37, 200, 333]])
  _assert_top_k_sets(dsa_topk.top_k(x, 37, lengths=lengths), x, 37, lengths)
  holes = jnp.where(_normal(3, x.shape) > 1.0, -jnp.inf, x)          # few finite in some rows
  _assert_top_k_sets(dsa_topk.top_k(holes[:, :, :70], 64), holes[:, :, :70], 64)


def test_top_k_split_rows_match_lax_top_k():
  """Decode form: each row split into segments, their candidates reduced by a second call;
  the other counting variant (2 bits a pass, per-lane counters) over several blocks a row."""
  x = _normal(4, (2, 300))
  lengths = jnp.array([100, 300])
  blocks = dsa_topk.TopKBlocks(block=32, bits=2, accumulate=True)
  _assert_top_k_sets(dsa_topk.top_k(x, 40, lengths=lengths, split=4, blocks=blocks), x, 40, lengths)


def test_top_k_with_ties_takes_exactly_k():
  x = jnp.round(_normal(5, (3, 200)) * 2) / 2                        # many equal values
  got = np.asarray(dsa_topk.top_k(x, 50))
  xs = np.asarray(x)
  for r in range(3):
    kth = np.sort(xs[r])[-50]
    assert len(set(got[r].tolist())) == 50 and (got[r] >= 0).all()
    assert (xs[r, got[r]] >= kth).all()
    assert set(np.flatnonzero(xs[r] > kth)) <= set(got[r].tolist())


def test_indexer_top_k_pallas_selects_the_xla_sets():
  """Chunked indexer + top-k: the kernel path (with causal lengths) picks the same keys."""
  b, length, heads, dim = 1, 21, 2, 16
  qi, ki = _normal(6, (b, length, heads, dim)), _normal(7, (b, length, dim))
  w = _normal(8, (b, length, heads))
  kw = dict(top_k=6, fp8=False, chunk=8, implementation="xla")
  want = dsa.indexer_top_k(qi, ki, w, topk_implementation="xla", **kw)
  got = dsa.indexer_top_k(qi, ki, w, topk_implementation="pallas", **kw)
  chex.assert_equal(got.shape, want.shape)
  np.testing.assert_array_equal(np.sort(np.asarray(got), -1), np.sort(np.asarray(want), -1))


def test_top_k_select_rejects_bad_k():
  with pytest.raises(ValueError, match="top_k"):
    dsa.top_k_select(_normal(9, (1, 2, 8)), 0, implementation="pallas")
  with pytest.raises(ValueError, match="unknown DSA top-k implementation"):
    dsa.top_k_select(_normal(9, (1, 2, 8)), 2, implementation="sort")


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (compiled Triton kernel)")
def test_top_k_kernel_on_gpu_at_dsa_sizes():
  """A causal prefill chunk ([64, 32k], k = 2048) and a decode row (128k, collected over segments),
  by sample then collect (the default: no row fails on random scores) and by the radix search
  alone; rows of equal scores fail the collection and take the full-row search."""
  width, k = 32768, 2048
  x = _normal(10, (64, width))
  lengths = jnp.linspace(0, width, 64).astype(jnp.int32)
  _assert_top_k_sets(jax.jit(lambda x, n: dsa_topk.top_k(x, k, lengths=n))(x, lengths), x, k, lengths)
  row = _normal(11, (1, 4 * width))
  _assert_top_k_sets(jax.jit(lambda x: dsa_topk.top_k(x, k))(row), row, k)
  row16 = row.astype(jnp.bfloat16)                  # a decode step's selection: the default takes the kernel
  _assert_top_k_sets(jax.jit(lambda x: dsa.top_k_select(x[None], k))(row16)[0], row16, k)
  xb = x.astype(jnp.bfloat16)                       # 16-bit keys (the FP8 path's selection)
  _, _, count, direct = dsa_topk.collect_candidates(xb, lengths, k=k)
  assert (np.asarray(direct) == (np.asarray(lengths) <= 6144)).all(), np.asarray(count)
  xb = xb.at[-2:].set(1.0)                          # all equal: more than C collected, fallback
  for blocks in (dsa_topk.TopKBlocks(), dsa_topk.TopKBlocks(sample=False)):
    got = jax.jit(lambda x, n, blocks=blocks: dsa_topk.top_k(x, k, lengths=n, blocks=blocks))(xb, lengths)
    _assert_exact_in_order(got, xb, k, lengths)


# Sample, then collect (the default for rows longer than TopKBlocks.capacity): small k and C so
# that rows of a few thousand entries take it; k = 128, C = 2048, 1 in 8 sampled: z = 12, the
# threshold's rank in the sample 64, ~512 collected a row.
_SAMPLED = dsa_topk.TopKBlocks(capacity=2048, sample_every=8)


# the segmented calls' lists (the sample, the collected) from memory block by block (list_block=0),
# and in registers only when short (512: ~512 collected a row, so some rows take each way; the
# samples, 1152+ entries, from memory); the default (4096) takes both in registers
_LIST_VARIANTS = (dataclasses.replace(_SAMPLED, list_block=0),
                  dataclasses.replace(_SAMPLED, list_block=512, list_bits=4))


# one program a row (the prefill's calls): the collecting pass with every line's takes stored by
# the branch (line_slots 0) or all but the first (1); the default (3) takes the branch rarely;
# prefetch_line (the default) carries each step's lines loaded one step early; without it, each
# step loads its own (with 1 slot: the branch as well)
_ROW_VARIANTS = (dataclasses.replace(_SAMPLED, segments=1, line_slots=0),
                 dataclasses.replace(_SAMPLED, segments=1, line_slots=1),
                 dataclasses.replace(_SAMPLED, segments=1, line_slots=1, prefetch_line=False))


def _sampled_positions(width, blocks):
  pos = np.arange(width)
  return pos % (blocks.sample_every * blocks.sample_run) < blocks.sample_run


def test_sample_plan_balances_the_two_tails():
  rank, z = dsa_topk.sample_plan(2048, 6144, 16)      # the defaults at DSA's k
  assert rank == 222 and 8.2 < z < 8.4
  assert dsa_topk.sample_plan(128, 2048, 8) == (64, 12.0)
  launch = lambda width, k, blocks: dsa_topk._launch(width, jnp.bfloat16, k, blocks)
  assert launch(131072, 2048, dsa_topk.TopKBlocks()).sample
  assert not launch(131072, 2048, dsa_topk.TopKBlocks(sample=False)).sample
  assert not launch(6144, 2048, dsa_topk.TopKBlocks()).sample          # no row longer than C
  assert not launch(131072, 5000, dsa_topk.TopKBlocks()).sample        # C too close to k: z = 1.9
  assert launch(131072, 5000, dsa_topk.TopKBlocks(capacity=16384)).sample
  with pytest.raises(ValueError, match="sample_run"):
    launch(131072, 2048, dsa_topk.TopKBlocks(sample_run=24))
  with pytest.raises(ValueError, match="list_block"):
    launch(131072, 2048, dsa_topk.TopKBlocks(list_block=3000))
  with pytest.raises(ValueError, match="list_bits"):
    launch(131072, 2048, dsa_topk.TopKBlocks(list_bits=3))
  with pytest.raises(ValueError, match="line_slots"):
    launch(131072, 2048, dsa_topk.TopKBlocks(line_slots=9))


@pytest.mark.parametrize("dtype,ties", [(jnp.float32, False), (jnp.bfloat16, False), (jnp.bfloat16, True),
                                        (jnp.float16, True)], ids=["f32", "bf16", "bf16_ties", "f16_ties"])
def test_sampled_top_k_is_exact(dtype, ties):
  """Long rows (odd lengths), rows between k and C, shorter than k, empty, with -inf holes, and
  NaN past the length (never read): the exact top-k in position order, through the sample (each
  long row collected, none failed) with one program a row (segments=1) and with the collection
  split over segments (few rows: the default), with the radix search alone
  (sample=False), and split."""
  width, k = 13_000, 128
  x = _normal(20, (8, width))
  if ties:                                            # few distinct values: big groups at c and T
    x = jnp.round(x * 3) / 3
  x = x.at[5].set(jnp.where(_normal(21, (width,)) > 2.0, x[5], -jnp.inf))   # ~300 finite
  x = x.at[6].set(jnp.where(_normal(22, (width,)) > 2.5, x[6], -jnp.inf))   # ~80 finite < k
  x = x.astype(dtype)
  lengths = jnp.array([width, 12_345, 2049, 1500, 100, 9000, width, 0])
  x = jnp.where(jnp.arange(width) < lengths[:, None], x, jnp.nan)           # beyond: never read
  _, _, count, direct = dsa_topk.collect_candidates(x, lengths, k=k, blocks=_SAMPLED)
  np.testing.assert_array_equal(np.asarray(direct), [0, 0, 0, 1, 1, 0, 0, 1])
  count = np.asarray(count)
  assert (k <= count[:3]).all() and (count[:3] <= 2048).all(), count
  assert count[5] <= 300 and count[6] < k, count      # all their finite entries: exact, not failed
  lists = (*_LIST_VARIANTS, *_ROW_VARIANTS) if dtype == jnp.bfloat16 else ()   # one dtype: CI's time
  for blocks in (_SAMPLED, dataclasses.replace(_SAMPLED, segments=1),
                 dataclasses.replace(_SAMPLED, sample=False), *lists):
    _assert_exact_in_order(dsa_topk.top_k(x, k, lengths=lengths, split=1, blocks=blocks), x, k, lengths)
  if dtype == jnp.float32:                            # split (decode): segments longer than C
    got = dsa_topk.top_k(x[:3], k, lengths=lengths[:3], split=2, blocks=_SAMPLED)
    _assert_exact_in_order(got, x[:3], k, lengths[:3])


def test_sampled_top_k_falls_back_when_the_sample_misleads():
  """Rows on which the collection fails, each answered exactly by the full-row search: all equal
  (every entry >= c: more than C), large values at the sampled positions only (c too high: fewer
  than k >= c), large values hidden from the sample (more than C >= c); a normal row beside them
  is collected. Split over segments (few rows), only the second fails: the regions hold every
  collected entry, so more than C collected costs time, not exactness."""
  width, k, blocks = 8192, 128, _SAMPLED
  sampled = jnp.asarray(_sampled_positions(width, blocks))
  x = _normal(23, (4, width))
  x = x.at[0].set(1.0)
  x = x.at[1].set(jnp.where(sampled, x[1] + 10, x[1]))
  x = x.at[2].set(jnp.where(~sampled & (jnp.arange(width) < 3000), x[2] + 10, x[2]))
  x = x.astype(jnp.bfloat16)
  lengths = jnp.array([width, width, width, 7777])
  _, _, count, direct = dsa_topk.collect_candidates(x, lengths, k=k, blocks=blocks)
  np.testing.assert_array_equal(np.asarray(direct), [1, 1, 1, 0])
  count = np.asarray(count)
  assert count[0] > 2048 and count[1] < k and count[2] > 2048, count
  # one program a row (segments=1): the select in the collecting call (the default)
  for blocks in (_SAMPLED, dataclasses.replace(_SAMPLED, segments=1), *_LIST_VARIANTS):
    _assert_exact_in_order(dsa_topk.top_k(x, k, lengths=lengths, split=1, blocks=blocks), x, k, lengths)
  # the two calls one at a time (as a probe times them, and as top_k runs them with
  # fuse_select=False), failed rows included
  one = dataclasses.replace(_SAMPLED, segments=1)
  collected = dsa_topk.collect_candidates(x, lengths, k=k, blocks=one)
  _assert_exact_in_order(dsa_topk.select_candidates(x, lengths, collected, k=k, blocks=one), x, k, lengths)
  with pytest.raises(ValueError, match="do not take the collect"):   # 4 rows: the segmented calls
    dsa_topk.select_candidates(x, lengths, collected, k=k, blocks=_SAMPLED)


def test_segmented_top_k_with_the_top_in_one_segment():
  """Decode rows whose top-k sits in one segment (the most recent keys, or the first), beside a
  row of equal scores (every key collected: more than C, still exact) and one shorter than C
  (searched whole): the regions are read back as one list in position order."""
  width, k = 9000, 128
  x = _normal(24, (4, width))
  recent = jnp.arange(width) >= width - 300
  x = x.at[0].set(jnp.where(recent, x[0] + 8, x[0]))
  x = x.at[1].set(jnp.where(jnp.arange(width) < 200, x[1] + 8, x[1]))
  x = x.at[2].set(0.5)
  x = x.astype(jnp.bfloat16)
  lengths = jnp.array([width, 8999, width, 1999])
  for blocks in (_SAMPLED, *_LIST_VARIANTS):
    _assert_exact_in_order(dsa_topk.top_k(x, k, lengths=lengths, blocks=blocks), x, k, lengths)


def test_top_k_kernels_lower_for_the_gpu(monkeypatch):
  """Both algorithms lower to Triton for an H100 on this machine (no GPU needed): the sampled
  path's gather of the sample, the per-row branches and the early-exit loops included, for a
  prefill chunk (64 rows, one program a row: the select in the collecting call or in a call of its
  own) and a decode row (segmented)."""
  from jax._src.pallas.triton import gpu_info  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(gpu_info, "get_gpu_info",
                      lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100))
  for dtype in (jnp.bfloat16, jnp.float32):
    for rows, blocks, names in (
        (64, dsa_topk.TopKBlocks(), ("dsa_topk_collect_select",)),
        (64, dsa_topk.TopKBlocks(fuse_select=False), ("dsa_topk_collect", "dsa_topk_select")),
        (64, dsa_topk.TopKBlocks(prefetch_line=False), ("dsa_topk_collect_select",)),
        (1, dsa_topk.TopKBlocks(), ("dsa_topk_segment_collect", "dsa_topk_segment_select")),
        (4, dsa_topk.TopKBlocks(sample=False), ("dsa_topk",))):
      args = (jax.ShapeDtypeStruct((rows, 131072), dtype), jax.ShapeDtypeStruct((rows,), jnp.int32))
      f = lambda s, n, blocks=blocks: dsa_topk.top_k(s, 2048, lengths=n, blocks=blocks, interpret=False)
      text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
      assert all(name in text for name in names), (dtype, rows, blocks)
