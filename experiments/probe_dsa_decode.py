"""Probe: where a DSA decode step's time goes (GPU), kernel by kernel.

The step is `bench_dsa`'s `dsa_total_ms` (FP8 key cache, bf16 scores, the default top-k, the
split-K sparse attention in MLA's absorbed form). For each length: every GPU kernel of the step
with its median duration (profiler, 16 steps in one jitted loop), the kernels a step, the span
a step, and the device time a step (`bench_in_loop`). With --ab_prefix (an older commit's
`pallas_kernels/dsa_{indexer,topk,attention}.py` saved as experiments/_ab_*.py) the step with those
indexer, top-k and attention modules and with this one are profiled, timed in turn over 3 rounds,
and their outputs compared. --sparse_sweep: the sparse attention alone and the whole step with
other split-K launches, all timed in turn over 3 rounds (single timings of these ~0.03 ms calls
moved by 2-5 µs between processes). --indexer_sweep: the decode indexer kernel alone.

  python -m experiments.probe_dsa_decode [--lengths=131072] [--batch=1] [--ab_prefix=experiments._ab_]
"""

import functools
import importlib

from absl import app
from absl import flags

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_common
from lca.attention import dsa
from pallas_kernels import dsa_attention, dsa_indexer, dsa_topk

_LENGTHS = flags.DEFINE_list("lengths", ["131072"], "Context lengths.")
_BATCH = flags.DEFINE_integer("batch", 1, "Sequences a step.")
_AB = flags.DEFINE_string("ab_prefix", "", "Import prefix of another copy of the three kernel modules "
                          "(e.g. experiments._ab_ for experiments/_ab_dsa_indexer.py, _ab_dsa_topk.py, "
                          "_ab_dsa_attention.py): that step is profiled and timed against this one.")
_INNER = flags.DEFINE_integer("inner", 64, "Steps in one jitted loop (bench_in_loop).")
_SPARSE_SWEEP = flags.DEFINE_bool("sparse_sweep", False, "Also time the sparse attention alone and the whole "
                                  "step with other split-K launches (SPARSE_LAUNCHES), in turn.")
_INDEXER_SWEEP = flags.DEFINE_bool("indexer_sweep", False, "Also time the decode indexer kernel alone: the "
                                   "query quantized ahead by XLA or in the kernel, by tiles a program.")

HEADS, LATENT, ROPE, INDEX_HEADS, INDEX_DIM, TOP_K = 128, 512, 64, 64, 128, 2048
_B = dsa_attention.SparseBlocks
SPARSE_LAUNCHES = {   # the default first (the launch `default_blocks` gives a decode step)
    "default (16 splits, 64 rows, 8 warps, 2 stages)": _B(block_h=32, block_k=64, num_splits=16, num_warps=8,
                                                          num_stages=2),
    "32 rows, 3 stages (session 18)": _B(block_h=32, block_k=32, num_splits=16, num_warps=8, num_stages=3),
    "64 rows, 3 stages": _B(block_h=32, block_k=64, num_splits=16, num_warps=8, num_stages=3),
    "8 splits, 64 rows, 2 stages": _B(block_h=32, block_k=64, num_splits=8, num_warps=8, num_stages=2),
}


def operands(length, batch):
  """The step's inputs, as bench_dsa's decode case builds them (random, bf16; FP8 key cache)."""
  ks = jax.random.split(jax.random.key(length + 1), 6)
  bf = jnp.bfloat16
  q = jax.random.normal(ks[0], (batch, 1, HEADS, LATENT + ROPE), bf)
  latent = jax.random.normal(ks[1], (batch, length, 1, LATENT), bf)
  k_rope = jax.random.normal(ks[2], (batch, length, 1, ROPE), bf)
  qi = jax.random.normal(ks[3], (batch, 1, INDEX_HEADS, INDEX_DIM), bf)
  k8 = jax.jit(dsa.quantize_index_keys)(jax.random.normal(ks[4], (batch, length, INDEX_DIM), bf))
  w = jax.random.normal(ks[5], (batch, 1, INDEX_HEADS), jnp.float32)
  return qi, q, k8, w, latent, k_rope


def positions(length, batch):
  """The new token's position [B, 1] and the cache's key positions [B, L]."""
  return (jnp.full((batch, 1), length - 1, jnp.int32),
          jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length)))


def _in_loop(f, *args, reps):
  """`bench_common.interleaved`'s timer for cases whose fn is a partial of `bench_in_loop`."""
  return f(*args, reps=reps)


def step_fn(length, batch, indexer=dsa_indexer, topk=dsa_topk, attention=dsa_attention, blocks=None):
  """One decode step (the indexer query first, so nothing is hoisted out of bench_in_loop): what
  `dsa.top_k_select` and `dsa.sparse_attention` run on the GPU, from the given kernel modules."""
  qpos, kvpos = positions(length, batch)

  def step(qi, q, k8, w, kv, kr):
    scores = indexer.indexer_scores(qi, k8, w, qpos, kvpos, out_dtype=jnp.bfloat16)
    i = topk.top_k(scores, TOP_K)
    return attention.sparse_attention(q, kv, None, i, k_rope=kr, blocks=blocks)
  return step


