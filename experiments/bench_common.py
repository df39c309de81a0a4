"""Timing helpers shared by the GPU benchmark scripts (experiments/bench_*.py)."""

import statistics
import time

import jax


def bench(fn, *args, reps: int = 5) -> float:
  """Median wall seconds of fn(*args) after two warm-up calls (compile included there)."""
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def try_bench(label: str, fn, *args, reps: int) -> float | None:
  """`bench` that prints "label: x ms" and returns seconds, or prints the error and returns None."""
  try:
    t = bench(fn, *args, reps=reps)
    print(f"  {label}: {t * 1e3:.3f} ms", flush=True)
    return t
  except Exception as e:  # pylint: disable=broad-except
    print(f"  {label}: failed: {type(e).__name__}: {str(e)[:400]}", flush=True)
    return None
