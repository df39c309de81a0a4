"""DSA vs dense attention: prefill and single-token decode at long contexts (GPU).

    python -m experiments.bench_dsa --lengths=16384,32768,65536,131072

One DeepSeek-V3.2-like attention layer, batch 1, 128 query heads:
  DSA      MQA (MLA-absorbed) form: q [L, 128, 512] over one 512-dim latent per token
           (k = v = the latent; V3.2's 64 RoPE dims are left out: Triton tiles are
           powers of two, and padding 576 to 1024 would double the gathered bytes),
           indexer 64 heads x 128 (FP8 and bf16), top-k 2048.
  dense    cuDNN (jax.nn.dot_product_attention) and lca flash (Pallas), causal MHA
           128 heads x 128 (prefill); decode: the same absorbed MQA attention densely
           over the whole latent cache (XLA), and cuDNN-size MHA 128 x 128 for reference.
Times are medians of block_until_ready wall times after warm-up. Prefill top-k is
timed on one query chunk and scaled to all chunks where a full pass would not fit
the time limit (marked "scaled"). Writes experiments/results/bench_dsa/{results.json,
results.md, bench_dsa.png}.
"""

import json
import pathlib

from absl import app, flags
import jax
import jax.numpy as jnp

from experiments import bench_common
from lca.attention import dsa, full
from pallas_kernels import dsa_attention, dsa_indexer

_LENGTHS = flags.DEFINE_list("lengths", ["16384", "32768", "65536", "131072"], "Context lengths.")
_HEADS = flags.DEFINE_integer("heads", 128, "Query heads.")
_LATENT = flags.DEFINE_integer("latent", 512, "MQA latent dim (k = v).")
_INDEX_HEADS = flags.DEFINE_integer("index_heads", 64, "Indexer heads.")
_INDEX_DIM = flags.DEFINE_integer("index_dim", 128, "Indexer head dim.")
_TOP_K = flags.DEFINE_integer("top_k", 2048, "Selected tokens per query.")
_CHUNK = flags.DEFINE_integer("chunk", 2048, "Queries per indexer chunk at prefill.")
_REPS = flags.DEFINE_integer("reps", 5, "Timed repetitions (median).")
_OUT = flags.DEFINE_string("out", "experiments/results/bench_dsa", "Output directory.")


bench = bench_common.bench
_try = bench_common.try_bench


