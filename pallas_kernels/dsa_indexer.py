"""DSA lightning-indexer scores as a blocked Pallas (Triton) kernel, bf16/fp32 or FP8.

  I[b, t, s] = k_scale[s] * sum_j w[t, j] * ReLU(q[t, j] . k[s])     (-inf where s is not visible)

One program scores a [block_q, block_k] tile: it keeps the key tile and loops over
the H_I indexer heads, one [block_q, d] x [d, block_k] MMA each, accumulating the
weighted ReLU in fp32. Tiles that are entirely in the causal future are filled with
-inf without any MMA (about half of them at prefill). FP8: q and k are float8_e4m3fn;
their per-vector scales are folded out of the ReLU (q's into w, k's applied at the
end), as DeepSeek's fp8_index does, so the MMAs run on fp8 operands. Keys quantized
once (`lca.attention.dsa.FP8Keys`, the decode cache) are used as they are; only q is
rotated and quantized per call. `IndexerBlocks(k_transposed=True)` reads the keys as
[d, S] (the fp8 MMA wants its B operand K-major; this is the other layout, to measure).
`IndexerBlocks(heads_per_step=2)` issues two heads' MMAs before their epilogues (so one
MMA can overlap the other's ReLU * w); `default_indexer_blocks(dtype)` holds the
measured fastest launch parameters per operand dtype (fp8 or bf16/f32). FP8 MMAs
accumulate each head's 128 products on the tensor cores and promote to fp32 once
(`pallas_kernels.fp8_dot`, DeepSeek-V3's interval); `IndexerBlocks(fp8_fast_accumulation=False)`
keeps Triton's promotion after every 32-product wgmma (2.1x slower at 128k: 429 vs 208 ms).

The scores of a chunk of queries go to HBM ([chunk, S], float32 or bfloat16: `out_dtype`)
and top-k runs on them (see `lca.attention.dsa.indexer_top_k`): memory O(chunk * S), not O(L * S).
Decode (at most DECODE_MAX_QUERIES queries): one program per (query, key tile) with
the H_I heads as the rows of a single [H_I, d] x [d, block_k] MMA, instead of a query
tile padded to block_q rows (16x the MMA work and 64x the q reads at one query).

No VJP: the indexer's training loss uses the differentiable XLA scores.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import numpy as np

from pallas_kernels import dsa_indexer_mgpu, fp8_dot, pad_axis, resolve_interpret

fp8_dot.install()
_BIG = 2 ** 30


@dataclasses.dataclass(frozen=True)
class IndexerBlocks:
  """Launch parameters of the prefill scoring kernel (one program per [block_q, block_k] tile).

  heads_per_step: indexer heads per loop iteration; their MMAs are all issued before any
  of their ReLU * w epilogues, so one head's MMA can overlap another's epilogue (1 = one
  head at a time). A remainder (H_I % heads_per_step heads) runs after the loop.
  """
  block_q: int = 64
  block_k: int = 128
  num_warps: int = 4
  num_stages: int = 2
  k_transposed: bool = False   # keys as [B, d, S]: one [d, bk] tile, dot(q, k) without trans_b
  heads_per_step: int = 1
  fp8_fast_accumulation: bool = True   # False: fp32 promotion after every wgmma (Triton's default)

  def __post_init__(self):
    for name in ("block_q", "block_k", "num_warps", "num_stages", "heads_per_step"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"IndexerBlocks.{name} must be a positive int, got {value!r}")


# Prefill defaults per operand dtype, the fastest of the H100 sweeps (pallas_kernels/NOTES_dsa.md,
# sweep_indexer.md): bf16 (session 5, 32 launch variants at 32k, the best rerun at 128k): 3
# pipeline stages over the head loop, one head per step (128k: 342 -> 306 ms). fp8 (session 6,
# after fp8_dot's one promotion per dot; 16 variants at 32k, the best 4 at 128k): 3 stages and
# two heads per step (128k: 209 -> 199 ms). float32 (not measured) keeps the session-2 blocks.
_DEFAULT_BLOCKS = {
    "float8_e4m3fn": IndexerBlocks(num_stages=3, heads_per_step=2),
    "bfloat16": IndexerBlocks(num_stages=3),
    "float16": IndexerBlocks(num_stages=3),
}


def default_indexer_blocks(dtype) -> IndexerBlocks:
  """The prefill scoring kernel's launch parameters for operands of `dtype` (fp8, bf16, f32)."""
  return _DEFAULT_BLOCKS.get(jnp.dtype(dtype).name, IndexerBlocks())


