"""pallas_kernels.flash_mgpu (Mosaic GPU forward) against the reference, and the dispatch.

The Mosaic kernel runs only on an sm_90 GPU: the CPU tests check which forward
`flash.flash_attention(forward_kernel=...)` picks, the error for a forced
unsupported case, and that the kernel lowers for CUDA; the GPU tests check the kernel (output, LSE2, gradients through the
Triton backward) on fresh random inputs.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import flash, flash_mgpu


@pytest.mark.parametrize("causal", [True, False])
def test_mosaic_forward_lowers_for_hopper_on_cpu(causal):
  """Tracing and Mosaic lowering (layouts, barriers, TMA) run here without a GPU."""
  s = jax.ShapeDtypeStruct((1, 256, 4, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
  f = jax.jit(lambda q, k, v: flash_mgpu.forward(q, k, v, causal=causal, scale=0.1, q_len=250,
                                                 kv_len=256))
  assert "lca_flash_fwd_mgpu" in f.trace(s, kv, kv).lower(lowering_platforms=("cuda",)).as_text()

def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _inputs(seed, batch, q_len, kv_len, heads, kv_heads, head_dim):
  kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(kq, (batch, q_len, heads, head_dim), jnp.float32)
  k = jax.random.normal(kk, (batch, kv_len, kv_heads, head_dim), jnp.float32)
  v = jax.random.normal(kv, (batch, kv_len, kv_heads, head_dim), jnp.float32)
  do = jax.random.normal(kd, (batch, q_len, heads, head_dim), jnp.float32)
  return q, k, v, do


def test_dispatch_without_a_gpu_kernel():
  """Interpret mode (what CPU runs) always takes the Triton forward; forcing Mosaic
  there, or naming an unknown kernel, raises a ValueError that says why."""
  q = jnp.ones((1, 8, 4, 64), jnp.bfloat16)
  k = jnp.ones((1, 8, 2, 64), jnp.bfloat16)
  choose = functools.partial(flash.choose_forward_kernel, q, k, k, interpret=True)
  assert choose() == "triton"
  assert choose(forward_kernel="triton") == "triton"
  with pytest.raises(ValueError, match="interpret"):
    choose(forward_kernel="mosaic")
  with pytest.raises(ValueError, match="forward_kernel must be one of"):
    choose(forward_kernel="cuda")
  with pytest.raises(ValueError, match="forward_kernel='mosaic' cannot run"):
    flash.flash_attention(q, k, k, interpret=True, forward_kernel="mosaic")
  if jax.default_backend() == "cpu":  # the default interpret=None means CPU -> Triton
    assert flash.choose_forward_kernel(q, k, k) == "triton"


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_gpu_dispatch():
  """On the H100: bf16 hd128 takes Mosaic; a window or fp32 falls back to Triton."""
  q = jnp.ones((1, 8, 4, 128), jnp.bfloat16)
  k = jnp.ones((1, 8, 2, 128), jnp.bfloat16)
  choose = functools.partial(flash.choose_forward_kernel, q, k, k)
  assert choose() == "mosaic"
  assert choose(window=16) == "triton"
  with pytest.raises(ValueError, match="window"):
    choose(window=16, forward_kernel="mosaic")
  f32 = q.astype(jnp.float32)
  assert flash.choose_forward_kernel(f32, f32, f32) == "triton"
  with pytest.raises(ValueError, match="float32"):
    flash.choose_forward_kernel(f32, f32, f32, forward_kernel="mosaic")


@functools.partial(jax.jit, static_argnames=("causal", "scale"))
def _reference_lse2(q, k, causal, scale):
  """LSE2 = log2 sum_s 2^(s2) over visible keys, [B, H, Lq] (+inf for a row that sees
  none), from fp32 inputs; keys bottom-right aligned as flash.py."""
  k = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") * scale
  t = jnp.arange(q.shape[1])[:, None] + k.shape[1] - q.shape[1]
  visible = jnp.arange(k.shape[1])[None, :] <= t if causal else jnp.ones(s.shape[2:], bool)
  lse = jax.nn.logsumexp(jnp.where(visible, s, -jnp.inf), axis=-1) / math.log(2.0)
  return jnp.where(visible.any(-1), lse, jnp.inf)


def _poison(shape, dtype):
  """Best effort: leave NaN in freed device memory that the next output may reuse."""
  x = jnp.full(shape, jnp.nan, dtype)
  x.block_until_ready()
  x.delete()


FWD_CASES = [
    # (batch, q_len, kv_len, heads, kv_heads, head_dim, causal, dtype)
    pytest.param(2, 2048, 2048, 8, 2, 128, True, jnp.bfloat16, id="L2048-gqa4:1-d128-causal"),
    pytest.param(1, 1000, 1000, 6, 2, 64, True, jnp.bfloat16, id="L1000-gqa6:2-d64-causal"),
    pytest.param(2, 1024, 1024, 4, 4, 128, False, jnp.float16, id="L1024-fp16-d128-noncausal"),
    pytest.param(1, 1000, 777, 4, 2, 64, False, jnp.bfloat16, id="Lq1000-Lk777-d64-noncausal"),
    pytest.param(1, 777, 1000, 4, 1, 128, True, jnp.bfloat16, id="Lq777-Lk1000-mqa-causal"),
    # Queries sit at i + Lk - Lq = i - 400: the first 400 rows see no key.
    pytest.param(1, 1000, 600, 4, 2, 64, True, jnp.bfloat16, id="Lq1000-Lk600-empty-rows"),
]


@pytest.mark.parametrize("batch,q_len,kv_len,heads,kv_heads,head_dim,causal,dtype", FWD_CASES)
@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_gpu_forward_and_lse_against_reference(batch, q_len, kv_len, heads, kv_heads,
                                               head_dim, causal, dtype):
  q, k, v, _ = _inputs(q_len + 7 * kv_len, batch, q_len, kv_len, heads, kv_heads, head_dim)
  lo = lambda x: x.astype(dtype)
  up = lambda x: lo(x).astype(jnp.float32)
  ref = jax.jit(functools.partial(flash.flash_reference, causal=causal))  # eager: slow on GPU
  exact = ref(up(q), up(k), up(v))
  ref16 = ref(lo(q), lo(k), lo(v))
  fn = jax.jit(functools.partial(flash.flash_attention, causal=causal, forward_kernel="mosaic"))
  _poison(q.shape, dtype)
  got = fn(lo(q), lo(k), lo(v))
  assert got.dtype == dtype
  got = np.asarray(got, np.float32)
  assert np.all(np.isfinite(got))
  assert _rel(got, exact) <= 2 * _rel(ref16, exact) + 1e-4, (_rel(got, exact),
                                                             _rel(ref16, exact))
  # Row by row too: a row left unwritten (or wrongly masked) fails here.
  row_err = np.abs(got - np.asarray(exact)).max(axis=(0, 2, 3))
  assert row_err.max() < 0.05, int(row_err.argmax())
  if q_len > kv_len and causal:
    np.testing.assert_array_equal(got[:, :q_len - kv_len], 0.0)

  # LSE2 straight from the kernel, on inputs padded as flash_attention pads them.
  cfg = flash_mgpu.Config.default(head_dim)
  pad = lambda x, m: jnp.pad(x, ((0, 0), (0, -x.shape[1] % m), (0, 0), (0, 0)))
  scale = 1 / math.sqrt(head_dim)
  _poison((batch, heads, q_len + (-q_len % cfg.q_tile)), jnp.float32)
  out_p, lse = jax.jit(functools.partial(
      flash_mgpu.forward, causal=causal, scale=scale, q_len=q_len, kv_len=kv_len))(
          pad(lo(q), cfg.q_tile), pad(lo(k), cfg.block_kv), pad(lo(v), cfg.block_kv))
  np.testing.assert_array_equal(np.asarray(out_p, np.float32)[:, :q_len], got)
  want = np.asarray(_reference_lse2(up(q), up(k), causal, scale))
  lse = np.asarray(lse)[:, :, :q_len]
  np.testing.assert_array_equal(np.isinf(lse), np.isinf(want))
  fin = np.isfinite(want)
  np.testing.assert_allclose(lse[fin], want[fin], atol=2e-3, rtol=1e-4)


GRAD_CASES = [
    pytest.param(1, 1000, 8, 2, 128, True, id="L1000-gqa4:1-d128-causal"),
    pytest.param(2, 512, 4, 4, 64, False, id="L512-d64-noncausal"),
]


@pytest.mark.parametrize("batch,length,heads,kv_heads,head_dim,causal", GRAD_CASES)
@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_gpu_gradients_with_mosaic_forward(batch, length, heads, kv_heads, head_dim, causal):
  """Mosaic forward + Triton backward: all three gradients within 2x the bf16 error."""
  q, k, v, do = _inputs(length + heads, batch, length, length, heads, kv_heads, head_dim)
  bf = lambda x: x.astype(jnp.bfloat16)
  up = lambda x: bf(x).astype(jnp.float32)

  def value_and_grads(fn):
    def run(q, k, v, do):
      out, vjp = jax.vjp(fn, q, k, v)
      return (out, *vjp(do))
    return jax.jit(run)  # one compile (op by op, the reference's VJP took ~60 s on the GPU)
  ref = value_and_grads(functools.partial(flash.flash_reference, causal=causal))
  exact = ref(up(q), up(k), up(v), up(do))
  ref16 = ref(bf(q), bf(k), bf(v), bf(do))
  got = value_and_grads(functools.partial(flash.flash_attention, causal=causal,
                                          forward_kernel="mosaic"))(bf(q), bf(k), bf(v), bf(do))
  for name, g, r, e in zip(("out", "dq", "dk", "dv"), got, ref16, exact):
    assert g.dtype == jnp.bfloat16, name
    assert np.all(np.isfinite(np.asarray(g, np.float32))), name
    assert _rel(g, e) <= 2 * _rel(r, e) + 1e-4, (name, _rel(g, e), _rel(r, e))
