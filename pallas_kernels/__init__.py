"""Pallas GPU kernels (Triton lowering), each with its launcher and custom_vjp.

Every kernel takes `interpret=None`: interpret mode when the default backend is
CPU, so the CPU test suite runs the real kernel code.
"""

import jax
import jax.numpy as jnp


def pad_axis(x, axis: int, size: int, fill=0):
  """x padded with `fill` at the end of `axis` to `size` (kernel tiles need whole blocks and
  power-of-two head dims); None, and arrays already of that size, pass through."""
  if x is None or x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=fill)


def resolve_interpret(interpret: bool | None) -> bool:
  """None -> interpret when the default backend is CPU."""
  return jax.default_backend() == "cpu" if interpret is None else bool(interpret)