def _causal_random_indices(length, top_k, q_positions):
  """Distinct causal indices spread evenly over [0, t] (like a top-k without an indexer)."""
  del length
  n = jnp.arange(top_k, dtype=jnp.int32)[None, None]
  t = q_positions[None, :, None].astype(jnp.int32)
  spread = (n.astype(jnp.int64) * (t + 1) // top_k).astype(jnp.int32) if jax.config.jax_enable_x64 \
      else ((n.astype(jnp.float32) * (t + 1).astype(jnp.float32) / top_k)).astype(jnp.int32)
  idx = jnp.where(t + 1 >= top_k, spread, n)
  return jnp.where(n <= t, idx, -1).astype(jnp.int32)


def prefill_case(length, reps):
  h, lat, hi, di, top_k = _HEADS.value, _LATENT.value, _INDEX_HEADS.value, _INDEX_DIM.value, _TOP_K.value
  keys = jax.random.split(jax.random.key(length), 8)
  bf = jnp.bfloat16
  res = {"length": length}
  # dense baselines: MHA 128 x 128 causal
  q = jax.random.normal(keys[0], (1, length, h, 128), bf)
  kd = jax.random.normal(keys[1], (1, length, h, 128), bf)
  vd = jax.random.normal(keys[2], (1, length, h, 128), bf)
  for impl in ("cudnn", "pallas"):
    f = jax.jit(lambda q, k, v, impl=impl: full.attention(q, k, v, causal=True, implementation=impl))
    res[f"dense_{impl}_ms"] = _ms(_try(f"dense {impl}", f, q, kd, vd, reps=reps))
  del q, kd, vd
  # DSA pieces
  qi = jax.random.normal(keys[3], (1, length, hi, di), bf)
  ki = jax.random.normal(keys[4], (1, length, di), bf)
  w = jax.random.normal(keys[5], (1, length, hi), jnp.float32) * (hi * di) ** -0.5
  pos = jnp.arange(length, dtype=jnp.int32)[None]
  chunk = min(_CHUNK.value, length)
  n_chunks = length // chunk
  for fp8 in (True, False):
    name = "fp8" if fp8 else "bf16"
    f = jax.jit(lambda qi, ki, w, fp8=fp8: jax.lax.map(
        lambda a: jnp.max(dsa_indexer.indexer_scores(a[0], ki, a[1], a[2], pos, fp8=fp8), axis=-1),
        (qi.reshape(n_chunks, 1, chunk, hi, di), w.reshape(n_chunks, 1, chunk, hi),
         pos.reshape(n_chunks, 1, chunk))))
    res[f"indexer_{name}_ms"] = _ms(_try(f"indexer scores {name} (all chunks)", f, qi, ki, w, reps=reps))
  # top-k of one chunk (the last one: most visible keys), scaled by the number of chunks
  sc = dsa_indexer.indexer_scores(qi[:, -chunk:], ki, w[:, -chunk:], pos[:, -chunk:], pos, fp8=True)
  t_topk = _try("top-k, one chunk", jax.jit(lambda s: dsa.top_k_indices(s, top_k)), sc, reps=reps)
  res["topk_ms_scaled"] = _ms(None if t_topk is None else t_topk * n_chunks)
  del sc
  latent = jax.random.normal(keys[6], (1, length, 1, lat), bf)
  qs = jax.random.normal(keys[7], (1, length, h, lat), bf)
  idx = _causal_random_indices(length, top_k, pos[0])
  f = jax.jit(lambda q, kv, i: dsa.sparse_attention(q, kv, kv, i, implementation="pallas"))
  res["sparse_attention_ms"] = _ms(_try("sparse attention (MQA, pallas)", f, qs, latent, idx, reps=reps))
  parts = [res.get("indexer_fp8_ms"), res.get("topk_ms_scaled"), res.get("sparse_attention_ms")]
  res["dsa_total_ms"] = sum(parts) if all(p is not None for p in parts) else None
  return res


def decode_case(length, reps):
  h, lat, hi, di, top_k = _HEADS.value, _LATENT.value, _INDEX_HEADS.value, _INDEX_DIM.value, _TOP_K.value
  keys = jax.random.split(jax.random.key(length + 1), 8)
  bf = jnp.bfloat16
  res = {"length": length}
  latent = jax.random.normal(keys[0], (1, length, 1, lat), bf)
  q = jax.random.normal(keys[1], (1, 1, h, lat), bf)
  qpos = jnp.full((1, 1), length - 1, jnp.int32)
  kvpos = jnp.arange(length, dtype=jnp.int32)[None]
  f = jax.jit(lambda q, kv: full.attention_reference(q, kv, kv, causal=True, q_positions=qpos,
                                                     kv_positions=kvpos))
  res["dense_mqa_xla_ms"] = _ms(_try("dense absorbed-MQA decode (XLA)", f, q, latent, reps=reps))
  try:
    qm = jax.random.normal(keys[2], (1, 1, h, 128), bf)
    km = jax.random.normal(keys[3], (1, length, h, 128), bf)
    f = jax.jit(lambda q, k: jax.nn.dot_product_attention(q, k, k, implementation="cudnn"))
    res["dense_mha_cudnn_ms"] = _ms(_try("dense MHA 128x128 decode (cuDNN)", f, qm, km, reps=reps))
    del km
  except Exception as e:  # pylint: disable=broad-except
    print("  MHA decode skipped:", e)
  qi = jax.random.normal(keys[4], (1, 1, hi, di), bf)
  ki = jax.random.normal(keys[5], (1, length, di), bf)
  w = jax.random.normal(keys[6], (1, 1, hi), jnp.float32)
  for fp8 in (True, False):
    name = "fp8" if fp8 else "bf16"
    f = jax.jit(lambda qi, ki, w, fp8=fp8: dsa_indexer.indexer_scores(qi, ki, w, qpos, kvpos, fp8=fp8))
    res[f"indexer_{name}_ms"] = _ms(_try(f"indexer {name}", f, qi, ki, w, reps=reps))
  sc = dsa_indexer.indexer_scores(qi, ki, w, qpos, kvpos, fp8=True)
  res["topk_ms"] = _ms(_try("top-k", jax.jit(lambda s: dsa.top_k_indices(s, top_k)), sc, reps=reps))
  idx = dsa.top_k_indices(sc, top_k)
  f = jax.jit(lambda q, kv, i: dsa.sparse_attention(q, kv, kv, i, implementation="pallas"))
  res["sparse_attention_ms"] = _ms(_try("sparse attention (split-K)", f, q, latent, idx, reps=reps))

  def step(q, qi, ki, w, kv):
    i = dsa.top_k_indices(dsa_indexer.indexer_scores(qi, ki, w, qpos, kvpos, fp8=True), top_k)
    return dsa.sparse_attention(q, kv, kv, i, implementation="pallas")
  res["dsa_total_ms"] = _ms(_try("DSA decode step (end to end)", jax.jit(step), q, qi, ki, w, latent,
                                 reps=reps))
  return res


def _ms(t):
  return None if t is None else t * 1e3


def _ratio(a, b):
  return None if a is None or b is None or b == 0 else a / b


def write(results, out: pathlib.Path):
  out.mkdir(parents=True, exist_ok=True)
  meta = dict(device=str(jax.devices()[0].device_kind), date="2026-11-23", jax=jax.__version__,
              heads=_HEADS.value, latent=_LATENT.value, index_heads=_INDEX_HEADS.value,
              index_dim=_INDEX_DIM.value, top_k=_TOP_K.value, chunk=_CHUNK.value)
  (out / "results.json").write_text(json.dumps(dict(meta=meta, **results), indent=1))
  f = lambda x: "-" if x is None else f"{x:.2f}"
  lines = [f"device {meta['device']}, jax {meta['jax']}, {meta['date']}; batch 1, {meta['heads']} heads, "
           f"top-k {meta['top_k']}, indexer {meta['index_heads']}x{meta['index_dim']}", "",
           "| prefill L | dense cuDNN ms | dense flash ms | indexer fp8 ms | indexer bf16 ms | top-k ms | "
           "sparse attn ms | DSA total ms | speed-up vs cuDNN | indexer share |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in results["prefill"]:
    idx_share = _ratio(r.get("indexer_fp8_ms"), r.get("dsa_total_ms"))
    lines.append(f"| {r['length']} | {f(r.get('dense_cudnn_ms'))} | {f(r.get('dense_pallas_ms'))} | "
                 f"{f(r.get('indexer_fp8_ms'))} | {f(r.get('indexer_bf16_ms'))} | {f(r.get('topk_ms_scaled'))} | "
                 f"{f(r.get('sparse_attention_ms'))} | {f(r.get('dsa_total_ms'))} | "
                 f"{f(_ratio(r.get('dense_cudnn_ms'), r.get('dsa_total_ms')))} | {f(idx_share)} |")
  lines += ["", "| decode L | dense MQA (XLA) ms | dense MHA cuDNN ms | indexer fp8 ms | indexer bf16 ms | "
            "top-k ms | sparse attn ms | DSA step ms | speed-up vs dense MQA |", "|---|---|---|---|---|---|---|---|---|"]
  for r in results["decode"]:
    lines.append(f"| {r['length']} | {f(r.get('dense_mqa_xla_ms'))} | {f(r.get('dense_mha_cudnn_ms'))} | "
                 f"{f(r.get('indexer_fp8_ms'))} | {f(r.get('indexer_bf16_ms'))} | {f(r.get('topk_ms'))} | "
                 f"{f(r.get('sparse_attention_ms'))} | {f(r.get('dsa_total_ms'))} | "
                 f"{f(_ratio(r.get('dense_mqa_xla_ms'), r.get('dsa_total_ms')))} |")
  (out / "results.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, series in ((axes[0], "prefill", ("dense_cudnn_ms", "dense_pallas_ms", "indexer_fp8_ms",
                                                  "topk_ms_scaled", "sparse_attention_ms", "dsa_total_ms")),
                            (axes[1], "decode", ("dense_mqa_xla_ms", "dense_mha_cudnn_ms", "indexer_fp8_ms",
                                                 "topk_ms", "sparse_attention_ms", "dsa_total_ms"))):
      for s in series:
        pts = [(r["length"], r[s]) for r in results[key] if r.get(s) is not None]
        if pts:
          ax.plot(*zip(*pts), marker="o", label=s.replace("_ms", ""))
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_xlabel("context length")
      ax.set_ylabel("ms")
      ax.set_title(f"{key}, {meta['device']}")
      ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "bench_dsa.png", dpi=120)
  except ImportError:
    pass


def main(argv):
  del argv
  print(jax.devices(), flush=True)
  results = {"prefill": [], "decode": []}
  out = pathlib.Path(_OUT.value)
  for length in map(int, _LENGTHS.value):
    print(f"decode L={length}", flush=True)
    results["decode"].append(decode_case(length, _REPS.value))
    write(results, out)
  for length in map(int, _LENGTHS.value):
    print(f"prefill L={length}", flush=True)
    results["prefill"].append(prefill_case(length, _REPS.value))
    write(results, out)


if __name__ == "__main__":
  app.run(main)
