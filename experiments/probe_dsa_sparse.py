"""Probe: DSA's sparse attention kernel against another version of it, in one process (GPU).

Times `pallas_kernels.dsa_attention.sparse_attention` in MLA's absorbed form (128 heads, key
[512 latent ; 64 RoPE], value the latent, top-k 2048, indices spread evenly over [0, t] as in
`bench_dsa`'s sparse part) and, with --ab_module, the same call from another copy of the module
(e.g. an older commit's file saved as experiments/_ab_dsa_attention.py), the two timed in turn
over --rounds (`bench_common.interleaved`); prints their largest output difference. With
--bwd_length also the forward + backward at that length.

  python -m experiments.probe_dsa_sparse --lengths=32768,131072 --ab_module=experiments._ab_dsa_attention
"""

import importlib

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from experiments import bench_common
from pallas_kernels import dsa_attention

_LENGTHS = flags.DEFINE_list("lengths", ["32768", "131072"], "Context lengths (forward).")
_BWD_LENGTH = flags.DEFINE_integer("bwd_length", 0, "If > 0: forward + backward at this length too.")
_AB = flags.DEFINE_string("ab_module", "", "Module path of another dsa_attention version to time beside.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds of (this, other) timed in turn.")
_REPS = flags.DEFINE_integer("reps", 5, "Timed repetitions a round (median).")
_OUT = flags.DEFINE_string("out", "", "If set: a directory for probe_dsa_sparse.json.")


def main(argv):
  del argv
  print(jax.devices(), flush=True)
  mods = {"this": dsa_attention}
  if _AB.value:
    mods["other"] = importlib.import_module(_AB.value)
  fwd = {name: jax.jit(lambda q, kv, kr, idx, m=m: m.sparse_attention(q, kv, None, idx, k_rope=kr))
         for name, m in mods.items()}
  res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "date": bench_common.today(),
         "ab_module": _AB.value, "rows": []}
  for length in map(int, _LENGTHS.value):
    args = bench_common.mla_sparse_operands(length)
    print(f"L={length}: forward, {_ROUNDS.value} rounds", flush=True)
    t = bench_common.interleaved({n: (f"{n} fwd", f, args) for n, f in fwd.items()},
                                 rounds=_ROUNDS.value, reps=_REPS.value)
    row = {"length": length, "part": "fwd", **{f"{n}_ms": v and v * 1e3 for n, v in t.items()}}
    if len(fwd) == 2:   # one fused reduction (f32 copies of two 128k outputs are 32 GB each)
      diff = jax.jit(lambda a, b: jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
      row["max_diff"] = float(diff(*(fwd[n](*args) for n in fwd)))
      row["ratio_this_over_other"] = t["this"] / t["other"] if t["this"] and t["other"] else None
    print(f"  {row}", flush=True)
    res["rows"].append(row)
    del args
  if _BWD_LENGTH.value:
    length = _BWD_LENGTH.value
    q, kv, kr, idx = bench_common.mla_sparse_operands(length)
    ct = jax.random.normal(jax.random.key(1), (1, length, q.shape[2], kv.shape[-1]), jnp.bfloat16)
    # idx and ct are arguments, not closed over (a closure embeds them as constants: 2.3 GB at 16k)
    fb = {n: jax.jit(lambda q, kv, kr, idx, ct, m=m: jax.vjp(
        lambda *a: m.sparse_attention(a[0], a[1], None, idx, k_rope=a[2]), q, kv, kr)[1](ct))
          for n, m in mods.items()}
    print(f"L={length}: forward + backward, {_ROUNDS.value} rounds", flush=True)
    t = bench_common.interleaved({n: (f"{n} f+b", f, (q, kv, kr, idx, ct)) for n, f in fb.items()},
                                 rounds=_ROUNDS.value, reps=_REPS.value)
    row = {"length": length, "part": "fwd_bwd", **{f"{n}_ms": v and v * 1e3 for n, v in t.items()}}
    if len(fb) == 2:
      ga, gb = (fb[n](q, kv, kr, idx, ct) for n in fb)
      row["max_rel_diff"] = max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))
                                      / float(jnp.max(jnp.abs(y.astype(jnp.float32))))) for x, y in zip(ga, gb))
    print(f"  {row}", flush=True)
    res["rows"].append(row)
  if _OUT.value:
    bench_common.write_json(_OUT.value, "probe_dsa_sparse.json", res)


if __name__ == "__main__":
  app.run(main)
