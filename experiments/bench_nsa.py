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
loop, loop cost subtracted); NSA's 11.5 MB at 64k stay in the 50 MB L2 across
those calls, so "cold" variants also read a 256 MB buffer between calls (L2 flushed)
and subtract the flush's own time. Writes
experiments/results/bench_nsa/{results.json, results.md, bench_nsa.png}; with
--parts a subset, the other fields of the same lengths are kept from results.json.
"""

import json
import pathlib

from absl import app, flags
import jax
import jax.numpy as jnp

from experiments import bench_common
from lca.attention import full, nsa

_LENGTHS = flags.DEFINE_list("lengths", ["8192", "16384", "32768", "65536"], "Context lengths.")
_HEADS = flags.DEFINE_integer("heads", 64, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 4, "KV heads (GQA groups).")
_DIM = flags.DEFINE_integer("head_dim", 128, "Head dim.")
_REPS = flags.DEFINE_integer("reps", 7, "Timed repetitions (median).")
_OUT = flags.DEFINE_string("out", "experiments/results/bench_nsa", "Output directory.")
_BREAKDOWN = flags.DEFINE_integer("breakdown", 0, "If > 0: time each NSA forward part at this L and exit.")
_PARTS = flags.DEFINE_list("parts", ["fwd", "fwd_bwd", "decode", "decode_xla"],
                           "What to time: fwd, fwd_bwd, decode (fused NSA, cuDNN), decode_xla.")
_INNER = flags.DEFINE_integer("inner", 64, "Decode calls per timed loop (bench_in_loop).")
_DECODE_BREAKDOWN = flags.DEFINE_integer("decode_breakdown", 0,
                                         "If > 0: time the fused decode's launches at this L and exit.")


bench = bench_common.bench
_try = bench_common.try_bench


def copy_bandwidth() -> float:
  """Measured device-to-device bytes/s (read + write) of a 1 GiB copy."""
  x = jnp.ones((256, 1024, 1024), jnp.float32)
  f = jax.jit(lambda a: a * 1.0001)
  t = bench(f, x, reps=10)
  return 2 * x.size * 4 / t


def bench_cold(fn, first, *rest, inner: int, flush_mib: int = 256) -> float:
  """Device seconds per call of fn(first, *rest) with L2 flushed before each call.

  Each loop step also sums a `flush_mib` buffer (scaled by an element of `first`, so
  it cannot be hoisted out of the loop); the same loop with the flush alone is
  subtracted.
  """
  buf = jnp.ones((flush_mib << 18,), jnp.float32)
  touch = lambda x, b: jnp.sum(b * x.reshape(-1)[0].astype(jnp.float32))
  with_fn = bench_common.bench_in_loop(lambda x, b, *r: (fn(x, *r), touch(x, b)), first, buf, *rest,
                                       inner=inner)
  alone = bench_common.bench_in_loop(lambda x, b, *r: (x, touch(x, b)), first, buf, *rest, inner=inner)
  return max(with_fn - alone, 0.0)


def bench_unrolled(fn, first, *rest, inner: int) -> float:
  """Device seconds per call with `inner` calls unrolled in one jitted program (no loop
  control between calls; XLA may capture the sequence as one CUDA graph), minus the same
  program with identity calls, divided by `inner`."""
  firsts = [first + jnp.asarray(i * 1e-3, first.dtype) for i in range(inner)]
  timed = bench(jax.jit(lambda xs, *r: [fn(x, *r) for x in xs]), firsts, *rest, reps=7)
  alone = bench(jax.jit(lambda xs, *r: [x * 2 for x in xs]), firsts, *rest, reps=7)
  return max(timed - alone, 0.0) / inner


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
          jax.random.normal(ks[2], (1, length, hkv, d), jnp.bfloat16))


def case(length, reps, bandwidth):
  sizes = nsa.NSASizes()
  h, hkv, d = _HEADS.value, _KV_HEADS.value, _DIM.value
  ks = jax.random.split(jax.random.key(length), 8)
  bf = jnp.bfloat16
  q, k, v = _qkv(ks, length)
  gates = jax.nn.sigmoid(jax.random.normal(ks[3], (1, length, h, 3))).astype(bf)
  phi_k = jax.tree.map(lambda a: a.astype(bf), nsa.init_compress_params(ks[4], sizes.block_len, d, 2 * d))
  phi_v = jax.tree.map(lambda a: a.astype(bf), nsa.init_compress_params(ks[5], sizes.block_len, d, 2 * d))
  w_out = jax.random.normal(ks[6], q.shape, bf)
  kw = dict(block_len=sizes.block_len, block_stride=sizes.block_stride)

  def nsa_fwd(q, k, v, phi_k, phi_v, gates):
    kc, vc = nsa.compress(k, phi_k, **kw), nsa.compress(v, phi_v, **kw)
    return nsa.nsa(q, k, v, kc, vc, gates, sizes=sizes, implementation="pallas")

  def cudnn(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

  def flash(q, k, v):
    return full.attention(q, k, v, causal=True, implementation="pallas")

  def fwd_bwd(f, n):
    loss = lambda *a: jnp.sum(f(*a).astype(jnp.float32) * w_out)
    return jax.jit(jax.grad(loss, argnums=tuple(range(n))))

  r = dict(length=length)
  print(f"L={length}", flush=True)
  args = (q, k, v, phi_k, phi_v, gates)
  parts = set(_PARTS.value)
  if "fwd" in parts:
    r["nsa_fwd"] = _try("nsa fwd", jax.jit(nsa_fwd), *args, reps=reps)
    r["cudnn_fwd"] = _try("cudnn fwd", jax.jit(cudnn), q, k, v, reps=reps)
    r["flash_fwd"] = _try("flash fwd", jax.jit(flash), q, k, v, reps=reps)
  if "fwd_bwd" in parts:
    r["nsa_fwd_bwd"] = _try("nsa fwd+bwd", fwd_bwd(nsa_fwd, 6), *args, reps=reps)
    r["cudnn_fwd_bwd"] = _try("cudnn fwd+bwd", fwd_bwd(cudnn, 3), q, k, v, reps=reps)
    r["flash_fwd_bwd"] = _try("flash fwd+bwd", fwd_bwd(flash, 3), q, k, v, reps=reps)

  if parts & {"decode", "decode_xla"}:
    # one query at position L-1 over caches holding L tokens; device time per call
    cache = dict(k=k, v=v, pos=jnp.arange(length, dtype=jnp.int32)[None],
                 kc=nsa.compress(k, phi_k, **kw), vc=nsa.compress(v, phi_v, **kw))
    q1, g1 = q[:, -1:], gates[:, -1:]
    pos1 = jnp.full((1, 1), length - 1, jnp.int32)
    dec = lambda impl: lambda q1, g1, pos1, cache: nsa.decode_attention(q1, g1, pos1, cache, sizes=sizes,
                                                                      implementation=impl)
    dense = lambda impl: lambda q1, k, v: jax.nn.dot_product_attention(q1, k, v, implementation=impl)
    loop, inner = bench_common.bench_in_loop, _INNER.value
    if "decode_xla" in parts:
      r["nsa_decode_xla"] = _try_loop("nsa decode (xla)", loop, dec("xla"), q1, g1, pos1, cache, inner=inner)
      r["xla_decode"] = _try_loop("xla decode", loop, dense("xla"), q1, k, v, inner=inner)
  if "decode" in parts:
    r["nsa_decode"] = _try_loop("nsa decode (pallas)", loop, dec("pallas"), q1, g1, pos1, cache, inner=inner)
    r["cudnn_decode"] = _try_loop("cudnn decode", loop, dense("cudnn"), q1, k, v, inner=inner)
    r["nsa_decode_unrolled"] = _try_loop("nsa decode (pallas), unrolled", bench_unrolled, dec("pallas"),
                                         q1, g1, pos1, cache, inner=inner // 2)
    r["cudnn_decode_unrolled"] = _try_loop("cudnn decode, unrolled", bench_unrolled, dense("cudnn"), q1, k, v,
                                           inner=inner // 2)
    r["nsa_decode_cold"] = _try_loop("nsa decode (pallas), L2 flushed", bench_cold, dec("pallas"), q1, g1,
                                     pos1, cache, inner=inner // 2)
    r["cudnn_decode_cold"] = _try_loop("cudnn decode, L2 flushed", bench_cold, dense("cudnn"), q1, k, v,
                                       inner=inner // 2)
    kv_bytes = 2 * hkv * d * 2
    nc = sizes.num_compressed(length)
    nsa_tokens = nc + sizes.num_selected * sizes.select_block + sizes.window
    r["nsa_decode_floor"] = nsa_tokens * kv_bytes / bandwidth
    r["full_decode_floor"] = length * kv_bytes / bandwidth
  return r


def speedups(r):
  """Adds speedup_* (cuDNN time / NSA time) to one length's results."""
  for a, b, name in (("cudnn_fwd", "nsa_fwd", "fwd"), ("cudnn_fwd_bwd", "nsa_fwd_bwd", "fwd_bwd"),
                     ("cudnn_decode", "nsa_decode", "decode"),
                     ("cudnn_decode_cold", "nsa_decode_cold", "decode_cold"),
                     ("cudnn_decode_unrolled", "nsa_decode_unrolled", "decode_unrolled")):
    if r.get(a) and r.get(b):
      r[f"speedup_{name}"] = r[a] / r[b]
  print("  " + ", ".join(f"{k}={v:.2f}x" for k, v in r.items() if k.startswith("speedup")), flush=True)
  return r


