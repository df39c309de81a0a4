"""FlashAttention in Pallas (Triton lowering): forward, dK/dV and dQ kernels.

  flash_attention(q, k, v, *, causal, window, scale, segment_ids, ...)  the public op
  BlockSizes                   tile sizes and launch parameters, defaults per head_dim
  flash_reference(...)         plain jnp, same signature (`full.attention_reference`)

Math (FlashAttention-2, arXiv 2307.08691). Scores are kept in the log2 domain,
s2 = q.k * scale * log2(e), so the kernels use exp2. Forward, per query block:
m' = max(m, rowmax(S2)), P = exp2(S2 - m'), l' = 2^(m - m') l + rowsum(P),
acc' = 2^(m - m') acc + P V; out = acc / l; LSE2 = m + log2(l) is saved (+inf for a
row that sees no key, so its backward P is 0). Backward: D = rowsum(dO * O),
P = exp2(S2 - LSE2), dV = P^T dO, dS = P * (dO V^T - D), dK = scale dS^T Q,
dQ = scale dS K: one kernel per KV block (dK, dV; loops over the query blocks of
every query head of its GQA group, so nothing is summed afterwards) and one per
query block (dQ; loops over KV blocks).

Masks and block skipping: query t (position t + Lk - Lq, bottom-right aligned)
sees key s iff s <= t (causal), t - s < w (window; non-causal also s - t < w) and
the segment ids agree. Each program computes, from its block's positions, the
range of KV (or Q) blocks that can hold a visible pair, and inside it the range
where every pair is visible: only the blocks at the edges of the band pay for a
mask, and blocks outside the band are never loaded, so a window of w costs
O(L * w). Lengths that are not a multiple of the block size and head dims that
are not a power of two are zero-padded by the launcher (padded keys are masked).

Forward kernel choice (`forward_kernel=`): on an sm_90 GPU, "auto" runs the Mosaic GPU
forward of flash_mgpu.py (TMA + wgmma, warp-specialized, the softmax overlapped with the
MMAs) when it supports the case (bf16/fp16, head_dim 64/128, no window, no segment ids),
else this file's Triton forward; the backward is always the Triton kernels below, which
read the same (out, LSE2). "triton" and "mosaic" force one ("mosaic" raises a ValueError
naming the reason when it cannot run the case). CPU/interpret mode always uses Triton.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import numpy as np

from pallas_kernels import FORWARD_KERNELS
from pallas_kernels import flash_mgpu
from pallas_kernels import pad_axis, resolve_interpret

LOG2E = math.log2(math.e)
_INIT_MAX = -1e30  # finite start for the running max: a fully masked row never gives inf - inf


def _pow2_at_least(n: int, floor: int = 16) -> int:
  return max(floor, 1 << max(0, int(n) - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles (powers of two >= 16) and Triton launch parameters.

  block_q/block_k: forward query rows per program and keys per loop step.
  block_q_dkv/block_k_dkv: dK/dV kernel, query rows per step and keys per program.
  block_q_dq/block_k_dq: dQ kernel, query rows per program and keys per step.
  """
  block_q: int = 128
  block_k: int = 64
  block_q_dkv: int = 64
  block_k_dkv: int = 128
  block_q_dq: int = 128
  block_k_dq: int = 64
  num_warps: int = 8
  num_stages: int = 3
  num_warps_dkv: int = 8
  num_stages_dkv: int = 2
  num_warps_dq: int = 8
  num_stages_dq: int = 2

  @classmethod
  def default(cls, head_dim: int, dtype) -> BlockSizes:
    """Tiles measured best on an H100 at L=8k, causal, bf16 (NOTES_flash.md); smaller
    tiles for fp32 and head_dim > 128, whose rows take more shared memory."""
    d = _pow2_at_least(head_dim)
    if jnp.dtype(dtype).itemsize == 2 and d <= 64:
      return cls(block_q=64, block_k=64, num_warps=4, num_stages=3,
                 block_q_dkv=64, block_k_dkv=64, num_warps_dkv=4, num_stages_dkv=2,
                 block_q_dq=64, block_k_dq=64, num_warps_dq=4, num_stages_dq=2)
    if jnp.dtype(dtype).itemsize == 2 and d <= 128:
      return cls(block_q=128, block_k=128, num_warps=8, num_stages=3,
                 block_q_dkv=64, block_k_dkv=64, num_warps_dkv=4, num_stages_dkv=2,
                 block_q_dq=64, block_k_dq=64, num_warps_dq=4, num_stages_dq=2)
    return cls(block_q=64, block_k=32, num_warps=4, num_stages=2,
               block_q_dkv=32, block_k_dkv=64, num_warps_dkv=4, num_stages_dkv=2,
               block_q_dq=64, block_k_dq=32, num_warps_dq=4, num_stages_dq=2)

  def validate(self) -> None:
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if f.name.startswith("block"):
        if not isinstance(value, int) or value < 16 or value & (value - 1):
          raise ValueError(f"block_sizes.{f.name} must be a power of two >= 16, got {value!r}")
      elif not isinstance(value, int) or value <= 0:
        raise ValueError(f"block_sizes.{f.name} must be a positive int, got {value!r}")

  def fit(self, q_len: int, kv_len: int) -> BlockSizes:
    """Shrinks tiles that are longer than the (power-of-two rounded) sequence."""
    cap_q, cap_k = _pow2_at_least(q_len), _pow2_at_least(kv_len)
    return dataclasses.replace(
        self, block_q=min(self.block_q, cap_q), block_k=min(self.block_k, cap_k),
        block_q_dkv=min(self.block_q_dkv, cap_q), block_k_dkv=min(self.block_k_dkv, cap_k),
        block_q_dq=min(self.block_q_dq, cap_q), block_k_dq=min(self.block_k_dq, cap_k))


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything the kernels specialize on (hashable: a nondiff custom_vjp argument)."""
  causal: bool
  window: int | None
  scale: float
  q_len: int   # true lengths, before padding
  kv_len: int
  group: int   # query heads per KV head
  segments: bool
  blocks: BlockSizes
  interpret: bool
  forward: str = "triton"  # "triton" or "mosaic" (flash_mgpu.py); the backward is Triton
  mosaic: flash_mgpu.Config | None = None

  @property
  def offset(self) -> int:  # query row i sits at key position i + offset
    return self.kv_len - self.q_len


# ----------------------------------------------------------------------------- index helpers
# Block bounds are computed from traced program ids; lax.div truncates toward zero, so
# every numerator is clamped to >= 0 first (each bound is clamped to >= 0 afterwards too).


def _floordiv(x, d: int):
  return lax.div(jnp.maximum(x, 0), d)


def _cdiv(x, d: int):
  return lax.div(jnp.maximum(x, 0) + (d - 1), d)


def _kv_block_range(t0, bq: int, bk: int, st: _Static):
  """For query rows at positions [t0, t0 + bq): KV blocks (lo, hi) that can hold a
  visible key, and (full_lo, full_hi) inside them where every pair is visible."""
  t1 = t0 + bq - 1
  w = st.window
  lo = jnp.int32(0)
  hi = jnp.int32(pl.cdiv(st.kv_len, bk))
  if st.causal:
    hi = jnp.minimum(hi, _cdiv(t1 + 1, bk))
  if w is not None:
    lo = jnp.maximum(lo, _floordiv(t0 - w + 1, bk))
    if not st.causal:
      hi = jnp.minimum(hi, _cdiv(t1 + w, bk))
  hi = jnp.maximum(hi, lo)
  if st.segments:
    return lo, hi, hi, hi  # every block is masked
  full_lo, full_hi = lo, hi
  if st.kv_len % bk:
    full_hi = jnp.minimum(full_hi, st.kv_len // bk)
  if st.causal:
    full_hi = jnp.minimum(full_hi, _floordiv(t0 + 1, bk))
  if w is not None:
    full_lo = jnp.maximum(full_lo, _cdiv(t1 - w + 1, bk))
    if not st.causal:
      full_hi = jnp.minimum(full_hi, _floordiv(t0 + w, bk))
  full_lo = jnp.minimum(full_lo, hi)
  full_hi = jnp.maximum(jnp.minimum(full_hi, hi), full_lo)
  return lo, hi, full_lo, full_hi


def _q_block_range(s0, bq: int, bk: int, st: _Static):
  """For keys [s0, s0 + bk): query blocks (lo, hi) that can see one of them, and
  (full_lo, full_hi) where every pair is visible."""
  s1 = s0 + bk - 1
  w, off = st.window, st.offset
  lo = jnp.int32(0)
  hi = jnp.int32(pl.cdiv(st.q_len, bq))
  if st.causal:
    lo = jnp.maximum(lo, _floordiv(s0 - off, bq))
  if w is not None:
    hi = jnp.minimum(hi, _floordiv(s1 + w - 1 - off + bq, bq))
    if not st.causal:
      lo = jnp.maximum(lo, _floordiv(s0 - w + 1 - off, bq))
  hi = jnp.maximum(hi, lo)
  if st.segments:
    return lo, hi, hi, hi
  full_lo, full_hi = lo, hi
  if st.causal:
    full_lo = jnp.maximum(full_lo, _cdiv(s1 - off, bq))
  if w is not None:
    full_hi = jnp.minimum(full_hi, _floordiv(s0 + w - off, bq))
    if not st.causal:
      full_lo = jnp.maximum(full_lo, _cdiv(s1 - w + 1 - off, bq))
  if st.kv_len % bk:
    full_hi = jnp.where(s1 >= st.kv_len, full_lo, full_hi)
  full_lo = jnp.minimum(full_lo, hi)
  full_hi = jnp.maximum(jnp.minimum(full_hi, hi), full_lo)
  return lo, hi, full_lo, full_hi


def _visible(t, s, seg_q, seg_k, st: _Static):
  """Visibility of key positions s to query positions t (key-aligned), all broadcast
  against each other: t, seg_q [bq, 1] and s, seg_k [1, bk] give [bq, bk]."""
  mask = s < st.kv_len
  if st.causal:
    mask &= s <= t
  if st.window is not None:
    mask &= t - s < st.window
    if not st.causal:
      mask &= s - t < st.window
  if seg_q is not None:
    mask &= seg_q == seg_k
  return mask


def _heavy_first(x, num_blocks: int, st: _Static):
  """Grid index -> query block. Causal: the last query blocks (the longest loops) are
  launched first, so the short ones fill the tail of the last wave. The query-block
  axis is the slowest grid axis (Triton's z), so this orders the whole launch."""
  return num_blocks - 1 - x if st.causal else x


def _three_loops(lo, full_lo, full_hi, hi, body, carry):
  """Runs body(j, carry, masked) over [lo, full_lo) masked, [full_lo, full_hi) unmasked,
  [full_hi, hi) masked."""
  masked = lambda j, c: body(j, c, True)
  carry = lax.fori_loop(lo, full_lo, masked, carry)
  carry = lax.fori_loop(full_lo, full_hi, lambda j, c: body(j, c, False), carry)
  return lax.fori_loop(full_hi, hi, masked, carry)


def _precision(dtype):
  return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _dot(a, b, trans_b=False):
  return plgpu.dot(a, b, trans_b=trans_b, precision=_precision(a.dtype))


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(q_ref, k_ref, v_ref, segq_ref, segk_ref, o_ref, lse_ref, *, st: _Static,
                num_blocks: int):
  """One query block of one head. q_ref [bq, D]; k_ref, v_ref [Lk_pad, D] (its KV head)."""
  bq, bk = st.blocks.block_q, st.blocks.block_k
  i = _heavy_first(pl.program_id(2), num_blocks, st)
  t0 = i * bq + st.offset
  q = q_ref[...]
  t = t0 + jnp.arange(bq, dtype=jnp.int32)
  seg_q = segq_ref[...][:, None] if st.segments else None
  c = st.scale * LOG2E

  def body(j, carry, masked):
    acc, m, l = carry
    ks = pl.ds(pl.multiple_of(j * bk, bk), bk)
    k = k_ref[ks, :]
    s2 = _dot(q, k, trans_b=True) * c  # [bq, bk] fp32
    if masked:
      seg_k = segk_ref[ks][None, :] if st.segments else None
      s = j * bk + jnp.arange(bk, dtype=jnp.int32)
      s2 = jnp.where(_visible(t[:, None], s[None, :], seg_q, seg_k, st), s2, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s2, axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s2 - m_new[:, None])
    l = l * alpha + jnp.sum(p, axis=1)
    v = v_ref[ks, :]
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
    return acc, m_new, l

  lo, hi, full_lo, full_hi = _kv_block_range(t0, bq, bk, st)
  carry = (jnp.zeros((bq, v_ref.shape[-1]), jnp.float32),
           jnp.full((bq,), _INIT_MAX, jnp.float32), jnp.zeros((bq,), jnp.float32))
  acc, m, l = _three_loops(lo, full_lo, full_hi, hi, body, carry)
  empty = l == 0.0
  o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log2(jnp.where(empty, 1.0, l)))


