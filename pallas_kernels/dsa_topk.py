"""Exact top-k indices of each row by threshold (radix) searches: Pallas (Triton) kernels.

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
(`lca.attention.dsa` selects on bf16 scores on its FP8 path).

Radix search (`TopKBlocks(sample=False)`, and every row of at most `capacity` entries): one
program owns one row and makes `key bits / bits` counting passes over it; pass p fixes `bits`
more bits of T (the unsigned key, most significant first) by counting, for each of the 2^bits
candidates c_j = prefix | j << shift, how many keys are >= c_j, and keeping the largest c_j
whose count is still >= k; a pass whose chosen candidate has exactly k keys above it ends the
search early (then every key >= it is taken); rows of at most k entries skip the search (all
taken). Per element and pass that is 2^bits compares + adds (defaults: bits = 4 for float32, at
most 8 passes of 16 candidates; 2 for 16-bit scores, at most 8 passes of 4); bytes per pass =
the row once (4 S, or 2 S). Then one compaction pass: an in-block exclusive cumsum of the take
mask gives each selected position its output slot, and a masked scatter writes it.

Sample, then collect (the default for rows longer than `capacity` C): the radix search costs
per element and pass (key conversion, compares, the per-step count reductions; not bytes), so
long rows are read little more than once instead of ~9 times, in two calls:
  1. `_collect_kernel`, one program a row: the sample is the first `sample_run` entries of every
     `sample_every * sample_run` (fraction f = 1 / sample_every; contiguous runs so that each
     sampled memory sector is used whole). The radix search on the sample (re-read each pass:
     f of a row) finds the key c of rank m = f sqrt(k C) in it; then ONE pass over the row
     collects, in position order, the positions and keys of every key >= c into scratches
     [R, C] and counts them (each thread's line of LANES entries compacted first,
     `_collect_lines`). The number n of row keys >= c is ~ m / f = sqrt(k C), the
     geometric mean of k and C: n < k needs >= m sampled among the top k - 1 (mean k f), n > C
     fewer than m among the top C (mean C f), so m balances the two tails at
     z = sqrt(f) (sqrt(C) - sqrt(k)) binomial standard deviations (5.9 at the defaults
     k = 2048, C = 6144, f = 1/32; 8.3 at f = 1/16; n ~ 3550 either way). A row goes to the
     radix search over the whole row ("direct") if it has at most C entries, or if the
     collection failed: n > C (only the
     first C are written), or n < k unless c is the lowest finite key (the sample held fewer
     than m finite keys: then every finite key was collected and n < k is the row's count).
  2. `_select_kernel`, one program a row: direct rows run the radix search over the whole row;
     the others over their n <= C collected keys, the taken ones written as the collected
     positions. The scratch is in position order, so the output stays in ascending position
     order and ties still go to the lowest position. Exactness never depends on the sample:
     a failed row costs one program's full-row search (no host sync, nothing for the others).
     With `TopKBlocks.fuse_select` (the default) both run in one call, each program selecting
     from its own row's list right after collecting it (`_collect_select_kernel`; a barrier
     between): one launch fewer, the lists read back from L1 / L2 (H200, session 20: the
     [2048, 128k] chunk 0.771 vs 0.775 ms, [2048, 16k] 0.295 vs 0.301; the select is ~0.17 ms
     a chunk either way, so it is its programs' own work, not a launch, that costs; starting
     its search below the key bits the collected list's range shares did not shorten it either:
     0.778 vs 0.766 ms, session 20, not kept).
Per 128k row at the defaults: 4 passes (4 key bits each) over 4k sampled keys (1/8 of a row),
the collecting pass, then <= 4 passes over ~3.5k collected: ~1.2 row reads against <= 9. When
the plan's z is below 3 (C too close to k for f), or the row fits in C, only the radix search runs. Failure modes of
the sample: many ties at c (all-equal rows: n > C), and scores whose large values cluster
inside or outside the sampled runs (the binomial tails assume a random-like sample; clustered
data fail more often and then pay the direct search).

Rows may carry a length (entries at or beyond it count as -inf and are not read):
causal prefill chunks pass t + 1 and read only the visible part (half the bytes).

Measured, radix search (H100, see NOTES_dsa.md): the last causal [2048, 128k] chunk of a
prefill in 5.0 ms (float32 scores) or 3.5 ms (bf16) vs 19 ms for `lax.top_k`; but one row
(decode) takes 0.2-0.3 ms vs 0.07-0.09 ms: a single row is latency-bound (a program's passes
are sequential); hence the segmented collection for few long rows (below).
Sample, then collect (H200, 2026-12-02, session 14): the last causal [2048, 128k] chunk in 1.60 ms
(bf16) / 1.67 ms (float32) vs 3.51 / 5.12 for the radix search in the same process, exact, 0 of
2048 rows failed on the indexer's scores (~3.6k collected a row); all 64 chunks of a 128k prefill
47.6 vs 106.6 ms (`experiments/results/bench_dsa_h200/`). Session 15: sampling 1/32 of a row with 4
key bits a pass (was 1/16, 2): the chunk in 1.16-1.24 ms, all chunks 44.6 ms. Session 17: the
collecting pass stored every entry's position and score under a mask, which cost as much as the
rest of the pass (`experiments/probe_topk_collect.py --parts`); it compacts each thread's line of
8 entries first and stores at most 3 a line: the chunk in 0.79 ms of device time (0.95 before).

Few long rows (fewer than SEGMENT_MAX_ROWS, e.g. one decode step's row): one program a row
would make every pass sequential (the radix search over a 128k row: 0.2-0.3 ms, H100). So the
collecting pass is split over `TopKBlocks.segments` programs a row (`_segment_collect_kernel`):
each finds the row's sample threshold (the same in all; the sample is 1/32 of the row), then
collects its own segment's keys >= it into its own region (a region holds its whole segment:
nothing overflows), with a count. Then one program a row (`_segment_select_kernel`) reads the
regions as one list in position order (entry j's slot skips the unused tails of the regions
before it: a compare of j with the P regions' ends) and runs the radix search over it; a row
whose sample misled (fewer than k collected above a threshold that was not the lowest finite
key) or that has at most C entries takes the whole-row search there. More than C collected (ties
at the threshold) costs time, not exactness. Both short lists (the sample, 4k entries at 128k,
and the ~3.6k collected) are loaded once and searched in registers, 2 key bits a pass
(`TopKBlocks.list_block`; from memory block by block each pass was a chain of dependent loads).
One bf16 row on an H200 (session 16, `experiments/probe_topk_decode.py`): 0.030 ms at 16k, 0.031
at 128k, against lax.top_k's 0.060 / 0.062-0.088, the lists from memory 0.034 / 0.045, and one
program a row 0.044 / 0.140.

Few rows without sampling (`sample=False`, or k too close to C): the row is split into `split`
segments that are separate rows of a first call (K' = min(k, segment) each), whose candidates
([R, split * K'], values gathered back) go through a second call. The union of the segments'
top-k holds the row's top-k, so the result is exact (ties aside).
"""

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import resolve_interpret

