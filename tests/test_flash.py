"""pallas_kernels.flash against the reference: forward, all three gradients, masks, errors.

On CPU the kernels run in interpret mode (the real kernel code, slowly): few, small cases.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lca.attention import common, full
from pallas_kernels import flash


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _inputs(seed, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype=jnp.float32):
  kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(kq, (batch, q_len, heads, head_dim), dtype)
  k = jax.random.normal(kk, (batch, kv_len, kv_heads, head_dim), dtype)
  v = jax.random.normal(kv, (batch, kv_len, kv_heads, head_dim), dtype)
  do = jax.random.normal(kd, (batch, q_len, heads, head_dim), dtype)
  return q, k, v, do


def _value_and_grads(fn, q, k, v, do, jit=True):
  """(out, dq, dk, dv) of fn at q, k, v for the output cotangent do. jit: one compile instead
  of one per eager op (CPU suite time); eager for bf16 references, whose rounding after every
  op a fused program could change."""
  def run(q, k, v, do):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(do))
  return (jax.jit(run) if jit else run)(q, k, v, do)


def _segments(seed, batch, length):
  starts = jax.random.bernoulli(jax.random.PRNGKey(seed), 0.06, (batch, length))
  return jnp.cumsum(starts.astype(jnp.int32), axis=1)


CASES = [
    # (q_len, kv_len, heads, kv_heads, head_dim, causal, window, segments)
    pytest.param(197, 197, 6, 2, 32, True, 33, False, id="L197-gqa6:2-window33-causal"),
    pytest.param(97, 97, 4, 4, 64, False, None, True, id="L97-noncausal-segments-d64"),
    # Queries sit at positions i + Lk - Lq = i - 60: the first 41 see no key at all.
    pytest.param(130, 70, 4, 1, 32, False, 20, False, id="Lq130-Lk70-mqa-noncausal-window20"),
]


@pytest.mark.parametrize("q_len,kv_len,heads,kv_heads,head_dim,causal,window,segments", CASES)
def test_fp32_matches_reference(q_len, kv_len, heads, kv_heads, head_dim, causal, window, segments):
  q, k, v, do = _inputs(q_len + kv_len, 2, q_len, kv_len, heads, kv_heads, head_dim)
  seg = _segments(q_len, 2, q_len) if segments else None
  kw = dict(causal=causal, window=window, segment_ids=seg)
  # Through the dispatcher of lca.attention.full, which calls flash.flash_attention.
  got = _value_and_grads(functools.partial(full.attention, implementation="pallas", **kw),
                         q, k, v, do)
  want = _value_and_grads(functools.partial(full.attention_reference, **kw), q, k, v, do)
  for g, shape in zip(got, (q.shape, q.shape, k.shape, v.shape)):
    chex.assert_shape(g, shape)
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    assert np.all(np.isfinite(np.asarray(g))), name
    assert _rel(g, w) < 2e-5, (name, _rel(g, w))
  q_pos, kv_pos = common.default_positions(2, q_len, kv_len)
  mask = common.attention_mask(q_pos, kv_pos, causal=causal, window=window,
                               q_segment_ids=seg, kv_segment_ids=seg)
  empty = ~np.asarray(mask).any(axis=-1)  # [B, Lq]: rows that see no key
  assert empty.any() == (q_len > kv_len)
  np.testing.assert_array_equal(np.asarray(got[0])[empty], 0.0)  # zeros, not NaN
  np.testing.assert_array_equal(np.asarray(got[1])[empty], 0.0)


@pytest.mark.parametrize("qk_dim,v_dim", [(24, 48), (24, 16)])
def test_value_head_dim_differs_from_qk(qk_dim, v_dim):
  """q·k and v head dims each padded on its own (24 -> 32, 48 -> 64); the output has v's width
  (it once came back q·k's: 24 columns, and cut where v was wider than q·k's padding). A narrower
  v is MLA's case (q·k 192, v 128), which mla.MLAttention passes as it is since session 23."""
  q, k, _, _ = _inputs(3, 1, 45, 45, 4, 2, qk_dim)
  _, _, v, do = _inputs(4, 1, 45, 45, 4, 2, v_dim)
  got = _value_and_grads(functools.partial(full.attention, implementation="pallas", causal=True), q, k, v, do)
  want = _value_and_grads(functools.partial(full.attention_reference, causal=True), q, k, v, do)
  for name, g, w, shape in zip(("out", "dq", "dk", "dv"), got, want, (do.shape, q.shape, k.shape, v.shape)):
    chex.assert_shape(g, shape)
    assert _rel(g, w) < 2e-5, (name, _rel(g, w))


