"""Timing helpers shared by the GPU benchmark scripts (experiments/bench_*.py)."""

import collections
import datetime
import functools
import glob
import json
import os
import pathlib
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp


def causal_spread_indices(top_k: int, q_positions):
  """[L] positions -> [1, L, top_k] int32: distinct causal indices spread evenly over [0, t] (-1 past
  t + 1), like a top-k without an indexer (DSA's sparse attention benchmarks)."""
  n = jnp.arange(top_k, dtype=jnp.int32)[None, None]
  t = q_positions[None, :, None].astype(jnp.int32)
  spread = (n.astype(jnp.int64) * (t + 1) // top_k).astype(jnp.int32) if jax.config.jax_enable_x64 \
      else (n.astype(jnp.float32) * (t + 1).astype(jnp.float32) / top_k).astype(jnp.int32)
  idx = jnp.where(t + 1 >= top_k, spread, n)
  return jnp.where(n <= t, idx, -1).astype(jnp.int32)


def mla_sparse_operands(length, heads=128, latent=512, rope=64, top_k=2048):
  """q [1, L, H, latent + rope], latent [1, L, 1, latent], k_rope [1, L, 1, rope], idx [1, L, top_k]."""
  ks = jax.random.split(jax.random.key(length), 3)
  bf = jnp.bfloat16
  q = jax.random.normal(ks[0], (1, length, heads, latent + rope), bf)
  kv = jax.random.normal(ks[1], (1, length, 1, latent), bf)
  kr = jax.random.normal(ks[2], (1, length, 1, rope), bf)
  return q, kv, kr, causal_spread_indices(top_k, jnp.arange(length, dtype=jnp.int32))


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


def bench_pipelined(fn, *args, burst: int = 16, reps: int = 5) -> float:
  """Median seconds per call of fn(*args) when `burst` calls are enqueued back to back before one
  sync: the host prepares call i + 1 while the GPU runs call i, as in a model's jitted step, so a
  call's host-side launch work is hidden whenever its kernels take longer (unlike `bench`)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready([fn(*args) for _ in range(burst)])
    times.append((time.perf_counter() - t0) / burst)
  return statistics.median(times)


def write_json(directory: str, name: str, obj) -> pathlib.Path:
  """obj as indented JSON in directory/name (directories made as needed) -> the path."""
  path = pathlib.Path(directory) / name
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(obj, indent=1))
  return path


def today() -> str:
  """The run's date (ISO), for the results' metadata: $LCA_RUN_DATE if set (a machine whose clock
  is off), else the machine's date."""
  return os.environ.get("LCA_RUN_DATE") or datetime.date.today().isoformat()


def previous_results(path: pathlib.Path, device: str) -> dict:
  """The results.json a partial run merges into ({} if none), refused if another device wrote it:
  a results table names one device in its header, so another GPU's rows go to another --out."""
  if not path.exists():
    return {}
  prev = json.loads(path.read_text())
  if prev.get("meta", {}).get("device", device) != device:
    raise ValueError(f"{path} holds results of a {prev['meta']['device']}, this is a {device}: pass another --out")
  return prev


def interleaved(cases: dict, *, rounds: int, reps: int, timer=None) -> dict:
  """{name: (label, fn, args)} -> {name: median seconds over rounds, or None if it failed}.

  Each round times every case once (`try_bench`, median of reps) in turn, so slow drifts of the
  GPU (clocks, temperature) reach the peers alike; timing one peer's reps after another's let a
  compute-bound kernel (cuDNN) vary by 7% between processes at 16k on an H200 (session 14)."""
  times = {name: [] for name in cases}
  for r in range(rounds):
    for name, (label, fn, args) in cases.items():
      if r and times[name][-1] is None:
        continue   # failed once: not retried
      times[name].append(try_bench(f"{label} (round {r + 1}/{rounds})", fn, *args, reps=reps, timer=timer))
  return {name: statistics.median(ts) if ts and None not in ts else None for name, ts in times.items()}


def try_bench(label: str, fn, *args, reps: int, timer=None) -> float | None:
  """`timer` (default `bench`) that prints "label: x ms" and returns seconds, or prints the error
  and returns None."""
  try:
    t = (timer or bench)(fn, *args, reps=reps)
    print(f"  {label}: {t * 1e3:.3f} ms", flush=True)
    return t
  except Exception as e:  # pylint: disable=broad-except
    print(f"  {label}: failed: {type(e).__name__}: {str(e)[:400]}", flush=True)
    return None


def backward_timer(f, *primals):
  """-> (fn, ct): fn(ct) runs the gradients of f at `primals` for a random cotangent ct, jitted:
  the backward kernels alone.

  The pullback's residuals go to the jitted call as arguments (the pullback is a pytree): as
  closed-over constants XLA would constant-fold work on them at compile time (NSA's selected
  backward's argsort of the block indices took 30 s at 16k)."""
  pullback, ct = backward_operands(f, *primals)
  return functools.partial(jax.jit(lambda pb, c: pb(c)), pullback), ct


def backward_operands(f, *primals):
  """-> (pullback, ct): f's pullback at `primals` (a pytree, to pass as an argument) and a random
  cotangent ct (a pytree shaped as f's output)."""
  out, pullback = jax.vjp(f, *primals)
  ct = jax.tree.map(lambda o: jax.random.normal(jax.random.key(1), o.shape, o.dtype), out)
  return pullback, ct


def bench_in_loop(fn, first, *rest, inner: int = 64, reps: int = 5) -> float:
  """Median device seconds per call of fn(first, *rest), for kernels of a few microseconds.

  `bench` times one dispatched call, so below ~0.1 ms it measures host dispatch, not the
  GPU. Here `inner` calls run inside one jitted `lax.map` over `inner` distinct copies of
  the float array `first` (distinct, so XLA cannot hoist the call out of the loop); the
  loop's own cost (slicing one copy, storing one output) is measured with an identity
  body of the same shapes and subtracted.
  """
  firsts = jnp.stack([first + jnp.asarray(i * 1e-3, first.dtype) for i in range(inner)])

  def run(f):
    return jax.jit(lambda xs, *r: jax.lax.map(lambda x: f(x, *r), xs))

  timed = bench(run(fn), firsts, *rest, reps=reps)
  overhead = bench(run(lambda x, *r: x), firsts, *rest, reps=reps)
  return max(timed - overhead, 0.0) / inner


def profile_kernels(fn, first, *rest, calls: int = 16) -> dict:
  """GPU kernel durations of `calls` calls of fn in one jitted lax.map (jax.profiler trace).

  Each call gets `first` (an array or a pytree of them) shifted by a small constant, so XLA
  cannot fold the calls into one; `rest` are arguments too, never constants (a pullback closed
  over would be constant-folded at compile time).

  Returns {kernel name: µs per call, all launches of that name summed} over the device's stream
  events (a name can recur within a call: cuDNN's kernels serve NSA's window and compressed
  branches alike; up to session 26 this was the median launch, which halved such a pair), plus
  "span per call" (µs from the first kernel start to the last kernel end over the whole loop,
  / calls), "kernels per call" and "kernel sum per call".
  """
  firsts = jax.tree.map(lambda a: jnp.stack([a + jnp.asarray(i * 1e-3, a.dtype) for i in range(calls)]),
                        first)
  run = jax.jit(lambda xs, *r: jax.lax.map(lambda x: fn(x, *r), xs))
  jax.block_until_ready(run(firsts, *rest))
  jax.block_until_ready(run(firsts, *rest))
  d = tempfile.mkdtemp()
  with jax.profiler.trace(d):
    jax.block_until_ready(run(firsts, *rest))
  path = glob.glob(d + "/**/*.xplane.pb", recursive=True)[0]
  events = []
  for plane in jax.profiler.ProfileData.from_file(path).planes:
    if not plane.name.startswith("/device:GPU"):
      continue
    for line in plane.lines:
      if "stream" not in line.name.lower() or "ops" in line.name.lower():
        continue
      events += [(e.name, e.start_ns, e.duration_ns) for e in line.events]
  if not events:
    return {}
  out = collections.defaultdict(float)
  for name, _, dur in events:
    out[name[:60]] += dur / 1e3 / calls
  out = dict(out)
  start = min(e[1] for e in events)
  end = max(e[1] + e[2] for e in events)
  out["span per call"] = (end - start) / 1e3 / calls
  out["kernels per call"] = len(events) / calls
  out["kernel sum per call"] = sum(e[2] for e in events) / 1e3 / calls
  return out


def mosaic_profile_summary(trace: dict, period_region: str) -> str:
  """A trace of Mosaic GPU's on-device profiler (`CompilerParams(profile_space=, profile_dir=)`:
  one tid a warpgroup, ts = SM clock cycles / 1e3) -> per named region the median and mean cycles
  of its occurrences over all warpgroups, and the median cycles between a warpgroup's successive
  entries to `period_region` (a loop's step)."""
  by_tid = collections.defaultdict(list)
  for e in trace["traceEvents"]:
    by_tid[e["tid"]].append(e)
  durations = collections.defaultdict(list)
  periods = []
  for events in by_tid.values():
    open_at, starts = {}, []
    for e in events:
      if e["ph"] == "B":
        open_at[e["name"]] = e["ts"]
        if e["name"] == period_region:
          starts.append(e["ts"])
      else:
        durations[e["name"]].append((e["ts"] - open_at.pop(e["name"])) * 1e3)
    periods += [(b - a) * 1e3 for a, b in zip(starts, starts[1:])]
  lines = [f"  {len(by_tid)} warpgroup traces, cycles a region:"]
  for name, d in sorted(durations.items()):
    lines.append(f"    {name:10s} median {statistics.median(d):8.0f}  mean {statistics.fmean(d):8.0f}  n {len(d)}")
  if periods:
    lines.append(f"    {'period':10s} median {statistics.median(periods):8.0f}  "
                 f"mean {statistics.fmean(periods):8.0f}  (between a warpgroup's {period_region} entries)")
  return "\n".join(lines)
