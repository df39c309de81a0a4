"""DSA sparse gather attention: each query attends to its own K selected keys (Pallas, Triton).

  out[t, h] = sum_{n<K} softmax_n(scale * q[t, h] . k[idx[t, n]]) v[idx[t, n]]   (idx -1 = none)

One program owns one query t and a block of the query heads that share a KV head
(the whole group in MQA / MLA form, where every head reads the same latent row). It
walks the query's K indices block_k at a time: gathers those K/V rows by index
(one row serves every head of the block), one MMA for the logits, the online
softmax, one MMA into the accumulator. Decode (few queries) splits the K indices
over `num_splits` programs and merges their partial softmaxes (flash-decoding).

Backward (custom_vjp, two Pallas kernels): the same walk recomputes p from the saved
log-sum-exp and accumulates dq in registers (one program per query and head block); a
second kernel, one program per query and block of its gathered rows, sums those rows'
dk, dv over all head blocks of the group and adds them with one atomic add per row into
fp32 buffers (rows chosen by many queries collect from all of them; invalid slots go to
a trash row). An atomic add per head block instead was 1.5x slower (NOTES_dsa.md).

Shared K = V (`v=None` or `v is k`: MLA's absorbed MQA form, k = v = the latent): the
kernels gather each row once and use the tile for both MMAs (half the gathered bytes;
measured: only ~4% faster, the second gather hit the caches; see NOTES_dsa.md),
and the backward adds dk + dv into one buffer (one atomic add per row).

Triton tiles are powers of two: head_dim and v's head_dim are zero-padded to the
next power of two (>= 16), and the head block to >= 16 rows.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import resolve_interpret


@dataclasses.dataclass(frozen=True)
class SparseBlocks:
  block_h: int = 32        # query heads per program (of one KV head's group)
  block_k: int = 32        # gathered rows per step
  num_splits: int = 1      # programs per query over its K indices (decode: > 1)
  num_warps: int = 4
  num_stages: int = 2
  bwd_num_warps: int | None = None   # backward; None: 8 for head dims > 256 (its dq and do
                                     # tiles), else num_warps
  bwd_block_k: int | None = None     # backward rows per step; None: block_k
  bwd_block_h: int | None = None     # backward heads per program; None: block_h (64 heads at a
                                     # 512-dim latent overflow the shared memory in the backward)


MAX_BLOCK_H = 32   # head block cap, except the wide-latent prefill (see default_blocks)


def default_blocks(q_len: int, top_k: int, dim: int, group: int) -> SparseBlocks:
  """Launch parameters measured on an H100 (MQA 128 heads x 512 latent, top-k 2048; NOTES_dsa.md).

  Prefill: 64 rows a step (32 -> 64 rows took 32k from 97 to 77 ms). Heads per program: 32 at
  4 warps (8 -> 4 warps took 128k from 808 to 373 ms), or, for head dims > 256 (MLA's latent),
  64 at 8 warps (each gathered row then serves 64 heads: 128k 320 -> 289 ms, session 7). 128
  heads do not fit the registers. The backward keeps 32 heads a program (64 overflow the shared
  memory at a 512-dim latent), 32 rows a step (64: 3x slower) and, for head dims > 256, 8 warps.
  Decode (split K over programs) keeps 32 heads, 32 rows and, for head dims > 256, 8 warps, as
  measured in session 3.
  """
  splits = 1 if q_len > 64 else max(1, min(32, top_k // 128))
  wide_prefill = splits == 1 and dim > 256
  block_h = min(2 * MAX_BLOCK_H if wide_prefill else MAX_BLOCK_H, max(16, pl.next_power_of_2(group)))
  return SparseBlocks(block_h=block_h, block_k=64 if splits == 1 else 32, num_splits=splits,
                      num_warps=8 if dim > 256 and (splits > 1 or block_h > MAX_BLOCK_H) else 4,
                      bwd_block_k=32, bwd_block_h=min(block_h, MAX_BLOCK_H))


def _fwd_kernel(*refs, scale, block_k, steps, shared):
  """q [bh, D]; k [S, D]; v [S, Dv] (absent when shared: v = k); idx [K/splits]; o [bh, Dv]; lse [bh]."""
  if shared:
    (q_ref, k_ref, idx_ref, o_ref, lse_ref), v_ref = refs, None
  else:
    q_ref, k_ref, v_ref, idx_ref, o_ref, lse_ref = refs
  q = q_ref[...]
  bh = q.shape[0]

  def body(i, carry):
    acc, m, l = carry
    ids = idx_ref[pl.ds(i * block_k, block_k)]
    valid = ids >= 0
    rows = jnp.where(valid, ids, 0)
    kg = k_ref[rows, :]                                            # gather [bk, D]
    vg = kg if shared else v_ref[rows, :]
    s = plgpu.dot(q, kg, trans_b=True) * scale                     # [bh, bk]
    s = jnp.where(valid[None, :], s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - m_safe[:, None])
    alpha = jnp.exp(m - m_safe)
    l = l * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + plgpu.dot(p.astype(vg.dtype), vg)
    return acc, m_new, l

  init = (jnp.zeros((bh, o_ref.shape[-1]), jnp.float32), jnp.full((bh,), -jnp.inf, jnp.float32),
          jnp.zeros((bh,), jnp.float32))
  acc, m, l = jax.lax.fori_loop(0, steps, body, init)
  l_safe = jnp.where(l > 0, l, 1.0)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(l > 0, m + jnp.log(l_safe), -jnp.inf)


def _layout(q, k, v, indices, blocks):
  """Pads head dims to powers of two, the group to the head block, K to block_k * splits.

  Returns q5 [B, L, H_kv, Gp, Dp], k [B, S, H_kv, Dp], v [B, S, H_kv, Dvp] (None when
  shared), idx [B, L, Kp].
  """
  batch, q_len, num_heads, dim = q.shape
  num_kv_heads = k.shape[2]
  group = num_heads // num_kv_heads
  dp = max(16, pl.next_power_of_2(dim))
  gp = -(-group // blocks.block_h) * blocks.block_h
  kmult = blocks.block_k * blocks.num_splits
  kp = -(-indices.shape[-1] // kmult) * kmult
  q5 = q.reshape(batch, q_len, num_kv_heads, group, dim)
  q5 = jnp.pad(q5, [(0, 0), (0, 0), (0, 0), (0, gp - group), (0, dp - dim)])
  k = jnp.pad(k, [(0, 0), (0, 0), (0, 0), (0, dp - dim)])
  if v is not None:
    dvp = max(16, pl.next_power_of_2(v.shape[-1]))
    v = jnp.pad(v, [(0, 0), (0, 0), (0, 0), (0, dvp - v.shape[-1])])
  idx = jnp.pad(indices.astype(jnp.int32), [(0, 0), (0, 0), (0, kp - indices.shape[-1])],
                constant_values=-1)
  return q5, k, v, idx


def _forward(q, k, v, indices, scale, blocks, interpret):
  """v None: shared (v = k). -> out [B, L, H, Dv] (q.dtype), lse [B, L, H_kv, Gp] f32."""
  shared = v is None
  batch, q_len, num_heads, _ = q.shape
  num_kv_heads, kv_len = k.shape[2], k.shape[1]
  dv = (k if shared else v).shape[-1]
  group = num_heads // num_kv_heads
  q5, kp, vp, idx = _layout(q, k, v, indices, blocks)
  gp, dp, ksel = q5.shape[3], q5.shape[4], idx.shape[-1]
  dvp = dp if shared else vp.shape[-1]
  bh, splits = blocks.block_h, blocks.num_splits
  per_split = ksel // splits
  grid = (batch, q_len, num_kv_heads * (gp // bh), splits)
  nhb = gp // bh
  kv_specs = [pl.BlockSpec((None, kv_len, None, dp), lambda b, t, h, s: (b, 0, h // nhb, 0))]
  if not shared:
    kv_specs.append(pl.BlockSpec((None, kv_len, None, dvp), lambda b, t, h, s: (b, 0, h // nhb, 0)))
  out, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, scale=scale, block_k=blocks.block_k,
                        steps=per_split // blocks.block_k, shared=shared),
      grid=grid,
      in_specs=[
          pl.BlockSpec((None, None, None, bh, dp), lambda b, t, h, s: (b, t, h // nhb, h % nhb, 0)),
          *kv_specs,
          pl.BlockSpec((None, None, per_split), lambda b, t, h, s: (b, t, s)),
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, None, bh, dvp), lambda b, t, h, s: (b, t, s, h // nhb, h % nhb, 0)),
          pl.BlockSpec((None, None, None, None, bh), lambda b, t, h, s: (b, t, s, h // nhb, h % nhb)),
      ],
      out_shape=[jax.ShapeDtypeStruct((batch, q_len, splits, num_kv_heads, gp, dvp),
                                      q.dtype if splits == 1 else jnp.float32),
                 jax.ShapeDtypeStruct((batch, q_len, splits, num_kv_heads, gp), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
      interpret=interpret,
      name="dsa_sparse_attention_fwd",
  )(q5, kp, *([] if shared else [vp]), idx)
  if splits > 1:   # merge the partial softmaxes
    lse_all = jax.scipy.special.logsumexp(lse, axis=2, keepdims=True)
    lse_all_safe = jnp.where(jnp.isfinite(lse_all), lse_all, 0.0)
    weight = jnp.where(jnp.isfinite(lse), jnp.exp(lse - lse_all_safe), 0.0)
    out = jnp.sum(out * weight[..., None], axis=2, keepdims=True).astype(q.dtype)
    lse = lse_all
  out = out[:, :, 0, :, :group, :dv].reshape(batch, q_len, num_heads, dv)
  return out, lse[:, :, 0]


def _row_grads(q, do, lse, delta, kg, vg, valid, scale):
  """One head block's softmax gradients at gathered rows kg [bk, D], vg [bk, Dv] (valid [bk]):
  -> ds [bh, bk] (d loss / d (q . k) · scale) and p [bh, bk]."""
  s = plgpu.dot(q, kg, trans_b=True) * scale
  p = jnp.where(valid[None, :], jnp.exp(s - lse[:, None]), 0.0)
  dp = plgpu.dot(do, vg, trans_b=True)
  return p * (dp - delta[:, None]) * scale, p


def _bwd_dq_kernel(*refs, scale, block_k, steps, shared):
  """dq [bh, D] of one query and head block (the backward's first kernel)."""
  if shared:
    (q_ref, k_ref, idx_ref, do_ref, lse_ref, delta_ref, dq_ref), v_ref = refs, None
  else:
    q_ref, k_ref, v_ref, idx_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
  q, do, delta = q_ref[...], do_ref[...], delta_ref[...]
  lse = jnp.where(lse_ref[...] == -jnp.inf, 0.0, lse_ref[...])

  def body(i, dq):
    ids = idx_ref[pl.ds(i * block_k, block_k)]
    valid = ids >= 0
    rows = jnp.where(valid, ids, 0)
    kg = k_ref[rows, :]
    ds, _ = _row_grads(q, do, lse, delta, kg, kg if shared else v_ref[rows, :], valid, scale)
    return dq + plgpu.dot(ds.astype(kg.dtype), kg)

  dq_ref[...] = jax.lax.fori_loop(0, steps, body, jnp.zeros(q.shape, jnp.float32)).astype(dq_ref.dtype)


def _bwd_dkv_kernel(*refs, scale, block_h, trash_row, shared):
  """dk, dv of block_k gathered rows of one query, summed over all head blocks of its group, then
  one atomic add per row into dk [S+1, D], dv [S+1, Dv] fp32 (shared: dk + dv into one buffer)."""
  if shared:
    q_ref, k_ref, idx_ref, do_ref, lse_ref, delta_ref, _, dk_ref = refs
    v_ref = dv_ref = None
  else:   # dk_in, dv_in are aliased with dk_ref, dv_ref (zero-initialized)
    q_ref, k_ref, v_ref, idx_ref, do_ref, lse_ref, delta_ref, _, _, dk_ref, dv_ref = refs
  ids = idx_ref[...]
  valid = ids >= 0
  rows = jnp.where(valid, ids, 0)
  kg = k_ref[rows, :]
  vg = kg if shared else v_ref[rows, :]
  dk_rows = jnp.zeros(kg.shape, jnp.float32)
  dv_rows = jnp.zeros(vg.shape, jnp.float32)
  for hb in range(q_ref.shape[0] // block_h):   # static: a few head blocks
    heads = pl.ds(hb * block_h, block_h)
    q, do = q_ref[heads, :], do_ref[heads, :]
    lse = jnp.where(lse_ref[heads] == -jnp.inf, 0.0, lse_ref[heads])
    ds, p = _row_grads(q, do, lse, delta_ref[heads], kg, vg, valid, scale)
    dv_rows += plgpu.dot(p.astype(do.dtype), do, trans_a=True)          # [bk, Dv]
    dk_rows += plgpu.dot(ds.astype(q.dtype), q, trans_a=True)           # [bk, D]
  dest = jnp.where(valid, ids, trash_row)
  cols_k = jnp.arange(kg.shape[1])
  if shared:
    plgpu.atomic_add(dk_ref, (dest[:, None], cols_k[None, :]), dk_rows + dv_rows)
  else:
    plgpu.atomic_add(dk_ref, (dest[:, None], cols_k[None, :]), dk_rows)
    plgpu.atomic_add(dv_ref, (dest[:, None], jnp.arange(vg.shape[1])[None, :]), dv_rows)


def _backward(q, k, v, indices, out, lse, dout, scale, blocks, interpret):
  """-> dq, dk, dv (v None: shared, returns dq, dk + dv, None)."""
  shared = v is None
  batch, q_len, num_heads, dim = q.shape
  num_kv_heads, kv_len = k.shape[2], k.shape[1]
  dv = (k if shared else v).shape[-1]
  group = num_heads // num_kv_heads
  blocks = dataclasses.replace(blocks, num_splits=1, block_h=blocks.bwd_block_h or blocks.block_h)
  q5, kp, vp, idx = _layout(q, k, v, indices, blocks)
  block_k = blocks.bwd_block_k or blocks.block_k
  gp, dp, ksel = q5.shape[3], q5.shape[4], idx.shape[-1]
  if ksel % block_k:
    raise ValueError(f"SparseBlocks.bwd_block_k={block_k} must divide the top-k padded to "
                     f"block_k={blocks.block_k} ({ksel})")
  dvp = dp if shared else vp.shape[-1]
  warps = blocks.bwd_num_warps or (8 if max(dp, dvp) > 256 else blocks.num_warps)
  bh, nhb = blocks.block_h, gp // blocks.block_h
  pad_g = lambda x: jnp.pad(x.reshape(batch, q_len, num_kv_heads, group, -1),
                            [(0, 0)] * 3 + [(0, gp - group), (0, 0)])
  delta = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), axis=-1)   # [B, L, H]
  delta = pad_g(delta[..., None])[..., 0]
  lse = pad_g(lse[..., :group, None])[..., 0]   # the forward's head padding may differ (block_h)
  do5 = jnp.pad(pad_g(dout), [(0, 0)] * 4 + [(0, dvp - dv)]).astype(q.dtype)
  bufs = [jnp.zeros((batch, kv_len + 1, num_kv_heads, dp), jnp.float32)]
  if not shared:
    bufs.append(jnp.zeros((batch, kv_len + 1, num_kv_heads, dvp), jnp.float32))
  n_in = 6 + (0 if shared else 1)             # q, k, (v), idx, do, lse, delta
  params = plgpu.CompilerParams(num_warps=warps, num_stages=blocks.num_stages)
  # dq: one program per (query, head block), as the forward
  head = lambda b, t, h: (b, t, h // nhb, h % nhb)
  rows_spec = lambda d: pl.BlockSpec((None, kv_len, None, d), lambda b, t, h: (b, 0, h // nhb, 0))
  dq = pl.pallas_call(
      functools.partial(_bwd_dq_kernel, scale=scale, block_k=block_k, steps=ksel // block_k,
                        shared=shared),
      grid=(batch, q_len, num_kv_heads * nhb),
      in_specs=[
          pl.BlockSpec((None, None, None, bh, dp), lambda b, t, h: (*head(b, t, h), 0)),
          rows_spec(dp), *([] if shared else [rows_spec(dvp)]),
          pl.BlockSpec((None, None, ksel), lambda b, t, h: (b, t, 0)),
          pl.BlockSpec((None, None, None, bh, dvp), lambda b, t, h: (*head(b, t, h), 0)),
          pl.BlockSpec((None, None, None, bh), head),
          pl.BlockSpec((None, None, None, bh), head),
      ],
      out_specs=pl.BlockSpec((None, None, None, bh, dp), lambda b, t, h: (*head(b, t, h), 0)),
      out_shape=jax.ShapeDtypeStruct(q5.shape, q.dtype),
      compiler_params=params, interpret=interpret, name="dsa_sparse_attention_bwd_dq",
  )(q5, kp, *([] if shared else [vp]), idx, do5, lse, delta)
  # dk, dv: one program per (query, KV head, block_k gathered rows), summed over all the group's
  # head blocks before one atomic add per row (atomics per head block instead: 1.5x slower)
  group_spec = lambda *d: pl.BlockSpec((None, None, None, gp, *d), lambda b, t, g, i: (b, t, g, 0, *[0] * len(d)))
  kv_spec = lambda d, n: pl.BlockSpec((None, n, None, d), lambda b, t, g, i: (b, 0, g, 0))
  bufs = pl.pallas_call(
      functools.partial(_bwd_dkv_kernel, scale=scale, block_h=bh, trash_row=kv_len, shared=shared),
      grid=(batch, q_len, num_kv_heads, ksel // block_k),
      in_specs=[group_spec(dp), kv_spec(dp, kv_len), *([] if shared else [kv_spec(dvp, kv_len)]),
                pl.BlockSpec((None, None, block_k), lambda b, t, g, i: (b, t, i)),
                group_spec(dvp), group_spec(), group_spec(),
                kv_spec(dp, kv_len + 1), *([] if shared else [kv_spec(dvp, kv_len + 1)])],
      out_specs=[kv_spec(dp, kv_len + 1), *([] if shared else [kv_spec(dvp, kv_len + 1)])],
      out_shape=[jax.ShapeDtypeStruct(b.shape, jnp.float32) for b in bufs],
      input_output_aliases={n_in + i: i for i in range(len(bufs))},
      compiler_params=params, interpret=interpret, name="dsa_sparse_attention_bwd_dkv",
  )(q5, kp, *([] if shared else [vp]), idx, do5, lse, delta, *bufs)
  dq = dq[:, :, :, :group, :dim].reshape(q.shape)
  dk = bufs[0][:, :kv_len, :, :dim].astype(k.dtype)
  dvv = None if shared else bufs[1][:, :kv_len, :, :dv].astype(v.dtype)
  return dq, dk, dvv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _sparse_attention(q, k, v, indices, scale, blocks, interpret):
  return _forward(q, k, v, indices, scale, blocks, interpret)[0]


def _vjp_fwd(q, k, v, indices, scale, blocks, interpret):
  out, lse = _forward(q, k, v, indices, scale, blocks, interpret)
  return out, (q, k, v, indices, out, lse)


def _vjp_bwd(scale, blocks, interpret, res, dout):
  q, k, v, indices, out, lse = res
  dq, dk, dv = _backward(q, k, v, indices, out, lse, dout, scale, blocks, interpret)
  return dq, dk, dv, None


_sparse_attention.defvjp(_vjp_fwd, _vjp_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _sparse_attention_shared(q, kv, indices, scale, blocks, interpret):
  return _forward(q, kv, None, indices, scale, blocks, interpret)[0]


def _shared_fwd(q, kv, indices, scale, blocks, interpret):
  out, lse = _forward(q, kv, None, indices, scale, blocks, interpret)
  return out, (q, kv, indices, out, lse)


def _shared_bwd(scale, blocks, interpret, res, dout):
  q, kv, indices, out, lse = res
  dq, dkv, _ = _backward(q, kv, None, indices, out, lse, dout, scale, blocks, interpret)
  return dq, dkv, None


_sparse_attention_shared.defvjp(_shared_fwd, _shared_bwd)


def sparse_attention(q, k, v, indices, *, scale: float | None = None,
                     blocks: SparseBlocks | None = None, interpret: bool | None = None):
  """q [B, L, H, D], k [B, S, H_kv, D], v [B, S, H_kv, Dv] or None, indices [B, L, K] int
  (-1 none, distinct per row) -> [B, L, H, Dv]; differentiable in q, k, v (Pallas backward).

  v None or `v is k` (MLA's absorbed form, k = v = latent): the shared path, one gather
  per row for both MMAs; its gradient for k is dk + dv.
  """
  from lca.attention import common, dsa  # pylint: disable=g-import-not-at-top
  shared = v is None or v is k
  common.check_qkv(q, k, k if v is None else v)
  dsa.check_indices(q, k, indices)
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
  group = q.shape[2] // k.shape[2]
  blocks = blocks or default_blocks(q.shape[1], indices.shape[-1], q.shape[-1], group)
  if shared:
    return _sparse_attention_shared(q, k, indices.astype(jnp.int32), scale, blocks,
                                    resolve_interpret(interpret))
  return _sparse_attention(q, k, v, indices.astype(jnp.int32), scale, blocks,
                           resolve_interpret(interpret))
