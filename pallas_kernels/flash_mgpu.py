"""FlashAttention forward for Hopper in Pallas Mosaic GPU (TMA + wgmma, warp-specialized).

  supported(q, k, v, *, causal, window, scale, segment_ids, interpret) -> None | reason
  forward(q, k, v, *, causal, scale, q_len, kv_len, config) -> (out, lse2)   padded inputs
  Config                tiles: block_q (rows per consumer warpgroup), block_kv, num_stages

`flash.flash_attention(..., forward_kernel="auto")` calls this forward on an sm_90 GPU for
the cases it supports; the backward stays the Triton dK/dV and dQ kernels of flash.py,
which read the (out, LSE2) written here exactly as they read the Triton forward's.

Math: the same online softmax as flash.py, in the log2 domain. With c = scale * log2(e),
per KV block j: S = Q K_j^T (fp32 wgmma accumulator), m' = max(m, c * rowmax(S)),
P = exp2(c S - m') (one FMA per score), l' = 2^(m - m') l + rowsum(P),
acc' = 2^(m - m') acc + P V_j. At the end out = acc / l and LSE2 = m + log2(l), with
+inf (and out = 0) for a row that sees no key. The running max starts at -1e30 (finite),
so a row masked out of a whole block never forms inf - inf. Needs c > 0 (so that
max(c S) = c max(S)): a scale <= 0 falls back to the Triton forward.

Tiling (FA3, arXiv 2407.08608): one CTA = one 128-row query tile of one (batch, head),
three warpgroups. Warpgroups 0 and 1 are consumers, each owning 64 query rows (wgmma's M
per warpgroup) with fp32 acc/m/l in registers; warpgroup 2 is the producer: it TMA-loads
each K and V block ([block_kv, D], from KV head h // G: GQA by index, nothing repeated)
into a `num_stages`-deep ring of shared-memory slots, and reloads a slot once both
consumers have arrived on its "free" barrier (K is released right after S = QK^T, V after
PV, so the next K load overlaps this block's softmax). The consumers ping-pong through a
two-arrival barrier: while one warpgroup runs its softmax (exp2 on the MUFU, fp32 ALU),
the other issues its two wgmmas, so the tensor cores are never idle waiting for the
softmax (the overlap that the Triton lowering cannot express). Registers are rebalanced
with setmaxnreg: 232 per consumer thread, 40 per producer thread.

Masks and block skipping: query row i sits at key position i + Lk - Lq (bottom-right
aligned, as flash.py). A CTA walks KV blocks [0, hi) with hi = the last block holding a
key visible to its last row (causal) or every block (non-causal); blocks wholly above the
diagonal are never loaded. Each consumer runs blocks [0, full) without a mask, where
every key is visible to all of its rows, and [full, hi) with the mask s <= t (causal) and
s < Lk (padded keys). Causal CTAs are launched longest first (the query-tile axis is
reversed), so the short ones fill the last wave.

Supported: bf16 and fp16; head_dim 64 and 128 (after flash.py pads D to a power of two);
causal and not; GQA/MQA; Lq != Lk; any lengths (the launcher in flash.py zero-pads Lq to
a multiple of 128 and Lk to a multiple of block_kv; padded keys are masked, padded rows
dropped). Falls back to the Triton forward (flash.py) for: fp32, head_dim 16/32/256, a
sliding window, segment ids, a scale <= 0, CPU/interpret mode, a non-sm_90 GPU.

Counts (H100, B*L = 16k tokens, H = 16, D = 128, causal): 2 B H L^2 D FLOPs
(1.1 TFLOP at L = 8k, 1.37 ms at ~800 TFLOP/s dense bf16); K and V are read once per
query tile, L / 128 tiles -> B H L^2 D / 128 * 2 B * 2 (K, V) / 2 (causal) = 2.1 GB at
8k, mostly from L2. Per score element: 512 MMA FLOPs = 0.125 clk/SM, one exp2 = 0.0625
clk/SM (MUFU 16/clk/SM) plus ~4 fp32 ops = 0.03 clk: with the softmax hidden behind the
other warpgroup's MMAs the bound is the tensor cores, ~0.8-0.85 of dense peak in
practice (the wgmma issue gaps, the masked diagonal blocks and the tail wave).
Measured (H100, bf16, causal, D = 128, 8k-64k): 580-640 TFLOP/s, 1.01-1.24x cuDNN in the
same process (the Triton forward: 0.76-0.77x); D = 64: 412-457, 0.98-1.09x. Tiles tried
and the rest: NOTES_flash.md.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu_mgpu

from pallas_kernels import floor_div, hopper_unavailable

LOG2E = math.log2(math.e)
_INIT_MAX = -1e30  # finite start for the running max (see the module docstring)
_RCP_LN2 = 1.0 / math.log(2.0)
_HEAD_DIMS = (64, 128)
_NUM_CONSUMERS = 2


@dataclasses.dataclass(frozen=True)
class Config:
  """block_q: query rows per consumer warpgroup (a CTA holds 2 * block_q rows); block_kv:
  keys per pipeline step; num_stages: K/V shared-memory slots."""
  block_q: int = 64
  block_kv: int = 128
  num_stages: int = 2

  @classmethod
  def default(cls, head_dim: int) -> Config:
    """(64, 128, 2) for D = 64 and 128: best at D = 128 on an H100 (611 TFLOP/s at 16k
    causal vs 542 with block_kv 64); at D = 64 block_kv 256 was 6% faster at 16k but was
    not swept over L (NOTES_flash.md). 3 stages at D = 128 exceed shared memory."""
    del head_dim
    return cls()

  @property
  def q_tile(self) -> int:
    return _NUM_CONSUMERS * self.block_q

  def smem_bytes(self, head_dim: int, itemsize: int) -> int:
    return itemsize * head_dim * (self.q_tile + 2 * self.num_stages * self.block_kv)


# Shared memory per CTA on sm_90 (227 KiB) minus room for barriers and reductions.
_SMEM_LIMIT = 227 * 1024 - 8 * 1024


def supported(q, k, v, *, causal, window, scale, segment_ids, interpret: bool,
              config: Config | None = None) -> str | None:
  """None when this forward can run the case, else the reason it cannot (for the
  ValueError of a forced forward_kernel="mosaic")."""
  del causal
  if (why_not := hopper_unavailable(interpret)) is not None:
    return why_not
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"dtype {q.dtype} (bf16 and fp16 only)"
  if v.shape[-1] != q.shape[-1]:
    return f"v head_dim {v.shape[-1]} != q head_dim {q.shape[-1]}"
  d = padded_head_dim(q.shape[-1])
  if d not in _HEAD_DIMS:
    return f"head_dim {q.shape[-1]} (padded {d}; 64 and 128 only)"
  if window is not None:
    return "sliding window (Triton forward only)"
  if segment_ids is not None:
    return "segment_ids (Triton forward only)"
  if scale is not None and not scale > 0:
    return f"scale {scale} (must be > 0)"
  cfg = config or Config.default(d)
  if cfg.smem_bytes(d, q.dtype.itemsize) > _SMEM_LIMIT:
    return f"{cfg} needs {cfg.smem_bytes(d, q.dtype.itemsize)} B of shared memory"
  return None


def padded_head_dim(head_dim: int) -> int:
  """flash.py pads D to a power of two >= 16; this forward sees that D."""
  return max(16, 1 << max(0, int(head_dim) - 1).bit_length())


def _kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, qo_smem, k_smem, v_smem, lse_smem,
            k_ready, v_ready, q_ready, k_free, v_free, turn, *, causal: bool, scale: float,
            q_len: int, kv_len: int, group: int, num_tiles: int, cfg: Config):
  """One 128-row query tile of one (batch, head); warpgroups 0, 1 compute, 2 loads."""
  bq, bkv, stages = cfg.block_q, cfg.block_kv, cfg.num_stages
  dtype = q_ref.dtype
  batch = lax.axis_index("batch")
  head = lax.axis_index("heads")
  x = lax.axis_index("q_tiles")
  tile = (num_tiles - 1 - x) if causal else x  # causal: longest tiles launch first
  wg = lax.axis_index("wg")
  offset = kv_len - q_len  # query row i sits at key position i + offset
  c = scale * LOG2E
  num_kv = pl.cdiv(kv_len, bkv)  # blocks holding real keys

  row_tile = tile * (2 * bq)
  if causal:  # keys up to the position of the tile's last row
    hi = jnp.minimum(lax.div(jnp.maximum(row_tile + 2 * bq + offset, 0) + bkv - 1,
                             jnp.int32(bkv)), num_kv)
  else:
    hi = jnp.int32(num_kv)

  def take_turn():  # both consumers meet here; warpgroup 1 runs one meeting behind
    plgpu_mgpu.barrier_arrive(turn)
    plgpu_mgpu.barrier_wait(turn)

  @pl.when(wg < _NUM_CONSUMERS)
  def _consumer():
    plgpu_mgpu.set_max_registers(232, action="increase")
    q_smem = qo_smem.at[wg]
    row0 = row_tile + wg * bq
    plgpu_mgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(row0, bq), head], q_smem,
                                 q_ready.at[wg])
    t0 = row0 + offset  # key position of this warpgroup's first row
    # Blocks [0, full): every key visible to every row (no mask).
    full = jnp.int32(kv_len // bkv)
    if causal:
      full = jnp.minimum(full, floor_div(t0 + 1, bkv))
    full = jnp.minimum(full, hi)

    reduced = plgpu_mgpu.Layout.WGMMA.reduce(1)
    m = plgpu_mgpu.layout_cast(jnp.full((bq,), _INIT_MAX, jnp.float32), reduced)
    l = plgpu_mgpu.layout_cast(jnp.full((bq,), 0.0, jnp.float32), reduced)
    acc = plgpu_mgpu.layout_cast(jnp.full((bq, v_ref.shape[-1]), 0.0, jnp.float32),
                                 plgpu_mgpu.Layout.WGMMA)
    plgpu_mgpu.barrier_wait(q_ready.at[wg])

    @pl.when(hi > 0)
    def _():
      plgpu_mgpu.barrier_wait(k_ready.at[0])

    pl.when(wg == 1)(take_turn)

    def step(j, carry, masked: bool):
      acc, m, l = carry
      slot = lax.rem(j, jnp.int32(stages))

      def qk(s_ref):
        plgpu_mgpu.wgmma(s_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
        take_turn()  # the other warpgroup may now issue its MMAs
        return s_ref[...]
      s = pl.run_scoped(qk, plgpu_mgpu.ACC((bq, bkv), jnp.float32))
      plgpu_mgpu.barrier_arrive(k_free.at[slot])
      if masked:
        rows = plgpu_mgpu.broadcasted_iota(jnp.int32, (bq, bkv), 0,
                                           layout=plgpu_mgpu.Layout.WGMMA)
        cols = plgpu_mgpu.broadcasted_iota(jnp.int32, (bq, bkv), 1,
                                           layout=plgpu_mgpu.Layout.WGMMA)
        key = cols + j * bkv
        visible = key < kv_len
        if causal:
          visible = visible & (key <= rows + t0)
        s = jnp.where(visible, s, -jnp.inf)
      m_new = jnp.maximum(m, s.max(axis=1) * c)
      alpha = jnp.exp2(m - m_new)
      p = jnp.exp2(s * c - lax.broadcast_in_dim(m_new, s.shape, [0]))
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
      l = l * alpha + p.sum(axis=1)
      p16 = p.astype(dtype)
      # Keep the softmax ahead of the barrier below (the scheduler would sink it).
      acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
      plgpu_mgpu.barrier_arrive(turn)  # softmax done
      plgpu_mgpu.barrier_wait(v_ready.at[slot])
      plgpu_mgpu.barrier_wait(turn)  # the other warpgroup has issued its MMAs

      has_next = j + 1 < hi
      next_slot = lax.rem(j + 1, jnp.int32(stages))

      def pv(acc_ref):
        plgpu_mgpu.wgmma(acc_ref, p16, v_smem.at[slot])

        @pl.when(has_next)  # wait for the next K while this PV runs
        def _():
          plgpu_mgpu.barrier_wait(k_ready.at[next_slot])
      acc = pl.run_state(pv)(plgpu_mgpu.ACC.init(acc))
      plgpu_mgpu.barrier_arrive(v_free.at[slot])
      return acc, m_new, l

    carry = lax.fori_loop(0, full, functools.partial(step, masked=False), (acc, m, l))
    acc, m, l = lax.fori_loop(full, hi, functools.partial(step, masked=True), carry)
    pl.when(wg == 0)(take_turn)

    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    out = acc * lax.broadcast_in_dim(1.0 / l_safe, acc.shape, [0])
    q_smem[...] = out.astype(dtype)
    lse_smem.at[wg][...] = jnp.where(empty, jnp.inf, m + jnp.log(l_safe) * _RCP_LN2)
    plgpu_mgpu.commit_smem()
    plgpu_mgpu.copy_smem_to_gmem(q_smem, o_ref.at[batch, pl.ds(row0, bq), head])
    plgpu_mgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[batch, head, pl.ds(row0, bq)])
    plgpu_mgpu.wait_smem_to_gmem(0)

  @pl.when(wg == _NUM_CONSUMERS)
  def _producer():
    plgpu_mgpu.set_max_registers(40, action="decrease")
    kv_head = lax.div(head, jnp.int32(group))

    def load(j, slot):
      rows = (batch, pl.ds(j * bkv, bkv), kv_head)
      plgpu_mgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_ready.at[slot])
      plgpu_mgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_ready.at[slot])

    for j in range(stages):  # fill the ring
      pl.when(j < hi)(functools.partial(load, j, j))

    @functools.partial(lax.fori_loop, stages, jnp.maximum(hi, stages), init_val=None)
    def _(j, _):
      slot = lax.rem(j, jnp.int32(stages))
      rows = (batch, pl.ds(j * bkv, bkv), kv_head)
      plgpu_mgpu.barrier_wait(k_free.at[slot])
      plgpu_mgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_ready.at[slot])
      plgpu_mgpu.barrier_wait(v_free.at[slot])
      plgpu_mgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_ready.at[slot])


def forward(q, k, v, *, causal: bool, scale: float, q_len: int, kv_len: int,
            config: Config | None = None):
  """Padded q [B, Lq_pad, H, D], k, v [B, Lk_pad, H_kv, D] -> (out [B, Lq_pad, H, D],
  lse2 [B, H, Lq_pad] fp32), the layout of flash._fwd.

  Lq_pad must be a multiple of 2 * block_q and Lk_pad of block_kv; q_len, kv_len are the
  true lengths (positions and the key mask use them). Rows past q_len hold unspecified
  finite values (the caller drops them)."""
  batch, q_pad, num_heads, head_dim = q.shape
  kv_pad, num_kv_heads = k.shape[1], k.shape[2]
  cfg = config or Config.default(head_dim)
  if q_pad % cfg.q_tile or kv_pad % cfg.block_kv:
    raise ValueError(f"padded lengths q {q_pad}, kv {kv_pad} must be multiples of "
                     f"{cfg.q_tile} and {cfg.block_kv}")
  if not scale > 0:
    raise ValueError(f"scale must be > 0 for the Mosaic forward, got {scale}")
  num_tiles = q_pad // cfg.q_tile
  tiled = (plgpu_mgpu.TilingTransform((8, 64)), plgpu_mgpu.SwizzleTransform(128))
  smem = lambda *shape: plgpu_mgpu.SMEM(shape, q.dtype, transforms=tiled)
  stages = cfg.num_stages
  scratch = [
      smem(_NUM_CONSUMERS, cfg.block_q, head_dim),   # Q, then the output
      smem(stages, cfg.block_kv, head_dim),          # K ring
      smem(stages, cfg.block_kv, head_dim),          # V ring
      plgpu_mgpu.SMEM((_NUM_CONSUMERS, cfg.block_q), jnp.float32),  # LSE2
      plgpu_mgpu.Barrier(num_barriers=stages),       # k_ready
      plgpu_mgpu.Barrier(num_barriers=stages),       # v_ready
      plgpu_mgpu.Barrier(num_barriers=_NUM_CONSUMERS),  # q_ready
      plgpu_mgpu.Barrier(num_arrivals=_NUM_CONSUMERS, num_barriers=stages),  # k_free
      plgpu_mgpu.Barrier(num_arrivals=_NUM_CONSUMERS, num_barriers=stages),  # v_free
      plgpu_mgpu.Barrier(num_arrivals=_NUM_CONSUMERS),  # turn (ping-pong)
  ]
  kernel = functools.partial(
      _kernel, causal=bool(causal), scale=float(scale), q_len=int(q_len),
      kv_len=int(kv_len), group=num_heads // num_kv_heads, num_tiles=num_tiles, cfg=cfg)
  out_type = (jax.ShapeDtypeStruct(q.shape, q.dtype),
              jax.ShapeDtypeStruct((batch, num_heads, q_pad), jnp.float32))
  return plgpu_mgpu.kernel(
      kernel, out_type=out_type, scratch_types=scratch,
      grid=(num_heads, num_tiles, batch), grid_names=("heads", "q_tiles", "batch"),
      num_threads=_NUM_CONSUMERS + 1, thread_name="wg",
      compiler_params=plgpu_mgpu.CompilerParams(approx_math=True),
      kernel_name="lca_flash_fwd_mgpu")(q, k, v)
