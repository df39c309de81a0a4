"""Fused NSA decode in Pallas (Triton lowering): one query token per sequence, 3 launches.

  nsa_decode(q, gates, positions, cache, *, sizes, scale=None, ...)   -> [B, 1, H, Dv]

Same output as `lca.attention.nsa.decode_attention` (T = 1) over the same cache
(raw k, v [B, C, H_kv, D] and compressed kc, vc [B, Nc, H_kv, D]). Every program
owns all query heads of one GQA group as rows (R = max(16, nextpow2(G)) rows), so
each KV row is read once per group, and the work is split along the keys so that
the whole GPU reads the bytes (flash-decoding's split-K):

  1. `nsa_dec_cmp`   grid (B·H_kv, S1): split s owns compressed blocks
     [s·bk, (s+1)·bk), bk = 16·l'/d, i.e. the compressed blocks whose first d-chunk
     lies in selection blocks [16s, 16s + 16). It writes the compression branch's
     partial (o, m, l) per head and, relative to the same m, the per-head
     unnormalized importance of its 16 selection blocks (P @ overlap, plus the
     l/d - 1 blocks of split s - 1 that spill into block 16s, recomputed here so no
     split needs its neighbour's result).
  2. `nsa_dec_slc_win` grid (B·H_kv, n + nw): every program merges the S1 (m, l)
     pairs into the exact LSE per head, weights the importance partials by
     2^(m_s - LSE), sums the group's heads. Selection program p < nf takes the p-th
     forced block (closed form, no search); p >= nf the (p - nf)-th best free block
     (importance desc, ties to the lowest index, as `nsa.select_blocks`), found with
     topn="argmax": p - nf + 1 rounds of one (value, index) argmax each (default;
     measured), or topn="rank": pairwise ranks over 128 groups, then over the 16 best
     groups' blocks (a fixed handful of reductions; CPU-tested, not yet timed on a
     GPU). Programs p >= n take window chunk p - n (l' tokens each, nw = ceil(w / l')).
     Each attends its R rows to its l' keys and writes a partial (o, m, l).
  3. `nsa_dec_merge` grid (B·H): one head; merges the S1 compression partials, the
     n selection partials and the nw window partials, applies the gates, writes
     the output row.

Bytes read (L = 64k, H_kv = 4, D = 128, bf16): compressed KV 8.4 MB, selected
blocks 2.1 MB, window 1.0 MB; the partials (~2 MB fp32) stay in L2.
Scores are log2-domain (exp2). `interpret=None` runs interpret mode on CPU.
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

from pallas_kernels import resolve_interpret
from pallas_kernels.nsa import NSAGeometry, pow2

LOG2E = math.log2(math.e)
_NEG = -1e30
_SPLIT_BLOCKS = 16  # selection blocks per compressed split (the overlap matmul's N)
_RANK_DIRECT = 128  # top-n rank search: pairwise over all blocks up to this many, else over groups
_RANK_GROUPS = 16   # groups kept by the grouped rank search (>= num_selected)


@dataclasses.dataclass(frozen=True)
class DecodeGeometry(NSAGeometry):
  """`NSAGeometry` of one decode call, whose length is the raw cache's capacity C (slot s holds
  position s), plus the sizes only decoding needs (hashable)."""

  value_dim: int
  window: int         # w

  @property
  def capacity(self) -> int:
    return self.length

  @property
  def rows(self) -> int:
    return max(16, pow2(self.group))

  @property
  def per_s(self) -> int:
    return self.select_block // self.block_stride

  @property
  def per_c(self) -> int:
    return self.block_len // self.block_stride

  @property
  def split_len(self) -> int:
    """bk: compressed blocks per split of `nsa_dec_cmp`."""
    return _SPLIT_BLOCKS * self.per_s

  @property
  def num_splits(self) -> int:
    return max(1, -(-self.num_select_blocks // _SPLIT_BLOCKS))

  @property
  def padded_select_blocks(self) -> int:
    """Ns_p: the importance vector's length in `nsa_dec_slc_win` (power of two >= 16)."""
    return pow2(self.num_splits * _SPLIT_BLOCKS, 16)

  @property
  def num_window_chunks(self) -> int:
    return -(-self.window // self.select_block)


# ----------------------------------------------------------------------------- 1: compression


def _cmp_kernel(pos_ref, q_ref, kc_ref, vc_ref, o_ref, m_ref, l_ref, part_ref, *,
                geo: DecodeGeometry):
  bh, s = pl.program_id(0), pl.program_id(1)
  b, g = bh // geo.num_kv_heads, bh % geo.num_kv_heads
  r, bk, nb = geo.rows, geo.split_len, _SPLIT_BLOCKS
  per_c, per_s = geo.per_c, geo.per_s
  t = plgpu.load(pos_ref.at[b, jnp.int32(0)])
  h_ok = jnp.arange(r) < geo.group
  q = plgpu.load(q_ref.at[b, jnp.int32(0), pl.ds(g * geo.group, r), :], mask=h_ok[:, None], other=0.0)
  qk_scale = geo.scale * LOG2E

  def scores(start, size, lo):
    """Scores [R, size] of compressed blocks start + [0, size) that are >= lo, visible and stored."""
    i = start + jnp.arange(size)
    stored = i < geo.num_compressed
    kc = plgpu.load(kc_ref.at[b, pl.ds(start, size), g, :], mask=stored[:, None], other=0.0)
    vis = stored & (i >= lo) & (i * geo.block_stride + geo.block_len - 1 <= t)
    sc = plgpu.dot(q, kc.astype(q.dtype).T) * qk_scale
    return i, jnp.where(vis[None, :] & h_ok[:, None], sc, _NEG), vis

  c0 = s * bk
  vc = plgpu.load(vc_ref.at[b, pl.ds(c0, bk), g, :], mask=(c0 + jnp.arange(bk) < geo.num_compressed)[:, None],
                  other=0.0)   # issued early: independent of the scores
  i, sc, vis = scores(c0, bk, c0)
  # blocks c0 - per_c + 1 .. c0 - 1 of the previous split spill into selection block 16s
  prev0 = jnp.maximum(c0 - 16, 0)
  ip, sp, vis_p = scores(prev0, 16, c0 - (per_c - 1))
  vis_p = vis_p & (ip < c0)
  sp = jnp.where(vis_p[None, :], sp, _NEG)
  m = jnp.maximum(sc.max(axis=1), sp.max(axis=1))            # reference for this split's p
  p = jnp.where(vis[None, :] & h_ok[:, None], jnp.exp2(sc - m[:, None]), 0.0)
  l = p.sum(axis=1)
  acc = plgpu.dot(p.astype(q.dtype), vc.astype(q.dtype))
  o = acc / jnp.where(l > 0, l, 1.0)[:, None]
  o_ref[bh, s, :, :] = o
  m_ref[bh, s, :] = m
  l_ref[bh, s, :] = l
  # importance: d-chunks shared by own block i (local) and selection block jj (local)
  il = jnp.arange(bk)[:, None]
  jj = jnp.arange(nb)[None, :]
  overlap = jnp.maximum(jnp.minimum(il + per_c, (jj + 1) * per_s) - jnp.maximum(il, jj * per_s), 0)
  imp = plgpu.dot(p, overlap.astype(jnp.float32), precision=lax.Precision.HIGHEST)   # [R, 16]
  p_prev = jnp.where(vis_p[None, :] & h_ok[:, None], jnp.exp2(sp - m[:, None]), 0.0)
  spill_w = jnp.where(vis_p, ip + per_c - c0, 0).astype(jnp.float32)
  spill = jnp.sum(p_prev * spill_w[None, :], axis=1)
  imp = imp + jnp.where(jj == 0, spill[:, None], 0.0)
  part_ref[bh, :, pl.ds(s * nb, nb)] = imp


def _cmp(positions, q, kc, vc, geo: DecodeGeometry, warps: int, interpret):
  bh = q.shape[0] * geo.num_kv_heads
  s1, r = geo.num_splits, geo.rows
  return pl.pallas_call(
      functools.partial(_cmp_kernel, geo=geo),
      grid=(bh, s1),
      out_shape=[jax.ShapeDtypeStruct((bh, s1, r, geo.value_dim), jnp.float32),
                 jax.ShapeDtypeStruct((bh, s1, r), jnp.float32),
                 jax.ShapeDtypeStruct((bh, s1, r), jnp.float32),
                 jax.ShapeDtypeStruct((bh, r, s1 * _SPLIT_BLOCKS), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1),
      interpret=interpret, name="nsa_dec_cmp",
  )(positions, q, kc, vc)


# ----------------------------------------------------------------------------- 2: selection + window


def _forced(cur, geo: DecodeGeometry):
  """The forced blocks as a sorted union of [0, a) and [b0, b1] (num_local >= 1, as NSASizes
  checks) -> (count, p -> the p-th of them)."""
  a = min(geo.num_initial, geo.num_select_blocks)
  b1 = jnp.minimum(cur, geo.num_select_blocks - 1)
  b0 = jnp.maximum(cur - geo.num_local + 1, 0)
  joined = b0 <= a                     # one interval [0, max(a, b1 + 1))
  count = jnp.where(joined, jnp.maximum(a, b1 + 1), a + b1 - b0 + 1)
  return count, lambda p: jnp.where(joined | (p < a), p, b0 + p - a)


def _ranks(val, idx):
  """rank[b] = #{a : val[a] > val[b], or equal and idx[a] < idx[b]} (0 = best; ties to the
  lowest index, as lax.top_k): all pairs at once, [N, N] comparisons, one reduction."""
  beat = (val[:, None] > val[None, :]) | ((val[:, None] == val[None, :]) & (idx[:, None] < idx[None, :]))
  return jnp.sum(beat.astype(jnp.int32), axis=0)


def _rank_search(score, j, want, spill):
  """The index j whose rank in `score` [Ns_p] (desc, ties to the lowest index) is `want` < 16.

  Ns_p <= 128: pairwise ranks of all blocks. Larger: the blocks in G = 128 groups of
  E = Ns_p / G consecutive ones; the best `want` + 1 blocks lie in the 16 best groups by
  group maximum (a group holding one of them has a maximum at least as good, and at most
  want + 1 groups do), so rank the groups, gather those 16 groups' 16·E blocks (through
  memory: `spill(score)` -> gather(idx)) and rank those.
  """
  nsp = score.shape[0]
  if nsp <= _RANK_DIRECT:
    return jnp.sum(jnp.where(_ranks(score, j) == want, j, 0))
  gather = spill(score)
  groups, per = _RANK_DIRECT, nsp // _RANK_DIRECT
  gg, ee, rr = jnp.arange(groups), jnp.arange(per), jnp.arange(_RANK_GROUPS)
  gmax = jnp.max(gather(gg[:, None] * per + ee[None, :]), axis=1)              # [G]
  grank = _ranks(gmax, gg)   # groups are index-ordered: a tie goes to the lower group
  best = jnp.sum(jnp.where(grank[None, :] == rr[:, None], gg[None, :], 0), axis=1)   # [16]: group at rank
  f = jnp.arange(_RANK_GROUPS * per)
  grp = jnp.sum(jnp.where((f // per)[:, None] == rr[None, :], best[None, :], 0), axis=1)
  cand = grp * per + f % per                                                   # [16·E] block ids
  return jnp.sum(jnp.where(_ranks(gather(cand), cand) == want, cand, 0))


def _select_one(imp, j, valid_j, cur, piece, geo: DecodeGeometry, topn: str = "argmax", spill=None):
  """Block of selection program `piece` (-1: none), the same set as `nsa.select_blocks`.

  The nf forced blocks go to programs 0..nf-1 without any search; program p >= nf takes
  the (p - nf)-th best free block by (importance desc, index asc): topn="rank" finds it
  by pairwise ranks (`_rank_search`, a fixed handful of reductions); topn="argmax" by
  p - nf + 1 rounds of one (value, index) argmax each. `spill(score)` stores `score` and
  returns a gather from it (in the kernel: through the program's scratch row).
  """
  nf, forced_at = _forced(cur, geo)
  a = min(geo.num_initial, geo.num_select_blocks)
  forced = (j < a) | ((j <= cur) & (cur - j < geo.num_local))
  free = valid_j & ~forced
  score = jnp.where(free, imp, -jnp.inf)
  num_free = jnp.sum(free.astype(jnp.int32))
  rank = piece - nf
  found = (rank >= 0) & (rank < num_free) & (piece < geo.num_selected)
  if topn == "rank":
    if geo.num_selected > _RANK_GROUPS:
      raise NotImplementedError(f"nsa_decode topn='rank' takes num_selected <= {_RANK_GROUPS}, "
                                f"got {geo.num_selected}")
    pick = _rank_search(score, j, jnp.where(found, rank, 0), spill)
  elif topn == "argmax":
    def round_(_, carry):   # argmax: the lowest index among equal maxima, as lax.top_k
      score, _ = carry
      arg = jnp.argmax(score).astype(jnp.int32)
      return jnp.where(j == arg, -jnp.inf, score), arg

    _, pick = lax.fori_loop(0, jnp.where(found, rank + 1, 0), round_, (score, jnp.int32(-1)))
  else:
    raise ValueError(f"topn must be 'rank' or 'argmax', got topn={topn!r}")
  return jnp.where(piece < nf, forced_at(piece), jnp.where(found, pick, -1)).astype(jnp.int32)


def _cmp_lse(m1_ref, l1_ref, bh, geo: DecodeGeometry):
  """Exact log2-sum-exp2 of the compression branch per row [R] from the S1 (m, l) partials
  (inf where no compressed block is visible)."""
  s1p = pow2(geo.num_splits)
  s_ok = jnp.arange(s1p) < geo.num_splits
  m1 = plgpu.load(m1_ref.at[bh, pl.ds(0, s1p), :], mask=s_ok[:, None], other=_NEG)   # [S1p, R]
  l1 = plgpu.load(l1_ref.at[bh, pl.ds(0, s1p), :], mask=s_ok[:, None], other=0.0)
  mx = m1.max(axis=0)
  tot = jnp.sum(l1 * jnp.exp2(m1 - mx[None, :]), axis=0)
  return jnp.where(tot > 0, mx + jnp.log2(jnp.where(tot > 0, tot, 1.0)), jnp.inf)


def _slc_win_kernel(pos_ref, q_ref, k_ref, v_ref, m1_ref, l1_ref, part_ref, o_ref, m_ref, l_ref, scr_ref, *,
                    geo: DecodeGeometry, topn: str, barrier: bool):
  bh, piece = pl.program_id(0), pl.program_id(1)
  b, g = bh // geo.num_kv_heads, bh % geo.num_kv_heads
  r, lb, n = geo.rows, geo.select_block, geo.num_selected
  t = plgpu.load(pos_ref.at[b, jnp.int32(0)])
  h = jnp.arange(r)
  h_ok = h < geo.group
  q = plgpu.load(q_ref.at[b, jnp.int32(0), pl.ds(g * geo.group, r), :], mask=h_ok[:, None], other=0.0)

  lse = _cmp_lse(m1_ref, l1_ref, bh, geo)
  s1 = geo.num_splits

  # importance of every selection block, summed over the group's heads
  nsp = geo.padded_select_blocks
  j = jnp.arange(nsp)
  j_ok = j < s1 * _SPLIT_BLOCKS
  ok2 = h_ok[:, None] & j_ok[None, :]
  part = plgpu.load(part_ref.at[bh, h[:, None], j[None, :]], mask=ok2, other=0.0)  # [R, Ns_p]
  m_col = plgpu.load(m1_ref.at[bh, (jnp.minimum(j, s1 * _SPLIT_BLOCKS - 1) // _SPLIT_BLOCKS)[None, :],
                               h[:, None]], mask=ok2, other=_NEG)
  imp = jnp.sum(jnp.where(ok2, part * jnp.exp2(m_col - lse[:, None]), 0.0), axis=0)   # [Ns_p]

  cur = t // lb
  valid_j = (j <= cur) & (j < geo.num_select_blocks)
  if topn == "none":   # timing only (bench_nsa --decode_breakdown): block p, no selection
    blk = jnp.where(piece <= cur, piece, -1).astype(jnp.int32)
  else:
    def spill(score):   # the rank search re-reads `score` in other shapes through memory
      scr_ref[bh, piece, :] = score
      if barrier:
        plgpu.debug_barrier()   # all threads' stores done before any thread reads
      return lambda idx: plgpu.load(scr_ref.at[bh, piece, idx])
    blk = _select_one(imp, j, valid_j, cur, piece, geo, topn, spill)
  is_sel = piece < n
  win_lo = t - geo.window + 1
  start = jnp.where(is_sel, jnp.maximum(blk, 0) * lb, jnp.maximum(win_lo, 0) + (piece - n) * lb)
  kpos = start + jnp.arange(lb)
  valid = (kpos <= t) & (kpos < geo.capacity)
  valid = valid & jnp.where(is_sel, blk >= 0, kpos >= win_lo)
  k = plgpu.load(k_ref.at[b, pl.ds(start, lb), g, :], mask=valid[:, None], other=0.0)
  v = plgpu.load(v_ref.at[b, pl.ds(start, lb), g, :], mask=valid[:, None], other=0.0)
  sc = jnp.where(valid[None, :], plgpu.dot(q, k.astype(q.dtype).T) * (geo.scale * LOG2E), _NEG)
  m = sc.max(axis=1)
  p = jnp.where(valid[None, :], jnp.exp2(sc - m[:, None]), 0.0)
  l = p.sum(axis=1)
  acc = plgpu.dot(p.astype(q.dtype), v.astype(q.dtype))
  o_ref[bh, piece, :, :] = acc / jnp.where(l > 0, l, 1.0)[:, None]
  m_ref[bh, piece, :] = m
  l_ref[bh, piece, :] = l


def _slc_win(positions, q, k, v, m1, l1, part, geo: DecodeGeometry, warps: int, interpret,
             topn: str = "argmax"):
  """-> o2, m2, l2 partials [B·H_kv, n + nw, ...] (and the rank search's scratch)."""
  bh = q.shape[0] * geo.num_kv_heads
  spills = topn == "rank" and geo.padded_select_blocks > _RANK_DIRECT
  pieces, r = geo.num_selected + geo.num_window_chunks, geo.rows
  return pl.pallas_call(
      functools.partial(_slc_win_kernel, geo=geo, topn=topn, barrier=not interpret),
      grid=(bh, pieces),
      out_shape=[jax.ShapeDtypeStruct((bh, pieces, r, geo.value_dim), jnp.float32),
                 jax.ShapeDtypeStruct((bh, pieces, r), jnp.float32),
                 jax.ShapeDtypeStruct((bh, pieces, r), jnp.float32),
                 jax.ShapeDtypeStruct((bh, pieces, geo.padded_select_blocks) if spills else (1, 1, 1),
                                      jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1),
      interpret=interpret, name="nsa_dec_slc_win",
  )(positions, q, k, v, m1, l1, part)


# ----------------------------------------------------------------------------- 3: merge + gates


def _merge_kernel(gates_ref, o1_ref, m1_ref, l1_ref, o2_ref, m2_ref, l2_ref, out_ref, *,
                  geo: DecodeGeometry, num_heads: int):
  pid = pl.program_id(0)
  b, head = pid // num_heads, pid % num_heads
  g, h = head // geo.group, head % geo.group
  bh = b * geo.num_kv_heads + g

  def merge(o_ref, m_ref, l_ref, lo, hi, size):
    idx = jnp.arange(size)
    ok = (idx >= lo) & (idx < hi)
    m = plgpu.load(m_ref.at[bh, pl.ds(0, size), h], mask=ok, other=_NEG)
    l = plgpu.load(l_ref.at[bh, pl.ds(0, size), h], mask=ok, other=0.0)
    o = plgpu.load(o_ref.at[bh, pl.ds(0, size), h, :], mask=ok[:, None], other=0.0)
    w = l * jnp.exp2(m - m.max())
    tot = w.sum()
    return jnp.sum(w[:, None] * o, axis=0) / jnp.where(tot > 0, tot, 1.0)

  n, pieces = geo.num_selected, geo.num_selected + geo.num_window_chunks
  o_cmp = merge(o1_ref, m1_ref, l1_ref, 0, geo.num_splits, pow2(geo.num_splits))
  o_slc = merge(o2_ref, m2_ref, l2_ref, 0, n, pow2(pieces))
  o_win = merge(o2_ref, m2_ref, l2_ref, n, pieces, pow2(pieces))
  c = jnp.arange(4)
  gv = plgpu.load(gates_ref.at[b, jnp.int32(0), head, pl.ds(0, 4)], mask=c < 3, other=0.0).astype(jnp.float32)
  gate = lambda i: jnp.sum(jnp.where(c == i, gv, 0.0))
  out = gate(0) * o_cmp + gate(1) * o_slc + gate(2) * o_win
  out_ref[b, 0, head, :] = out.astype(out_ref.dtype)


def _merge(gates, o1, m1, l1, o2, m2, l2, geo: DecodeGeometry, dtype, warps: int, interpret):
  batch, _, num_heads, _ = gates.shape
  return pl.pallas_call(
      functools.partial(_merge_kernel, geo=geo, num_heads=num_heads),
      grid=(batch * num_heads,),
      out_shape=jax.ShapeDtypeStruct((batch, 1, num_heads, geo.value_dim), dtype),
      compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1),
      interpret=interpret, name="nsa_dec_merge",
  )(gates, o1, m1, l1, o2, m2, l2)


# ----------------------------------------------------------------------------- public op


def geometry(q, cache: dict, *, sizes, scale=None) -> DecodeGeometry:
  """Static sizes for q [B, 1, H, D] over `cache` (see `lca.attention.nsa.init_nsa_cache`)."""
  batch, tokens, heads, dim = q.shape
  k = cache["k"]
  if tokens != 1:
    raise NotImplementedError(f"nsa_decode takes one query token per sequence, got q.shape[1]={tokens}")
  if k.ndim != 4 or k.shape[0] != batch or heads % k.shape[2]:
    raise ValueError(f"cache['k'] must be [B={batch}, C, H_kv, D] with H_kv dividing {heads}, got {k.shape}")
  for name, value in (("head_dim", dim), ("value_dim", cache["v"].shape[-1]),
                      ("select_block", sizes.select_block)):
    if value < 16 or value & (value - 1):
      raise NotImplementedError(f"nsa_decode needs a power-of-two {name} >= 16, got {value}")
  per_c, per_s = sizes.block_len // sizes.block_stride, sizes.select_block // sizes.block_stride
  if per_c - 1 > min(per_s, 16):
    raise NotImplementedError(f"nsa_decode needs block_len - block_stride <= select_block "
                              f"(one spill block), got l={sizes.block_len}, d={sizes.block_stride}, "
                              f"l'={sizes.select_block}")
  if pow2(heads // k.shape[2]) > 64:
    raise NotImplementedError(f"nsa_decode takes at most 64 query heads per group, got {heads // k.shape[2]}")
  return DecodeGeometry(
      length=k.shape[1], num_kv_heads=k.shape[2], group=heads // k.shape[2],
      block_len=sizes.block_len, block_stride=sizes.block_stride, select_block=sizes.select_block,
      num_selected=sizes.num_selected, num_initial=sizes.num_initial, num_local=sizes.num_local,
      scale=1.0 / math.sqrt(dim) if scale is None else float(scale),
      value_dim=cache["v"].shape[-1], window=sizes.window)


def nsa_decode(q, gates, positions, cache: dict, *, sizes, scale=None, num_warps: int = 4,
               topn: str = "argmax", interpret=None) -> jax.Array:
  """NSA of one query token per sequence over a filled NSA cache -> [B, 1, H, Dv] in q's dtype.

  Args:
    q: [B, 1, H, D]; gates: [B, 1, H, 3]; positions: [B, 1] int (the token's position t,
      with its own key already written at slot t).
    cache: dict with k, v [B, C, H_kv, D] (slot s = position s) and kc, vc [B, Nc', H_kv, D]
      (compressed block i at row i; rows >= floor((C - l)/d) + 1 are ignored).
    sizes: `lca.attention.nsa.NSASizes`.
  """
  if topn not in ("rank", "argmax"):
    raise ValueError(f"nsa_decode topn must be 'rank' or 'argmax', got topn={topn!r}")
  geo = geometry(q, cache, sizes=sizes, scale=scale)
  interpret = resolve_interpret(interpret)
  positions = positions.astype(jnp.int32)
  warps2 = 8 if geo.rows * geo.padded_select_blocks >= 8192 else num_warps
  o1, m1, l1, part = _cmp(positions, q, cache["kc"], cache["vc"], geo, num_warps, interpret)
  o2, m2, l2, _ = _slc_win(positions, q, cache["k"], cache["v"], m1, l1, part, geo, warps2, interpret, topn)
  return _merge(gates, o1, m1, l1, o2, m2, l2, geo, q.dtype, num_warps, interpret)