def _kernel(q_ref, k_ref, w_ref, qpos_ref, kpos_ref, kscale_ref, o_ref, *, num_heads: int,
            k_transposed: bool, heads_per_step: int = 1, fast_accumulation: bool = True,
            fill_future: bool = True):
  """q_ref [H_I, bq, d]; k_ref [bk, d] ([d, bk] if k_transposed); w_ref [H_I, bq]; qpos [bq];
  kpos/kscale [bk]; o [bq, bk]. fill_future False: a tile no query sees is not written."""
  q_pos, k_pos = qpos_ref[...], kpos_ref[...]
  any_visible = jnp.min(jnp.where(k_pos >= 0, k_pos, _BIG)) <= jnp.max(q_pos)

  # HIGHEST keeps Triton's per-wgmma fp32 promotion of fp8 products (see pallas_kernels.fp8_dot)
  precision = None if fast_accumulation else jax.lax.Precision.HIGHEST

  @pl.when(any_visible)
  def _():
    k = k_ref[...]

    def heads(j0, n, acc):
      """Heads j0 .. j0 + n - 1: all n MMAs first, then the n epilogues (same order of sums)."""
      logits = [plgpu.dot(q_ref[j0 + u], k, trans_b=not k_transposed, precision=precision)
                for u in range(n)]  # [bq, bk] f32
      for u, lg in enumerate(logits):
        acc = acc + jnp.maximum(lg, 0.0) * w_ref[j0 + u][:, None]
      return acc

    steps, rest = divmod(num_heads, heads_per_step)
    acc = jax.lax.fori_loop(0, steps, lambda i, acc: heads(i * heads_per_step, heads_per_step, acc),
                            jnp.zeros(o_ref.shape, jnp.float32))
    if rest:
      acc = heads(steps * heads_per_step, rest, acc)
    visible = (k_pos[None, :] >= 0) & (k_pos[None, :] <= q_pos[:, None])
    o_ref[...] = jnp.where(visible, acc * kscale_ref[...][None, :], -jnp.inf).astype(o_ref.dtype)

  if fill_future:
    @pl.when(jnp.logical_not(any_visible))
    def _():
      o_ref[...] = jnp.full(o_ref.shape, -jnp.inf, o_ref.dtype)