def _fwd(q, k, v, seg_q, seg_k, st: _Static, *, out=None, lse=None):
  """Padded inputs -> (out [B, Lq_pad, H, D], lse2 [B, H, Lq_pad] fp32).

  `out`/`lse`, when given, are aliased to the outputs (tests prefill them with NaN
  to prove that every element is written; Triton forward only).
  """
  if st.forward == "mosaic":
    return flash_mgpu.forward(q, k, v, causal=st.causal, scale=st.scale, q_len=st.q_len,
                              kv_len=st.kv_len, config=st.mosaic)
  batch, q_pad, num_heads, head_dim = q.shape
  kv_pad = k.shape[1]
  bq, g = st.blocks.block_q, st.group
  nq = q_pad // bq
  grid = (num_heads, batch, nq)
  spec = lambda shape, f: pl.BlockSpec(shape, lambda h, b, x: f(_heavy_first(x, nq, st), b, h))
  in_specs = [
      spec((None, bq, None, head_dim), lambda i, b, h: (b, i, h, 0)),
      spec((None, kv_pad, None, head_dim), lambda i, b, h: (b, 0, h // g, 0)),
      spec((None, kv_pad, None, v.shape[-1]), lambda i, b, h: (b, 0, h // g, 0)),
      None if seg_q is None else spec((None, bq), lambda i, b, h: (b, i)),
      None if seg_k is None else spec((None, kv_pad), lambda i, b, h: (b, 0)),
  ]
  out_specs = [spec((None, bq, None, v.shape[-1]), lambda i, b, h: (b, i, h, 0)),
               spec((None, None, bq), lambda i, b, h: (b, h, i))]
  out_shape = [jax.ShapeDtypeStruct((batch, q_pad, num_heads, v.shape[-1]), q.dtype),
               jax.ShapeDtypeStruct((batch, num_heads, q_pad), jnp.float32)]
  args, aliases = [q, k, v, seg_q, seg_k], {}
  if out is not None:
    in_specs += [pl.no_block_spec, pl.no_block_spec]
    args += [out, lse]
    aliases = _alias_map(args, 2)
    kernel = lambda *refs: _fwd_kernel(*refs[:5], *refs[7:], st=st, num_blocks=nq)
  else:
    kernel = functools.partial(_fwd_kernel, st=st, num_blocks=nq)
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      input_output_aliases=aliases,
      compiler_params=plgpu.CompilerParams(num_warps=st.blocks.num_warps,
                                           num_stages=st.blocks.num_stages),
      interpret=st.interpret, name="lca_flash_fwd")(*args)


# ----------------------------------------------------------------------------- backward


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, segq_ref, segk_ref,
                dk_ref, dv_ref, *, st: _Static):
  """One KV block of one KV head, summed over the `group` query heads that read it.

  q_ref, do_ref [Lq_pad, G, D]; lse_ref, delta_ref [G, Lq_pad]; k_ref, v_ref [bk, D].
  """
  bq, bk = st.blocks.block_q_dkv, st.blocks.block_k_dkv
  j = pl.program_id(2)  # causal: the low KV blocks see the most queries and start first
  s0 = j * bk
  k = k_ref[...]
  v = v_ref[...]
  s = s0 + jnp.arange(bk, dtype=jnp.int32)
  seg_k = segk_ref[...][:, None] if st.segments else None
  c = st.scale * LOG2E
  lo, hi, full_lo, full_hi = _q_block_range(s0, bq, bk, st)

  def head(g, carry):
    def body(i, carry, masked):
      dk, dv = carry
      qs = pl.ds(pl.multiple_of(i * bq, bq), bq)
      q = q_ref[qs, g, :]
      do = do_ref[qs, g, :]
      lse = lse_ref[g, qs]
      delta = delta_ref[g, qs]
      s2t = _dot(k, q, trans_b=True) * c  # [bk, bq]: keys on rows
      if masked:
        seg_q = segq_ref[qs][None, :] if st.segments else None
        t = i * bq + st.offset + jnp.arange(bq, dtype=jnp.int32)
        s2t = jnp.where(_visible(t[None, :], s[:, None], seg_q, seg_k, st), s2t, -jnp.inf)
      pt = jnp.exp2(s2t - lse[None, :])
      dv = dv + _dot(pt.astype(do.dtype), do)
      dpt = _dot(v, do, trans_b=True)
      dst = pt * (dpt - delta[None, :])
      dk = dk + _dot(dst.astype(q.dtype), q)
      return dk, dv
    return _three_loops(lo, full_lo, full_hi, hi, body, carry)

  zeros = lambda ref: jnp.zeros((bk, ref.shape[-1]), jnp.float32)
  dk, dv = lax.fori_loop(0, st.group, head, (zeros(k_ref), zeros(v_ref)))
  dk_ref[...] = (dk * st.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, segq_ref, segk_ref, dq_ref,
               *, st: _Static, num_blocks: int):
  """One query block of one head: q_ref, do_ref [bq, D], lse/delta [bq], k/v [Lk_pad, D]."""
  bq, bk = st.blocks.block_q_dq, st.blocks.block_k_dq
  i = _heavy_first(pl.program_id(2), num_blocks, st)
  t0 = i * bq + st.offset
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...]
  delta = delta_ref[...]
  t = t0 + jnp.arange(bq, dtype=jnp.int32)
  seg_q = segq_ref[...][:, None] if st.segments else None
  c = st.scale * LOG2E

  def body(j, dq, masked):
    ks = pl.ds(pl.multiple_of(j * bk, bk), bk)
    k = k_ref[ks, :]
    v = v_ref[ks, :]
    s2 = _dot(q, k, trans_b=True) * c
    if masked:
      seg_k = segk_ref[ks][None, :] if st.segments else None
      s = j * bk + jnp.arange(bk, dtype=jnp.int32)
      s2 = jnp.where(_visible(t[:, None], s[None, :], seg_q, seg_k, st), s2, -jnp.inf)
    p = jnp.exp2(s2 - lse[:, None])
    dp = _dot(do, v, trans_b=True)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k)

  lo, hi, full_lo, full_hi = _kv_block_range(t0, bq, bk, st)
  dq = _three_loops(lo, full_lo, full_hi, hi, body, jnp.zeros(q_ref.shape, jnp.float32))
  dq_ref[...] = (dq * st.scale).astype(dq_ref.dtype)


