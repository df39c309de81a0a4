"""Pallas GPU kernels (Triton lowering), each with its launcher and custom_vjp.

Every kernel takes `interpret=None`: interpret mode when the default backend is
CPU, so the CPU test suite runs the real kernel code.
"""

import jax


def resolve_interpret(interpret: bool | None) -> bool:
  """None -> interpret when the default backend is CPU."""
  return jax.default_backend() == "cpu" if interpret is None else bool(interpret)
