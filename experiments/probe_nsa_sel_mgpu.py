r"""Probe: NSA's selected-block attention forward as a Pallas Mosaic GPU kernel (Hopper, sm_90).

Not the shipped path: on the benchmark's inputs it is slower than the Triton kernel
(`pallas_kernels.nsa._sel_fwd`), for the reason measured below; kept as a working,
warp-specialized gather-attention starting point (correct on the GPU to bf16 rounding).

  python -m experiments.probe_nsa_sel_mgpu                    # H100/H200: check + timings
  python -m experiments.probe_nsa_sel_mgpu --lower            # any machine: lower for CUDA only

Contract (as `nsa._sel_fwd` had up to session 13; it now reads q as [B, L, H, D]): q_rows [B·H_kv, L·Gp, D] (a group's heads as Gp rows a
position), k [B, L, H_kv, D], v [B, L, H_kv, Dv], idx [B·H_kv, L, n] (selection-block indices,
-1 = empty) -> o [B·H_kv, L·Gp, Dv] (q's dtype) and LSE2 [B·H_kv, L·Gp] f32 (log2 domain, +inf
for a row that saw no key).

Design: a producer warpgroup per consumer streams the (position, block) sequence of K and V
tiles through a TMA ring, so loads run ahead of the math; two consumer warpgroups a CTA issue
wgmma straight from shared memory. wgmma's M is 64 rows, more than one position's Gp = 16
heads: a consumer loads the 64 query rows starting at its position (its heads and the next
positions', which cost MMA work but nothing else) and keeps only its Gp rows' outputs. Empty
slots (-1) load block 0 and mask every key. Counts (per 64-key block): S = Q K^T 64 x 64 x 128
and O += P V 64 x 128 x 64, 2.1 MFLOP (1/4 useful at Gp = 16) = 512 clock cycles of an SM at
bf16 peak; at L = 16k, 4 groups, n = 16: 1.05 M blocks, ~1.7 ms at peak over 132 SMs. Bytes:
every block is 32 KB of K and V read by TMA from L2 (which bypasses L1): 34 GB at 16k.

Measured (H200, 2026-12-02, jax 0.11.2; results/bench_nsa/sel_mgpu_*s13*.log): equal to the
Triton kernel to bf16 rounding (o 4e-3, LSE2 2e-6) at L = 256-4096; 5.67 ms at 16k and 25.7 ms at
64k against Triton's 4.3-4.8 and 18.6-19.5. Shorter consumer chains
(indices in shared memory, QK of the next block overlapped with this one's softmax, ping-pong)
did not help; with the softmax left out (timing only) it streams the 34 GB at 16k in 4.39 ms,
Triton's time, whose cp.async reads hit L1 for a position's forced blocks: a TMA kernel has to
read fewer bytes to win. pallas_kernels/NOTES_nsa.md, session 13.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

_ROWS = 64            # wgmma M: query rows a consumer warpgroup
_NEG = -1e30
_LOG2E = math.log2(math.e)
_SMEM_LIMIT = 227 * 1024 - 8 * 1024
_PRODUCER_REGISTERS = 40
# An SM's 64K registers, as a sum of per-thread counts over warpgroups of 128 threads: the
# counts that warpgroups raise and lower to with setmaxnreg must fit in it, or the raise waits
# forever (the first version asked 2 x 232 + 2 x 40 = 544 and hung).
_REGISTER_SUM = 65536 // 128


@dataclasses.dataclass(frozen=True)
class Config:
  """Launch and schedule choices (hashable).

  consumers: compute warpgroups a CTA, each with its own producer warpgroup and K/V ring.
  positions: consecutive positions a consumer handles.
  num_stages: K/V blocks in each ring.
  idx_in_smem: the producer first copies its consumer's [positions, n] block indices to shared
    memory (one TMA), so no step waits on a global load of its index.
  approx_math: Mosaic's approximate exp2 / log2 / division (ex2.approx; exact exp2 cost 2 ms of
    7.7 at 16k).
  pingpong: (2 consumers, unpipelined) they meet after each QK wgmma issue, so one's softmax
    runs under the other's MMAs (flash_mgpu's schedule).
  pipeline: block n's QK wgmma is issued with block n-1's PV wgmma, and n's softmax runs while
    that PV finishes (FA3's intra-warpgroup overlap).
  skip: timing-only variants that leave out part of each step ("softmax": P = S cast, no
    max / exp2 / sums; "pv": no P V wgmma), to see where a step's time goes (wrong outputs).
  """
  consumers: int = 2
  positions: int = 16
  num_stages: int = 2
  idx_in_smem: bool = False
  approx_math: bool = True
  pingpong: bool = False
  pipeline: bool = False
  skip: str = ""

  @property
  def consumer_registers(self) -> int:
    """Registers a consumer thread raises to: what the producers leave, in steps of 8, <= 232."""
    spare = (_REGISTER_SUM - self.consumers * _PRODUCER_REGISTERS) // self.consumers
    return min(232, spare // 8 * 8)

  def smem_bytes(self, dim: int, dim_v: int, block: int, itemsize: int, num_selected: int) -> int:
    q = 2 * _ROWS * dim * itemsize                       # double-buffered q (then its output)
    kv = self.num_stages * block * (dim + dim_v) * itemsize
    lse, idx = 2 * _ROWS * 4, self.positions * num_selected * 4
    return self.consumers * (q + kv + lse + idx)


def unsupported(q_rows, k, v, gp: int, select_block: int, config: Config | None = None,
                num_selected: int = 16) -> str | None:
  """None if the kernel takes these operands, else why not."""
  dim, dim_v = q_rows.shape[-1], v.shape[-1]
  if q_rows.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q_rows.dtype or v.dtype != q_rows.dtype:
    return f"dtypes q {q_rows.dtype}, k {k.dtype}, v {v.dtype} (bf16 or f16, all the same)"
  if dim != dim_v or dim % 64 or dim > 256:
    return f"head dims q.k {dim}, v {dim_v} (equal: the q buffer takes the output; multiples of 64, <= 256)"
  if select_block != 64:
    return f"select_block {select_block} (64 only)"
  if gp < 8 or gp > _ROWS:
    return f"group padded to {gp} rows (8 to 64)"
  cfg = config or Config()
  if cfg.pingpong and (cfg.consumers != 2 or cfg.pipeline):
    return f"{cfg}: pingpong takes 2 consumers and the unpipelined loop"
  if cfg.consumer_registers < 160:   # the 64 x Dv accumulator alone is 64 registers a thread at Dv = 128
    return f"{cfg}: {cfg.consumers} consumers leave {cfg.consumer_registers} registers a thread"
  if cfg.skip not in ("", "softmax", "pv"):
    return f"skip={cfg.skip!r} ('', 'softmax' or 'pv')"
  need = cfg.smem_bytes(dim, dim_v, select_block, q_rows.dtype.itemsize, num_selected)
  if need > _SMEM_LIMIT:
    return f"{cfg} needs {need} B of shared memory"
  return None


def _kernel(q_ref, k_ref, v_ref, idx_ref, o_ref, lse_ref, q_smem, k_smem, v_smem, lse_smem,
            idx_smem, q_ready, k_ready, v_ready, k_free, v_free, idx_ready, turn, *, length: int, gp: int, num_selected: int,
            scale: float, cfg: Config):
  """q_ref [BH, L·Gp, D], k_ref [BH, Lp, D], v_ref [BH, Lp, Dv] (Lp: whole blocks),
  idx_ref [BH, L, n]; o_ref [BH, L·Gp, Dv], lse_ref [BH, L·Gp]."""
  cons, per, stages, n_sel = cfg.consumers, cfg.positions, cfg.num_stages, num_selected
  block = k_smem.shape[2]
  bh, tile, wg = lax.axis_index("bh"), lax.axis_index("tiles"), lax.axis_index("wg")
  steps = per * n_sel

  def position(c, i):
    """Position i of consumer c, clamped into [0, L) (later ones compute but store nothing)."""
    return jnp.minimum((tile * cons + c) * per + i, length - 1)

  def block_of(c, step):
    """-> (the step's block index, >= 0, and whether the slot holds a block)."""
    t = position(c, lax.div(step, jnp.int32(n_sel)))
    if cfg.idx_in_smem:
      blk = idx_smem[c, lax.div(step, jnp.int32(n_sel)), lax.rem(step, jnp.int32(n_sel))]
    else:
      blk = idx_ref[bh, t, lax.rem(step, jnp.int32(n_sel))]
    return jnp.maximum(blk, 0), blk >= 0

  def take_turn():   # the two consumers meet here; consumer 1 runs one meeting behind
    plgpu.barrier_arrive(turn)
    plgpu.barrier_wait(turn)

  @pl.when(wg < cons)
  def _consumer():
    c = wg
    plgpu.set_max_registers(cfg.consumer_registers, action="increase")
    if cfg.pingpong:
      pl.when(c == 1)(take_turn)
    if cfg.idx_in_smem:
      plgpu.barrier_wait(idx_ready.at[c])

    def load_q(i, buf):
      t = position(c, i)
      plgpu.copy_gmem_to_smem(q_ref.at[bh, pl.ds(t * gp, _ROWS)], q_smem.at[c, buf],
                              q_ready.at[2 * c + buf])

    load_q(0, 0)

    def one_position(i, _):
      t_raw = (tile * cons + c) * per + i
      t = position(c, i)
      buf = lax.rem(i, jnp.int32(2))
      plgpu.barrier_wait(q_ready.at[2 * c + buf])

      @pl.when(i + 1 < per)
      def _prefetch():   # the other buffer's last output must have left before it is refilled
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        load_q(i + 1, 1 - buf)

      def online_softmax(s, m, l, blk, present):
        """S [64, l'] f32 of block blk -> (P in v's dtype, the new row max, the new row sum,
        alpha: the factor that rescales what was summed before); keys after t or of an empty
        slot are masked."""
        key = blk * block + plgpu.broadcasted_iota(jnp.int32, (_ROWS, block), 1, layout=plgpu.Layout.WGMMA)
        visible = (key <= t) & present
        s = jnp.where(visible, s * (scale * _LOG2E), _NEG)
        m_new = jnp.maximum(m, s.max(axis=1))
        p = jnp.where(visible, jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0])), 0.0)
        alpha = jnp.exp2(m - m_new)
        return p.astype(v_smem.dtype), m_new, l * alpha + p.sum(axis=1), alpha

      def one_block(n, carry):
        acc, m, l = carry
        step = i * n_sel + n
        slot = lax.rem(step, jnp.int32(stages))
        blk, present = block_of(c, step)
        plgpu.barrier_wait(k_ready.at[c * stages + slot])

        def qk(acc_ref):
          plgpu.wgmma(acc_ref, q_smem.at[c, buf], k_smem.at[c, slot].transpose((1, 0)))
          if cfg.pingpong:
            take_turn()
          return acc_ref[...]
        s = pl.run_scoped(qk, plgpu.ACC((_ROWS, block), jnp.float32))
        plgpu.barrier_arrive(k_free.at[c * stages + slot])
        if cfg.skip == "softmax":   # timing only
          p, m_new = s.astype(v_smem.dtype), m
        else:
          p, m_new, l, alpha = online_softmax(s, m, l, blk, present)
          acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        plgpu.barrier_wait(v_ready.at[c * stages + slot])

        def pv(acc_ref):
          plgpu.wgmma(acc_ref, p, v_smem.at[c, slot])
        if cfg.skip != "pv":
          acc = pl.run_state(pv)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(v_free.at[c * stages + slot])
        return acc, m_new, l

      def pipelined_blocks(init):
        """The same blocks, with block n's QK wgmma and block n-1's PV wgmma in flight together
        and n's softmax running while the PV finishes (FA3's intra-warpgroup overlap)."""
        _, m0, l0 = init
        slot_of = lambda n: lax.rem(i * n_sel + n, jnp.int32(stages))

        def softmax(n, s, m, l):
          return online_softmax(s, m, l, *block_of(c, i * n_sel + n))

        def scope(o_acc):
          def first(s_ref):
            plgpu.barrier_wait(k_ready.at[c * stages + slot_of(0)])
            plgpu.wgmma(s_ref, q_smem.at[c, buf], k_smem.at[c, slot_of(0)].transpose((1, 0)))
            return plgpu.wgmma_accumulator_load(s_ref, wait_n=0)
          s0 = pl.run_scoped(first, plgpu.ACC((_ROWS, block), jnp.float32))
          plgpu.barrier_arrive(k_free.at[c * stages + slot_of(0)])
          p, m, l, _ = softmax(0, s0, m0, l0)

          def step(n, carry):
            p_prev, m, l = carry
            slot, prev = slot_of(n), slot_of(n - 1)

            def qk_then_pv(s_ref):
              plgpu.barrier_wait(k_ready.at[c * stages + slot])
              plgpu.wgmma(s_ref, q_smem.at[c, buf], k_smem.at[c, slot].transpose((1, 0)))
              plgpu.barrier_wait(v_ready.at[c * stages + prev])
              plgpu.wgmma(o_acc, p_prev, v_smem.at[c, prev])
              return plgpu.wgmma_accumulator_load(s_ref, wait_n=1)   # QK done, PV may run on
            s = pl.run_scoped(qk_then_pv, plgpu.ACC((_ROWS, block), jnp.float32))
            plgpu.barrier_arrive(k_free.at[c * stages + slot])
            p, m, l, alpha = softmax(n, s, m, l)
            o = plgpu.wgmma_accumulator_load(o_acc, wait_n=0)
            plgpu.barrier_arrive(v_free.at[c * stages + prev])
            o_acc[...] = o * lax.broadcast_in_dim(alpha, o.shape, [0])
            return p, m, l

          p, m, l = lax.fori_loop(1, n_sel, step, (p, m, l))
          last = slot_of(n_sel - 1)
          plgpu.barrier_wait(v_ready.at[c * stages + last])
          plgpu.wgmma(o_acc, p, v_smem.at[c, last])
          o = plgpu.wgmma_accumulator_load(o_acc, wait_n=0)
          plgpu.barrier_arrive(v_free.at[c * stages + last])
          return o, m, l
        return pl.run_scoped(scope, plgpu.ACC((_ROWS, v_smem.shape[-1]), jnp.float32))

      dim_v = v_smem.shape[-1]
      init = (plgpu.layout_cast(jnp.zeros((_ROWS, dim_v), jnp.float32), plgpu.Layout.WGMMA),
              plgpu.layout_cast(jnp.full((_ROWS,), _NEG, jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
              plgpu.layout_cast(jnp.zeros((_ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1)))
      if cfg.pipeline:
        acc, m, l = pipelined_blocks(init)
      else:
        acc, m, l = lax.fori_loop(0, n_sel, one_block, init)
      seen = l > 0
      out = acc / lax.broadcast_in_dim(jnp.where(seen, l, 1.0), acc.shape, [0])
      o_tile = q_smem.at[c, buf]   # the output goes out through q's buffer: its wgmmas are done
      o_tile[...] = out.astype(o_tile.dtype)
      lse_smem.at[c, buf][...] = jnp.where(seen, m + jnp.log2(jnp.where(seen, l, 1.0)), jnp.inf)
      plgpu.commit_smem()

      @pl.when(t_raw < length)
      def _store():
        plgpu.copy_smem_to_gmem(o_tile.at[pl.ds(0, gp)], o_ref.at[bh, pl.ds(t * gp, gp)])
        plgpu.copy_smem_to_gmem(lse_smem.at[c, buf, pl.ds(0, gp)], lse_ref.at[bh, pl.ds(t * gp, gp)])
      return None

    lax.fori_loop(0, per, one_position, None)
    if cfg.pingpong:
      pl.when(c == 0)(take_turn)
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg >= cons)
  def _producer():
    c = wg - cons
    plgpu.set_max_registers(_PRODUCER_REGISTERS, action="decrease")
    if cfg.idx_in_smem:   # this consumer's [positions, n] indices, once
      plgpu.copy_gmem_to_smem(idx_ref.at[bh, pl.ds((tile * cons + c) * per, per)], idx_smem.at[c],
                              idx_ready.at[c])
      plgpu.barrier_wait(idx_ready.at[c])

    def load(step, slot, wait: bool):
      """K then V of the step's block into the slot; with `wait`, each after the consumer freed
      the slot's previous K (after its QK) or V (after its PV), so K runs ahead of V."""
      blk, _ = block_of(c, step)
      rows = pl.ds(blk * block, block)
      for ref, smem, ready, free in ((k_ref, k_smem, k_ready, k_free), (v_ref, v_smem, v_ready, v_free)):
        if wait:
          plgpu.barrier_wait(free.at[c * stages + slot])
        plgpu.copy_gmem_to_smem(ref.at[bh, rows], smem.at[c, slot], ready.at[c * stages + slot])

    for s in range(min(stages, steps)):   # fill the ring
      load(jnp.int32(s), s, wait=False)

    def refill(step, _):
      load(step, lax.rem(step, jnp.int32(stages)), wait=True)
      return None
    lax.fori_loop(stages, steps, refill, None)


def selected_forward(q_rows, k, v, idx, *, length: int, gp: int, select_block: int, scale: float,
                     config: Config | None = None):
  """-> (o [BH, L·Gp, Dv] q.dtype, LSE2 [BH, L·Gp] f32); shapes as `nsa._sel_fwd`."""
  cfg = config or Config()
  why = unsupported(q_rows, k, v, gp, select_block, cfg, idx.shape[-1])
  if why:
    raise ValueError(f"probe_nsa_sel_mgpu cannot run this case: {why}")
  batch, _, kv_heads, dim = k.shape
  dim_v = v.shape[-1]
  bh, rows = q_rows.shape[0], q_rows.shape[1]
  n_sel = idx.shape[-1]
  padded = -(-length // select_block) * select_block
  to_heads = lambda x: jnp.pad(x.transpose(0, 2, 1, 3).reshape(batch * kv_heads, length, x.shape[-1]),
                               ((0, 0), (0, padded - length), (0, 0)))
  per_cta = cfg.consumers * cfg.positions
  tiles = -(-length // per_cta)
  tiled = (plgpu.TilingTransform((8, 128 // q_rows.dtype.itemsize)), plgpu.SwizzleTransform(128))
  scratch = [
      plgpu.SMEM((cfg.consumers, 2, _ROWS, dim), q_rows.dtype, transforms=tiled),
      plgpu.SMEM((cfg.consumers, cfg.num_stages, select_block, dim), k.dtype, transforms=tiled),
      plgpu.SMEM((cfg.consumers, cfg.num_stages, select_block, dim_v), v.dtype, transforms=tiled),
      plgpu.SMEM((cfg.consumers, 2, _ROWS), jnp.float32),
      plgpu.SMEM((cfg.consumers, cfg.positions, n_sel), jnp.int32),      # block indices
      plgpu.Barrier(num_barriers=2 * cfg.consumers),                     # q_ready
      plgpu.Barrier(num_barriers=cfg.consumers * cfg.num_stages),        # k_ready
      plgpu.Barrier(num_barriers=cfg.consumers * cfg.num_stages),        # v_ready
      plgpu.Barrier(num_barriers=cfg.consumers * cfg.num_stages),        # k_free
      plgpu.Barrier(num_barriers=cfg.consumers * cfg.num_stages),        # v_free
      plgpu.Barrier(num_barriers=cfg.consumers),                         # idx_ready
      plgpu.Barrier(num_arrivals=cfg.consumers),                         # turn (pingpong)
  ]
  kernel = functools.partial(_kernel, length=length, gp=gp, num_selected=n_sel, scale=float(scale), cfg=cfg)
  return plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((bh, rows, dim_v), q_rows.dtype),
                jax.ShapeDtypeStruct((bh, rows), jnp.float32)),
      scratch_types=scratch, grid=(tiles, bh), grid_names=("tiles", "bh"),
      num_threads=2 * cfg.consumers, thread_name="wg",
      # approx_math: exp2 as one ex2.approx (without it, 3.2 of 7.7 ms at 16k went to the softmax)
      compiler_params=plgpu.CompilerParams(unsafe_no_auto_barriers=True, approx_math=cfg.approx_math),
      kernel_name="lca_nsa_sel_mgpu",
  )(q_rows, to_heads(k), to_heads(v),
    jnp.pad(idx.astype(jnp.int32), ((0, 0), (0, tiles * per_cta - length), (0, 0)), constant_values=-1))


# ----------------------------------------------------------------------------- driver


def _call(geo, config: Config | None = None):
  """jitted (q_rows, k, v, idx) -> (o, LSE2) for an `nsa.NSAGeometry`."""
  return jax.jit(lambda q, k, v, idx: selected_forward(
      q, k, v, idx, length=geo.length, gp=geo.gp, select_block=geo.select_block, scale=geo.scale,
      config=config))


def lower_for_cuda(length: int = 1000, kv_heads: int = 4, gp: int = 16, dim: int = 128,
                   n: int = 16, config: Config | None = None) -> int:
  """Lowers the kernel for CUDA on any machine (tracing, layouts, barriers) -> module size."""
  shape = jax.ShapeDtypeStruct
  args = (shape((kv_heads, length * gp, dim), jnp.bfloat16), shape((1, length, kv_heads, dim), jnp.bfloat16),
          shape((1, length, kv_heads, dim), jnp.bfloat16), shape((kv_heads, length, n), jnp.int32))
  f = lambda q, k, v, idx: selected_forward(q, k, v, idx, length=length, gp=gp, select_block=64, scale=0.1,
                                            config=config)
  return len(jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text())


def main(argv):
  from absl import flags   # pylint: disable=g-import-not-at-top
  from experiments import bench_common, bench_nsa   # pylint: disable=g-import-not-at-top
  from pallas_kernels import nsa as kernels   # pylint: disable=g-import-not-at-top
  if "--lower" in argv:
    print(f"lowered for CUDA: {lower_for_cuda()} characters")
    return
  flags.FLAGS(argv[:1])   # bench_nsa's defaults: 64 heads in 4 groups, head dim 128, bf16
  print(jax.devices()[0].device_kind, jax.__version__, flush=True)
  triton = lambda geo: jax.jit(lambda *a: kernels._sel_fwd(*a, geo, kernels.Tuning(), False))  # pylint: disable=protected-access
  for length in (256, 1000, 4096):
    x = bench_nsa._kernel_inputs(length)   # pylint: disable=protected-access
    q_rows = kernels.to_rows(x["q"], x["geo"].group)   # this probe keeps the rows layout
    (o_t, l_t) = triton(x["geo"])(x["q"], x["k"], x["v"], x["idx"])
    o_t = kernels.to_rows(o_t, x["geo"].group)
    o_m, l_m = _call(x["geo"])(q_rows, x["k"], x["v"], x["idx"])
    finite = jnp.isfinite(l_t)
    print(f"L={length}: max |o - triton| {float(jnp.max(jnp.abs(o_m.astype(jnp.float32) - o_t))):.3g}, "
          f"max |LSE2 - triton| {float(jnp.max(jnp.where(finite, jnp.abs(l_m - l_t), 0.0))):.3g}, "
          f"empty rows agree {bool(jnp.all(jnp.isinf(l_m) == ~finite))}", flush=True)
  variants = (Config(), Config(approx_math=False), Config(idx_in_smem=True), Config(pipeline=True),
              Config(pingpong=True), Config(consumers=1, num_stages=4),
              Config(skip="softmax"), Config(skip="pv"))   # the last two: timing only
  for length in (16384, 65536):
    x = bench_nsa._kernel_inputs(length)   # pylint: disable=protected-access
    geo, idx = x["geo"], x["idx"]
    q_rows = kernels.to_rows(x["q"], geo.group)
    t = jnp.arange(length, dtype=jnp.int32)[None, :, None]
    # the same loop over blocks that stay in cache: every slot is block 0 or the position's own
    # block (for TMA, which bypasses L1, these still come from L2)
    for label, sel in (("selection", idx), ("every slot block 0", jnp.zeros_like(idx)),
                       ("every slot the own block", jnp.broadcast_to(t // 64, idx.shape))):
      args = (q_rows, x["k"], x["v"], sel)
      tt = bench_common.try_bench(f"{length} {label}: triton", triton(geo), x["q"], *args[1:], reps=10)
      for cfg in variants if label == "selection" else variants[:1]:
        tm = bench_common.try_bench(f"{length} {label}: mosaic {cfg}", _call(geo, cfg), *args, reps=10)
        if tt and tm:
          print(f"    mosaic / triton time {tm / tt:.2f}", flush=True)

if __name__ == "__main__":
  import sys   # pylint: disable=g-import-not-at-top
  main(sys.argv)
