"""Probe: where NSA's forward goes at one length, and which launch choices shorten it (GPU).

Times, in one process at --length (default 16k, the issue's "faster than full attention already
at 16k" point): the whole NSA forward as `experiments/bench_nsa.py` runs it, the same forward
composed here with other `pallas_kernels.nsa.Tuning` values and window implementations, each
part alone, and cuDNN / lca flash full causal attention. Every variant's largest difference
from the default forward is printed (a variant that computes something else must not win).

  python -m experiments.probe_nsa_fwd --length=16384 --out=/tmp/probe
"""

import dataclasses
import json
import pathlib

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from experiments import bench_common
from lca.attention import full
from lca.attention import local
from lca.attention import nsa
from pallas_kernels import nsa as kernels

_LENGTH = flags.DEFINE_integer("length", 16384, "Context length L.")
_HEADS = flags.DEFINE_integer("heads", 64, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 4, "KV heads (GQA groups).")
_DIM = flags.DEFINE_integer("head_dim", 128, "Head dim.")
_REPS = flags.DEFINE_integer("reps", 11, "Timed repetitions (median).")
_OUT = flags.DEFINE_string("out", "", "If set: a directory for probe_nsa_fwd_<L>.json.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Whole forwards: rounds of (cuDNN, flash, NSA[, NSA of "
                               "--ab_module]) timed in turn (`bench_common.interleaved`).")
_AB = flags.DEFINE_string("ab_module", "", "Optional module path of another pallas_kernels.nsa version "
                          "(e.g. a copy of an older commit's file) whose forward is timed in the rounds.")
_VARIANTS = flags.DEFINE_bool("variants", True, "Also time the Tuning / window variants.")
_DISPATCH = flags.DEFINE_bool("dispatch", False, "Only: the host side of one call for NSA, its "
                              "kernels without the compression MLPs, and cuDNN: the time until the "
                              "call returns (enqueue), one synchronized call (wall), and per call of 16 "
                              "enqueued back to back (pipelined), then exit.")
_TIMELINE = flags.DEFINE_bool("timeline", False, "Only: one call each of NSA and cuDNN under the "
                              "profiler, every kernel's start, duration and the gap before it (what a "
                              "single call's wall time holds besides kernels), then exit.")


def dispatch_times(fn, *args, reps: int = 21, burst: int = 16) -> dict:
  """µs: enqueue (until jitted fn returns, the device idle before), wall (one synchronized call) and
  pipelined (per call of `burst` calls enqueued back to back, then one sync): medians. wall - pipelined
  is what a synchronized single call pays that a step of a model, where the host runs ahead, does not."""
  import statistics, time   # pylint: disable=g-import-not-at-top,multiple-imports
  jax.block_until_ready(fn(*args))
  enq, wall = [], []
  for _ in range(reps):
    t0 = time.perf_counter()
    out = fn(*args)
    t1 = time.perf_counter()
    jax.block_until_ready(out)
    t2 = time.perf_counter()
    enq.append(t1 - t0)
    wall.append(t2 - t0)
  med = lambda xs: statistics.median(xs) * 1e6
  return dict(enqueue_us=med(enq), wall_us=med(wall),
              pipelined_us=bench_common.bench_pipelined(fn, *args, burst=burst, reps=5) * 1e6)


def timeline(fn, *args) -> dict:
  """One call of jitted fn under jax.profiler -> GPU kernels in start order with gaps (µs), and the
  wall time of that call and of the median single call."""
  import glob, statistics, tempfile, time   # pylint: disable=g-import-not-at-top,multiple-imports
  jax.block_until_ready(fn(*args))
  walls = []
  for _ in range(11):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    walls.append(time.perf_counter() - t0)
  d = tempfile.mkdtemp()
  with jax.profiler.trace(d):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    wall = time.perf_counter() - t0
  events = []
  for plane in jax.profiler.ProfileData.from_file(glob.glob(d + "/**/*.xplane.pb", recursive=True)[0]).planes:
    if plane.name.startswith("/device:GPU"):
      for line in plane.lines:
        if "stream" in line.name.lower() and "ops" not in line.name.lower():
          events += [(e.start_ns, e.duration_ns, e.name) for e in line.events]
  events.sort()
  rows, end = [], events[0][0] if events else 0
  for start, dur, name in events:
    rows.append(dict(name=name[:70], start_us=(start - events[0][0]) / 1e3, us=dur / 1e3,
                     gap_us=max(start - end, 0) / 1e3))
    end = max(end, start + dur)
  span = (end - events[0][0]) / 1e3 if events else None
  return dict(kernels=rows, span_us=span, kernel_sum_us=sum(r["us"] for r in rows),
              gap_sum_us=sum(r["gap_us"] for r in rows), profiled_wall_us=wall * 1e6,
              median_wall_us=statistics.median(walls) * 1e6)

