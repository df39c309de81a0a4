"""MLA decode and DeepSeekMoE throughput on one GPU.

  python -m experiments.bench_mla                      # both parts, ~2 min on an H100
  python -m experiments.bench_mla --part=decode --contexts=8192,131072

Decode: one token step of one attention layer (projections + attention over a full
cache + cache write), d_model 2048, 16 query heads, bf16, batch 4, cache donated.
Peers of equal width: MHA (16 KV heads x 128), GQA (4 KV heads) as lca layers with the
default implementation (on GPU the Pallas flash-decode kernel) and with "xla" (and with
--kernel_only_peers the flash-decode kernel alone on the raw cache); MLA (d_c 512, d_R 64, d_h 128, d_c' 1536)
absorbed and naive (the attention through full.attention's XLA path). The floor is
the cache bytes read: MHA 2*16*128 = 4096, GQA 1024, MLA 576 values per token.
MoE: one DeepSeekMoE layer (1 shared + 64 routed experts, top-6, expert width 256)
against a dense SwiGLU of equal active width (7 x 256 = 1792) on 16k tokens, with the
routed experts through "blocked" (lca's sort-and-pad dispatch), "ragged"
(jax.lax.ragged_dot) and "dense" (every expert on every token),
forward and forward+backward; tokens/s.
Writes results.json, results.md and bench_mla.png under --out_dir.
"""

import datetime
import functools
import json
import math
import os
import statistics
import time
import traceback

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import bench_common
from lca.attention import full, mla
from lca.layers import mlp, moe

FLAGS = flags.FLAGS
flags.DEFINE_enum("part", "all", ["all", "decode", "moe"], "what to run")
flags.DEFINE_list("contexts", ["8192", "16384", "32768", "65536", "131072"], "decode contexts")
flags.DEFINE_integer("batch", 4, "decode batch")
flags.DEFINE_integer("moe_tokens", 16384, "tokens per MoE step")
flags.DEFINE_string("out_dir", "experiments/results/bench_mla", "where results go")
flags.DEFINE_integer("iters", 20, "timed iterations per case")
flags.DEFINE_list("layers", [], "decode: only layers whose name contains one of these (default all)")
flags.DEFINE_list("moe_layers", [], "MoE: only layers whose name contains one of these (default all)")
flags.DEFINE_string("merge_from", None, "results.json of an earlier run: its rows not re-run are kept")
flags.DEFINE_bool("kernel_only_peers", False, "also time flash_decode alone on raw MHA/GQA caches")

D_MODEL, HEADS, HEAD_DIM = 2048, 16, 128
KV_RANK, ROPE_DIM, Q_RANK = 512, 64, 1536


def timed(fn, *args, iters=None, donate_first=False):
  """Median ms per call after 3 warm-ups. With donate_first, each call's first output
  replaces the first argument (a donated cache)."""
  iters = iters or FLAGS.iters
  times, warmup, i = [], 3, 0
  while len(times) < iters:
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    ms = (time.perf_counter() - t0) * 1e3
    if i == 1 and ms > 200:  # a slow case (e.g. dense over all experts): few repeats
      warmup, iters = 2, 3
    if i >= warmup:
      times.append(ms)
    if donate_first:
      args = (out[1],) + args[1:]
    i += 1
  return statistics.median(times)


def _randomize(cache, key):
  """Random (never zero) cache contents; every slot filled (positions 0..C-2, last slot free)."""
  leaves = {}
  for i, (name, x) in enumerate(sorted(cache.items())):
    if name == "pos":
      cap = x.shape[1]
      leaves[name] = jnp.broadcast_to(jnp.where(jnp.arange(cap) < cap - 1, jnp.arange(cap), -1), x.shape)
    else:
      leaves[name] = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
  return leaves


def decode_layer_case(layer, batch, context):
  """Times one decode step of an lca layer; returns (ms, cache values per token)."""
  graphdef, state = nnx.split(layer)
  cache = _randomize(layer.init_cache(batch, context + 1, jnp.bfloat16), jax.random.key(1))
  x = jax.random.normal(jax.random.key(2), (batch, 1, D_MODEL), jnp.bfloat16)
  pos = jnp.full((batch, 1), context, jnp.int32)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def step(cache, state, x, pos):
    y, cache = nnx.merge(graphdef, state)(x, pos, cache=cache)
    return y, cache

  return timed(step, cache, state, x, pos, donate_first=True)


def flash_decode_case(batch, context, kv_heads):
  """The attention alone through lca's Pallas flash-decode kernel (cache read once)."""
  from pallas_kernels import flash_decode  # pylint: disable=g-import-not-at-top
  k = jax.random.normal(jax.random.key(3), (batch, context, kv_heads, HEAD_DIM), jnp.bfloat16)
  v = jax.random.normal(jax.random.key(4), (batch, context, kv_heads, HEAD_DIM), jnp.bfloat16)
  q = jax.random.normal(jax.random.key(5), (batch, 1, HEADS, HEAD_DIM), jnp.bfloat16)
  lengths = jnp.full((batch,), context, jnp.int32)
  fn = jax.jit(lambda q, k, v, l: flash_decode.flash_decode(q, k, v, l))
  return timed(fn, q, k, v, lengths)


