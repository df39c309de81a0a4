"""Probe: the prefill indexer's Mosaic GPU kernel (`dsa_indexer_mgpu`) by launch configuration (GPU).

Two modes, both on bench_dsa's shapes (64 indexer heads x 128, fp8 operands, bf16 scores):

  --configs=default,no_prefetch,...  each configuration against the default on a small case
      (equal where visible; the largest difference and the relative norm are printed),
      then the kernel over all query chunks of --length, the configurations timed in turn over
      --rounds (`bench_common.interleaved`). The queries are quantized once outside the timed
      call (the same for every configuration).
  --profile                       Mosaic's on-device profiler on one chunk (the last --chunk
      queries of --profile_length keys): each consumer warpgroup's named regions a step
      (k_wait, turn, mma_wait, epilogue, store) in SM clock cycles, and the step period;
      printed and written to --out as profile_<config>.txt.

The wider variants of session 21 (wgmma N = 128 / 192, three consumers passing a token, each
step's wgmma as two pipelined halves) were all slower and are gone from the kernel; they are in
commit 74572e4 with this probe's configurations for them (NOTES_dsa.md session 21). So are
session 22's (commit a09383a): the head sum as a second wgmma (serial and pipelined), turns
handed over between the consumers, and ReLU as an add (NOTES_dsa.md session 22).

  python -m experiments.probe_dsa_indexer --configs=default,no_prefetch --profile
"""

import dataclasses
import glob
import json
import os
import pathlib
import tempfile

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_common
from lca.attention import dsa
from pallas_kernels import dsa_indexer
from pallas_kernels import dsa_indexer_mgpu

CONFIGS = {
    "default": dsa_indexer_mgpu.Config(),
    "no_prefetch": dsa_indexer_mgpu.Config(prefetch_scale=False),
    "nopp": dsa_indexer_mgpu.Config(pingpong=False),
    "s3": dsa_indexer_mgpu.Config(num_stages=3),
    "tile_store": dsa_indexer_mgpu.Config(direct_store=False),
}

_CONFIGS = flags.DEFINE_list("configs", ["default", "no_prefetch"], f"Of {sorted(CONFIGS)}.")
_LENGTH = flags.DEFINE_integer("length", 131072, "Context length of the timed prefill indexer.")
_CHUNK = flags.DEFINE_integer("chunk", 2048, "Queries per call.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds of all configurations timed in turn.")
_REPS = flags.DEFINE_integer("reps", 3, "Timed repetitions a round (median).")
_PROFILE = flags.DEFINE_bool("profile", False, "Profile each configuration's consumers on one chunk.")
_PROFILE_LENGTH = flags.DEFINE_integer("profile_length", 16384, "Keys of the profiled chunk.")
_TIME = flags.DEFINE_bool("time", True, "Time the configurations over all chunks of --length.")
_OUT = flags.DEFINE_string("out", "", "Directory for the profile summaries ('' = print only).")


def operands(length, heads=64, dim=128):
  """FP8 operands of the scoring kernel: q8 [1, L, H, d], k8 [1, L, d], w [1, L, H] f32 (q's scale
  folded in), k_scale [1, L] f32, positions [1, L] int32."""
  ks = jax.random.split(jax.random.key(length), 3)
  qi = jax.random.normal(ks[0], (1, length, heads, dim), jnp.bfloat16)
  ki = jax.random.normal(ks[1], (1, length, dim), jnp.bfloat16)
  w = jax.random.normal(ks[2], (1, length, heads), jnp.float32) * (heads * dim) ** -0.5
  q8, w8 = jax.jit(dsa_indexer.fp8_query_operands)(qi, w)
  keys = jax.jit(dsa.quantize_index_keys)(ki)
  pos = jnp.arange(length, dtype=jnp.int32)[None]
  return q8, keys.values, w8, keys.scale[..., 0], pos


