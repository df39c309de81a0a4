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
(session 13).

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

_HEAD_DIM = 128
_DTYPES = ("float8_e4m3fn", "bfloat16")
# Shared memory per CTA on sm_90 (227 KiB) minus room for barriers.
_SMEM_LIMIT = 227 * 1024 - 8 * 1024


@dataclasses.dataclass(frozen=True)
class Config:
  """block_k: keys per step (the wgmma's M: 64, one warpgroup's rows); num_stages: key tiles
  in the shared-memory ring; columns: (query, head) columns of one consumer's wgmma (its N:
  256 or 128, so 256 / H_I or 128 / H_I queries a consumer); consumers: compute warpgroups a
  CTA (2 or 3; three get 160 registers a thread, two 232; four, at 120, hung on an H200:
  NOTES_dsa.md session 21). pingpong: the
  consumers take turns to issue their wgmmas: two meet after each issue (flash_mgpu's
  schedule; 155 vs 178 ms without it at 128k, NOTES_dsa.md session 10), more pass a token
  round a ring (each waits for its turn, issues, hands the turn on).
  auto_barriers: let Mosaic put a warpgroup barrier before and after every shared-memory store
  (its conservative default: 8 extra barriers a step here). Off, only the barriers the kernel
  needs remain: the output tile's reuse waits on its TMA store (`wait_smem_to_gmem`, which
  ends in a barrier) and `commit_smem` (fence + barrier) precedes the store that reads it;
  no thread reads shared memory that it or another thread wrote. direct_store: each query's row
  of a step goes from registers straight to global memory (no shared-memory tile, no
  `commit_smem` barrier, no TMA store; the same scores, 2% faster at 128k: NOTES_dsa.md,
  session 13); off, the rows go through a shared-memory tile and one TMA store a step.
  profile_space, profile_dir (timing only): Mosaic's on-device profiler records each
  consumer's named regions (key wait, turn, wgmma wait, epilogue, store) per step, up to
  profile_space regions a warpgroup, as a trace in profile_dir
  (`experiments/probe_dsa_indexer.py --profile`)."""
  block_k: int = 64
  num_stages: int = 2
  columns: int = 256
  consumers: int = 2
  pingpong: bool = True
  auto_barriers: bool = False
  direct_store: bool = True
  split: bool = False
  prefetch_scale: bool = False
  profile_space: int = 0
  profile_dir: str = ""

  def smem_bytes(self, itemsize: int, out_itemsize: int, heads: int = 64) -> int:
    q = self.consumers * self.columns * _HEAD_DIM * itemsize
    k = self.num_stages * self.block_k * _HEAD_DIM * itemsize
    out = self.consumers * 2 * (self.columns // heads) * self.block_k * out_itemsize
    profile = (self.consumers + 1) * self.profile_space * 4 * 4
    return q + k + out + profile

  def max_registers(self) -> int:
    """A consumer's register cap: the producer keeps 24 of the 512 a thread slot has (x 128)."""
    return {2: 232, 3: 160}[self.consumers]

  def check(self, heads: int):
    if self.columns not in (128, 192, 256):
      raise ValueError(f"Config.columns must be 128, 192 or 256, got {self.columns}")
    if self.consumers not in (2, 3):
      raise ValueError(f"Config.consumers must be 2 or 3, got {self.consumers}")
    if self.split and (self.consumers, self.columns, self.direct_store) != (2, 256, True):
      raise ValueError(f"Config.split needs consumers=2, columns=256, direct_store=True, got {self}")
    if self.columns % heads:
      raise ValueError(f"Config.columns {self.columns} must be a multiple of index_heads {heads}")


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
  cfg = config or Config()
  if dim != _HEAD_DIM:
    return f"index_dim {dim} (128 only)"
  if num_heads % 8 or cfg.columns % num_heads:
    return f"index_heads {num_heads} (a multiple of 8 dividing Config.columns = {cfg.columns})"
  if q.shape[1] < queries_per_cta(num_heads, cfg):
    return f"{q.shape[1]} queries (decode sizes use the decode kernel)"
  need = cfg.smem_bytes(q.dtype.itemsize, jnp.dtype(out_dtype).itemsize, num_heads)
  if need > _SMEM_LIMIT:
    return f"{cfg} needs {need} B of shared memory"
  return None


def queries_per_cta(num_heads: int, config: Config | None = None) -> int:
  """Queries of one CTA: columns / H_I per consumer warpgroup (8 a CTA by default at H_I = 64)."""
  cfg = config or Config()
  return cfg.consumers * cfg.columns // num_heads


def _kernel(q_ref, k_ref, w_ref, ks_ref, qpos_ref, o_ref, q_smem, k_smem, o_smem,
            q_ready, k_ready, k_free, turn, *, heads: int, kv_len: int, num_tiles: int,
            cfg: Config):
  """One CTA: n x qpw queries (n = cfg.consumers, qpw = cfg.columns / heads a consumer);
  warpgroups 0 .. n-1 compute, warpgroup n loads.

  q_ref [B, Lp * H, d] ((query, head) rows), k_ref [B, Sp, d], w_ref [B, Lp * H] f32,
  ks_ref [B, Sp] f32, qpos_ref [B, Lp] int32, o_ref [B, Lp, Sp]."""
  bk, stages, n, cols = cfg.block_k, cfg.num_stages, cfg.consumers, cfg.columns
  qpw = cols // heads
  ring = cfg.pingpong and n > 2
  batch = lax.axis_index("batch")
  tile = num_tiles - 1 - lax.axis_index("q_tiles")   # the latest queries launch first
  wg = lax.axis_index("wg")
  q0 = tile * (n * qpw)                              # first query of the CTA
  num_kv = pl.cdiv(kv_len, bk)

  positions = [qpos_ref[batch, q0 + i] for i in range(n * qpw)]
  latest = functools.reduce(jnp.maximum, positions)
  hi = jnp.minimum(floor_div(latest + bk, bk), num_kv)   # key tiles up to the latest position

  def take_turn():  # two consumers meet here; warpgroup 1 runs one meeting behind
    plgpu.barrier_arrive(turn.at[0])
    plgpu.barrier_wait(turn.at[0])

  def _consumer():
    plgpu.set_max_registers(cfg.max_registers(), action="increase")
    first = q0 + wg * qpw
    plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(first * heads, cols)], q_smem.at[wg],
                            q_ready.at[wg])
    w = plgpu.load(w_ref.at[batch, pl.ds(first * heads, cols)],
                   layout=plgpu.Layout.WGMMA.reduce(0), optimized=False)  # [cols]
    mine = [qpos_ref[batch, first + i] for i in range(qpw)]
    # Tiles [0, full): every key visible to every query of this warpgroup (no mask).
    full = jnp.minimum(floor_div(functools.reduce(jnp.minimum, mine) + 1, bk),
                       jnp.int32(kv_len // bk))
    full = jnp.minimum(full, hi)
    plgpu.barrier_wait(q_ready.at[wg])
    if ring:
      pl.when(wg == n - 1)(lambda: plgpu.barrier_arrive(turn.at[0]))   # the token starts at 0
    elif cfg.pingpong:
      pl.when(wg == 1)(take_turn)

    def load_scale(j):   # k_scale of key tile j, [bk] in the layout of a row of scores
      return plgpu.load(ks_ref.at[batch, pl.ds(j * bk, bk)], layout=plgpu.Layout.WGMMA.reduce(1),
                        optimized=False)

    def step(j, carry, masked: bool):
      slot = lax.rem(j, jnp.int32(stages))
      with jax.named_scope("k_wait"):
        plgpu.barrier_wait(k_ready.at[slot])

      def mma(acc_ref):
        if ring:
          with jax.named_scope("turn_wait"):
            plgpu.barrier_wait(turn.at[wg])
        plgpu.wgmma(acc_ref, k_smem.at[slot], q_smem.at[wg].transpose((1, 0)))
        if ring:
          plgpu.barrier_arrive(turn.at[lax.rem(wg + 1, n)])
        elif cfg.pingpong:
          with jax.named_scope("turn"):
            take_turn()  # the other warpgroup may now issue its wgmma
        with jax.named_scope("mma_wait"):
          return acc_ref[...]
      if cfg.prefetch_scale:   # this step's key scales came with the last step; fetch the next's
        ks, carry = carry, load_scale(jnp.minimum(j + 1, hi - 1))
      else:
        ks = load_scale(j)
      s = pl.run_scoped(mma, plgpu.ACC((bk, cols), jnp.float32))   # [keys, columns]
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
    if cfg.pingpong and not ring:
      pl.when(wg == 0)(take_turn)
    plgpu.wait_smem_to_gmem(0)

  def _split_consumer():
    """Each step's wgmma as two halves of cols / 2 columns in two accumulators, software-pipelined:
    a half's epilogue runs while the other half's wgmma is in flight (the same registers as one
    [bk, cols] accumulator)."""
    plgpu.set_max_registers(cfg.max_registers(), action="increase")
    half, qph = cols // 2, qpw // 2
    first = q0 + wg * qpw
    plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(first * heads, cols)], q_smem.at[wg],
                            q_ready.at[wg])
    ws = [plgpu.load(w_ref.at[batch, pl.ds(first * heads + h * half, half)],
                     layout=plgpu.Layout.WGMMA.reduce(0), optimized=False) for h in (0, 1)]
    mine = [qpos_ref[batch, first + i] for i in range(qpw)]
    plgpu.barrier_wait(q_ready.at[wg])
    zeros = plgpu.layout_cast(jnp.zeros((bk, half), jnp.float32), plgpu.Layout.WGMMA)

    def issue(acc_ref, j, h):
      acc_ref[...] = zeros
      plgpu.wgmma(acc_ref, k_smem.at[lax.rem(j, jnp.int32(stages))],
                  q_smem.at[wg, pl.ds(h * half, half)].transpose((1, 0)))

    def load_scale(j):
      return plgpu.load(ks_ref.at[batch, pl.ds(j * bk, bk)], layout=plgpu.Layout.WGMMA.reduce(1),
                        optimized=False)

    def finish(s, j, h, ks):   # [bk, half] scores of step j, half h -> its queries' rows, stored
      with jax.named_scope("epilogue"):
        p = jnp.maximum(s, 0.0) * lax.broadcast_in_dim(ws[h], s.shape, [1])
        key = j * bk + plgpu.broadcasted_iota(jnp.int32, (bk,), 0, layout=plgpu.Layout.WGMMA.reduce(1))
        vals = []
        for i in range(qph):
          val = p[:, i * heads:(i + 1) * heads].sum(axis=1) * ks
          t = mine[h * qph + i]
          vals.append(jnp.where((key <= t) & (key < kv_len), val, -jnp.inf).astype(o_ref.dtype))
      with jax.named_scope("store"):
        for i, val in enumerate(vals):
          o_ref.at[batch, first + h * qph + i, pl.ds(j * bk, bk)][...] = val

    def body(acc_a, acc_b):
      with jax.named_scope("k_wait"):
        plgpu.barrier_wait(k_ready.at[0])
      issue(acc_a, 0, 0)
      issue(acc_b, 0, 1)
      with jax.named_scope("mma_wait"):
        a = plgpu.wgmma_accumulator_load(acc_a, wait_n=1)
      ks = load_scale(0)
      finish(a, 0, 0, ks)

      def step(j, ks_prev):   # in flight on entry: half 1 of step j - 1
        slot = lax.rem(j, jnp.int32(stages))
        with jax.named_scope("k_wait"):
          plgpu.barrier_wait(k_ready.at[slot])
        issue(acc_a, j, 0)
        with jax.named_scope("mma_wait"):
          b = plgpu.wgmma_accumulator_load(acc_b, wait_n=1)
        plgpu.barrier_arrive(k_free.at[lax.rem(j - 1, jnp.int32(stages))])
        ks = load_scale(j)
        finish(b, j - 1, 1, ks_prev)
        issue(acc_b, j, 1)
        with jax.named_scope("mma_wait"):
          a = plgpu.wgmma_accumulator_load(acc_a, wait_n=1)
        finish(a, j, 0, ks)
        return ks

      ks = lax.fori_loop(1, hi, step, ks)
      with jax.named_scope("mma_wait"):
        b = plgpu.wgmma_accumulator_load(acc_b, wait_n=0)
      plgpu.barrier_arrive(k_free.at[lax.rem(hi - 1, jnp.int32(stages))])
      finish(b, hi - 1, 1, ks)

    pl.run_scoped(body, plgpu.ACC((bk, half), jnp.float32), plgpu.ACC((bk, half), jnp.float32))

  if cfg.split:
    pl.when((wg < n) & (hi > 0))(_split_consumer)
  else:
    pl.when(wg < n)(_consumer)

  @pl.when(wg == n)
  def _producer():
    plgpu.set_max_registers(24 if n > 2 else 40, action="decrease")

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

  Lp must be a multiple of `queries_per_cta` (8 by default at H_I = 64) and Sp of block_k;
  keys at or past kv_len are masked. Key tiles past a CTA's latest query stay unwritten."""
  cfg = config or Config()
  batch, q_pad, heads, dim = q.shape
  cfg.check(heads)
  kv_pad = k.shape[1]
  per_cta = queries_per_cta(heads, cfg)
  if q_pad % per_cta or kv_pad % cfg.block_k:
    raise ValueError(f"padded lengths q {q_pad}, kv {kv_pad} must be multiples of {per_cta} "
                     f"and {cfg.block_k}")
  num_tiles = q_pad // per_cta
  n = cfg.consumers
  swizzle = 128
  tiled = (plgpu.TilingTransform((8, swizzle // q.dtype.itemsize)), plgpu.SwizzleTransform(swizzle))
  scratch = [
      plgpu.SMEM((n, cfg.columns, dim), q.dtype, transforms=tiled),                # Q blocks
      plgpu.SMEM((cfg.num_stages, cfg.block_k, dim), q.dtype, transforms=tiled),   # key ring
      plgpu.SMEM((n, 2, cfg.columns // heads, cfg.block_k), out_dtype),            # out tiles
      plgpu.Barrier(num_barriers=n),                                               # q_ready
      plgpu.Barrier(num_barriers=cfg.num_stages),                                  # k_ready
      plgpu.Barrier(num_arrivals=n, num_barriers=cfg.num_stages),                  # k_free
      # turn: two consumers meet at one barrier; more pass a token round one barrier each
      plgpu.Barrier(num_arrivals=2 if n == 2 else 1, num_barriers=1 if n == 2 else n),
  ]
  kernel = functools.partial(_kernel, heads=heads, kv_len=int(kv_len), num_tiles=num_tiles,
                             cfg=cfg)
  return plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((batch, q_pad, kv_pad), out_dtype),
      scratch_types=scratch, grid=(num_tiles, batch), grid_names=("q_tiles", "batch"),
      num_threads=n + 1, thread_name="wg",
      compiler_params=plgpu.CompilerParams(unsafe_no_auto_barriers=not cfg.auto_barriers,
                                           profile_space=cfg.profile_space,
                                           profile_dir=cfg.profile_dir),
      kernel_name="lca_dsa_indexer_mgpu",
  )(q.reshape(batch, q_pad * heads, dim), k, w.reshape(batch, q_pad * heads), k_scale,
    q_positions)
