"""Exact top-k indices of each row by a threshold (radix) search: Pallas (Triton) kernel.

  top_k(scores [R, S], k) -> indices [R, K] int32, K = min(k, S): the positions of the
  k largest finite entries of each row, in ascending position order (not by score),
  -1 in the slots beyond the row's finite count (-inf entries are never selected).

`lax.top_k` with k = 2048 sorts each row (~20 ms for a [2048, 128k] chunk on an H100).
Selection does not need the order: the k-th largest key T of a row is found by
counting, then one more pass collects every position with key > T plus the first
k - #(key > T) positions with key == T (ties broken by position).

Keys: the float32 bits b read as int32, key = b for b >= 0 and b ^ 0x7fffffff otherwise,
ordered like the floats (-inf lowest among non-NaN values); bfloat16/float16 scores keep
their 16 bits (b ^ 0x7fff for negatives): half the bytes a pass and half the passes
(`lca.attention.dsa` selects on bf16 scores on its FP8 path). One program owns one row
and makes `key bits / bits` counting passes over it; pass p fixes `bits` more bits of T
(the unsigned key, most significant first) by counting, for each of the 2^bits candidates
c_j = prefix | j << shift, how many keys are >= c_j, and keeping the largest c_j whose
count is still >= k; a pass whose chosen candidate has exactly k keys above it ends the
search early (then every key >= it is taken). Per element and pass that is 2^bits
compares + adds (defaults: bits = 4 for float32, at most 8 passes of 16 candidates; 2 for
16-bit scores, at most 8 passes of 4); bytes per pass = the row once (4 S, or 2 S). Then
one compaction pass: an in-block exclusive cumsum of the take mask gives each selected
position its output slot, and a masked scatter writes it.

Rows may carry a length (entries at or beyond it count as -inf and are not read):
causal prefill chunks pass t + 1 and read only the visible part (half the bytes).

Measured (H100, see NOTES_dsa.md): the last causal [2048, 128k] chunk of a prefill in 5.0 ms
(float32 scores) or 3.5 ms (bf16) vs 19 ms for `lax.top_k`; but one row (decode) takes 0.2-0.3 ms vs 0.07-0.09 ms: a single row is
latency-bound (a program's passes are sequential), so `lca.attention.dsa.top_k_select`
uses `lax.top_k` for few rows by default.

Few rows: the row is split into `split` segments that are separate rows of
a first call (K' = min(k, segment) each), whose candidates ([R, split * K'], values
gathered back) go through a second call. The union of the segments' top-k holds the
row's top-k, so the result is exact (ties aside).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import resolve_interpret

_INT_MIN = -(2 ** 31)
_FLIP = 0x7FFFFFFF
_FLIP16 = 0x7FFF


@dataclasses.dataclass(frozen=True)
class TopKBlocks:
  """Launch parameters; the default was the fastest measured on a [2048, 128k] chunk (H100)."""
  block: int = 1024        # row elements per loop step
  bits: int | None = None  # key bits fixed per counting pass (2^bits candidates; divides 16);
                           # None: 4 for float32 scores, 2 for 16-bit ones (3.35 vs 3.57 ms on
                           # a bf16 [2048, 128k] chunk; float32 with 2: slower, session 3)
  accumulate: bool = False  # True: [block, 2^bits] int32 counters in registers, reduced once
                            # per pass (False: a [block, 2^bits] -> [2^bits] reduction per step)
  out_block: int = 1024    # output slots per -1 fill step
  num_warps: int = 4
  num_stages: int = 3


def key_bits(dtype) -> int:
  """Bits of the order-preserving key of a score dtype: 32 (float32) or 16 (bfloat16, float16)."""
  return 16 if jnp.dtype(dtype).itemsize == 2 else 32


def float_keys(x: jax.Array) -> jax.Array:
  """float32 / bfloat16 / float16 -> int32 keys with the same order (signed int compare), the
  kernel's map: 16-bit floats give keys in [-2^15, 2^15), float32 (other dtypes cast) all of int32."""
  if key_bits(x.dtype) == 16:
    bits = jax.lax.bitcast_convert_type(x, jnp.int16).astype(jnp.int32)    # sign-extended
    return jnp.where(bits < 0, bits ^ _FLIP16, bits)
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  return jnp.where(bits < 0, bits ^ _FLIP, bits)


def _neg_inf_key(dtype) -> int:
  """The key of -inf (lowest of the non-NaN keys) as a Python int; evaluated now even when the
  caller is being traced (the kernel)."""
  with jax.ensure_compile_time_eval():
    return int(float_keys(jnp.array(-jnp.inf, dtype)))


