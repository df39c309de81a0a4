"""DSA lightning-indexer prefill scores for Hopper in Pallas Mosaic GPU (TMA + wgmma).

  supported(q, k, *, fill_future, default_kv, interpret, out_dtype, config) -> None | reason
  scores(q, k, w, k_scale, q_positions, *, kv_len, out_dtype, config) -> [B, Lp, Sp]
  Config               keys per step (wgmma M), K ring depth, ping-pong of the consumers

`dsa_indexer.indexer_scores(..., kernel="auto")` calls this on an sm_90 GPU for the prefill
case it supports (fill_future=False with the default key positions, H_I dividing 256,
d_I = 128, fp8 or bf16 operands); the Triton kernel of dsa_indexer.py runs everything
else, and is the CPU / interpret-mode path.

Math: I[t, s] = k_scale[s] * sum_j w[t, j] * ReLU(q[t, j] . k[s]), -inf where s > t or s is
past the keys; the same as the Triton kernel (fp32 sums, rounded once to out_dtype).

Why the keys are the MMA's rows. The Triton kernel computes each head's [queries, keys] tile
as its own MMA and adds the weighted ReLU into a [queries, keys] accumulator: 64 small MMAs
per tile, each followed by an epilogue on the whole tile that the next MMA waits for (Triton
does not overlap them), and q streamed once per head and key tile. Here one warpgroup keeps
a block of Q = 256 / H_I queries x H_I heads = 256 (query, head) rows in shared memory (the
wgmma's B operand, N = 256) and streams key tiles of 64 (the A operand, M = 64):
S^T = K Q^T is [64 keys, 256 columns] from ONE wgmma over all heads and the full d_I = 128.
The epilogue (ReLU, times w per column, sum of each query's H_I columns: in-thread adds and
two lane shuffles in the wgmma layout) gives [64 keys] per query; no accumulator lives
across steps. Two consumer warpgroups hold two query blocks and share every key tile
(a TMA ring filled by a producer warpgroup), so 8 queries (H_I = 64) read each key once.
With `Config.pingpong` the consumers meet after each wgmma issue (flash_mgpu's ping-pong).

Counts (H100, fp8, per 64-key step of one warpgroup): wgmma 2*64*256*128 = 4.2 MFLOP =
512 clk of an SM's tensor cores at fp8 peak (8192 FLOP/clk); epilogue ~330 instructions a
thread (128 max, ~180 mul/add, 16 shuffles: counted in the PTX), so two warpgroups'
epilogues (~660 issue clk a scheduler) fit under their two wgmmas (1024) if they overlap.
Shared memory reads per step: A 8 KB + B 32 KB = 40 KB, 80 KB per 1024 clk for the pair,
under the 128 B/clk limit. Floor at 128k (causal half, 1.4e14 FLOP at 1979 TFLOP/s): 71 ms.
Measured (128k, all 64 chunks, per-chunk q quantization included): 155 ms against the
Triton kernel's 161 (fp8), 247 against 264 (bf16). The loop with a trivial epilogue takes
120 ms, so the MMA loop itself runs at ~60% of fp8 peak and the epilogue overlaps only
partly (+35 ms): pallas_kernels/NOTES_dsa.md, session 10. Without Mosaic's automatic
barriers around shared-memory stores (`Config.auto_barriers`, 10 -> 2 bar.sync a step):
143 ms against 153 with them (same call; session 11). Rows stored from registers straight to
global memory (`Config.direct_store`, no shared-memory tile): 135.3 vs 138.0 ms on an H200
(session 13). Where a step goes (session 22, Mosaic's profiler and ncu's SASS with stall
samples): the two consumers' epilogues run side by side in ~790 cycles while the tensor cores
wait, then both wgmmas (1024 cycles), ~1740 cycles a period; the epilogue's SASS per warp is
128 FMNMX, 184 FFMA/FADD/FMUL and 16 SHFL, so one warp alone is latency-bound at ~2.5 cycles an
instruction. Tried and slower (code in commit a09383a): the head sum as a second wgmma on bf16
ReLU(S), serial or pipelined (the f32 -> bf16 conversions alone took ~530 cycles a step);
turns handed over between the consumers; ReLU as x + |x| on the FMA pipe, whole or half; each
query's columns summed 8 at a time with multiply-adds (~13% fewer epilogue instructions: 136.6 vs
134.5 ms, session 23; code in commit 774f628).

Outputs: a CTA writes the key tiles [0, hi), hi = the tile holding its latest query's
position; tiles past that stay unwritten (fill_future=False's contract: the top-k reads
row t only below t + 1). Queries with position -1 (padding) get -inf in the written tiles.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import floor_div, hopper_unavailable

_COLUMNS = 256       # wgmma N: (query, head) columns of one consumer warpgroup
_NUM_CONSUMERS = 2
_HEAD_DIM = 128
_DTYPES = ("float8_e4m3fn", "bfloat16")
# Shared memory per CTA on sm_90 (227 KiB) minus room for barriers.
_SMEM_LIMIT = 227 * 1024 - 8 * 1024


@dataclasses.dataclass(frozen=True)
class Config:
  """block_k: keys per step (the wgmma's M: 64, one warpgroup's rows); num_stages: key tiles
  in the shared-memory ring; pingpong: the two consumers meet after each wgmma issue
  (155 vs 178 ms without it at 128k, NOTES_dsa.md session 10). The meeting lines the two
  consumers' epilogues up side by side, with the tensor cores idle meanwhile: a period is about
  one epilogue plus both wgmmas. Turns handed over instead (FlashAttention-3's order, each
  epilogue beside the other consumer's wgmma) were slower, because one epilogue alone takes
  ~870 cycles, longer than a wgmma's 512 (NOTES_dsa.md session 22);
  auto_barriers: let Mosaic put a warpgroup barrier before and after every shared-memory store
  (its conservative default: 8 extra barriers a step here). Off, only the barriers the kernel
  needs remain: the output tile's reuse waits on its TMA store (`wait_smem_to_gmem`, which
  ends in a barrier) and `commit_smem` (fence + barrier) precedes the store that reads it;
  no thread reads shared memory that it or another thread wrote. direct_store: each query's row
  of a step goes from registers straight to global memory (no shared-memory tile, no
  `commit_smem` barrier, no TMA store; the same scores, 2% faster at 128k: NOTES_dsa.md,
  session 13); off, the rows go through a shared-memory tile and one TMA store a step.
  prefetch_scale: each step loads the next key tile's k_scale (a loop carry) instead of its own:
  the same scores, ~1% faster at 128k on an H200 (136.3 / 136.7 / 136.3 vs 137.6 / 138.0 / 137.9
  ms in three runs, NOTES_dsa.md session 22).
  profile_space, profile_dir (timing only): Mosaic's on-device profiler records each
  consumer's named regions a step (k_wait, turn, mma_wait, epilogue, store), up to
  profile_space regions a warpgroup, as a trace in profile_dir
  (`experiments/probe_dsa_indexer.py --profile`; NOTES_dsa.md session 21)."""
  block_k: int = 64
  num_stages: int = 2
  pingpong: bool = True
  auto_barriers: bool = False
  direct_store: bool = True
  prefetch_scale: bool = True
  profile_space: int = 0
  profile_dir: str = ""

  def smem_bytes(self, itemsize: int, out_itemsize: int) -> int:
    q = _NUM_CONSUMERS * _COLUMNS * _HEAD_DIM * itemsize
    k = self.num_stages * self.block_k * _HEAD_DIM * itemsize
    out = _NUM_CONSUMERS * 2 * (_COLUMNS // 8) * self.block_k * out_itemsize
    profile = (_NUM_CONSUMERS + 1) * self.profile_space * 4 * 4   # 2 events of 2 words a region
    return q + k + out + profile


def supported(q, k, *, fill_future: bool, default_kv: bool, interpret: bool,
              out_dtype=jnp.float32, config: Config | None = None) -> str | None:
  """None when this kernel can run the case, else the reason it cannot."""
  if (why_not := hopper_unavailable(interpret)) is not None:
    return why_not
  if fill_future:
    return "fill_future=True (this kernel leaves wholly-future key tiles unwritten)"
  if not default_kv:
    return "explicit kv_positions (this kernel takes key s at position s)"
  if jnp.dtype(q.dtype).name not in _DTYPES or k.dtype != q.dtype:
    return f"operand dtypes {q.dtype}, {k.dtype} (float8_e4m3fn or bfloat16, the same for both)"
  num_heads, dim = q.shape[2], q.shape[3]
  if dim != _HEAD_DIM:
    return f"index_dim {dim} (128 only)"
  if num_heads % 8 or _COLUMNS % num_heads:
    return f"index_heads {num_heads} (a multiple of 8 dividing 256)"
  if q.shape[1] < _NUM_CONSUMERS * _COLUMNS // num_heads:
    return f"{q.shape[1]} queries (decode sizes use the decode kernel)"
  cfg = config or Config()
  need = cfg.smem_bytes(q.dtype.itemsize, jnp.dtype(out_dtype).itemsize)
  if need > _SMEM_LIMIT:
    return f"{cfg} needs {need} B of shared memory"
  return None


def queries_per_cta(num_heads: int) -> int:
  """Queries of one CTA: 256 / H_I per consumer warpgroup, two consumers (8 at H_I = 64)."""
  return _NUM_CONSUMERS * _COLUMNS // num_heads


def _kernel(q_ref, k_ref, w_ref, ks_ref, qpos_ref, o_ref, q_smem, k_smem, o_smem,
            q_ready, k_ready, k_free, turn, *, heads: int, kv_len: int, num_tiles: int,
            cfg: Config):
  """One CTA: 2 x qpw queries (qpw = 256 / heads a consumer); warpgroups 0, 1 compute, 2 loads.

  q_ref [B, Lp * H, d] ((query, head) rows), k_ref [B, Sp, d], w_ref [B, Lp * H] f32,
  ks_ref [B, Sp] f32, qpos_ref [B, Lp] int32, o_ref [B, Lp, Sp]."""
  bk, stages = cfg.block_k, cfg.num_stages
  qpw = _COLUMNS // heads
  batch = lax.axis_index("batch")
  tile = num_tiles - 1 - lax.axis_index("q_tiles")   # the latest queries launch first
  wg = lax.axis_index("wg")
  q0 = tile * (_NUM_CONSUMERS * qpw)                 # first query of the CTA
  num_kv = pl.cdiv(kv_len, bk)

  positions = [qpos_ref[batch, q0 + i] for i in range(_NUM_CONSUMERS * qpw)]
  latest = functools.reduce(jnp.maximum, positions)
  hi = jnp.minimum(floor_div(latest + bk, bk), num_kv)   # key tiles up to the latest position

  def take_turn():  # both consumers meet here; warpgroup 1 runs one meeting behind
    plgpu.barrier_arrive(turn)
    plgpu.barrier_wait(turn)

  @pl.when(wg < _NUM_CONSUMERS)
  def _consumer():
    plgpu.set_max_registers(232, action="increase")
    first = q0 + wg * qpw
    plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(first * heads, _COLUMNS)], q_smem.at[wg],
                            q_ready.at[wg])
    w = plgpu.load(w_ref.at[batch, pl.ds(first * heads, _COLUMNS)],
                   layout=plgpu.Layout.WGMMA.reduce(0), optimized=False)  # [256]
    mine = [qpos_ref[batch, first + i] for i in range(qpw)]
    # Tiles [0, full): every key visible to every query of this warpgroup (no mask).
    full = jnp.minimum(floor_div(functools.reduce(jnp.minimum, mine) + 1, bk),
                       jnp.int32(kv_len // bk))
    full = jnp.minimum(full, hi)
    plgpu.barrier_wait(q_ready.at[wg])
    if cfg.pingpong:
      pl.when(wg == 1)(take_turn)

    def load_scale(j):   # k_scale of key tile j: [bk] in the layout of a row of scores
      return plgpu.load(ks_ref.at[batch, pl.ds(j * bk, bk)], layout=plgpu.Layout.WGMMA.reduce(1),
                        optimized=False)

    # The named scopes are the regions Mosaic's profiler records (Config.profile_space).
    def step(j, carry, masked: bool):
      slot = lax.rem(j, jnp.int32(stages))
      with jax.named_scope("k_wait"):
        plgpu.barrier_wait(k_ready.at[slot])

      def mma(acc_ref):
        plgpu.wgmma(acc_ref, k_smem.at[slot], q_smem.at[wg].transpose((1, 0)))
        if cfg.pingpong:
          with jax.named_scope("turn"):
            take_turn()  # the other warpgroup may now issue its wgmma
        with jax.named_scope("mma_wait"):
          return acc_ref[...]
      if cfg.prefetch_scale:   # this step's scales came with the last step; fetch the next's
        ks, carry = carry, load_scale(jnp.minimum(j + 1, hi - 1))
      else:
        ks = load_scale(j)
      s = pl.run_scoped(mma, plgpu.ACC((bk, _COLUMNS), jnp.float32))   # [keys, columns]
      plgpu.barrier_arrive(k_free.at[slot])
      with jax.named_scope("epilogue"):
        p = jnp.maximum(s, 0.0) * lax.broadcast_in_dim(w, s.shape, [1])   # ReLU(q.k) w
        if masked:
          key = j * bk + plgpu.broadcasted_iota(jnp.int32, (bk,), 0,
                                                layout=plgpu.Layout.WGMMA.reduce(1))
        vals = []
        for i in range(qpw):
          val = p[:, i * heads:(i + 1) * heads].sum(axis=1) * ks   # query i's heads -> [keys]
          if masked:
            val = jnp.where((key <= mine[i]) & (key < kv_len), val, -jnp.inf)
          vals.append(val.astype(o_ref.dtype))
      with jax.named_scope("store"):
        if not cfg.direct_store:
          buf = lax.rem(j, jnp.int32(2))
          plgpu.wait_smem_to_gmem(1, wait_read_only=True)   # this buffer's store 2 steps ago is read
        for i, val in enumerate(vals):
          if cfg.direct_store:
            o_ref.at[batch, first + i, pl.ds(j * bk, bk)][...] = val
          else:
            o_smem.at[wg, buf, i][...] = val
        if not cfg.direct_store:
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(o_smem.at[wg, buf],
                                  o_ref.at[batch, pl.ds(first, qpw), pl.ds(j * bk, bk)])
      return carry

    carry = load_scale(0) if cfg.prefetch_scale else None
    carry = lax.fori_loop(0, full, functools.partial(step, masked=False), carry)
    lax.fori_loop(full, hi, functools.partial(step, masked=True), carry)
    if cfg.pingpong:
      pl.when(wg == 0)(take_turn)
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == _NUM_CONSUMERS)
  def _producer():
    plgpu.set_max_registers(40, action="decrease")

    def load(j, slot):
      plgpu.copy_gmem_to_smem(k_ref.at[batch, pl.ds(j * bk, bk)], k_smem.at[slot],
                              k_ready.at[slot])

    for j in range(stages):  # fill the ring
      pl.when(j < hi)(functools.partial(load, j, j))

    @functools.partial(lax.fori_loop, stages, jnp.maximum(hi, stages), init_val=None)
    def _(j, _):
      slot = lax.rem(j, jnp.int32(stages))
      plgpu.barrier_wait(k_free.at[slot])
      load(j, slot)


def scores(q, k, w, k_scale, q_positions, *, kv_len: int, out_dtype=jnp.float32,
           config: Config | None = None):
  """q [B, Lp, H_I, 128] and k [B, Sp, 128] (fp8 or bf16, the same), w [B, Lp, H_I] f32,
  k_scale [B, Sp] f32, q_positions [B, Lp] int32 (-1 = padding) -> [B, Lp, Sp] out_dtype.

  Lp must be a multiple of 512 / H_I (8 queries a CTA at H_I = 64) and Sp of block_k;
  keys at or past kv_len are masked. Key tiles past a CTA's latest query stay unwritten."""
  cfg = config or Config()
  batch, q_pad, heads, dim = q.shape
  kv_pad = k.shape[1]
  per_cta = queries_per_cta(heads)
  if q_pad % per_cta or kv_pad % cfg.block_k:
    raise ValueError(f"padded lengths q {q_pad}, kv {kv_pad} must be multiples of {per_cta} "
                     f"and {cfg.block_k}")
  num_tiles = q_pad // per_cta
  swizzle = 128
  tiled = (plgpu.TilingTransform((8, swizzle // q.dtype.itemsize)), plgpu.SwizzleTransform(swizzle))
  scratch = [
      plgpu.SMEM((_NUM_CONSUMERS, _COLUMNS, dim), q.dtype, transforms=tiled),      # Q blocks
      plgpu.SMEM((cfg.num_stages, cfg.block_k, dim), q.dtype, transforms=tiled),   # key ring
      plgpu.SMEM((_NUM_CONSUMERS, 2, _COLUMNS // heads, cfg.block_k), out_dtype),  # out tiles
      plgpu.Barrier(num_barriers=_NUM_CONSUMERS),                                    # q_ready
      plgpu.Barrier(num_barriers=cfg.num_stages),                                    # k_ready
      plgpu.Barrier(num_arrivals=_NUM_CONSUMERS, num_barriers=cfg.num_stages),       # k_free
      plgpu.Barrier(num_arrivals=_NUM_CONSUMERS),                                    # turn
  ]
  kernel = functools.partial(_kernel, heads=heads, kv_len=int(kv_len), num_tiles=num_tiles,
                             cfg=cfg)
  return plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((batch, q_pad, kv_pad), out_dtype),
      scratch_types=scratch, grid=(num_tiles, batch), grid_names=("q_tiles", "batch"),
      num_threads=_NUM_CONSUMERS + 1, thread_name="wg",
      compiler_params=plgpu.CompilerParams(unsafe_no_auto_barriers=not cfg.auto_barriers,
                                           profile_space=cfg.profile_space,
                                           profile_dir=cfg.profile_dir),
      kernel_name="lca_dsa_indexer_mgpu",
  )(q.reshape(batch, q_pad * heads, dim), k, w.reshape(batch, q_pad * heads), k_scale,
    q_positions)
