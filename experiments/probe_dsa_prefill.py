"""Probe: DSA's prefill end to end by query chunk size, and its sparse part by index pattern (GPU).

`bench_dsa --parts=prefill` times each part of the prefill once and the whole in rounds against
cuDNN; the whole (490 ms at 128k, run s20) came out ~9 ms above the sum of its parts. This probe
times, in turn over --rounds (`bench_common.interleaved`), at each of --lengths:
  index+top-k chunk C   `dsa.indexer_top_k` (FP8 indexer, Pallas top-k) in query chunks of C
  DSA chunk C           the same, then the sparse attention over its indices (the prefill)
  sparse, spread        the sparse attention alone on indices spread evenly over [0, t] (as
                        bench_dsa's "sparse attn" column): neighbouring queries share most rows
  sparse, top-k         the same on the indexer's own top-k of this benchmark's random inputs:
                        neighbouring queries share few rows, so fewer gathers hit L2

  python -m experiments.probe_dsa_prefill --lengths=131072 --chunks=2048,4096,8192
"""

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from experiments import bench_common
from lca.attention import dsa
from pallas_kernels import dsa_attention

_LENGTHS = flags.DEFINE_list("lengths", ["131072"], "Context lengths.")
_CHUNKS = flags.DEFINE_list("chunks", ["2048", "4096"], "Queries per indexer chunk (the first: the "
                            "chunk of the sparse-part cases' top-k indices).")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds of all cases timed in turn.")
_REPS = flags.DEFINE_integer("reps", 3, "Timed repetitions a round (median).")
_TOP_K = 2048


def operands(length, heads=128, latent=512, rope=64, index_heads=64, index_dim=128):
  """(q [1, L, H, latent + rope], latent [1, L, 1, latent], k_rope [1, L, 1, rope]) and the
  indexer's (q_I [1, L, H_I, d_I], k_I [1, L, d_I], w [1, L, H_I]); bench_dsa's shapes."""
  ks = jax.random.split(jax.random.key(length), 6)
  bf = jnp.bfloat16
  mla = (jax.random.normal(ks[0], (1, length, heads, latent + rope), bf),
         jax.random.normal(ks[1], (1, length, 1, latent), bf),
         jax.random.normal(ks[2], (1, length, 1, rope), bf))
  index = (jax.random.normal(ks[3], (1, length, index_heads, index_dim), bf),
           jax.random.normal(ks[4], (1, length, index_dim), bf),
           jax.random.normal(ks[5], (1, length, index_heads), jnp.float32) * (index_heads * index_dim) ** -0.5)
  return mla, index


def index_top_k(qi, ki, w, *, chunk):
  return dsa.indexer_top_k(qi, ki, w, top_k=_TOP_K, fp8=True, chunk=chunk, implementation="pallas",
                           topk_implementation="pallas")


def sparse(q, kv, kr, idx):
  return dsa_attention.sparse_attention(q, kv, None, idx, k_rope=kr)


def main(argv):
  del argv
  print(jax.devices()[0].device_kind, flush=True)
  for length in map(int, _LENGTHS.value):
    mla, index = operands(length)
    chunks = [min(int(c), length) for c in _CHUNKS.value]
    cases = {}
    for c in chunks:
      cases[f"index+top-k chunk {c}"] = (f"L={length} index+top-k chunk {c}",
                                         jax.jit(lambda *a, c=c: index_top_k(*a, chunk=c)), index)
      cases[f"DSA chunk {c}"] = (f"L={length} DSA chunk {c}", jax.jit(
          lambda q, kv, kr, qi, ki, w, c=c: sparse(q, kv, kr, index_top_k(qi, ki, w, chunk=c))), mla + index)
    top = jax.jit(lambda *a: index_top_k(*a, chunk=chunks[0]))(*index)
    for c in chunks[1:]:   # the chunking changes the work's order, not the selection
      same = jnp.array_equal(jnp.sort(top, -1), jnp.sort(jax.jit(lambda *a, c=c: index_top_k(*a, chunk=c))(*index), -1))
      print(f"L={length} chunk {c}: the same top-k sets as chunk {chunks[0]}: {bool(same)}", flush=True)
    spread = bench_common.causal_spread_indices(_TOP_K, jnp.arange(length, dtype=jnp.int32))
    for name, idx in (("spread", spread), ("top-k", top)):
      cases[f"sparse, {name}"] = (f"L={length} sparse, {name} indices", jax.jit(sparse), mla + (idx,))
    times = bench_common.interleaved(cases, rounds=_ROUNDS.value, reps=_REPS.value)
    for name, t in times.items():
      print(f"L={length} {name}: {t and 1e3 * t:.1f} ms (median of rounds)", flush=True)


if __name__ == "__main__":
  app.run(main)
