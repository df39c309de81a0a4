"""DSA vs dense attention: prefill and single-token decode at long contexts (GPU).

    python -m experiments.bench_dsa --lengths=16384,32768,65536,131072

One DeepSeek-V3.2-like attention layer, batch 1, 128 query heads:
  DSA      MQA (MLA-absorbed) form, V3.2's shapes: q [L, 128, 512 + 64] over one 512-dim
           latent per token plus its 64-dim RoPE key (key [latent ; k_R], value = the
           latent; `--rope_dim=0`: the latent alone, as sessions 2-7 measured), indexer
           64 heads x 128 (FP8 and bf16), top-k 2048.
  dense    cuDNN (jax.nn.dot_product_attention) and lca flash (Pallas), causal MHA
           128 heads x 128 (prefill), and cuDNN at MLA's dense prefill shape (V3.1: MHA
           128 heads, q.k 192, v 128): v at its own 128 dims (jax's cuDNN module, cuDNN >=
           9.10, as `mla.MLAttention` runs it from session 23) and, as runs before s23
           measured it, v zero-padded to 192 for jax.nn.dot_product_attention, which takes
           one head dim (1482 vs 1280 ms at 128k); decode: the same absorbed MQA attention
           densely over the whole latent cache (XLA), and MHA 128 x 128 cuDNN for reference.
Prefill times are medians of block_until_ready wall times after warm-up (`bench`); the DSA
total and the cuDNN baselines are timed in turn over `--prefill_rounds` rounds (median of rounds).
Prefill top-k: the threshold-search kernel (pallas_kernels/dsa_topk.py) on all query
chunks, as (indexer + top-k over all chunks) - (indexer over all chunks), and both
implementations (kernel, `lax.top_k`) on the last chunk alone; on the bf16 scores that the
FP8 path writes and selects on (`dsa.selection_dtype`), and again on float32 scores ("_f32"); "DSA total" is one
jitted prefill (chunked indexer + top-k, then sparse attention). Decode times are
device time per call (`bench_common.bench_in_loop`: 64 calls inside one jitted loop,
loop cost subtracted), not one dispatched call. `--parts=topk` sweeps the top-k
kernel's launch parameters. FP8 indexer: keys quantized once (`dsa.FP8Keys`, as the
decode cache and `indexer_top_k` do), q per call; "kernel" columns time the scoring
kernel alone on pre-quantized operands (default blocks; k stored [d, S]; 128-query tiles at 8
warps; and with Triton's fp32 promotion after every wgmma, `IndexerBlocks(fp8_fast_accumulation=False)`). Writes experiments/results/bench_dsa/{results.json,
results.md, bench_dsa.png}; rows of lengths not rerun are kept from the existing
results.json (`run` says which run measured a row). `--parts=sparse,indexer` sweep the
sparse-attention and indexer kernels' variants into sweep_<part>.{json,md};
the indexer sweep times the scoring kernel alone on fp8 and bf16 operands over
`INDEXER_KERNEL_VARIANTS` (block_q, block_k, warps, stages, heads per step; `--indexer_variants`
filters them, `--sweep_budget_s` bounds the first length) and writes sweep_indexer.png too;
`--sparse_from=.../sweep_sparse.json` runs the prefill's sparse attention with that
sweep's fastest variant (default: `dsa_attention.default_blocks`), `--dense=cudnn` skips
the Pallas flash baseline.
"""

import dataclasses
import functools
import json
import pathlib
import time

from absl import app, flags
import jax
import jax.numpy as jnp

from experiments import bench_common
from lca.attention import dsa, full
from pallas_kernels import dsa_attention, dsa_indexer, dsa_topk, flash_decode, resolve_interpret

_LENGTHS = flags.DEFINE_list("lengths", ["16384", "32768", "65536", "131072"], "Context lengths.")
_HEADS = flags.DEFINE_integer("heads", 128, "Query heads.")
_LATENT = flags.DEFINE_integer("latent", 512, "MQA latent dim (k = v).")
_ROPE = flags.DEFINE_integer("rope_dim", 64, "MLA's decoupled RoPE key dims beside the latent (V3.2: 64; "
                             "0: the key is the latent alone).")
_INDEX_HEADS = flags.DEFINE_integer("index_heads", 64, "Indexer heads.")
_INDEX_DIM = flags.DEFINE_integer("index_dim", 128, "Indexer head dim.")
_TOP_K = flags.DEFINE_integer("top_k", 2048, "Selected tokens per query.")
_CHUNK = flags.DEFINE_integer("chunk", 2048, "Queries per indexer chunk at prefill.")
_REPS = flags.DEFINE_integer("reps", 5, "Timed repetitions (median).")
_OUT = flags.DEFINE_string("out", "experiments/results/bench_dsa", "Output directory.")
_PARTS = flags.DEFINE_list("parts", ["decode", "prefill"], "Which of decode, prefill, topk to run.")
_INNER = flags.DEFINE_integer("inner", 64, "Decode: calls per jitted loop (bench_in_loop).")
_DECODE_BATCH = flags.DEFINE_integer("decode_batch", 1, "Decode: sequences a step (each one new token over "
                                     "its own cache of L).")
_RUN = flags.DEFINE_string("run", "s10", "Label of this run, stored in each row (and the sweeps).")
_DENSE = flags.DEFINE_list("dense", ["cudnn", "pallas"], "Prefill: dense baselines to time.")
_SPARSE_FROM = flags.DEFINE_string("sparse_from", "", "Prefill: a sweep_sparse.json; its fastest variant at "
                                   "its longest length runs the sparse attention (default: default_blocks).")
_SPARSE_VARIANTS = flags.DEFINE_list("sparse_variants", [], "Sparse sweep: only these SPARSE_VARIANTS "
                                     "(default: all).")
_SPARSE_BWD = flags.DEFINE_bool("sparse_bwd", False, "Sparse sweep: also time each variant's backward "
                                 "(row <variant>_bwd).")
_PREFILL_EXTRAS = flags.DEFINE_bool("prefill_extras", True, "Prefill: also time the fp8 quantization and "
                                    "the fp8 scoring-kernel variants alone (false: only the parts and the total).")
_PREFILL_ROUNDS = flags.DEFINE_integer("prefill_rounds", 3, "Prefill: the DSA total and the cuDNN baselines "
                                      "timed in turn over this many rounds, the median of the rounds' medians "
                                      "(1: each once, one after another, as before run s20).")
_SWEEP_TOP = flags.DEFINE_integer("sweep_top", 4, "Sparse sweep: variants rerun at the longer lengths.")


bench = bench_common.bench
_try = bench_common.try_bench


def _mla_operands(key, q_len, kv_len, batch=1):
  """q [B, q_len, H, latent + R], latent [B, kv_len, 1, latent], k_R [B, kv_len, 1, R] or None."""
  h, lat, rope = _HEADS.value, _LATENT.value, _ROPE.value
  ks = jax.random.split(key, 3)
  q = jax.random.normal(ks[0], (batch, q_len, h, lat + rope), jnp.bfloat16)
  latent = jax.random.normal(ks[1], (batch, kv_len, 1, lat), jnp.bfloat16)
  k_rope = jax.random.normal(ks[2], (batch, kv_len, 1, rope), jnp.bfloat16) if rope else None
  return q, latent, k_rope


def _sparse(q, latent, k_rope, idx, blocks=None, shared=True):
  """The Pallas sparse attention in MLA's absorbed form (key [latent ; k_R], value latent)."""
  if k_rope is None:
    return dsa_attention.sparse_attention(q, latent, latent if shared else latent + 0, idx, blocks=blocks)
  return dsa_attention.sparse_attention(q, latent, None, idx, k_rope=k_rope, blocks=blocks)


def _in_loop(label, fn, first, *rest, inner, reps):
  """Device ms per call (`bench_in_loop`: `inner` calls in one jitted loop), None on failure."""
  try:
    t = bench_common.bench_in_loop(fn, first, *rest, inner=inner, reps=reps)
    print(f"  {label}: {t * 1e3:.4f} ms (device, in loop)", flush=True)
    return t * 1e3
  except Exception as e:  # pylint: disable=broad-except
    print(f"  {label}: failed: {type(e).__name__}: {str(e)[:400]}", flush=True)
    return None