def _pad_to(x, axis, multiple, fill):
  return pad_axis(x, axis, -(-x.shape[axis] // multiple) * multiple, fill)


@functools.partial(jax.jit, static_argnames=("blocks", "out_dtype", "fill_future", "interpret"))
def indexer_scores_kernel(q, k, w, k_scale, q_positions, kv_positions, *,
                          blocks: IndexerBlocks | None = None, out_dtype=jnp.float32,
                          fill_future: bool = True, interpret: bool = False):
  """q [B, L, H_I, d] (bf16/f32/fp8), k [B, S, d] (same dtype; [B, d, S] if
  blocks.k_transposed), w [B, L, H_I] f32, k_scale [B, S] f32, positions [B, L] / [B, S]
  int32 (-1 = empty) -> [B, L, S] out_dtype (fp32 sums, rounded once when written).
  blocks None: `default_indexer_blocks(q.dtype)`. fill_future False: the [block_q, block_k]
  tiles that no query of theirs sees are left unwritten (undefined) instead of -inf."""
  blocks = blocks or default_indexer_blocks(q.dtype)
  batch, q_len, num_heads, dim = q.shape
  tk = blocks.k_transposed
  kv_len = k.shape[2] if tk else k.shape[1]
  bq = min(blocks.block_q, max(16, pl.next_power_of_2(q_len)))
  bk = min(blocks.block_k, max(16, pl.next_power_of_2(kv_len)))
  qt = _pad_to(jnp.swapaxes(q, 1, 2), 2, bq, 0)                    # [B, H_I, Lp, d]
  wt = _pad_to(jnp.swapaxes(w.astype(jnp.float32), 1, 2), 2, bq, 0)  # [B, H_I, Lp]
  qp = _pad_to(q_positions.astype(jnp.int32), 1, bq, -1)
  kp = _pad_to(kv_positions.astype(jnp.int32), 1, bk, -1)
  kk = _pad_to(k, 2 if tk else 1, bk, 0)
  ks = _pad_to(k_scale.astype(jnp.float32), 1, bk, 0)
  lp, sp = qp.shape[1], kp.shape[1]
  grid = (batch, lp // bq, sp // bk)
  k_spec = (pl.BlockSpec((None, dim, bk), lambda b, i, j: (b, 0, j)) if tk else
            pl.BlockSpec((None, bk, dim), lambda b, i, j: (b, j, 0)))
  out = pl.pallas_call(
      functools.partial(_kernel, num_heads=num_heads, k_transposed=tk, heads_per_step=blocks.heads_per_step,
                        fast_accumulation=blocks.fp8_fast_accumulation, fill_future=fill_future),
      grid=grid,
      in_specs=[
          pl.BlockSpec((None, num_heads, bq, dim), lambda b, i, j: (b, 0, i, 0)),
          k_spec,
          pl.BlockSpec((None, num_heads, bq), lambda b, i, j: (b, 0, i)),
          pl.BlockSpec((None, bq), lambda b, i, j: (b, i)),
          pl.BlockSpec((None, bk), lambda b, i, j: (b, j)),
          pl.BlockSpec((None, bk), lambda b, i, j: (b, j)),
      ],
      out_specs=pl.BlockSpec((None, bq, bk), lambda b, i, j: (b, i, j)),
      out_shape=jax.ShapeDtypeStruct((batch, lp, sp), out_dtype),
      compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
      interpret=interpret,
      name="dsa_indexer_scores",
  )(qt, kk, wt, qp, kp, ks)
  return out[:, :q_len, :kv_len]


def _quantized_query(q, signs, w):
  """The FP8 query of `fp8_query_operands`, in a kernel: q [Hp, d] bf16, signs [d, d] bf16 (the
  Hadamard matrix's +-1), w [Hp] f32 -> (q8 [Hp, d] float8_e4m3fn, w [Hp] with q's scale folded
  in). The rotation is one bf16 MMA (exact products, fp32 sums), 1/sqrt(d) applied after it."""
  from lca.attention import dsa  # pylint: disable=g-import-not-at-top
  rotated = plgpu.dot(q, signs) * (1.0 / math.sqrt(q.shape[-1]))          # [Hp, d] f32
  scale = jnp.maximum(jnp.max(jnp.abs(rotated), axis=1), 1e-12) / dsa.FP8_MAX
  return (rotated / scale[:, None]).astype(dsa.FP8), w * scale


def _decode_kernel(q_ref, k_ref, w_ref, qpos_ref, kpos_ref, kscale_ref, *refs, block_k: int,
                   quantize_query: bool):
  """One query over tiles of block_k keys: q_ref [Hp, d] (heads as the MMA's rows); k_ref [n bk,
  d]; w_ref [Hp]; kpos_ref, kscale_ref [n bk]; o [n bk]. quantize_query: q_ref is the raw bf16
  query, rotated and quantized once here for the program's n tiles (refs = signs_ref, o_ref)."""
  *signs_ref, o_ref = refs
  q, w = q_ref[...], w_ref[...]
  if quantize_query:
    q, w = _quantized_query(q, signs_ref[0][...], w)
  q_pos = qpos_ref[...]

  def tile(i, carry):
    keys = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
    logits = plgpu.dot(q, k_ref[keys, :], trans_b=True)            # [Hp, bk] f32
    acc = jnp.sum(jnp.maximum(logits, 0.0) * w[:, None], axis=0)
    k_pos = kpos_ref[keys]
    visible = (k_pos >= 0) & (k_pos <= q_pos)
    o_ref[keys] = jnp.where(visible, acc * kscale_ref[keys], -jnp.inf).astype(o_ref.dtype)
    return carry

  jax.lax.fori_loop(0, o_ref.shape[0] // block_k, tile, 0)


DECODE_PROGRAMS = 256   # decode: tiles are grouped so that a call has about this many programs


def decode_tiles_per_program(rows: int, tiles: int, max_tiles: int = 8) -> int:
  """Key tiles a program of the decode kernel walks: a power of two <= max_tiles, dividing
  `tiles` (a power of two or not), giving about DECODE_PROGRAMS programs over `rows` queries."""
  n = 1
  while n < max_tiles and tiles % (2 * n) == 0 and rows * tiles // (2 * n) >= DECODE_PROGRAMS:
    n *= 2
  return n


@functools.partial(jax.jit, static_argnames=("block_k", "tiles_per_program", "num_warps", "out_dtype",
                                             "interpret"))
def indexer_scores_decode_kernel(q, k, w, k_scale, q_positions, kv_positions, *, block_k: int = 256,
                                 tiles_per_program: int | None = None, num_warps: int = 4,
                                 out_dtype=jnp.float32, interpret: bool = False):
  """Few queries (decode): one program per (query, tiles_per_program key tiles of block_k), the
  H_I heads as the rows of one [H_I, d] x [d, block_k] MMA a tile (the tile kernel would pad one
  query to block_q rows). Same arguments and result as `indexer_scores_kernel`; the fp32 sums
  are written as out_dtype (rounded in the kernel: no separate conversion kernel in the decode
  step). q bfloat16 with fp8 keys: q is the raw query (not rotated) and w the raw weights; each
  program rotates and quantizes q once (`fp8_query_operands`' math, without the 5 small XLA
  kernels that ran ahead of this one in a decode step). tiles_per_program None:
  `decode_tiles_per_program` (fewer, longer programs: less of that work repeated)."""
  batch, q_len, num_heads, dim = q.shape
  kv_len = k.shape[1]
  quantize_query = q.dtype == jnp.bfloat16 and k.dtype == jnp.float8_e4m3fn
  bk = min(block_k, max(16, pl.next_power_of_2(kv_len)))
  hp = max(16, pl.next_power_of_2(num_heads))
  qh = _pad_to(q, 2, hp, 0)                                        # [B, L, Hp, d]
  wh = _pad_to(w.astype(jnp.float32), 2, hp, 0)                    # zero weight: no contribution
  kp = _pad_to(kv_positions.astype(jnp.int32), 1, bk, -1)
  kk = _pad_to(k, 1, bk, 0)
  ks = _pad_to(k_scale.astype(jnp.float32), 1, bk, 0)
  tiles = kp.shape[1] // bk
  n = tiles_per_program or decode_tiles_per_program(batch * q_len, tiles)
  if tiles % n:
    raise ValueError(f"tiles_per_program must divide the {tiles} key tiles, got {n}")
  span = n * bk                                                    # keys a program
  from lca.attention import dsa  # pylint: disable=g-import-not-at-top
  signs = [jnp.asarray(np.sign(dsa.hadamard_matrix(dim)), jnp.bfloat16)] if quantize_query else []
  out = pl.pallas_call(
      functools.partial(_decode_kernel, block_k=bk, quantize_query=quantize_query),
      grid=(batch, q_len, tiles // n),
      in_specs=[
          pl.BlockSpec((None, None, hp, dim), lambda b, t, j: (b, t, 0, 0)),
          pl.BlockSpec((None, span, dim), lambda b, t, j: (b, j, 0)),
          pl.BlockSpec((None, None, hp), lambda b, t, j: (b, t, 0)),
          pl.BlockSpec((None, None), lambda b, t, j: (b, t)),
          pl.BlockSpec((None, span), lambda b, t, j: (b, j)),
          pl.BlockSpec((None, span), lambda b, t, j: (b, j)),
      ] + [pl.BlockSpec((dim, dim), lambda b, t, j: (0, 0))] * len(signs),
      out_specs=pl.BlockSpec((None, None, span), lambda b, t, j: (b, t, j)),
      out_shape=jax.ShapeDtypeStruct((batch, q_len, tiles * bk), jnp.dtype(out_dtype)),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
      interpret=interpret,
      name="dsa_indexer_scores_decode",
  )(qh, kk, wh, q_positions.astype(jnp.int32), kp, ks, *signs)
  return out[:, :, :kv_len]


DECODE_MAX_QUERIES = 4    # up to this many queries: the decode kernel (heads as MMA rows)


@functools.partial(jax.jit, static_argnames=("out_dtype", "config"))
def mosaic_scores(q, k, w, k_scale, q_positions, *, out_dtype=jnp.float32,
                  config: dsa_indexer_mgpu.Config | None = None):
  """`indexer_scores_kernel`'s operands (k [B, S, d]), key s at position s, tiles past each
  CTA's latest query unwritten -> [B, L, S] out_dtype through `dsa_indexer_mgpu` (Hopper)."""
  cfg = config or dsa_indexer_mgpu.Config()
  q_len, kv_len, heads = q.shape[1], k.shape[1], q.shape[2]
  per_cta = dsa_indexer_mgpu.queries_per_cta(heads)
  qq = _pad_to(q, 1, per_cta, 0)
  ww = _pad_to(w.astype(jnp.float32), 1, per_cta, 0)
  qp = _pad_to(q_positions.astype(jnp.int32), 1, per_cta, -1)
  kk = _pad_to(k, 1, cfg.block_k, 0)
  ks = _pad_to(k_scale.astype(jnp.float32), 1, cfg.block_k, 0)
  out = dsa_indexer_mgpu.scores(qq, kk, ww, ks, qp, kv_len=kv_len, out_dtype=out_dtype, config=cfg)
  return out[:, :q_len, :kv_len]


def fp8_query_operands(q_idx, weights):
  """q_idx [B, L, H_I, d_I] -> (q8 float8_e4m3fn, w [B, L, H_I] f32 with q's per-vector scale
  folded in); d_I <= 128 (one scale per vector)."""
  from lca.attention import dsa  # pylint: disable=g-import-not-at-top
  q8, q_scale = dsa.quantize_fp8(dsa._rotate(q_idx))  # pylint: disable=protected-access
  if q_scale.shape[-1] != 1:
    raise NotImplementedError(f"the FP8 indexer kernel needs index_dim <= 128, got {q_idx.shape[-1]}")
  return q8, weights.astype(jnp.float32) * q_scale[..., 0]


def indexer_scores(q_idx, k_idx, weights, q_positions, kv_positions=None, *, fp8: bool = False,
                   blocks: IndexerBlocks | None = None, out_dtype=jnp.float32,
                   fill_future: bool = True, kernel: str = "auto", interpret: bool | None = None):
  """Indexer scores [B, L, S] out_dtype, the math of `lca.attention.dsa.indexer_scores_reference`.

  fp8: Hadamard-rotate and quantize q_idx (and k_idx unless it is FP8Keys, which implies
  fp8) to float8_e4m3fn (one scale per vector; d_I <= 128) and run the MMAs on fp8
  operands with fp32 accumulation. out_dtype: the scores as written (bfloat16 halves the
  [chunk, S] write and the top-k's reads; the sums are fp32 either way). fill_future False
  (prefill tiles): entries in tiles that none of their queries sees stay unwritten, for a
  consumer that reads no entry at or past its query's `lengths` (half the writes at prefill).
  kv_positions None: key s at position s (the prefill default).
  kernel (prefill; up to DECODE_MAX_QUERIES queries always take the decode kernel): "auto" runs the Mosaic GPU kernel (`dsa_indexer_mgpu`: Hopper, prefill with
  fill_future=False and the default key positions, d_I = 128, H_I dividing 256) where it
  can and the Triton kernel elsewhere (and for any explicit `blocks`); "triton" always the
  Triton kernel; "mosaic" the Mosaic kernel or a ValueError saying why it cannot.
  """
  if kernel not in ("auto", "triton", "mosaic"):
    raise ValueError(f"kernel must be 'auto', 'triton' or 'mosaic', got kernel={kernel!r}")
  from lca.attention import dsa  # pylint: disable=g-import-not-at-top
  dsa.check_indexer(q_idx, k_idx, weights)
  if q_idx.shape[-1] < 16 or q_idx.shape[-1] & (q_idx.shape[-1] - 1):
    raise NotImplementedError(f"the indexer kernel needs a power-of-two index_dim >= 16, got {q_idx.shape[-1]}")
  decode = q_idx.shape[1] <= DECODE_MAX_QUERIES
  if fp8 or isinstance(k_idx, dsa.FP8Keys):
    keys = dsa.quantize_index_keys(k_idx)
    if keys.scale.shape[-1] != 1:
      raise NotImplementedError(f"the FP8 indexer kernel needs index_dim <= 128, got {q_idx.shape[-1]}")
    k, k_scale = keys.values, keys.scale[..., 0]
    if decode and q_idx.dtype == jnp.bfloat16:   # the decode kernel quantizes a bf16 query itself
      q, w = q_idx, weights.astype(jnp.float32)
    else:
      q, w = fp8_query_operands(q_idx, weights)
  else:
    q, k, w = q_idx, k_idx.astype(q_idx.dtype), weights
    k_scale = jnp.ones(k_idx.shape[:2], jnp.float32)
  default_kv = kv_positions is None
  if default_kv:
    kv_positions = jnp.broadcast_to(jnp.arange(k.shape[1], dtype=jnp.int32), k.shape[:2])
  if decode:
    return indexer_scores_decode_kernel(q, k, w, k_scale, q_positions, kv_positions,
                                        out_dtype=jnp.dtype(out_dtype), interpret=resolve_interpret(interpret))
  if kernel != "triton" and blocks is None:
    why_not = dsa_indexer_mgpu.supported(q, k, fill_future=fill_future, default_kv=default_kv,
                                         interpret=resolve_interpret(interpret), out_dtype=out_dtype)
    if why_not is None:
      return mosaic_scores(q, k, w, k_scale, q_positions, out_dtype=jnp.dtype(out_dtype))
  if kernel == "mosaic":
    raise ValueError(f"kernel='mosaic' cannot run this case: "
                     f"{why_not if blocks is None else 'explicit blocks are Triton launch parameters'}")
  blocks = blocks or default_indexer_blocks(q.dtype)
  if blocks.k_transposed:
    k = jnp.swapaxes(k, 1, 2)
  return indexer_scores_kernel(q, k, w, k_scale, q_positions, kv_positions, blocks=blocks,
                               out_dtype=jnp.dtype(out_dtype), fill_future=fill_future,
                               interpret=resolve_interpret(interpret))
