"""DSA sparse gather attention: each query attends to its own K selected keys (Pallas, Triton).

  out[t, h] = sum_{n<K} softmax_n(scale * q[t, h] . k[idx[t, n]]) v[idx[t, n]]   (idx -1 = none)

One program owns one query t and a block of the query heads that share a KV head
(the whole group in MQA / MLA form, where every head reads the same latent row). It
walks the query's K indices block_k at a time: gathers those K/V rows by index
(one row serves every head of the block), one MMA for the logits, the online
softmax, one MMA into the accumulator. Decode (few queries) splits the K indices
over `num_splits` programs and merges their partial softmaxes (flash-decoding).
`dv_splits` splits the value dims over programs instead (each computes the logits
itself; with k = v it reads the latent as column blocks, its own value block first,
and uses that block as its value tile), and `heads_together` orders the grids so that a
query's programs run side by side (forward and backward).

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

MLA's split key (`k_rope`, shared path only): DeepSeek-V3.2 attends with a 576-dim key,
[c_KV (512) ; k_R (64)], and the 512-dim latent c_KV as the value. q then carries D + R
dims; the kernels gather the R-dim RoPE rows beside the latent rows and add a second,
small MMA to the logits (padding 576 to one power of two, 1024, would double the
gathered bytes and the QK MMA).

On an sm_90 GPU, MLA's prefill forward (k = v = a 512-dim latent, a 64-dim RoPE key, bf16)
runs the Mosaic GPU kernel of dsa_attention_mgpu.py instead (wgmma over 64 heads, rows
gathered by cp.async; 1.76x the Triton forward at 128k on an H200, session 24); the backward
stays these Triton kernels (`SparseBlocks.forward_kernel`).

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

from pallas_kernels import FORWARD_KERNELS
from pallas_kernels import dsa_attention_mgpu
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
  bwd_num_stages: int | None = None  # backward; None: num_stages
  dv_splits: int = 1       # forward: programs a (query, head block)'s value dims are split over,
                           # each computing the logits itself (64 heads then fit the 4-warp
                           # accumulator: an M = 64 MMA; 1.5x slower at 128k, session 19)
  heads_together: bool = False   # a query's programs run side by side: its head blocks (the
                                 # later ones read its gathered rows from L2; forward and dq), its
                                 # row blocks in the dk/dv kernel (its q and dO from L2), not one
                                 # block over consecutive queries (default_blocks: at prefill)
  forward_kernel: str = "auto"   # "auto": the Mosaic GPU forward (dsa_attention_mgpu.py, wgmma)
                                 # where it runs the case (an sm_90 GPU, MLA's 512 + 64 key, bf16,
                                 # heads a multiple of 64, one split), else Triton; "triton";
                                 # "mosaic" (an error naming the reason where it cannot run)

  def __post_init__(self):
    if self.forward_kernel not in FORWARD_KERNELS:
      raise ValueError(f"SparseBlocks.forward_kernel must be one of {FORWARD_KERNELS}, got "
                       f"{self.forward_kernel!r}")


LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
MAX_BLOCK_H = 32   # head block cap, except the wide-latent prefill (see default_blocks)


def default_blocks(q_len: int, top_k: int, dim: int, group: int, rope_dim: int = 0) -> SparseBlocks:
  """Launch parameters measured on an H100 (MQA 128 heads x 512 latent, top-k 2048; NOTES_dsa.md).

  Prefill: 64 rows a step (32 -> 64 rows took 32k from 97 to 77 ms). Heads per program: 32 at
  4 warps (8 -> 4 warps took 128k from 808 to 373 ms), or, for head dims > 256 (MLA's latent),
  64 at 8 warps (each gathered row then serves 64 heads: 128k 320 -> 289 ms, session 7). 128
  heads do not fit the registers. The backward keeps 32 heads a program (64 overflow the shared
  memory at a 512-dim latent), 32 rows a step (64: 3x slower) and, for head dims > 256, 8 warps.
  Decode (split K over programs) keeps 32 heads, 32 rows and, for head dims > 256, 8 warps, as
  measured in session 3. With MLA's RoPE key part (rope_dim > 0) at head dims > 256 the 8-warp
  backward overflows the shared memory (287 KB at 512 + 64): it runs at 4 warps (session 8);
  and the forward is faster at 32 heads and 4 warps than at 64 and 8 (512 + 64: 32k 87 -> 80 ms,
  128k 353 -> 338 ms; session 9, sweep_sparse_s9e/s9f), and, with the exp2 softmax, at 3 stages
  than 2 (H200: 128k 334 -> 323 ms, 32k 79.8 -> 77.5; session 15); the backward keeps 2 (it is
  near the shared-memory limit at 4 warps with the RoPE tiles). The prefill forward runs a
  query's head blocks side by side (`heads_together`: its gathered rows come from L2 for all but
  the first; H200, 512 + 64: 128k 318 -> 293 ms, 32k 74.0 -> 72.6; session 19), and so do the
  backward's kernels (dq: its head blocks; dk/dv: its row blocks, which read its q and dO from
  L2; forward + backward at 64k 2003 -> 1644 ms, session 19). The split-K
  decode with the RoPE key gathers 64 rows a step at 2 stages (one 128k query, 3 rounds in
  turn: 0.0198 vs 0.0267 ms for 32 rows at 3 stages, the step 0.0575 vs 0.0639; session 19).
  """
  splits = 1 if q_len > 64 else max(1, min(32, top_k // 128))
  wide_prefill = splits == 1 and dim > 256 and not rope_dim
  block_h = min(2 * MAX_BLOCK_H if wide_prefill else MAX_BLOCK_H, max(16, pl.next_power_of_2(group)))
  wide_rope_prefill = splits == 1 and dim > 256 and rope_dim > 0
  wide_rope_decode = splits > 1 and dim > 256 and rope_dim > 0
  return SparseBlocks(block_h=block_h, block_k=64 if splits == 1 or wide_rope_decode else 32, num_splits=splits,
                      num_warps=8 if dim > 256 and (splits > 1 or block_h > MAX_BLOCK_H) else 4,
                      num_stages=3 if wide_rope_prefill or (splits > 1 and rope_dim and not wide_rope_decode) else 2,
                      heads_together=splits == 1, bwd_num_stages=2,
                      bwd_block_k=32, bwd_block_h=min(block_h, MAX_BLOCK_H),
                      bwd_num_warps=4 if rope_dim and dim > 256 else None)


def _unpack(refs, shared, rope):
  """Kernel refs in call order: q, [q_rope], k, [v unless shared], [k_rope], rest..."""
  refs = list(refs)
  q_ref = refs.pop(0)
  qr_ref = refs.pop(0) if rope else None
  k_ref = refs.pop(0)
  v_ref = None if shared else refs.pop(0)
  kr_ref = refs.pop(0) if rope else None
  return q_ref, qr_ref, k_ref, v_ref, kr_ref, refs


def _logits(q, qr, kg, krg, scale):
  """scale * [q ; qr] . [kg ; krg] -> [bh, bk] f32 (qr, krg None: no RoPE part)."""
  s = plgpu.dot(q, kg, trans_b=True)
  if qr is not None:
    s += plgpu.dot(qr, krg, trans_b=True)
  return s * scale


def _fwd_kernel(*refs, scale, block_k, steps, parts, shared, rope):
  """q [bh, D] as `parts` column blocks; (q_rope [bh, R]); k [S, D] as the same column blocks;
  v [S, Dv] (absent when shared: v = k's first block); (k_rope [S, R]); idx [K/splits];
  o [bh, Dv]; lse [bh]."""
  refs = list(refs)
  q_refs = [refs.pop(0) for _ in range(parts)]
  qr_ref = refs.pop(0) if rope else None
  k_refs = [refs.pop(0) for _ in range(parts)]
  v_ref = None if shared else refs.pop(0)
  kr_ref = refs.pop(0) if rope else None
  idx_ref, o_ref, lse_ref = refs
  qs = [r[...] for r in q_refs]
  qr = qr_ref[...] if rope else None
  bh = qs[0].shape[0]

  def body(i, carry):
    acc, m, l = carry
    ids = idx_ref[pl.ds(i * block_k, block_k)]
    valid = ids >= 0
    rows = jnp.where(valid, ids, 0)
    kgs = [r[rows, :] for r in k_refs]                             # gather [bk, D / parts] each
    vg = kgs[0] if shared else v_ref[rows, :]
    # log2 domain: exp2 is one MUFU instruction, jnp.exp lowers to libdevice's accurate expf
    # (128k: 330 vs 340 ms; the backward kept jnp.exp: 5% slower with exp2 there, session 15)
    s = sum(plgpu.dot(q, kg, trans_b=True) for q, kg in zip(qs, kgs))
    if rope:
      s += plgpu.dot(qr, kr_ref[rows, :], trans_b=True)
    s = jnp.where(valid[None, :], s * (scale * LOG2E), -jnp.inf)   # [bh, bk]
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp2(s - m_safe[:, None])
    alpha = jnp.exp2(m - m_safe)
    l = l * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + plgpu.dot(p.astype(vg.dtype), vg)
    return acc, m_new, l

  init = (jnp.zeros((bh, o_ref.shape[-1]), jnp.float32), jnp.full((bh,), -jnp.inf, jnp.float32),
          jnp.zeros((bh,), jnp.float32))
  acc, m, l = jax.lax.fori_loop(0, steps, body, init)
  l_safe = jnp.where(l > 0, l, 1.0)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(l > 0, (m + jnp.log2(l_safe)) * LN2, -jnp.inf)   # natural log


def _pad_dim(x, to):
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, to - x.shape[-1])])


def _pow2(d):
  return max(16, pl.next_power_of_2(d))


def _layout(q, k, v, k_rope, indices, blocks):
  """Pads head dims to powers of two, the group to the head block, K to block_k * splits.

  Returns q_parts, k [B, S, H_kv, Dp], v [B, S, H_kv, Dvp] (None when shared), k_rope
  [B, S, H_kv, Rp] or None, idx [B, L, Kp]. q_parts: [(q5, Dp, 0)] or, with k_rope, q's latent
  and RoPE parts as (array [B, L, H_kv, Gp, *], block width, block index along the last dim):
  both views of one [.., D + R] array when D and R are powers of two and R divides D (V3.2's
  512 + 64: no copy of q, which is 19 GB at 128k x 128 heads), else two zero-padded copies.
  """
  batch, q_len, num_heads, _ = q.shape
  num_kv_heads, dim = k.shape[2], k.shape[3]
  group = num_heads // num_kv_heads
  gp = -(-group // blocks.block_h) * blocks.block_h
  kmult = blocks.block_k * blocks.num_splits
  kp = -(-indices.shape[-1] // kmult) * kmult
  heads = lambda x: jnp.pad(x.reshape(batch, q_len, num_kv_heads, group, -1),
                            [(0, 0)] * 3 + [(0, gp - group), (0, 0)])
  dp = _pow2(dim)
  if k_rope is None:
    q_parts = [(_pad_dim(heads(q), dp), dp, 0)]
  else:
    rope = k_rope.shape[-1]
    rp = _pow2(rope)
    if dp == dim and rp == rope and dim % rope == 0:
      q5 = heads(q)
      q_parts = [(q5, dim, 0), (q5, rope, dim // rope)]
    else:
      q_parts = [(_pad_dim(heads(q[..., :dim]), dp), dp, 0), (_pad_dim(heads(q[..., dim:]), rp), rp, 0)]
  k = _pad_dim(k, dp)
  v = None if v is None else _pad_dim(v, _pow2(v.shape[-1]))
  k_rope = None if k_rope is None else _pad_dim(k_rope, _pow2(k_rope.shape[-1]))
  idx = jnp.pad(indices.astype(jnp.int32), [(0, 0), (0, 0), (0, kp - indices.shape[-1])],
                constant_values=-1)
  return q_parts, k, v, k_rope, idx


def _present(*xs):
  return [x for x in xs if x is not None]


def _named_ids(order, index_map):
  """An index map over grid axes named by `order`'s letters, as a BlockSpec takes it (ids in
  grid order): lets one index map serve either grid order."""
  return lambda *ids: index_map(**dict(zip(order, ids)))


def _grid(order, **sizes):
  """The grid of the axes named by `order`'s letters, in that order."""
  return tuple(sizes[a] for a in order)