def all_chunks(config, chunk):
  """fn(q8, k8, w8, k_scale, pos) -> per-chunk max over each row's first 64 scores: every chunk's
  [chunk, S] scores are written, a slice read back (bench_dsa's indexer timing)."""
  def fn(q8, k8, w8, ks, pos):
    n = q8.shape[1] // chunk
    one = lambda a: jnp.max(dsa_indexer.mosaic_scores(a[0], k8, a[1], ks, a[2], out_dtype=jnp.bfloat16,
                                                      config=config)[..., :64], axis=-1)
    return jax.lax.map(one, (q8.reshape(n, 1, chunk, *q8.shape[2:]), w8.reshape(n, 1, chunk, -1),
                             pos.reshape(n, 1, chunk)))
  return jax.jit(fn)


def check(names):
  """Each configuration's scores against the default's on 1000 queries over 4099 keys (the same
  products and sums: equal)."""
  q8, k8, w8, ks, pos = operands(4099)
  q8, w8, qpos = q8[:, -1000:], w8[:, -1000:], pos[:, -1000:]
  run = lambda cfg: np.asarray(dsa_indexer.mosaic_scores(q8, k8, w8, ks, qpos, out_dtype=jnp.float32,
                                                         config=cfg)).astype(np.float32)[0]
  want = run(CONFIGS["default"])
  visible = np.arange(4099)[None] <= np.asarray(qpos[0])[:, None]
  for name in names:
    got = run(CONFIGS[name])
    diff = np.abs(got[visible] - want[visible]).max()
    rel = np.linalg.norm(got[visible] - want[visible]) / np.linalg.norm(want[visible])
    print(f"  check {name}: max |diff| over visible scores {diff:.3g} (relative norm {rel:.2g}), "
          f"finite where visible {np.isfinite(got[visible]).all()}", flush=True)


def profile(name, out):
  base = CONFIGS[name]
  length, chunk = _PROFILE_LENGTH.value, _CHUNK.value
  steps = length // base.block_k
  q8, k8, w8, ks, pos = operands(length)
  with tempfile.TemporaryDirectory() as d:
    cfg = dataclasses.replace(base, profile_space=6 * steps + 16, profile_dir=d)   # 5 regions a step, room to spare
    out_arr = dsa_indexer.mosaic_scores(q8[:, -chunk:], k8, w8[:, -chunk:], ks, pos[:, -chunk:],
                                        out_dtype=jnp.bfloat16, config=cfg)
    jax.block_until_ready(out_arr)
    jax.effects_barrier()
    files = sorted(glob.glob(os.path.join(d, "*-trace.json")))
    trace = json.loads(pathlib.Path(files[-1]).read_text())
  summary = bench_common.mosaic_profile_summary(trace, period_region="k_wait")   # 2 consumers a CTA
  text = f"profile {name} {base}: {chunk} queries over {length} keys\n{summary}"
  print(text, flush=True)
  if out:
    (out / f"profile_{name}.txt").write_text(text + "\n")


def main(argv):
  del argv
  print(jax.devices()[0].device_kind, jax.__version__, flush=True)
  names = _CONFIGS.value
  unknown = [n for n in names if n not in CONFIGS]
  if unknown:
    raise ValueError(f"--configs: unknown {unknown}; known: {sorted(CONFIGS)}")
  out = pathlib.Path(_OUT.value) if _OUT.value else None
  if out:
    out.mkdir(parents=True, exist_ok=True)
  check(names)
  if _PROFILE.value:
    for name in names:
      try:
        profile(name, out)
      except Exception as e:  # pylint: disable=broad-except
        print(f"  profile {name}: failed: {type(e).__name__}: {str(e)[:400]}", flush=True)
  if not _TIME.value:
    return
  args = operands(_LENGTH.value)
  cases = {n: (f"{_LENGTH.value} all chunks {n}", all_chunks(CONFIGS[n], _CHUNK.value), args) for n in names}
  times = bench_common.interleaved(cases, rounds=_ROUNDS.value, reps=_REPS.value)
  for n in names:
    t = times[n]
    print(f"{n:14s} {'failed' if t is None else f'{t * 1e3:.1f} ms'}  {CONFIGS[n]}", flush=True)


if __name__ == "__main__":
  app.run(main)