def _kernel(s_ref, len_ref, o_ref, *, k, block, bits, accumulate, out_block, trash):
  """s_ref [Sp] f32 / bf16 / f16; len_ref [] int32 (entries >= length are -inf); o_ref [Kp + 1] int32."""
  width = key_bits(s_ref.dtype)
  neg_inf_key = _neg_inf_key(s_ref.dtype)
  # unsigned key bits (the search's prefix) <-> signed keys: flip the top bit of 32 or shift by 2^15
  signed = (lambda u: u ^ _INT_MIN) if width == 32 else (lambda u: u - 2 ** 15)
  length = len_ref[...]
  num_blocks = (length + block - 1) // block
  cols = jnp.arange(block, dtype=jnp.int32)
  k_row = jnp.minimum(k, num_blocks * block)          # counts include the masked tail

  def keys(i):
    x = s_ref[pl.ds(pl.multiple_of(i * block, block), block)]
    key = float_keys(x)
    return jnp.where(i * block + cols < length, key, neg_inf_key)

  num_cand = 2 ** bits
  jj = jnp.arange(num_cand, dtype=jnp.int32)

  def search(carry):
    p, prefix, count_hi, _ = carry                    # prefix: unsigned key bits, as int32
    shift = width - bits * (p + 1)
    cand = signed(prefix | (jj << shift))             # signed keys of the candidates

    if accumulate:                                    # per-lane counts, reduced after the loop
      count = lambda i, acc: acc + (keys(i)[:, None] >= cand[None, :]).astype(jnp.int32)
      acc = jax.lax.fori_loop(0, num_blocks, count, jnp.zeros((block, num_cand), jnp.int32))
      counts = jnp.sum(acc, axis=0)
    else:
      count = lambda i, acc: acc + jnp.sum((keys(i)[:, None] >= cand[None, :]).astype(jnp.int32), axis=0)
      counts = jax.lax.fori_loop(0, num_blocks, count, jnp.zeros((num_cand,), jnp.int32))
    best = jnp.sum((counts >= k_row).astype(jnp.int32)) - 1    # counts fall with j
    at_best = jnp.sum(jnp.where(jj == best, counts, 0))
    above = jnp.sum(jnp.where(jj == best + 1, counts, 0))
    count_hi = jnp.where(best == num_cand - 1, count_hi, above)
    # exactly k keys >= the candidate: it is a threshold already (early exit)
    return p + 1, prefix | (best << shift), count_hi, at_best == k_row

  passes = width // bits
  _, prefix, count_gt, exact = jax.lax.while_loop(
      lambda c: (c[0] < passes) & jnp.logical_not(c[3]), search,
      (jnp.int32(0), jnp.int32(0), jnp.int32(0), k_row <= 0))
  kth = signed(prefix)                                # the k-th largest key (or a threshold)
  all_finite = kth <= neg_inf_key                     # fewer than k finite: take them all
  thr = jnp.where(all_finite, neg_inf_key, kth)
  # how many keys == thr to take: all of them after an early exit
  need = jnp.where(all_finite, 0, jnp.where(exact, k_row, k_row - count_gt))

  def compact(i, carry):
    taken, eq_seen = carry
    key = keys(i)
    eq = (key == thr).astype(jnp.int32)
    eq_rank = eq_seen + jnp.cumsum(eq) - eq
    take = (key > thr) | ((eq > 0) & (eq_rank < need))
    t = take.astype(jnp.int32)
    slot = jnp.where(take, taken + jnp.cumsum(t) - t, trash)
    plgpu.store(o_ref.at[slot], i * block + cols, mask=take)
    return taken + jnp.sum(t), eq_seen + jnp.sum(eq)

  taken, _ = jax.lax.fori_loop(0, num_blocks, compact, (jnp.int32(0), jnp.int32(0)))
  slots = jnp.arange(out_block, dtype=jnp.int32)
  for j in range(trash // out_block):                 # slots >= taken: -1 (disjoint from the scatter)
    plgpu.store(o_ref.at[pl.ds(j * out_block, out_block)], jnp.full((out_block,), -1, jnp.int32),
                mask=j * out_block + slots >= taken)


@functools.partial(jax.jit, static_argnames=("k", "blocks", "interpret"))
def top_k_rows(scores, lengths, *, k: int, blocks: TopKBlocks = TopKBlocks(),
               interpret: bool = False):
  """scores [R, S] f32 / bf16 / f16, lengths [R] int32 -> [R, min(k, S)] int32 (position order,
  -1 = none)."""
  rows, width = scores.shape
  kk = min(k, width)
  bits = blocks.bits or (2 if key_bits(scores.dtype) == 16 else 4)
  if 16 % bits:
    raise ValueError(f"TopKBlocks.bits must divide 16, got {blocks.bits}")
  block = min(blocks.block, max(16, pl.next_power_of_2(width)))
  out_block = min(blocks.out_block, max(16, pl.next_power_of_2(kk)))
  padded = -(-width // block) * block
  if padded != width:
    scores = jnp.pad(scores, [(0, 0), (0, padded - width)], constant_values=-jnp.inf)
  kp = -(-kk // out_block) * out_block
  out = pl.pallas_call(
      functools.partial(_kernel, k=kk, block=block, bits=bits, accumulate=blocks.accumulate,
                        out_block=out_block, trash=kp),
      grid=(rows,),
      in_specs=[pl.BlockSpec((None, padded), lambda r: (r, 0)),
                pl.BlockSpec((None,), lambda r: (r,))],
      out_specs=pl.BlockSpec((None, kp + 1), lambda r: (r, 0)),
      out_shape=jax.ShapeDtypeStruct((rows, kp + 1), jnp.int32),
      compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
      interpret=interpret,
      name="dsa_topk",
  )(_score_dtype(scores), jnp.clip(lengths.astype(jnp.int32), 0, width))
  return out[:, :kk]


def _score_dtype(x):
  """16-bit floats keep their dtype (16-bit keys: half the passes and bytes); others -> float32."""
  return x if x.dtype in (jnp.bfloat16, jnp.float16) else x.astype(jnp.float32)


def default_split(rows: int, width: int, k: int) -> int:
  """Segments per row: enough programs to fill the GPU at decode, segments >= 4k long."""
  if rows >= 64:
    return 1
  split = max(1, min(width // (4 * k), 128 // rows))
  return 1 << (split.bit_length() - 1)


def top_k(scores: jax.Array, k: int, *, lengths: jax.Array | None = None, split: int | None = None,
          blocks: TopKBlocks | None = None, interpret: bool | None = None) -> jax.Array:
  """Top-k positions of each row of scores [..., S] -> [..., min(k, S)] int32.

  Exact (ties broken by position); positions in ascending order, -1 after the row's
  finite entries run out. lengths [...] int (optional): entries at positions >= length
  are treated as -inf and not read. split: segments per row (None: `default_split`).
  """
  if not isinstance(k, int) or k <= 0:
    raise ValueError(f"top_k needs a positive int k, got k={k!r}")
  lead, width = scores.shape[:-1], scores.shape[-1]
  kk = min(k, width)
  flat = _score_dtype(scores.reshape(-1, width))
  rows = flat.shape[0]
  lens = (jnp.full((rows,), width, jnp.int32) if lengths is None
          else jnp.broadcast_to(lengths, lead).reshape(rows).astype(jnp.int32))
  blocks = blocks or TopKBlocks()
  interpret = resolve_interpret(interpret)
  split = default_split(rows, width, kk) if split is None else split
  if split <= 1:
    return top_k_rows(flat, lens, k=kk, blocks=blocks, interpret=interpret).reshape(*lead, kk)
  seg = -(-width // split)
  flat = jnp.pad(flat, [(0, 0), (0, seg * split - width)], constant_values=-jnp.inf)
  starts = jnp.arange(split, dtype=jnp.int32) * seg
  seg_lens = jnp.clip(lens[:, None] - starts[None, :], 0, seg)            # [R, split]
  local = top_k_rows(flat.reshape(rows * split, seg), seg_lens.reshape(-1), k=kk, blocks=blocks,
                     interpret=interpret).reshape(rows, split, -1)        # [R, split, K']
  cand = jnp.where(local >= 0, local + starts[None, :, None], -1).reshape(rows, -1)
  vals = jnp.take_along_axis(flat, jnp.maximum(cand, 0), axis=1)
  vals = jnp.where(cand >= 0, vals, -jnp.inf)
  pick = top_k_rows(vals, jnp.full((rows,), vals.shape[1], jnp.int32), k=kk, blocks=blocks,
                    interpret=interpret)
  out = jnp.where(pick >= 0, jnp.take_along_axis(cand, jnp.maximum(pick, 0), axis=1), -1)
  return out.reshape(*lead, kk)
