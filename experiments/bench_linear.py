"""Gated DeltaNet (Pallas chunk kernel) vs cuDNN full attention: training passes and decoding (GPU).

    python -m experiments.bench_linear --lengths=8192,16384,32768,65536,131072

Batch 1, 16 heads, head_dim 128 (q/k and v), bf16, causal. For each length:
  forward and forward+backward of cuDNN attention (jax.nn.dot_product_attention,
  implementation="cudnn") and of the gated delta rule (pallas_kernels.gated_delta, and
  its gated-linear twin without the delta term); the XLA chunked form for reference
  at short lengths. Decoding: one token of the recurrent step on the fixed
  [16, 128, 128] state vs one query of cuDNN/XLA attention over an L-token KV cache,
  with the bytes each keeps. Times are medians of block_until_ready wall times after
  warm-up, all peers in this one process. A block_v sweep at --sweep_length picks the
  scan tile first. Writes experiments/results/bench_linear/{results.json, results.md,
  bench_linear.png}.
"""

import dataclasses
import datetime
import functools
import json
import pathlib

from absl import app, flags
import jax
import jax.numpy as jnp

from experiments import bench_common
from lca.attention import linear
from pallas_kernels import gated_delta
from pallas_kernels import gated_delta_bwd

_LENGTHS = flags.DEFINE_list("lengths", ["8192", "16384", "32768", "65536", "131072"], "Sequence lengths.")
_HEADS = flags.DEFINE_integer("heads", 16, "Heads.")
_DIM = flags.DEFINE_integer("head_dim", 128, "Head dim (q/k and v).")
_REPS = flags.DEFINE_integer("reps", 5, "Timed repetitions (median).")
_SWEEP_LENGTH = flags.DEFINE_integer("sweep_length", 65536, "Length of the block_v sweep (0: no sweep).")
_XLA_MAX = flags.DEFINE_integer("xla_max_length", 32768, "Longest length for the XLA chunked form.")
_BREAKDOWN = flags.DEFINE_integer("breakdown_length", 0, "If set: time each kernel alone at this length and exit.")
_BWD_BREAKDOWN = flags.DEFINE_integer(
    "bwd_breakdown", 0, "If set: time the in-chunk backward (XLA batched vjp vs the Pallas kernel "
    "of pallas_kernels.gated_delta_bwd, a config sweep) and forward+backward with each, at this "
    "length, and exit (bwd_breakdown.json).")
_BWD_CONFIGS = flags.DEFINE_list("bwd_configs", ["32:8:1", "32:8:2", "64:8:1", "16:4:1"],
                                  "--bwd_breakdown sweep: block_v:num_warps:num_stages of gated_delta_bwd.")
_OUT = flags.DEFINE_string("out", "experiments/results/bench_linear", "Output directory.")


bench = bench_common.bench


def _try(label, fn, *args, reps):
  """Like bench_common.try_bench, in milliseconds."""
  t = bench_common.try_bench(label, fn, *args, reps=reps)
  return None if t is None else t * 1e3


def _inputs(length, seed=0):
  h, d = _HEADS.value, _DIM.value
  ks = jax.random.split(jax.random.key(seed), 6)
  bf = jnp.bfloat16
  q = linear.l2_normalize(jax.random.normal(ks[0], (1, length, h, d), bf))
  k = linear.l2_normalize(jax.random.normal(ks[1], (1, length, h, d), bf))
  v = jax.random.normal(ks[2], (1, length, h, d), bf)
  beta = jax.nn.sigmoid(jax.random.normal(ks[3], (1, length, h)))
  log_alpha = -jax.nn.softplus(jax.random.normal(ks[4], (1, length, h)) - 2.0)
  do = jax.random.normal(ks[5], (1, length, h, d), bf)
  return q, k, v, beta, log_alpha, do


def _gdn_fns(config, delta=True):
  def fwd(q, k, v, beta, log_alpha):
    return gated_delta.chunk_gated_delta_rule(q, k, v, beta if delta else None, log_alpha, config=config)[0]

  def loss(q, k, v, beta, log_alpha, do):
    return jnp.sum(fwd(q, k, v, beta, log_alpha).astype(jnp.float32) * do.astype(jnp.float32))
  return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))


