"""RoPE scaling for context extension: PI, NTK-aware, YaRN against hand-computed values."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lca import model as model_lib
from lca.attention import full
from lca.layers import rope

PLAIN = np.array([1.0, 0.1, 0.01, 0.001])  # base 10^4, head_dim 8: 10^4^(-2i/8)


@pytest.mark.parametrize("scaling", rope.ROPE_SCALINGS)
def test_reduces_to_plain_rope_at_scale_one(scaling):
  freqs, factor = rope.scaled_rope_frequencies(8, 1e4, scaling, 1.0, original_length=256)
  np.testing.assert_allclose(freqs, PLAIN, rtol=1e-6)
  assert factor == 1.0


def test_position_interpolation_hand_values():
  freqs, factor = rope.scaled_rope_frequencies(8, 1e4, "pi", 4.0)
  np.testing.assert_allclose(freqs, PLAIN / 4, rtol=1e-6)
  assert factor == 1.0
  # theta / s rotates exactly like positions t / s.
  x = jax.random.normal(jax.random.key(0), (1, 5, 2, 8))
  pos = jnp.arange(5)[None] * 7
  chex.assert_trees_all_close(rope.apply_rope(x, pos, freqs),
                              rope.apply_rope(x, pos / 4.0, rope.rope_frequencies(8, 1e4)), atol=1e-5)


def test_ntk_hand_values():
  freqs, factor = rope.scaled_rope_frequencies(8, 1e4, "ntk", 4.0)
  new_base = 1e4 * 4.0 ** (8 / 6)
  np.testing.assert_allclose(freqs, [new_base ** (-2 * i / 8) for i in range(4)], rtol=1e-5)
  assert factor == 1.0
  assert freqs[0] == 1.0 and freqs[-1] < PLAIN[-1]  # highest frequency kept, lowest stretched


def test_yarn_hand_values():
  s, length = 8.0, 256
  freqs, factor = rope.scaled_rope_frequencies(8, 1e4, "yarn", s, original_length=length)
  # r_i = L / wavelength = 256 theta_i / 2pi = 40.74, 4.074, 0.407, 0.041; gamma = clip((r - 1) / 31).
  r1 = length * 0.1 / (2 * math.pi)
  g1 = (r1 - 1) / 31
  expected = [1.0, (1 - g1) * 0.1 / s + g1 * 0.1, 0.01 / s, 0.001 / s]
  np.testing.assert_allclose(freqs, expected, rtol=1e-5)
  assert factor == pytest.approx(0.1 * math.log(8) + 1)


def test_yarn_ramp_endpoints():
  np.testing.assert_allclose(rope.yarn_ramp(jnp.array([0.5, 1.0, 16.5, 32.0, 40.0])), [0, 0, 0.5, 1, 1])


@pytest.mark.parametrize("kwargs, match", [
    (dict(scaling="linear", factor=2.0), "scaling"),
    (dict(scaling="pi", factor=0.5), "factor"),
    (dict(scaling="yarn", factor=4.0), "original_length"),
])
def test_bad_scaling_raises(kwargs, match):
  with pytest.raises(ValueError, match=match):
    rope.scaled_rope_frequencies(8, 1e4, **kwargs)


def test_model_config_rejects_bad_scaling():
  with pytest.raises(ValueError, match="scaling"):
    model_lib.ModelConfig(rope_scaling="yarn2")
  with pytest.raises(ValueError, match="original_length"):
    model_lib.ModelConfig(rope_scaling="yarn", rope_scaling_factor=4.0)


def test_attention_layer_uses_scaling():
  x = jax.random.normal(jax.random.key(1), (2, 9, 16))
  pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
  make = lambda **kw: full.Attention(16, 2, 2, 8, rngs=nnx.Rngs(0), **kw)
  plain, _ = make()(x, pos)
  same, _ = make(rope_scaling="yarn", rope_scaling_factor=1.0, rope_original_length=4)(x, pos)
  yarn, _ = make(rope_scaling="yarn", rope_scaling_factor=4.0, rope_original_length=4)(x, pos)
  chex.assert_trees_all_close(plain, same, atol=1e-6)
  assert float(jnp.max(jnp.abs(plain - yarn))) > 1e-3