def _bwd_dkv(q, k, v, do, lse, delta, seg_q, seg_k, st: _Static, *, dk=None, dv=None):
  """-> dk, dv [B, Lk_pad, H_kv, D] in k's dtype."""
  batch, q_pad, _, head_dim = q.shape
  kv_pad, num_kv_heads = k.shape[1], k.shape[2]
  bk, g = st.blocks.block_k_dkv, st.group
  grid = (num_kv_heads, batch, kv_pad // bk)
  group_rows = lambda d: pl.BlockSpec((None, q_pad, g, d), lambda h, b, j: (b, 0, h, 0))
  kv_block = lambda d: pl.BlockSpec((None, bk, None, d), lambda h, b, j: (b, j, h, 0))
  stats = pl.BlockSpec((None, g, q_pad), lambda h, b, j: (b, h, 0))
  in_specs = [group_rows(head_dim), kv_block(head_dim), kv_block(v.shape[-1]),
              group_rows(do.shape[-1]), stats, stats,
              None if seg_q is None else pl.BlockSpec((None, q_pad), lambda h, b, j: (b, 0)),
              None if seg_k is None else pl.BlockSpec((None, bk), lambda h, b, j: (b, j))]
  out_specs = [kv_block(head_dim), kv_block(v.shape[-1])]
  out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
  args, aliases = [q, k, v, do, lse, delta, seg_q, seg_k], {}
  kernel = functools.partial(_dkv_kernel, st=st)
  if dk is not None:
    in_specs += [pl.no_block_spec, pl.no_block_spec]
    args += [dk, dv]
    aliases = _alias_map(args, 2)
    kernel = lambda *refs: _dkv_kernel(*refs[:8], *refs[10:], st=st)
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      input_output_aliases=aliases,
      compiler_params=plgpu.CompilerParams(num_warps=st.blocks.num_warps_dkv,
                                           num_stages=st.blocks.num_stages_dkv),
      interpret=st.interpret, name="lca_flash_bwd_dkv")(*args)


