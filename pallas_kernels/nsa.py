"""Native Sparse Attention kernels in Pallas (Triton lowering).

  compressed_attention(q, kc, vc, ...)    query t over compressed blocks ending <= t; custom_vjp
  block_importance(q, kc, lse, ...)       p^cmp summed over a GQA group, re-binned onto
                                          selection blocks, without storing [L, Nc]
  select_topn(importance, ...)            top-n blocks per (query, group), forced blocks first
  selected_attention(q, k, v, idx, ...)   group-centric sparse attention; custom_vjp
  nsa_cmp_slc(q, k, v, kc, vc, ...)       the compression and selection branches of NSA

On a GPU the compressed branch runs by default on cuDNN's causal flash attention, through a layout
that makes its mask square and causal (`pallas_kernels.nsa_cmp_cudnn`; `Tuning.cmp_attention`): at
64k on an H200 its forward took 8.7 ms against 10.2 for `nsa_cmp_fwd`, its backward ~24 ms
against 37 for `nsa_cmp_dq` + `nsa_cmp_dkdv` (session 26). The Pallas kernels stay the CPU path,
the fallback, and what `Tuning(cmp_attention="pallas")` runs.

Group-centric layout (paper §3.4): a program works on "rows", the query heads of one
GQA group padded to Gp = next power of two, row t·Gp + h = position t, head g·G + h.
q, o, dO and dQ stay [B, L, H, D] in HBM: a program loads and stores its rows by
index (no transposed copy of q: since session 14 `to_rows` serves only tests and probes); only the
per-row LSE2 and delta are kept row-major, [B·H_kv, L·Gp]. A program of the compressed
kernels owns BT consecutive positions (BT·Gp rows); a program of the selected-attention
forward and dQ owns one position (Gp rows, >= 16) and loops over its group's n selected
blocks, so each selected KV block is read once per group, not once per head. dK/dV of the selection branch
run over a work list: the (query, block) pairs sorted by block, cut into items of
at most `dkdv_items` queries; a program accumulates one item's dK, dV of its
block in registers and adds them to an fp32 buffer with one atomic add per tile.

Scores are in the log2 domain (s2 = q·k · scale · log2 e, exp2 everywhere); the
saved LSE2 is +inf for a row that sees nothing, so its P is 0 in every backward.
Every kernel takes `interpret=None` (interpret mode on CPU).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import compute_on
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import nsa_cmp_cudnn, pad_axis, resolve_interpret

LOG2E = math.log2(math.e)
_NEG = -1e30
CMP_ATTENTION = ("auto", "cudnn", "pallas")


def pow2(n: int, floor: int = 1) -> int:
  """Smallest power of two >= n (and >= floor)."""
  return max(floor, 1 << max(0, int(n) - 1).bit_length())


def num_compressed_blocks(length: int, block_len: int, block_stride: int) -> int:
  """Compressed blocks (length l, stride d) that fit in `length` tokens."""
  return max(0, (length - block_len) // block_stride + 1)


def num_select_blocks(length: int, select_block: int) -> int:
  """Selection blocks of l' tokens covering `length` tokens (the last one may be partial)."""
  return -(-length // select_block)


@dataclasses.dataclass(frozen=True)
class NSAGeometry:
  """Static sizes shared by the kernels (hashable: used as a jit static)."""

  length: int          # L (query positions == key positions)
  num_kv_heads: int
  group: int           # G query heads per KV head
  block_len: int       # l
  block_stride: int    # d
  select_block: int    # l'
  num_selected: int    # n
  num_initial: int
  num_local: int
  scale: float

  @property
  def gp(self) -> int:
    return pow2(self.group)

  @property
  def num_compressed(self) -> int:
    return num_compressed_blocks(self.length, self.block_len, self.block_stride)

  @property
  def num_select_blocks(self) -> int:
    return num_select_blocks(self.length, self.select_block)



@dataclasses.dataclass(frozen=True)
class Tuning:
  """Launch parameters and kernel-path choices (hashable). `None` per-kernel warps/stages fall back to
  num_warps/num_stages."""

  block_kc: int = 64        # compressed keys per step
  cmp_rows: int = 128       # rows (positions x Gp heads) per compressed-attention program
  # the selected branch's dQ: False = nsa_sel_dq recomputes P and dP from K and V (137 GB of blocks at
  # 64k); True = nsa_sel_dkdv also stores each (query, block) pair's dS in q's dtype (8.6 GB at 64k,
  # H = 64, H_kv = 4) and nsa_sel_dq_from_ds reads dS and K only. 64k H200 (session 27): dQ 9.3 ms
  # instead of 19.4, but dK/dV 18.2 instead of 11.6, so 3.4 ms less for 8.6 GB more memory: off
  sel_dq_from_ds: bool = False
  dkdv_items: int = 1024    # queries per dK/dV work item (selection branch; 64k H200: 11.7 ms vs 13.0 at 256)
  # importance's sum over a group's heads: "reshape" ([16·Gp, bk] -> [16, Gp, bk], sum),
  # "bf16" (0/1 matmul with P in q's dtype), "tf32" (0/1 matmul in fp32, the first version), or
  # "rebin" (each row re-binned onto the selection blocks first by an MMA with P in q's dtype, then
  # the sum over [16·Gp, nb])
  importance_sum: str = "rebin"      # 64k H200: 7.5 ms with 4 warps, "reshape" 9.5 at 8 (session 26)
  importance_positions: int = 16     # positions per importance program (rows = positions x Gp)
  importance_blocks: int = 16        # selection blocks per importance step (l'/d compressed keys each)
  importance_stages: int | None = None
  num_warps: int = 4
  num_stages: int = 2
  cmp_warps: int | None = None        # nsa_cmp_fwd
  cmp_stages: int | None = None
  importance_warps: int = 4
  # nsa_topn: positions per program (a [positions, next_pow2(L/l')] fp32 tile) and warps; 64k H200
  # (session 27): 8 positions at 2 warps 2.33 ms, 16 at 4 (the default before) 4.03
  topn_positions: int = 8
  topn_warps: int | None = 2
  sel_warps: int | None = None        # nsa_sel_fwd
  sel_stages: int | None = None
  sel_unroll: bool = False            # unroll nsa_sel_fwd's loop over the n selected blocks
  cmp_dkdv_rows: int = 64             # rows per query tile in nsa_cmp_dkdv's loop
  cmp_dkdv_splits: int | None = None  # programs per compressed chunk in nsa_cmp_dkdv (None: auto)
  # the compressed backward's kernels (None: cmp_rows / block_kc / num_warps / num_stages)
  # rows per nsa_cmp_dq program: 64, not cmp_rows' 128 (64k H200: 12.2 vs 22.8 ms; at 128 rows and 4
  # warps q, dO and the fp32 dQ tile alone need 256 registers a thread, so it spills)
  cmp_dq_rows: int | None = 64
  cmp_dq_bk: int | None = None        # compressed keys per nsa_cmp_dq step
  cmp_dq_warps: int | None = None
  cmp_dq_stages: int | None = None
  cmp_dkdv_bk: int | None = None      # compressed keys per nsa_cmp_dkdv program (its chunk)
  cmp_dkdv_warps: int | None = None
  cmp_dkdv_stages: int | None = None
  # the compressed branch's attention (forward, backward and the LSE2 that importance needs):
  # "cudnn" (`nsa_cmp_cudnn`: cuDNN's causal flash attention on a re-laid q), "pallas" (the kernels
  # here), "auto" (cuDNN where it runs the case, else Pallas)
  cmp_attention: str = "auto"
  # run the compressed branch on GPU stream 2 and (in lca.attention.nsa) the window branch on stream 1,
  # so that they may overlap the selected branch's latency-bound kernels (jax's compute_on; XLA
  # honours it only under XLA_FLAGS=--xla_gpu_experimental_stream_annotation=true, else the branches
  # run in turn as without it). Not yet timed on a GPU: `bench_nsa --parts=streams`
  branch_streams: bool = False

  def __post_init__(self):
    if self.cmp_attention not in CMP_ATTENTION:
      raise ValueError(f"Tuning.cmp_attention must be one of {CMP_ATTENTION}, "
                       f"got cmp_attention={self.cmp_attention!r}")
    if self.importance_sum not in ("reshape", "bf16", "tf32", "rebin"):
      raise ValueError(f"Tuning.importance_sum must be 'reshape', 'bf16', 'tf32' or 'rebin', "
                       f"got importance_sum={self.importance_sum!r}")
    for name in ("cmp_rows", "cmp_dkdv_rows", "cmp_dq_rows", "block_kc", "cmp_dq_bk", "cmp_dkdv_bk",
                 "importance_positions", "importance_blocks", "topn_positions"):
      value = getattr(self, name)
      if value is not None and (value < 1 or value & (value - 1)):
        raise ValueError(f"Tuning.{name} must be a power of two, got {name}={value}")

  @classmethod
  def from_string(cls, text: str) -> "Tuning":
    """Tuning from comma-separated `field=value` overrides, e.g. "sel_dq_from_ds=True,
    cmp_attention=pallas" ("" = the defaults); what a config or command-line flag can carry."""
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    overrides = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
      name, sep, value = (x.strip() for x in item.partition("="))
      if not sep or name not in fields:
        raise ValueError(f"NSA kernel tuning: {item!r} is not field=value with a field of "
                         f"pallas_kernels.nsa.Tuning ({', '.join(fields)})")
      overrides[name] = _parse_field(name, fields[name], value)
    return cls(**overrides)

  def cmp_positions(self, geo: NSAGeometry, rows: int | None = None) -> int:
    """BT positions per compressed-attention tile (BT·Gp = cmp_rows, at least one position)."""
    return max(1, (rows or self.cmp_rows) // geo.gp)


def _parse_field(name: str, annotation: str, value: str):
  """A Tuning field's value from text, by its annotation ("int", "int | None", "bool", "str")."""
  if value == "None" and "None" in annotation:
    return None
  if annotation.startswith("bool"):
    if value.lower() in ("true", "false"):
      return value.lower() == "true"
  elif annotation.startswith("int"):
    try:
      return int(value)
    except ValueError:
      pass
  else:
    return value
  raise ValueError(f"NSA kernel tuning: {name} takes {annotation}, got {name}={value!r}")


def on_stream(fn, stream: int):
  """fn (arrays in, arrays out) placed on GPU stream `stream` by an XLA stream annotation, with its
  derivatives; other backends, and XLA without --xla_gpu_experimental_stream_annotation, ignore it."""
  return compute_on.compute_on(compute_type=f"gpu_stream:{stream}", out_memory_spaces=jax.memory.Space.Device)(fn)


def _params(t: Tuning, warps=None, stages=None):
  return plgpu.CompilerParams(num_warps=warps or t.num_warps, num_stages=stages or t.num_stages)


# ----------------------------------------------------------------------------- layout


def to_rows(x, group: int) -> jax.Array:
  """[B, L, H, D] -> [B·H_kv, L·Gp, D], heads of a group padded to Gp rows per position."""
  batch, length, heads, dim = x.shape
  kv_heads, gp = heads // group, pow2(group)
  x = x.reshape(batch, length, kv_heads, group, dim)
  if gp != group:
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, gp - group), (0, 0)))
  return x.transpose(0, 2, 1, 3, 4).reshape(batch * kv_heads, length * gp, dim)