T = kernels.Tuning
# (label, tuning, window implementation); the first is the shipped default
VARIANTS = (
    ("default", T(), None),
    ("window pallas", T(), "pallas"),
    ("cmp rows64", T(cmp_rows=64), None),
    ("cmp rows256 w8", T(cmp_rows=256, cmp_warps=8), None),
    ("cmp w8", T(cmp_warps=8), None),
    ("cmp s3", T(cmp_stages=3), None),
    ("cmp bk128 w8", T(block_kc=128, cmp_warps=8), None),
    ("importance w4", T(importance_warps=4), None),
    ("importance bf16 sum", T(importance_sum="bf16"), None),
    ("sel w4 s3", T(sel_stages=3), None),
)


def forward(q, k, v, kc, vc, gates, sizes, tuning, window_impl):
  """NSA's Pallas forward with a Tuning and window choice."""
  return nsa.nsa(q, k, v, kc, vc, gates, sizes=sizes, implementation="pallas", window_implementation=window_impl,
                 kernel_tuning=tuning)


def main(argv):
  del argv
  length, reps = _LENGTH.value, _REPS.value
  h, hkv, d = _HEADS.value, _KV_HEADS.value, _DIM.value
  print(jax.devices(), flush=True)
  sizes = nsa.NSASizes()
  ks = jax.random.split(jax.random.key(length), 8)
  bf = jnp.bfloat16
  q = jax.random.normal(ks[0], (1, length, h, d), bf)
  k = jax.random.normal(ks[1], (1, length, hkv, d), bf)
  v = jax.random.normal(ks[2], (1, length, hkv, d), bf)
  gates = jax.nn.sigmoid(jax.random.normal(ks[3], (1, length, h, 3))).astype(bf)
  phi = jax.tree.map(lambda a: a.astype(bf), nsa.init_compress_params(ks[4], sizes.block_len, d, 2 * d))
  kw = dict(block_len=sizes.block_len, block_stride=sizes.block_stride)
  kc, vc = nsa.compress(k, phi, **kw), nsa.compress(v, phi, **kw)
  res = {"length": length, "device": jax.devices()[0].device_kind, "jax": jax.__version__}
  if _DISPATCH.value:
    cases = (
        ("nsa", lambda q, k, v, g: nsa.nsa(q, k, v, nsa.compress(k, phi, **kw), nsa.compress(v, phi, **kw), g,
                                           sizes=sizes, implementation="pallas"), (q, k, v, gates)),
        ("nsa_given_kc_vc", lambda q, k, v, kc, vc, g: nsa.nsa(q, k, v, kc, vc, g, sizes=sizes,
                                                               implementation="pallas"), (q, k, v, kc, vc, gates)),
        ("nsa_cmp_slc", lambda q, k, v, kc, vc: kernels.nsa_cmp_slc(q, k, v, kc, vc, sizes=sizes), (q, k, v, kc, vc)),
        ("cudnn", lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                               implementation="cudnn"), (q, k, v)),
        ("window_cudnn", lambda q, k, v: local.local_attention(q, k, v, window=sizes.window,
                                                               implementation="cudnn"), (q, k, v)))
    for name, f, args in cases:
      res[name] = r = dispatch_times(jax.jit(f), *args)
      print(f"{name}: " + ", ".join(f"{k} {v:.0f}" for k, v in r.items()), flush=True)
    if _OUT.value:
      path = pathlib.Path(_OUT.value) / f"probe_nsa_dispatch_{length}.json"
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text(json.dumps(res, indent=1))
    return
  if _TIMELINE.value:
    for name, f, args in (
        ("nsa", lambda q, k, v, g: nsa.nsa(q, k, v, nsa.compress(k, phi, **kw), nsa.compress(v, phi, **kw), g,
                                           sizes=sizes, implementation="pallas"), (q, k, v, gates)),
        ("cudnn", lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                               implementation="cudnn"), (q, k, v))):
      res[name] = tl = timeline(jax.jit(f), *args)
      print(f"{name}: median wall {tl['median_wall_us']:.0f} us, profiled call {tl['profiled_wall_us']:.0f}, "
            f"GPU span {tl['span_us']:.0f}, kernels {tl['kernel_sum_us']:.0f}, gaps {tl['gap_sum_us']:.0f}",
            flush=True)
      for r in tl["kernels"]:
        print(f"  {r['start_us']:9.1f} {r['us']:8.1f} gap {r['gap_us']:7.1f}  {r['name']}", flush=True)
    if _OUT.value:
      path = pathlib.Path(_OUT.value) / f"probe_nsa_timeline_{length}.json"
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text(json.dumps(res, indent=1))
    return
  time = lambda label, f, *a: bench_common.try_bench(label, jax.jit(f), *a, reps=reps)
  ms = lambda t: None if t is None else t * 1e3

  print(f"L={length}: whole forwards, {_ROUNDS.value} rounds", flush=True)
  wholes = {
      "cudnn": (lambda q, k, v, g: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                implementation="cudnn"), "cuDNN full causal"),
      "flash": (lambda q, k, v, g: full.attention(q, k, v, causal=True, implementation="pallas"),
                "lca flash full causal"),
      "nsa": (lambda q, k, v, g: nsa.nsa(q, k, v, nsa.compress(k, phi, **kw), nsa.compress(v, phi, **kw), g,
                                         sizes=sizes, implementation="pallas"),
              "nsa.nsa (as bench_nsa, compression MLPs included)"),
  }
  if _AB.value:
    import importlib   # pylint: disable=g-import-not-at-top
    other = importlib.import_module(_AB.value)
    wholes["nsa_ab"] = (lambda q, k, v, g: nsa.combine(
        g, *other.nsa_cmp_slc(q, k, v, nsa.compress(k, phi, **kw), nsa.compress(v, phi, **kw), sizes=sizes),
        local.local_attention(q, k, v, window=sizes.window)), f"NSA with {_AB.value}")
  jitted = {name: jax.jit(f) for name, (f, _) in wholes.items()}
  medians = bench_common.interleaved({name: (label, jitted[name], (q, k, v, gates))
                                      for name, (_, label) in wholes.items()}, rounds=_ROUNDS.value, reps=reps)
  for name, t in medians.items():
    res[f"{name}_ms"] = ms(t)
    print(f"  {wholes[name][1]}: median of rounds {res[f'{name}_ms']}", flush=True)
  if res.get("nsa_ms") and res.get("cudnn_ms"):
    print(f"  NSA vs cuDNN: {res['cudnn_ms'] / res['nsa_ms']:.3f}x", flush=True)
  if _AB.value and res.get("nsa_ab_ms") and res.get("nsa_ms"):
    a, b = jitted["nsa"](q, k, v, gates), jitted["nsa_ab"](q, k, v, gates)
    res["ab_max_diff"] = float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
    print(f"  NSA / NSA with {_AB.value}: {res['nsa_ms'] / res['nsa_ab_ms']:.3f}, max |diff| "
          f"{res['ab_max_diff']}", flush=True)
  ref = jax.jit(lambda *a: forward(*a, sizes, T(), None))(q, k, v, kc, vc, gates).astype(jnp.float32)
  res["variants"] = {}
  for label, tuning, window_impl in VARIANTS if _VARIANTS.value else ():
    f = jax.jit(lambda *a, tuning=tuning, window_impl=window_impl: forward(*a, sizes, tuning, window_impl))
    t = bench_common.try_bench(f"nsa {label}", f, q, k, v, kc, vc, gates, reps=reps)
    diff = None if t is None else float(jnp.max(jnp.abs(f(q, k, v, kc, vc, gates).astype(jnp.float32) - ref)))
    print(f"    max |diff| vs default: {diff}", flush=True)
    res["variants"][label] = {"ms": ms(t), "max_diff": diff, "tuning": dataclasses.asdict(tuning),
                              "window": window_impl}

  print("parts (each alone)", flush=True)
  geo, tn = kernels.geometry(q, k, sizes=sizes), T()
  o_cmp, lse = jax.jit(lambda *a: kernels._cmp_fwd(*a, geo, tn, False))(q, kc, vc)  # pylint: disable=protected-access
  imp = jax.jit(lambda *a: kernels._importance(*a, geo, tn, False))(q, kc, lse)  # pylint: disable=protected-access
  idx = jax.jit(lambda i: kernels._topn(i, geo, tn, False))(imp)  # pylint: disable=protected-access
  parts = {
      "compress k and v": (lambda k, v: (nsa.compress(k, phi, **kw), nsa.compress(v, phi, **kw)), (k, v)),
      "nsa_cmp_fwd": (lambda *a: kernels._cmp_fwd(*a, geo, tn, False), (q, kc, vc)),  # pylint: disable=protected-access
      "nsa_importance": (lambda *a: kernels._importance(*a, geo, tn, False), (q, kc, lse)),  # pylint: disable=protected-access
      "nsa_topn": (lambda i: kernels._topn(i, geo, tn, False), (imp,)),  # pylint: disable=protected-access
      "nsa_sel_fwd": (lambda *a: kernels._sel_fwd(*a, geo, tn, False), (q, k, v, idx)),  # pylint: disable=protected-access
      "window cudnn": (lambda q, k, v: local.local_attention(q, k, v, window=sizes.window,
                                                             implementation="cudnn"), (q, k, v)),
      "window pallas": (lambda q, k, v: local.local_attention(q, k, v, window=sizes.window,
                                                              implementation="pallas"), (q, k, v)),
      "gated sum": (nsa.combine, (gates, o_cmp, o_cmp, q)),
  }
  res["parts"] = {name: ms(time(name, f, *args)) for name, f, args in
                  ((n, f, a) for n, (f, a) in parts.items())}
  if _OUT.value:
    path = pathlib.Path(_OUT.value) / f"probe_nsa_fwd_{length}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