def test_bf16_error_within_twice_the_reference_error():
  q, k, v, do = _inputs(7, 1, 197, 197, 6, 2, 64, jnp.float32)
  bf = lambda x: x.astype(jnp.bfloat16)
  exact = _value_and_grads(functools.partial(full.attention_reference, causal=True),
                           *(bf(x).astype(jnp.float32) for x in (q, k, v, do)))
  ref16 = _value_and_grads(functools.partial(full.attention_reference, causal=True),
                           bf(q), bf(k), bf(v), bf(do), jit=False)
  got16 = _value_and_grads(functools.partial(flash.flash_attention, causal=True),
                           bf(q), bf(k), bf(v), bf(do))
  for name, g, r, e in zip(("out", "dq", "dk", "dv"), got16, ref16, exact):
    assert g.dtype == jnp.bfloat16
    assert _rel(g, e) <= 2 * _rel(r, e) + 1e-6, (name, _rel(g, e), _rel(r, e))


def test_every_output_element_is_written():
  """Call the pallas_call level with outputs prefilled with NaN (aliased in place)."""
  batch, length, padded, heads, head_dim = 1, 90, 96, 2, 16  # 6 rows of padding
  q, k, v, do = _inputs(3, batch, padded, padded, heads, heads, head_dim)
  blocks = flash.BlockSizes(block_q=32, block_k=16, block_q_dkv=16, block_k_dkv=32,
                            block_q_dq=32, block_k_dq=16)
  st = flash._Static(causal=True, window=24, scale=0.3, q_len=length, kv_len=length, group=1,
                     segments=False, blocks=blocks, interpret=True)
  do = do.at[:, length:].set(0.0)  # as the launcher's padding makes it
  nan = lambda shape: jnp.full(shape, jnp.nan, jnp.float32)
  out, lse = flash._fwd(q, k, v, None, None, st, out=nan(q.shape),
                        lse=nan((batch, heads, padded)))
  delta = flash._delta(out, do)
  dk, dv = flash._bwd_dkv(q, k, v, do, lse, delta, None, None, st, dk=nan(k.shape),
                          dv=nan(v.shape))
  dq = flash._bwd_dq(q, k, v, do, lse, delta, None, None, st, dq=nan(q.shape))
  for name, x in (("out", out), ("lse", lse), ("dq", dq), ("dk", dk), ("dv", dv)):
    assert not np.isnan(np.asarray(x)).any(), name
  cut = lambda x: x[:, :length]
  ref = full.attention_reference(cut(q), cut(k), cut(v), causal=True, window=24, scale=0.3)
  assert _rel(cut(out), ref) < 2e-5


