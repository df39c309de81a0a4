"""NSA vs full causal attention: forward, forward+backward and single-token decode (GPU).

    python -m experiments.bench_nsa --lengths=8192,16384,32768,65536

The paper's setting: batch 1, 64 query heads in 4 GQA groups, head_dim 128, bf16,
l=32, d=16, l'=64, n=16, w=512. NSA = φ compression of k and v (XLA) + compressed
attention, importance, top-n and selected attention (pallas_kernels/nsa.py) + the
window branch (lca flash / cuDNN through local.local_attention) + gates. Peers in
the same process: cuDNN (jax.nn.dot_product_attention(implementation="cudnn")) and
lca flash (full.attention(implementation="pallas")), full causal. Decode: one query
at position L-1 over caches of L tokens (NSA: lca.attention.nsa.decode_attention, XLA),
vs cuDNN / XLA over the full KV, and vs the bytes-read floor at the measured copy
bandwidth. Medians of block_until_ready wall times after warm-up. Writes
experiments/results/bench_nsa/{results.json, results.md, bench_nsa.png}.
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


bench = bench_common.bench
_try = bench_common.try_bench


def copy_bandwidth() -> float:
  """Measured device-to-device bytes/s (read + write) of a 1 GiB copy."""
  x = jnp.ones((256, 1024, 1024), jnp.float32)
  f = jax.jit(lambda a: a * 1.0001)
  t = bench(f, x, reps=10)
  return 2 * x.size * 4 / t


def case(length, reps, bandwidth):
  sizes = nsa.NSASizes()
  h, hkv, d = _HEADS.value, _KV_HEADS.value, _DIM.value
  ks = jax.random.split(jax.random.key(length), 8)
  bf = jnp.bfloat16
  q = jax.random.normal(ks[0], (1, length, h, d), bf)
  k = jax.random.normal(ks[1], (1, length, hkv, d), bf)
  v = jax.random.normal(ks[2], (1, length, hkv, d), bf)
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
  r["nsa_fwd"] = _try("nsa fwd", jax.jit(nsa_fwd), *args, reps=reps)
  r["cudnn_fwd"] = _try("cudnn fwd", jax.jit(cudnn), q, k, v, reps=reps)
  r["flash_fwd"] = _try("flash fwd", jax.jit(flash), q, k, v, reps=reps)
  r["nsa_fwd_bwd"] = _try("nsa fwd+bwd", fwd_bwd(nsa_fwd, 6), *args, reps=reps)
  r["cudnn_fwd_bwd"] = _try("cudnn fwd+bwd", fwd_bwd(cudnn, 3), q, k, v, reps=reps)
  r["flash_fwd_bwd"] = _try("flash fwd+bwd", fwd_bwd(flash, 3), q, k, v, reps=reps)

  # one query at position L-1 over caches holding L tokens
  cache = dict(k=k, v=v, pos=jnp.arange(length, dtype=jnp.int32)[None],
               kc=nsa.compress(k, phi_k, **kw), vc=nsa.compress(v, phi_v, **kw))
  q1, g1 = q[:, -1:], gates[:, -1:]
  pos1 = jnp.full((1, 1), length - 1, jnp.int32)
  dec = jax.jit(lambda q1, g1, pos1, cache: nsa.decode_attention(q1, g1, pos1, cache, sizes=sizes))
  r["nsa_decode"] = _try("nsa decode", dec, q1, g1, pos1, cache, reps=4 * reps)
  dense = lambda impl: jax.jit(lambda q1, k, v: jax.nn.dot_product_attention(q1, k, v, implementation=impl))
  r["cudnn_decode"] = _try("cudnn decode", dense("cudnn"), q1, k, v, reps=4 * reps)
  r["xla_decode"] = _try("xla decode", dense("xla"), q1, k, v, reps=4 * reps)
  kv_bytes = 2 * hkv * d * 2
  nc = sizes.num_compressed(length)
  nsa_tokens = nc + sizes.num_selected * sizes.select_block + sizes.window
  r["nsa_decode_floor"] = nsa_tokens * kv_bytes / bandwidth
  r["full_decode_floor"] = length * kv_bytes / bandwidth
  for a, b, name in (("cudnn_fwd", "nsa_fwd", "fwd"), ("cudnn_fwd_bwd", "nsa_fwd_bwd", "fwd_bwd"),
                     ("cudnn_decode", "nsa_decode", "decode")):
    if r.get(a) and r.get(b):
      r[f"speedup_{name}"] = r[a] / r[b]
  print("  " + ", ".join(f"{k}={v:.2f}x" for k, v in r.items() if k.startswith("speedup")), flush=True)
  return r


def write(results, meta):
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(dict(meta=meta, results=results), indent=1))
  ms = lambda x: "—" if x is None else f"{x * 1e3:.2f}"
  sp = lambda x: "—" if x is None else f"{x:.2f}x"
  lines = [f"# NSA vs full causal attention ({meta['device']}, {meta['date']}, jax {meta['jax']})", "",
           "batch 1, 64 q heads / 4 KV heads, head_dim 128, bf16, l=32 d=16 l'=64 n=16 w=512. ms (median).", "",
           "| L | NSA fwd | cuDNN fwd | flash fwd | fwd x | NSA f+b | cuDNN f+b | flash f+b | f+b x "
           "| NSA dec | cuDNN dec | XLA dec | dec x | NSA floor | full floor |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    g = r.get
    lines.append(f"| {r['length']} | {ms(g('nsa_fwd'))} | {ms(g('cudnn_fwd'))} | {ms(g('flash_fwd'))} | "
                 f"{sp(g('speedup_fwd'))} | {ms(g('nsa_fwd_bwd'))} | {ms(g('cudnn_fwd_bwd'))} | "
                 f"{ms(g('flash_fwd_bwd'))} | {sp(g('speedup_fwd_bwd'))} | {ms(g('nsa_decode'))} | "
                 f"{ms(g('cudnn_decode'))} | {ms(g('xla_decode'))} | {sp(g('speedup_decode'))} | "
                 f"{ms(g('nsa_decode_floor'))} | {ms(g('full_decode_floor'))} |")
  (out / "results.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["length"] for r in results]
    for key, label in (("speedup_fwd", "forward"), ("speedup_fwd_bwd", "forward+backward"),
                       ("speedup_decode", "decode")):
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
  h, hkv, d = _HEADS.value, _KV_HEADS.value, _DIM.value
  ks = jax.random.split(jax.random.key(length), 6)
  bf = jnp.bfloat16
  q = jax.random.normal(ks[0], (1, length, h, d), bf)
  k = jax.random.normal(ks[1], (1, length, hkv, d), bf)
  v = jax.random.normal(ks[2], (1, length, hkv, d), bf)
  phi = jax.tree.map(lambda a: a.astype(bf), nsa.init_compress_params(ks[3], sizes.block_len, d, 2 * d))
  kw = dict(block_len=sizes.block_len, block_stride=sizes.block_stride)
  kc = nsa.compress(k, phi, **kw)
  geo = kernels.geometry(q, k, sizes=sizes)
  tn = kernels.Tuning()
  q_rows = kernels.to_rows(q, geo.group)
  _, lse = kernels._cmp_fwd(q_rows, kc, kc, geo, tn, False)  # pylint: disable=protected-access
  imp = kernels._importance(q_rows, kc, lse, geo, tn, False)  # pylint: disable=protected-access
  idx = kernels._topn(imp, geo, tn, False)  # pylint: disable=protected-access
  parts = {
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


def main(_):
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
  results = []
  for length in map(int, _LENGTHS.value):
    results.append(case(length, _REPS.value, bandwidth))
    write(results, meta)


if __name__ == "__main__":
  app.run(main)