def bench_decode(device_name):
  rows = []
  rngs = nnx.Rngs(0)
  layers = {  # MHA/GQA layers decode through the Pallas flash_decode kernel by default on GPU
      "MHA (16 kv)": lambda: full.Attention(D_MODEL, HEADS, HEADS, HEAD_DIM, rngs=rngs, dtype=jnp.bfloat16),
      "GQA (4 kv)": lambda: full.Attention(D_MODEL, HEADS, 4, HEAD_DIM, rngs=rngs, dtype=jnp.bfloat16),
      "MHA (16 kv), XLA": lambda: full.Attention(D_MODEL, HEADS, HEADS, HEAD_DIM, rngs=rngs,
                                                 dtype=jnp.bfloat16, implementation="xla"),
      "GQA (4 kv), XLA": lambda: full.Attention(D_MODEL, HEADS, 4, HEAD_DIM, rngs=rngs, dtype=jnp.bfloat16,
                                                implementation="xla"),
      "MLA absorbed": lambda: mla.MLAttention(D_MODEL, HEADS, q_rank=Q_RANK, kv_rank=KV_RANK,
                                              rope_dim=ROPE_DIM, head_dim=HEAD_DIM, v_head_dim=HEAD_DIM,
                                              decode="absorbed", rngs=rngs, dtype=jnp.bfloat16),
      "MLA naive": lambda: mla.MLAttention(D_MODEL, HEADS, q_rank=Q_RANK, kv_rank=KV_RANK,
                                           rope_dim=ROPE_DIM, head_dim=HEAD_DIM, v_head_dim=HEAD_DIM,
                                           decode="naive", rngs=rngs, dtype=jnp.bfloat16),
  }
  values = {"MHA (16 kv)": 2 * HEADS * HEAD_DIM, "GQA (4 kv)": 2 * 4 * HEAD_DIM,
            "MHA (16 kv), XLA": 2 * HEADS * HEAD_DIM, "GQA (4 kv), XLA": 2 * 4 * HEAD_DIM,
            "MLA absorbed": KV_RANK + ROPE_DIM, "MLA naive": KV_RANK + ROPE_DIM}
  keep = lambda name, wanted: not wanted or any(w in name for w in wanted)
  for context in [int(c) for c in FLAGS.contexts]:
    for name, make in ((n, m) for n, m in layers.items() if keep(n, FLAGS.layers)):
      layer = make()
      try:
        ms = decode_layer_case(layer, FLAGS.batch, context)
      except Exception as e:  # pylint: disable=broad-except
        print(f"{name} @ {context}: failed: {type(e).__name__}: {str(e)[:200]}")
        ms = float("nan")
      cache_bytes = values[name] * 2 * context * FLAGS.batch
      rows.append(dict(kind="decode", impl=name + " (layer)", context=context, batch=FLAGS.batch,
                       ms=ms, cache_values_per_token=values[name], cache_bytes=cache_bytes,
                       gb_per_s=cache_bytes / ms / 1e6 if ms == ms else float("nan")))
      print(json.dumps(rows[-1]), flush=True)
    for kv in ((HEADS, 4) if FLAGS.kernel_only_peers else ()):
      try:
        ms = flash_decode_case(FLAGS.batch, context, kv)
      except Exception as e:  # pylint: disable=broad-except
        traceback.print_exc(limit=1)
        ms = float("nan")
      cache_bytes = 2 * kv * HEAD_DIM * 2 * context * FLAGS.batch
      rows.append(dict(kind="decode", impl=f"{'MHA' if kv == HEADS else 'GQA'} ({kv} kv) attention only, "
                                           "Pallas flash_decode", context=context, batch=FLAGS.batch, ms=ms,
                       cache_values_per_token=2 * kv * HEAD_DIM, cache_bytes=cache_bytes,
                       gb_per_s=cache_bytes / ms / 1e6 if ms == ms else float("nan")))
      print(json.dumps(rows[-1]), flush=True)
  return rows


