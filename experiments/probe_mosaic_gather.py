r"""Probe: gathering KV rows by index into wgmma-ready shared memory with Pallas Mosaic GPU on Hopper.

Mosaic GPU's row gather (`src.at[indices]`) lowers to Blackwell's TMA gather; on Hopper a copy
into a tiled, swizzled shared-memory ref must cover whole (8, 64) tiles. This probe gathers each
row as [1, 64] TMA boxes (128 B: the 128-B swizzle's span) into a flat, swizzle-only view of the
buffer (`plgpu.RefUnion`); box j of gathered row r goes to the 128-B line
((r // 8) * (D / 64) + j) * 8 + r % 8, where the (8, 64)-tiled view expects it. The TMA applies
the swizzle from the destination address, so the tiled view then holds the rows in wgmma's layout.

  python -m experiments.probe_mosaic_gather            # H100: layout check + gather rate
  python -m experiments.probe_mosaic_gather --lower    # any machine: lower for CUDA only

Measured (H100, 2026-11-24, jax 0.11.2; results/bench_dsa/mosaic_gather_s12.log): the layout is
exact, a wgmma over the tiled view matches the reference (3e-7), and one producer warpgroup a CTA
gathers 1.1-1.2 G rows/s of 1152 B (~22 clock cycles a box an SM). pallas_kernels/NOTES_dsa.md,
session 12, says what that means for a Mosaic sparse attention.
"""

import sys
import time

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

D, R = 576, 64      # row width (V3.2's 512 latent + 64 RoPE dims), rows a step
C = D // 64         # 128-B boxes a row
TILED = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
NO_AUTO_BARRIERS = plgpu.CompilerParams(unsafe_no_auto_barriers=True)