def _indexer_all_chunks(qi, ki, w, pos, n_chunks, *, fp8, blocks=None, out_dtype=None, fill=False,
                        kernel="auto"):
  """Indexer scores of every query chunk (each row's max over its first 64 keys kept: the [chunk,
  S] buffer is written, not returned; until run s20b the max ran over every key, a read of all
  the scores, ~7 ms at 128k, that the prefill does not have and the top-k column, (indexer +
  top-k) - indexer, then missed); ki bf16 or FP8Keys. By default what `indexer_top_k` runs: scores in
  `dsa.selection_dtype(fp8)` (bf16 for fp8), wholly-future tiles not written, default key
  positions (so the Mosaic kernel on Hopper; kernel="triton" forces the Triton one); fill:
  every tile written, explicit key positions (Triton, as in sessions 2-8)."""
  _, length, hi, di = qi.shape
  chunk = length // n_chunks
  out_dtype = dsa.selection_dtype(fp8) if out_dtype is None else out_dtype
  return jax.lax.map(
      lambda a: jnp.max(dsa_indexer.indexer_scores(a[0], ki, a[1], a[2], pos if fill else None, fp8=fp8,
                                                   blocks=blocks, out_dtype=out_dtype, fill_future=fill,
                                                   kernel=kernel)[..., :64], axis=-1),
      (qi.reshape(n_chunks, 1, chunk, hi, di), w.reshape(n_chunks, 1, chunk, hi),
       pos.reshape(n_chunks, 1, chunk)))


def _kernel_all_chunks(q8, k, w8, k_scale, pos, n_chunks, blocks):
  """The scoring kernel alone on pre-quantized (or bf16) operands (q8 [1, L, H, d], k [1, S, d] or
  [1, d, S]) -> per-row (max, sum of the finite scores), each [n_chunks, 1, chunk]: one fused
  reduction per chunk, so the [chunk, S] scores are written but not returned."""
  _, length, hi, di = q8.shape
  chunk = length // n_chunks

  def one(a):
    sc = dsa_indexer.indexer_scores_kernel(a[0], k, a[1], k_scale, a[2], pos, blocks=blocks,
                                           interpret=resolve_interpret(None))
    return jnp.max(sc, axis=-1), jnp.sum(jnp.where(jnp.isfinite(sc), sc, 0.0), axis=-1)
  return jax.lax.map(one, (q8.reshape(n_chunks, 1, chunk, hi, di), w8.reshape(n_chunks, 1, chunk, hi),
                           pos.reshape(n_chunks, 1, chunk)))


def _sparse_variant():
  """(name, SparseBlocks or None) for the prefill's sparse attention (see --sparse_from)."""
  if not _SPARSE_FROM.value or not pathlib.Path(_SPARSE_FROM.value).exists():
    return "default_blocks", None
  rows = json.loads(pathlib.Path(_SPARSE_FROM.value).read_text())["sparse"]
  last = rows[-1]
  timed = sorted((last[f"{n}_ms"], n) for n in SPARSE_VARIANTS if last.get(f"{n}_ms") and SPARSE_VARIANTS[n][0])
  if not timed:
    return "default_blocks", None
  return timed[0][1], SPARSE_VARIANTS[timed[0][1]][1]


def _prefill_fp8_extras(res, qi, ki, w, pos, n_chunks, reps):
  """The fp8 quantization alone and the fp8 scoring kernel's variants alone (pre-quantized)."""
  res["quantize_q_ms"] = _ms(_try("fp8 quantize q (all)", jax.jit(dsa_indexer.fp8_query_operands), qi, w, reps=reps))
  res["quantize_k_ms"] = _ms(_try("fp8 quantize k (all)", jax.jit(dsa.quantize_index_keys), ki, reps=reps))
  q8, w8 = jax.jit(dsa_indexer.fp8_query_operands)(qi, w)
  k8, ks = jax.jit(dsa.quantize_index_keys)(ki)
  for key, blocks in (("indexer_fp8_kernel_ms", dsa_indexer.default_indexer_blocks(jnp.float8_e4m3fn)),
                      ("indexer_fp8_kernel_kT_ms", dsa_indexer.IndexerBlocks(k_transposed=True)),
                      ("indexer_fp8_kernel_q128w8_ms", dsa_indexer.IndexerBlocks(block_q=128, num_warps=8)),
                      ("indexer_fp8_kernel_promote_every_wgmma_ms", dataclasses.replace(
                          dsa_indexer.default_indexer_blocks(jnp.float8_e4m3fn), fp8_fast_accumulation=False))):
    kk = jnp.swapaxes(k8, 1, 2) if blocks.k_transposed else k8
    f = jax.jit(lambda q8, kk, w8, ks, blocks=blocks: _kernel_all_chunks(q8, kk, w8, ks, pos, n_chunks, blocks))
    res[key] = _ms(_try(f"{key[:-3]} (pre-quantized, all chunks)", f, q8, kk, w8, ks[..., 0], reps=reps))


