"""pallas_kernels.gated_delta_bwd (in-chunk backward kernel) against the batched XLA vjp of
gated_delta._chunk_local, on random states and end-state adjoints.

On CPU the kernel runs in interpret mode: a few small cases only.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lca.attention import linear
from pallas_kernels import gated_delta_bwd


def _inputs(seed, *, chunks=3, heads=2, dk=16, dv=32, dtype=jnp.float32):
  length = chunks * gated_delta_bwd.CHUNK
  ks = jax.random.split(jax.random.key(seed), 8)
  q = linear.l2_normalize(jax.random.normal(ks[0], (1, length, heads, dk))).astype(dtype)
  k = linear.l2_normalize(jax.random.normal(ks[1], (1, length, heads, dk))).astype(dtype)
  v = jax.random.normal(ks[2], (1, length, heads, dv)).astype(dtype)
  beta = jax.nn.sigmoid(jax.random.normal(ks[3], (1, length, heads)))
  # Mild decay (g_C ~ -2.5 over a chunk): e^{g_C} terms must not vanish from the comparison.
  log_alpha = -0.05 * jax.nn.softplus(2.0 * jax.random.normal(ks[4], (1, length, heads)) - 1.0)
  states = jax.random.normal(ks[5], (1, heads, chunks * dk, dv))
  dstates = jax.random.normal(ks[6], (1, heads, chunks * dk, dv))
  do = jax.random.normal(ks[7], (1, length, heads, dv)).astype(dtype)
  return q, k, v, beta, log_alpha, states, dstates, do


_NAMES = ("dq", "dk", "dv", "dbeta", "dlog_alpha")


@pytest.mark.parametrize("delta, block_v", [(True, None), (False, 16)])
def test_kernel_matches_batched_vjp(delta, block_v):
  """Two value blocks of 16 (the loop over V sums partial dP, dT, dQ, dK)."""
  args = _inputs(int(delta))
  kw = dict(scale=0.3, delta=delta)
  got = gated_delta_bwd.chunk_local_grads(*args, **kw, config=gated_delta_bwd.Config(block_v=block_v))
  # the reference jitted: one compile, not one per eager op (CPU suite time)
  want = jax.jit(lambda *a: gated_delta_bwd.chunk_local_grads_reference(*a, **kw))(*args)
  for name, x, y, x_in in zip(_NAMES, got, want, args):
    assert x.shape == x_in.shape and x.dtype == x_in.dtype, name
    scale = float(jnp.max(jnp.abs(y)))
    assert delta or name != "dbeta" or scale == 0.0
    np.testing.assert_allclose(x, y, atol=1e-5 * scale + 1e-7, rtol=1e-4, err_msg=name)
  assert float(jnp.max(jnp.abs(got[-1]))) > 0.1  # the decay gradient is exercised


def test_bad_arguments_raise():
  args = _inputs(2, chunks=1)
  with pytest.raises(ValueError, match="block_v"):
    gated_delta_bwd.chunk_local_grads(*args, scale=0.3, delta=True, config=gated_delta_bwd.Config(block_v=24))
  with pytest.raises(ValueError, match="states"):
    gated_delta_bwd.chunk_local_grads(*args[:5], args[5][:, :, :8], *args[6:], scale=0.3, delta=True)


def _rel_err(x, y):
  x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
  return float(np.linalg.norm(x - y) / np.linalg.norm(y))


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("delta", [True, False])
def test_kernel_bf16_on_gpu_matches_fp32_vjp(delta):
  args = _inputs(3, chunks=4, heads=4, dk=128, dv=128, dtype=jnp.bfloat16)
  kw = dict(scale=128 ** -0.5, delta=delta)
  got = gated_delta_bwd.chunk_local_grads(*args, **kw)
  f32 = [x.astype(jnp.float32) for x in args]
  want = gated_delta_bwd.chunk_local_grads_reference(*f32, **kw)  # fp32, HIGHEST
  for name, x, y in zip(_NAMES, got, want):
    if name == "dbeta" and not delta:
      assert float(jnp.max(jnp.abs(x))) == 0.0
      continue
    assert _rel_err(x, y) < 2e-2, (name, _rel_err(x, y))


def test_custom_vjp_local_grads_switch():
  """The custom_vjp's backward with the kernel (default) and with Config(local_grads="xla")
  (the batched-vjp reference) gives the same gradients end to end, tail padding included."""
  from pallas_kernels import gated_delta  # pylint: disable=g-import-not-at-top
  q, k, v, beta, log_alpha, _, _, do = _inputs(5, chunks=2, heads=1, dk=16, dv=16)
  q, k, v, beta, log_alpha, do = (x[:, :100] for x in (q, k, v, beta, log_alpha, do))  # padded tail

  def grads(local_grads):
    def loss(*a):
      o, _ = gated_delta.chunk_gated_delta_rule(*a, config=gated_delta.Config(local_grads=local_grads))
      return jnp.sum(o * do)
    grad = jax.grad(loss, range(5))
    # the XLA local grads are many small ops: jitted, one compile instead of one per eager op
    # (CPU suite time; jitting the kernel path too measured no faster)
    return (jax.jit(grad) if local_grads == "xla" else grad)(q, k, v, beta, log_alpha)

  for name, got, want in zip(_NAMES, grads(gated_delta_bwd.Config()), grads("xla")):
    scale = float(jnp.max(jnp.abs(want)))
    assert scale > 0, name
    np.testing.assert_allclose(got, want, atol=1e-5 * scale, rtol=1e-4, err_msg=name)
