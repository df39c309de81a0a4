"""Probe: the Mosaic GPU sparse forward (pallas_kernels/dsa_attention_mgpu.py) against the Triton one (H100/H200).

First a check on small random inputs (odd lengths, batch 2, -1 indices in the middle and at the
end of a row, a row with none): the Mosaic forward's output and log-sum-exp against a plain-jnp
reference and the Triton forward's. Then, per --lengths, both forwards in MLA's absorbed prefill
shape (128 heads, 512 + 64 key, top-k 2048, indices spread over [0, t] as bench_dsa's), timed in
turn over --rounds, with their largest output difference.

  python -m experiments.probe_dsa_sparse_mgpu --lengths=32768,131072

--profile runs Mosaic's on-device profiler (`Config.profile_space`) over the forward of the last
--profile_queries queries of a --profile_length context and prints each named region's cycles
(a consumer's ready / qk / max / softmax / meet / pv, the producer's free / gather / land) and
a consumer's round (prepared in session 24, not yet run on a GPU).
"""

import dataclasses
import glob
import json
import os
import pathlib
import tempfile

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from experiments import bench_common
from lca.attention import dsa
from pallas_kernels import FORWARD_KERNELS
from pallas_kernels import dsa_attention
from pallas_kernels import dsa_attention_mgpu

_LENGTHS = flags.DEFINE_list("lengths", ["32768", "131072"], "Context lengths to time (none: check only).")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds of (Mosaic, Triton) timed in turn.")
_REPS = flags.DEFINE_integer("reps", 5, "Timed repetitions a round (median).")
_OUT = flags.DEFINE_string("out", "", "If set: a directory for probe_dsa_sparse_mgpu.json.")
_CONFIGS = flags.DEFINE_list("configs", [], "Also time the Mosaic forward with these Config overrides, "
                              "e.g. prefetch_ids=false (one case each).")
_PROFILE = flags.DEFINE_bool("profile", False, "Profile the Mosaic forward's named regions.")
_PROFILE_LENGTH = flags.DEFINE_integer("profile_length", 32768, "--profile: keys of the context.")
_PROFILE_QUERIES = flags.DEFINE_integer("profile_queries", 256, "--profile: its last queries profiled.")
_BWD_LENGTH = flags.DEFINE_integer("bwd_length", 0, "If > 0: forward + backward at this length with "
                                   "--bwd_forward's forward, and the peak device memory.")
_BWD_FORWARD = flags.DEFINE_enum("bwd_forward", "auto", list(FORWARD_KERNELS),
                                 "SparseBlocks.forward_kernel for --bwd_length.")


def mla_blocks(q_len, top_k, heads, forward_kernel):
  """The prefill's default SparseBlocks for MLA's 512 + 64 key, with that forward kernel."""
  return dataclasses.replace(dsa_attention.default_blocks(q_len, top_k, 512, heads, 64),
                             forward_kernel=forward_kernel)


def reference(q, k, k_rope, idx, scale):
  """Plain jnp (lca.attention.dsa's references): -> out [B, L, H, D] f32, lse [B, L, H] (natural
  log, -inf for no index)."""
  f32 = lambda x: x.astype(jnp.float32)
  key = jnp.concatenate([f32(k), f32(k_rope)], -1)
  out = dsa.sparse_attention_reference(f32(q), key, f32(k), idx, scale=scale)
  return out, jax.nn.logsumexp(dsa.gathered_logits(f32(q), key, idx, scale), axis=-1)


def check(batch=2, q_len=333, kv_len=701, heads=128, top_k=300):
  """Mosaic vs reference vs Triton on random inputs -> dict of the largest errors."""
  ks = jax.random.split(jax.random.key(7), 5)
  bf = jnp.bfloat16
  q = jax.random.normal(ks[0], (batch, q_len, heads, 576), bf)
  k = jax.random.normal(ks[1], (batch, kv_len, 1, 512), bf)
  kr = jax.random.normal(ks[2], (batch, kv_len, 1, 64), bf)
  idx = jax.vmap(lambda key: jax.vmap(lambda kk: jax.random.permutation(kk, kv_len)[:top_k])(
      jax.random.split(key, q_len)))(jax.random.split(ks[3], batch)).astype(jnp.int32)
  holes = jax.random.uniform(ks[4], idx.shape) < 0.1
  idx = jnp.where(holes, -1, idx).at[:, 5].set(-1)       # -1 anywhere; query 5 sees nothing
  scale = 576 ** -0.5
  out, lse = jax.jit(lambda *a: dsa_attention_mgpu.forward(*a, scale=scale))(q, k, kr, idx)
  ref_out, ref_lse = reference(q, k, kr, idx, scale)
  blocks = mla_blocks(q_len, top_k, heads, "triton")
  tri_out, tri_lse = jax.jit(lambda *a: dsa_attention._forward(*a, scale, blocks, False))(q, k, None, kr, idx)
  tri_lse = tri_lse[:, :, 0, :heads]
  f32 = lambda x: x.astype(jnp.float32)
  finite = jnp.isfinite(ref_lse)
  res = {
      "out_vs_ref": float(jnp.max(jnp.abs(f32(out) - ref_out))),
      "triton_out_vs_ref": float(jnp.max(jnp.abs(f32(tri_out) - ref_out))),
      "ref_out_max": float(jnp.max(jnp.abs(ref_out))),
      "lse_vs_ref": float(jnp.max(jnp.where(finite, jnp.abs(lse - ref_lse), 0))),
      "lse_inf_where_ref_inf": bool(jnp.all(jnp.where(finite, True, lse == -jnp.inf))),
      "empty_row_out_zero": bool(jnp.all(out[:, 5] == 0)),
      "out_vs_triton": float(jnp.max(jnp.abs(f32(out) - f32(tri_out)))),
      "lse_vs_triton": float(jnp.max(jnp.where(finite, jnp.abs(lse - tri_lse), 0))),
  }
  print("check:", res, flush=True)
  return res