def line(r, j):
  """The 128-B line holding box j of row r in the (8, 64)-tiled [R, D] bf16 layout."""
  return ((r // 8) * C + j) * 8 + r % 8


def ring(stages: int):
  """[stages] gather buffers: a flat view (one 128-B line a row) for the TMA, a tiled one for wgmma."""
  return plgpu.RefUnion(plgpu.SMEM((stages, R * C, 64), jnp.bfloat16, transforms=(plgpu.SwizzleTransform(128),)),
                        plgpu.SMEM((stages, R, D), jnp.bfloat16, transforms=TILED))


def gather(kv_ref, idx_smem, first, flat, slot, barrier, part=0, parts=1):
  """Issues the TMA boxes of rows kv[idx_smem[first + r]], r = part, part + parts, ... < R, into
  ring slot `slot`."""
  def row(i, carry):
    r = part + parts * i
    src = idx_smem[first + r]
    for j in range(C):
      plgpu.copy_gmem_to_smem(kv_ref.at[pl.ds(src, 1), pl.ds(64 * j, 64)],
                              flat.at[slot, pl.ds(line(r, j), 1)], barrier)
    return carry
  lax.fori_loop(0, R // parts, row, None)


def layout_kernel():
  """kv [S, D], idx [R] -> kv[idx] [R, D], read back through the tiled view."""
  def kernel(kv_ref, idx_ref, o_ref, buf, idx_smem, ready, idx_ready):
    flat, tiled = buf
    plgpu.copy_gmem_to_smem(idx_ref, idx_smem, idx_ready)
    plgpu.barrier_wait(idx_ready)
    gather(kv_ref, idx_smem, 0, flat, 0, ready)
    plgpu.barrier_wait(ready)
    plgpu.copy_smem_to_gmem(tiled.at[0], o_ref)
    plgpu.wait_smem_to_gmem(0)
  return plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((R, D), jnp.bfloat16),
                      scratch_types=[ring(1), plgpu.SMEM((R,), jnp.int32),
                                     plgpu.Barrier(num_arrivals=R * C), plgpu.Barrier()],
                      compiler_params=NO_AUTO_BARRIERS, kernel_name="probe_gather_layout")


def rate_kernel(ctas: int, steps: int, stages: int = 2, mma: bool = True, producers: int = 1):
  """One CTA = one query's steps x R rows: `producers` warpgroups gather into a ring (each a share
  of every step's rows), the consumer
  runs S^T = Q K^T (64 x R x D) a step -> [ctas, 64] row sums of the S^T over all steps."""
  def kernel(kv_ref, idx_ref, q_ref, o_ref, buf, q_smem, idx_smem, ready, free, idx_ready, q_ready, out):
    flat, tiled = buf
    cta, wg = lax.axis_index("c"), lax.axis_index("wg")

    @pl.when(wg == 0)
    def _consumer():
      plgpu.copy_gmem_to_smem(q_ref, q_smem, q_ready)
      plgpu.barrier_wait(q_ready)

      def step(i, total):
        slot = lax.rem(i, stages)
        plgpu.barrier_wait(ready.at[slot])
        if mma:
          def qk(acc):
            plgpu.wgmma(acc, q_smem, tiled.at[slot].transpose((1, 0)))
            return acc[...]
          total = total + pl.run_scoped(qk, plgpu.ACC((64, R), jnp.float32))
        plgpu.barrier_arrive(free.at[slot])
        return total
      total = lax.fori_loop(0, steps, step, jnp.zeros((64, R), jnp.float32) if mma else jnp.float32(0))
      if mma:   # (without the wgmma the output stays unwritten)
        out[...] = total.sum(axis=1)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out, o_ref.at[cta])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg >= 1)
    def _producer():
      part = wg - 1

      @pl.when(part == 0)
      def _():
        for c in range(steps * R // 256):   # a TMA box spans <= 256 elements a dimension
          plgpu.copy_gmem_to_smem(idx_ref.at[cta, pl.ds(256 * c, 256)], idx_smem.at[pl.ds(256 * c, 256)],
                                  idx_ready)
      plgpu.barrier_wait(idx_ready)
      for i in range(stages):
        gather(kv_ref, idx_smem, i * R, flat, i, ready.at[i], part, producers)

      def step(i, carry):
        slot = lax.rem(i, stages)
        plgpu.barrier_wait(free.at[slot])
        gather(kv_ref, idx_smem, i * R, flat, slot, ready.at[slot], part, producers)
        return carry
      lax.fori_loop(stages, steps, step, None)

  return plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((ctas, 64), jnp.float32),
                      scratch_types=[ring(stages), plgpu.SMEM((64, D), jnp.bfloat16, transforms=TILED),
                                     plgpu.SMEM((steps * R,), jnp.int32),
                                     plgpu.Barrier(num_arrivals=R * C, num_barriers=stages),
                                     plgpu.Barrier(num_barriers=stages),
                                     plgpu.Barrier(num_arrivals=steps * R // 256), plgpu.Barrier(),
                                     plgpu.SMEM((64,), jnp.float32)],
                      grid=(ctas,), grid_names=("c",), num_threads=1 + producers, thread_name="wg",
                      compiler_params=NO_AUTO_BARRIERS, kernel_name="probe_gather_rate")


def lower_for_cuda(ctas=4, steps=4, kv_len=1000):
  """Lowers both kernels for CUDA (runs on a CPU-only machine) -> lengths of the lowered modules."""
  kv = jax.ShapeDtypeStruct((kv_len, D), jnp.bfloat16)
  low = lambda f, *a: len(jax.jit(f).trace(*a).lower(lowering_platforms=("cuda",)).as_text())
  return (low(layout_kernel(), kv, jax.ShapeDtypeStruct((R,), jnp.int32)),
          low(rate_kernel(ctas, steps, producers=2), kv, jax.ShapeDtypeStruct((ctas, steps * R), jnp.int32),
              jax.ShapeDtypeStruct((64, D), jnp.bfloat16)))


def main():
  if "--lower" in sys.argv:
    print("lowered module sizes:", lower_for_cuda())
    return
  kv = jax.random.normal(jax.random.key(0), (131072, D), jnp.bfloat16)
  idx = jax.random.randint(jax.random.key(1), (R,), 0, kv.shape[0], jnp.int32)
  got = layout_kernel()(kv, idx)
  print("layout: gathered rows == kv[idx]:", bool(jnp.array_equal(got, kv[idx])), flush=True)
  q = jax.random.normal(jax.random.key(2), (64, D), jnp.bfloat16)
  steps = 16
  for ctas, mma, producers in ((132 * 8, False, 1), (132 * 32, False, 1), (132 * 32, True, 1),
                               (132 * 32, False, 2), (132 * 32, True, 2)):
    idx = jax.random.randint(jax.random.key(ctas), (ctas, steps * R), 0, kv.shape[0], jnp.int32)
    f = jax.jit(rate_kernel(ctas, steps, mma=mma, producers=producers))
    out = jax.block_until_ready(f(kv, idx, q))
    if mma:
      ref = (q.astype(jnp.float32) @ kv[idx[0]].astype(jnp.float32).T).sum(axis=1)
      print(f"  wgmma over the tiled view: rel err {float(jnp.linalg.norm(out[0] - ref) / jnp.linalg.norm(ref)):.1e}")
    times = []
    for _ in range(5):
      t0 = time.perf_counter()
      jax.block_until_ready(f(kv, idx, q))
      times.append(time.perf_counter() - t0)
    t, rows = sorted(times)[2], ctas * steps * R
    print(f"rate, {ctas} CTAs, {producers} producer warpgroup(s), wgmma consumer {mma}: {t * 1e3:.3f} ms, {rows / t / 1e9:.2f} G rows/s "
          f"({rows * D * 2 / t / 1e12:.2f} TB/s)", flush=True)


if __name__ == "__main__":
  main()