def sweep(reps):
  if not _SWEEP_LENGTH.value:
    return gated_delta.Config(), []
  print(f"block_v sweep at L={_SWEEP_LENGTH.value}", flush=True)
  q, k, v, beta, log_alpha, _ = _inputs(_SWEEP_LENGTH.value)
  rows, best = [], None
  for block_v in (16, 32, 64):
    for warps in (4,):
      cfg = gated_delta.Config(block_v=block_v, num_warps_scan=warps)
      t = _try(f"block_v={block_v} warps={warps} fwd", _gdn_fns(cfg)[0], q, k, v, beta, log_alpha, reps=reps)
      rows.append(dict(block_v=block_v, num_warps=warps, fwd_ms=t))
      if t is not None and (best is None or t < best[0]):
        best = (t, cfg)
  return (gated_delta.Config() if best is None else best[1]), rows


def train_case(length, cfg, reps):
  print(f"L={length}", flush=True)
  q, k, v, beta, log_alpha, do = _inputs(length)
  res = {"length": length}
  cudnn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
  cudnn_grad = jax.grad(lambda q, k, v, do: jnp.sum(cudnn(q, k, v).astype(jnp.float32) * do), (0, 1, 2))
  res["cudnn_fwd_ms"] = _try("cudnn fwd", jax.jit(cudnn), q, k, v, reps=reps)
  res["cudnn_fwdbwd_ms"] = _try("cudnn fwd+bwd", jax.jit(cudnn_grad), q, k, v, do, reps=reps)
  fwd, grad = _gdn_fns(cfg)
  res["gdn_fwd_ms"] = _try("gdn pallas fwd", fwd, q, k, v, beta, log_alpha, reps=reps)
  res["gdn_fwdbwd_ms"] = _try("gdn pallas fwd+bwd", grad, q, k, v, beta, log_alpha, do, reps=reps)
  fwd, grad = _gdn_fns(cfg, delta=False)
  res["gla_fwd_ms"] = _try("gated linear pallas fwd", fwd, q, k, v, beta, log_alpha, reps=reps)
  res["gla_fwdbwd_ms"] = _try("gated linear pallas fwd+bwd", grad, q, k, v, beta, log_alpha, do, reps=reps)
  if length <= _XLA_MAX.value:
    xla = jax.jit(lambda *a: linear.gated_delta_rule_chunked(*a)[0])
    res["gdn_xla_fwd_ms"] = _try("gdn xla chunked fwd", xla, q, k, v, beta, log_alpha, reps=reps)
  return res


def decode_case(length, reps):
  h, d = _HEADS.value, _DIM.value
  ks = jax.random.split(jax.random.key(length), 5)
  bf = jnp.bfloat16
  res = {"length": length, "gdn_state_bytes": h * d * d * 4, "kv_cache_bytes": 2 * length * h * d * 2}
  q = jax.random.normal(ks[0], (1, h, d), bf)
  state = jax.random.normal(ks[1], (1, h, d, d), jnp.float32)
  beta, la = jnp.full((1, h), 0.5), jnp.full((1, h), -0.01)
  step = jax.jit(lambda s, q, k, v: linear.gated_delta_rule_step(s, q, k, v, beta, la))
  res["gdn_step_ms"] = _try("gdn decode step", step, state, q, q, q, reps=reps)
  kc = jax.random.normal(ks[2], (1, length, h, d), bf)
  vc = jax.random.normal(ks[3], (1, length, h, d), bf)
  for impl in ("cudnn", "xla"):
    f = jax.jit(lambda q, k, v, impl=impl: jax.nn.dot_product_attention(q[:, None], k, v, implementation=impl))
    res[f"full_{impl}_step_ms"] = _try(f"full attention decode ({impl})", f, q, kc, vc, reps=reps)
  return res


def _ratio(a, b):
  return None if a is None or b is None or b == 0 else a / b


