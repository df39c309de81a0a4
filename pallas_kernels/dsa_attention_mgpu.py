"""DSA sparse attention forward for Hopper in Pallas Mosaic GPU: MLA's absorbed prefill (wgmma).

  supported(q, k, k_rope, indices, *, scale, interpret) -> None | reason
  forward(q, k, k_rope, indices, *, scale) -> (out [B, L, H, 512], lse [B, L, H] natural log)

`dsa_attention.sparse_attention` calls this forward on an sm_90 GPU for DeepSeek-V3.2's
prefill shape (k = v = the 512-dim latent, a 64-dim RoPE key, H a multiple of 64, bf16);
its backward stays the Triton kernels of dsa_attention.py, which read the (out, lse)
written here as they read the Triton forward's. The Triton forward (dsa_attention.py) is
the path for everything else and for CPU / interpret mode.

  out[t, h] = sum_n softmax_n(scale * [q_lat ; q_rope][t, h] . [c ; r][idx[t, n]]) c[idx[t, n]]

Why a second forward. The Triton one gives 32 heads to a program (64 heads' fp32
accumulator, 64 x 512, does not fit one warpgroup's registers), so its MMAs are mma.sync
with M = 32 and its 2 CTAs of 4 warps an SM cannot hide the gather -> MMA -> softmax chain
(ncu, NOTES_dsa.md session 23: 255 registers, 12.5% occupancy, ~250 TFLOP/s at 128k).
Here (the schedule of FlashMLA's sm90 sparse prefill kernel, deepseek-ai/FlashMLA, written anew
for Pallas) one CTA owns one query and 64 heads, and three warpgroups split the work:

- the producer gathers each block of 64 selected rows (latent 1024 B + RoPE 128 B a row)
  with per-thread 16-B `cp.async` copies (inline Mosaic GPU code: Pallas's own copies are
  TMA on sm_90, whose per-box rate caps a row gather, session 12), straight into the
  (8, 64)-tiled, 128-B-swizzled layout wgmma reads; two blocks (an even and an odd one) a
  round, into two slots;
- consumer c (0 or 1) computes S = Q K^T for block 2i + c (M = 64 heads, N = 64 rows,
  K = 576: full-size wgmmas, Q from shared memory), the two exchange their row maxima
  through shared memory (so both rescale by the same max), each writes its P (bf16) into
  its block's RoPE tile (no longer needed once S is computed), and each then accumulates
  P_0 V_0 + P_1 V_1 into its own half of the value dims (acc [64, 256] fp32 = 128
  registers a thread: P from registers for its own block, from shared memory for the
  other's).

Counts (128k prefill, 128 heads, top-k 2048): 131072 x 2048 x 128 x (576 + 512) x 2 =
7.5e13 FLOP; 75 ms at the H100's dense bf16 peak. Each CTA gathers its query's rows once
for 64 heads (2.36 MB; the two head halves of a query run side by side, so the second
reads L2): 0.62 TB from L2 at 128k. Shared memory: Q 72 KB + 2 slots x 72 KB + 1 KB, so one
CTA an SM, and the next round's gathers start only once both consumers are done with the
slots (their latency is exposed once a round). Measured (H200, session 24, 2 rounds in turn
with the Triton forward; NOTES_dsa.md): 128k 169 vs 298 ms (~440 TFLOP/s, 45% of the bf16
peak), 32k 42 vs 75, 16k 21.6 vs 39.5; out within bf16 rounding of plain jnp.

Invalid indices (-1) gather row 0 and are masked to -inf in S; a query with no valid index
gets out = 0 and lse = -inf (as the Triton forward).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.mosaic.gpu import utils as mu
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith
from jaxlib.mlir.dialects import llvm
from jaxlib.mlir.dialects import nvvm

from pallas_kernels import hopper_unavailable

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
_INIT_MAX = -1e30    # finite start for the running max: no inf - inf for a masked block
LATENT, ROPE = 512, 64
HEADS = 64           # heads a CTA (wgmma's M)
ROWS = 64            # gathered rows a block (S's N)
HALF = LATENT // 2   # value dims a consumer
_TILED = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


@dataclasses.dataclass(frozen=True)
class Config:
  """prefetch_ids: the producer asks L1 for a round's 128 indices before it waits for the
  consumers to free the slots (else their load, from L2, starts only after the wait).
  profile_space, profile_dir (timing only): Mosaic's on-device profiler records each named
  region (a consumer's "ready", "qk", "max", "softmax", "meet", "pv"; the producer's "free",
  "gather", "land") of every warpgroup, up to profile_space regions a warpgroup, as a trace in
  profile_dir (`experiments/probe_dsa_sparse_mgpu.py --profile`)."""
  prefetch_ids: bool = True
  profile_space: int = 0
  profile_dir: str = ""


def supported(q, k, k_rope, indices, *, scale: float, interpret: bool) -> str | None:
  """None when this forward runs the case, else why not (the shapes first, then the machine)."""
  del indices
  if k_rope is None:
    return "no RoPE key (the Mosaic forward is MLA's 512 + 64 key only)"
  if q.dtype != jnp.bfloat16 or k.dtype != jnp.bfloat16 or k_rope.dtype != jnp.bfloat16:
    return f"dtypes q {q.dtype}, k {k.dtype}, k_rope {k_rope.dtype} (bf16 only)"
  if k.shape[2] != 1 or k.shape[3] != LATENT or k_rope.shape[3] != ROPE:
    return f"k {k.shape}, k_rope {k_rope.shape} (one KV head of {LATENT} + {ROPE} dims only)"
  if q.shape[2] % HEADS:
    return f"{q.shape[2]} query heads (a multiple of {HEADS} only)"
  if not scale > 0:
    return f"scale {scale} (must be > 0)"
  return hopper_unavailable(interpret)


def _global_ptr(ref):
  """A GMEM memref's base (its offset included) as an LLVM global pointer (address space 1)."""
  return llvm.addrspacecast(llvm.PointerType.get(address_space=1), mu.memref_ptr(ref))


