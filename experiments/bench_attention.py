"""Attention kernels on one GPU: lca's Pallas flash vs cuDNN, XLA and JAX's bundled Pallas mha.

  python -m experiments.bench_attention                 # everything, ~6 min on an H100
  python -m experiments.bench_attention --mode=tune     # block-size sweeps (NOTES_flash.md)
  python -m experiments.bench_attention --mode=tune_mosaic   # Mosaic forward tiles
  python -m experiments.bench_attention --mode=train --lengths=8192 --head_dims=128
  python -m experiments.bench_attention --mode=train --impls=pallas,pallas_triton,cudnn \
      --keep_from=experiments/results/bench_attention/results.jsonl   # rerun some, keep the rest

Implementations: "pallas" is lca's flash_attention as training calls it
(forward_kernel="auto": on an H100 the Mosaic GPU forward of flash_mgpu.py, then the
Triton backward); "pallas_triton" forces the Triton forward (the whole op in Triton).

Training: L = 1k..64k with batch * L = 16k tokens, 16 heads, bf16, causal and not,
forward and forward+backward; TFLOP/s counts 4 B H L^2 D for the forward (half of it
when causal) and 2.5x that for the backward. Decode: one query token, batch 8,
32 query / 8 KV heads, head_dim 128; GB/s counts the K and V cache bytes, the floor.
Memory: XLA's compiled temporary bytes of forward+backward, naive vs flash.
Writes results.jsonl, results.md and bench_attention.png under --out_dir.
"""

import dataclasses
import datetime
import functools
import json
import math
import os
import statistics
import time
import traceback
import warnings

from absl import app, flags
import jax
import jax.numpy as jnp

from experiments import bench_common
from pallas_kernels import flash, flash_decode

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", "all", ["all", "train", "decode", "memory", "tune", "tune_mosaic"],
                  "what to run")
flags.DEFINE_list("lengths", ["1024", "2048", "4096", "8192", "16384", "32768", "65536"],
                  "training sequence lengths")
flags.DEFINE_list("head_dims", ["128", "64"], "head dims for the training benchmark")
flags.DEFINE_list("impls", ["pallas", "pallas_triton", "cudnn", "xla", "jax_mha"],
                  "training implementations")
flags.DEFINE_integer("tokens", 16384, "batch * L for the training benchmark")
flags.DEFINE_integer("heads", 16, "query (= KV) heads for the training benchmark")
flags.DEFINE_list("contexts", ["8192", "16384", "32768", "65536", "131072"], "decode contexts")
flags.DEFINE_string("out_dir", "experiments/results/bench_attention", "where results go")
flags.DEFINE_float("budget_ms", 40.0, "approximate time spent timing each case")
flags.DEFINE_string("report_from", None, "only rebuild the report from this JSON-lines log")
flags.DEFINE_string("device", None, "device name for a rebuilt report")
flags.DEFINE_string("keep_from", None, "JSON-lines results of an earlier run (same device): "
                    "its records that this run does not remeasure are kept in the report")

DATE = bench_common.today()


def bench(fn, *args, budget_ms=None):
  """Median milliseconds per call: warm-up, then repeats of back-to-back calls."""
  budget_ms = budget_ms or FLAGS.budget_ms
  jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  once = (time.perf_counter() - t0) * 1e3
  inner = max(1, min(50, int(budget_ms / 5 / max(once, 1e-3))))
  times = []
  for _ in range(5):
    t0 = time.perf_counter()
    for _ in range(inner):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) * 1e3 / inner)
  return statistics.median(times)


# ----------------------------------------------------------------------------- training


TRAIN_IMPLS = ("pallas", "pallas_triton", "cudnn", "xla", "jax_mha")