_INT_MIN = -(2 ** 31)
_FLIP = 0x7FFFFFFF
_FLIP16 = 0x7FFF
_MIN_SAMPLE_Z = 3.0   # below: the sample would fail too often (each failure = a full-row search)


@dataclasses.dataclass(frozen=True)
class TopKBlocks:
  """Launch parameters; the radix search's were the fastest measured on a [2048, 128k] chunk (H100)."""
  block: int = 1024        # row elements per loop step
  bits: int | None = None  # key bits fixed per counting pass (2^bits candidates; divides 16);
                           # None: 4 for float32 scores and for the sampled searches; 2 for
                           # 16-bit scores without sampling (radix search of a bf16 [2048, 128k]
                           # chunk: 3.35 vs 3.57 ms at 4; sampled, 4 bits: 1.17 vs 1.21 ms at 2,
                           # session 15; float32 with 2: slower, session 3)
  accumulate: bool = False  # True: [block, 2^bits] int32 counters in registers, reduced once
                            # per pass (False: a [block, 2^bits] -> [2^bits] reduction per step)
  out_block: int = 1024    # output slots per -1 fill step
  num_warps: int = 4
  num_stages: int = 3
  sample: bool = True      # rows longer than capacity: sample, then collect (False: radix search)
  capacity: int = 6144     # C: entries collected a row (rounded up to a multiple of block); 3k
                           # at k = 2048: z = 5.9 at f = 1/32, ~3.5k collected
  sample_every: int = 32   # 1 / f: the sampled fraction of a row (the sample's search re-reads
                           # f of the row a pass); 32: z = 5.9 at C = 6144, k = 2048, and the
                           # [2048, 128k] chunk in 1.21 vs 1.43 ms at 16 (H200, session 15)
  sample_run: int = 16     # contiguous entries a sampled run (16 bf16 = one 32-byte memory
                           # sector); runs start every sample_every * sample_run (divides block)
  segments: int = 16       # few rows (fewer than SEGMENT_MAX_ROWS, e.g. decode): programs a row in
                           # the collecting call, each collecting one segment (a power of two)
  segment_warps: int = 8   # num_warps of the two segmented calls (one 128k bf16 row, H200: 0.046
                           # ms at 8, 0.052 at 4; session 16)
  list_block: int = 4096   # segmented calls: a sample or collected list of at most this many
                           # entries is loaded once and searched in registers, `list_bits` key bits
                           # a pass (0: block by block from memory, `block` entries a step). One
                           # 128k bf16 row, H200: 0.031 ms at 4096 (the 1/32 sample and the ~3.6k
                           # collected both fit), 0.041 at 8192, 0.045 from memory (session 16)
  list_bits: int = 2       # 1: 0.041 ms, 4: 0.122 (a [list_block, 16] compare spills) at 8192
  line_slots: int = 3      # the collecting pass (many rows): taken entries stored a LANES-entry
                           # line before the rest of the line's takes need a branch (0: always).
                           # Last causal [2048, L] bf16 chunk, H200 (session 17): 3 / 2 / old
                           # scatter 0.38 / 0.43 / 0.37 ms at 32k, 0.50 / 0.58 / 0.56 at 64k,
                           # 0.79 / 0.81 / 0.95 at 128k; 1: 1.35 vs 1.0 at 128k (branch taken)
  prefetch_line: bool = True   # the collecting pass loads the next step's lines while it works on
                               # this step's (a loop carry): ncu (session 23) found the pass's
                               # largest stall the wait on each step's one 16-byte load a thread,
                               # issued at the step's top and used at once. Last causal [2048, L]
                               # bf16 chunk, H200, 3 rounds in turn (session 24): 0.677 vs 0.778 ms
                               # at 128k, 0.290 vs 0.295 at 16k
  fuse_select: bool = True  # many sampled rows: the select runs in the collecting call, each program
                            # searching its own row's list right after collecting it (False: a
                            # second call). One launch fewer; [2048, 128k] chunk 0.771 vs 0.775 ms
                            # (H200, session 20): the select's ~0.17 ms a chunk is its own work


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