def _thread_in_warpgroup():
  """This thread's index in its warpgroup, 0..127 (i32)."""
  return arith.remui(mu.thread_idx(), mu.c(128, ir.IntegerType.get_signless(32)))


def _gather_block(ctx, k_rows, kr_rows, ids, lat, rope, *, slot: int):
  """Producer warpgroup, inline Mosaic GPU: cp.async rows k[ids[n]] (latent) and kr[ids[n]]
  (RoPE), n < 64, into slot `slot` of lat [2, 2, 64, 256] and rope [2, 64, 64] ((8, 64)-tiled,
  128-B swizzled), then commits them as one cp.async group. Warp w copies rows 16w..16w+15;
  a row's latent is 64 chunks of 16 B (lane l: chunk l of each half), its RoPE part 8 (4 rows
  an instruction). ids < 0 gather row 0 (the consumers mask them)."""
  del ctx

  i8, i32, i64 = (ir.IntegerType.get_signless(n) for n in (8, 32, 64))
  c32 = lambda v: mu.c(v, i32)
  c64 = lambda v: mu.c(v, i64)
  gep = lambda ptr, off: mu.getelementptr(ptr, [off], i8)
  k_base, kr_base, ids_base = _global_ptr(k_rows), _global_ptr(kr_rows), _global_ptr(ids)
  lat_base, rope_base = mu.memref_ptr(lat), mu.memref_ptr(rope)
  tid = _thread_in_warpgroup()
  warp = arith.shrui(tid, c32(5))
  lane = arith.andi(tid, c32(31))
  # Lanes 0..15 of warp w hold ids[16w + lane] (lanes 16..31 a copy).
  my_row = arith.addi(arith.muli(warp, c32(16)), arith.andi(lane, c32(15)))
  my_id = llvm.load(i32, gep(ids_base, arith.extui(i64, arith.muli(my_row, c32(4)))))
  my_id = arith.maxsi(my_id, c32(0))
  full = c32(0xFFFFFFFF)
  shfl = lambda v, src: nvvm.shfl_sync(full, v, src, c32(0x1F), nvvm.ShflKind.idx)

  def swizzled(row_tile, col_tile, col_tiles, r8, chunk):
    """Byte offset of 16-B chunk `chunk` (of 8 a 128-B line) of row 8 row_tile + r8 (r8 static)
    in column tile col_tile of an (8, 64)-tiled, 128-B-swizzled bf16 buffer col_tiles tiles
    wide: tile (row_tile, col_tile) * 1024 + r8 * 128 + (chunk ^ r8) * 16."""
    tile = arith.addi(arith.muli(row_tile, c32(col_tiles)), col_tile)
    return arith.addi(arith.muli(tile, c32(1024)),
                      arith.addi(c32(r8 * 128), arith.muli(arith.xori(chunk, c32(r8)), c32(16))))

  lane_chunk = arith.andi(lane, c32(7))      # 16-B chunk within a 128-B line
  lane_tile = arith.shrui(lane, c32(3))      # column tile (of 64 dims) within a half: 0..3
  lane_bytes = arith.extui(i64, arith.muli(lane, c32(16)))
  for r in range(16):
    row = arith.addi(arith.muli(warp, c32(16)), c32(r))   # row within the block
    row_tile = arith.shrui(row, c32(3))
    src_id = arith.extui(i64, shfl(my_id, c32(r)))
    src = gep(k_base, arith.addi(arith.muli(src_id, c64(LATENT * 2)), lane_bytes))
    for half in range(2):
      dst = arith.addi(c32((slot * 2 + half) * ROWS * HALF * 2),
                       swizzled(row_tile, lane_tile, HALF // 64, r % 8, lane_chunk))
      nvvm.cp_async_shared_global(gep(lat_base, dst), gep(src, c64(half * HALF * 2)), 16,
                                  nvvm.LoadCacheModifierKind.CG)
  # RoPE: lane l copies chunk l % 8 of row 4q + l // 8 (rows of warp w: 16w..16w+15).
  for q4 in range(4):
    r_local = arith.addi(c32(4 * q4), lane_tile)          # 0..15, lane_tile = lane // 8
    row = arith.addi(arith.muli(warp, c32(16)), r_local)
    src_id = arith.extui(i64, shfl(my_id, r_local))
    src = gep(kr_base, arith.addi(arith.muli(src_id, c64(ROPE * 2)), arith.extui(i64, arith.muli(lane_chunk, c32(16)))))
    r8 = arith.andi(row, c32(7))
    line = arith.addi(arith.muli(row, c32(128)),
                      arith.muli(arith.xori(lane_chunk, r8), c32(16)))   # one column tile: row * 128
    dst = arith.addi(c32(slot * ROWS * ROPE * 2), line)
    nvvm.cp_async_shared_global(gep(rope_base, dst), src, 16, nvvm.LoadCacheModifierKind.CG)
  nvvm.cp_async_commit_group()


def _prefetch_ids(ctx, ids):
  """Producer, inline Mosaic GPU: thread i asks L1 for ids[i] (ids: a round's 128 indices)."""
  del ctx
  i8, i32, i64 = (ir.IntegerType.get_signless(n) for n in (8, 32, 64))
  offset = arith.extui(i64, arith.muli(_thread_in_warpgroup(), mu.c(4, i32)))
  addr = mu.getelementptr(_global_ptr(ids), [offset], i8)
  mu.inline_ptx("prefetch.global.L1 [$0];", addr, has_side_effects=True)


def _land(ctx, *, pending: int):
  """Producer: waits until at most `pending` cp.async groups of this thread are in flight, then
  makes the landed rows visible to wgmma (the async proxy) and syncs the warpgroup."""
  del ctx
  nvvm.cp_async_wait_group(pending)
  mu.commit_shared()


def _kernel(q_ref, k_ref, kr_ref, idx_ref, o_ref, lse_ref, q_lat, q_rope, lat, rope, xchg,
            lse_smem, q_ready, ready, free, meet, *, scale: float, rounds: int,
            head_blocks: int, cfg: Config):
  """One query t and 64 heads; warpgroups 0, 1 compute, 2 gathers."""
  cta = lax.axis_index("cta")   # (query, head block), a query's head blocks side by side
  t, hb = lax.div(cta, jnp.int32(head_blocks)), lax.rem(cta, jnp.int32(head_blocks))
  b = lax.axis_index("batch")
  wg = lax.axis_index("wg")
  c = scale * LOG2E
  heads = pl.ds(hb * HEADS, HEADS)

  def meet_other():   # both consumers arrive, then both wait
    plgpu.barrier_arrive(meet)
    plgpu.barrier_wait(meet)

  @pl.when(wg < 2)
  def _consumer():
    plgpu.set_max_registers(232, action="increase")
    own, other = wg, 1 - wg
    rows_layout = plgpu.Layout.WGMMA.reduce(1)
    m = plgpu.layout_cast(jnp.full((HEADS,), _INIT_MAX, jnp.float32), rows_layout)
    l = plgpu.layout_cast(jnp.zeros((HEADS,), jnp.float32), rows_layout)
    acc = plgpu.layout_cast(jnp.zeros((HEADS, HALF), jnp.float32), plgpu.Layout.WGMMA)
    plgpu.barrier_wait(q_ready)

    def round_(i, carry):
      acc, m, l = carry
      ids = plgpu.load(idx_ref.at[b, t, pl.ds((2 * i + own) * ROWS, ROWS)],
                       layout=plgpu.Layout.WGMMA.reduce(0), optimized=False)
      # The named scopes are the regions Mosaic's profiler records (Config.profile_space).
      with jax.named_scope("ready"):
        plgpu.barrier_wait(ready.at[own])

      def qk(s_ref):
        plgpu.wgmma(s_ref, q_lat.at[0], lat.at[own, 0].transpose((1, 0)))
        plgpu.wgmma(s_ref, q_lat.at[1], lat.at[own, 1].transpose((1, 0)))
        plgpu.wgmma(s_ref, q_rope, rope.at[own].transpose((1, 0)))
        return s_ref[...]
      with jax.named_scope("qk"):
        s = pl.run_scoped(qk, plgpu.ACC((HEADS, ROWS), jnp.float32))
      with jax.named_scope("max"):
        s = jnp.where(lax.broadcast_in_dim(ids, s.shape, [1]) >= 0, s, -jnp.inf)
        row_max = s.max(axis=1) * c
        xchg.at[own][...] = row_max
        meet_other()
      with jax.named_scope("softmax"):
        m_new = jnp.maximum(m, jnp.maximum(row_max, xchg.at[other][...]))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s * c - lax.broadcast_in_dim(m_new, s.shape, [0]))
        l = l * alpha + p.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        p16 = p.astype(jnp.bfloat16)
        rope.at[own][...] = p16          # this block's P, for the other consumer's half
        plgpu.commit_smem()
      with jax.named_scope("meet"):
        plgpu.barrier_wait(ready.at[other])
        meet_other()

      def pv(acc_ref):
        plgpu.wgmma(acc_ref, p16, lat.at[own, own])
        plgpu.wgmma(acc_ref, rope.at[other], lat.at[other, own])
      with jax.named_scope("pv"):
        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
      plgpu.barrier_arrive(free)
      return acc, m_new, l

    acc, m, l = lax.fori_loop(0, rounds, round_, (acc, m, l))
    xchg.at[own][...] = l
    meet_other()
    l = l + xchg.at[other][...]
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    out = acc * lax.broadcast_in_dim(1.0 / l_safe, acc.shape, [0])
    q_lat.at[own][...] = out.astype(jnp.bfloat16)    # every QK is done (the meeting above)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_lat.at[own], o_ref.at[b, t, heads, pl.ds(own * HALF, HALF)])

    @pl.when(own == 0)
    def _():
      lse_smem[...] = jnp.where(empty, -jnp.inf, (m + jnp.log2(l_safe)) * LN2)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, t, heads])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == 2)
  def _producer():
    plgpu.set_max_registers(40, action="decrease")
    for half in range(2):
      plgpu.copy_gmem_to_smem(q_ref.at[b, t, heads, pl.ds(half * HALF, HALF)], q_lat.at[half],
                              q_ready)
    plgpu.copy_gmem_to_smem(q_ref.at[b, t, heads, pl.ds(LATENT, ROPE)], q_rope, q_ready)
    gather = [plgpu.inline_mgpu(arg_types=(plgpu.RefType(),) * 3 + (plgpu.RefType(_TILED),) * 2)(
        functools.partial(_gather_block, slot=slot)) for slot in range(2)]
    land = [plgpu.inline_mgpu()(functools.partial(_land, pending=1 - slot)) for slot in range(2)]

    prefetch = plgpu.inline_mgpu(arg_types=(plgpu.RefType(),))(_prefetch_ids)

    def round_(i, carry):
      if cfg.prefetch_ids:
        prefetch(idx_ref.at[b, t, pl.ds(2 * i * ROWS, 2 * ROWS)])

      @pl.when(i > 0)
      def _():
        with jax.named_scope("free"):
          plgpu.barrier_wait(free)     # both consumers are done with the last round's slots
      with jax.named_scope("gather"):
        for slot in range(2):   # blocks 2i and 2i + 1, one cp.async group each
          gather[slot](k_ref.at[b, :, 0], kr_ref.at[b, :, 0],
                       idx_ref.at[b, t, pl.ds((2 * i + slot) * ROWS, ROWS)], lat, rope)
      with jax.named_scope("land"):
        for slot in range(2):   # block 2i's group landed (block 2i + 1's may be in flight), then all
          land[slot]()
          plgpu.barrier_arrive(ready.at[slot])
      return carry
    lax.fori_loop(0, rounds, round_, None)