def fwd_bwd(length, forward_kernel, scale):
  """Forward + backward of sparse_attention at `length` with that forward -> {ms, peak GB}."""
  q, kv, kr, idx = bench_common.mla_sparse_operands(length)
  ct = jax.random.normal(jax.random.key(1), (*q.shape[:3], kv.shape[-1]), jnp.bfloat16)
  blocks = mla_blocks(length, idx.shape[-1], q.shape[2], forward_kernel)
  f = jax.jit(lambda q, kv, kr, idx, ct: jax.vjp(
      lambda *a: dsa_attention.sparse_attention(a[0], a[1], None, idx, k_rope=a[2], scale=scale, blocks=blocks),
      q, kv, kr)[1](ct))
  ms = bench_common.try_bench(f"L={length} f+b, {forward_kernel} forward", f, q, kv, kr, idx, ct, reps=_REPS.value)
  stats = jax.devices()[0].memory_stats() or {}
  row = {"length": length, "forward_kernel": forward_kernel, "ms": ms and ms * 1e3,
         "peak_gb": stats.get("peak_bytes_in_use", 0) / 1e9}
  print(f"  {row}", flush=True)
  return row


def profile(length, queries, scale):
  """Mosaic's on-device profiler over the forward of the last `queries` queries -> the summary."""
  q, kv, kr, idx = bench_common.mla_sparse_operands(length)
  q, idx = q[:, -queries:], idx[:, -queries:]
  rounds = -(-idx.shape[-1] // 128)
  with tempfile.TemporaryDirectory() as d:
    cfg = dsa_attention_mgpu.Config(profile_space=6 * rounds + 16, profile_dir=d)   # 6 regions a round
    jax.block_until_ready(dsa_attention_mgpu.forward(q, kv, kr, idx, scale=scale, config=cfg))
    jax.effects_barrier()
    trace = json.loads(pathlib.Path(sorted(glob.glob(os.path.join(d, "*-trace.json")))[-1]).read_text())
  text = (f"profile: the last {queries} queries of {length}, {rounds} rounds a CTA\n"
          + bench_common.mosaic_profile_summary(trace, period_region="ready"))
  print(text, flush=True)
  return text


def main(argv):
  del argv
  print(jax.devices(), flush=True)
  res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "date": bench_common.today(),
         "check": check() if _LENGTHS.value else None, "rows": []}
  scale = 576 ** -0.5
  for length in map(int, _LENGTHS.value):
    q, kv, kr, idx = bench_common.mla_sparse_operands(length)
    blocks = mla_blocks(length, idx.shape[-1], q.shape[2], "triton")   # the default is the Mosaic forward
    fwd = {"mosaic": jax.jit(lambda q, kv, kr, idx: dsa_attention_mgpu.forward(q, kv, kr, idx, scale=scale)[0]),
           "triton": jax.jit(lambda q, kv, kr, idx: dsa_attention._forward(q, kv, None, kr, idx, scale, blocks, False)[0])}
    for spec in _CONFIGS.value:
      name, value = spec.split("=")
      cfg = dsa_attention_mgpu.Config(**{name: {"true": True, "false": False}.get(value.lower(), value)})
      fwd[f"mosaic {spec}"] = jax.jit(lambda q, kv, kr, idx, cfg=cfg: dsa_attention_mgpu.forward(
          q, kv, kr, idx, scale=scale, config=cfg)[0])
    print(f"L={length}: forward, {_ROUNDS.value} rounds", flush=True)
    t = bench_common.interleaved({n: (n, f, (q, kv, kr, idx)) for n, f in fwd.items()},
                                 rounds=_ROUNDS.value, reps=_REPS.value)
    diff = jax.jit(lambda a, b: jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
    row = {"length": length, **{f"{n}_ms": v and v * 1e3 for n, v in t.items()},
           "max_diff": float(diff(fwd["mosaic"](q, kv, kr, idx), fwd["triton"](q, kv, kr, idx)))}
    if t["mosaic"] and t["triton"]:
      row["speedup"] = t["triton"] / t["mosaic"]
      row["mosaic_tflops"] = 2 * length * 2048 * 128 * (576 + 512) / t["mosaic"] / 1e12
    print(f"  {row}", flush=True)
    res["rows"].append(row)
    del q, kv, kr, idx
  if _PROFILE.value:
    try:
      res["profile"] = profile(_PROFILE_LENGTH.value, _PROFILE_QUERIES.value, scale)
    except Exception as e:  # pylint: disable=broad-except
      print(f"  profile: failed: {type(e).__name__}: {str(e)[:400]}", flush=True)
  if _BWD_LENGTH.value:
    res["fwd_bwd"] = fwd_bwd(_BWD_LENGTH.value, _BWD_FORWARD.value, scale)
  if _OUT.value:
    bench_common.write_json(_OUT.value, "probe_dsa_sparse_mgpu.json", res)


if __name__ == "__main__":
  app.run(main)