def from_rows(x, batch: int, group: int) -> jax.Array:
  """Inverse of `to_rows` -> [B, L, H, D]."""
  bh, rows, dim = x.shape
  kv_heads, gp = bh // batch, pow2(group)
  x = x.reshape(batch, kv_heads, rows // gp, gp, dim)[:, :, :, :group]
  return x.transpose(0, 2, 1, 3, 4).reshape(batch, rows // gp, kv_heads * group, dim)


def _rows_to_vec(x, batch: int, group: int) -> jax.Array:
  """[B·H_kv, L·Gp] -> [B, L, H] (for LSE checks)."""
  return from_rows(x[..., None], batch, group)[..., 0]


def _vec_to_rows(x, group: int) -> jax.Array:
  """[B, L, H] -> [B·H_kv, L·Gp] (per-row values such as delta; padded heads 0)."""
  return to_rows(x[..., None], group)[..., 0]


def _group_rows(geo: NSAGeometry, g, rows):
  """Rows t·Gp + h of group g [R] -> (position t [R], query head g·G + h [R], valid [R])."""
  t, h = rows // geo.gp, rows % geo.gp
  return t, g * geo.group + h, (t < geo.length) & (h < geo.group)


def _at_heads(ref, b, t, head, ok):
  """The [R, D] view of ref [B, L, H, D] at (t, head) per row. Rows that are not ok point one
  past the last position: masked on the GPU, dropped by interpret mode's scatter (so they never
  overwrite a valid row's store)."""
  t = jnp.where(ok, t, ref.shape[1])
  return ref.at[b, t[:, None], head[:, None], jnp.arange(ref.shape[-1])[None, :]]


def _load_heads(ref, b, t, head, ok):
  return plgpu.load(_at_heads(ref, b, t, head, ok), mask=ok[:, None], other=0.0)


def _store_heads(ref, b, t, head, ok, x):
  plgpu.store(_at_heads(ref, b, t, head, ok), x.astype(ref.dtype), mask=ok[:, None])


# ----------------------------------------------------------------------------- compressed attention


def _tile_rows(geo: NSAGeometry, g, tile, bt: int):
  """-> first row, positions [R], query heads [R], row valid [R] of group g's BT-position tile
  (R = BT·Gp rows)."""
  row0 = tile * (bt * geo.gp)
  return row0, *_group_rows(geo, g, row0 + jnp.arange(bt * geo.gp))


def _cmp_visible(geo: NSAGeometry, start, t, bk):
  i = start + jnp.arange(bk)
  end = i * geo.block_stride + geo.block_len - 1
  return i, (end[None, :] <= t[:, None]) & (i < geo.num_compressed)[None, :]


def _num_visible(geo: NSAGeometry, t_last):
  """Compressed blocks visible to position t_last (traced)."""
  n = (t_last - geo.block_len + 1) // geo.block_stride + 1
  return jnp.clip(n, 0, geo.num_compressed)


def _cmp_steps(geo: NSAGeometry, tile, bt: int, bk: int):
  """-> (steps of bk compressed blocks seen by every position of the tile, steps seen by any).

  The first steps need no causal mask (as in flash attention's off-diagonal tiles). The
  first is None (no unmasked loop at all) when fewer than bk compressed blocks exist."""
  t_first = tile * bt
  t_last = jnp.minimum(t_first + bt - 1, geo.length - 1)
  steps = pl.cdiv(_num_visible(geo, t_last), bk)
  if geo.num_compressed < bk:   # an unmasked [bk] slice would not even fit the array
    return None, steps
  return _num_visible(geo, t_first) // bk, steps


def _softmax_init(rows: int, dim_v: int):
  """Online-softmax carry (acc [R, Dv], running max m [R], running sum l [R]), log2 domain."""
  return (jnp.zeros((rows, dim_v), jnp.float32), jnp.full((rows,), _NEG, jnp.float32),
          jnp.zeros((rows,), jnp.float32))


def _softmax_step(carry, s, visible, v):
  """Adds keys with log2 scores s [R, bk] (only where `visible`, [R, bk] or [1, bk]; None = all),
  values v [bk, Dv]."""
  acc, m, l = carry
  if visible is not None:
    s = jnp.where(visible, s, _NEG)
  m_new = jnp.maximum(m, s.max(axis=1))
  p = jnp.exp2(s - m_new[:, None])
  if visible is not None:
    p = jnp.where(visible, p, 0.0)
  alpha = jnp.exp2(m - m_new)
  return acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v), m_new, l * alpha + p.sum(axis=1)


def _softmax_finish(carry):
  """-> normalized output [R, Dv] fp32 and LSE2 [R] (+inf for a row that saw no key)."""
  acc, m, l = carry
  seen = l > 0
  return acc / jnp.where(seen, l, 1.0)[:, None], jnp.where(seen, m + jnp.log2(l), jnp.inf)


def _cmp_fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, geo: NSAGeometry, bk: int, bt: int):
  bh, tile = pl.program_id(0), pl.program_id(1)
  b, g = bh // geo.num_kv_heads, bh % geo.num_kv_heads
  row0, t, head, ok = _tile_rows(geo, g, tile, bt)
  r = t.shape[0]
  q = _load_heads(q_ref, b, t, head, ok)
  full_steps, steps = _cmp_steps(geo, tile, bt, bk)
  qk_scale = geo.scale * LOG2E

  def body(step, carry, masked):
    if not masked:      # every block of the step is visible to every row, and in range
      k = k_ref[b, pl.ds(step * bk, bk), g, :]
      v = v_ref[b, pl.ds(step * bk, bk), g, :]
      return _softmax_step(carry, plgpu.dot(q, k.T) * qk_scale, None, v)
    i, vis = _cmp_visible(geo, step * bk, t, bk)
    in_range = (i < geo.num_compressed)[:, None]
    k = plgpu.load(k_ref.at[b, pl.ds(step * bk, bk), g, :], mask=in_range, other=0.0)
    v = plgpu.load(v_ref.at[b, pl.ds(step * bk, bk), g, :], mask=in_range, other=0.0)
    return _softmax_step(carry, plgpu.dot(q, k.T) * qk_scale, vis, v)

  carry, start = _softmax_init(r, v_ref.shape[-1]), 0
  if full_steps is not None:
    carry, start = lax.fori_loop(0, full_steps, functools.partial(body, masked=False), carry), full_steps
  o, lse = _softmax_finish(lax.fori_loop(start, steps, functools.partial(body, masked=True), carry))
  _store_heads(o_ref, b, t, head, ok, o)
  plgpu.store(lse_ref.at[bh, pl.ds(row0, r)], lse, mask=ok)