def sample_plan(k: int, capacity: int, every: int) -> tuple[int, float]:
  """(rank m, z): the sample's threshold is its m-th largest key, m = f sqrt(k C) (f = 1 / every);
  z = how many binomial standard deviations separate m from the sample counts expected over the
  row's top k (k f) and top C (C f) entries, the smaller of the two sides (a random sample)."""
  f = 1.0 / every
  rank = max(1, round(f * math.sqrt(k * capacity)))
  z = min((rank - k * f) / math.sqrt(k * f), (capacity * f - rank) / math.sqrt(capacity * f))
  return rank, z


def _search(keys, num_blocks, k_row, done, *, width, bits, accumulate, block):
  """The radix threshold search over keys(i) [block] int32, i < num_blocks (masked entries as the
  -inf key), for the k_row-th largest key; done: skip it (all taken). -> (kth, count_gt, exact):
  kth the signed k_row-th largest key, or a threshold with exactly k_row keys >= it (exact, an
  early exit), or <= the -inf key when fewer than k_row keys are finite (or done); count_gt =
  the number of keys > kth when not exact."""
  # unsigned key bits (the search's prefix) <-> signed keys: flip the top bit of 32 or shift by 2^15
  signed = (lambda u: u ^ _INT_MIN) if width == 32 else (lambda u: u - 2 ** 15)
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
      (jnp.int32(0), jnp.int32(0), jnp.int32(0), done))
  return signed(prefix), count_gt, exact


def _masked_keys(ref, length, block, neg_inf_key):
  """keys(i): the keys of ref's block i [block], entries at or beyond length as the -inf key."""
  cols = jnp.arange(block, dtype=jnp.int32)

  def keys(i):
    x = ref[pl.ds(pl.multiple_of(i * block, block), block)]
    return jnp.where(i * block + cols < length, float_keys(x), neg_inf_key)
  return keys