def profile(label, step, args):
  prof = bench_common.profile_kernels(step, *args, calls=16)
  print(f"{label}: {prof.get('kernels per call', 0):.0f} kernels a step, span {prof.get('span per call', 0):.1f} "
        f"µs a step, kernel sum {prof.get('kernel sum per call', 0):.1f} µs", flush=True)
  for name, us in sorted(prof.items(), key=lambda kv: -kv[1]):
    if name not in ("span per call", "kernels per call", "kernel sum per call"):
      print(f"  {us:8.2f} µs  {name}", flush=True)


def sparse_sweep(length, args):
  """The sparse attention alone and the whole step with each of SPARSE_LAUNCHES (device ms, in
  loop; all timed in turn over 3 rounds), outputs compared with the default launch's."""
  qi, q, k8, w, latent, k_rope = args
  qpos, kvpos = positions(length, q.shape[0])
  idx = dsa.top_k_select(dsa_indexer.indexer_scores(qi, k8, w, qpos, kvpos, out_dtype=jnp.bfloat16), TOP_K)
  want = None
  cases = {}
  for name, blocks in SPARSE_LAUNCHES.items():
    f = lambda q, kv, kr, i, b=blocks: dsa_attention.sparse_attention(q, kv, None, i, k_rope=kr, blocks=b)
    out = np.asarray(jax.jit(f)(q, latent, k_rope, idx), np.float32)
    want = out if want is None else want
    print(f"L={length} sparse attention, {name}: max |out - default| {np.abs(out - want).max():.3g}", flush=True)
    cases[name] = (f"L={length} sparse attention, {name}",
                   functools.partial(bench_common.bench_in_loop, f, inner=_INNER.value), (q, latent, k_rope, idx))
    cases["step, " + name] = (f"L={length} step, {name}", functools.partial(
        bench_common.bench_in_loop, step_fn(length, q.shape[0], blocks=blocks), inner=_INNER.value), args)
  times = bench_common.interleaved(cases, rounds=3, reps=5, timer=_in_loop)
  for name, t in times.items():
    print(f"L={length} {'' if name.startswith('step') else 'sparse attention, '}{name}: {1e3 * t:.4f} ms "
          "(device, in loop; median of 3 rounds)", flush=True)


def indexer_sweep(length, args):
  """The decode indexer alone (device ms, in loop): fp8_query_operands' XLA kernels ahead of the
  kernel (as before session 18), or the bf16 query quantized in each program, by tiles a program."""
  qi, _, k8, w, _, _ = args
  b = qi.shape[0]
  qpos, kvpos = positions(length, b)
  kernel = functools.partial(dsa_indexer.indexer_scores_decode_kernel, out_dtype=jnp.bfloat16,
                             interpret=jax.default_backend() == "cpu")

  def ahead(qi, k8, w, n=None):
    q8, w8 = dsa_indexer.fp8_query_operands(qi, w)
    return kernel(q8, k8.values, w8, k8.scale[..., 0], qpos, kvpos, tiles_per_program=n)

  want = np.asarray(jax.jit(ahead)(qi, k8, w), np.float32)
  variants = {"query quantized ahead (XLA), 1 tile a program": functools.partial(ahead, n=1),
              "query quantized ahead (XLA), default tiles": ahead}
  for n in (None, 1, 2, 4, 8):
    variants[f"query quantized in the kernel, {n or 'default'} tiles a program"] = (
        lambda qi, k8, w, n=n: kernel(qi, k8.values, w, k8.scale[..., 0], qpos, kvpos, tiles_per_program=n))
  for name, f in variants.items():
    try:
      got = np.asarray(jax.jit(f)(qi, k8, w), np.float32)
      t = bench_common.bench_in_loop(f, qi, k8, w, inner=_INNER.value)
    except Exception as e:  # pylint: disable=broad-except
      print(f"L={length} indexer, {name}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
      continue
    fin = np.isfinite(want)
    err = np.abs(got[fin] - want[fin]).max() / np.abs(want[fin]).max()
    print(f"L={length} batch={b} indexer, {name}: {1e3 * t:.4f} ms (device, in loop); max rel. diff {err:.2g}",
          flush=True)


def main(argv):
  del argv
  print(jax.devices()[0].device_kind, jax.__version__, flush=True)
  for length in map(int, _LENGTHS.value):
    args = operands(length, _BATCH.value)
    steps = {"this": step_fn(length, _BATCH.value)}
    if _AB.value:
      mods = [importlib.import_module(_AB.value + name) for name in ("dsa_indexer", "dsa_topk", "dsa_attention")]
      steps[_AB.value] = step_fn(length, _BATCH.value, *mods)
    want = np.asarray(jax.jit(steps["this"])(*args), np.float32)
    cases = {}
    for name, step in steps.items():
      got = np.asarray(jax.jit(step)(*args), np.float32)
      profile(f"L={length} batch={_BATCH.value} {name} (max |out - this| {np.abs(got - want).max():.3g})", step, args)
      cases[name] = (f"L={length} {name}", functools.partial(bench_common.bench_in_loop, step, inner=_INNER.value),
                     args)
    times = bench_common.interleaved(cases, rounds=3 if _AB.value else 1, reps=5, timer=_in_loop)
    for name, t in times.items():
      print(f"L={length} step {name}: {1e3 * t:.4f} ms (device, in loop; median of rounds)", flush=True)
    if _SPARSE_SWEEP.value:
      sparse_sweep(length, args)
    if _INDEXER_SWEEP.value:
      indexer_sweep(length, args)


if __name__ == "__main__":
  app.run(main)
