"""NSA vs full causal attention: forward, forward+backward and single-token decode (GPU).

    python -m experiments.bench_nsa --lengths=8192,16384,32768,65536

The paper's setting: batch 1, 64 query heads in 4 GQA groups, head_dim 128, bf16,
l=32, d=16, l'=64, n=16, w=512. NSA = φ compression of k and v (XLA) + compressed
attention, importance, top-n and selected attention (pallas_kernels/nsa.py) + the
window branch (lca flash / cuDNN through local.local_attention) + gates. Peers in
the same process: cuDNN (jax.nn.dot_product_attention(implementation="cudnn")) and
lca flash (full.attention(implementation="pallas")), full causal. Decode: one query
at position L-1 over caches of L tokens (NSA: lca.attention.nsa.decode_attention,
the fused Pallas kernels of pallas_kernels/nsa_decode.py, and its XLA path), vs cuDNN /
XLA over the full KV, and vs the bytes-read floor at the measured copy bandwidth.
Forward timings: medians of block_until_ready wall times after warm-up. Decode
timings: device time per call (`bench_common.bench_in_loop`: 64 calls in one jitted
loop, loop cost subtracted; NSA's 11.5 MB at 64k stay in the 50 MB L2 across those
calls) and the GPU kernel time per call (jax.profiler trace: kernel durations, no launch
gaps); --decode_breakdown=L splits the fused decode by launch and top-n variant. Writes
experiments/results/bench_nsa/{results.json, results.md, bench_nsa.png}; with
--parts a subset, the other fields of the same lengths are kept from results.json.

DeepSeek's head dims (q·k 192, v 128): --head_dim=192 --v_head_dim=128 --out=<another dir>;
NSA's kernels run q·k zero-padded to 256; cuDNN's prefill takes v at 128 through lca's cuDNN
path (jax's cuDNN module, cuDNN >= 9.10; session 23: runs before gave it v zero-padded to 192,
which cost cuDNN 15 percent at DSA's 128k MLA shape), its decode (one query over the cache, which that
path does not take) v zero-padded to 192; lca flash takes both as they are; the fused decode needs power-of-two dims, so
its decode cache holds k and kc zero-padded to 256 (padded once, outside the timed calls).
"""

import functools
import json
import os
import pathlib

from absl import app, flags
import jax
import jax.numpy as jnp

from experiments import bench_common
from lca.attention import full, local, nsa
from pallas_kernels import nsa as kernels

_LENGTHS = flags.DEFINE_list("lengths", ["8192", "16384", "32768", "65536"], "Context lengths.")
_HEADS = flags.DEFINE_integer("heads", 64, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 4, "KV heads (GQA groups).")
_DIM = flags.DEFINE_integer("head_dim", 128, "Head dim of q and k.")
_V_DIM = flags.DEFINE_integer("v_head_dim", 0, "Head dim of v (0: head_dim), e.g. --head_dim=192 "
                              "--v_head_dim=128 as DeepSeek (write those to another --out).")
_REPS = flags.DEFINE_integer("reps", 7, "Timed repetitions (median).")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Forward and forward+backward: rounds of (NSA, cuDNN, flash) "
                               "timed in turn; the median of the rounds' medians.")
_OUT = flags.DEFINE_string("out", "experiments/results/bench_nsa", "Output directory.")
_BREAKDOWN = flags.DEFINE_integer("breakdown", 0, "If > 0: time each NSA forward part at this L and exit.")
_PARTS = flags.DEFINE_list("parts", ["fwd", "fwd_bwd", "decode", "decode_xla"],
                           "What to time: fwd, fwd_bwd, dense_fwd_bwd (cuDNN and flash only), decode "
                           "(fused NSA, cuDNN), decode_xla, profile (the GPU kernels of the NSA and cuDNN "
                           "forwards, jax.profiler), profile_fwd_bwd (the same for forward+backward), "
                           "fwd_pipelined (the forwards per call of 16 "
                           "enqueued back to back, so the host's per-call launch work is hidden, as in "
                           "a model's step), window (the window branch alone, forward+backward, on "
                           "cuDNN, lca flash and xla_chunked), hlo (write the compiled HLO of NSA's "
                           "forward+backward to --out, to name the XLA fusions that profile_fwd_bwd lists), "
                           "streams (NSA's forward and forward+backward with Tuning(branch_streams=True), "
                           "the compressed and window branches on GPU streams of their own, against the "
                           "default in turn; sets XLA_FLAGS=--xla_gpu_experimental_stream_annotation=true).")
_INNER = flags.DEFINE_integer("inner", 64, "Decode calls per timed loop (bench_in_loop).")
_DECODE_BREAKDOWN = flags.DEFINE_integer("decode_breakdown", 0,
                                         "If > 0: time the fused decode's launches at this L and exit.")
_BREAKDOWN_BWD = flags.DEFINE_bool("breakdown_bwd", True, "--breakdown: also the backward parts.")
_SEL_SWEEP = flags.DEFINE_integer("sel_sweep", 0, "If > 0: time nsa_sel_fwd launch variants, with and "
                                  "without K/V bytes, at this L and exit.")
_BWD_SWEEP = flags.DEFINE_integer("bwd_sweep", 0, "If > 0: the GPU kernels (jax.profiler) of the "
                                  "compressed and selected backward passes under Tuning variants, at this L.")
_ONLY = flags.DEFINE_list("only", [], "--sweep, --bwd_sweep: run only the variants whose label contains "
                          "one of these strings (e.g. --only='bk 32,cuDNN'; --sweep's labels start with "
                          "the kernel: cmp_fwd, importance, topn).")
_SWEEP = flags.DEFINE_integer("sweep", 0, "If > 0: time Tuning variants of the forward's compressed "
                               "attention, importance and top-n at this L and exit (the backward's: --bwd_sweep).")


