"""pallas_kernels.gated_delta against the recurrent reference and the XLA chunked form.

On CPU the kernels run in interpret mode (slow to compile: a few cases only).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lca.attention import linear
from pallas_kernels import gated_delta


def _inputs(seed, batch=1, length=100, heads=2, dk=16, dv=32, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(seed), 6)
  q = linear.l2_normalize(jax.random.normal(ks[0], (batch, length, heads, dk))).astype(dtype)
  k = linear.l2_normalize(jax.random.normal(ks[1], (batch, length, heads, dk))).astype(dtype)
  v = jax.random.normal(ks[2], (batch, length, heads, dv)).astype(dtype)
  beta = jax.nn.sigmoid(jax.random.normal(ks[3], (batch, length, heads)))
  log_alpha = -jax.nn.softplus(jax.random.normal(ks[4], (batch, length, heads)) - 1.0)
  s0 = jax.random.normal(ks[5], (batch, heads, dk, dv))
  return q, k, v, beta, log_alpha, s0


def _weighted_sum(fn):
  def loss(q, k, v, beta, log_alpha, s0):
    o, s = fn(q, k, v, beta, log_alpha, initial_state=s0)
    wo = jnp.cos(jnp.arange(o.size, dtype=jnp.float32)).reshape(o.shape)
    ws = jnp.sin(jnp.arange(s.size, dtype=jnp.float32)).reshape(s.shape)
    return jnp.sum(o.astype(jnp.float32) * wo) + jnp.sum(s * ws)
  return loss


def test_kernel_forward_and_gradients_match_reference_and_chunked():
  args = _inputs(0)  # length 100: two chunks, the second one padded
  (o, s), vjp = jax.vjp(lambda *a: gated_delta.chunk_gated_delta_rule(*a[:5], initial_state=a[5]), *args)
  # the references jitted: one compile each, not one per eager op (CPU suite time)
  o_ref, s_ref = jax.jit(lambda *a: linear.gated_delta_rule_reference(*a[:5], initial_state=a[5]))(*args)
  o_chk, s_chk = jax.jit(lambda *a: linear.gated_delta_rule_chunked(*a[:5], initial_state=a[5]))(*args)
  for want in ((o_ref, s_ref), (o_chk, s_chk)):
    np.testing.assert_allclose(o, want[0], atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(s, want[1], atol=2e-5, rtol=1e-4)

  wo = jnp.cos(jnp.arange(o.size, dtype=jnp.float32)).reshape(o.shape)
  ws = jnp.sin(jnp.arange(s.size, dtype=jnp.float32)).reshape(s.shape)
  grads = vjp((wo, ws))
  grads_ref = jax.jit(jax.grad(_weighted_sum(linear.gated_delta_rule_reference), range(6)))(*args)
  for name, g, g_ref in zip(("q", "k", "v", "beta", "log_alpha", "s0"), grads, grads_ref):
    scale = float(jnp.max(jnp.abs(g_ref)))
    np.testing.assert_allclose(g, g_ref, atol=1e-5 * scale + 1e-6, rtol=1e-3, err_msg=name)


def test_kernel_gated_linear_forward_matches_reference():
  q, k, v, _, log_alpha, s0 = _inputs(1, length=70, dk=32, dv=16)
  o, s = gated_delta.chunk_gated_delta_rule(q, k, v, None, log_alpha, initial_state=s0)
  o_ref, s_ref = linear.gated_linear_attention_reference(q, k, v, log_alpha, initial_state=s0)
  np.testing.assert_allclose(o, o_ref, atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(s, s_ref, atol=2e-5, rtol=1e-4)


def test_kernel_rejects_unsupported_head_dims():
  q, k, v, beta, log_alpha, _ = _inputs(2, length=8, dk=24)
  with pytest.raises(NotImplementedError, match="power of two"):
    gated_delta.chunk_gated_delta_rule(q, k, v, beta, log_alpha)
  with pytest.raises(NotImplementedError, match="pallas"):  # named in the dispatcher's error
    linear.gated_delta_rule(q, k, v, beta, log_alpha, implementation="pallas")


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("delta", [True, False])
def test_kernel_bf16_on_gpu_matches_chunked(delta):
  q, k, v, beta, log_alpha, s0 = _inputs(3, batch=2, length=1000, heads=4, dk=128, dv=128,
                                         dtype=jnp.bfloat16)
  beta = beta if delta else None
  o, s = jax.jit(gated_delta.chunk_gated_delta_rule)(q, k, v, beta, log_alpha, initial_state=s0)
  f32 = lambda x: x.astype(jnp.float32)
  o_want, s_want = linear.gated_delta_rule_chunked(f32(q), f32(k), f32(v), beta, log_alpha,
                                                   initial_state=s0)
  rel = lambda a, b: float(jnp.linalg.norm(f32(a) - b) / jnp.linalg.norm(b))
  assert rel(o, o_want) < 2e-2 and rel(s, s_want) < 2e-2, (rel(o, o_want), rel(s, s_want))
  loss = lambda fn, *a: jnp.sum(f32(fn(*a)[0]) * jnp.cos(jnp.arange(o.size).reshape(o.shape)))
  args = (f32(q), f32(k), f32(v), beta, log_alpha)
  g = jax.jit(jax.grad(lambda *a: loss(gated_delta.chunk_gated_delta_rule,
                                       *(x.astype(jnp.bfloat16) if i < 3 else x
                                         for i, x in enumerate(a))), (0, 1, 2)))(*args)
  g_want = jax.grad(lambda *a: loss(linear.gated_delta_rule_chunked, *a), (0, 1, 2))(*args)
  for a, b in zip(g, g_want):
    assert rel(a, b) < 3e-2, rel(a, b)
