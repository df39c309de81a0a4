"""The GPU benchmarks' shared helpers, on CPU: index construction and the timing loops' bookkeeping."""

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_common


def test_causal_spread_indices_are_distinct_causal_and_padded():
  top_k, length = 16, 100
  idx = np.asarray(bench_common.causal_spread_indices(top_k, jnp.arange(length, dtype=jnp.int32)))
  assert idx.shape == (1, length, top_k) and idx.dtype == np.int32
  for t in range(length):
    row = idx[0, t]
    valid = row[row >= 0]
    assert len(valid) == min(t + 1, top_k)                 # -1 only past t + 1 slots
    assert (row[len(valid):] == -1).all()
    assert len(set(valid.tolist())) == len(valid)          # distinct
    assert valid.max() <= t                                # causal
  # long rows spread over [0, t]: the last query's picks reach far back and near t
  last = idx[0, -1]
  assert last[0] == 0 and last[-1] >= length - 1 - length // top_k


def test_interleaved_keeps_zero_times_and_drops_failures():
  calls = []

  def timer(fn, *args, reps):
    calls.append(fn)
    return fn(*args)

  def fails():
    raise RuntimeError("no cuDNN here")

  out = bench_common.interleaved({"zero": ("zero", lambda: 0.0, ()), "one": ("one", lambda: 1.0, ()),
                                  "bad": ("bad", fails, ())}, rounds=3, reps=1, timer=timer)
  assert out == {"zero": 0.0, "one": 1.0, "bad": None}
  assert len(calls) == 3 + 3 + 1      # a failed case is not retried


def test_bench_pipelined_returns_a_time_per_call():
  f = jax.jit(lambda x: x * 2.0)
  t = bench_common.bench_pipelined(f, jnp.ones(8), burst=4, reps=2)
  assert 0.0 < t < 1.0