def _row_shapes(q, dim_v, geo: NSAGeometry):
  """Outputs of a forward kernel: o [B, L, H, Dv] in q's dtype, LSE2 [B·H_kv, L·Gp] fp32."""
  batch, length, heads, _ = q.shape
  return [jax.ShapeDtypeStruct((batch, length, heads, dim_v), q.dtype),
          jax.ShapeDtypeStruct((batch * geo.num_kv_heads, length * geo.gp), jnp.float32)]


def _cmp_fwd(q, kc, vc, geo: NSAGeometry, tuning: Tuning, interpret):
  """q [B, L, H, D], kc [B, Nc, H_kv, D], vc [B, Nc, H_kv, Dv] -> o [B, L, H, Dv], LSE2 rows."""
  bt = tuning.cmp_positions(geo)
  return pl.pallas_call(
      functools.partial(_cmp_fwd_kernel, geo=geo, bk=tuning.block_kc, bt=bt),
      grid=(q.shape[0] * geo.num_kv_heads, pl.cdiv(geo.length, bt)),
      out_shape=_row_shapes(q, vc.shape[-1], geo),
      compiler_params=_params(tuning, tuning.cmp_warps, tuning.cmp_stages), interpret=interpret,
      name="nsa_cmp_fwd",
  )(q, kc, vc)


def _cmp_dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, geo, bk, bt):
  bh, tile = pl.program_id(0), pl.program_id(1)
  b, g = bh // geo.num_kv_heads, bh % geo.num_kv_heads
  row0, t, head, ok = _tile_rows(geo, g, tile, bt)
  r = t.shape[0]
  q = _load_heads(q_ref, b, t, head, ok)
  do = _load_heads(do_ref, b, t, head, ok)
  lse = plgpu.load(lse_ref.at[bh, pl.ds(row0, r)], mask=ok, other=jnp.inf)
  delta = plgpu.load(delta_ref.at[bh, pl.ds(row0, r)], mask=ok, other=0.0)
  full_steps, steps = _cmp_steps(geo, tile, bt, bk)
  qk_scale = geo.scale * LOG2E

  def body(step, dq, masked):
    if masked:
      i, vis = _cmp_visible(geo, step * bk, t, bk)
      in_range = (i < geo.num_compressed)[:, None]
      k = plgpu.load(k_ref.at[b, pl.ds(step * bk, bk), g, :], mask=in_range, other=0.0)
      v = plgpu.load(v_ref.at[b, pl.ds(step * bk, bk), g, :], mask=in_range, other=0.0)
    else:   # all visible; padded rows have LSE2 = +inf, so their p is 0 anyway
      k = k_ref[b, pl.ds(step * bk, bk), g, :]
      v = v_ref[b, pl.ds(step * bk, bk), g, :]
    p = jnp.exp2(plgpu.dot(q, k.T) * qk_scale - lse[:, None])
    if masked:
      p = jnp.where(vis & ok[:, None], p, 0.0)
    ds = p * (plgpu.dot(do, v.T) - delta[:, None])
    return dq + plgpu.dot(ds.astype(k.dtype), k)

  dq, start = jnp.zeros((r, q_ref.shape[-1]), jnp.float32), 0
  if full_steps is not None:
    dq, start = lax.fori_loop(0, full_steps, functools.partial(body, masked=False), dq), full_steps
  dq = lax.fori_loop(start, steps, functools.partial(body, masked=True), dq)
  _store_heads(dq_ref, b, t, head, ok, dq * geo.scale)