def prefill_case(length, reps):
  h, lat, hi, di, top_k = _HEADS.value, _LATENT.value, _INDEX_HEADS.value, _INDEX_DIM.value, _TOP_K.value
  keys = jax.random.split(jax.random.key(length), 8)
  bf = jnp.bfloat16
  res = {"length": length}
  # dense baselines: MHA 128 x 128 causal, and MLA's dense prefill (V3.1): MHA q.k 192 / v 128, v
  # as it is (lca's cuDNN path) and zero-padded to 192 for jax.nn's cuDNN call (the MLA column of
  # runs before s23). With --prefill_rounds > 1 the cuDNN ones are timed
  # with the DSA total at the end, in turn (their inputs kept alive until then)
  rounds = _PREFILL_ROUNDS.value
  mha = tuple(jax.random.normal(keys[i], (1, length, h, 128), bf) for i in range(3))
  mla = (jax.random.normal(keys[0], (1, length, h, 192), bf), jax.random.normal(keys[1], (1, length, h, 192), bf),
         jax.random.normal(keys[2], (1, length, h, 128), bf))
  dense = {f"dense_{impl}": (f"dense {impl}", jax.jit(
      lambda q, k, v, impl=impl: full.attention(q, k, v, causal=True, implementation=impl)), mha)
      for impl in _DENSE.value}
  dense["dense_mla_cudnn"] = ("dense MLA 192/128 cuDNN (v padded to 192)", jax.jit(
      lambda q, k, v: full.v_padded_to_q(jax.nn.dot_product_attention, q, k, v, is_causal=True,
                                         implementation="cudnn")), mla)
  dense["dense_mla_cudnn_v128"] = ("dense MLA 192/128 cuDNN (v at 128)", jax.jit(
      lambda q, k, v: full.attention(q, k, v, causal=True, implementation="cudnn")), mla)
  for name in list(dense):
    if rounds <= 1 or "cudnn" not in name:
      label, f, args = dense.pop(name)
      res[f"{name}_ms"] = _ms(_try(label, f, *args, reps=reps))
  if not dense:
    del mha, mla
  # DSA pieces
  qi = jax.random.normal(keys[3], (1, length, hi, di), bf)
  ki = jax.random.normal(keys[4], (1, length, di), bf)
  w = jax.random.normal(keys[5], (1, length, hi), jnp.float32) * (hi * di) ** -0.5
  pos = jnp.arange(length, dtype=jnp.int32)[None]
  chunk = min(_CHUNK.value, length)
  n_chunks = length // chunk
  # fp8: keys quantized once (outside the chunk loop), q per chunk; scores written in bf16 (the
  # FP8 path's selection dtype), "_f32" in float32; "_fill": every tile written (sessions 2-8)
  # "_triton": the Triton scoring kernel where the Mosaic one (Hopper, session 10) would run
  for fp8, out_dtype, fill, kernel, name in (
      (True, None, False, "auto", "fp8"), (True, None, False, "triton", "fp8_triton"),
      (True, jnp.float32, False, "auto", "fp8_f32"), (True, jnp.float32, True, "auto", "fp8_f32_fill"),
      (False, None, False, "auto", "bf16"), (False, None, False, "triton", "bf16_triton")):
    f = jax.jit(lambda qi, ki, w, fp8=fp8, out_dtype=out_dtype, fill=fill, kernel=kernel: _indexer_all_chunks(
        qi, dsa.quantize_index_keys(ki) if fp8 else ki, w, pos, n_chunks, fp8=fp8, out_dtype=out_dtype,
        fill=fill, kernel=kernel))
    res[f"indexer_{name}_ms"] = _ms(_try(f"indexer scores {name} (all chunks)", f, qi, ki, w, reps=reps))
  if _PREFILL_EXTRAS.value:
    _prefill_fp8_extras(res, qi, ki, w, pos, n_chunks, reps)
  lengths = lambda p: jnp.clip(p + 1, 0, length)
  # top-k on the last chunk (most visible keys): the kernel (default: sample, then collect),
  # the kernel's radix search over whole rows ("pallas_radix", TopKBlocks(sample=False): sessions
  # 3-9) and lax.top_k, on bf16 scores (the FP8 path's default) and, "_f32", on float32 scores
  sc = dsa_indexer.indexer_scores(qi[:, -chunk:], ki, w[:, -chunk:], pos[:, -chunk:], pos, fp8=True)
  chunk_lengths = lengths(pos[:, -chunk:])
  radix = dsa_topk.TopKBlocks(sample=False)
  for impl in ("pallas", "pallas_radix", "xla"):
    if impl == "pallas_radix":
      f = jax.jit(lambda s: dsa_topk.top_k(s, top_k, lengths=chunk_lengths, blocks=radix))
    else:
      f = jax.jit(lambda s, impl=impl: dsa.top_k_select(s, top_k, lengths=chunk_lengths, implementation=impl))
    for suffix, scores in (("", sc.astype(jnp.bfloat16)), ("_f32", sc)):
      t = _try(f"top-k {impl}{suffix}, last chunk", f, scores, reps=reps)
      res[f"topk_{impl}{suffix}_chunk_ms"] = _ms(t)
      if impl == "xla":
        res[f"topk_xla{suffix}_ms_scaled"] = _ms(None if t is None else t * n_chunks)
  # how often the sample misled on these scores (rows that took the full-row search), and how
  # many keys a sampled row collected on average (~sqrt(k C) expected)
  try:
    _, _, count, direct = dsa_topk.collect_candidates(sc[0].astype(jnp.bfloat16), chunk_lengths[0], k=top_k)
    sampled = count >= 0
    res["topk_sample_failed_rows"] = int(jnp.sum(sampled & (direct != 0)))
    res["topk_sample_mean_collected"] = float(jnp.sum(jnp.where(sampled, count, 0)) / jnp.maximum(jnp.sum(sampled), 1))
    print(f"  top-k sample: {res['topk_sample_failed_rows']} rows failed of {int(jnp.sum(sampled))} sampled, "
          f"{res['topk_sample_mean_collected']:.0f} collected a row", flush=True)
  except Exception as e:  # pylint: disable=broad-except
    print(f"  top-k sample statistics: failed: {type(e).__name__}: {str(e)[:400]}", flush=True)
  del sc

  def index_top_k(qi, ki, w, score_dtype=None):
    return dsa.indexer_top_k(qi, ki, w, top_k=top_k, fp8=True, chunk=chunk, implementation="pallas",
                             topk_implementation="pallas", score_dtype=score_dtype)
  for suffix, score_dtype in (("", None), ("_f32", jnp.float32)):
    t = _try(f"indexer fp8 + top-k{suffix} (all chunks)",
             jax.jit(functools.partial(index_top_k, score_dtype=score_dtype)), qi, ki, w, reps=reps)
    res[f"indexer_topk{suffix}_ms"] = _ms(t)
    if t is not None and res.get(f"indexer_fp8{suffix}_ms") is not None:
      res[f"topk{suffix}_ms"] = res[f"indexer_topk{suffix}_ms"] - res[f"indexer_fp8{suffix}_ms"]
  qs, latent, k_rope = _mla_operands(keys[6], length, length)
  idx = bench_common.causal_spread_indices(top_k, pos[0])
  variant, blocks = _sparse_variant()
  res["sparse_variant"] = variant
  f = jax.jit(lambda q, kv, kr, i: _sparse(q, kv, kr, i, blocks))
  res["sparse_attention_ms"] = _ms(_try(f"sparse attention (MQA, pallas, {variant})", f, qs, latent, k_rope,
                                        idx, reps=reps))
  del idx

  def prefill(q, kv, kr, qi, ki, w):
    return _sparse(q, kv, kr, index_top_k(qi, ki, w), blocks)
  total = ("DSA prefill (end to end)", jax.jit(prefill), (qs, latent, k_rope, qi, ki, w))
  if rounds <= 1:
    res["dsa_total_ms"] = _ms(_try(total[0], total[1], *total[2], reps=reps))
  else:   # the DSA total and the cuDNN baselines in turn: a drift of the GPU reaches all alike
    times = bench_common.interleaved({"dsa_total": total, **dense}, rounds=rounds, reps=reps)
    res.update({f"{name}_ms": _ms(t) for name, t in times.items()}, prefill_rounds=rounds)
  return res


_FLASH_DECODE_LAUNCHES = ((64, 32, 2), (32, 32, 2), (16, 32, 2), (16, 64, 2))  # block_r, block_k, stages


_MHA_CACHE_BYTES = 40e9   # decode: the MHA baseline's cache (k = v, one array) is skipped above this


def decode_case(length, reps):
  h, lat, hi, di, top_k = _HEADS.value, _LATENT.value, _INDEX_HEADS.value, _INDEX_DIM.value, _TOP_K.value
  keys = jax.random.split(jax.random.key(length + 1), 8)
  bf = jnp.bfloat16
  b = _DECODE_BATCH.value
  res = {"length": length, "batch": b}
  loop = functools.partial(_in_loop, inner=_INNER.value, reps=reps)

  q, latent, k_rope = _mla_operands(keys[0], 1, length, b)
  qpos = jnp.full((b, 1), length - 1, jnp.int32)
  kvpos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
  key = lambda kv, kr: kv if kr is None else jnp.concatenate([kv, kr], axis=-1)
  # XLA: the key concatenated inside the call (as since session 8; XLA may fuse it into the dot)
  res["dense_mqa_xla_ms"] = loop("dense absorbed-MQA decode (XLA)", lambda q, kv, kr: full.attention_reference(
      q, key(kv, kr), kv, causal=True, q_positions=qpos, kv_positions=kvpos), q, latent, k_rope)
  # lca's flash-decoding kernel on the same absorbed MQA: 128 query rows over one KV head. The
  # 576-dim key is padded to 1024 inside flash_decode (a copy of the cache each call: an upper
  # bound); the 512-dim latent alone (no RoPE part, no padding) is a lower bound for a dense kernel.
  # The default launch overflows shared memory at these head dims: the fastest of a few that fit.
  lengths = jnp.full((b,), length, jnp.int32)
  kcat = jax.jit(key)(latent, k_rope)
  for name, qq, kk, label in (("dense_mqa_flash_ms", q, kcat, "key 576"),
                              ("dense_mqa_flash512_ms", q[..., :lat], latent, "latent 512 alone")):
    best = None
    for block_r, block_k, stages in _FLASH_DECODE_LAUNCHES:
      t = loop(f"dense MQA decode (lca flash_decode, {label}; block_r {block_r}, block_k {block_k}, "
               f"{stages} stages)", lambda q, k, v, br=block_r, bk=block_k, ns=stages: flash_decode.flash_decode(
                   q, k, v, lengths, block_r=br, block_k=bk, num_stages=ns), qq, kk, latent)
      if t is not None and (best is None or t < best[0]):
        best = (t, f"{block_r}/{block_k}/{stages}")
    res[name] = None if best is None else best[0]
    res[name.replace("_ms", "_launch")] = None if best is None else best[1]
  del kcat
  if b * length * h * 128 * 2 <= _MHA_CACHE_BYTES:
    qm = jax.random.normal(keys[2], (b, 1, h, 128), bf)
    km = jax.random.normal(keys[3], (b, length, h, 128), bf)
    res["dense_mha_cudnn_ms"] = loop("dense MHA 128x128 decode (cuDNN)", lambda q, k: jax.nn.dot_product_attention(
        q, k, k, implementation="cudnn"), qm, km)
    del km
  qi = jax.random.normal(keys[4], (b, 1, hi, di), bf)
  ki = jax.random.normal(keys[5], (b, length, di), bf)
  w = jax.random.normal(keys[6], (b, 1, hi), jnp.float32)
  k8 = jax.jit(dsa.quantize_index_keys)(ki)     # the FP8 key cache: quantized when written
  res["indexer_fp8_ms"] = loop("indexer fp8 (quantized key cache)", lambda qi, k8, w: dsa_indexer.indexer_scores(
      qi, k8, w, qpos, kvpos, fp8=True), qi, k8, w)
  res["indexer_fp8_requant_ms"] = loop("indexer fp8 (quantizing all keys each step)", lambda qi, ki, w: (
      dsa_indexer.indexer_scores(qi, ki, w, qpos, kvpos, fp8=True)), qi, ki, w)
  res["indexer_bf16_ms"] = loop("indexer bf16", lambda qi, ki, w: dsa_indexer.indexer_scores(
      qi, ki, w, qpos, kvpos, fp8=False), qi, ki, w)
  sc = dsa_indexer.indexer_scores(qi, k8, w, qpos, kvpos, fp8=True)
  for impl, name in (("pallas", "topk_ms"), ("xla", "topk_xla_ms")):
    for dt, suffix in ((jnp.float32, ""), (bf, "_bf16")):   # bf16: what the FP8 path selects on
      res[name.replace("_ms", suffix + "_ms")] = loop(
          f"top-k {impl} {jnp.dtype(dt).name}", lambda s, impl=impl: dsa.top_k_select(s, top_k, implementation=impl),
          sc.astype(dt))
  idx = dsa.top_k_select(sc, top_k, implementation="xla")
  res["sparse_attention_ms"] = loop("sparse attention (split-K)", lambda q, kv, kr, i: dsa.sparse_attention(
      q, kv, kv, i, k_rope=kr, implementation="pallas"), q, latent, k_rope, idx)

  def step(qi, q, ki, w, kv, kr, topk=None, score_dtype=jnp.float32):   # the indexer query first: nothing hoisted
    scores = dsa_indexer.indexer_scores(qi, ki, w, qpos, kvpos, out_dtype=score_dtype)
    i = dsa.top_k_select(scores, top_k, implementation=topk)
    return dsa.sparse_attention(q, kv, kv, i, k_rope=kr, implementation="pallas")
  # dsa_total_ms: the model's decode step on GPU (FP8 key cache, bf16 scores, top_k_select's default)
  for name, keys, kw in (("dsa_total_ms", k8, dict(score_dtype=bf)),
                         ("dsa_total_xla_topk_ms", k8, dict(score_dtype=bf, topk="xla")),
                         ("dsa_total_kernel_topk_ms", k8, dict(score_dtype=bf, topk="pallas")),
                         ("dsa_total_bf16_ms", ki, {})):
    res[name] = loop(f"DSA decode step {name}", functools.partial(step, **kw), qi, q, keys, w, latent, k_rope)
  return res