def bench_moe():
  rows = []
  n, experts, k, width = FLAGS.moe_tokens, 64, 6, 256
  rngs = nnx.Rngs(0)
  x = jax.random.normal(jax.random.key(0), (n // 2048, 2048, D_MODEL), jnp.bfloat16)
  layers = {
      f"MoE blocked (1 shared + {experts} routed, top-{k})": moe.MoE(
          D_MODEL, num_experts=experts, top_k=k, d_ff=width, num_shared=1, rngs=rngs, dtype=jnp.bfloat16,
          implementation="blocked"),
      f"MoE jax.lax.ragged_dot (1 shared + {experts} routed, top-{k})": moe.MoE(
          D_MODEL, num_experts=experts, top_k=k, d_ff=width, num_shared=1, rngs=rngs, dtype=jnp.bfloat16,
          implementation="ragged"),
      f"MoE dense reference (all {experts} experts)": moe.MoE(
          D_MODEL, num_experts=experts, top_k=k, d_ff=width, num_shared=1, rngs=rngs, dtype=jnp.bfloat16,
          implementation="dense"),
      f"dense SwiGLU d_ff={(k + 1) * width} (equal active)": mlp.SwiGLU(
          D_MODEL, (k + 1) * width, rngs=rngs, dtype=jnp.bfloat16),
  }
  active_flops = 2 * 3 * D_MODEL * (k + 1) * width * n
  for name, layer in layers.items():
    if FLAGS.moe_layers and not any(w in name for w in FLAGS.moe_layers):
      continue
    graphdef, state = nnx.split(layer)
    def out(state, x):
      y = nnx.merge(graphdef, state)(x)
      return y[0] if isinstance(y, tuple) else y
    fwd = jax.jit(out)
    train = jax.jit(jax.grad(lambda s, x: jnp.sum(out(s, x).astype(jnp.float32) ** 2)))
    for mode, fn, flops in (("forward", fwd, active_flops), ("forward+backward", train, 3 * active_flops)):
      try:
        ms = timed(fn, state, x)
      except Exception as e:  # pylint: disable=broad-except
        print(f"{name} {mode}: failed: {type(e).__name__}: {str(e)[:200]}")
        ms = float("nan")
      rows.append(dict(kind="moe", impl=name, mode=mode, tokens=n, ms=ms, tokens_per_s=n / ms * 1e3,
                       active_tflops=flops / ms / 1e9))
      print(json.dumps(rows[-1]), flush=True)
  return rows


def write_report(rows, meta):
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  with open(os.path.join(FLAGS.out_dir, "results.json"), "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  lines = [f"# bench_mla — {meta['device']}, {meta['date']}, jax {meta['jax']}", ""]
  dec = [r for r in rows if r["kind"] == "decode"]
  if dec:
    contexts = sorted({r["context"] for r in dec})
    impls = list(dict.fromkeys(r["impl"] for r in dec))
    lines += [f"Decode step, batch {dec[0]['batch']}, bf16: ms (cache values per token per layer)", "",
              "| layer | cache/token | " + " | ".join(f"{c // 1024}k" for c in contexts) + " |",
              "|---|---|" + "---|" * len(contexts)]
    for impl in impls:
      by = {r["context"]: r for r in dec if r["impl"] == impl}
      vals = " | ".join(f"{by[c]['ms']:.3f}" if c in by else "" for c in contexts)
      lines.append(f"| {impl} | {next(iter(by.values()))['cache_values_per_token']} | {vals} |")
    lines.append("")
  mo = [r for r in rows if r["kind"] == "moe"]
  if mo:
    lines += [f"MoE layer, {mo[0]['tokens']} tokens, d_model {D_MODEL}, bf16", "",
              "| layer | mode | ms | tokens/s | active TFLOP/s |", "|---|---|---|---|---|"]
    for r in mo:
      lines.append(f"| {r['impl']} | {r['mode']} | {r['ms']:.3f} | {r['tokens_per_s']:.3g} | "
                   f"{r['active_tflops']:.1f} |")
  with open(os.path.join(FLAGS.out_dir, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  if dec:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for impl in impls:
      pts = sorted((r["context"], r["ms"]) for r in dec if r["impl"] == impl)
      ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode step (ms)")
    ax.set_title(f"one-layer decode step, batch {dec[0]['batch']}, {meta['device']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(FLAGS.out_dir, "bench_mla.png"), dpi=120)


def main(argv):
  del argv
  meta = {"device": jax.devices()[0].device_kind, "date": bench_common.today(), "jax": jax.__version__,
          "run_at": datetime.datetime.now().isoformat(timespec="seconds")}
  rows = []
  if FLAGS.part in ("all", "decode"):
    rows += bench_decode(meta["device"])
  if FLAGS.part in ("all", "moe"):
    rows += bench_moe()
  if FLAGS.merge_from:
    key = lambda r: (r["kind"], r["impl"], r.get("context"), r.get("mode"))
    done = {key(r) for r in rows}
    with open(FLAGS.merge_from) as f:
      earlier = json.load(f)
    kept = [dict(r, run_at=earlier["meta"].get("run_at")) for r in earlier["rows"] if key(r) not in done]
    rows = [dict(r, run_at=meta["run_at"]) for r in rows]
    rows = sorted(kept + rows, key=lambda r: (r["kind"], r.get("context") or 0))
    meta["merged_from"] = earlier["meta"]
  write_report(rows, meta)


if __name__ == "__main__":
  app.run(main)
