"""Probe: cuDNN's dense MLA prefill with v at its own 128 dims, and the indexer query's rotation (GPU).

Two questions behind `bench_dsa --parts=prefill`'s ratios, timed in turn over --rounds
(`bench_common.interleaved`) at each of --lengths:
  mla padded    what bench_dsa times: `jax.nn.dot_product_attention(implementation="cudnn")`
                takes one head dim, so v (128) is zero-padded to q.k's 192 and sliced back
  mla native    `full.attention(..., implementation="cudnn")`, which for v's head dim other than
                q's calls jax's cuDNN module (`fused_attention_stablehlo`; cuDNN >= 9.10 on
                Hopper takes q.k 192 / v 128): the PV product at 128 dims, the fair peer
  q operands    the FP8 indexer's per-chunk query preparation over all chunks (Hadamard
                rotation, then quantization): the rotation as an f32 matmul (before session 23)
                and as `dsa._rotate` runs bf16 now (by the +-1 matrix: exact products, f32
                sums, scaled after)
Checks first: native == padded[..., :128] (the same softmax; bf16 outputs), and the rotations'
fp8 codes and scales.

  python -m experiments.probe_dsa_baseline --lengths=32768,131072
"""

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from experiments import bench_common
from lca.attention import dsa, full

_LENGTHS = flags.DEFINE_list("lengths", ["32768", "131072"], "Context lengths.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds of all cases timed in turn.")
_REPS = flags.DEFINE_integer("reps", 3, "Timed repetitions a round (median).")
_CHUNK = 2048


def mla_padded(q, k, v):   # bench_dsa's padded peer (runs before s23)
  return full.v_padded_to_q(jax.nn.dot_product_attention, q, k, v, is_causal=True, implementation="cudnn")


def mla_native(q, k, v):   # lca's cuDNN path: jax's cuDNN module when v's head dim differs
  return full.attention(q, k, v, causal=True, implementation="cudnn")


def rotate_f32(x):
  """The rotation before session 23: an f32 matmul by the normalized matrix (TF32 on a GPU)."""
  return dsa._rotate(x.astype(jnp.float32))  # pylint: disable=protected-access


rotate_bf16 = dsa._rotate  # pylint: disable=protected-access  (bf16 input: +-1 matmul, f32 sums)


def query_operands(rotate):
  def fn(qi, w):   # per chunk, as the prefill's lax.map over chunks
    n = qi.shape[1] // _CHUNK
    def one(a):
      q8, s = dsa.quantize_fp8(rotate(a[0]))
      return jnp.sum(q8[..., :1].astype(jnp.float32)) + jnp.sum(a[1] * s[..., 0])
    return jax.lax.map(one, (qi.reshape(n, 1, _CHUNK, *qi.shape[2:]), w.reshape(n, 1, _CHUNK, -1)))
  return jax.jit(fn)


def main(_):
  print(jax.devices()[0].device_kind, jax.__version__, flush=True)
  bf = jnp.bfloat16
  for length in map(int, _LENGTHS.value):
    ks = jax.random.split(jax.random.key(length), 5)
    q, k = (jax.random.normal(ks[i], (1, length, 128, 192), bf) for i in (0, 1))
    v = jax.random.normal(ks[2], (1, length, 128, 128), bf)
    qi = jax.random.normal(ks[3], (1, length, 64, 128), bf)
    w = jax.random.normal(ks[4], (1, length, 64), jnp.float32)
    padded, native = jax.jit(mla_padded), jax.jit(mla_native)
    try:
      a, b = padded(q[:, :4096], k[:, :4096], v[:, :4096]), native(q[:, :4096], k[:, :4096], v[:, :4096])
      diff = float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
      print(f"  check L=4096: max |native - padded| {diff:.3g} (|out| max {float(jnp.max(jnp.abs(a))):.3g})")
    except Exception as e:  # pylint: disable=broad-except
      print(f"  check: native failed: {type(e).__name__}: {str(e)[:400]}")
    x = qi[:, :_CHUNK]
    (q8a, sa), (q8b, sb) = (dsa.quantize_fp8(r(x)) for r in (rotate_f32, rotate_bf16))
    codes = float(jnp.mean((q8a.astype(jnp.float32) != q8b.astype(jnp.float32)).astype(jnp.float32)))
    print(f"  check rotation: fp8 codes differing {codes:.3g}, scales max rel diff "
          f"{float(jnp.max(jnp.abs(sa - sb) / sa)):.3g}", flush=True)
    cases = {"padded": (f"{length} mla padded", padded, (q, k, v)),
             "native": (f"{length} mla native", native, (q, k, v)),
             "rot_f32": (f"{length} q operands, f32 rotation", query_operands(rotate_f32), (qi, w)),
             "rot_bf16": (f"{length} q operands, bf16 rotation", query_operands(rotate_bf16), (qi, w))}
    times = bench_common.interleaved(cases, rounds=_ROUNDS.value, reps=_REPS.value)
    for name, t in times.items():
      print(f"{length} {name:10s} {'failed' if t is None else f'{t * 1e3:.2f} ms'}", flush=True)


if __name__ == "__main__":
  app.run(main)