TOPK_CONFIGS = {   # name: (score dtype, blocks)
    "b1024_bits4_w4": (jnp.float32, dsa_topk.TopKBlocks()),                # the float32 default
    "b2048_bits4_w8": (jnp.float32, dsa_topk.TopKBlocks(block=2048, num_warps=8)),
    "b1024_bits2_w8_acc": (jnp.float32, dsa_topk.TopKBlocks(block=1024, bits=2, num_warps=8, accumulate=True)),
    "b512_bits4_w8_acc": (jnp.float32, dsa_topk.TopKBlocks(block=512, num_warps=8, accumulate=True)),
    "bf16_b1024_bits4_w4": (jnp.bfloat16, dsa_topk.TopKBlocks(bits=4)),
    "bf16_b2048_bits4_w4": (jnp.bfloat16, dsa_topk.TopKBlocks(block=2048, bits=4)),
    "bf16_b2048_bits4_w8": (jnp.bfloat16, dsa_topk.TopKBlocks(block=2048, bits=4, num_warps=8)),
    "bf16_b1024_bits2_w4": (jnp.bfloat16, dsa_topk.TopKBlocks(bits=2)),   # the 16-bit default
}
ROW_SPLITS = (1, 4, 16, 32)


def topk_case(length, reps):
  """Top-k kernel launch parameters vs lax.top_k: a causal [chunk, S] chunk and one row.
  TOPK_CONFIGS run the radix search over whole rows (`sample=False`, as sessions 3-9 measured
  them); the "sample_" configurations sample, then collect (the default)."""
  top_k, chunk = _TOP_K.value, min(_CHUNK.value, length)
  res = {"length": length}
  sc = jax.random.normal(jax.random.key(length), (1, chunk, length), jnp.float32)
  lens = jnp.arange(length - chunk, length, dtype=jnp.int32)[None] + 1
  sc = jnp.where(jnp.arange(length)[None, None] < lens[..., None], sc, -jnp.inf)
  row = sc[:, -1:]
  ref = jax.jit(lambda s: dsa.top_k_select(s, top_k, implementation="xla"))
  res["xla_chunk_ms"] = _ms(_try("lax.top_k chunk", ref, sc, reps=reps))
  res["xla_row_ms"] = _in_loop("lax.top_k row", ref, row, inner=16, reps=reps)
  want = {jnp.float32: jnp.sort(ref(sc), axis=-1)}
  res["xla_bf16_chunk_ms"] = _ms(_try("lax.top_k chunk, bf16", ref, sc.astype(jnp.bfloat16), reps=reps))
  want[jnp.bfloat16] = jnp.sort(ref(sc.astype(jnp.bfloat16)), axis=-1)   # lax: ties to the lower index too
  tb = dsa_topk.TopKBlocks
  configs = {name: (dtype, dataclasses.replace(blocks, sample=False))
             for name, (dtype, blocks) in TOPK_CONFIGS.items()}
  configs.update({   # sample, then collect: z = sqrt(f) (sqrt(C) - sqrt(k)) at k = 2048
      "sample_default": (jnp.bfloat16, tb()),                   # f 1/32, C 6144, 4 bits: z 5.9
      "sample_f32_default": (jnp.float32, tb()),
      "sample_every16_bits2": (jnp.bfloat16, tb(sample_every=16, bits=2)),   # session 14: z 8.3
      "sample_every8_c4096": (jnp.bfloat16, tb(sample_every=8, capacity=4096)),   # z 6.6
      "sample_run8": (jnp.bfloat16, tb(sample_run=8)),
      "sample_bits2": (jnp.bfloat16, tb(bits=2)),
  })
  for name, (dtype, blocks) in configs.items():
    f = jax.jit(lambda s, n, blocks=blocks: dsa_topk.top_k(s, top_k, lengths=n, blocks=blocks))
    got = _try(f"pallas {name} chunk", f, sc.astype(dtype), lens, reps=reps)
    res[f"{name}_chunk_ms"] = _ms(got)
    if got is not None:
      res[f"{name}_exact"] = bool(jnp.all(jnp.sort(f(sc.astype(dtype), lens), axis=-1) == want[dtype]))
      g = jax.jit(lambda s, blocks=blocks: dsa_topk.top_k(s, top_k, blocks=blocks))
      res[f"{name}_row_ms"] = _in_loop(f"pallas {name} row", g, row.astype(dtype), inner=16, reps=reps)
      print(f"    exact {res[f'{name}_exact']}", flush=True)
      if blocks.sample and length > blocks.capacity:     # rows that took the full-row search
        _, _, count, direct = dsa_topk.collect_candidates(sc[0].astype(dtype), lens[0], k=top_k, blocks=blocks)
        res[f"{name}_failed_rows"] = int(jnp.sum((count >= 0) & (direct != 0)))
        print(f"    failed rows {res[f'{name}_failed_rows']}", flush=True)
  for split in ROW_SPLITS:
    g = jax.jit(lambda s, split=split: dsa_topk.top_k(s, top_k, split=split))
    res[f"row_split{split}_ms"] = _in_loop(f"pallas row, split {split}", g, row, inner=16, reps=reps)
  return res