bench = bench_common.bench
_try = bench_common.try_bench


def _picked(label: str) -> bool:
  """Whether --only lets the variant `label` run (every variant when --only is empty)."""
  return not _ONLY.value or any(part in label for part in _ONLY.value)


def copy_bandwidth() -> float:
  """Measured device-to-device bytes/s (read + write) of a 1 GiB copy."""
  x = jnp.ones((256, 1024, 1024), jnp.float32)
  f = jax.jit(lambda a: a * 1.0001)
  t = bench(f, x, reps=10)
  return 2 * x.size * 4 / t


def _kernel_time(label, fn, first, *rest):
  """GPU kernel seconds per call of fn (profiler: the loop's kernels minus an identity loop's),
  i.e. device time without the gaps between launches; None on failure."""
  try:
    t = (bench_common.profile_kernels(fn, first, *rest)["kernel sum per call"]
         - bench_common.profile_kernels(lambda x, *_: x, first, *rest)["kernel sum per call"]) * 1e-6
    print(f"  {label}: {t * 1e6:.1f} us", flush=True)
    return t
  except Exception as e:  # pylint: disable=broad-except
    print(f"  {label}: failed: {type(e).__name__}: {str(e)[:400]}", flush=True)
    return None


def _try_loop(label, timer, *args, **kw):
  try:
    t = timer(*args, **kw)
    print(f"  {label}: {t * 1e6:.1f} us", flush=True)
    return t
  except Exception as e:  # pylint: disable=broad-except
    print(f"  {label}: failed: {type(e).__name__}: {str(e)[:400]}", flush=True)
    return None


def _qkv(ks, length):
  """Random bf16 q [1, L, H, D], k and v [1, L, H_kv, D] from keys ks[0:3]."""
  h, hkv, d = _HEADS.value, _KV_HEADS.value, _DIM.value
  return (jax.random.normal(ks[0], (1, length, h, d), jnp.bfloat16),
          jax.random.normal(ks[1], (1, length, hkv, d), jnp.bfloat16),
          jax.random.normal(ks[2], (1, length, hkv, _v_dim()), jnp.bfloat16))


def _v_dim():
  return _V_DIM.value or _DIM.value