def _mosaic_unavailable(q, k, v, k_rope, indices, scale, blocks, interpret) -> str | None:
  """None when the Mosaic GPU forward runs this call, else why not."""
  if v is not None:
    return "separate k and v (the Mosaic forward is MLA's shared k = v only)"
  if blocks.num_splits != 1 or blocks.dv_splits != 1:
    return f"num_splits={blocks.num_splits}, dv_splits={blocks.dv_splits} (1 and 1 only)"
  return dsa_attention_mgpu.supported(q, k, k_rope, indices, scale=scale, interpret=interpret)


def _forward(q, k, v, k_rope, indices, scale, blocks, interpret):
  """v None: shared (v = k). -> out [B, L, H, Dv] (q.dtype), lse [B, L, H_kv, Gp] f32."""
  if blocks.forward_kernel != "triton":
    why_not = _mosaic_unavailable(q, k, v, k_rope, indices, scale, blocks, interpret)
    if why_not is None:
      out, lse = dsa_attention_mgpu.forward(q, k, k_rope, indices, scale=scale)
      return out, lse[:, :, None, :]
    if blocks.forward_kernel == "mosaic":
      raise ValueError(f"SparseBlocks.forward_kernel='mosaic' cannot run this call: {why_not}")
  shared, rope = v is None, k_rope is not None
  batch, q_len, num_heads, _ = q.shape
  num_kv_heads, kv_len = k.shape[2], k.shape[1]
  dv = (k if shared else v).shape[-1]
  group = num_heads // num_kv_heads
  dvs = blocks.dv_splits
  q_parts, kp, vp, krp, idx = _layout(q, k, v, k_rope, indices, blocks)
  gp, ksel = q_parts[0][0].shape[3], idx.shape[-1]
  dvp = (kp if shared else vp).shape[-1]
  if dvs < 1 or dvp % dvs or dvp // dvs < 16:
    raise ValueError(f"SparseBlocks.dv_splits must split the value dims ({dvp}, padded) into parts of "
                     f">= 16, got dv_splits={dvs}")
  dvb = dvp // dvs
  bh, splits = blocks.block_h, blocks.num_splits
  per_split = ksel // splits
  nhb = gp // bh
  # Grid axes: d value-dim part, b batch, t query, h (KV head, head block), s K split.
  # Pallas-Triton folds the leading axes into CUDA's x, the first fastest, and CUDA starts x
  # before y: the value-dim parts of one (query, head block) run side by side, and with
  # `heads_together` also the head blocks of one query (their gathered rows then come from L2).
  order = "dhbts" if blocks.heads_together else "dbths"
  imap = functools.partial(_named_ids, order)
  # With the value dims split and k = v, each program reads the latent in dvs column blocks, its
  # own value block first, and uses that block as its value tile: one gather per row (the
  # logits are the sum of the blocks' products).
  parts = dvs if shared else 1
  own = lambda d, j: (d + j) % dvs if shared else 0
  col = dvb if shared else kp.shape[-1]
  (q_lat, _, _), q_rope = q_parts[0], q_parts[1:]
  q_specs = [(q_lat, pl.BlockSpec((None, None, None, bh, col), imap(
      lambda d, b, t, h, s, j=j: (b, t, h // nhb, h % nhb, own(d, j))))) for j in range(parts)]
  q_specs += [(x, pl.BlockSpec((None, None, None, bh, w), imap(
      lambda d, b, t, h, s, j=j: (b, t, h // nhb, h % nhb, j)))) for x, w, j in q_rope]
  k_specs = [(kp, pl.BlockSpec((None, kv_len, None, col), imap(
      lambda d, b, t, h, s, j=j: (b, 0, h // nhb, own(d, j))))) for j in range(parts)]
  if not shared:
    k_specs.append((vp, pl.BlockSpec((None, kv_len, None, dvb), imap(lambda d, b, t, h, s: (b, 0, h // nhb, d)))))
  if rope:
    k_specs.append((krp, pl.BlockSpec((None, kv_len, None, krp.shape[-1]), imap(
        lambda d, b, t, h, s: (b, 0, h // nhb, 0)))))
  out, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, scale=scale, block_k=blocks.block_k, steps=per_split // blocks.block_k,
                        parts=parts, shared=shared, rope=rope),
      grid=_grid(order, d=dvs, b=batch, t=q_len, h=num_kv_heads * nhb, s=splits),
      in_specs=[spec for _, spec in q_specs + k_specs]
      + [pl.BlockSpec((None, None, per_split), imap(lambda d, b, t, h, s: (b, t, s)))],
      out_specs=[   # every value-dim part writes the same lse
          pl.BlockSpec((None, None, None, None, bh, dvb),
                       imap(lambda d, b, t, h, s: (b, t, s, h // nhb, h % nhb, d))),
          pl.BlockSpec((None, None, None, None, bh), imap(lambda d, b, t, h, s: (b, t, s, h // nhb, h % nhb))),
      ],
      out_shape=[jax.ShapeDtypeStruct((batch, q_len, splits, num_kv_heads, gp, dvp),
                                      q.dtype if splits == 1 else jnp.float32),
                 jax.ShapeDtypeStruct((batch, q_len, splits, num_kv_heads, gp), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
      interpret=interpret,
      name="dsa_sparse_attention_fwd",
  )(*[x for x, _ in q_specs + k_specs], idx)
  if splits > 1:   # merge the partial softmaxes
    lse_all = jax.scipy.special.logsumexp(lse, axis=2, keepdims=True)
    lse_all_safe = jnp.where(jnp.isfinite(lse_all), lse_all, 0.0)
    weight = jnp.where(jnp.isfinite(lse), jnp.exp(lse - lse_all_safe), 0.0)
    out = jnp.sum(out * weight[..., None], axis=2, keepdims=True).astype(q.dtype)
    lse = lse_all
  out = out[:, :, 0, :, :group, :dv].reshape(batch, q_len, num_heads, dv)
  return out, lse[:, :, 0]


def _row_grads(q, qr, do, lse, delta, kg, krg, vg, valid, scale):
  """One head block's softmax gradients at gathered rows kg [bk, D] (krg [bk, R] or None),
  vg [bk, Dv] (valid [bk]) -> ds [bh, bk] (d loss / d (q . k) · scale) and p [bh, bk]."""
  p = jnp.where(valid[None, :], jnp.exp(_logits(q, qr, kg, krg, scale) - lse[:, None]), 0.0)
  dp = plgpu.dot(do, vg, trans_b=True)
  return p * (dp - delta[:, None]) * scale, p


def _bwd_dq_kernel(*refs, scale, block_k, steps, shared, rope):
  """dq [bh, D] (and dq_rope [bh, R]) of one query and head block (the backward's first kernel)."""
  q_ref, qr_ref, k_ref, v_ref, kr_ref, rest = _unpack(refs, shared, rope)
  idx_ref, do_ref, lse_ref, delta_ref, dq_ref, *dqr_ref = rest
  q, do, delta = q_ref[...], do_ref[...], delta_ref[...]
  qr = qr_ref[...] if rope else None
  lse = jnp.where(lse_ref[...] == -jnp.inf, 0.0, lse_ref[...])

  def body(i, carry):
    dq, dqr = carry
    ids = idx_ref[pl.ds(i * block_k, block_k)]
    valid = ids >= 0
    rows = jnp.where(valid, ids, 0)
    kg = k_ref[rows, :]
    krg = kr_ref[rows, :] if rope else None
    ds, _ = _row_grads(q, qr, do, lse, delta, kg, krg, kg if shared else v_ref[rows, :], valid, scale)
    dq += plgpu.dot(ds.astype(kg.dtype), kg)
    if rope:
      dqr += plgpu.dot(ds.astype(krg.dtype), krg)
    return dq, dqr

  init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(qr.shape, jnp.float32) if rope else None)
  dq, dqr = jax.lax.fori_loop(0, steps, body, init)
  dq_ref[...] = dq.astype(dq_ref.dtype)
  if rope:
    dqr_ref[0][...] = dqr.astype(dqr_ref[0].dtype)


def _bwd_dkv_kernel(*refs, scale, block_h, trash_row, shared, rope):
  """dk, dv (and dk_rope) of block_k gathered rows of one query, summed over all head blocks of
  its group, then one atomic add per row into dk [S+1, D], dv [S+1, Dv], dk_rope [S+1, R] fp32
  (shared: dk + dv into one buffer). The buffers come in twice: inputs aliased with the outputs."""
  q_ref, qr_ref, k_ref, v_ref, kr_ref, rest = _unpack(refs, shared, rope)
  idx_ref, do_ref, lse_ref, delta_ref, *bufs = rest
  out_refs = bufs[len(bufs) // 2:]
  ids = idx_ref[...]
  valid = ids >= 0
  rows = jnp.where(valid, ids, 0)
  kg = k_ref[rows, :]
  vg = kg if shared else v_ref[rows, :]
  krg = kr_ref[rows, :] if rope else None
  dk_rows = jnp.zeros(kg.shape, jnp.float32)
  dv_rows = jnp.zeros(vg.shape, jnp.float32)
  dkr_rows = jnp.zeros(krg.shape, jnp.float32) if rope else None
  for hb in range(q_ref.shape[0] // block_h):   # static: a few head blocks
    heads = pl.ds(hb * block_h, block_h)
    q, do = q_ref[heads, :], do_ref[heads, :]
    qr = qr_ref[heads, :] if rope else None
    lse = jnp.where(lse_ref[heads] == -jnp.inf, 0.0, lse_ref[heads])
    ds, p = _row_grads(q, qr, do, lse, delta_ref[heads], kg, krg, vg, valid, scale)
    dv_rows += plgpu.dot(p.astype(do.dtype), do, trans_a=True)          # [bk, Dv]
    dk_rows += plgpu.dot(ds.astype(q.dtype), q, trans_a=True)           # [bk, D]
    if rope:
      dkr_rows += plgpu.dot(ds.astype(qr.dtype), qr, trans_a=True)      # [bk, R]
  dest = jnp.where(valid, ids, trash_row)[:, None]
  add = lambda ref, x: plgpu.atomic_add(ref, (dest, jnp.arange(x.shape[1])[None, :]), x)
  if shared:
    add(out_refs[0], dk_rows + dv_rows)
  else:
    add(out_refs[0], dk_rows)
    add(out_refs[1], dv_rows)
  if rope:
    add(out_refs[-1], dkr_rows)


def _backward(q, k, v, k_rope, indices, out, lse, dout, scale, blocks, interpret):
  """-> dq, dk, dv, dk_rope (v None: shared, dk holds dk + dv and dv is None; dk_rope None
  without k_rope)."""
  shared, rope = v is None, k_rope is not None
  batch, q_len, num_heads, _ = q.shape
  num_kv_heads, kv_len, dim = k.shape[2], k.shape[1], k.shape[3]
  dv = (k if shared else v).shape[-1]
  group = num_heads // num_kv_heads
  blocks = dataclasses.replace(blocks, num_splits=1, block_h=blocks.bwd_block_h or blocks.block_h)
  q_parts, kp, vp, krp, idx = _layout(q, k, v, k_rope, indices, blocks)
  block_k = blocks.bwd_block_k or blocks.block_k
  gp, dp, ksel = q_parts[0][0].shape[3], q_parts[0][1], idx.shape[-1]
  q_arrays, q_widths = [x for x, _, _ in q_parts], [w for _, w, _ in q_parts]
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
  do5 = _pad_dim(pad_g(dout), dvp).astype(q.dtype)
  rows_in = _present(kp, vp, krp)
  bufs = [jnp.zeros((batch, kv_len + 1, num_kv_heads, x.shape[-1]), jnp.float32)
          for x in _present(kp, None if shared else vp, krp)]
  params = plgpu.CompilerParams(num_warps=warps, num_stages=blocks.bwd_num_stages or blocks.num_stages)
  # dq: one program per (query, head block), as the forward; with heads_together a query's head
  # blocks first (CUDA's x, the fastest), so all but one read its gathered rows from L2
  together = blocks.heads_together
  order = "hbt" if together else "bth"
  imap = functools.partial(_named_ids, order)
  head = imap(lambda b, t, h: (b, t, h // nhb, h % nhb))
  head_spec = lambda width, j=0: pl.BlockSpec((None, None, None, bh, width), lambda *ids: (*head(*ids), j))
  rows_spec = lambda x: pl.BlockSpec((None, kv_len, None, x.shape[-1]), imap(lambda b, t, h: (b, 0, h // nhb, 0)))
  dqs = pl.pallas_call(
      functools.partial(_bwd_dq_kernel, scale=scale, block_k=block_k, steps=ksel // block_k,
                        shared=shared, rope=rope),
      grid=_grid(order, b=batch, t=q_len, h=num_kv_heads * nhb),
      in_specs=[*[head_spec(w, j) for _, w, j in q_parts], *[rows_spec(x) for x in rows_in],
                pl.BlockSpec((None, None, ksel), imap(lambda b, t, h: (b, t, 0))),
                head_spec(dvp), pl.BlockSpec((None, None, None, bh), head),
                pl.BlockSpec((None, None, None, bh), head)],
      out_specs=[head_spec(w) for w in q_widths],
      out_shape=[jax.ShapeDtypeStruct((batch, q_len, num_kv_heads, gp, w), q.dtype) for w in q_widths],
      compiler_params=params, interpret=interpret, name="dsa_sparse_attention_bwd_dq",
  )(*q_arrays, *rows_in, idx, do5, lse, delta)
  # dk, dv: one program per (query, KV head, block_k gathered rows), summed over all the group's
  # head blocks before one atomic add per row (atomics per head block instead: 1.5x slower);
  # with heads_together a query's row blocks first, so all but one read its q and dO from L2
  order = "ibtg" if together else "btgi"
  imap = functools.partial(_named_ids, order)
  group_spec = lambda *d, j=0: pl.BlockSpec((None, None, None, gp, *d),
                                            imap(lambda b, t, g, i: (b, t, g, 0, *[j] * len(d))))
  kv_spec = lambda d, n: pl.BlockSpec((None, n, None, d), imap(lambda b, t, g, i: (b, 0, g, 0)))
  n_in = len(q_arrays) + len(rows_in) + 4   # ..., idx, do, lse, delta
  bufs = pl.pallas_call(
      functools.partial(_bwd_dkv_kernel, scale=scale, block_h=bh, trash_row=kv_len, shared=shared,
                        rope=rope),
      grid=_grid(order, b=batch, t=q_len, g=num_kv_heads, i=ksel // block_k),
      in_specs=[*[group_spec(w, j=j) for _, w, j in q_parts],
                *[kv_spec(x.shape[-1], kv_len) for x in rows_in],
                pl.BlockSpec((None, None, block_k), imap(lambda b, t, g, i: (b, t, i))),
                group_spec(dvp), group_spec(), group_spec(),
                *[kv_spec(b.shape[-1], kv_len + 1) for b in bufs]],
      out_specs=[kv_spec(b.shape[-1], kv_len + 1) for b in bufs],
      out_shape=[jax.ShapeDtypeStruct(b.shape, jnp.float32) for b in bufs],
      input_output_aliases={n_in + i: i for i in range(len(bufs))},
      compiler_params=params, interpret=interpret, name="dsa_sparse_attention_bwd_dkv",
  )(*q_arrays, *rows_in, idx, do5, lse, delta, *bufs)
  unpad = lambda x, d: x[:, :, :, :group, :d].reshape(batch, q_len, num_heads, d)
  dq = unpad(dqs[0], dim)
  if rope:
    dq = jnp.concatenate([dq, unpad(dqs[1], k_rope.shape[-1])], axis=-1)
  cut = lambda buf, x: buf[:, :kv_len, :, :x.shape[-1]].astype(x.dtype)
  dk = cut(bufs[0], k)
  dvv = None if shared else cut(bufs[1], v)
  dkr = cut(bufs[-1], k_rope) if rope else None
  return dq, dk, dvv, dkr


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _sparse_attention(q, k, v, k_rope, indices, scale, blocks, interpret):
  """v None: shared (v = k); k_rope None: no RoPE part. Cotangents None for absent operands."""
  return _forward(q, k, v, k_rope, indices, scale, blocks, interpret)[0]


def _vjp_fwd(q, k, v, k_rope, indices, scale, blocks, interpret):
  out, lse = _forward(q, k, v, k_rope, indices, scale, blocks, interpret)
  return out, (q, k, v, k_rope, indices, out, lse)


def _vjp_bwd(scale, blocks, interpret, res, dout):
  q, k, v, k_rope, indices, out, lse = res
  dq, dk, dv, dkr = _backward(q, k, v, k_rope, indices, out, lse, dout, scale, blocks, interpret)
  return dq, dk, dv, dkr, None


_sparse_attention.defvjp(_vjp_fwd, _vjp_bwd)


def sparse_attention(q, k, v, indices, *, k_rope=None, scale: float | None = None,
                     blocks: SparseBlocks | None = None, interpret: bool | None = None):
  """q [B, L, H, D], k [B, S, H_kv, D], v [B, S, H_kv, Dv] or None, indices [B, L, K] int
  (-1 none, distinct per row) -> [B, L, H, Dv]; differentiable in q, k, v (Pallas backward).

  v None or `v is k` (MLA's absorbed form, k = v = latent): the shared path, one gather
  per row for both MMAs; its gradient for k is dk + dv.
  k_rope [B, S, H_kv, R] (shared path only; MLA's decoupled RoPE key): the key is
  [k ; k_rope], q is [B, L, H, D + R], the value stays k; differentiable in k_rope too.
  scale: default 1/sqrt(q's head dim).
  """
  from lca.attention import common, dsa  # pylint: disable=g-import-not-at-top
  shared = v is None or v is k
  if k_rope is not None:
    dsa.check_k_rope(q, k, k if v is None else v, k_rope)
  common.check_qkv(q if k_rope is None else q[..., :k.shape[-1]], k, k if v is None else v)
  dsa.check_indices(q, k, indices)
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
  group = q.shape[2] // k.shape[2]
  blocks = blocks or default_blocks(q.shape[1], indices.shape[-1], k.shape[-1], group,
                                    0 if k_rope is None else k_rope.shape[-1])
  return _sparse_attention(q, k, None if shared else v, k_rope, indices.astype(jnp.int32), scale, blocks,
                           resolve_interpret(interpret))
