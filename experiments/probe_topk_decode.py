"""Probe: top-k 2048 of ONE row (a decode step's indexer scores) on the GPU: `lax.top_k` (a sort),
the kernel's segmented sample-then-collect (the collecting pass split over `TopKBlocks.segments`
programs, then one program searches the collected entries; the sample and the collected list
searched in registers, or from memory block by block), one program a row (segments=1) and
the radix search split into segments (sample=False, the kernel's decode path before session 16).
Device time per call (`bench_common.bench_in_loop`), exactness against lax.top_k as sets.

  python -m experiments.probe_topk_decode --out=/tmp/probe_topk_decode.json

Rows: random normal scores, and the same with the most recent 4096 keys raised (+2: the top-k
clustered in the last segment, as recency-biased indexer scores would be).
"""

import json
import pathlib

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_common
from lca.attention import dsa
from pallas_kernels import dsa_topk

_LENGTHS = flags.DEFINE_list("lengths", ["16384", "32768", "65536", "131072"], "Row lengths.")
_SWEEP_AT = flags.DEFINE_integer("sweep_at", 131072, "Length at which every launch variant runs.")
_OUT = flags.DEFINE_string("out", "", "JSON file for the results (none if empty).")
_REPS = flags.DEFINE_integer("reps", 5, "Timed repetitions (median).")

K = 2048
Blocks = dsa_topk.TopKBlocks
VARIANTS = {   # name: blocks, or None for lax.top_k
    "lax.top_k": None,
    "segments16 (default)": Blocks(),
    "one program (segments1)": Blocks(segments=1),
    "lists from memory (list_block=0)": Blocks(list_block=0),
    "radix split (sample=False)": Blocks(sample=False),
    "lists in registers, 1 bit a pass": Blocks(list_bits=1),
    "lists in registers, 4 bits a pass": Blocks(list_bits=4),
    "lists in registers up to 4096": Blocks(list_block=4096),
}
ALWAYS = ("lax.top_k", "segments16 (default)", "lists from memory (list_block=0)", "one program (segments1)")


def _fn(blocks):
  if blocks is None:
    return lambda s: dsa.top_k_indices(s, K)
  return lambda s: dsa_topk.top_k(s, K, blocks=blocks)


def _exact(got, want) -> bool:
  return set(np.asarray(got).reshape(-1).tolist()) == set(np.asarray(want).reshape(-1).tolist())


def main(argv):
  del argv
  print(jax.devices()[0].device_kind, jax.__version__, flush=True)
  rows = []
  for length in map(int, _LENGTHS.value):
    base = jax.random.normal(jax.random.key(length), (1, length))
    recent = jnp.where(jnp.arange(length) >= length - 4096, 2.0, 0.0)
    for data, x in (("normal", base), ("recent+2", base + recent)):
      for dt in (jnp.bfloat16, jnp.float32):
        if data != "normal" and dt != jnp.bfloat16:
          continue
        s = x.astype(dt)
        want = dsa.top_k_indices(s, K)
        names = VARIANTS if (length == _SWEEP_AT.value and data == "normal" and dt == jnp.bfloat16) else ALWAYS
        for name in names:
          fn = _fn(VARIANTS[name])
          try:
            exact = _exact(jax.jit(fn)(s), want)
            ms = 1e3 * bench_common.bench_in_loop(fn, s, reps=_REPS.value)
          except Exception as e:  # pylint: disable=broad-except
            print(f"{length} {data} {dt.__name__} {name}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
          rows.append(dict(length=length, data=data, dtype=dt.__name__, variant=name, ms=ms, exact=exact))
          print(f"{length} {data} {dt.__name__} {name}: {ms:.4f} ms exact={exact}", flush=True)
  if _OUT.value:
    pathlib.Path(_OUT.value).write_text(json.dumps(dict(
        device=jax.devices()[0].device_kind, jax=jax.__version__, date=bench_common.today(),
        timing="device ms per call, bench_in_loop(inner=64)", rows=rows), indent=1))


if __name__ == "__main__":
  app.run(main)