# The sweep's variants are launches of the Triton forward (the prefill default, `default_blocks`,
# takes the Mosaic GPU forward where it runs: session 24).
SB = functools.partial(dsa_attention.SparseBlocks, forward_kernel="triton")
SPARSE_VARIANTS = {   # name: (shared k = v, blocks)
    "sep_h32_k32_w8_s2": (False, SB(block_h=32, block_k=32, num_warps=8, num_stages=2)),
    "sh_h32_k32_w8_s2": (True, SB(block_h=32, block_k=32, num_warps=8, num_stages=2)),
    "sh_h32_k64_w8_s2": (True, SB(block_h=32, block_k=64, num_warps=8, num_stages=2)),
    "sh_h32_k32_w8_s3": (True, SB(block_h=32, block_k=32, num_warps=8, num_stages=3)),
    "sh_h32_k32_w4_s2": (True, SB(block_h=32, block_k=32, num_warps=4, num_stages=2)),
    "sh_h64_k16_w8_s2": (True, SB(block_h=64, block_k=16, num_warps=8, num_stages=2)),
    "sh_h64_k32_w8_s2": (True, SB(block_h=64, block_k=32, num_warps=8, num_stages=2)),
    "sh_h64_k16_w16_s2": (True, SB(block_h=64, block_k=16, num_warps=16, num_stages=2)),
    "sh_h64_k32_w16_s2": (True, SB(block_h=64, block_k=32, num_warps=16, num_stages=2)),
    "sh_h128_k16_w16_s2": (True, SB(block_h=128, block_k=16, num_warps=16, num_stages=2)),
    # session 5: around the 4-warp default
    "sh_h32_k64_w4_s2": (True, SB(block_h=32, block_k=64, num_warps=4, num_stages=2)),
    # session 19: 64 heads at 4 warps (an M = 64 MMA), the value dims split over 2 programs (each
    # gathers the latent as 2 column blocks, its value block first); a query's head blocks side by
    # side (ht: its gathered rows read from L2 by all but the first)
    "sh_h64_k32_w4_s2_dv2": (True, SB(block_h=64, block_k=32, num_warps=4, num_stages=2, dv_splits=2)),
    "sh_h64_k32_w4_s3_dv2": (True, SB(block_h=64, block_k=32, num_warps=4, num_stages=3, dv_splits=2)),
    "sh_h64_k64_w4_s2_dv2": (True, SB(block_h=64, block_k=64, num_warps=4, num_stages=2, dv_splits=2)),
    "sh_h64_k32_w4_s3_dv2_ht": (True, SB(block_h=64, block_k=32, num_warps=4, num_stages=3, dv_splits=2,
                                         heads_together=True)),
    "sh_h32_k64_w4_s3_ht": (True, SB(block_h=32, block_k=64, num_warps=4, num_stages=3, heads_together=True)),
    "sh_h64_k64_w8_s2_ht": (True, SB(block_h=64, block_k=64, num_warps=8, num_stages=2, heads_together=True)),
    "sh_h32_k32_w4_s3_ht": (True, SB(block_h=32, block_k=32, num_warps=4, num_stages=3, heads_together=True)),
    "sh_h32_k64_w4_s2_ht": (True, SB(block_h=32, block_k=64, num_warps=4, num_stages=2, heads_together=True)),
    "sh_h64_k32_w8_s2_ht": (True, SB(block_h=64, block_k=32, num_warps=8, num_stages=2, heads_together=True)),
    "sh_h32_k32_w4_s4_ht": (True, SB(block_h=32, block_k=32, num_warps=4, num_stages=4, heads_together=True)),
    # session 20: 32 heads at 8 warps (2 warps a scheduler, half the accumulator a thread), side by side
    "sh_h32_k64_w8_s3_ht": (True, SB(block_h=32, block_k=64, num_warps=8, num_stages=3, heads_together=True)),
    "sh_h32_k64_w8_s2_ht": (True, SB(block_h=32, block_k=64, num_warps=8, num_stages=2, heads_together=True)),
    "sh_h32_k32_w8_s3_ht": (True, SB(block_h=32, block_k=32, num_warps=8, num_stages=3, heads_together=True)),
    "sh_h32_k16_w4_s2": (True, SB(block_h=32, block_k=16, num_warps=4, num_stages=2)),
    "sh_h32_k32_w4_s3": (True, SB(block_h=32, block_k=32, num_warps=4, num_stages=3)),
    "sh_h16_k32_w4_s2": (True, SB(block_h=16, block_k=32, num_warps=4, num_stages=2)),
    "sh_h64_k32_w4_s2": (True, SB(block_h=64, block_k=32, num_warps=4, num_stages=2)),
    # session 7: 64 heads at 64 rows a step (8 warps: two warpgroups); the backward (--sparse_bwd)
    # at 32 heads and 32 (bk32) or 64 rows a step
    "sh_h64_k64_w8_s2": (True, SB(block_h=64, block_k=64, num_warps=8, num_stages=2)),
    "sh_h64_k64_w8_s2_bk32": (True, SB(block_h=64, block_k=64, num_warps=8, num_stages=2, bwd_block_k=32,
                                       bwd_block_h=32)),
    "sh_h64_k64_w8_s2_bk64": (True, SB(block_h=64, block_k=64, num_warps=8, num_stages=2, bwd_block_k=64,
                                       bwd_block_h=32)),
    "sh_h32_k64_w4_s2_bk32": (True, SB(block_h=32, block_k=64, num_warps=4, num_stages=2, bwd_block_k=32)),
    # the backward's warps (default 8 at a 512-dim latent): 16 with 64 rows (the fp32 accumulator
    # spilled at 8), and 4
    "sh_h64_k64_w8_s2_bk64_bw16": (True, SB(block_h=64, block_k=64, num_warps=8, num_stages=2, bwd_block_k=64,
                                            bwd_block_h=32, bwd_num_warps=16)),
    "sh_h64_k64_w8_s2_bk32_bw4": (True, SB(block_h=64, block_k=64, num_warps=8, num_stages=2, bwd_block_k=32,
                                           bwd_block_h=32, bwd_num_warps=4)),
    # session 8, V3.2's 512 + 64 key: the 8-warp backward overflows the shared memory (287 KB);
    # 16 rows a step at 8 or 4 warps
    "sh_h64_k64_w8_s2_bk16_bw8": (True, SB(block_h=64, block_k=64, num_warps=8, num_stages=2, bwd_block_k=16,
                                           bwd_block_h=32, bwd_num_warps=8)),
    "sh_h64_k64_w8_s2_bk16_bw4": (True, SB(block_h=64, block_k=64, num_warps=8, num_stages=2, bwd_block_k=16,
                                           bwd_block_h=32, bwd_num_warps=4)),
    # session 9, with V3.2's 512 + 64 key: deeper pipelines at fewer rows, longer steps unpipelined
    "sh_h64_k32_w8_s3": (True, SB(block_h=64, block_k=32, num_warps=8, num_stages=3)),
    "sh_h64_k64_w8_s1": (True, SB(block_h=64, block_k=64, num_warps=8, num_stages=1)),
    "sh_h64_k128_w8_s1": (True, SB(block_h=64, block_k=128, num_warps=8, num_stages=1)),
    "sh_h32_k128_w4_s1": (True, SB(block_h=32, block_k=128, num_warps=4, num_stages=1)),
    "sh_h32_k64_w4_s3": (True, SB(block_h=32, block_k=64, num_warps=4, num_stages=3)),
}


def _time_unless_slow(label, f, args, limit_s, reps, keep_output=False):
  """Compiles f and times one call; repeats it `reps` times (median) unless that call took more
  than limit_s (a variant far behind the sweep's best so far is not worth the repetitions).
  -> (seconds, f's output if keep_output else None); raises what f raises."""
  out = jax.block_until_ready(f(*args))
  if not keep_output:
    out = None   # frees it before the timed calls
  t0 = time.perf_counter()
  jax.block_until_ready(f(*args))
  once = time.perf_counter() - t0
  if once > limit_s:
    print(f"  {label}: {once * 1e3:.3f} ms (one call, > {limit_s * 1e3:.3g} ms: not repeated)", flush=True)
    return once, out
  return _try(label, f, *args, reps=reps) or once, out


def _present(*xs):
  return [x for x in xs if x is not None]


def _sparse_check(name, shared, blocks):
  """Relative error vs the XLA gather path (fp32 math on the bf16 inputs), MQA 128 x (512 + R)."""
  del name
  q, kv, kr = _mla_operands(jax.random.key(7), 300, 300)
  idx = bench_common.causal_spread_indices(256, jnp.arange(300, dtype=jnp.int32))
  got = jax.jit(lambda *a: _sparse(*a, blocks, shared))(q, kv, kr, idx).astype(jnp.float32)
  f32 = lambda x: None if x is None else x.astype(jnp.float32)
  kv32 = f32(kv)
  ref = dsa.sparse_attention(f32(q), kv32, kv32, idx, k_rope=f32(kr), implementation="xla")
  return float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))


