"""Flash-decoding in Pallas (Triton lowering): a few query tokens against a long KV cache.

  flash_decode(q, k_cache, v_cache, kv_lengths, *, scale, ...)   the kernel + combine
  flash_decode_reference(...)                                     plain jnp twin

Flash-decoding (Dao et al., 2023): one query token gives one row per head, far
too little work for a GPU if each head's program walks the whole cache. The cache
length is split into `num_splits` ranges; each program (split, batch, KV head)
attends the query rows of the *whole GQA group* (all G query heads x T tokens,
row r = t * G + g) to its range, reading each K/V block once for the group, and
writes a partial output and its log-sum-exp. A small XLA step combines the
splits: out = sum_i 2^(lse_i - lse) out_i with lse = log2 sum_i 2^lse_i.

Positions: the T query tokens of sequence b are the last T tokens of that
sequence, so token i sits at position kv_lengths[b] - T + i and sees cache slots
s <= that position. Cache slot s holds position s (a full, non-ring cache).
Blocks past a sequence's length are never loaded: the bytes read are
2 * kv_lengths * H_kv * D * itemsize per sequence, the floor of this problem.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import pad_axis, resolve_interpret

LOG2E = math.log2(math.e)
_INIT_MAX = -1e30
_TARGET_PROGRAMS = 4 * 132  # about four waves on an H100's 132 SMs


def _pow2_at_least(n: int, floor: int = 16) -> int:
  return max(floor, 1 << max(0, int(n) - 1).bit_length())


def _decode_kernel(len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale: float, tokens: int,
                   group: int, block_r: int, block_k: int, num_row_blocks: int,
                   split_len: int, capacity: int):
  """q_ref [block_r, D] rows of one GQA group; k_ref, v_ref [C, D] of its KV head."""
  split = pl.program_id(0) // num_row_blocks
  r0 = (pl.program_id(0) % num_row_blocks) * block_r
  length = jnp.minimum(len_ref[pl.program_id(1)], capacity)
  rows = r0 + jnp.arange(block_r, dtype=jnp.int32)
  pos = length - tokens + rows // group          # [block_r] query positions
  pos_min = length - tokens + r0 // group
  pos_max = length - tokens + (r0 + block_r - 1) // group
  start = split * split_len
  end = jnp.maximum(jnp.minimum(jnp.minimum(start + split_len, length), pos_max + 1), start)
  unmasked_end = jnp.maximum(jnp.minimum(end, pos_min + 1), start)
  num_full = lax.div(unmasked_end - start, block_k)
  num_all = lax.div(end - start + block_k - 1, block_k)
  q = q_ref[...]
  c = scale * LOG2E

  def body(j, carry, masked):
    acc, m, l = carry
    s0 = pl.multiple_of(start + j * block_k, block_k)
    ks = pl.ds(s0, block_k)
    s = s0 + jnp.arange(block_k, dtype=jnp.int32)
    if masked:
      in_cache = (s < length)[:, None]
      k = plgpu.load(k_ref.at[ks, :], mask=in_cache, other=0.0)
      v = plgpu.load(v_ref.at[ks, :], mask=in_cache, other=0.0)
    else:
      k = k_ref[ks, :]
      v = v_ref[ks, :]
    s2 = plgpu.dot(q, k, trans_b=True, precision=_precision(q.dtype)) * c  # [block_r, block_k]
    if masked:
      s2 = jnp.where((s[None, :] <= pos[:, None]) & (s[None, :] < length), s2, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s2, axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s2 - m_new[:, None])
    l = l * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v, precision=_precision(v.dtype))
    return acc, m_new, l

  carry = (jnp.zeros((block_r, v_ref.shape[-1]), jnp.float32),
           jnp.full((block_r,), _INIT_MAX, jnp.float32), jnp.zeros((block_r,), jnp.float32))
  carry = lax.fori_loop(0, num_full, functools.partial(body, masked=False), carry)
  acc, m, l = lax.fori_loop(num_full, num_all, functools.partial(body, masked=True), carry)
  empty = l == 0.0
  o_ref[...] = acc / jnp.where(empty, 1.0, l)[:, None]
  lse_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log2(jnp.where(empty, 1.0, l)))


def _precision(dtype):
  return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def default_num_splits(batch: int, num_kv_heads: int, num_row_blocks: int, capacity: int,
                       block_k: int) -> int:
  """Enough programs for ~4 waves, splits of at most 4096 keys, at least 4 blocks each.

  Measured on an H100 (batch 8, 8 KV heads): 9 splits best at 32k, 32 at 128k.
  """
  want = max(pl.cdiv(_TARGET_PROGRAMS, batch * num_kv_heads * num_row_blocks),
             pl.cdiv(capacity, 4096))
  return max(1, min(want, pl.cdiv(capacity, 4 * block_k)))


def check_args(q, k_cache, v_cache, kv_lengths, scale) -> None:
  for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(f"{name} must be 4-D [batch, seq, heads, head_dim], got shape "
                       f"{getattr(x, 'shape', x)}")
    if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
      raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
  if not q.dtype == k_cache.dtype == v_cache.dtype:
    raise TypeError(f"q, k_cache, v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, "
                    f"{v_cache.dtype}")
  if k_cache.shape[:3] != v_cache.shape[:3] or q.shape[0] != k_cache.shape[0]:
    raise ValueError(f"q, k_cache, v_cache disagree on batch/seq/heads: q {q.shape}, "
                     f"k_cache {k_cache.shape}, v_cache {v_cache.shape}")
  if q.shape[3] != k_cache.shape[3]:
    raise ValueError(f"head_dim mismatch: q {q.shape}, k_cache {k_cache.shape}")
  if q.shape[2] % k_cache.shape[2]:
    raise ValueError(f"num_q_heads={q.shape[2]} must be a multiple of "
                     f"num_kv_heads={k_cache.shape[2]}")
  if q.shape[1] == 0 or k_cache.shape[1] == 0:
    raise ValueError(f"empty query or cache: q {q.shape}, k_cache {k_cache.shape}")
  if getattr(kv_lengths, "shape", None) != (q.shape[0],):
    raise ValueError(f"kv_lengths must be [batch={q.shape[0]}], got shape "
                     f"{getattr(kv_lengths, 'shape', kv_lengths)}")
  if not jnp.issubdtype(kv_lengths.dtype, jnp.integer):
    raise TypeError(f"kv_lengths must be an integer array, got {kv_lengths.dtype}")
  if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
    raise ValueError(f"scale must be a finite Python float or None, got scale={scale!r}")


def flash_decode(q, k_cache, v_cache, kv_lengths, *, scale: float | None = None,
                 num_splits: int | None = None, block_k: int | None = None,
                 block_r: int = 64, num_warps: int = 4, num_stages: int = 3,
                 interpret: bool | None = None):
  """Attention of the last T tokens of each sequence over its cache -> [B, T, H, Dv].

  Args:
    q: [B, T, H, D], token i of sequence b at position kv_lengths[b] - T + i.
    k_cache, v_cache: [B, C, H_kv, D] and [B, C, H_kv, Dv]; slot s holds position s; H a
      multiple of H_kv.
    kv_lengths: [B] int, valid cache slots per sequence (including the T new tokens;
      clipped to C). Token i sees slots s <= kv_lengths - T + i.
    scale: logit scale, default 1/sqrt(D).
    num_splits: programs along the cache (default: ~4 waves of the GPU).
    block_k: keys per loop step (default 64 for head_dim <= 128 in 16-bit, else 32).
    block_r: query rows (G heads x T tokens) per program, a power of two >= 16.
  Returns:
    [B, T, H, Dv] in q's dtype; a token that sees no slot gets zeros.
  """
  check_args(q, k_cache, v_cache, kv_lengths, scale)
  batch, tokens, num_heads, head_dim = q.shape
  capacity, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
  group = num_heads // num_kv_heads
  scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
  d_pad = _pow2_at_least(head_dim)
  if block_k is None:
    block_k = 64 if d_pad * q.dtype.itemsize <= 256 else 32
  if capacity < 16:  # tiny caches: pad to one 16-key block (padded slots are never visible)
    pad = ((0, 0), (0, 16 - capacity), (0, 0), (0, 0))
    k_cache, v_cache = jnp.pad(k_cache, pad), jnp.pad(v_cache, pad)
  block_k = min(block_k, 1 << (max(capacity, 16).bit_length() - 1))  # a block fits the cache
  num_rows = tokens * group
  block_r = min(block_r, _pow2_at_least(num_rows))
  for name, value in (("block_k", block_k), ("block_r", block_r)):
    if value < 16 or value & (value - 1):
      raise ValueError(f"{name} must be a power of two >= 16, got {value}")
  num_row_blocks = pl.cdiv(num_rows, block_r)
  if num_splits is None:
    num_splits = default_num_splits(batch, num_kv_heads, num_row_blocks, capacity, block_k)
  if not isinstance(num_splits, int) or num_splits <= 0:
    raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")
  split_len = pl.cdiv(pl.cdiv(capacity, num_splits), block_k) * block_k
  num_splits = pl.cdiv(capacity, split_len)

  # [B, T, H, D] -> [B, H_kv, T*G (padded), D]: the rows of one GQA group, token-major.
  qr = q.reshape(batch, tokens, num_kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
  qr = qr.reshape(batch, num_kv_heads, num_rows, head_dim)
  qr = jnp.pad(qr, ((0, 0), (0, 0), (0, num_row_blocks * block_r - num_rows),
                    (0, d_pad - head_dim)))
  head_dim_v = v_cache.shape[-1]
  dv_pad = _pow2_at_least(head_dim_v)   # v's head dim may differ from q·k's
  k_cache = pad_axis(k_cache, -1, d_pad)
  v_cache = pad_axis(v_cache, -1, dv_pad)

  grid = (num_splits * num_row_blocks, batch, num_kv_heads)
  nr = num_row_blocks
  kernel = functools.partial(
      _decode_kernel, scale=scale, tokens=tokens, group=group, block_r=block_r,
      block_k=block_k, num_row_blocks=nr, split_len=split_len, capacity=capacity)
  cache_spec = lambda d: pl.BlockSpec((None, k_cache.shape[1], None, d), lambda x, b, h: (b, 0, h, 0))
  o, lse = pl.pallas_call(
      kernel, grid=grid,
      in_specs=[pl.no_block_spec,
                pl.BlockSpec((None, None, block_r, d_pad), lambda x, b, h: (b, h, x % nr, 0)),
                cache_spec(d_pad), cache_spec(dv_pad)],
      out_specs=[
          pl.BlockSpec((None, None, None, block_r, dv_pad),
                       lambda x, b, h: (x // nr, b, h, x % nr, 0)),
          pl.BlockSpec((None, None, None, block_r), lambda x, b, h: (x // nr, b, h, x % nr)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((num_splits, batch, num_kv_heads, nr * block_r, dv_pad), jnp.float32),
          jax.ShapeDtypeStruct((num_splits, batch, num_kv_heads, nr * block_r), jnp.float32),
      ],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=resolve_interpret(interpret), name="lca_flash_decode",
  )(kv_lengths.astype(jnp.int32), qr, k_cache, v_cache)
  out = combine_splits(o, lse)[:, :, :num_rows, :head_dim_v]
  out = out.reshape(batch, num_kv_heads, tokens, group, head_dim_v).transpose(0, 2, 1, 3, 4)
  return out.reshape(batch, tokens, num_heads, head_dim_v).astype(q.dtype)


def combine_splits(o, lse):
  """o [S, ..., R, D], lse [S, ..., R] (log2, -inf = empty split) -> [..., R, D] fp32."""
  m = jnp.max(lse, axis=0)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  w = jnp.exp2(lse - m)  # 0 for empty splits
  total = jnp.sum(w, axis=0)
  out = jnp.sum(w[..., None] * o, axis=0)
  return out / jnp.where(total > 0, total, 1.0)[..., None]


def flash_decode_reference(q, k_cache, v_cache, kv_lengths, *, scale: float | None = None,
                           **unused):
  """Plain-jnp twin of `flash_decode` through `full.attention_reference` with positions."""
  del unused
  from lca.attention import full  # pylint: disable=g-import-not-at-top
  check_args(q, k_cache, v_cache, kv_lengths, scale)
  batch, tokens = q.shape[:2]
  capacity = k_cache.shape[1]
  lengths = jnp.minimum(kv_lengths.astype(jnp.int32), capacity)[:, None]
  q_pos = lengths - tokens + jnp.arange(tokens, dtype=jnp.int32)[None, :]
  slots = jnp.broadcast_to(jnp.arange(capacity, dtype=jnp.int32), (batch, capacity))
  kv_pos = jnp.where(slots < lengths, slots, -1)
  return full.attention_reference(q, k_cache, v_cache, causal=True, scale=scale,
                                  q_positions=q_pos, kv_positions=kv_pos)
