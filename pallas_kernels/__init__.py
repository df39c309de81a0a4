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


# Where a kernel has a Mosaic GPU (sm_90) forward beside its Triton one: "auto" (Mosaic where it
# runs the case, else Triton), "triton", "mosaic" (an error naming why where it cannot run)
FORWARD_KERNELS = ("auto", "triton", "mosaic")


def hopper_unavailable(interpret: bool) -> str | None:
  """None when a Mosaic GPU (sm_90) kernel can run here, else why not (interpret mode, the
  backend, the device's compute capability)."""
  if interpret:
    return "interpret mode (Mosaic GPU kernels run only on an sm_90 GPU)"
  if jax.default_backend() != "gpu":
    return f"default backend is {jax.default_backend()!r}, not 'gpu'"
  cc = getattr(jax.devices()[0], "compute_capability", None)
  if cc is None or not str(cc).startswith("9"):
    return f"device compute capability is {cc}, not 9.x (Hopper)"
  return None


def floor_div(x, d: int):
  """floor(x / d) for a traced int x >= 0, after clamping negatives to 0 (lax.div truncates)."""
  return jax.lax.div(jnp.maximum(x, 0), jnp.int32(d))