def sparse_case(length, reps, state):
  """Sparse attention variants (MQA 128 x 512, top-k 2048): at the first length all of them,
  later lengths the `--sweep_top` fastest of the first plus the first variant (baseline)."""
  res = {"length": length}
  keys = jax.random.split(jax.random.key(length + 2), 2)
  q, kv, kr = _mla_operands(keys[0], length, length)
  idx = bench_common.causal_spread_indices(_TOP_K.value, jnp.arange(length, dtype=jnp.int32))
  names = state.get("sparse_order") or [n for n in SPARSE_VARIANTS
                                        if (not _SPARSE_VARIANTS.value or n in _SPARSE_VARIANTS.value)
                                        and (SPARSE_VARIANTS[n][0] or kr is None)]   # k_R: shared only
  for name in names:
    shared, blocks = SPARSE_VARIANTS[name]
    if "sparse_order" not in state:
      try:
        res[f"{name}_err"] = _sparse_check(name, shared, blocks)
        print(f"  {name}: rel err {res[f'{name}_err']:.2e}", flush=True)
      except Exception as e:  # pylint: disable=broad-except
        print(f"  {name}: check failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        continue
    f = jax.jit(lambda q, kv, kr, i, shared=shared, blocks=blocks: _sparse(q, kv, kr, i, blocks, shared))
    best = min([res[f"{n}_ms"] for n in names if res.get(f"{n}_ms")] or [1e12]) * 1e-3
    try:
      t, _ = _time_unless_slow(f"sparse {name}", f, (q, kv, kr, idx), 3 * best, reps)
    except Exception as e:  # pylint: disable=broad-except
      print(f"  sparse {name}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
      continue
    res[f"{name}_ms"] = _ms(t)
    if _SPARSE_BWD.value:   # the backward kernels alone
      bwd, ct = bench_common.backward_timer(lambda *a, f=f: f(*a, idx), *_present(q, kv, kr))
      res[f"{name}_bwd_ms"] = _ms(_try(f"sparse {name} backward", bwd, ct, reps=reps))
  if "sparse_order" not in state:
    timed = sorted((res[f"{n}_ms"], n) for n in names if res.get(f"{n}_ms") is not None)
    top = [n for _, n in timed[:_SWEEP_TOP.value]]
    state["sparse_order"] = [names[0]] + [n for n in top if n != names[0]]
  return res


def _indexer_variants():
  """The scoring kernel's launch grid, per operand dtype: block_q {64, 128} x block_k {128, 256} x
  warps {4, 8} x stages {2, 3} x heads per step {1, 2}, less the tiles whose fp32 accumulator plus
  heads_per_step logits tiles need more than 192 registers a thread ((1 + h) * bq * bk / threads;
  e.g. q128 k256 at 8 warps is 256 at h = 1: it would spill). Order: the default (q64 k128 w4 s2 h1)
  first, then the larger tiles (the likelier winners, should --sweep_budget_s cut the list), the two
  dtypes interleaved."""
  out = {}
  for bq, bk, warps in ((64, 128, 4), (64, 256, 8), (128, 128, 8), (64, 128, 8)):
    for h in (1, 2):
      for stages in (2, 3):
        for dt in ("fp8", "bf16"):
          if (1 + h) * bq * bk // (32 * warps) > 192:
            continue
          out[f"{dt}_q{bq}_k{bk}_w{warps}_s{stages}_h{h}"] = (dt, dsa_indexer.IndexerBlocks(
              block_q=bq, block_k=bk, num_warps=warps, num_stages=stages, heads_per_step=h))
  return out


INDEXER_KERNEL_VARIANTS = _indexer_variants()   # name -> (operand dtype, IndexerBlocks)
INDEXER_DEFAULT = {"fp8": "fp8_q64_k128_w4_s2_h1", "bf16": "bf16_q64_k128_w4_s2_h1"}
_VARIANTS_MATCH = flags.DEFINE_string("indexer_variants", "", "Indexer sweep: only variants whose name "
                                      "contains one of these comma-separated substrings (default: all).")
_SWEEP_BUDGET = flags.DEFINE_float("sweep_budget_s", 0.0, "Indexer sweep: stop starting new variants at the "
                                   "first length after this many seconds (0 = no limit).")


def indexer_case(length, reps, state):
  """Prefill indexer over all chunks. End to end (`indexer_scores`, default blocks; fp8 with the
  keys quantized once, q per chunk), the quantization alone, then the scoring kernel alone on
  pre-quantized fp8 and on bf16 operands for each launch variant (`INDEXER_KERNEL_VARIANTS`; at
  the first length all of them, later the default + the `--sweep_top` fastest per dtype), each
  checked against its dtype's default variant (per-row max and sum of the scores of all chunks);
  finally end to end with each dtype's fastest variant."""
  hi, di = _INDEX_HEADS.value, _INDEX_DIM.value
  keys = jax.random.split(jax.random.key(length + 3), 3)
  qi = jax.random.normal(keys[0], (1, length, hi, di), jnp.bfloat16)
  ki = jax.random.normal(keys[1], (1, length, di), jnp.bfloat16)
  w = jax.random.normal(keys[2], (1, length, hi), jnp.float32) * (hi * di) ** -0.5
  pos = jnp.arange(length, dtype=jnp.int32)[None]
  n = length // min(_CHUNK.value, length)
  res = {"length": length}
  flush = state.get("flush", lambda r: None)
  cases = {
      "bf16": lambda qi, ki, w: _indexer_all_chunks(qi, ki, w, pos, n, fp8=False),
      "fp8_keys_once": lambda qi, ki, w: _indexer_all_chunks(qi, dsa.quantize_index_keys(ki), w, pos, n, fp8=True),
      "quantize_q": lambda qi, ki, w: dsa_indexer.fp8_query_operands(qi, w),
  }
  for name, fn in cases.items():
    res[f"e2e_{name}_ms"] = _ms(_try(f"indexer end to end {name}", jax.jit(fn), qi, ki, w, reps=reps))
  q8, w8 = jax.jit(dsa_indexer.fp8_query_operands)(qi, w)
  k8, ks = jax.jit(dsa.quantize_index_keys)(ki)
  operands = {"fp8": (q8, k8, w8, ks[..., 0]), "bf16": (qi, ki, w, jnp.ones((1, length), jnp.float32))}
  match = [m for m in _VARIANTS_MATCH.value.split(",") if m]
  names = state.get("indexer_order") or [n_ for n_ in INDEXER_KERNEL_VARIANTS
                                         if not match or any(m in n_ for m in match)]
  refs, best, t_start = {}, {}, time.perf_counter()
  for name in names:
    dt, blocks = INDEXER_KERNEL_VARIANTS[name]
    if "indexer_order" not in state and _SWEEP_BUDGET.value and time.perf_counter() - t_start > _SWEEP_BUDGET.value:
      print(f"  indexer kernel {name}: skipped (sweep budget)", flush=True)
      continue
    ops = operands[dt]
    f = jax.jit(lambda q, k, w_, s, blocks=blocks: _kernel_all_chunks(q, k, w_, s, pos, n, blocks))
    try:
      t, got = _time_unless_slow(f"indexer kernel {name}", f, ops, 1.5 * best.get(dt, (1e9,))[0], reps,
                                 keep_output=True)
    except Exception as e:  # pylint: disable=broad-except
      print(f"  indexer kernel {name}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
      res[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
      continue
    res[f"{name}_ms"] = _ms(t)
    if t < best.get(dt, (1e9,))[0]:
      best[dt] = (t, name)
    ref = refs.setdefault(dt, got)   # the dtype's first variant (the default) is the reference
    res[f"{name}_same"] = bool(jnp.allclose(got[0], ref[0], rtol=1e-5, atol=1e-5) and
                               jnp.allclose(got[1], ref[1], rtol=1e-4, atol=1e-3))
    del got
    flush(res)
  if "indexer_order" not in state:
    order = []
    for dt in ("fp8", "bf16"):
      timed = sorted((res[f"{n_}_ms"], n_) for n_ in names if n_.startswith(dt) and res.get(f"{n_}_ms")
                     and res.get(f"{n_}_same"))
      top = [n_ for _, n_ in timed[:_SWEEP_TOP.value]]
      order += ([INDEXER_DEFAULT[dt]] if INDEXER_DEFAULT[dt] in names else []) + [
          n_ for n_ in top if n_ != INDEXER_DEFAULT[dt]]
    state["indexer_order"] = order
  for dt, (_, name) in best.items():   # end to end with the fastest variant (fp8: q quantized per chunk)
    blocks = INDEXER_KERNEL_VARIANTS[name][1]
    fn = (lambda qi, ki, w, blocks=blocks: _indexer_all_chunks(qi, dsa.quantize_index_keys(ki), w, pos, n, fp8=True,
                                                               blocks=blocks)) if dt == "fp8" else (
          lambda qi, ki, w, blocks=blocks: _indexer_all_chunks(qi, ki, w, pos, n, fp8=False, blocks=blocks))
    res[f"e2e_{dt}_best_variant"] = name
    res[f"e2e_{dt}_best_ms"] = _ms(_try(f"indexer end to end {dt}, {name}", jax.jit(fn), qi, ki, w, reps=reps))
    flush(res)
  return res


def _ms(t):
  return None if t is None else t * 1e3


def _ratio(a, b):
  return None if a is None or b is None or b == 0 else a / b


def _mla_ratios(r):
  """'x (y)': cuDNN's MLA prefill with v at 128 (x) and padded to 192 (y) over the DSA total."""
  v128, padded = (_ratio(r.get(k), r.get("dsa_total_ms")) for k in ("dense_mla_cudnn_v128_ms", "dense_mla_cudnn_ms"))
  if v128 is None and padded is None:
    return None
  return f"{'-' if v128 is None else f'{v128:.3g}'} ({'-' if padded is None else f'{padded:.3g}'})"


def _pair(r, a, b):
  """'x / y' of two fields of row r (nan for a missing one), None when both are missing."""
  if r.get(a) is None and r.get(b) is None:
    return None
  return f"{r.get(a) or float('nan'):.3g} / {r.get(b) or float('nan'):.3g}"


def _table(head, rows, cols):
  f = lambda x: "-" if x is None else (str(x) if isinstance(x, (bool, int, str)) else f"{x:.3g}")
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  lines += ["| " + " | ".join(f(c(r)) for c in cols) + " |" for r in rows]
  return lines


SWEEP_PARTS = ("sparse", "indexer")


def write_sweep(results, out: pathlib.Path, quiet: bool = False):
  """The kernel-variant sweeps -> sweep_<part>.json, sweep_<part>.md (printed unless quiet)."""
  out.mkdir(parents=True, exist_ok=True)
  meta = dict(device=str(jax.devices()[0].device_kind), date=bench_common.today(), jax=jax.__version__,
              run=_RUN.value, timing="bench (median wall time of one call)", index_heads=_INDEX_HEADS.value,
              index_dim=_INDEX_DIM.value, chunk=_CHUNK.value)
  f = lambda x: "-" if x is None else (str(x) if isinstance(x, (bool, int, str)) else f"{x:.3g}")
  for part, rows in results.items():
    (out / f"sweep_{part}.json").write_text(json.dumps(dict(meta=meta, **{part: rows}), indent=1))
    lines = [f"device {meta['device']}, jax {meta['jax']}, {meta['date']}, run {meta['run']}; ms, median "
             "of one call", ""]
    names = sorted({k[:-3] for r in rows for k in r if k.endswith("_ms")}, key=lambda n: (
        rows[-1].get(n + "_ms") is None, rows[-1].get(n + "_ms") or rows[0].get(n + "_ms") or 1e9))
    extra = {"sparse": "_err", "indexer": "_same"}[part]
    lines += [f"{part}: variant x length (ms){'; rel. error vs XLA at L=300' if part == 'sparse' else '; same = same scores as the default kernel'}", ""]
    lines += ["| variant | " + " | ".join(str(r["length"]) for r in rows) + f" | {extra[1:]} |",
              "|---|" + "---|" * (len(rows) + 1)]
    for n in names:
      chk = next((r[n + extra] for r in rows if n + extra in r), None)
      lines.append(f"| {n} | " + " | ".join(f(r.get(n + "_ms")) for r in rows) + f" | {f(chk)} |")
    lines += [""] + [f"L={r['length']}: {k} = {v}" for r in rows for k, v in r.items()
                     if k.endswith("_variant") or k.endswith("_error")]
    (out / f"sweep_{part}.md").write_text("\n".join(lines) + "\n")
    if not quiet:
      print("\n".join(lines), flush=True)
      if part == "indexer":
        plot_indexer_sweep(rows, meta, out / "sweep_indexer.png")


def plot_indexer_sweep(rows, meta, path: pathlib.Path):
  """Bar chart of the scoring-kernel variants at the first length (fp8 and bf16 operands)."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  row = rows[0]
  timed = sorted((row[f"{n}_ms"], n) for n in INDEXER_KERNEL_VARIANTS if row.get(f"{n}_ms") is not None)
  fig, ax = plt.subplots(figsize=(8, 0.22 * len(timed) + 1.2))
  ax.barh(range(len(timed)), [t for t, _ in timed],
          color=["tab:orange" if n.startswith("fp8") else "tab:blue" for _, n in timed])
  ax.set_yticks(range(len(timed)), [n + (" *" if n in INDEXER_DEFAULT.values() else "") for _, n in timed],
                fontsize=7)
  ax.invert_yaxis()
  ax.set_xscale("log")
  ax.set_xlabel(f"ms, scoring kernel alone, all chunks (L = {row['length']}; * = session-4 default)")
  ax.set_title(f"DSA indexer launch sweep, {meta['device']}, jax {meta['jax']}, {meta['date']}", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _merge(old, new):
  """Rows of `new` replace those of `old` with the same batch, length and key dims; the others are kept
  (rows before session 8 have no key-dim fields: latent 512, no RoPE part)."""
  out = {}
  row_key = lambda r: (r.get("batch", 1), r["length"], r.get("latent", 512), r.get("rope_dim", 0))
  for part in set(old) | set(new):
    if part == "meta":
      continue
    rows = {row_key(r): r for r in old.get(part, [])}
    rows.update({row_key(r): r for r in new.get(part, [])})
    out[part] = [rows[k] for k in sorted(rows)]
  return out


def write(results, out: pathlib.Path, **meta_extra):
  out.mkdir(parents=True, exist_ok=True)
  meta = dict(device=str(jax.devices()[0].device_kind), date=bench_common.today(), jax=jax.__version__,
              heads=_HEADS.value, latent=_LATENT.value, rope_dim=_ROPE.value, index_heads=_INDEX_HEADS.value,
              index_dim=_INDEX_DIM.value, top_k=_TOP_K.value, chunk=_CHUNK.value,
              decode_timing=f"device time per call, bench_in_loop(inner={_INNER.value})",
              prefill_timing="bench (median wall time of one call); from run s20 the DSA total and the "
                             "cuDNN baselines in turn over prefill_rounds rounds (median of rounds)")
  meta.update(meta_extra)
  (out / "results.json").write_text(json.dumps(dict(meta=meta, **results), indent=1))
  g = lambda key: lambda r: r.get(key)
  lines = [f"device {meta['device']}, jax {meta['jax']}, {meta['date']}; {meta['heads']} heads, "
           f"top-k {meta['top_k']}, indexer {meta['index_heads']}x{meta['index_dim']}, chunk {meta['chunk']}. "
           "Prefill: wall ms of one call; from run s10 the indexer columns are the Mosaic GPU kernel "
           "(Triton before; both in s10 rows); top-k = (indexer fp8 + top-k, all chunks) - indexer fp8, on "
           "the bf16 scores the FP8 path selects on from run s9 (float32 before; both in s9 rows). "
           "Prefill batch 1. Decode: device ms per step (bench_in_loop), one new token per sequence of the batch.",
           ""] + [f"{k}: {v}" for k, v in meta_extra.items()] + [""]
  lines += _table(
      ["prefill L", "run", "key dims", "dense cuDNN 128x128", "dense flash",
       "dense MLA cuDNN 192/128: v 128 / v padded to 192",
       "indexer fp8", "indexer bf16", "indexer fp8 / bf16, Triton kernel", "top-k (kernel, all chunks)",
       "top-k lax (1 chunk x n)", "top-k kernel / lax, last chunk", "indexer fp8 / top-k, f32 scores",
       "sparse attn", "DSA total",
       "speed-up vs cuDNN 128x128", "vs MLA cuDNN 192/128: v 128 (v padded)", "indexer share"],
      results.get("prefill", []),
      [g("length"), g("run"), lambda r: f"{r.get('latent', 512)}+{r['rope_dim']}" if "rope_dim" in r else "512",
       g("dense_cudnn_ms"), g("dense_pallas_ms"), lambda r: _pair(r, "dense_mla_cudnn_v128_ms", "dense_mla_cudnn_ms"),
       g("indexer_fp8_ms"), g("indexer_bf16_ms"),
       lambda r: None if r.get("indexer_fp8_triton_ms") is None else
       f"{r['indexer_fp8_triton_ms']:.3g} / {r.get('indexer_bf16_triton_ms') or float('nan'):.3g}",
       g("topk_ms"), g("topk_xla_ms_scaled"),
       lambda r: None if r.get("topk_pallas_chunk_ms") is None else
       f"{r['topk_pallas_chunk_ms']:.3g} / {r.get('topk_xla_chunk_ms') or float('nan'):.3g}",
       lambda r: None if r.get("indexer_fp8_f32_ms") is None else
       f"{r['indexer_fp8_f32_ms']:.3g} / {r.get('topk_f32_ms') or float('nan'):.3g}",
       g("sparse_attention_ms"), g("dsa_total_ms"),
       lambda r: _ratio(r.get("dense_cudnn_ms"), r.get("dsa_total_ms")),
       lambda r: _mla_ratios(r),
       lambda r: _ratio(r.get("indexer_fp8_ms"), r.get("dsa_total_ms"))])
  lines += [""] + _table(
      ["decode L", "batch", "run", "key dims", "dense MQA (XLA)", "dense MQA lca flash 576 / 512", "dense MHA cuDNN",
       "indexer fp8", "indexer bf16", "top-k kernel / lax, f32", "top-k kernel / lax, bf16", "sparse attn",
       "DSA step", "DSA step, lax top-k", "DSA step, bf16 indexer", "speed-up vs dense MQA (XLA)",
       "vs MQA lca flash 576 / 512", "vs MHA cuDNN"],
      results.get("decode", []),
      [g("length"), lambda r: r.get("batch", 1), g("run"),
       lambda r: f"{r.get('latent', 512)}+{r['rope_dim']}" if "rope_dim" in r else "512",
       g("dense_mqa_xla_ms"), lambda r: _pair(r, "dense_mqa_flash_ms", "dense_mqa_flash512_ms"),
       g("dense_mha_cudnn_ms"), g("indexer_fp8_ms"), g("indexer_bf16_ms"),
       lambda r: _pair(r, "topk_ms", "topk_xla_ms"), lambda r: _pair(r, "topk_bf16_ms", "topk_xla_bf16_ms"),
       g("sparse_attention_ms"), g("dsa_total_ms"),
       lambda r: r.get("dsa_total_xla_topk_ms") or r.get("dsa_total_fp8_ms"),
       lambda r: r.get("dsa_total_bf16_ms"),
       lambda r: _ratio(r.get("dense_mqa_xla_ms"), r.get("dsa_total_ms")),
       lambda r: _pair({n: _ratio(r.get(f"dense_mqa_{n}_ms"), r.get("dsa_total_ms")) for n in ("flash", "flash512")},
                       "flash", "flash512"),
       lambda r: _ratio(r.get("dense_mha_cudnn_ms"), r.get("dsa_total_ms"))])
  if results.get("topk"):
    names = list(TOPK_CONFIGS)
    lines += ["", "top-k kernel launch parameters (ms; chunk = causal [chunk, L] scores, wall; row = one "
              "row, device time in loop; exact = same sets as lax.top_k)", ""]
    lines += _table(["L", "lax chunk", "lax chunk bf16", "lax row"] + [f"{n} chunk / row / exact" for n in names],
                    results["topk"], [g("length"), g("xla_chunk_ms"), g("xla_bf16_chunk_ms"), g("xla_row_ms")] + [
                        (lambda r, n=n: None if r.get(f"{n}_chunk_ms") is None else
                         f"{r[f'{n}_chunk_ms']:.3g} / {r.get(f'{n}_row_ms') or float('nan'):.3g} / "
                         f"{r.get(f'{n}_exact')}") for n in names])
    lines += ["", "one row (decode), default blocks, by segments per row (split; device ms)", ""]
    lines += _table(["L", "lax row"] + [f"split {n}" for n in ROW_SPLITS], results["topk"],
                    [g("length"), g("xla_row_ms")] + [g(f"row_split{n}_ms") for n in ROW_SPLITS])
  (out / "results.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines), flush=True)
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, series in ((axes[0], "prefill", ("dense_cudnn_ms", "dense_pallas_ms", "dense_mla_cudnn_ms",
                                                  "dense_mla_cudnn_v128_ms",
                                                  "indexer_fp8_ms",
                                                  "topk_ms", "topk_xla_ms_scaled", "sparse_attention_ms",
                                                  "dsa_total_ms")),
                            (axes[1], "decode", ("dense_mqa_xla_ms", "dense_mqa_flash512_ms", "dense_mha_cudnn_ms",
                                                 "indexer_fp8_ms", "topk_bf16_ms", "topk_xla_bf16_ms",
                                                 "sparse_attention_ms",
                                                 "dsa_total_ms"))):
      rows = results.get(key, [])
      colors = {}   # one colour a series; larger batches dashed in the same colour
      for batch in sorted({r.get("batch", 1) for r in rows}):
        # batch 1: every part; larger decode batches: the dense baselines and the DSA step, dashed
        for s in series if batch == 1 else ("dense_mqa_xla_ms", "dense_mqa_flash512_ms", "dsa_total_ms"):
          pts = [(r["length"], r[s]) for r in rows if r.get("batch", 1) == batch and r.get(s) is not None]
          if pts:
            ax.plot(*zip(*pts), marker="o", linestyle="-" if batch == 1 else "--",
                    color=colors.setdefault(s, f"C{len(colors) % 10}"),
                    label=s.replace("_ms", "") + ("" if batch == 1 else f", batch {batch}"))
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_xlabel("context length")
      ax.set_ylabel("ms" + (" (device, in loop)" if key == "decode" else ""))
      ax.set_title(f"{key}, {meta['device']}")
      ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "bench_dsa.png", dpi=120)
  except ImportError:
    pass


def main(argv):
  del argv
  print(jax.devices(), flush=True)
  out = pathlib.Path(_OUT.value)
  cases = {"topk": topk_case, "decode": decode_case, "prefill": prefill_case,
           "sparse": sparse_case, "indexer": indexer_case}
  for part in _PARTS.value:
    if part not in cases:
      raise ValueError(f"--parts: unknown part {part!r}; known: {sorted(cases)}")
  old = {}
  if set(_PARTS.value) - set(SWEEP_PARTS):     # the sweeps write their own files
    old = bench_common.previous_results(out / "results.json", str(jax.devices()[0].device_kind))
  meta_old = {k: v for k, v in old.get("meta", {}).items() if k not in (
      "device", "date", "jax", "heads", "latent", "rope_dim", "index_heads", "index_dim", "top_k", "chunk",
      "decode_timing", "prefill_timing")}
  results, sweeps, state = {}, {}, {}
  for part in _PARTS.value:
    target = sweeps if part in SWEEP_PARTS else results
    target[part] = []
    for length in map(int, _LENGTHS.value):
      print(f"{part} L={length}", flush=True)
      if part in SWEEP_PARTS:   # partial rows are written as they grow (`flush`)
        state["flush"] = lambda r, part=part: write_sweep({**sweeps, part: target[part] + [r]}, out, quiet=True)
        target[part].append(cases[part](length, _REPS.value, state))
        write_sweep(sweeps, out)
      else:
        target[part].append(dict(cases[part](length, _REPS.value), run=_RUN.value, latent=_LATENT.value,
                                 rope_dim=_ROPE.value, device=str(jax.devices()[0].device_kind),
                                 date=bench_common.today()))
        write(_merge(old, results), out, **meta_old)


if __name__ == "__main__":
  app.run(main)