def case(length, reps, bandwidth):
  sizes = nsa.NSASizes()
  h, hkv, d = _HEADS.value, _KV_HEADS.value, _DIM.value
  ks = jax.random.split(jax.random.key(length), 8)
  bf = jnp.bfloat16
  q, k, v = _qkv(ks, length)
  gates = jax.nn.sigmoid(jax.random.normal(ks[3], (1, length, h, 3))).astype(bf)
  phi_k = jax.tree.map(lambda a: a.astype(bf), nsa.init_compress_params(ks[4], sizes.block_len, d, 2 * d))
  dv = _v_dim()
  phi_v = jax.tree.map(lambda a: a.astype(bf), nsa.init_compress_params(ks[5], sizes.block_len, dv, 2 * dv))
  w_out = jax.random.normal(ks[6], (*q.shape[:3], dv), bf)
  kw = dict(block_len=sizes.block_len, block_stride=sizes.block_stride)

  def nsa_fwd(q, k, v, phi_k, phi_v, gates, tuning=None):
    kc, vc = nsa.compress(k, phi_k, **kw), nsa.compress(v, phi_v, **kw)
    return nsa.nsa(q, k, v, kc, vc, gates, sizes=sizes, implementation="pallas", kernel_tuning=tuning)

  def cudnn(q, k, v):   # v at its own head dim when it differs from q·k's (cuDNN >= 9.10)
    return full.attention(q, k, v, causal=True, implementation="cudnn")

  def flash(q, k, v):
    return full.attention(q, k, v, causal=True, implementation="pallas")

  def fwd_bwd(f, n):
    loss = lambda *a: jnp.sum(f(*a).astype(jnp.float32) * w_out)
    return jax.jit(jax.grad(loss, argnums=tuple(range(n))))

  r = dict(length=length, device=jax.devices()[0].device_kind, date=bench_common.today(),
           rounds=_ROUNDS.value)
  print(f"L={length}", flush=True)
  args = (q, k, v, phi_k, phi_v, gates)
  parts = set(_PARTS.value)
  interleaved = functools.partial(bench_common.interleaved, rounds=_ROUNDS.value, reps=reps)
  if "fwd" in parts:
    r.update(interleaved({"nsa_fwd": ("nsa fwd", jax.jit(nsa_fwd), args),
                          "cudnn_fwd": ("cudnn fwd", jax.jit(cudnn), (q, k, v)),
                          "flash_fwd": ("flash fwd", jax.jit(flash), (q, k, v))}))
  if "fwd_pipelined" in parts:   # per call of 16 enqueued back to back: the host runs ahead
    r.update(interleaved({"nsa_fwd_pipelined": ("nsa fwd, pipelined", jax.jit(nsa_fwd), args),
                          "cudnn_fwd_pipelined": ("cudnn fwd, pipelined", jax.jit(cudnn), (q, k, v)),
                          "flash_fwd_pipelined": ("flash fwd, pipelined", jax.jit(flash), (q, k, v))},
                         timer=bench_common.bench_pipelined))
  profiled = []   # every GPU kernel of the NSA forward or f+b (and cuDNN's), median µs per call
  if "profile" in parts:
    profiled += [("nsa_fwd_kernels_us", nsa_fwd, args), ("cudnn_fwd_kernels_us", cudnn, (q, k, v))]
  if "profile_fwd_bwd" in parts:
    profiled += [("nsa_fwd_bwd_kernels_us", fwd_bwd(nsa_fwd, 6), args),
                 ("cudnn_fwd_bwd_kernels_us", fwd_bwd(cudnn, 3), (q, k, v))]
  if "hlo" in parts:
    path = pathlib.Path(_OUT.value) / f"nsa_fwd_bwd_{length}.hlo.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(fwd_bwd(nsa_fwd, 6).lower(*args).compile().as_text())
    print(f"  wrote {path}", flush=True)
  for name, fn, fargs in profiled:
    try:
      r[name] = bench_common.profile_kernels(fn, *fargs, calls=4)
    except Exception as e:  # pylint: disable=broad-except
      print(f"  {name}: profile failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
      continue
    print(f"  {name}:", flush=True)
    for kernel, us in sorted(r[name].items(), key=lambda kv: -kv[1]):
      print(f"    {us:9.1f}  {kernel}", flush=True)
  cases = {}
  if "fwd_bwd" in parts:
    cases["nsa_fwd_bwd"] = ("nsa fwd+bwd", fwd_bwd(nsa_fwd, 6), args)
  if parts & {"fwd_bwd", "dense_fwd_bwd"}:
    cases["cudnn_fwd_bwd"] = ("cudnn fwd+bwd", fwd_bwd(cudnn, 3), (q, k, v))
    cases["flash_fwd_bwd"] = ("flash fwd+bwd", fwd_bwd(flash, 3), (q, k, v))
  if "window" in parts:   # NSA's window branch alone (its default: cuDNN, as full.attention's)
    win = lambda impl: lambda q, k, v: local.local_attention(q, k, v, window=sizes.window, implementation=impl)
    for impl in ("cudnn", "pallas", "xla_chunked"):
      cases[f"window_fwd_bwd_{impl}"] = (f"window ({impl}) fwd+bwd", fwd_bwd(win(impl), 3), (q, k, v))
  r.update(interleaved(cases))
  if "streams" in parts:   # the compressed and window branches on their own GPU streams, or not
    streams = lambda q, k, v, phi_k, phi_v, gates: nsa_fwd(q, k, v, phi_k, phi_v, gates,
                                                           kernels.Tuning(branch_streams=True))
    r.update(interleaved({"streams_off_fwd": ("nsa fwd, one stream", jax.jit(nsa_fwd), args),
                          "streams_on_fwd": ("nsa fwd, branch streams", jax.jit(streams), args),
                          "streams_off_fwd_bwd": ("nsa fwd+bwd, one stream", fwd_bwd(nsa_fwd, 6), args),
                          "streams_on_fwd_bwd": ("nsa fwd+bwd, branch streams", fwd_bwd(streams, 6), args)}))

  if parts & {"decode", "decode_xla"}:
    # one query at position L-1 over caches holding L tokens; device time per call
    cache = dict(k=k, v=v, pos=jnp.arange(length, dtype=jnp.int32)[None],
                 kc=nsa.compress(k, phi_k, **kw), vc=nsa.compress(v, phi_v, **kw))
    q1, g1 = q[:, -1:], gates[:, -1:]
    dense_q1, dense_k = q1, k
    # the fused decode takes power-of-two dims: q·k zero-padded (e.g. 192 -> 256) once, as a model
    # would store its cache; zero columns leave every q·k unchanged
    q1, k_wide, kc_wide = kernels.pad_head_dims(q1, k, cache["kc"])
    cache = dict(cache, k=k_wide, kc=kc_wide)
    pos1 = jnp.full((1, 1), length - 1, jnp.int32)
    dec = lambda impl: lambda q1, g1, pos1, cache: nsa.decode_attention(
        q1, g1, pos1, cache, sizes=sizes, scale=d ** -0.5, implementation=impl)
    dense = lambda impl: lambda q1, k, v: full.v_padded_to_q(jax.nn.dot_product_attention, q1, k, v,
                                                             implementation=impl)
    loop, inner = bench_common.bench_in_loop, _INNER.value
    if "decode_xla" in parts:
      r["nsa_decode_xla"] = _try_loop("nsa decode (xla)", loop, dec("xla"), q1, g1, pos1, cache, inner=inner)
      r["xla_decode"] = _try_loop("xla decode", loop, dense("xla"), dense_q1, dense_k, v, inner=inner)
  if "decode" in parts:
    # NSA and cuDNN in turn over the rounds, as the forwards (one after the other, cuDNN's 16k decode
    # read 19.6 and 23.6 µs in two processes of session 15)
    r.update(interleaved({"nsa_decode": ("nsa decode (pallas)", dec("pallas"), (q1, g1, pos1, cache)),
                          "cudnn_decode": ("cudnn decode", dense("cudnn"), (dense_q1, dense_k, v))},
                         timer=lambda fn, *a, reps: loop(fn, *a, inner=inner, reps=reps)))
    r["nsa_decode_kernels"] = _kernel_time("nsa decode (pallas), kernels", dec("pallas"), q1, g1, pos1, cache)
    r["cudnn_decode_kernels"] = _kernel_time("cudnn decode, kernels", dense("cudnn"), dense_q1, dense_k, v)
    for stale in ("nsa_decode_unrolled", "cudnn_decode_unrolled", "nsa_decode_cold", "cudnn_decode_cold",
                  "speedup_decode_unrolled", "speedup_decode_cold"):   # session 3's fields, not timed now
      r[stale] = None
    kv_bytes = hkv * (d + dv) * 2
    nc = sizes.num_compressed(length)
    nsa_tokens = nc + sizes.num_selected * sizes.select_block + sizes.window
    r["nsa_decode_floor"] = nsa_tokens * kv_bytes / bandwidth
    r["full_decode_floor"] = length * kv_bytes / bandwidth
  return r


def speedups(r):
  """Adds speedup_* (cuDNN time / NSA time) to one length's results."""
  for a, b, name in (("cudnn_fwd", "nsa_fwd", "fwd"), ("cudnn_fwd_bwd", "nsa_fwd_bwd", "fwd_bwd"),
                     ("cudnn_fwd_pipelined", "nsa_fwd_pipelined", "fwd_pipelined"),
                     ("cudnn_decode", "nsa_decode", "decode"),
                     ("cudnn_decode_kernels", "nsa_decode_kernels", "decode_kernels")):
    if r.get(a) and r.get(b):
      r[f"speedup_{name}"] = r[a] / r[b]
  print("  " + ", ".join(f"{k}={v:.2f}x" for k, v in r.items() if k.startswith("speedup") and v is not None),
        flush=True)
  return r


def write(results, meta):
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(dict(meta=meta, results=results), indent=1))
  ms = lambda x: "—" if x is None else f"{x * 1e3:.2f}"
  us = lambda x: "—" if x is None else f"{x * 1e6:.1f}"
  sp = lambda x: "—" if x is None else f"{x:.2f}x"
  lines = [f"# NSA vs full causal attention ({meta['device']}, {meta['date']}, jax {meta['jax']})", "",
           f"batch 1, {_HEADS.value} q heads / {_KV_HEADS.value} KV heads, head_dim {_DIM.value}"
           + (f" (v {_v_dim()})" if _v_dim() != _DIM.value else "")
           + ", bf16, l=32 d=16 l'=64 n=16 w=512. Forward and forward+backward: ms, median wall "
           "time of one call (from session 14: the median over rounds in which NSA, cuDNN and flash "
           "are timed in turn).", ""]
  lines += [f"{k}: {v}" for k, v in meta.items() if k.startswith("note")] + [""] * any(
      k.startswith("note") for k in meta)
  lines += ["| L | NSA fwd | cuDNN fwd | flash fwd | fwd x | NSA f+b | cuDNN f+b | flash f+b | f+b x |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    g = r.get
    lines.append(f"| {r['length']} | {ms(g('nsa_fwd'))} | {ms(g('cudnn_fwd'))} | {ms(g('flash_fwd'))} | "
                 f"{sp(g('speedup_fwd'))} | {ms(g('nsa_fwd_bwd'))} | {ms(g('cudnn_fwd_bwd'))} | "
                 f"{ms(g('flash_fwd_bwd'))} | {sp(g('speedup_fwd_bwd'))} |")
  if any(r.get("nsa_fwd_pipelined") for r in results):
    lines += ["", "Forward, pipelined: ms per call when 16 calls are enqueued back to back before one "
              "sync (the host prepares the next call while the GPU runs this one, as in a model's "
              "jitted step; the single-call wall time above also charges each call's host-side launch "
              "work, ~0.4-0.7 ms for NSA's ~20 launches at 16k, session 14).", "",
              "| L | NSA | cuDNN | flash | x |", "|---|---|---|---|---|"]
    for r in results:
      g = r.get
      lines.append(f"| {r['length']} | {ms(g('nsa_fwd_pipelined'))} | {ms(g('cudnn_fwd_pipelined'))} | "
                   f"{ms(g('flash_fwd_pipelined'))} | {sp(g('speedup_fwd_pipelined'))} |")
  lines += ["", "Decode, one token at position L-1: µs of device time per call (64 calls in one "
            "jitted loop, loop cost subtracted; the cache re-read each call: NSA's bytes fit the "
            "50 MB L2; from session 15 NSA and cuDNN are timed in turn over the rounds, the median "
            "of the rounds). NSA = fused Pallas decode (3 launches); NSA XLA = its XLA path. Kernels: "
            "the sum of the GPU kernel durations per call (profiler), i.e. without launch gaps. "
            f"Floors: bytes read at the measured copy bandwidth "
            f"({meta.get('copy_bandwidth_tb_s', 0):.2f} TB/s).", "",
            "| L | NSA | NSA XLA | cuDNN | XLA dense | x | NSA kernels | cuDNN kernels | x (kernels) "
            "| NSA floor | full floor |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    g = r.get
    lines.append(f"| {r['length']} | {us(g('nsa_decode'))} | {us(g('nsa_decode_xla'))} | "
                 f"{us(g('cudnn_decode'))} | {us(g('xla_decode'))} | {sp(g('speedup_decode'))} | "
                 f"{us(g('nsa_decode_kernels'))} | {us(g('cudnn_decode_kernels'))} | "
                 f"{sp(g('speedup_decode_kernels'))} | {us(g('nsa_decode_floor'))} | "
                 f"{us(g('full_decode_floor'))} |")
  (out / "results.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["length"] for r in results]
    for key, label in (("speedup_fwd", "forward"), ("speedup_fwd_pipelined", "forward (pipelined)"),
                       ("speedup_fwd_bwd", "forward+backward"),
                       ("speedup_decode", "decode (device time)"),
                       ("speedup_decode_kernels", "decode (kernel time)")):
      ax.plot(xs, [r.get(key) or float("nan") for r in results], marker="o", label=label)
    ax.axhline(1.0, color="gray", lw=0.5)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length")
    ax.set_ylabel("speed-up of NSA over cuDNN full attention")
    ax.set_title(f"NSA ({meta['device']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "bench_nsa.png", dpi=120)
  except Exception as e:  # pylint: disable=broad-except
    print(f"no plot: {type(e).__name__}: {e}")


def breakdown(length, reps):
  """Time of each NSA part at one length, forward and backward (what limits the total)."""
  from lca.attention import local  # pylint: disable=g-import-not-at-top
  sizes = nsa.NSASizes()
  x = _kernel_inputs(length)
  geo, tn, q, kc, lse, idx = x["geo"], kernels.Tuning(), x["q"], x["kc"], x["lse"], x["idx"]
  kw = dict(block_len=sizes.block_len, block_stride=sizes.block_stride)
  imp = jax.jit(lambda a, b, c: kernels._importance(a, b, c, geo, tn, False))(q, kc, lse)  # pylint: disable=protected-access
  sel = jax.jit(lambda a, b, c, i: kernels._sel_fwd(a, b, c, i, geo, tn, False))  # pylint: disable=protected-access
  no_idx = jnp.full_like(idx, -1)   # every slot empty: nsa_sel_fwd's loop without K/V bytes
  parts = {
      "compress k (phi)": (jax.jit(lambda k: nsa.compress(k, x["phi"], **kw)), (x["k"],)),
      "cmp fwd": (jax.jit(lambda a, b, c: kernels._cmp_fwd(a, b, c, geo, tn, False)), (q, kc, x["vc"])),  # pylint: disable=protected-access
      "importance": (jax.jit(lambda a, b, c: kernels._importance(a, b, c, geo, tn, False)), (q, kc, lse)),  # pylint: disable=protected-access
      "top-n": (jax.jit(lambda a: kernels._topn(a, geo, tn, False)), (imp,)),  # pylint: disable=protected-access
      "sel fwd": (sel, (q, x["k"], x["v"], idx)),
      "window": (jax.jit(lambda a, b, c: local.local_attention(a, b, c, window=sizes.window)), (q, x["k"], x["v"])),
      "sel fwd, every slot empty (no K/V bytes)": (sel, (q, x["k"], x["v"], no_idx)),
  }
  if _BREAKDOWN_BWD.value:
    cmp_bwd, cmp_ct = bench_common.backward_timer(lambda a, b, c: kernels._cmp_attention(a, b, c, geo, tn, False),  # pylint: disable=protected-access
                                 q, kc, x["vc"])
    sel_bwd, sel_ct = bench_common.backward_timer(lambda a, b, c: kernels._sel_attention(a, b, c, idx, geo, tn, False),  # pylint: disable=protected-access
                                 q, x["k"], x["v"])
    win_bwd, win_ct = bench_common.backward_timer(lambda a, b, c: local.local_attention(a, b, c, window=sizes.window),
                                 q, x["k"], x["v"])
    parts.update({"cmp bwd (dq, dkdv)": (cmp_bwd, (cmp_ct,)),
                  "sel bwd (dq, work list, dkdv)": (sel_bwd, (sel_ct,)),
                  "window bwd": (win_bwd, (win_ct,))})
  out = {}
  for name, (f, args) in parts.items():
    t = _try(name, f, *args, reps=reps)
    out[name] = None if t is None else t * 1e3
  return out


def _kernel_inputs(length):
  """bf16 q, k, v, kc, vc, LSE2, importance, top-n indices and the geometry at one length."""
  sizes = nsa.NSASizes()
  d = _DIM.value
  if _v_dim() != d or d & (d - 1):
    raise app.UsageError(f"the one-length studies call the kernels directly: they take one power-of-two "
                         f"head dim, got --head_dim={d} --v_head_dim={_V_DIM.value}")
  ks = jax.random.split(jax.random.key(length), 6)
  q, k, v = _qkv(ks, length)
  phi = jax.tree.map(lambda a: a.astype(jnp.bfloat16),
                     nsa.init_compress_params(ks[3], sizes.block_len, d, 2 * d))
  kc = nsa.compress(k, phi, block_len=sizes.block_len, block_stride=sizes.block_stride)
  vc = nsa.compress(v, phi, block_len=sizes.block_len, block_stride=sizes.block_stride)
  geo = kernels.geometry(q, k, sizes=sizes)
  tn = kernels.Tuning()
  _, lse = kernels._cmp_fwd(q, kc, vc, geo, tn, False)  # pylint: disable=protected-access
  imp = kernels._importance(q, kc, lse, geo, tn, False)  # pylint: disable=protected-access
  idx = kernels._topn(imp, geo, tn, False)  # pylint: disable=protected-access
  return dict(q=q, k=k, v=v, kc=kc, vc=vc, lse=lse, idx=idx, geo=geo, phi=phi)


def sweep(length, reps):
  """Times Tuning variants of the forward's compressed attention (Pallas tiles, and cuDNN),
  nsa_importance and nsa_topn at one length; each variant's largest difference from the default
  output is printed too (a variant that computes something else must not win). The backward
  kernels' variants: `bwd_sweep` (since session 25, which gave nsa_cmp_dq tiles of its own, so
  cmp_rows no longer sets them)."""
  x = _kernel_inputs(length)
  geo, T = x["geo"], kernels.Tuning
  out = {}

  def run(kind, label, tuning, fn, args, ref=None, keep=None):
    if not _picked(f"{kind} {label}"):
      return
    out[f"{kind} {label}"] = _time_variant(f"{kind} {label}", jax.jit(lambda *a: fn(*a, tuning)), args,
                                           reps, ref, keep)

  cmp = lambda q, kc, vc, tn: kernels._cmp_fwd(q, kc, vc, geo, tn, False)  # pylint: disable=protected-access
  cmp_args = (x["q"], x["kc"], x["vc"])
  cmp_ref = jax.jit(lambda *a: cmp(*a, T()))(*cmp_args)
  # session 3's sweep (before the unmasked/masked split): rows128 bk64 w4 s2 15.5 ms, the
  # rows64 default 16.9, 8 warps or bk128 slower; nsa_sel_fwd: no variant beat w4 s2 (22.5 ms)
  for rows, bk, w, st in ((128, 64, 4, 2), (64, 64, 4, 2), (128, 64, 4, 3), (128, 64, 8, 2),
                          (128, 128, 8, 2)):
    run("cmp_fwd", f"rows{rows} bk{bk} w{w} s{st}",
        T(cmp_rows=rows, block_kc=bk, cmp_warps=w, cmp_stages=st), cmp, cmp_args, cmp_ref)
  # the branch as one square causal attention on cuDNN (o and LSE2, what importance needs)
  on_cudnn = lambda q, kc, vc, tn: kernels._compressed(q, kc, vc, geo, tn, False)  # pylint: disable=protected-access
  run("cmp_fwd", "on cuDNN (nsa_cmp_cudnn)", T(cmp_attention="cudnn"), on_cudnn, cmp_args, cmp_ref)
  # nsa_importance (session 25: 9.9 ms at 64k, 2.2e12 FLOP of q·k at ~220 TFLOP/s, half the forward's
  # rate): head sums, positions a program, selection blocks a step, warps, stages
  imp = lambda q, kc, lse, tn: (kernels._importance(q, kc, lse, geo, tn, False),)  # pylint: disable=protected-access
  imp_args = (x["q"], x["kc"], x["lse"])
  imp_ref = jax.jit(lambda *a: imp(*a, T()))(*imp_args)
  # only a position's visible blocks are written (top-n reads no others): compare those
  visible = (jnp.arange(geo.num_select_blocks)[None, :] <= (jnp.arange(length) // geo.select_block)[:, None])
  old = dict(importance_sum="reshape", importance_warps=8)   # the default up to session 25
  for label, tn in (("reshape bt16 nb16 w8 s2 (up to session 25)", T(**old)),
                    ("rebin w8", T(importance_sum="rebin", importance_warps=8)),
                    ("rebin w4 (the default since session 26)", T()),
                    ("rebin bt8 w4", T(importance_positions=8)),
                    ("rebin nb32 w4", T(importance_blocks=32)),
                    ("rebin w4 s3", T(importance_stages=3)),
                    ("reshape bt8 w4", T(importance_sum="reshape", importance_positions=8)),
                    ("reshape s3", T(**old, importance_stages=3)),
                    ("reshape nb32", T(**old, importance_blocks=32)),
                    ("rebin nb32 w8", T(importance_sum="rebin", importance_warps=8, importance_blocks=32)),
                    ("reshape bt32", T(**old, importance_positions=32))):
    run("importance", label, tn, imp, imp_args, imp_ref, keep=visible)
  # nsa_topn (4.3 ms at 64k; session 27: one (value, index) argmax a round 5.9 ms, removed): a
  # [positions, 1024] fp32 tile per program, so 128 values a thread at 16 positions and 4 warps
  topn = lambda scores, tn: (kernels._topn(scores, geo, tn, False),)  # pylint: disable=protected-access
  topn_ref = jax.jit(lambda a: topn(a, T()))(imp_ref[0])
  # session 27 (ms): 16 positions w4 (the default before) 4.03, 16 w8 3.16, 8 w4 2.64, 8 w2 2.33, 32 w8
  # 5.48, 4 w4 2.34
  for label, tn in (("16 positions w4 (up to session 26)", T(topn_positions=16, topn_warps=4)),
                    ("8 positions w2 (the default since session 27)", T()),
                    ("8 positions w1", T(topn_warps=1)), ("4 positions w2", T(topn_positions=4)),
                    ("4 positions w1", T(topn_positions=4, topn_warps=1)),
                    ("2 positions w1", T(topn_positions=2, topn_warps=1))):
    run("topn", label, tn, topn, (imp_ref[0],), topn_ref)
  return out


def bwd_sweep(length):
  """GPU kernel times (jax.profiler, median µs of each kernel over 4 calls) of the compressed and the
  selected backward passes under launch variants: dQ and dK/dV apart, and the XLA work between."""
  x = _kernel_inputs(length)
  geo, T = x["geo"], kernels.Tuning
  cmp_args, sel_args = (x["q"], x["kc"], x["vc"]), (x["q"], x["k"], x["v"])
  cmp = lambda tn: lambda q, kc, vc: kernels._cmp_attention(q, kc, vc, geo, tn, False)  # pylint: disable=protected-access
  sel = lambda tn: lambda q, k, v: kernels._sel_attention(q, k, v, x["idx"], geo, tn, False)  # pylint: disable=protected-access
  def cmp_variant(dq, dkdv, splits=None):
    """dq, dkdv: (warps, stages, rows, keys a step / a chunk) of nsa_cmp_dq and nsa_cmp_dkdv."""
    return T(cmp_dq_warps=dq[0], cmp_dq_stages=dq[1], cmp_dq_rows=dq[2], cmp_dq_bk=dq[3],
             cmp_dkdv_warps=dkdv[0], cmp_dkdv_stages=dkdv[1], cmp_dkdv_rows=dkdv[2], cmp_dkdv_bk=dkdv[3],
             cmp_dkdv_splits=splits)

  # each variant changes both kernels (the profile times them apart): dq / dkdv (warps, stages, rows, bk)
  cmp_variants = [((4, 2, 128, 64), (4, 2, 64, 64)),     # the default up to session 24 (dq spilled)
                  ((8, 2, 128, 64), (8, 2, 64, 64)),
                  ((8, 3, 128, 64), (8, 2, 128, 64)),
                  ((4, 2, 64, 64), (4, 2, 128, 64)),   # dq: the default since session 25
                  ((8, 2, 64, 128), (8, 2, 128, 128)),
                  ((4, 3, 64, 64), (4, 3, 64, 64)),
                  ((8, 2, 256, 64), (8, 3, 64, 64)),
                  ((8, 2, 128, 128), (8, 2, 64, 128)),
                  ((4, 2, 64, 32), (4, 2, 32, 64)),
                  # not yet run: dK/dV on chunks of 32 compressed keys (its fp32 dK, dV tiles at 64 keys
                  # and 4 warps are 128 registers a thread on their own, so it may spill as dQ did)
                  ((4, 2, 64, 64), (4, 2, 64, 32)),
                  ((4, 2, 64, 64), (4, 2, 128, 32)),
                  ((4, 2, 64, 64), (8, 2, 128, 32)),
                  ((4, 2, 64, 64), (4, 3, 64, 32))]
  variants = {f"cmp dq w{a[0]} s{a[1]} rows {a[2]} bk {a[3]} / dkdv w{b[0]} s{b[1]} rows {b[2]} bk {b[3]}":
              (cmp, cmp_args, cmp_variant(a, b)) for a, b in cmp_variants}
  variants.update({
      "cmp on cuDNN (nsa_cmp_cudnn)": (lambda tn: lambda q, kc, vc: kernels._compressed(  # pylint: disable=protected-access
          q, kc, vc, geo, tn, False), cmp_args, T(cmp_attention="cudnn")),
      "cmp default, dkdv splits 8": (cmp, cmp_args, T(cmp_dkdv_splits=8)),
      "cmp default, dkdv splits 32": (cmp, cmp_args, T(cmp_dkdv_splits=32)),
      "sel w4 s2, items 256 (the default up to session 24)": (sel, sel_args, T(dkdv_items=256)),
      "sel w8": (sel, sel_args, T(num_warps=8)),
      "sel s3": (sel, sel_args, T(num_stages=3)),
      "sel items 1024 (the default since session 25)": (sel, sel_args, T()),
      "sel dQ from the dS that dK/dV stores": (sel, sel_args, T(sel_dq_from_ds=True)),
  })
  out = {}
  for label, (f, primals, tn) in variants.items():
    if not _picked(label):
      continue
    try:
      pullback, ct = bench_common.backward_operands(f(tn), *primals)
      prof = bench_common.profile_kernels(lambda c, pb: pb(c), ct, pullback, calls=4)
    except Exception as e:  # pylint: disable=broad-except
      print(f"  {label}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
      continue
    out[label] = prof
    print(f"  {label}: kernel sum {prof.get('kernel sum per call', 0) / 1e3:.2f} ms, span "
          f"{prof.get('span per call', 0) / 1e3:.2f} ms", flush=True)
    for kernel, us in sorted(prof.items(), key=lambda kv: -kv[1])[:8]:
      if kernel not in ("span per call", "kernel sum per call", "kernels per call"):
        print(f"    {us:9.1f}  {kernel}", flush=True)
  return out


def sel_sweep(length, reps):
  """nsa_sel_fwd by warps and stages, each also with every slot empty (the loop without K/V
  bytes: what is left is the serial chain of small MMAs and row reductions). Max |diff| vs the
  default is printed for each variant."""
  x = _kernel_inputs(length)
  geo, T = x["geo"], kernels.Tuning
  args = (x["q"], x["k"], x["v"], x["idx"])
  empty = (*args[:3], jnp.full_like(x["idx"], -1))
  sel = lambda tn: jax.jit(lambda *a: kernels._sel_fwd(*a, geo, tn, False))  # pylint: disable=protected-access
  ref = sel(T())(*args)
  out = {}
  for w, st in ((4, 2), (2, 2), (4, 3), (8, 2)):
    f = sel(T(sel_warps=w, sel_stages=st))
    label = f"sel_fwd w{w} s{st}"
    out[label] = _time_variant(label, f, args, reps, ref)
    out[f"{label}, every slot empty"] = _time_variant(f"{label}, every slot empty", f, empty, reps)
  return out


def _time_variant(label, f, args, reps, ref=None, keep=None) -> dict:
  """Times jitted f(*args) -> {ms, max_diff}: the largest |difference| of its first output from
  ref's (None without a ref), so a variant that computes something else cannot win unseen. keep:
  where the output is defined (broadcast against it; None = everywhere)."""
  t = _try(label, f, *args, reps=reps)
  diff = None
  if t is not None and ref is not None:
    delta = jnp.abs(f(*args)[0].astype(jnp.float32) - ref[0].astype(jnp.float32))
    diff = float(jnp.max(delta if keep is None else jnp.where(keep, delta, 0.0)))
    print(f"    max |diff| vs default {diff:.3g}", flush=True)
  return dict(ms=None if t is None else t * 1e3, max_diff=diff)


def _noop_launches(count):
  """`count` chained trivial Pallas launches (one 16-float row each): the per-launch cost."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top

  def kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...] + 1.0

  one = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((16,), jnp.float32), name="noop")

  def f(q, *_):
    x = q.reshape(-1)[:16].astype(jnp.float32)
    for _ in range(count):
      x = one(x)
    return x
  return f


def decode_breakdown(length):
  """Where the fused decode's time goes at one L: device time per call (bench_in_loop) and
  GPU kernel durations (profiler) of a trivial launch, launch 1, launches 1+2 (top-n
  variants, warps), the whole decode and cuDNN's."""
  from pallas_kernels import nsa_decode as dk  # pylint: disable=g-import-not-at-top
  sizes = nsa.NSASizes()
  h, hkv, d = _HEADS.value, _KV_HEADS.value, _DIM.value
  ks = jax.random.split(jax.random.key(length), 7)
  bf = jnp.bfloat16
  nc = sizes.num_compressed(length)
  cache = {name: jax.random.normal(key, (1, n, hkv, d), bf)
           for name, key, n in (("k", ks[0], length), ("v", ks[1], length),
                                ("kc", ks[2], nc), ("vc", ks[3], nc))}
  q1 = jax.random.normal(ks[4], (1, 1, h, d), bf)
  g1 = jax.nn.sigmoid(jax.random.normal(ks[5], (1, 1, h, 3))).astype(bf)
  pos1 = jnp.full((1, 1), length - 1, jnp.int32)
  geo = dk.geometry(q1, cache, sizes=sizes)

  def upto(stage, topn="rank", warps2=None):
    warps2 = warps2 or (8 if geo.rows * geo.padded_select_blocks >= 8192 else 4)

    def f(q, g, p, c):
      o1, m1, l1, part = dk._cmp(p, q, c["kc"], c["vc"], geo, 4, False)  # pylint: disable=protected-access
      if stage == 1:
        return m1   # small output: lax.map stacks it
      o2, m2, l2, _ = dk._slc_win(p, q, c["k"], c["v"], m1, l1, part, geo, warps2, False, topn)  # pylint: disable=protected-access
      if stage == 2:
        return m2
      return dk._merge(g, o1, m1, l1, o2, m2, l2, geo, q.dtype, 4, False)  # pylint: disable=protected-access
    return f

  other_warps = 4 if geo.rows * geo.padded_select_blocks >= 8192 else 8   # nsa_decode's choice flipped
  variants = {
      "1 noop launch": _noop_launches(1),
      "nsa_dec_cmp": upto(1),
      "+ slc_win (argmax top-n)": upto(2, "argmax"),
      "+ slc_win (rank top-n)": upto(2, "rank"),
      f"+ slc_win (rank top-n, {other_warps} warps)": upto(2, "rank", other_warps),
      "+ slc_win (no top-n)": upto(2, "none"),
      "nsa_decode(topn=rank)": lambda q, g, p, c: dk.nsa_decode(q, g, p, c, sizes=sizes, topn="rank"),
      "nsa_decode(topn=argmax)": lambda q, g, p, c: dk.nsa_decode(q, g, p, c, sizes=sizes, topn="argmax"),
      "cudnn decode": lambda q, g, p, c: jax.nn.dot_product_attention(q, c["k"], c["v"],
                                                                      implementation="cudnn"),
  }
  out = {}
  ref = jax.jit(lambda q, g, p, c: nsa.decode_attention(q, g, p, c, sizes=sizes, implementation="xla"))(
      q1, g1, pos1, cache).astype(jnp.float32)
  for topn in ("rank", "argmax"):
    try:
      got = jax.jit(lambda q, g, p, c: dk.nsa_decode(q, g, p, c, sizes=sizes, topn=topn))(  # pylint: disable=cell-var-from-loop
          q1, g1, pos1, cache).astype(jnp.float32)
      rel = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
    except Exception as e:  # pylint: disable=broad-except
      print(f"  topn={topn} failed: {type(e).__name__}: {str(e)[:600]}", flush=True)
      rel = None
    out[f"rel err vs xla (topn={topn})"] = rel
    print(f"  rel err vs xla (topn={topn}): {rel}", flush=True)
  for name, f in variants.items():
    t = _try_loop(name, bench_common.bench_in_loop, f, q1, g1, pos1, cache, inner=_INNER.value)
    try:
      prof = bench_common.profile_kernels(f, q1, g1, pos1, cache)
      print(f"    kernels: {json.dumps({k: round(v, 2) for k, v in prof.items()})}", flush=True)
    except Exception as e:  # pylint: disable=broad-except
      prof = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
      print(f"    profile failed: {prof['error']}", flush=True)
    out[name] = dict(device_us=None if t is None else t * 1e6, kernels_us=prof)
  return out


def main(_):
  # one-length studies: each writes <name>_<L>.json and exits
  for flag, study, name in ((_DECODE_BREAKDOWN, decode_breakdown, "decode_breakdown"),
                            (_SWEEP, lambda n: sweep(n, _REPS.value), "sweep"),
                            (_BWD_SWEEP, bwd_sweep, "bwd_sweep"),
                            (_SEL_SWEEP, lambda n: sel_sweep(n, _REPS.value), "sel_sweep"),
                            (_BREAKDOWN, lambda n: breakdown(n, _REPS.value), "breakdown")):
    if flag.value:
      res = study(flag.value)
      out = pathlib.Path(_OUT.value)
      out.mkdir(parents=True, exist_ok=True)
      (out / f"{name}_{flag.value}.json").write_text(json.dumps(res, indent=1))
      return
  if "streams" in _PARTS.value and "stream_annotation" not in os.environ.get("XLA_FLAGS", ""):
    # read when the backend starts (below); without it XLA ignores the stream annotations
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_experimental_stream_annotation=true").strip()
  bandwidth = copy_bandwidth()
  print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
  meta = dict(device=jax.devices()[0].device_kind, date=bench_common.today(), jax=jax.__version__,
              copy_bandwidth_tb_s=bandwidth / 1e12)
  old = pathlib.Path(_OUT.value) / "results.json"
  by_length = {}
  if set(_PARTS.value) != {"fwd", "fwd_bwd", "decode", "decode_xla"}:   # a partial run updates its rows
    prev = bench_common.previous_results(old, meta["device"])
    by_length = {r["length"]: r for r in prev.get("results", [])}
    if not set(_PARTS.value) & {"decode", "decode_xla"} and "copy_bandwidth_tb_s" in prev.get("meta", {}):
      # the table's decode floors were computed at the earlier run's bandwidth: its header keeps it
      meta["copy_bandwidth_tb_s"] = prev["meta"]["copy_bandwidth_tb_s"]
  for length in map(int, _LENGTHS.value):
    new = case(length, _REPS.value, bandwidth)
    by_length[length] = speedups({**by_length.get(length, {}), **new})
    write([by_length[n] for n in sorted(by_length)], meta)


if __name__ == "__main__":
  app.run(main)