def _attn_fn(impl, causal, blocks=None):
  if impl in ("pallas", "pallas_triton"):
    return functools.partial(flash.flash_attention, causal=causal, block_sizes=blocks,
                             forward_kernel="auto" if impl == "pallas" else "triton")
  if impl in ("cudnn", "xla"):
    return functools.partial(jax.nn.dot_product_attention, is_causal=causal, implementation=impl)
  if impl == "jax_mha":
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      from jax.experimental.pallas.ops.gpu import attention as jax_attention  # pylint: disable=g-import-not-at-top

    def mha(q, k, v):
      return jax_attention.mha(q, k, v, segment_ids=None, sm_scale=1 / math.sqrt(q.shape[-1]),
                               causal=causal)
    return mha
  raise ValueError(impl)


def _train_fns(impl, causal, blocks=None):
  attn = _attn_fn(impl, causal, blocks)
  fwd = jax.jit(attn)

  @jax.jit
  def fwd_bwd(q, k, v, do):
    out, vjp = jax.vjp(attn, q, k, v)
    return out, vjp(do)
  return fwd, fwd_bwd


def _train_inputs(batch, length, heads, head_dim, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  shape = (batch, length, heads, head_dim)
  return [jax.random.normal(k, shape, jnp.bfloat16) for k in ks]


def train_flops(batch, length, heads, head_dim, causal):
  return 4 * batch * heads * length * length * head_dim * (0.5 if causal else 1.0)


def run_train(records):
  for head_dim in map(int, FLAGS.head_dims):
    for length in map(int, FLAGS.lengths):
      batch = max(1, FLAGS.tokens // length)
      q, k, v, do = _train_inputs(batch, length, FLAGS.heads, head_dim)
      for causal in (True, False):
        flops = train_flops(batch, length, FLAGS.heads, head_dim, causal)
        for impl in FLAGS.impls:
          if impl == "xla" and batch * FLAGS.heads * length * length > 2 ** 31:
            continue  # the [B, H, L, L] scores alone would not fit
          fwd, fwd_bwd = _train_fns(impl, causal)
          for what, fn, args, f in (("fwd", fwd, (q, k, v), flops),
                                    ("fwd+bwd", fwd_bwd, (q, k, v, do), 3.5 * flops)):
            rec = dict(kind="train", impl=impl, what=what, length=length, batch=batch,
                       heads=FLAGS.heads, head_dim=head_dim, causal=causal)
            try:
              ms = bench(fn, *args)
              rec.update(ms=ms, tflops=f / ms / 1e9)
            except Exception as e:  # pylint: disable=broad-except
              rec.update(error=f"{type(e).__name__}: {str(e)[:200]}")
            records.append(rec)
            print(json.dumps(rec), flush=True)


# ----------------------------------------------------------------------------- decode


def _decode_fn(impl, **kw):
  if impl == "pallas":
    return jax.jit(lambda q, k, v, lens: flash_decode.flash_decode(q, k, v, lens, **kw))
  if impl in ("cudnn", "xla"):
    return jax.jit(lambda q, k, v, lens: jax.nn.dot_product_attention(
        q, k, v, key_value_seq_lengths=lens, implementation=impl))
  raise ValueError(impl)


def _decode_inputs(context, batch=8, heads=32, kv_heads=8, head_dim=128, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(ks[0], (batch, 1, heads, head_dim), jnp.bfloat16)
  k = jax.random.normal(ks[1], (batch, context, kv_heads, head_dim), jnp.bfloat16)
  v = jax.random.normal(ks[2], (batch, context, kv_heads, head_dim), jnp.bfloat16)
  return q, k, v, jnp.full((batch,), context, jnp.int32)


def run_decode(records, configs=None):
  for context in map(int, FLAGS.contexts):
    q, k, v, lens = _decode_inputs(context)
    floor_bytes = 2 * k.size * k.dtype.itemsize
    impls = configs or [("pallas", {}), ("cudnn", {}), ("xla", {})]
    for impl, kw in impls:
      rec = dict(kind="decode", impl=impl, context=context, batch=8, heads=32, kv_heads=8,
                 head_dim=128, config=kw, floor_ms=floor_bytes / 3.0e9)
      try:
        ms = bench(_decode_fn(impl, **kw), q, k, v, lens)
        rec.update(ms=ms, gbps=floor_bytes / ms / 1e6)
      except Exception as e:  # pylint: disable=broad-except
        rec.update(error=f"{type(e).__name__}: {str(e)[:200]}")
      records.append(rec)
      print(json.dumps(rec), flush=True)
    del q, k, v


# ----------------------------------------------------------------------------- memory


def run_memory(records):
  for length in (1024, 2048, 4096, 8192, 16384, 32768):
    q, k, v, do = (jax.ShapeDtypeStruct((1, length, 16, 128), jnp.bfloat16),) * 4
    for impl in ("xla", "pallas"):
      if impl == "xla" and length > 16384:
        continue
      _, fwd_bwd = _train_fns(impl, True)
      rec = dict(kind="memory", impl=impl, length=length, batch=1, heads=16, head_dim=128)
      try:
        mem = fwd_bwd.lower(q, k, v, do).compile().memory_analysis()
        rec.update(temp_mib=mem.temp_size_in_bytes / 2 ** 20,
                   total_mib=(mem.temp_size_in_bytes + mem.argument_size_in_bytes
                              + mem.output_size_in_bytes) / 2 ** 20)
      except Exception as e:  # pylint: disable=broad-except
        rec.update(error=f"{type(e).__name__}: {str(e)[:200]}")
      records.append(rec)
      print(json.dumps(rec), flush=True)


# ----------------------------------------------------------------------------- tuning


def run_tune(records):
  """Sweeps forward and backward tiles at 8k causal, and decode splits at 32k/128k."""
  B = flash.BlockSizes
  for head_dim in (128, 64):
    q, k, v, do = _train_inputs(2, 8192, 16, head_dim)
    flops = train_flops(2, 8192, 16, head_dim, True)
    base = B.default(head_dim, jnp.bfloat16)
    fwd_cfgs = [dict(block_q=bq, block_k=bk, num_warps=w, num_stages=s)
                for bq, bk, w, s in ((128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3),
                                     (128, 32, 4, 4), (64, 64, 4, 3), (128, 64, 8, 4),
                                     (128, 128, 8, 2), (256, 64, 8, 3))]
    for cfg in fwd_cfgs:
      blocks = dataclasses.replace(base, **cfg)
      fwd, _ = _train_fns("pallas", True, blocks)
      _tune_record(records, dict(kind="tune", what="fwd", head_dim=head_dim, config=cfg),
                   fwd, (q, k, v), flops)
    bwd_cfgs = [dict(block_q_dkv=a, block_k_dkv=b, num_warps_dkv=w, num_stages_dkv=s,
                     block_q_dq=c, block_k_dq=d, num_warps_dq=w2, num_stages_dq=s2)
                for a, b, w, s, c, d, w2, s2 in (
                    (64, 128, 8, 2, 128, 64, 8, 2), (32, 128, 4, 2, 128, 32, 4, 2),
                    (64, 128, 4, 3, 128, 64, 4, 3), (32, 64, 4, 3, 64, 32, 4, 3),
                    (64, 64, 4, 2, 64, 64, 4, 2), (32, 128, 8, 3, 128, 32, 8, 3),
                    (64, 128, 8, 3, 128, 64, 8, 3))]
    for cfg in bwd_cfgs:
      blocks = dataclasses.replace(base, **cfg)
      _, fwd_bwd = _train_fns("pallas", True, blocks)
      _tune_record(records, dict(kind="tune", what="fwd+bwd", head_dim=head_dim, config=cfg),
                   fwd_bwd, (q, k, v, do), 3.5 * flops)
  FLAGS.contexts = ["32768", "131072"]
  run_decode(records, configs=[("cudnn", {})] + [
      ("pallas", dict(num_splits=s, block_k=bk, num_warps=w, num_stages=st))
      for s, bk, w, st in ((None, 64, 4, 3), (16, 64, 4, 4), (32, 64, 4, 3), (64, 64, 4, 3),
                           (16, 128, 4, 3), (32, 128, 8, 3), (32, 32, 4, 4), (8, 64, 4, 3))])


def _tune_record(records, rec, fn, args, flops):
  """Times fn(*args) for a tuning sweep into `rec` (ms, TFLOP/s, or the error); appends and prints it."""
  try:
    ms = bench(fn, *args, budget_ms=30)
    rec.update(ms=ms, tflops=flops / ms / 1e9)
  except Exception as e:  # pylint: disable=broad-except
    rec.update(error=f"{type(e).__name__}: {str(e)[:300]}")
  records.append(rec)
  print(json.dumps(rec), flush=True)


def run_tune_mosaic(records):
  """Mosaic forward tiles (block_kv, num_stages) at L = 16k, causal, against cuDNN."""
  from pallas_kernels import flash_mgpu  # pylint: disable=g-import-not-at-top
  for head_dim, cfgs in ((128, ((64, 128, 2), (64, 64, 2), (64, 64, 3))),
                         (64, ((64, 128, 2), (64, 128, 3), (64, 256, 2), (64, 64, 3)))):
    q, k, v, _ = _train_inputs(1, 16384, 16, head_dim)
    for causal in (True,):
      flops = train_flops(1, 16384, 16, head_dim, causal)
      for bq, bkv, stages in cfgs:
        cfg = flash_mgpu.Config(block_q=bq, block_kv=bkv, num_stages=stages)
        fwd = jax.jit(functools.partial(flash_mgpu.forward, causal=causal,
                                        scale=head_dim ** -0.5, q_len=16384, kv_len=16384,
                                        config=cfg))
        _tune_record(records, dict(kind="tune", what="fwd_mosaic", head_dim=head_dim, causal=causal,
                                   config=dict(block_q=bq, block_kv=bkv, num_stages=stages)),
                     fwd, (q, k, v), flops)
      cudnn = jax.jit(_attn_fn("cudnn", causal))
      ms = bench(cudnn, q, k, v, budget_ms=30)
      rec = dict(kind="tune", what="fwd_mosaic", head_dim=head_dim, causal=causal,
                 config="cudnn", ms=ms, tflops=flops / ms / 1e9)
      records.append(rec)
      print(json.dumps(rec), flush=True)


def _record_key(r):
  return tuple(r.get(f) for f in ("kind", "impl", "what", "length", "head_dim", "causal",
                                  "context", "config")).__repr__()


def keep_earlier(records, path):
  """Records of an earlier results.jsonl that `records` does not remeasure, marked
  with `from_earlier_run` (their run_at) so the report can say so."""
  with open(path) as f:
    old = [json.loads(line) for line in f if line.startswith("{")]
  meta = next((r for r in old if r.get("kind") == "meta"), {})
  run_at = meta.get("run_at")
  if "pallas_forward" not in meta:  # a run from before forward_kernel: "pallas" was Triton
    old = [dict(r, impl="pallas_triton") if r.get("kind") == "train" and r.get("impl") == "pallas"
           else r for r in old]
  new = {_record_key(r) for r in records}
  # Each kept training record carries the cuDNN rate of its own run, for its ratio.
  cudnn = {_record_key(dict(r, impl=None)): r.get("tflops") for r in old
           if r.get("kind") == "train" and r.get("impl") == "cudnn"}
  kept = [dict(r, from_earlier_run=r.get("from_earlier_run", run_at),
               cudnn_tflops_same_run=r.get("cudnn_tflops_same_run",
                                           cudnn.get(_record_key(dict(r, impl=None)))))
          for r in old if r.get("kind") != "meta" and _record_key(r) not in new]
  return kept + records


# ----------------------------------------------------------------------------- report


def write_report(records, out_dir, device=None):
  os.makedirs(out_dir, exist_ok=True)
  meta = dict(kind="meta", device=device or str(jax.devices()[0].device_kind), date=DATE,
              jax=jax.__version__, backend=jax.default_backend(), pallas_forward="auto",
              run_at=datetime.datetime.now().isoformat(timespec="seconds"))
  with open(os.path.join(out_dir, "results.jsonl"), "w") as f:
    for rec in [meta] + records:
      f.write(json.dumps(rec) + "\n")
  lines = [f"# bench_attention: {meta['device']}, jax {meta['jax']}, {DATE}", ""]
  train = [r for r in records if r["kind"] == "train" and "ms" in r]
  if train:
    lines += ["## Training attention (bf16, 16 heads, batch*L = 16k): TFLOP/s (ms), ratio to cuDNN",
              "", "pallas = lca flash_attention (forward_kernel=\"auto\": Mosaic GPU forward on "
              "this GPU + Triton backward); pallas_triton = the all-Triton path.", ""]
    earlier = sorted({r["impl"] for r in train if r.get("from_earlier_run")})
    if earlier:
      lines += [f"Columns {', '.join(earlier)}: kept from the earlier run of "
                f"{next(r['from_earlier_run'] for r in train if r.get('from_earlier_run'))} "
                "(same device and software; their ratio divides by that run's cuDNN); "
                "the other columns were measured together.", ""]
    lines += ["| head_dim | causal | pass | L | " + " | ".join(TRAIN_IMPLS)
              + " | pallas/cudnn | pallas_triton/cudnn |",
              "|---|---|---|---|" + "---|" * (len(TRAIN_IMPLS) + 2)]
    keys = sorted({(r["head_dim"], r["causal"], r["what"], r["length"]) for r in train},
                  key=lambda x: (-x[0], not x[1], x[2], x[3]))
    for hd, causal, what, length in keys:
      cell, got, base = [], {}, {}
      for impl in TRAIN_IMPLS:
        r = [x for x in train if (x["head_dim"], x["causal"], x["what"], x["length"], x["impl"])
             == (hd, causal, what, length, impl)]
        got[impl] = r[0]["tflops"] if r else None
        base[impl] = r[0].get("cudnn_tflops_same_run") if r else None
        cell.append(f"{r[0]['tflops']:.0f} ({r[0]['ms']:.2f})" if r else "-")
      # Each ratio divides by the cuDNN rate measured in the same run as its numerator.
      ratio = lambda a: (f"{got[a] / (base[a] or got['cudnn']):.2f}"
                         if got[a] and (base[a] or got["cudnn"]) else "-")
      lines.append(f"| {hd} | {causal} | {what} | {length} | " + " | ".join(cell)
                   + f" | {ratio('pallas')} | {ratio('pallas_triton')} |")
    lines.append("")
  dec = [r for r in records if r["kind"] == "decode" and "ms" in r]
  if dec:
    lines += ["## Decode (1 token, batch 8, 32 q / 8 kv heads, hd 128, bf16): ms (GB/s of K+V)", "",
              "| context | floor ms @3.0TB/s | pallas | cudnn | xla | pallas % of floor |",
              "|---|---|---|---|---|---|"]
    for ctx in sorted({r["context"] for r in dec}):
      rs = {r["impl"]: r for r in dec if r["context"] == ctx and not r.get("config")}
      cell = [f"{rs[i]['ms']:.3f} ({rs[i]['gbps']:.0f})" if i in rs else "-"
              for i in ("pallas", "cudnn", "xla")]
      floor = next(r["floor_ms"] for r in dec if r["context"] == ctx)
      pct = f"{100 * floor / rs['pallas']['ms']:.0f}%" if "pallas" in rs else "-"
      lines.append(f"| {ctx} | {floor:.3f} | " + " | ".join(cell) + f" | {pct} |")
    lines.append("")
  mem = [r for r in records if r["kind"] == "memory" and "temp_mib" in r]
  if mem:
    lines += ["## Compiled temporary memory, causal fwd+bwd (B=1, 16 heads, hd 128, bf16): MiB", "",
              "| L | xla (naive) | pallas flash |", "|---|---|---|"]
    for length in sorted({r["length"] for r in mem}):
      rs = {r["impl"]: r["temp_mib"] for r in mem if r["length"] == length}
      lines.append(f"| {length} | {rs.get('xla', float('nan')):.0f} | "
                   f"{rs.get('pallas', float('nan')):.0f} |")
    lines.append("")
  tune = [r for r in records if r["kind"] in ("tune",) or (r["kind"] == "decode" and r.get("config"))]
  if tune:
    lines += ["## Tuning sweeps", ""]
    lines += [f"- {json.dumps({k: v for k, v in r.items() if k != 'kind'})}" for r in tune]
    lines.append("")
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write("\n".join(lines))
  print("\n".join(lines))
  try:
    _plot(train, dec, mem, meta, out_dir)
  except Exception:  # pylint: disable=broad-except
    traceback.print_exc()


def _plot(train, dec, mem, meta, out_dir):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 4, figsize=(22, 4.5))
  for ax, what in zip(axes[:2], ("fwd", "fwd+bwd")):
    for impl in TRAIN_IMPLS:
      rs = sorted((r["length"], r["tflops"]) for r in train if r["impl"] == impl
                  and r["what"] == what and r["head_dim"] == 128 and r["causal"])
      if rs:
        ax.plot(*zip(*rs), marker="o", label=impl)
    ax.set(xscale="log", xlabel="L", ylabel="TFLOP/s", title=f"causal hd128 {what}")
    ax.legend()
  ax = axes[2]
  for impl in ("pallas", "cudnn", "xla"):
    rs = sorted((r["context"], r["gbps"]) for r in dec if r["impl"] == impl and not r.get("config"))
    if rs:
      ax.plot(*zip(*rs), marker="o", label=impl)
  ax.axhline(3000, color="gray", ls="--", label="HBM ~3.0 TB/s")
  ax.set(xscale="log", xlabel="context", ylabel="GB/s (K+V bytes)", title="decode, batch 8, GQA 32:8")
  ax.legend()
  ax = axes[3]
  for impl in ("xla", "pallas"):
    rs = sorted((r["length"], r["temp_mib"]) for r in mem if r["impl"] == impl)
    if rs:
      ax.plot(*zip(*rs), marker="o", label=impl)
  ax.set(xscale="log", yscale="log", xlabel="L", ylabel="temp MiB", title="fwd+bwd temporary memory")
  ax.legend()
  fig.suptitle(f"{meta['device']}, jax {meta['jax']}, {DATE}")
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "bench_attention.png"), dpi=110)


def main(argv):
  del argv
  records = []
  if FLAGS.report_from:  # rebuild the report from a log of JSON lines (e.g. a cut-off run)
    with open(FLAGS.report_from) as f:
      for line in f:
        if line.startswith("{"):
          rec = json.loads(line)
          if rec.get("kind") != "meta":
            records.append(rec)
    if FLAGS.keep_from:
      records = keep_earlier(records, FLAGS.keep_from)
    write_report(records, FLAGS.out_dir, device=FLAGS.device)
    return
  if FLAGS.mode in ("all", "memory"):
    run_memory(records)
  if FLAGS.mode in ("all", "decode"):
    run_decode(records)
  if FLAGS.mode in ("all", "train"):
    run_train(records)
  if FLAGS.mode == "tune":
    run_tune(records)
  if FLAGS.mode == "tune_mosaic":
    run_tune_mosaic(records)
  if FLAGS.keep_from:
    records = keep_earlier(records, FLAGS.keep_from)
  write_report(records, FLAGS.out_dir)


if __name__ == "__main__":
  app.run(main)