def _select(o_ref, keys, positions, length, *, width, neg_inf_key, k, block, bits, accumulate,
            out_block, trash):
  """o_ref [trash + 1] or [trash] int32 <- positions(i) [block] of the k largest of keys(i)
  [block], i < ceil(length / block) (keys masks the entries >= length), in order, ties to the
  lower index; then -1. The scatter's masked lanes address slot trash where o_ref has it
  (interpret mode, whose masked scatter writes every lane back), else slot 0 (on the GPU a
  masked lane writes nothing; no trash slot means no copy to slice it off the output)."""
  num_blocks = (length + block - 1) // block
  k_row = jnp.minimum(k, num_blocks * block)          # counts include the masked tail
  # at most k entries: every finite one is taken, no search
  kth, count_gt, exact = _search(keys, num_blocks, k_row, length <= k, width=width, bits=bits,
                                 accumulate=accumulate, block=block)
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
    slot = jnp.where(take, taken + jnp.cumsum(t) - t, trash if o_ref.shape[0] > trash else 0)
    plgpu.store(o_ref.at[slot], positions(i), mask=take)
    return taken + jnp.sum(t), eq_seen + jnp.sum(eq)

  taken, _ = jax.lax.fori_loop(0, num_blocks, compact, (jnp.int32(0), jnp.int32(0)))
  slots = jnp.arange(out_block, dtype=jnp.int32)
  for j in range(trash // out_block):                 # slots >= taken: -1 (disjoint from the scatter)
    plgpu.store(o_ref.at[pl.ds(j * out_block, out_block)], jnp.full((out_block,), -1, jnp.int32),
                mask=j * out_block + slots >= taken)


def _kernel(s_ref, len_ref, o_ref, *, block, **kw):
  """The radix search over the whole row. s_ref [Sp] f32 / bf16 / f16; len_ref [] int32 (entries
  >= length are -inf); o_ref [Kp (+ 1)] int32."""
  neg_inf_key = _neg_inf_key(s_ref.dtype)
  length = len_ref[...]
  cols = jnp.arange(block, dtype=jnp.int32)
  _select(o_ref, _masked_keys(s_ref, length, block, neg_inf_key), lambda i: i * block + cols, length,
          width=key_bits(s_ref.dtype), neg_inf_key=neg_inf_key, block=block, **kw)


def _sample_threshold(s_ref, length, *, rank, run, every, block, bits, accumulate, width,
                      neg_inf_key, list_block=0, list_bits=None):
  """The radix search over the sample of row s_ref [Sp] (entries >= length as -inf): the first
  `run` entries of every `every * run`, for its rank-th largest key -> the collecting threshold
  (a signed key > the -inf key: with fewer than rank finite keys in the sample, the lowest finite
  key, so that every finite key is collected). A sample of at most list_block entries is loaded
  once, as one block, and searched in registers with list_bits a pass."""
  stride = every * run
  total_runs = s_ref.shape[0] // stride               # stride divides the padded row
  in_registers = list_block and pl.next_power_of_2(total_runs * run) <= list_block
  if in_registers:
    block, bits, accumulate = max(run, pl.next_power_of_2(total_runs * run)), list_bits, False
  cols = jnp.arange(block, dtype=jnp.int32)
  col_run, offset = jax.lax.div(cols, run), jax.lax.rem(cols, run)

  def sample_keys(i):
    r = i * (block // run) + col_run                  # the sampled runs of sample block i
    # runs past the padded row (the last block) wrap to in-bounds ones, masked: no per-entry clamp,
    # so each run's `run` entries stay one contiguous load
    x = plgpu.load(s_ref.at[jax.lax.rem(r, total_runs) * stride + offset])
    return jnp.where(r * stride + offset < length, float_keys(x), neg_inf_key)

  sample_blocks = ((length + stride - 1) // stride * run + block - 1) // block
  if in_registers:                                    # one block: load it once, outside the passes
    sample_vec = sample_keys(0)
    sample_keys = lambda i: sample_vec
  kth, _, _ = _search(sample_keys, sample_blocks, jnp.minimum(rank, sample_blocks * block),
                      jnp.bool_(False), width=width, bits=bits, accumulate=accumulate, block=block)
  return jnp.maximum(kth, neg_inf_key + 1)


LANES = 8   # the collecting pass reads a row as lines of LANES entries, one line a thread


def _collect_lines(lines_ref, length, thr, pos_ref, key_ref, *, capacity, block, slots,
                   prefetch=False):
  """The collecting pass: the keys >= thr among the first `length` entries of lines_ref
  [Sp / LANES, LANES] (a row) -> their positions pos_ref [C + 1] and keys key_ref [C + 1] int32,
  in position order (slot C: the masked lanes' trash; past C only counted); returns the count.

  Each line is compacted first: a store instruction costs a lane-step whether or not any lane is
  active (H200: scattering every entry's position and score under a mask took the [2048, 128k]
  chunk's pass from 0.46 to 0.93 ms, 0.98 with the mask never true; session 17). So each line's
  j-th taken entry (j < slots) is found by a count over its LANES entries and stored to the line's
  base slot + j: 2 `slots` stores a line instead of 2 LANES. At ~2.7% taken (sqrt(k C) of a 128k
  row) a line holds more than 3 takes ~0.004% of the time; those steps take a branch that
  scatters the rest. The slot search costs ~15 of the pass's ~54 instructions a score (ncu,
  session 23), but finding each lane from a bit mask with clz and loading its key back from the
  row instead was slower (0.773 vs 0.759 ms the [2048, 128k] chunk; commit e865592).
  prefetch: step i + 1's lines are loaded at the top of step i (carried), so that load's latency
  overlaps step i's work instead of stalling step i + 1 (`TopKBlocks.prefetch_line`)."""
  rows = block // LANES
  lane = jnp.arange(LANES, dtype=jnp.int32)[None, :]
  steps = (length + block - 1) // block
  load = lambda i: lines_ref[pl.ds(pl.multiple_of(i * rows, rows), rows), :]   # [rows, LANES]

  def collect(i, carry):
    if prefetch:
      taken, x = carry
      x_next = load(jnp.minimum(i + 1, steps - 1))   # the last step reloads its own lines
    else:
      taken, x = carry, load(i)
    start = (i * rows + jnp.arange(rows, dtype=jnp.int32)) * LANES       # [rows] line positions
    pos = start[:, None] + lane
    key = float_keys(x)
    take = (pos < length) & (key >= thr)
    t = take.astype(jnp.int32)
    upto = jnp.cumsum(t, axis=1)                                         # takes up to each lane
    count = jnp.sum(t, axis=1)
    base = taken + jnp.cumsum(count) - count                             # the line's first slot
    for j in range(slots):
      slot = base + j
      keep = (count > j) & (slot < capacity)
      slot = jnp.where(keep, slot, capacity)
      lane_j = jnp.sum((upto <= j).astype(jnp.int32), axis=1)            # lane of the (j+1)-th take
      plgpu.store(pos_ref.at[slot], start + lane_j, mask=keep)
      plgpu.store(key_ref.at[slot], jnp.max(jnp.where(lane == lane_j[:, None], key, _INT_MIN), axis=1),
                  mask=keep)

    def rest():
      keep = take & (upto > slots) & (base[:, None] + upto - t < capacity)
      slot = jnp.where(keep, base[:, None] + upto - t, capacity)
      plgpu.store(pos_ref.at[slot], pos, mask=keep)
      plgpu.store(key_ref.at[slot], key, mask=keep)

    # a branch of the whole program: its 2 LANES stores a line are issued only when needed
    jax.lax.cond(jnp.max(count) > slots, rest, lambda: None)
    return (taken + jnp.sum(count), x_next) if prefetch else taken + jnp.sum(count)

  # a fori_loop (scf.for, which Triton pipelines), not a loop that stops once past C: that would
  # only speed up the rare failing rows
  if prefetch:
    return jax.lax.fori_loop(0, steps, collect, (jnp.int32(0), lines_ref[pl.ds(0, rows), :]))[0]
  return jax.lax.fori_loop(0, steps, collect, jnp.int32(0))


def _collect_kernel(s_ref, lines_ref, len_ref, pos_ref, key_ref, cnt_ref, direct_ref, *, k, rank,
                    capacity, run, every, block, bits, accumulate, slots, prefetch=False):
  """Sample, then collect one row. s_ref [Sp] f32 / bf16 / f16 and lines_ref [Sp / LANES, LANES]
  (the same row); len_ref [] int32 -> pos_ref, key_ref [C + 1] int32: the positions and keys of
  the keys >= the sample's threshold, in position order (slot C: the scatter's trash); cnt_ref []
  int32: how many (-1: a row of <= C entries, not sampled); direct_ref [] int32: 1 when the row
  needs the radix search over the whole row (not sampled, or the collection failed)."""
  neg_inf_key = _neg_inf_key(s_ref.dtype)
  length = len_ref[...]

  def sample_and_collect():
    thr = _sample_threshold(s_ref, length, rank=rank, run=run, every=every, block=block,
                            bits=bits, accumulate=accumulate, width=key_bits(s_ref.dtype),
                            neg_inf_key=neg_inf_key)
    count = _collect_lines(lines_ref, length, thr, pos_ref, key_ref, capacity=capacity, block=block,
                           slots=slots, prefetch=prefetch)
    # fewer than k collected is exact only when every finite key was (thr at the lowest finite key)
    failed = (count > capacity) | ((count < k) & (thr > neg_inf_key + 1))
    cnt_ref[...] = count
    direct_ref[...] = failed.astype(jnp.int32)

  def not_sampled():
    cnt_ref[...] = jnp.int32(-1)
    direct_ref[...] = jnp.int32(1)

  # (the branches store their results: Triton's cond lowering takes no constant results)
  jax.lax.cond(length > capacity, sample_and_collect, not_sampled)


def _select_kernel(s_ref, len_ref, pos_ref, key_ref, cnt_ref, direct_ref, o_ref, *, block, **kw):
  """The radix search over a row's collected keys (key_ref [C + 1], cnt_ref [] of them), the taken
  ones written as their positions (pos_ref [C + 1]); or over the whole row (s_ref [Sp], len_ref [])
  where direct_ref [] is 1; o_ref [Kp (+ 1)] int32."""
  neg_inf_key = _neg_inf_key(s_ref.dtype)
  count = cnt_ref[...]
  cols = jnp.arange(block, dtype=jnp.int32)

  def entries(ref, i, fill):
    """ref's collected entries i * block + [0, block) [block] (fill past count)."""
    return jnp.where(i * block + cols < count, ref[pl.ds(pl.multiple_of(i * block, block), block)], fill)

  def whole_row():
    _kernel(s_ref, len_ref, o_ref, block=block, **kw)

  def collected():
    _select(o_ref, lambda i: entries(key_ref, i, neg_inf_key), lambda i: entries(pos_ref, i, 0), count,
            width=key_bits(s_ref.dtype), neg_inf_key=neg_inf_key, block=block, **kw)

  # a per-program branch: the failed rows' full-row search costs the other rows nothing
  jax.lax.cond(direct_ref[...] != 0, whole_row, collected)


def _collect_select_kernel(s_ref, lines_ref, len_ref, pos_ref, key_ref, cnt_ref, direct_ref, o_ref, *,
                           collect_kw, select_kw, barrier):
  """`_collect_kernel` then `_select_kernel` in one program a row (`TopKBlocks.fuse_select`): the
  collected lists go out to pos_ref, key_ref and come straight back (from L1 / L2). barrier: a CTA
  barrier between the two (the lists' entries are stored by some threads and loaded by others;
  interpret mode runs a program as one, and has no barrier)."""
  _collect_kernel(s_ref, lines_ref, len_ref, pos_ref, key_ref, cnt_ref, direct_ref, **collect_kw)
  if barrier:
    plgpu.debug_barrier()
  _select_kernel(s_ref, len_ref, pos_ref, key_ref, cnt_ref, direct_ref, o_ref, **select_kw)


def _segment_collect_kernel(s_ref, len_ref, pos_ref, val_ref, cnt_ref, thr_ref, *, rank, capacity,
                            segment, run, every, block, bits, accumulate, list_block, list_bits):
  """Sample, then collect one segment of a row: program (r, p) of few long rows (decode). Every
  program of a row finds the same threshold from the row's sample (s_ref [Sp], entries >= len_ref
  [] as -inf), then collects the keys >= it among entries [p segment, (p + 1) segment) into
  pos_ref, val_ref [segment + 1] (positions, scores; in position order; slot segment: the
  scatter's trash), their count into cnt_ref [] and the threshold into thr_ref []. A region
  holds its whole segment, so nothing overflows; rows of at most C entries are not sampled
  (cnt_ref 0: the select call searches them whole)."""
  neg_inf_key = _neg_inf_key(s_ref.dtype)
  length = len_ref[...]
  start = pl.program_id(1) * segment
  cols = jnp.arange(block, dtype=jnp.int32)

  def sample_and_collect():
    thr = _sample_threshold(s_ref, length, rank=rank, run=run, every=every, block=block, bits=bits,
                            accumulate=accumulate, width=key_bits(s_ref.dtype),
                            neg_inf_key=neg_inf_key, list_block=list_block, list_bits=list_bits)
    end = jnp.clip(length - start, 0, segment)        # this segment's visible entries

    def collect(i, taken):
      local = i * block + cols
      x = s_ref[pl.ds(pl.multiple_of(start + i * block, block), block)]
      take = (local < end) & (float_keys(x) >= thr)
      t = take.astype(jnp.int32)
      slot = jnp.where(take, taken + jnp.cumsum(t) - t, segment)
      plgpu.store(pos_ref.at[slot], start + local, mask=take)
      plgpu.store(val_ref.at[slot], x, mask=take)
      return taken + jnp.sum(t)

    cnt_ref[...] = jax.lax.fori_loop(0, (end + block - 1) // block, collect, jnp.int32(0))
    thr_ref[...] = thr

  def not_sampled():
    cnt_ref[...] = jnp.int32(0)
    thr_ref[...] = jnp.int32(neg_inf_key)

  jax.lax.cond(length > capacity, sample_and_collect, not_sampled)


def _segment_select_kernel(s_ref, len_ref, pos_ref, val_ref, cnt_ref, thr_ref, o_ref, *, k,
                           capacity, segment, block, list_block, list_bits, **kw):
  """The radix search over a row's collected entries, read from its P segment regions (pos_ref,
  val_ref [P * (segment + 1)], cnt_ref [P] each region's count, thr_ref [P] the threshold) as one list
  in position order; or over the whole row (s_ref [Sp], len_ref []) when it was not sampled (at
  most C entries) or the sample misled (fewer than k collected above a threshold that was not
  the lowest finite key). A list of at most list_block entries is loaded once and searched in
  registers (list_bits a pass). o_ref [Kp (+ 1)] int32."""
  neg_inf_key = _neg_inf_key(s_ref.dtype)
  width = key_bits(s_ref.dtype)
  length = len_ref[...]
  counts = [cnt_ref[p] for p in range(cnt_ref.shape[0])]   # P scalars
  ends = list(itertools.accumulate(counts))           # list index where each region ends
  total = ends[-1]
  thr = jnp.max(thr_ref[...])

  def slots(i, size=block):
    """List entries i * size + [0, size) -> their slots in the regions (0 past the list's end)."""
    j = i * size + jnp.arange(size, dtype=jnp.int32)
    # the regions before j's own are those that end at or before j: skip their unused slots.
    # One [block] update a region: a [block, P] compare-and-sum spilled registers (segments 16,
    # 4 warps: 0.15-0.2 ms a 128k row whatever its length; session 16)
    skip = jnp.zeros_like(j)
    for end, count in zip(ends, counts):
      skip += jnp.where(j >= end, segment + 1 - count, 0)
    return jnp.where(j < total, j + skip, 0), j < total

  def keys(i):
    slot, valid = slots(i)
    return jnp.where(valid, float_keys(plgpu.load(val_ref.at[slot])), neg_inf_key)

  def whole_row():
    _kernel(s_ref, len_ref, o_ref, k=k, block=block, **kw)

  def from_memory():
    _select(o_ref, keys, lambda i: plgpu.load(pos_ref.at[slots(i)[0]]), total,
            width=width, neg_inf_key=neg_inf_key, k=k, block=block, **kw)

  def in_registers():
    slot, valid = slots(0, list_block)
    key_vec = jnp.where(valid, float_keys(plgpu.load(val_ref.at[slot])), neg_inf_key)
    pos_vec = plgpu.load(pos_ref.at[slot])
    _select(o_ref, lambda i: key_vec, lambda i: pos_vec, total, width=width, neg_inf_key=neg_inf_key,
            k=k, block=list_block, **dict(kw, bits=list_bits, accumulate=False))

  def collected():
    if list_block:
      jax.lax.cond(total <= list_block, in_registers, from_memory)
    else:
      from_memory()

  failed = (total < jnp.minimum(k, length)) & (thr > neg_inf_key + 1)
  jax.lax.cond((length <= capacity) | failed, whole_row, collected)


@dataclasses.dataclass(frozen=True)
class _Launch:
  """Static parameters of one call, from the scores' shape and dtype, k and TopKBlocks."""
  k: int           # min(k, S)
  bits: int
  block: int
  out_block: int
  padded: int      # S rounded up to a multiple of block
  kp: int          # output slots (a multiple of out_block; in interpret mode slot kp: the trash)
  capacity: int    # C rounded up to a multiple of block
  rank: int        # the sample's threshold rank
  sample: bool     # sample, then collect (rows longer than capacity)


def _launch(width: int, dtype, k: int, blocks: TopKBlocks) -> _Launch:
  kk = min(k, width)
  block = min(blocks.block, max(16, pl.next_power_of_2(width)))
  out_block = min(blocks.out_block, max(16, pl.next_power_of_2(kk)))
  capacity = -(-blocks.capacity // block) * block
  rank, z = sample_plan(kk, capacity, blocks.sample_every)
  # the sample pays only when some row can be longer than C, and when it rarely fails
  sample = blocks.sample and width > capacity and z >= _MIN_SAMPLE_Z
  bits = blocks.bits or (2 if key_bits(dtype) == 16 and not sample else 4)
  if 16 % bits:
    raise ValueError(f"TopKBlocks.bits must divide 16, got {blocks.bits}")
  if sample and (blocks.sample_run < 1 or blocks.sample_every < 1
                 or block % (blocks.sample_run * blocks.sample_every)):
    raise ValueError(f"TopKBlocks.sample_run * sample_every must divide the block ({block}), got "
                     f"{blocks.sample_run} * {blocks.sample_every}")
  if blocks.segments < 1 or blocks.segments & (blocks.segments - 1):
    raise ValueError(f"TopKBlocks.segments must be a power of two, got {blocks.segments}")
  if blocks.list_block and (blocks.list_block < 16 or blocks.list_block & (blocks.list_block - 1)):
    raise ValueError(f"TopKBlocks.list_block must be 0 or a power of two >= 16, got {blocks.list_block}")
  if blocks.list_bits < 1 or 16 % blocks.list_bits:
    raise ValueError(f"TopKBlocks.list_bits must divide 16, got {blocks.list_bits}")
  if sample and (block % LANES or not 0 <= blocks.line_slots <= LANES):
    raise ValueError(f"sampling needs a block that is a multiple of {LANES} (got {block}) and "
                     f"0 <= TopKBlocks.line_slots <= {LANES} (got {blocks.line_slots})")
  return _Launch(k=kk, bits=bits, block=block, out_block=out_block, padded=-(-width // block) * block,
                 kp=-(-kk // out_block) * out_block, capacity=capacity, rank=rank, sample=sample)


def samples(width: int, dtype, k: int, blocks: TopKBlocks | None = None) -> bool:
  """Whether rows of `width` scores of `dtype` take the sample-then-collect path for this k."""
  return _launch(width, dtype, k, blocks or TopKBlocks()).sample


def _prepare(scores, lengths, lp: _Launch):
  """Scores padded with -inf to lp.padded (16-bit floats kept, others float32), lengths clipped."""
  width = scores.shape[1]
  if lp.padded != width:
    scores = jnp.pad(scores, [(0, 0), (0, lp.padded - width)], constant_values=-jnp.inf)
  return _score_dtype(scores), jnp.clip(lengths.astype(jnp.int32), 0, width)


def _compiler_params(blocks: TopKBlocks, num_warps: int | None = None):
  return plgpu.CompilerParams(num_warps=num_warps or blocks.num_warps, num_stages=blocks.num_stages)


_ROW_SCALAR = pl.BlockSpec((None,), lambda r: (r,))


def _select_kw(lp: _Launch, blocks: TopKBlocks) -> dict:
  """The radix search's and output's static parameters (`_select`)."""
  return dict(k=lp.k, block=lp.block, bits=lp.bits, accumulate=blocks.accumulate,
              out_block=lp.out_block, trash=lp.kp)


def _collect(scores, lengths, lp: _Launch, blocks: TopKBlocks, interpret: bool, select: bool = False):
  """The first call of sample, then collect over prepared scores [R, Sp], lengths [R] ->
  (positions [R, C + 1], keys [R, C + 1], count [R], direct [R]); with select also the top-k
  [R, kp (+ 1)] (`_collect_select_kernel`: the select in the same call)."""
  rows = scores.shape[0]
  lines = scores.reshape(rows, lp.padded // LANES, LANES)   # the same bytes, read as lines
  scratch = pl.BlockSpec((None, lp.capacity + 1), lambda r: (r, 0))
  kernel = functools.partial(_collect_kernel, k=lp.k, rank=lp.rank, capacity=lp.capacity,
                             run=blocks.sample_run, every=blocks.sample_every, block=lp.block,
                             bits=lp.bits, accumulate=blocks.accumulate, slots=blocks.line_slots,
                             prefetch=blocks.prefetch_line)
  out_specs = [scratch, scratch, _ROW_SCALAR, _ROW_SCALAR]
  out_shape = [jax.ShapeDtypeStruct((rows, lp.capacity + 1), jnp.int32),
               jax.ShapeDtypeStruct((rows, lp.capacity + 1), jnp.int32),
               jax.ShapeDtypeStruct((rows,), jnp.int32),
               jax.ShapeDtypeStruct((rows,), jnp.int32)]
  if select:
    kernel = functools.partial(_collect_select_kernel, collect_kw=kernel.keywords,
                               select_kw=_select_kw(lp, blocks), barrier=not interpret)
    out_width = _out_width(lp, interpret)
    out_specs.append(pl.BlockSpec((None, out_width), lambda r: (r, 0)))
    out_shape.append(jax.ShapeDtypeStruct((rows, out_width), jnp.int32))
  return pl.pallas_call(
      kernel,
      grid=(rows,),
      in_specs=[pl.BlockSpec((None, lp.padded), lambda r: (r, 0)),
                pl.BlockSpec((None,) + lines.shape[1:], lambda r: (r, 0, 0)), _ROW_SCALAR],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_compiler_params(blocks),
      interpret=interpret,
      name="dsa_topk_collect_select" if select else "dsa_topk_collect",
  )(scores, lines, lengths)


@functools.partial(jax.jit, static_argnames=("k", "blocks", "interpret"))
def collect_candidates(scores, lengths, *, k: int, blocks: TopKBlocks = TopKBlocks(),
                       interpret: bool | None = None):
  """The sample-then-collect call alone, as `top_k_rows` runs it (for tests and measurements):
  scores [R, S], lengths [R] -> (positions [R, C + 1] int32, keys [R, C + 1] int32 (`float_keys`),
  count [R] int32 (-1: the row was not sampled), direct [R] int32 (1: the row takes the full-row
  radix search: not sampled, or failed)); only the first count entries of a collected row are
  written."""
  lp = _launch(scores.shape[1], scores.dtype, k, blocks)
  if not lp.sample:
    raise ValueError(f"no sampling for S = {scores.shape[1]}, k = {k} with {blocks}")
  return _collect(*_prepare(scores, lengths, lp), lp, blocks, resolve_interpret(interpret))


def _out_width(lp: _Launch, interpret: bool) -> int:
  """Output slots a row: kp, plus the trash slot in interpret mode (see `_select`). On the GPU
  [R, kp] with kp = k (k = 2048) is the result itself: slicing a trash slot off was a copy after
  every call (a kernel of its own in a batch-8 decode step, 1.1 µs; 16 MB a [2048, 2049] prefill
  chunk; session 18)."""
  return lp.kp + (1 if interpret else 0)


def _collects(rows: int, lp: _Launch, blocks: TopKBlocks) -> bool:
  """Whether `rows` rows take the two calls, collect then select (sampled, too many rows for the
  segmented calls)."""
  return lp.sample and not (rows < SEGMENT_MAX_ROWS and blocks.segments > 1)


def _search_rows(scores, lengths, collected, lp: _Launch, blocks: TopKBlocks, interpret: bool):
  """Prepared scores [R, Sp], lengths [R] -> [R, k]: the radix search over whole rows (rows not
  sampled), the segmented calls (few sampled rows), or the select call over `collected`
  (`_collect`'s outputs: many sampled rows)."""
  rows = scores.shape[0]
  kw = _select_kw(lp, blocks)
  row_spec = pl.BlockSpec((None, lp.padded), lambda r: (r, 0))
  out_width = _out_width(lp, interpret)
  call = functools.partial(
      pl.pallas_call, grid=(rows,),
      out_specs=pl.BlockSpec((None, out_width), lambda r: (r, 0)),
      out_shape=jax.ShapeDtypeStruct((rows, out_width), jnp.int32),
      compiler_params=_compiler_params(blocks), interpret=interpret)
  if not lp.sample:
    out = call(functools.partial(_kernel, **kw), in_specs=[row_spec, _ROW_SCALAR],
               name="dsa_topk")(scores, lengths)
  elif collected is None:
    out = _segmented(scores, lengths, lp, blocks, interpret)
  else:
    scratch = pl.BlockSpec((None, lp.capacity + 1), lambda r: (r, 0))
    out = call(functools.partial(_select_kernel, **kw),
               in_specs=[row_spec, _ROW_SCALAR, scratch, scratch, _ROW_SCALAR, _ROW_SCALAR],
               name="dsa_topk_select")(scores, lengths, *collected)
  return out[:, :lp.k]


@functools.partial(jax.jit, static_argnames=("k", "blocks", "interpret"))
def top_k_rows(scores, lengths, *, k: int, blocks: TopKBlocks = TopKBlocks(),
               interpret: bool = False):
  """scores [R, S] f32 / bf16 / f16, lengths [R] int32 -> [R, min(k, S)] int32 (position order,
  -1 = none)."""
  lp = _launch(scores.shape[1], scores.dtype, k, blocks)
  scores, lengths = _prepare(scores, lengths, lp)
  collects = _collects(scores.shape[0], lp, blocks)
  if collects and blocks.fuse_select:
    return _collect(scores, lengths, lp, blocks, interpret, select=True)[-1][:, :lp.k]
  collected = _collect(scores, lengths, lp, blocks, interpret) if collects else None
  return _search_rows(scores, lengths, collected, lp, blocks, interpret)


@functools.partial(jax.jit, static_argnames=("k", "blocks", "interpret"))
def select_candidates(scores, lengths, collected, *, k: int, blocks: TopKBlocks = TopKBlocks(),
                      interpret: bool | None = None):
  """The second call of sample-then-collect alone, as `top_k_rows` runs it (for measurements):
  scores [R, S], lengths [R] and `collect_candidates`' outputs for them -> [R, min(k, S)] int32."""
  lp = _launch(scores.shape[1], scores.dtype, k, blocks)
  if not _collects(scores.shape[0], lp, blocks):
    raise ValueError(f"{scores.shape[0]} rows of S = {scores.shape[1]}, k = {k} with {blocks} do not "
                     "take the collect, then select calls")
  scores, lengths = _prepare(scores, lengths, lp)
  return _search_rows(scores, lengths, collected, lp, blocks, resolve_interpret(interpret))


SEGMENT_MAX_ROWS = 64   # fewer rows than this (decode): the collecting pass split over segments


def _segmented(scores, lengths, lp: _Launch, blocks: TopKBlocks, interpret: bool):
  """Sample, then collect, for few long rows: each row's collecting pass split over
  `blocks.segments` programs (one segment each), then one program a row searches the collected
  entries of all its segments. Prepared scores [R, Sp], lengths [R] -> [R, Kp (+ 1)] int32."""
  rows, parts = scores.shape[0], blocks.segments
  segment = -(-lp.padded // (parts * lp.block)) * lp.block
  row_spec = pl.BlockSpec((None, lp.padded), lambda r, p: (r, 0))
  region = pl.BlockSpec((None, None, segment + 1), lambda r, p: (r, p, 0))   # + the trash slot
  one = pl.BlockSpec((None, None), lambda r, p: (r, p))
  kw = dict(block=lp.block, bits=lp.bits, accumulate=blocks.accumulate, capacity=lp.capacity,
            segment=segment, list_block=blocks.list_block, list_bits=blocks.list_bits)
  pos, val, cnt, thr = pl.pallas_call(
      functools.partial(_segment_collect_kernel, rank=lp.rank, run=blocks.sample_run,
                        every=blocks.sample_every, **kw),
      grid=(rows, parts),
      in_specs=[row_spec, pl.BlockSpec((None,), lambda r, p: (r,))],
      out_specs=[region, region, one, one],
      out_shape=[jax.ShapeDtypeStruct((rows, parts, segment + 1), jnp.int32),
                 jax.ShapeDtypeStruct((rows, parts, segment + 1), scores.dtype),
                 jax.ShapeDtypeStruct((rows, parts), jnp.int32),
                 jax.ShapeDtypeStruct((rows, parts), jnp.int32)],
      compiler_params=_compiler_params(blocks, blocks.segment_warps), interpret=interpret,
      name="dsa_topk_segment_collect",
  )(scores, lengths)
  flat = pl.BlockSpec((None, parts * (segment + 1)), lambda r: (r, 0))
  per_part = pl.BlockSpec((None, parts), lambda r: (r, 0))
  return pl.pallas_call(
      functools.partial(_segment_select_kernel, k=lp.k, out_block=lp.out_block, trash=lp.kp, **kw),
      grid=(rows,),
      in_specs=[pl.BlockSpec((None, lp.padded), lambda r: (r, 0)), _ROW_SCALAR, flat, flat,
                per_part, per_part],
      out_specs=pl.BlockSpec((None, _out_width(lp, interpret)), lambda r: (r, 0)),
      out_shape=jax.ShapeDtypeStruct((rows, _out_width(lp, interpret)), jnp.int32),
      compiler_params=_compiler_params(blocks, blocks.segment_warps), interpret=interpret,
      name="dsa_topk_segment_select",
  )(scores, lengths, pos.reshape(rows, -1), val.reshape(rows, -1), cnt, thr)


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
  if split is None:   # few long rows that sample take the segmented collection instead
    split = 1 if samples(width, flat.dtype, kk, blocks) else default_split(rows, width, kk)
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