def _cmp_dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, geo, bk, bt,
                     splits):
  """dK, dV of a chunk of bk compressed blocks from split s of the query tiles that see it
  (an equal share of them, whatever the chunk's causal start): fp32 partials [splits, ...]."""
  bh, kb, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  b, g = bh // geo.num_kv_heads, bh % geo.num_kv_heads
  i = kb * bk + jnp.arange(bk)
  in_range = i < geo.num_compressed
  k = plgpu.load(k_ref.at[b, pl.ds(kb * bk, bk), g, :], mask=in_range[:, None], other=0.0)
  v = plgpu.load(v_ref.at[b, pl.ds(kb * bk, bk), g, :], mask=in_range[:, None], other=0.0)
  first_t = kb * bk * geo.block_stride + geo.block_len - 1   # first position seeing this chunk
  first_tile = first_t // bt
  tiles = pl.cdiv(geo.length, bt)
  per_split = pl.cdiv(jnp.maximum(tiles - first_tile, 0), splits)
  lo = jnp.minimum(first_tile + split * per_split, tiles)
  hi = jnp.minimum(lo + per_split, tiles)
  qk_scale = geo.scale * LOG2E

  def body(tile, carry):
    dk, dv = carry
    row0, t, head, ok = _tile_rows(geo, g, tile, bt)
    r = t.shape[0]
    _, vis = _cmp_visible(geo, kb * bk, t, bk)
    q = _load_heads(q_ref, b, t, head, ok)
    do = _load_heads(do_ref, b, t, head, ok)
    lse = plgpu.load(lse_ref.at[bh, pl.ds(row0, r)], mask=ok, other=jnp.inf)
    delta = plgpu.load(delta_ref.at[bh, pl.ds(row0, r)], mask=ok, other=0.0)
    p = jnp.where(vis & ok[:, None], jnp.exp2(plgpu.dot(q, k.T) * qk_scale - lse[:, None]), 0.0)
    dv = dv + plgpu.dot(p.astype(do.dtype).T, do)
    ds = p * (plgpu.dot(do, v.T) - delta[:, None])
    dk = dk + plgpu.dot(ds.astype(q.dtype).T, q)
    return dk, dv

  dk = jnp.zeros((bk, k_ref.shape[-1]), jnp.float32)
  dv = jnp.zeros((bk, v_ref.shape[-1]), jnp.float32)
  dk, dv = lax.fori_loop(lo, hi, body, (dk, dv))
  plgpu.store(dk_ref.at[split, b, pl.ds(kb * bk, bk), g, :], dk * geo.scale, mask=in_range[:, None])
  plgpu.store(dv_ref.at[split, b, pl.ds(kb * bk, bk), g, :], dv, mask=in_range[:, None])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _cmp_attention(q, kc, vc, geo, tuning, interpret):
  """`_cmp_fwd` with its backward (gradients of o only: LSE2 is for selection)."""
  return _cmp_fwd(q, kc, vc, geo, tuning, interpret)


def _cmp_attention_fwd(q, kc, vc, geo, tuning, interpret):
  o, lse = _cmp_fwd(q, kc, vc, geo, tuning, interpret)
  return (o, lse), (q, kc, vc, o, lse)


def _delta_rows(o, do, geo: NSAGeometry):
  """rowsum(o * dO) [B, L, H] -> [B·H_kv, L·Gp] fp32."""
  return _vec_to_rows(jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1), geo.group)


def _cmp_attention_bwd(geo, tuning, interpret, res, cts):
  q, kc, vc, o, lse = res
  do = cts[0].astype(q.dtype)   # the LSE output is for selection only: no gradient
  delta = _delta_rows(o, do, geo)
  bh = q.shape[0] * geo.num_kv_heads
  bt = tuning.cmp_positions(geo, tuning.cmp_dq_rows)
  dq = pl.pallas_call(
      functools.partial(_cmp_dq_kernel, geo=geo, bk=tuning.cmp_dq_bk or tuning.block_kc, bt=bt),
      grid=(bh, pl.cdiv(geo.length, bt)),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_params(tuning, tuning.cmp_dq_warps, tuning.cmp_dq_stages), interpret=interpret,
      name="nsa_cmp_dq",
  )(q, kc, vc, do, lse, delta)
  bk = tuning.cmp_dkdv_bk or tuning.block_kc
  chunks = pl.cdiv(geo.num_compressed, bk)
  # Nc = L/d chunks are few (256 programs at 64k): split each chunk's query tiles over programs
  splits = tuning.cmp_dkdv_splits or max(1, min(32, pl.cdiv(2048, bh * chunks)))
  bt_kv = tuning.cmp_positions(geo, tuning.cmp_dkdv_rows)
  dk, dv = pl.pallas_call(
      functools.partial(_cmp_dkdv_kernel, geo=geo, bk=bk, bt=bt_kv, splits=splits),
      grid=(bh, chunks, splits),
      out_shape=[jax.ShapeDtypeStruct((splits, *kc.shape), jnp.float32),
                 jax.ShapeDtypeStruct((splits, *vc.shape), jnp.float32)],
      compiler_params=_params(tuning, tuning.cmp_dkdv_warps, tuning.cmp_dkdv_stages), interpret=interpret,
      name="nsa_cmp_dkdv",
  )(q, kc, vc, do, lse, delta)
  return dq, dk.sum(0).astype(kc.dtype), dv.sum(0).astype(vc.dtype)


_cmp_attention.defvjp(_cmp_attention_fwd, _cmp_attention_bwd)


def cudnn_unavailable(q, interpret: bool) -> str | None:
  """None when the compressed branch can try cuDNN here, else why not."""
  if interpret or jax.default_backend() != "gpu":
    return f"cuDNN needs a GPU (interpret={interpret}, backend {jax.default_backend()!r})"
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"cuDNN needs bfloat16 or float16 inputs, q is {q.dtype}"
  return None


def _compressed(q, kc, vc, geo: NSAGeometry, tuning: Tuning, interpret):
  """The compressed branch -> o [B, L, H, Dv], LSE2 rows, on cuDNN or the Pallas kernels as
  `tuning.cmp_attention` says ("auto": cuDNN where it runs the case)."""
  if geo.num_compressed == 0:   # L < l: no block has ended yet
    return (jnp.zeros((*q.shape[:3], vc.shape[-1]), q.dtype),
            jnp.full((q.shape[0] * geo.num_kv_heads, geo.length * geo.gp), jnp.inf, jnp.float32))
  why = cudnn_unavailable(q, interpret) if tuning.cmp_attention != "pallas" else "cmp_attention='pallas'"
  if why is None:
    try:
      o, lse = nsa_cmp_cudnn.compressed_attention(q, kc, vc, block_len=geo.block_len,
                                                  block_stride=geo.block_stride, scale=geo.scale)
      return o, _vec_to_rows(lse, geo.group)
    except NotImplementedError as e:
      why = str(e)
  if tuning.cmp_attention == "cudnn":
    raise NotImplementedError(f"Tuning(cmp_attention='cudnn') cannot run here: {why}")
  return _cmp_attention(q, kc, vc, geo, tuning, interpret)


