"""Shared pytest setup.

GPU-marked tests are skipped where there is no GPU. On a GPU, float32 matmuls default
to TF32 (about 3e-4 relative error), too coarse for the suite's tight float32
comparisons against references: tests run them at full float32 precision.
"""

import jax
import pytest

if jax.default_backend() == "gpu":
  jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
  if jax.default_backend() == "gpu":
    return
  skip = pytest.mark.skip(reason="needs a GPU")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)