def test_block_band_is_the_mask():
  """The block ranges cover exactly the visible pairs: every pair outside
  [lo, hi) is invisible and every pair inside [full_lo, full_hi) is visible."""
  for causal, window, q_len, kv_len in ((True, None, 100, 100), (True, 7, 90, 120),
                                         (False, 20, 120, 90), (False, None, 50, 70)):
    st = flash._Static(causal=causal, window=window, scale=1.0, q_len=q_len, kv_len=kv_len,
                       group=1, segments=False, blocks=flash.BlockSizes(), interpret=True)
    t = np.arange(q_len)[:, None] + kv_len - q_len
    s = np.arange(kv_len)[None, :]
    vis = np.asarray(flash._visible(jnp.asarray(t), jnp.asarray(s), None, None, st))
    for bq, bk in ((16, 32), (32, 16)):
      for i in range(-(-q_len // bq)):
        lo, hi, flo, fhi = map(int, flash._kv_block_range(i * bq + kv_len - q_len, bq, bk, st))
        rows = vis[i * bq:(i + 1) * bq]
        seen = np.zeros(rows.shape, bool)
        seen[:, lo * bk:hi * bk] = True
        assert not (rows & ~seen).any()
        assert rows[:, flo * bk:fhi * bk].all()
      for j in range(-(-kv_len // bk)):
        lo, hi, flo, fhi = map(int, flash._q_block_range(j * bk, bq, bk, st))
        cols = vis[:, j * bk:(j + 1) * bk]
        seen = np.zeros(cols.shape, bool)
        seen[lo * bq:hi * bq] = True
        assert not (cols & ~seen).any()
        full_rows = cols[flo * bq:fhi * bq]
        assert full_rows.all() if full_rows.size else True


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(k=np.zeros((1, 8, 4, 16), np.float32)), ValueError, "multiple of num_kv_heads"),
    (dict(q=jnp.zeros((1, 8, 6, 16), jnp.bfloat16)), TypeError, "share a dtype"),
    (dict(q=jnp.zeros((1, 8, 6), jnp.float32)), ValueError, "q must be"),
    (dict(window=0), ValueError, "window"),
    (dict(scale=float("nan")), ValueError, "scale"),
    (dict(segment_ids=jnp.zeros((1, 7), jnp.int32)), ValueError, "segment_ids"),
    (dict(segment_ids=jnp.zeros((1, 8), jnp.float32)), TypeError, "segment_ids"),
    (dict(block_sizes=flash.BlockSizes(block_q=48)), ValueError, "block_q"),
])
def test_bad_arguments_raise(kwargs, error, match):
  args = dict(q=jnp.ones((1, 8, 6, 16), jnp.float32), k=jnp.ones((1, 8, 2, 16), jnp.float32),
              v=jnp.ones((1, 8, 2, 16), jnp.float32))
  args.update(kwargs)
  q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
  if "k" in kwargs:
    v = k
  with pytest.raises(error, match=match):
    flash.flash_attention(q, k, v, **args)


# ----------------------------------------------------------------------------- GPU


def _gpu_cases():
  return [(2, 2048, 16, 16, 128, True, None), (1, 4096, 16, 4, 64, True, 512),
          (2, 1000, 8, 2, 256, False, None), (2, 1537, 8, 8, 128, True, None)]


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("batch,length,heads,kv_heads,head_dim,causal,window", _gpu_cases())
def test_gpu_bf16_against_fp32_reference(batch, length, heads, kv_heads, head_dim, causal, window):
  q, k, v, do = _inputs(length, batch, length, length, heads, kv_heads, head_dim)
  bf = lambda x: x.astype(jnp.bfloat16)
  up = lambda x: bf(x).astype(jnp.float32)
  kw = dict(causal=causal, window=window)
  exact = _value_and_grads(functools.partial(full.attention_reference, **kw),
                           up(q), up(k), up(v), up(do))
  ref16 = _value_and_grads(functools.partial(full.attention_reference, **kw),
                           bf(q), bf(k), bf(v), bf(do), jit=False)
  got = _value_and_grads(jax.jit(functools.partial(flash.flash_attention, **kw)),
                         bf(q), bf(k), bf(v), bf(do))
  for name, g, r, e in zip(("out", "dq", "dk", "dv"), got, ref16, exact):
    assert np.all(np.isfinite(np.asarray(g, np.float32))), name
    assert _rel(g, e) <= 2 * _rel(r, e) + 1e-4, (name, _rel(g, e), _rel(r, e))


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_gpu_fp32_and_fp16():
  q, k, v, do = _inputs(5, 1, 777, 777, 4, 2, 64)
  with jax.default_matmul_precision("highest"):  # XLA's default fp32 dot on GPU is TF32
    want = _value_and_grads(functools.partial(full.attention_reference, causal=True), q, k, v, do)
  got = _value_and_grads(jax.jit(functools.partial(flash.flash_attention, causal=True)),
                         q, k, v, do)
  for g, w in zip(got, want):
    assert _rel(g, w) < 1e-4
  h = lambda x: x.astype(jnp.float16)
  got16 = flash.flash_attention(h(q), h(k), h(v), causal=True)
  assert _rel(got16, want[0]) < 5e-3