# ----------------------------------------------------------------------------- importance + top-n


def _importance_kernel(q_ref, k_ref, lse_ref, imp_ref, *, geo: NSAGeometry, bt: int, nb: int, head_sum: str):
  """One program: `bt` positions x all heads of a group; NB selection blocks per step."""
  bh, tile = pl.program_id(0), pl.program_id(1)
  b, g = bh // geo.num_kv_heads, bh % geo.num_kv_heads
  gp = geo.gp
  row0, t, head, ok = _tile_rows(geo, g, tile, bt)
  q = _load_heads(q_ref, b, t, head, ok)
  lse = plgpu.load(lse_ref.at[bh, pl.ds(row0, bt * gp)], mask=ok, other=jnp.inf)
  per_c = geo.block_len // geo.block_stride
  per_s = geo.select_block // geo.block_stride
  bk = nb * per_s
  # head sum as a matmul: sel[p, row] = 1 if row belongs to position p of this tile
  sel = ((jnp.arange(bt * gp)[None, :] // gp == jnp.arange(bt)[:, None])
         & ok[None, :]).astype(jnp.float32)
  # overlap (in d-chunks) of compressed block i (local) with selection block jj (local), and
  # with the first block of the next step (the spill)
  il = jnp.arange(bk)[:, None]
  jj = jnp.arange(nb)[None, :]
  overlap = (jnp.minimum(il + per_c, (jj + 1) * per_s) - jnp.maximum(il, jj * per_s))
  overlap = jnp.maximum(overlap, 0).astype(jnp.float32)
  spill = jnp.maximum(jnp.minimum(jnp.arange(bk) + per_c, bk + per_s) - jnp.maximum(jnp.arange(bk), bk), 0)
  spill = spill.astype(jnp.float32)
  t_pos = tile * bt + jnp.arange(bt)
  t_last = jnp.minimum(tile * bt + bt - 1, geo.length - 1)
  steps = (t_last // geo.select_block) // nb + 1
  qk_scale = geo.scale * LOG2E
  cols = jnp.arange(nb)

  def body(step, carry):
    i, vis = _cmp_visible(geo, step * bk, t, bk)
    k = plgpu.load(k_ref.at[b, pl.ds(step * bk, bk), g, :], mask=(i < geo.num_compressed)[:, None],
                   other=0.0)
    p = jnp.where(vis & ok[:, None], jnp.exp2(plgpu.dot(q, k.T) * qk_scale - lse[:, None]), 0.0)
    if head_sum == "rebin":   # every row onto the selection blocks first (one MMA, P in q's dtype
      # as its operand), then the head sum over [R, nb] values, a quarter of P's [R, bk]
      imp = plgpu.dot(p.astype(q.dtype), overlap.astype(q.dtype)).reshape(bt, gp, nb).sum(axis=1)
      spilled = jnp.sum(p * spill[None, :], axis=1).reshape(bt, gp).sum(axis=1)
    else:
      if head_sum == "reshape":
        per_pos = p.reshape(bt, gp, bk).sum(axis=1)     # [bt, bk]
      elif head_sum == "bf16":
        per_pos = plgpu.dot(sel.astype(q.dtype), p.astype(q.dtype))
      else:
        per_pos = plgpu.dot(sel, p)
      imp = plgpu.dot(per_pos, overlap)                 # [bt, nb]
      spilled = jnp.sum(per_pos * spill[None, :], axis=1)
    imp = imp + jnp.where(cols[None, :] == 0, carry[:, None], 0.0)
    j = step * nb + cols
    plgpu.store(imp_ref.at[bh, pl.ds(tile * bt, bt), pl.ds(step * nb, nb)], imp,
                mask=(t_pos < geo.length)[:, None] & (j < geo.num_select_blocks)[None, :])
    return spilled

  lax.fori_loop(0, steps, body, jnp.zeros((bt,), jnp.float32))


def _importance(q, kc, lse, geo: NSAGeometry, tuning: Tuning, interpret):
  """q [B, L, H, D], kc, LSE2 rows (of `_cmp_fwd`) -> importance [B·H_kv, L, Ns] fp32."""
  bh = q.shape[0] * geo.num_kv_heads
  bt = tuning.importance_positions
  ns = geo.num_select_blocks
  return pl.pallas_call(
      functools.partial(_importance_kernel, geo=geo, bt=bt, nb=tuning.importance_blocks,
                        head_sum=tuning.importance_sum),
      grid=(bh, pl.cdiv(geo.length, bt)),
      out_shape=jax.ShapeDtypeStruct((bh, geo.length, ns), jnp.float32),
      compiler_params=_params(tuning, tuning.importance_warps, tuning.importance_stages), interpret=interpret,
      name="nsa_importance",
  )(q, kc, lse)


def _topn_kernel(imp_ref, idx_ref, *, geo: NSAGeometry, bt: int, ns_pad: int):
  bh, tile = pl.program_id(0), pl.program_id(1)
  t = tile * bt + jnp.arange(bt)
  j = jnp.arange(ns_pad)
  row_ok = t < geo.length
  x = plgpu.load(imp_ref.at[bh, pl.ds(tile * bt, bt), pl.ds(0, ns_pad)],
                 mask=row_ok[:, None] & (j < geo.num_select_blocks)[None, :], other=0.0)
  cur = (t // geo.select_block)[:, None]
  jj = j[None, :]
  forced = (jj < geo.num_initial) | ((jj <= cur) & (cur - jj < geo.num_local))
  score = jnp.where(forced, jnp.inf, jnp.where(jj <= cur, x, -jnp.inf))
  # each round: the best value, then the lowest index holding it (ties as lax.top_k). One (value,
  # index) argmax a round instead was slower on the GPU (sessions 5 and 27: 5.9 vs 4.3 ms at 64k)
  for n in range(geo.num_selected):
    best = score.max(axis=1)
    arg = jnp.min(jnp.where(score == best[:, None], jj, ns_pad), axis=1)
    taken = best > -jnp.inf
    plgpu.store(idx_ref.at[bh, pl.ds(tile * bt, bt), jnp.int32(n)],
                jnp.where(taken, arg, -1).astype(jnp.int32), mask=row_ok)
    score = jnp.where(jj == arg[:, None], -jnp.inf, score)


def _topn(imp, geo: NSAGeometry, tuning: Tuning, interpret):
  bh = imp.shape[0]
  bt = tuning.topn_positions
  ns_pad = pow2(geo.num_select_blocks, 16)
  return pl.pallas_call(
      functools.partial(_topn_kernel, geo=geo, bt=bt, ns_pad=ns_pad),
      grid=(bh, pl.cdiv(geo.length, bt)),
      out_shape=jax.ShapeDtypeStruct((bh, geo.length, geo.num_selected), jnp.int32),
      compiler_params=_params(tuning, tuning.topn_warps), interpret=interpret, name="nsa_topn",
  )(imp)


# ----------------------------------------------------------------------------- selected attention


def _sel_tile(geo: NSAGeometry, g, t):
  """Rows of position t's program (the group's heads, >= 16 rows for the MMA) -> (first row of
  t in the LSE2 rows, rows R, positions [R], query heads [R], valid [R])."""
  r = max(16, geo.gp)
  h = jnp.arange(r)
  return t * geo.gp, r, jnp.full((r,), t), g * geo.group + h, h < geo.group


def _selected_block(idx_ref, bh, t, n, geo: NSAGeometry, *refs):
  """-> (the rows of each of refs (k [l', D], v [l', Dv], ...), visible [l']) at position t's n-th
  selected block (an empty slot (-1) and keys after t are masked to zero)."""
  b, g = bh // geo.num_kv_heads, bh % geo.num_kv_heads
  lb = geo.select_block
  blk = plgpu.load(idx_ref.at[bh, t, n])
  s_pos = jnp.maximum(blk, 0) * lb + jnp.arange(lb)
  key_ok = (s_pos <= t) & (blk >= 0)
  rows = pl.ds(jnp.maximum(blk, 0) * lb, lb)
  return *(plgpu.load(ref.at[b, rows, g, :], mask=key_ok[:, None], other=0.0) for ref in refs), key_ok


def _sel_fwd_kernel(q_ref, k_ref, v_ref, idx_ref, o_ref, lse_ref, *, geo: NSAGeometry, unroll: bool):
  bh, t = pl.program_id(0), pl.program_id(1)
  b, g = bh // geo.num_kv_heads, bh % geo.num_kv_heads
  start, r, tt, head, ok = _sel_tile(geo, g, t)
  q = _load_heads(q_ref, b, tt, head, ok)
  qk_scale = geo.scale * LOG2E

  def body(n, carry):
    k, v, key_ok = _selected_block(idx_ref, bh, t, n, geo, k_ref, v_ref)
    return _softmax_step(carry, plgpu.dot(q, k.T) * qk_scale, key_ok[None, :], v)

  carry = _softmax_init(r, v_ref.shape[-1])
  if unroll:   # straight-line code: the compiler may issue later blocks' loads early
    for n in range(geo.num_selected):
      carry = body(jnp.int32(n), carry)
  else:
    carry = lax.fori_loop(0, geo.num_selected, body, carry)
  o, lse = _softmax_finish(carry)
  _store_heads(o_ref, b, tt, head, ok, o)
  plgpu.store(lse_ref.at[bh, pl.ds(start, r)], lse, mask=ok)


def _sel_fwd(q, k, v, idx, geo, tuning, interpret):
  """q [B, L, H, D], k, v [B, L, H_kv, D / Dv], idx [B·H_kv, L, n] -> o [B, L, H, Dv], LSE2 rows."""
  return pl.pallas_call(
      functools.partial(_sel_fwd_kernel, geo=geo, unroll=tuning.sel_unroll),
      grid=(q.shape[0] * geo.num_kv_heads, geo.length),
      out_shape=_row_shapes(q, v.shape[-1], geo),
      compiler_params=_params(tuning, tuning.sel_warps, tuning.sel_stages), interpret=interpret,
      name="nsa_sel_fwd",
  )(q, k, v, idx)


def _sel_dq_kernel(q_ref, k_ref, v_ref, idx_ref, do_ref, lse_ref, delta_ref, dq_ref, *, geo):
  bh, t = pl.program_id(0), pl.program_id(1)
  b, g = bh // geo.num_kv_heads, bh % geo.num_kv_heads
  start, r, tt, head, ok = _sel_tile(geo, g, t)
  q = _load_heads(q_ref, b, tt, head, ok)
  do = _load_heads(do_ref, b, tt, head, ok)
  lse = plgpu.load(lse_ref.at[bh, pl.ds(start, r)], mask=ok, other=jnp.inf)
  delta = plgpu.load(delta_ref.at[bh, pl.ds(start, r)], mask=ok, other=0.0)
  qk_scale = geo.scale * LOG2E

  def body(n, dq):
    k, v, key_ok = _selected_block(idx_ref, bh, t, n, geo, k_ref, v_ref)
    p = jnp.where(key_ok[None, :] & ok[:, None], jnp.exp2(plgpu.dot(q, k.T) * qk_scale - lse[:, None]), 0.0)
    ds = p * (plgpu.dot(do, v.T) - delta[:, None])
    return dq + plgpu.dot(ds.astype(k.dtype), k)

  dq = lax.fori_loop(0, geo.num_selected, body, jnp.zeros((r, q_ref.shape[-1]), jnp.float32))
  _store_heads(dq_ref, b, tt, head, ok, dq * geo.scale)


def _sel_dq_from_ds_kernel(k_ref, idx_ref, ds_ref, dq_ref, *, geo):
  """dQ of position t = scale · sum over its n blocks of dS [R, l'] (stored by nsa_sel_dkdv) · K:
  K's bytes only, no V, and no P or dP to recompute."""
  bh, t = pl.program_id(0), pl.program_id(1)
  b, g = bh // geo.num_kv_heads, bh % geo.num_kv_heads
  _, r, tt, head, ok = _sel_tile(geo, g, t)
  lb = geo.select_block

  def body(n, dq):
    k, key_ok = _selected_block(idx_ref, bh, t, n, geo, k_ref)
    # an empty slot's dS was never stored (key_ok all False); the stored dS is 0 past t anyway
    ds = plgpu.load(ds_ref.at[bh, t * geo.num_selected + n, jnp.arange(r)[:, None], jnp.arange(lb)[None, :]],
                    mask=ok[:, None] & key_ok[None, :], other=0.0)
    return dq + plgpu.dot(ds, k)

  dq = lax.fori_loop(0, geo.num_selected, body, jnp.zeros((r, k_ref.shape[-1]), jnp.float32))
  _store_heads(dq_ref, b, tt, head, ok, dq * geo.scale)


def _sel_dkdv_kernel(items_ref, order_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref,
                     dk_in, dv_in, *refs, geo: NSAGeometry, bq: int, write_ds: bool):
  """One work item: block j and entries [lo, hi) of the block-sorted (query) list. With write_ds
  (refs: pairs, dk, dv, ds) it also stores each pair's dS [Gp rows, l'] in q's dtype at the pair's
  own index t·n + slot, for `_sel_dq_from_ds_kernel`; else refs are dk, dv."""
  del dk_in, dv_in  # aliased with dk_ref, dv_ref
  if write_ds:
    pairs_ref, dk_ref, dv_ref, ds_ref = refs
  else:
    dk_ref, dv_ref = refs
  bh, w = pl.program_id(0), pl.program_id(1)
  b, g = bh // geo.num_kv_heads, bh % geo.num_kv_heads
  j = plgpu.load(items_ref.at[bh, w, jnp.int32(0)])
  lo = plgpu.load(items_ref.at[bh, w, jnp.int32(1)])
  hi = plgpu.load(items_ref.at[bh, w, jnp.int32(2)])
  lb, gp = geo.select_block, geo.gp
  s_pos = jnp.maximum(j, 0) * lb + jnp.arange(lb)
  key_ok = (s_pos < geo.length) & (j >= 0)
  k = plgpu.load(k_ref.at[b, pl.ds(jnp.maximum(j, 0) * lb, lb), g, :], mask=key_ok[:, None], other=0.0)
  v = plgpu.load(v_ref.at[b, pl.ds(jnp.maximum(j, 0) * lb, lb), g, :], mask=key_ok[:, None], other=0.0)
  r = bq * gp
  qk_scale = geo.scale * LOG2E

  def body(step, carry):
    dk, dv = carry
    e = lo + step * bq + jnp.arange(r) // gp                      # entry of each row
    h = jnp.arange(r) % gp
    ok = (e < hi) & (h < geo.group)
    t = plgpu.load(order_ref.at[bh, jnp.minimum(e, hi - 1)], mask=ok, other=0)
    row = t * gp + h
    q, do = (_load_heads(ref, b, t, g * geo.group + h, ok) for ref in (q_ref, do_ref))
    lse = plgpu.load(lse_ref.at[bh, row], mask=ok, other=jnp.inf)
    delta = plgpu.load(delta_ref.at[bh, row], mask=ok, other=0.0)
    vis = ok[:, None] & key_ok[None, :] & (s_pos[None, :] <= t[:, None])
    p = jnp.where(vis, jnp.exp2(plgpu.dot(q, k.T) * qk_scale - lse[:, None]), 0.0)
    dv = dv + plgpu.dot(p.astype(do.dtype).T, do)
    ds = p * (plgpu.dot(do, v.T) - delta[:, None])
    dk = dk + plgpu.dot(ds.astype(q.dtype).T, q)
    if write_ds:
      pair = plgpu.load(pairs_ref.at[bh, jnp.minimum(e, hi - 1)], mask=ok, other=0)
      at = ds_ref.at[bh, jnp.where(ok, pair, ds_ref.shape[1])[:, None], h[:, None], jnp.arange(lb)[None, :]]
      plgpu.store(at, ds.astype(ds_ref.dtype), mask=ok[:, None])
    return dk, dv

  dk = jnp.zeros((lb, k_ref.shape[-1]), jnp.float32)
  dv = jnp.zeros((lb, v_ref.shape[-1]), jnp.float32)
  dk, dv = lax.fori_loop(0, pl.cdiv(hi - lo, bq), body, (dk, dv))
  # rows of keys >= L and unused items (j = -1, no queries) add zeros; the buffers are
  # padded to whole blocks, so no mask is needed
  start = jnp.maximum(j, 0) * lb
  plgpu.atomic_add(dk_ref, (b, pl.ds(start, lb), g, slice(None)), dk * geo.scale)
  plgpu.atomic_add(dv_ref, (b, pl.ds(start, lb), g, slice(None)), dv)


def work_list(idx, geo: NSAGeometry, item_size: int):
  """(query, block) pairs sorted by block, cut into items of <= item_size queries.

  idx: [BH, L, n] (-1 = none) -> order [BH, L·n] (query of each sorted pair),
  items [BH, W, 3] int32 rows (block, lo, hi) over `order` (unused items are (-1, 0, 0)), and
  pairs [BH, L·n] (each sorted pair's own index t·n + slot).
  """
  bh, length, n = idx.shape
  ns = geo.num_select_blocks
  key = jnp.where(idx < 0, ns, idx).reshape(bh, length * n).astype(jnp.int32)
  pair = jnp.broadcast_to(jnp.arange(length * n, dtype=jnp.int32), key.shape)
  sorted_key, order = lax.sort((key, pair), dimension=1, is_stable=True, num_keys=1)
  sorted_t = order // n
  # each block's first entry in the sorted list: a search over sorted keys, where a bincount was a
  # scatter-add of L·n ones into ns + 1 bins (0.7 ms at 64k, contended atomics)
  first = jax.vmap(lambda k: jnp.searchsorted(k, jnp.arange(ns + 1, dtype=jnp.int32)))(sorted_key)
  offsets, counts = first[:, :ns], jnp.diff(first, axis=1)                        # [BH, ns]
  chunks = -(-counts // item_size)
  item_end = jnp.cumsum(chunks, axis=1)                                           # inclusive
  num_items = -(-length * n // item_size) + ns
  w = jnp.arange(num_items)
  j = jax.vmap(lambda e: jnp.searchsorted(e, w, side="right"))(item_end)        # [BH, W]
  valid = j < ns
  jc = jnp.minimum(j, ns - 1)
  take = lambda a: jnp.take_along_axis(a, jc, axis=1)
  first_item = take(item_end) - take(chunks)
  lo = take(offsets) + (w[None, :] - first_item) * item_size
  hi = jnp.minimum(lo + item_size, take(offsets) + take(counts))
  items = jnp.stack([jnp.where(valid, j, -1), jnp.where(valid, lo, 0), jnp.where(valid, hi, 0)], axis=-1)
  return sorted_t, items.astype(jnp.int32), order


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _sel_attention(q, k, v, idx, geo, tuning, interpret):
  """`_sel_fwd`'s o with its backward."""
  return _sel_fwd(q, k, v, idx, geo, tuning, interpret)[0]


def _sel_attention_fwd(q, k, v, idx, geo, tuning, interpret):
  o, lse = _sel_fwd(q, k, v, idx, geo, tuning, interpret)
  return o, (q, k, v, idx, o, lse)


def _sel_attention_bwd(geo, tuning, interpret, res, do):
  q, k, v, idx, o, lse = res
  do = do.astype(q.dtype)
  delta = _delta_rows(o, do, geo)
  bh = q.shape[0] * geo.num_kv_heads
  order, items, pairs = work_list(idx, geo, tuning.dkdv_items)
  bq = max(1, 64 // geo.gp)
  padded = geo.num_select_blocks * geo.select_block
  zeros_k = jnp.zeros((k.shape[0], padded, *k.shape[2:]), jnp.float32)
  zeros_v = jnp.zeros((v.shape[0], padded, *v.shape[2:]), jnp.float32)
  out_shape = [jax.ShapeDtypeStruct(zeros_k.shape, jnp.float32), jax.ShapeDtypeStruct(zeros_v.shape, jnp.float32)]
  extra_in = ()
  if tuning.sel_dq_from_ds:   # dS of every (query, block) pair, rows padded to the dQ tile's >= 16
    out_shape.append(jax.ShapeDtypeStruct((bh, geo.length * geo.num_selected, max(16, geo.gp),
                                           geo.select_block), q.dtype))
    extra_in = (pairs,)
  dkdv = pl.pallas_call(
      functools.partial(_sel_dkdv_kernel, geo=geo, bq=bq, write_ds=tuning.sel_dq_from_ds),
      grid=(bh, items.shape[1]),
      out_shape=out_shape,
      input_output_aliases={8: 0, 9: 1},
      compiler_params=_params(tuning), interpret=interpret, name="nsa_sel_dkdv",
  )(items, order, q, do, lse, delta, k, v, zeros_k, zeros_v, *extra_in)
  dk, dv = dkdv[:2]
  if tuning.sel_dq_from_ds:
    dq_kernel, dq_args = _sel_dq_from_ds_kernel, (k, idx, dkdv[2])
  else:
    dq_kernel, dq_args = _sel_dq_kernel, (q, k, v, idx, do, lse, delta)
  dq = pl.pallas_call(
      functools.partial(dq_kernel, geo=geo),
      grid=(bh, geo.length),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_params(tuning), interpret=interpret,
      name="nsa_sel_dq_from_ds" if tuning.sel_dq_from_ds else "nsa_sel_dq",
  )(*dq_args)
  length = geo.length
  return dq, dk[:, :length].astype(k.dtype), dv[:, :length].astype(v.dtype), None


_sel_attention.defvjp(_sel_attention_fwd, _sel_attention_bwd)


# ----------------------------------------------------------------------------- public ops


def geometry(q, k, *, sizes, scale=None) -> NSAGeometry:
  """The static sizes for q [B, L, H, D], k [B, L, H_kv, D] and `lca.attention.nsa.NSASizes`
  (the default scale is 1/sqrt(D) of the unpadded head dim)."""
  if q.shape[1] != k.shape[1]:
    raise NotImplementedError(f"NSA kernels are self-attention: q has {q.shape[1]} positions, k {k.shape[1]}")
  if sizes.select_block < 16 or sizes.select_block & (sizes.select_block - 1):
    raise NotImplementedError(f"NSA kernels need a power-of-two select_block >= 16, got {sizes.select_block}")
  if pow2(q.shape[2] // k.shape[2]) > 64:
    raise NotImplementedError(f"NSA kernels take at most 64 query heads per group, got {q.shape[2] // k.shape[2]}")
  return NSAGeometry(
      length=q.shape[1], num_kv_heads=k.shape[2], group=q.shape[2] // k.shape[2],
      block_len=sizes.block_len, block_stride=sizes.block_stride, select_block=sizes.select_block,
      num_selected=sizes.num_selected, num_initial=sizes.num_initial, num_local=sizes.num_local,
      scale=1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale))


def pad_head_dims(*xs):
  """Zero-pads each array's last (head) dim to a power of two >= 16, as the kernels' tiles need.
  Zero columns leave q·k and p·v unchanged: a 192-dim q·k (128 + 64 RoPE dims, as in DeepSeek)
  runs as 256, at 4/3 of the q·k work."""
  return [pad_axis(x, -1, pow2(x.shape[-1], 16)) for x in xs]


def compressed_attention(q, kc, vc, *, sizes, scale=None, tuning=Tuning(), interpret=None,
                         return_lse: bool = False):
  """q [B, L, H, D], kc [B, Nc, H_kv, D], vc [B, Nc, H_kv, Dv] -> [B, L, H, Dv] (and LSE2
  [B, L, H], +inf = none)."""
  geo = geometry(q, q[:, :, :kc.shape[2]], sizes=sizes, scale=scale)
  dv = vc.shape[-1]
  q, kc, vc = pad_head_dims(q, kc, vc)
  o, lse = _compressed(q, kc, vc, geo, tuning, resolve_interpret(interpret))
  o = o[..., :dv]
  return (o, _rows_to_vec(lse, q.shape[0], geo.group)) if return_lse else o


def block_importance(q, kc, *, sizes, scale=None, tuning=Tuning(), interpret=None):
  """Selection-block importance -> [B, H_kv, L, Ns] fp32 (as `nsa.block_importance_reference`)."""
  geo = geometry(q, q[:, :, :kc.shape[2]], sizes=sizes, scale=scale)
  q, kc = pad_head_dims(q, kc)
  interpret = resolve_interpret(interpret)
  _, lse = _cmp_fwd(q, kc, kc, geo, tuning, interpret)
  imp = _importance(q, kc, lse, geo, tuning, interpret)
  return imp.reshape(q.shape[0], geo.num_kv_heads, geo.length, -1)


def select_topn(importance, *, sizes, tuning=Tuning(), interpret=None):
  """importance [B, H_kv, L, Ns] -> block indices [B, H_kv, L, n] int32, ascending, -1 = none last."""
  batch, kv_heads, length, ns = importance.shape
  geo = NSAGeometry(length=length, num_kv_heads=kv_heads, group=1, block_len=sizes.block_len,
                    block_stride=sizes.block_stride, select_block=sizes.select_block,
                    num_selected=sizes.num_selected, num_initial=sizes.num_initial,
                    num_local=sizes.num_local, scale=1.0)
  idx = _topn(importance.reshape(batch * kv_heads, length, ns), geo, tuning, resolve_interpret(interpret))
  idx = jnp.sort(jnp.where(idx < 0, ns, idx), axis=-1)
  return jnp.where(idx == ns, -1, idx).reshape(batch, kv_heads, length, -1)


def selected_attention(q, k, v, block_idx, *, sizes, scale=None, tuning=Tuning(), interpret=None):
  """q [B, L, H, D], k [B, L, H_kv, D], v [B, L, H_kv, Dv], block_idx [B, H_kv, L, n] ->
  [B, L, H, Dv]; custom_vjp."""
  geo = geometry(q, k, sizes=sizes, scale=scale)
  geo = dataclasses.replace(geo, num_selected=block_idx.shape[-1])
  idx = block_idx.reshape(-1, geo.length, block_idx.shape[-1]).astype(jnp.int32)
  dv = v.shape[-1]
  q, k, v = pad_head_dims(q, k, v)
  o = _sel_attention(q, k, v, idx, geo, tuning, resolve_interpret(interpret))
  return o[..., :dv]


def nsa_cmp_slc(q, k, v, kc, vc, *, sizes, scale=None, tuning=Tuning(), interpret=None,
                return_selection: bool = False):
  """Compression and selection branches of NSA -> (o_cmp, o_slc), each [B, L, H, Dv].

  q, k, kc [..., D] and v, vc [..., Dv]; head dims that are not powers of two run zero-padded
  (`pad_head_dims`). Differentiable in q, k, v, kc, vc (selection itself is not, as in the paper).
  """
  geo = geometry(q, k, sizes=sizes, scale=scale)
  dv = v.shape[-1]
  q, k, v, kc, vc = pad_head_dims(q, k, v, kc, vc)
  interpret = resolve_interpret(interpret)
  batch = q.shape[0]
  compressed = lambda q, kc, vc: _compressed(q, kc, vc, geo, tuning, interpret)
  o_cmp, lse = (on_stream(compressed, 2) if tuning.branch_streams else compressed)(q, kc, vc)
  if geo.num_compressed == 0:
    imp = jnp.zeros((batch * geo.num_kv_heads, geo.length, geo.num_select_blocks), jnp.float32)
  else:
    stop = lax.stop_gradient
    imp = _importance(stop(q), stop(kc), stop(lse), geo, tuning, interpret)
  idx = _topn(imp, geo, tuning, interpret)
  o_slc = _sel_attention(q, k, v, idx, geo, tuning, interpret)
  o_cmp, o_slc = o_cmp[..., :dv], o_slc[..., :dv]
  if return_selection:
    return o_cmp, o_slc, idx.reshape(batch, geo.num_kv_heads, geo.length, -1)
  return o_cmp, o_slc
