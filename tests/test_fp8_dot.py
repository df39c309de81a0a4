"""pallas_kernels.fp8_dot: fp8 dots lower with fewer fp32 promotions (checked on CPU by lowering
the DSA indexer kernel for an H100 and reading the Triton IR; the kernel's numbers are checked
against the reference on the GPU in test_dsa_kernels.py)."""

import re

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import dsa_indexer, fp8_dot


def _triton_dots(monkeypatch, dtype, blocks):
  """The `tt.dot` lines of the prefill indexer kernel lowered for an H100 (no GPU needed)."""
  from jax._src.pallas.triton import gpu_info, lowering  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(gpu_info, "get_gpu_info",
                      lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100))
  modules, lower = [], lowering.lower_jaxpr_to_triton_module

  def capture(*args, **kwargs):
    result = lower(*args, **kwargs)
    modules.append(result.module.operation.get_asm())
    return result
  monkeypatch.setattr(lowering, "lower_jaxpr_to_triton_module", capture)
  length, heads, dim = 128, 2, 128
  spec = lambda *shape, dt=dtype: jax.ShapeDtypeStruct(shape, dt)
  args = (spec(1, length, heads, dim), spec(1, length, dim), spec(1, length, heads, dt=jnp.float32),
          spec(1, length, dt=jnp.float32), spec(1, length, dt=jnp.int32), spec(1, length, dt=jnp.int32))
  fn = lambda *a: dsa_indexer.indexer_scores_kernel(*a, blocks=blocks, interpret=False)
  jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  return [line for m in modules for line in m.splitlines() if "tt.dot" in line]


@pytest.mark.parametrize("dtype,blocks,expect", [
    (jnp.float8_e4m3fn, dsa_indexer.IndexerBlocks(), 2 ** 30),     # K = 128: no promotion inside
    (jnp.float8_e4m3fn, dsa_indexer.IndexerBlocks(fp8_fast_accumulation=False), None),
    (jnp.bfloat16, dsa_indexer.IndexerBlocks(), None),
], ids=["fp8", "fp8_promote_every_wgmma", "bf16"])
def test_fp8_indexer_dot_sets_max_num_imprecise_acc(monkeypatch, dtype, blocks, expect):
  assert fp8_dot.install()
  dots = _triton_dots(monkeypatch, dtype, blocks)
  assert dots, "no tt.dot in the lowered kernel"
  for line in dots:
    found = re.search(r"maxNumImpreciseAcc = (\d+)", line)
    assert (int(found.group(1)) if found else None) == expect, line


def test_long_fp8_dots_promote_every_128_products():
  class Dialect:
    def dot(self, a, b, c, **kwargs):
      return kwargs
  assert fp8_dot._FastAccumulationDialect(Dialect(), 512).dot(1, 2, 3)["max_num_imprecise_acc"] == 128  # pylint: disable=protected-access
  assert fp8_dot._FastAccumulationDialect(Dialect(), 64).dot(1, 2, 3)["max_num_imprecise_acc"] > 64  # pylint: disable=protected-access