def write(results, out: pathlib.Path):
  out.mkdir(parents=True, exist_ok=True)
  meta = dict(device=str(jax.devices()[0].device_kind), date=bench_common.today(), jax=jax.__version__,
              batch=1, heads=_HEADS.value, head_dim=_DIM.value, dtype="bfloat16", chunk=gated_delta.CHUNK,
              config=str(results["config"]), run_at=datetime.datetime.now().isoformat(timespec="seconds"))
  (out / "results.json").write_text(json.dumps(
      dict(meta=meta, **{k: v for k, v in results.items() if k != "config"}), indent=1))
  f = lambda x: "-" if x is None else (f"{x:.3f}" if x < 10 else f"{x:.1f}")
  lines = [f"{meta['device']}, jax {meta['jax']}, {meta['date']}; batch 1, {meta['heads']} heads, "
           f"head_dim {meta['head_dim']}, bf16, causal; {meta['config']}", "",
           "| L | cuDNN fwd ms | GDN fwd ms | fwd speed-up | cuDNN fwd+bwd ms | GDN fwd+bwd ms | "
           "fwd+bwd speed-up | GLA fwd ms | GLA fwd+bwd ms | GDN XLA-chunked fwd ms |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in results["train"]:
    lines.append(f"| {r['length']} | {f(r['cudnn_fwd_ms'])} | {f(r['gdn_fwd_ms'])} | "
                 f"{f(_ratio(r['cudnn_fwd_ms'], r['gdn_fwd_ms']))}x | {f(r['cudnn_fwdbwd_ms'])} | "
                 f"{f(r['gdn_fwdbwd_ms'])} | {f(_ratio(r['cudnn_fwdbwd_ms'], r['gdn_fwdbwd_ms']))}x | "
                 f"{f(r['gla_fwd_ms'])} | {f(r['gla_fwdbwd_ms'])} | {f(r.get('gdn_xla_fwd_ms'))} |")
  lines += ["", "| decode L | GDN step ms | GDN state bytes/layer | full cuDNN step ms | full XLA step ms | "
            "KV cache bytes/layer |", "|---|---|---|---|---|---|"]
  for r in results["decode"]:
    lines.append(f"| {r['length']} | {f(r['gdn_step_ms'])} | {r['gdn_state_bytes']:,} | "
                 f"{f(r['full_cudnn_step_ms'])} | {f(r['full_xla_step_ms'])} | {r['kv_cache_bytes']:,} |")
  if results["sweep"]:
    lines += ["", f"block_v sweep (GDN fwd at L={_SWEEP_LENGTH.value}): " + ", ".join(
        f"bv{r['block_v']}/w{r['num_warps']}: {f(r['fwd_ms'])} ms" for r in results["sweep"])]
  (out / "results.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ls = [r["length"] for r in results["train"]]
    for key, label in (("cudnn_fwd_ms", "cuDNN fwd"), ("gdn_fwd_ms", "GDN fwd"),
                       ("cudnn_fwdbwd_ms", "cuDNN fwd+bwd"), ("gdn_fwdbwd_ms", "GDN fwd+bwd"),
                       ("gla_fwd_ms", "GLA fwd")):
      ys = [r.get(key) for r in results["train"]]
      pts = [(l, y) for l, y in zip(ls, ys) if y is not None]
      if pts:
        axes[0].plot(*zip(*pts), marker="o", label=label)
    axes[0].set(xscale="log", yscale="log", xlabel="sequence length", ylabel="ms",
                title=f"{meta['heads']} heads x {meta['head_dim']}, bf16, batch 1")
    axes[0].legend()
    dl = [r["length"] for r in results["decode"]]
    for key, label in (("gdn_step_ms", "GDN step"), ("full_cudnn_step_ms", "full (cuDNN)"),
                       ("full_xla_step_ms", "full (XLA)")):
      pts = [(l, r.get(key)) for l, r in zip(dl, results["decode"]) if r.get(key) is not None]
      if pts:
        axes[1].plot(*zip(*pts), marker="o", label=label)
    axes[1].set(xscale="log", yscale="log", xlabel="context length", ylabel="ms per token",
                title="decode step, one layer")
    axes[1].legend()
    fig.suptitle(f"{meta['device']}, jax {meta['jax']}, {meta['date']}")
    fig.tight_layout()
    fig.savefig(out / "bench_linear.png", dpi=120)
  except ImportError:
    pass


_INTERP = lambda: gated_delta.resolve_interpret(None)


def breakdown(length, reps):
  """Each stage of the Pallas forward and backward alone, with launch-parameter variants."""
  q, k, v, beta, log_alpha, do = _inputs(length)
  g = jnp.cumsum(log_alpha.reshape(1, -1, gated_delta.CHUNK, _HEADS.value), axis=2).reshape(log_alpha.shape)
  scale, res = _DIM.value ** -0.5, {"length": length}
  base = gated_delta.Config()
  s0 = jnp.zeros((1, _HEADS.value, _DIM.value, _DIM.value), jnp.float32)
  prep = lambda cfg: jax.jit(lambda *a: gated_delta._launch_prep(*a, scale=scale, delta=True, cfg=cfg,
                                                                 interpret=_INTERP()))
  for mode in ("fp16", "tf32", "tf32x3"):
    cfg = dataclasses.replace(base, inverse_precision=mode)
    res[f"prep_{mode}_ms"] = _try(f"prep ({mode} inverse)", prep(cfg), q, k, v, beta, g, reps=reps)
  p, w, u = prep(base)(q, k, v, beta, g)
  for block_v in (16, 32):
    for stages in (2, 3):
      for store in (False, True):
        cfg = dataclasses.replace(base, block_v=block_v, num_stages=stages)
        f = jax.jit(lambda *a, cfg=cfg, store=store: gated_delta._launch_forward(
            *a, scale=scale, delta=True, store_states=store, cfg=cfg, interpret=_INTERP()))
        name = f"scan_bv{block_v}_stages{stages}_store{int(store)}"
        res[name + "_ms"] = _try(name, f, q, k, u, g, p, s0, w, reps=reps)
  f = jax.jit(lambda *a: gated_delta._launch_backward(*a, scale=scale, delta=True, cfg=base, interpret=_INTERP()))
  res["bwd_scan_ms"] = _try("reverse scan", f, q, k, g, p, do, s0, w, reps=reps)
  for delta in (True, False):
    f = jax.jit(lambda q, k, v, b, la, delta=delta: gated_delta.chunk_gated_delta_rule(
        q, k, v, b if delta else None, la, config=base))
    res[f"fwd_delta{int(delta)}_ms"] = _try(f"fwd delta={delta}", f, q, k, v, beta, log_alpha, reps=reps)
  print(json.dumps(res), flush=True)
  return res


def bwd_breakdown(length, reps):
  """The in-chunk backward alone: XLA batched vjp vs the Pallas kernel (sweep), and fwd+bwd with each."""
  q, k, v, beta, log_alpha, do = _inputs(length)
  h, d = _HEADS.value, _DIM.value
  n = length // gated_delta.CHUNK
  ks = jax.random.split(jax.random.key(7), 2)
  states = jax.random.normal(ks[0], (1, h, n * d, d), jnp.float32) * 0.3
  dstates = jax.random.normal(ks[1], (1, h, n * d, d), jnp.float32) * 0.3
  scale, res = d ** -0.5, {"length": length, "sweep": []}
  args = (q, k, v, beta, log_alpha, states, dstates, do)
  err = lambda x, y: float(jnp.linalg.norm((x.astype(jnp.float32) - y.astype(jnp.float32)).ravel())
                           / jnp.linalg.norm(y.astype(jnp.float32).ravel()))
  best = {}
  for delta in (True, False):
    ref_fn = jax.jit(functools.partial(gated_delta_bwd.chunk_local_grads_reference, scale=scale, delta=delta))
    res[f"xla_vjp_delta{int(delta)}_ms"] = _try(f"XLA batched vjp delta={delta}", ref_fn, *args, reps=reps)
    want = ref_fn(*args)
    for spec in _BWD_CONFIGS.value:
      block_v, warps, stages = (int(x) for x in spec.split(":"))
      cfg = gated_delta_bwd.Config(block_v=block_v, num_warps=warps, num_stages=stages)
      fn = jax.jit(functools.partial(gated_delta_bwd.chunk_local_grads, scale=scale, delta=delta, config=cfg))
      t = _try(f"pallas delta={delta} {cfg}", fn, *args, reps=reps)
      row = dict(delta=delta, block_v=block_v, num_warps=warps, num_stages=stages, ms=t)
      if t is not None:
        got = fn(*args)
        row["rel_err_vs_xla"] = {nm: err(x, y) for nm, x, y in zip(("dq", "dk", "dv", "dbeta", "dla"), got, want)
                                 if float(jnp.max(jnp.abs(y))) > 0}
        print("   rel err vs XLA:", row["rel_err_vs_xla"], flush=True)
        if delta not in best or t < best[delta][0]:
          best[delta] = (t, cfg)
      res["sweep"].append(row)
    del want
  s0 = jnp.zeros((1, h, d, d), jnp.float32)
  for delta in (True, False):
    b = beta if delta else jnp.zeros_like(beta)
    def loss(cfg, q, k, v, b, la, delta=delta):
      o, _ = gated_delta._gated_delta(q, k, v, b, la, s0, scale, delta, cfg, _INTERP())
      return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32))
    grads = {}
    for label, local in (("xla", "xla"), ("pallas", best[delta][1] if delta in best else None)):
      if local is None:
        continue
      cfg = gated_delta.Config(local_grads=local)
      g = jax.jit(jax.grad(functools.partial(loss, cfg), argnums=(0, 1, 2, 3, 4)))
      res[f"fwdbwd_{label}_delta{int(delta)}_ms"] = _try(f"fwd+bwd delta={delta} local grads={label}",
                                                         g, q, k, v, b, log_alpha, reps=reps)
      if res[f"fwdbwd_{label}_delta{int(delta)}_ms"] is not None:
        grads[label] = g(q, k, v, b, log_alpha)
    if len(grads) == 2:
      res[f"fwdbwd_rel_err_delta{int(delta)}"] = {
          nm: err(x, y) for nm, x, y in zip(("dq", "dk", "dv", "dbeta", "dla"), grads["pallas"], grads["xla"])
          if float(jnp.max(jnp.abs(y))) > 0}
      print("   fwd+bwd grads rel err pallas vs xla:", res[f"fwdbwd_rel_err_delta{int(delta)}"], flush=True)
  res["best"] = {str(k): str(v[1]) for k, v in best.items()}
  cudnn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
  cudnn_grad = jax.grad(lambda q, k, v: jnp.sum(cudnn(q, k, v).astype(jnp.float32) * do), (0, 1, 2))
  res["cudnn_fwdbwd_ms"] = _try("cudnn fwd+bwd", jax.jit(cudnn_grad), q, k, v, reps=reps)
  res["meta"] = dict(device=str(jax.devices()[0].device_kind), date=bench_common.today(), jax=jax.__version__)
  print(json.dumps(res), flush=True)
  return res


def main(argv):
  del argv
  reps = _REPS.value
  if _BWD_BREAKDOWN.value:
    out = pathlib.Path(_OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bwd_breakdown.json").write_text(json.dumps(bwd_breakdown(_BWD_BREAKDOWN.value, reps), indent=1))
    return
  if _BREAKDOWN.value:
    out = pathlib.Path(_OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    (out / "breakdown.json").write_text(json.dumps(breakdown(_BREAKDOWN.value, reps), indent=1))
    return
  print(jax.devices(), flush=True)
  cfg, sweep_rows = sweep(reps)
  print("using", cfg, flush=True)
  lengths = [int(x) for x in _LENGTHS.value]
  results = dict(config=cfg, sweep=sweep_rows, train=[train_case(l, cfg, reps) for l in lengths],
                 decode=[decode_case(l, reps) for l in lengths])
  write(results, pathlib.Path(_OUT.value))


if __name__ == "__main__":
  app.run(main)