def forward(q, k, k_rope, indices, *, scale: float, config: Config | None = None):
  """q [B, L, H, 576] bf16, k [B, S, 1, 512], k_rope [B, S, 1, 64], indices [B, L, K] int32
  (-1 none) -> (out [B, L, H, 512] bf16, lse [B, L, H] fp32, natural log; -inf for a query
  with no valid index). K is padded with -1 to a multiple of 128 here."""
  batch, q_len, num_heads, _ = q.shape
  kp = -(-indices.shape[-1] // (2 * ROWS)) * (2 * ROWS)
  idx = jnp.pad(indices.astype(jnp.int32), [(0, 0), (0, 0), (0, kp - indices.shape[-1])],
                constant_values=-1)
  smem = lambda *shape: plgpu.SMEM(shape, jnp.bfloat16, transforms=_TILED)
  scratch = [
      smem(2, HEADS, HALF),            # q_lat: Q's latent halves, then the output halves
      smem(HEADS, ROPE),               # q_rope
      smem(2, 2, ROWS, HALF),          # lat: [slot, half] gathered latent rows
      smem(2, ROWS, ROPE),             # rope: [slot] gathered RoPE rows, then that block's P
      plgpu.SMEM((2, HEADS), jnp.float32),   # xchg: row maxima / sums between consumers
      plgpu.SMEM((HEADS,), jnp.float32),     # lse
      plgpu.Barrier(num_arrivals=3),   # q_ready (three copies)
      plgpu.Barrier(num_barriers=2),   # ready[slot]
      plgpu.Barrier(num_arrivals=2),   # free: both consumers done with a round
      plgpu.Barrier(num_arrivals=2),   # meet
  ]
  cfg = config or Config()
  kernel = functools.partial(_kernel, scale=float(scale), rounds=kp // (2 * ROWS),
                             head_blocks=num_heads // HEADS, cfg=cfg)
  out_type = (jax.ShapeDtypeStruct((batch, q_len, num_heads, LATENT), jnp.bfloat16),
              jax.ShapeDtypeStruct((batch, q_len, num_heads), jnp.float32))
  return plgpu.kernel(
      kernel, out_type=out_type, scratch_types=scratch,
      # Pallas-Mosaic maps the last grid axis to CUDA's x, the only one past 65535: one axis
      # over (query, head block), a query's head blocks side by side
      grid=(batch, q_len * (num_heads // HEADS)), grid_names=("batch", "cta"),
      num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True, profile_space=cfg.profile_space,
                                           profile_dir=cfg.profile_dir),
      kernel_name="lca_dsa_sparse_fwd_mgpu")(q, k, k_rope, idx)
