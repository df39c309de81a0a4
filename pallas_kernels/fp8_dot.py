"""FP8 dots in Pallas-Triton kernels without a promotion after every wgmma.

On Hopper, Triton lowers an fp8 x fp8 -> fp32 `tt.dot` to wgmma instructions of 32
products each. Because the tensor cores accumulate fp8 products with reduced precision
(about 14 bits, DeepSeek-V3 §3.3.2), Triton adds the partial sums into a separate fp32
accumulator every `maxNumImpreciseAcc` products. jax's Pallas-Triton lowering never sets
that attribute, so it is 0: a promotion (wait for the wgmma to finish, then add the
whole fp32 tile in registers) after every 32-product instruction, which serializes the
MMAs. That made the DSA indexer's fp8 kernel 1.42x slower than its bf16 one
(pallas_kernels/NOTES_dsa.md, session 6).

`install()` wraps the Triton lowering rule of `lax.dot_general` so that an fp8 dot of
K <= PROMOTE_EVERY products accumulates on the tensor cores alone (jax's lowering starts
every dot from a zero accumulator, so that is exactly "promote to fp32 every 128
products", DeepSeek-V3's recipe), and a longer one promotes every PROMOTE_EVERY. A dot
with `precision=lax.Precision.HIGHEST` keeps Triton's per-instruction promotion (to
measure or compare). Other dtypes are untouched.

This patches a private jax module (`jax._src.pallas.triton.lowering`); if its layout
changes, `install()` logs a warning and leaves the lowering as it is (the kernels still
run, only slower).
"""

from absl import logging
from jax import lax
import jax.numpy as jnp

PROMOTE_EVERY = 128   # fp8 products per fp32 promotion (DeepSeek-V3's N_C)


def _is_fp8(dtype) -> bool:
  return jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize == 1


class _FastAccumulationDialect:
  """The Triton dialect module, with `dot` setting maxNumImpreciseAcc for a K-product dot."""

  def __init__(self, dialect, k: int):
    self._dialect, self._k = dialect, k

  def __getattr__(self, name):
    return getattr(self._dialect, name)

  def dot(self, a, b, c, **kwargs):
    if kwargs.get("max_num_imprecise_acc") is None:
      # Triton promotes when maxNumImpreciseAcc <= K: above K means "never within this dot"
      kwargs["max_num_imprecise_acc"] = PROMOTE_EVERY if self._k > PROMOTE_EVERY else 2 ** 30
    return self._dialect.dot(a, b, c, **kwargs)


def _highest(precision) -> bool:
  if isinstance(precision, tuple):
    return lax.Precision.HIGHEST in precision
  return precision == lax.Precision.HIGHEST


def install() -> bool:
  """Wraps the Pallas-Triton dot_general lowering once; -> whether the wrapper is in place."""
  try:
    from jax._src.pallas.triton import lowering  # pylint: disable=g-import-not-at-top
    rules, dialect = lowering.triton_lowering_rules, lowering.tt_dialect
    original = rules[lax.dot_general_p]
  except (ImportError, AttributeError, KeyError) as e:
    logging.warning("fp8_dot.install: jax's Pallas-Triton lowering changed (%s); fp8 dots keep "
                    "Triton's per-instruction promotion", e)
    return False
  if getattr(original, "_fp8_fast_accumulation", False):
    return True

  def rule(ctx, a, b, *, dimension_numbers, precision, **params):
    if not all(_is_fp8(aval.dtype) for aval in ctx.avals_in) or _highest(precision):
      return original(ctx, a, b, dimension_numbers=dimension_numbers, precision=precision, **params)
    ((a_contract,), _), _ = dimension_numbers
    lowering.tt_dialect = _FastAccumulationDialect(dialect, ctx.avals_in[0].shape[a_contract])
    try:
      return original(ctx, a, b, dimension_numbers=dimension_numbers, precision=precision, **params)
    finally:
      lowering.tt_dialect = dialect

  rule._fp8_fast_accumulation = True  # pylint: disable=protected-access
  rules[lax.dot_general_p] = rule
  return True