def write(results, meta):
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(dict(meta=meta, results=results), indent=1))
  ms = lambda x: "—" if x is None else f"{x * 1e3:.2f}"
  us = lambda x: "—" if x is None else f"{x * 1e6:.1f}"
  sp = lambda x: "—" if x is None else f"{x:.2f}x"
  lines = [f"# NSA vs full causal attention ({meta['device']}, {meta['date']}, jax {meta['jax']})", "",
           "batch 1, 64 q heads / 4 KV heads, head_dim 128, bf16, l=32 d=16 l'=64 n=16 w=512. "
           "Forward: ms (median wall time of one call).", "",
           "| L | NSA fwd | cuDNN fwd | flash fwd | fwd x | NSA f+b | cuDNN f+b | flash f+b | f+b x |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    g = r.get
    lines.append(f"| {r['length']} | {ms(g('nsa_fwd'))} | {ms(g('cudnn_fwd'))} | {ms(g('flash_fwd'))} | "
                 f"{sp(g('speedup_fwd'))} | {ms(g('nsa_fwd_bwd'))} | {ms(g('cudnn_fwd_bwd'))} | "
                 f"{ms(g('flash_fwd_bwd'))} | {sp(g('speedup_fwd_bwd'))} |")
  lines += ["", "Decode, one token at position L-1: µs of device time per call (64 calls in one "
            "jitted loop, loop cost subtracted). NSA = fused Pallas decode (3 launches); NSA XLA = "
            "its XLA path. Warm: the loop re-reads the same cache (NSA's bytes fit the 50 MB L2); "
            "cold: L2 flushed before every call; unrolled: 32 calls in one program without a loop. "
            f"Floors: bytes read at the measured copy bandwidth "
            f"({meta.get('copy_bandwidth_tb_s', 0):.2f} TB/s).", "",
            "| L | NSA | NSA XLA | cuDNN | XLA dense | x (warm) | NSA cold | cuDNN cold | x (cold) "
            "| NSA unrolled | cuDNN unrolled | x (unrolled) | NSA floor | full floor |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    g = r.get
    lines.append(f"| {r['length']} | {us(g('nsa_decode'))} | {us(g('nsa_decode_xla'))} | "
                 f"{us(g('cudnn_decode'))} | {us(g('xla_decode'))} | {sp(g('speedup_decode'))} | "
                 f"{us(g('nsa_decode_cold'))} | {us(g('cudnn_decode_cold'))} | "
                 f"{sp(g('speedup_decode_cold'))} | {us(g('nsa_decode_unrolled'))} | "
                 f"{us(g('cudnn_decode_unrolled'))} | {sp(g('speedup_decode_unrolled'))} | "
                 f"{us(g('nsa_decode_floor'))} | "
                 f"{us(g('full_decode_floor'))} |")
  (out / "results.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["length"] for r in results]
    for key, label in (("speedup_fwd", "forward"), ("speedup_fwd_bwd", "forward+backward"),
                       ("speedup_decode", "decode (warm L2)"),
                       ("speedup_decode_cold", "decode (L2 flushed)")):
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
  """Forward time of each part of NSA at one length (what limits the total)."""
  from pallas_kernels import nsa as kernels  # pylint: disable=g-import-not-at-top
  from lca.attention import local  # pylint: disable=g-import-not-at-top
  sizes = nsa.NSASizes()
  d = _DIM.value
  ks = jax.random.split(jax.random.key(length), 6)
  bf = jnp.bfloat16
  q, k, v = _qkv(ks, length)
  phi = jax.tree.map(lambda a: a.astype(bf), nsa.init_compress_params(ks[3], sizes.block_len, d, 2 * d))
  kw = dict(block_len=sizes.block_len, block_stride=sizes.block_stride)
  kc = nsa.compress(k, phi, **kw)
  geo = kernels.geometry(q, k, sizes=sizes)
  tn = kernels.Tuning()
  q_rows = kernels.to_rows(q, geo.group)
  _, lse = kernels._cmp_fwd(q_rows, kc, kc, geo, tn, False)  # pylint: disable=protected-access
  imp = kernels._importance(q_rows, kc, lse, geo, tn, False)  # pylint: disable=protected-access
  idx = kernels._topn(imp, geo, tn, False)  # pylint: disable=protected-access
  imp_variant = lambda hs: jax.jit(lambda a, b, c: kernels._importance(  # pylint: disable=protected-access
      a, b, c, geo, kernels.Tuning(importance_sum=hs), False))
  parts = {
      "importance (tf32 head-sum matmul)": (imp_variant("tf32"), (q_rows, kc, lse)),
      "importance (bf16 head-sum matmul)": (imp_variant("bf16"), (q_rows, kc, lse)),
      "importance (reshape-sum)": (imp_variant("reshape"), (q_rows, kc, lse)),
      "compress k (phi)": (jax.jit(lambda k: nsa.compress(k, phi, **kw)), (k,)),
      "to_rows(q)": (jax.jit(lambda q: kernels.to_rows(q, geo.group)), (q,)),
      "cmp fwd": (jax.jit(lambda a, b: kernels._cmp_fwd(a, b, b, geo, tn, False)), (q_rows, kc)),  # pylint: disable=protected-access
      "importance": (jax.jit(lambda a, b, c: kernels._importance(a, b, c, geo, tn, False)), (q_rows, kc, lse)),  # pylint: disable=protected-access
      "top-n": (jax.jit(lambda a: kernels._topn(a, geo, tn, False)), (imp,)),  # pylint: disable=protected-access
      "sel fwd": (jax.jit(lambda a, b, c, i: kernels._sel_fwd(a, b, c, i, geo, tn, False)), (q_rows, k, v, idx)),  # pylint: disable=protected-access
      "window": (jax.jit(lambda a, b, c: local.local_attention(a, b, c, window=sizes.window)), (q, k, v)),
  }
  out = {}
  for name, (f, args) in parts.items():
    out[name] = _try(name, f, *args, reps=reps)
  return out


def decode_breakdown(length):
  """Device time (bench_in_loop) of the fused decode's first launch, first two, and all three."""
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

  def upto(stage):
    def f(q, g, p, c):
      o1, m1, l1, part = dk._cmp(p, q, c["kc"], c["vc"], geo, 4, False)  # pylint: disable=protected-access
      if stage == 1:
        return o1, part
      o2, m2, l2 = dk._slc_win(p, q, c["k"], c["v"], m1, l1, part, geo, 8, False)  # pylint: disable=protected-access
      if stage == 2:
        return o1, o2
      return dk._merge(g, o1, m1, l1, o2, m2, l2, geo, q.dtype, 4, False)  # pylint: disable=protected-access
    return f

  out = {}
  for stage, name in ((1, "nsa_dec_cmp"), (2, "+ nsa_dec_slc_win"), (3, "+ nsa_dec_merge")):
    out[name] = _try_loop(name, bench_common.bench_in_loop, upto(stage), q1, g1, pos1, cache,
                          inner=_INNER.value)
  return out


def main(_):
  if _DECODE_BREAKDOWN.value:
    res = decode_breakdown(_DECODE_BREAKDOWN.value)
    out = pathlib.Path(_OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"decode_breakdown_{_DECODE_BREAKDOWN.value}.json").write_text(json.dumps(res, indent=1))
    return
  if _BREAKDOWN.value:
    res = breakdown(_BREAKDOWN.value, _REPS.value)
    out = pathlib.Path(_OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"breakdown_{_BREAKDOWN.value}.json").write_text(json.dumps(res, indent=1))
    return
  bandwidth = copy_bandwidth()
  print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
  meta = dict(device=jax.devices()[0].device_kind, date="2026-11-23", jax=jax.__version__,
              copy_bandwidth_tb_s=bandwidth / 1e12)
  old = pathlib.Path(_OUT.value) / "results.json"
  by_length = {}
  if old.exists() and set(_PARTS.value) != {"fwd", "fwd_bwd", "decode", "decode_xla"}:
    by_length = {r["length"]: r for r in json.loads(old.read_text())["results"]}
  for length in map(int, _LENGTHS.value):
    new = case(length, _REPS.value, bandwidth)
    by_length[length] = speedups({**by_length.get(length, {}), **new})
    write([by_length[n] for n in sorted(by_length)], meta)


if __name__ == "__main__":
  app.run(main)
