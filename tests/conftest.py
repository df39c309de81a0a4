"""Shared pytest setup.

GPU-marked tests are skipped where there is no GPU. On a GPU, float32 matmuls default
to TF32 (about 3e-4 relative error), too coarse for the suite's tight float32
comparisons against references: tests run them at full float32 precision.

On CPU (CI: 2 cores, most of the suite's time is XLA compiling small programs), two
settings cut compile time; both reach every pytest-xdist worker and every subprocess a
test starts (`python -m experiments.train`) through the environment:
- JAX_DISABLE_MOST_OPTIMIZATIONS=1 (`jax_disable_most_optimizations`): XLA:CPU skips
  LLVM's optimization passes (backend optimization level 0): about a third less CPU time
  (tests/test_model.py + test_flash.py: 176 -> 107 s). The programs compute the same
  math; only the machine code is less tuned, so results differ from optimized code at
  the rounding level (~1e-8 relative). JAX_DISABLE_MOST_OPTIMIZATIONS=0 tests fully
  optimized code.
- One persistent XLA compilation cache (JAX_COMPILATION_CACHE_DIR) for the whole run:
  tests that build the same program again (a run killed and resumed, the same model
  trained twice) load it instead of compiling it again. The cache key is the program
  and its compile options, so a hit runs the code a fresh compile would. The folder is
  made fresh for each run and removed at its end; one already set is used and kept.
"""

import os
import shutil
import tempfile

import jax
import pytest

if jax.default_backend() == "gpu":
  jax.config.update("jax_default_matmul_precision", "highest")

_OWN_CACHE_DIR = None  # the cache folder this process made (and removes at the end)
if jax.default_backend() == "cpu":
  os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
  jax.config.update("jax_disable_most_optimizations",
                    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"].lower() in ("1", "true", "yes", "on"))
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # xdist workers find their parent's
    _OWN_CACHE_DIR = tempfile.mkdtemp(prefix="lca-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE_DIR
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE_DIR is not None:
    shutil.rmtree(_OWN_CACHE_DIR, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
  if jax.default_backend() == "gpu":
    return
  skip = pytest.mark.skip(reason="needs a GPU")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)