def _bwd_dq(q, k, v, do, lse, delta, seg_q, seg_k, st: _Static, *, dq=None):
  """-> dq [B, Lq_pad, H, D] in q's dtype."""
  batch, q_pad, num_heads, head_dim = q.shape
  kv_pad = k.shape[1]
  bq, g = st.blocks.block_q_dq, st.group
  nq = q_pad // bq
  grid = (num_heads, batch, nq)
  spec = lambda shape, f: pl.BlockSpec(shape, lambda h, b, x: f(_heavy_first(x, nq, st), b, h))
  rows = lambda d: spec((None, bq, None, d), lambda i, b, h: (b, i, h, 0))
  kv_all = lambda d: spec((None, kv_pad, None, d), lambda i, b, h: (b, 0, h // g, 0))
  stats = spec((None, None, bq), lambda i, b, h: (b, h, i))
  in_specs = [rows(head_dim), kv_all(head_dim), kv_all(v.shape[-1]), rows(do.shape[-1]),
              stats, stats,
              None if seg_q is None else spec((None, bq), lambda i, b, h: (b, i)),
              None if seg_k is None else spec((None, kv_pad), lambda i, b, h: (b, 0))]
  args, aliases = [q, k, v, do, lse, delta, seg_q, seg_k], {}
  kernel = functools.partial(_dq_kernel, st=st, num_blocks=nq)
  if dq is not None:
    in_specs += [pl.no_block_spec]
    args += [dq]
    aliases = _alias_map(args, 1)
    kernel = lambda *refs: _dq_kernel(*refs[:8], *refs[9:], st=st, num_blocks=nq)
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=rows(head_dim),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), input_output_aliases=aliases,
      compiler_params=plgpu.CompilerParams(num_warps=st.blocks.num_warps_dq,
                                           num_stages=st.blocks.num_stages_dq),
      interpret=st.interpret, name="lca_flash_bwd_dq")(*args)


