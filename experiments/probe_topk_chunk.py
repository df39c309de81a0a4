"""Probe: the top-k kernel on one causal [2048, 128k] chunk of random scores (GPU): the sampled
search vs the whole-row search, exactness against lax.top_k, and how many rows the sample sent to
the whole-row search. Session 14 ran this code as topk_check_s14.py
(experiments/results/bench_dsa_h200/topk_check_s14.log).

  python -m experiments.probe_topk_chunk
"""

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_common
from pallas_kernels import dsa_topk

LENGTH, ROWS, K = 131072, 2048, 2048


def main():
  print(jax.devices()[0].device_kind, flush=True)
  x = jax.random.normal(jax.random.key(0), (ROWS, LENGTH))
  n = jnp.arange(LENGTH - ROWS, LENGTH, dtype=jnp.int32) + 1      # the last causal chunk's rows
  blocks = dsa_topk.TopKBlocks
  for dt in (jnp.bfloat16, jnp.float32):
    xs = x.astype(dt)
    visible = jnp.where(jnp.arange(LENGTH) < n[:, None], xs.astype(jnp.float32), -jnp.inf)
    ref = np.sort(np.asarray(jax.lax.top_k(visible, K)[1]), -1)
    variants = [("sample", blocks()), ("radix", blocks(sample=False))]
    if dt == jnp.bfloat16:
      # session 15: the default is now sample_every 32 with 4 bits a pass when sampling
      variants += [("every16 bits2 (session 14 default)", blocks(sample_every=16, bits=2)),
                   ("every16 bits4", blocks(sample_every=16, bits=4)), ("bits2", blocks(bits=2)),
                   ("block2048", blocks(block=2048)), ("every64", blocks(sample_every=64)),
                   ("warps8", blocks(num_warps=8))]
    for name, b in variants:
      f = jax.jit(lambda s, n, b=b: dsa_topk.top_k(s, K, lengths=n, split=1, blocks=b))
      exact = bool((np.sort(np.asarray(f(xs, n)), -1) == ref).all())
      print(dt.__name__, name, exact, f"{1e3 * bench_common.bench(f, xs, n, reps=9):.3f} ms", flush=True)
    collect = jax.jit(lambda s, n: dsa_topk.collect_candidates(s, n, k=K))
    c = collect(xs, n)
    print("failed", int(((c[2] >= 0) & (c[3] != 0)).sum()), "mean", float(c[2].mean()), flush=True)
    # the first call alone (sample search + collecting pass); the rest of "sample" is the search
    # over the collected keys
    print(dt.__name__, f"collect call alone {1e3 * bench_common.bench(collect, xs, n, reps=9):.3f} ms", flush=True)


if __name__ == "__main__":
  main()