def _alias_map(args, num_outputs: int) -> dict:
  """The last `num_outputs` args alias the outputs (indices count non-None args only)."""
  first = sum(a is not None for a in args) - num_outputs
  return {first + i: i for i in range(num_outputs)}


def _delta(out, do):
  """D = rowsum(dO * O) -> [B, H, Lq] fp32 (one fused elementwise pass in XLA)."""
  d = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  return jnp.swapaxes(d, 1, 2)


# ----------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, seg_q, seg_k, st):
  return _fwd(q, k, v, seg_q, seg_k, st)[0]


def _flash_fwd(q, k, v, seg_q, seg_k, st):
  out, lse = _fwd(q, k, v, seg_q, seg_k, st)
  return out, (q, k, v, seg_q, seg_k, out, lse)


def _flash_bwd(st, res, do):
  q, k, v, seg_q, seg_k, out, lse = res
  delta = _delta(out, do)
  dk, dv = _bwd_dkv(q, k, v, do, lse, delta, seg_q, seg_k, st)
  dq = _bwd_dq(q, k, v, do, lse, delta, seg_q, seg_k, st)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- public API


def check_args(q, k, v, *, window, scale, segment_ids, kv_segment_ids, block_sizes) -> None:
  """ValueError/TypeError naming the argument, before anything is traced."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(f"{name} must be [batch, seq, heads, head_dim], got shape {getattr(x, 'shape', x)}")
    if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
      raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
  if not q.dtype == k.dtype == v.dtype:
    raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
  if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0]:
    raise ValueError(f"q, k, v disagree on batch/seq/heads: q {q.shape}, k {k.shape}, v {v.shape}")
  if q.shape[3] != k.shape[3]:
    raise ValueError(f"head_dim mismatch: q {q.shape}, k {k.shape}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"num_q_heads={q.shape[2]} must be a multiple of num_kv_heads={k.shape[2]}")
  if min(q.shape[1], k.shape[1]) == 0:
    raise ValueError(f"empty sequence: q {q.shape}, k {k.shape}")
  if window is not None and (not isinstance(window, (int, np.integer)) or isinstance(window, bool)
                             or window <= 0):
    raise ValueError(f"window must be a positive int or None, got window={window!r}")
  if scale is not None and not (isinstance(scale, (int, float, np.floating)) and math.isfinite(scale)):
    raise ValueError(f"scale must be a finite Python float or None, got scale={scale!r}")
  for name, seg, length in (("segment_ids", segment_ids, q.shape[1]),
                            ("kv_segment_ids", kv_segment_ids, k.shape[1])):
    if seg is None:
      continue
    if seg.shape != (q.shape[0], length):
      raise ValueError(f"{name} must be [batch={q.shape[0]}, seq={length}], got shape {seg.shape}")
    if not jnp.issubdtype(seg.dtype, jnp.integer):
      raise TypeError(f"{name} must be an integer array, got {seg.dtype}")
  if kv_segment_ids is not None and segment_ids is None:
    raise ValueError("kv_segment_ids needs segment_ids for the queries")
  if segment_ids is not None and kv_segment_ids is None and q.shape[1] != k.shape[1]:
    raise ValueError(f"segment_ids alone needs Lq == Lk (got q {q.shape}, k {k.shape}); "
                     "pass kv_segment_ids")
  if block_sizes is not None:
    if not isinstance(block_sizes, BlockSizes):
      raise TypeError(f"block_sizes must be a flash.BlockSizes, got {type(block_sizes).__name__}")
    block_sizes.validate()


def choose_forward_kernel(q, k, v, *, forward_kernel: str = "auto", causal: bool = True,
                          window: int | None = None, scale: float | None = None,
                          segment_ids=None, interpret: bool | None = None) -> str:
  """-> "triton" or "mosaic" for `flash_attention(..., forward_kernel=)` (see the module
  docstring). ValueError for an unknown name, or "mosaic" on a case it cannot run."""
  if forward_kernel not in FORWARD_KERNELS:
    raise ValueError(f"forward_kernel must be one of {FORWARD_KERNELS}, got {forward_kernel!r}")
  if forward_kernel == "triton":
    return "triton"
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
  reason = flash_mgpu.supported(q, k, v, causal=causal, window=window, scale=scale,
                                segment_ids=segment_ids,
                                interpret=resolve_interpret(interpret))
  if reason is None:
    return "mosaic"
  if forward_kernel == "mosaic":
    raise ValueError(f"forward_kernel='mosaic' cannot run this case: {reason}")
  return "triton"


def flash_attention(q, k, v, *, causal: bool = True, window: int | None = None,
                    scale: float | None = None, segment_ids=None, kv_segment_ids=None,
                    block_sizes: BlockSizes | None = None, interpret: bool | None = None,
                    forward_kernel: str = "auto"):
  """Exact softmax attention in O(L) memory, differentiable (Pallas dK/dV and dQ kernels).

  Args:
    q: [B, Lq, H, D]; k, v: [B, Lk, H_kv, D] with H a multiple of H_kv (GQA: query head
      h reads KV head h // (H // H_kv); nothing is repeated in memory).
    causal: key s visible to query t iff s <= t. Positions are bottom-right aligned:
      query i sits at key position i + Lk - Lq.
    window: sliding window w: t - s < w (and s - t < w when not causal). Blocks
      outside the band are skipped, so the cost is O(L * w).
    scale: logit scale, default 1/sqrt(D).
    segment_ids: [B, Lq] ints for packed sequences (keys use kv_segment_ids [B, Lk],
      default segment_ids).
    block_sizes: tiles and launch parameters, default `BlockSizes.default(D, dtype)`.
    interpret: None = interpret mode when the default backend is CPU.
    forward_kernel: "auto" (Mosaic GPU forward on sm_90 when it supports the case, else
      Triton), "triton" or "mosaic" (ValueError naming the reason if it cannot run).
  Returns:
    [B, Lq, H, D] in q's dtype; a row that sees no key is zeros.
  """
  check_args(q, k, v, window=window, scale=scale, segment_ids=segment_ids,
             kv_segment_ids=kv_segment_ids, block_sizes=block_sizes)
  forward = choose_forward_kernel(q, k, v, forward_kernel=forward_kernel, causal=causal,
                                  window=window, scale=scale, segment_ids=segment_ids,
                                  interpret=interpret)
  batch, q_len, num_heads, head_dim = q.shape
  kv_len, num_kv_heads = k.shape[1], k.shape[2]
  scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
  blocks = (block_sizes or BlockSizes.default(head_dim, q.dtype)).fit(q_len, kv_len)
  if segment_ids is not None and kv_segment_ids is None:
    kv_segment_ids = segment_ids
  st = _Static(causal=bool(causal), window=None if window is None else int(window), scale=scale,
               q_len=q_len, kv_len=kv_len, group=num_heads // num_kv_heads,
               segments=segment_ids is not None, blocks=blocks,
               interpret=resolve_interpret(interpret), forward=forward,
               mosaic=(flash_mgpu.Config.default(flash_mgpu.padded_head_dim(head_dim))
                       if forward == "mosaic" else None))
  # Pad to a multiple of every tile that walks the axis (all powers of two: the max).
  q_tile = max(blocks.block_q, blocks.block_q_dkv, blocks.block_q_dq,
               st.mosaic.q_tile if st.mosaic else 1)
  kv_tile = max(blocks.block_k, blocks.block_k_dkv, blocks.block_k_dq,
                st.mosaic.block_kv if st.mosaic else 1)
  q_pad = pl.cdiv(q_len, q_tile) * q_tile
  kv_pad = pl.cdiv(kv_len, kv_tile) * kv_tile
  # head dims padded to powers of two, q·k's and v's each on its own (they may differ)
  pad = lambda x, length: pad_axis(pad_axis(x, 1, length), 3, _pow2_at_least(x.shape[-1]))
  seg_q = pad_axis(None if segment_ids is None else segment_ids.astype(jnp.int32), 1, q_pad, -1)
  seg_k = pad_axis(None if kv_segment_ids is None else kv_segment_ids.astype(jnp.int32), 1,
                    kv_pad, -2)
  out = _flash(pad(q, q_pad), pad(k, kv_pad), pad(v, kv_pad), seg_q, seg_k, st)
  return out[:, :q_len, :, :v.shape[-1]]


def flash_reference(q, k, v, *, causal: bool = True, window: int | None = None,
                    scale: float | None = None, segment_ids=None, kv_segment_ids=None,
                    block_sizes=None, interpret=None, forward_kernel=None):
  """The plain-jnp twin of `flash_attention` (block_sizes, interpret, forward_kernel
  ignored)."""
  del block_sizes, interpret, forward_kernel
  from lca.attention import full  # pylint: disable=g-import-not-at-top
  return full.attention_reference(q, k, v, causal=causal, window=window, scale=scale,
                                  segment_ids=segment_ids, kv_segment_ids=kv_segment_ids)
