"""Probe: the prefill top-k on the last causal [2048, 128k] chunk of bf16 scores (GPU).

Times `dsa_topk.top_k` (one program a row: collect, then select) with launch variants and, with
--ab_module, another copy of the module (e.g. an older commit's file saved as
experiments/_ab_dsa_topk.py), timed in turn over 3 rounds, each exact against lax.top_k. With
--parts also the collecting call's parts alone, from this file's own kernels (session 17: they
showed that the masked scatter of every entry's position and score, not the threshold search nor
the bytes, made the pass ~2x slower than the pass without its stores):
  threshold: the sample search alone (one program a row), from memory and in registers;
  collect given the threshold, by its stores: "scatter" (positions and scores, as before session
    17), "pos_only", "never*" (the stores issued, no lane ever active: two scatters, one, at slots
    that do not come from the prefix sum, dense), "no_store" (the prefix sum kept live, no
    stores), "count" (no prefix sum, no stores).

With --lengths: the last causal chunk at each length, this module against --ab_module's, and its
collect and select calls alone (`collect_candidates`, `select_candidates`), where a chunk's fixed
cost goes (0.25 ms a chunk at 8k, session 18).

  python -m experiments.probe_topk_collect [--parts] [--ab_module=experiments._ab_dsa_topk]
  python -m experiments.probe_topk_collect --lengths=8192,16384,131072 [--ab_module=...] [--variant=block=2048]
      [--select_parts]
  python -m experiments.probe_topk_collect --small        (CPU, interpret mode: a [8, 16k] check)
"""

import dataclasses
import functools
import importlib

from absl import app
from absl import flags

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from experiments import bench_common
from pallas_kernels import dsa_topk as tk

K = 2048


def _threshold_kernel(s_ref, len_ref, thr_ref, **kw):
  """thr_ref [] <- the sample's collecting threshold of row s_ref [Sp] (entries >= len_ref as -inf)."""
  thr_ref[...] = tk._sample_threshold(s_ref, len_ref[...], width=tk.key_bits(s_ref.dtype),
                                      neg_inf_key=tk._neg_inf_key(s_ref.dtype), accumulate=False, **kw)


def _collect_given_kernel(s_ref, len_ref, thr_ref, pos_ref, val_ref, cnt_ref, *, capacity, block, mode):
  """The collecting pass alone, the threshold given. mode: "scatter" (as dsa_topk), "no_store"
  (prefix sum, no stores) or "count" (no prefix sum, no stores)."""
  length, thr = len_ref[...], thr_ref[...]
  cols = jnp.arange(block, dtype=jnp.int32)

  def collect(i, taken):
    x = s_ref[pl.ds(pl.multiple_of(i * block, block), block)]
    pos = i * block + cols
    take = (pos < length) & (tk.float_keys(x) >= thr)
    t = take.astype(jnp.int32)
    if mode == "count":
      return taken + jnp.sum(t)
    slot = taken + jnp.cumsum(t) - t
    keep = take & (slot < capacity)
    slot = jnp.where(keep, slot, capacity)
    if mode == "pos_only":
      plgpu.store(pos_ref.at[slot], pos, mask=keep)
      return taken + jnp.sum(t)
    if mode == "never":     # stores issued, no lane ever active (slot < capacity always)
      plgpu.store(pos_ref.at[slot], pos, mask=keep & (slot > capacity))
      plgpu.store(val_ref.at[slot], x, mask=keep & (slot > capacity))
      return taken + jnp.sum(t)
    if mode == "never_pos":  # one store instruction a lane, never active
      plgpu.store(pos_ref.at[slot], pos, mask=keep & (slot > capacity))
      return taken + jnp.sum(t)
    if mode == "never_iota":  # the same two stores at slots that do not come from the prefix sum
      plgpu.store(pos_ref.at[cols], pos, mask=take & (x > 1e30))
      plgpu.store(val_ref.at[cols], x, mask=take & (x > 1e30))
      return taken + jnp.sum(t) + jnp.sum(jnp.where(slot == capacity + 7, 1, 0))
    if mode == "never_dense":  # contiguous block stores, never active
      plgpu.store(pos_ref.at[pl.ds(0, block)], pos, mask=keep & (slot > capacity))
      plgpu.store(val_ref.at[pl.ds(0, block)], x, mask=keep & (slot > capacity))
      return taken + jnp.sum(t)
    if mode == "scatter":
      plgpu.store(pos_ref.at[slot], pos, mask=keep)
      plgpu.store(val_ref.at[slot], x, mask=keep)
      return taken + jnp.sum(t)
    return taken + jnp.sum(t) + jnp.sum(jnp.where(slot == capacity + 7, 1, 0))   # keep slot live

  cnt_ref[...] = jax.lax.fori_loop(0, (length + block - 1) // block, collect, jnp.int32(0))


def _select_part_kernel(key_ref, pos_ref, cnt_ref, thr_ref, o_ref, *, k, block, bits, mode):
  """One part of the select over a row's collected list (key_ref, pos_ref [C + 1], cnt_ref []):
  "load" (the list's keys summed), "search" (the radix search alone: o_ref[0] <- the k-th key),
  "compact" (the compaction pass given thr_ref [], the keys >= it scattered as positions), "fill"
  (the -1 stores alone). o_ref [Kp]."""
  count = cnt_ref[...]
  cols = jnp.arange(block, dtype=jnp.int32)
  num_blocks = (count + block - 1) // block

  def keys(i):
    x = key_ref[pl.ds(pl.multiple_of(i * block, block), block)]
    return jnp.where(i * block + cols < count, x, tk._INT_MIN)

  if mode == "load":
    o_ref[0] = jax.lax.fori_loop(0, num_blocks, lambda i, acc: acc + jnp.sum(keys(i)), jnp.int32(0))
  elif mode == "search":
    kth, _, _ = tk._search(keys, num_blocks, jnp.minimum(k, num_blocks * block), count <= k, width=16,
                           bits=bits, accumulate=False, block=block)
    o_ref[0] = kth
  elif mode == "compact":
    thr = thr_ref[...]

    def compact(i, taken):
      take = keys(i) >= thr
      t = take.astype(jnp.int32)
      slot = jnp.where(take, taken + jnp.cumsum(t) - t, 0)
      pos = pos_ref[pl.ds(pl.multiple_of(i * block, block), block)]
      plgpu.store(o_ref.at[slot], pos, mask=take & (slot < o_ref.shape[0]))
      return taken + jnp.sum(t)
    jax.lax.fori_loop(0, num_blocks, compact, jnp.int32(0))
  else:   # fill
    slots = jnp.arange(block, dtype=jnp.int32)
    for j in range(o_ref.shape[0] // block):
      plgpu.store(o_ref.at[pl.ds(j * block, block)], jnp.full((block,), -1, jnp.int32),
                  mask=j * block + slots >= count // 2)


def select_part_call(collected, thr, *, mode, interpret, block=1024, bits=4, warps=4):
  """collect_candidates' outputs (positions, keys, count, direct) [+ thr [R]] -> [R, K] int32."""
  pos, key, count, _ = collected
  rows, width = key.shape
  scratch = pl.BlockSpec((None, width), lambda r: (r, 0))
  return pl.pallas_call(
      functools.partial(_select_part_kernel, k=K, block=block, bits=bits, mode=mode),
      grid=(rows,), in_specs=[scratch, scratch, tk._ROW_SCALAR, tk._ROW_SCALAR],
      out_specs=pl.BlockSpec((None, K), lambda r: (r, 0)),
      out_shape=jax.ShapeDtypeStruct((rows, K), jnp.int32),
      compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=3), interpret=interpret,
      name=f"probe_select_{mode}")(key, pos, count, thr)


def threshold_call(scores, lengths, lp, *, block, bits, list_block, list_bits, warps, interpret):
  rows = scores.shape[0]
  return pl.pallas_call(
      functools.partial(_threshold_kernel, rank=lp.rank, run=16, every=32, block=block, bits=bits,
                        list_block=list_block, list_bits=list_bits),
      grid=(rows,), in_specs=[pl.BlockSpec((None, lp.padded), lambda r: (r, 0)), tk._ROW_SCALAR],
      out_specs=tk._ROW_SCALAR, out_shape=jax.ShapeDtypeStruct((rows,), jnp.int32),
      compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=3), interpret=interpret,
      name="probe_threshold")(scores, lengths)


def collect_call(scores, lengths, thr, lp, *, block, mode, warps, interpret):
  rows = scores.shape[0]
  scratch = pl.BlockSpec((None, lp.capacity + 1), lambda r: (r, 0))
  return pl.pallas_call(
      functools.partial(_collect_given_kernel, capacity=lp.capacity, block=block, mode=mode),
      grid=(rows,),
      in_specs=[pl.BlockSpec((None, lp.padded), lambda r: (r, 0)), tk._ROW_SCALAR, tk._ROW_SCALAR],
      out_specs=[scratch, scratch, tk._ROW_SCALAR],
      out_shape=[jax.ShapeDtypeStruct((rows, lp.capacity + 1), jnp.int32),
                 jax.ShapeDtypeStruct((rows, lp.capacity + 1), scores.dtype),
                 jax.ShapeDtypeStruct((rows,), jnp.int32)],
      compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=3), interpret=interpret,
      name="probe_collect")(scores, lengths, thr)


def last_chunk(length, rows):
  """The last causal chunk's bf16 scores [rows, length], lengths [rows] and lax.top_k's sorted
  positions [rows, K] (the reference)."""
  x = jax.random.normal(jax.random.key(length), (rows, length)).astype(jnp.bfloat16)
  n = jnp.arange(length - rows, length, dtype=jnp.int32) + 1
  visible = jnp.where(jnp.arange(length) < n[:, None], x.astype(jnp.float32), -jnp.inf)
  return x, n, np.sort(np.asarray(jax.lax.top_k(visible, K)[1]), -1)


def top_k_fn(mod, blocks, interpret):
  return jax.jit(lambda s, n: mod.top_k(s, K, lengths=n, split=1, blocks=blocks, interpret=interpret))


def parse_blocks(text: str) -> "tk.TopKBlocks":
  """"field=value,field=value" -> TopKBlocks with those fields (ints or true/false) replaced."""
  fields = {f.name: f.type for f in dataclasses.fields(tk.TopKBlocks)}
  kw = {}
  for item in text.split(","):
    name, _, value = item.partition("=")
    if name not in fields:
      raise ValueError(f"--variant: TopKBlocks has no field {name!r} (fields: {sorted(fields)})")
    kw[name] = value.lower() == "true" if value.lower() in ("true", "false") else int(value)
  return dataclasses.replace(tk.TopKBlocks(), **kw)


def other_modules():
  return {path.rsplit(".", 1)[-1]: importlib.import_module(path) for path in _AB.value}


def by_length(interpret):
  """The last causal chunk at each of --lengths, this module's default against --ab_module's, the
  select in a call of its own (`fuse_select=False`), the --variant launches, and its collect and
  select calls alone, timed in turn with `bench_pipelined` (16 calls a sync: host jitter hidden)."""
  for length in map(int, _LENGTHS.value):
    x, n, ref = last_chunk(length, 8 if interpret else min(2048, length))
    modules = {"this": tk, **other_modules()}
    variants = {f"{name} default": (mod, mod.TopKBlocks()) for name, mod in modules.items()}
    variants["this select call of its own"] = (tk, tk.TopKBlocks(fuse_select=False))
    for text in _VARIANT.value:   # e.g. --variant=block=2048,num_warps=8
      variants[f"this {text}"] = (tk, parse_blocks(text))
    cases = {}
    for name, (mod, blocks) in variants.items():
      f = top_k_fn(mod, blocks, interpret)
      assert (np.sort(np.asarray(f(x, n)), -1) == ref).all(), (length, name)
      cases[name] = (f"L={length} {name}", f, (x, n))
    # this module's two calls one at a time: where a chunk's fixed cost goes (session 18's next step)
    one = tk.TopKBlocks(segments=1)   # = the default for a chunk's 2048 rows (--small's 8: segmented)
    collect = jax.jit(lambda s, n: tk.collect_candidates(s, n, k=K, blocks=one, interpret=interpret))
    collected = collect(x, n)
    select = jax.jit(lambda s, n, c: tk.select_candidates(s, n, c, k=K, blocks=one, interpret=interpret))
    assert (np.sort(np.asarray(select(x, n, collected)), -1) == ref).all(), (length, "select alone")
    cases["this collect call alone"] = (f"L={length} collect call alone", collect, (x, n))
    cases["this select call alone"] = (f"L={length} select call alone", select, (x, n, collected))
    if _SELECT_PARTS.value:   # where the select's ~0.17 ms a chunk goes (session 20's next step)
      kth = jax.jit(lambda c: select_part_call(c, c[2], mode="search", interpret=interpret))(collected)[:, 0]
      for mode in ("load", "search", "compact", "fill"):
        f = jax.jit(lambda c, t, mode=mode: select_part_call(c, t, mode=mode, interpret=interpret))
        cases[f"this select part: {mode}"] = (f"L={length} select part {mode}", f, (collected, kth))
    times = bench_common.interleaved(cases, rounds=3, reps=5, timer=bench_common.bench_pipelined)
    for name, t in times.items():   # the select's parts are timed, not checked
      checked = "timing only" if name.startswith("this select part") else "exact"
      print(f"L={length} top_k {name}: {1e3 * t:.3f} ms (median of rounds, {checked})", flush=True)


def main(argv):
  del argv
  if _LENGTHS.value:
    return by_length(_SMALL.value)
  interpret = _SMALL.value
  length, rows = (16384, 8) if _SMALL.value else (131072, 2048)
  reps = 1 if _SMALL.value else 9
  print(jax.devices()[0].device_kind, f"[{rows}, {length}] k={K}", flush=True)
  x, n, ref = last_chunk(length, rows)
  lp = tk._launch(length, x.dtype, K, tk.TopKBlocks())
  assert lp.sample and lp.padded == length

  def timed(name, f, *args):
    t = bench_common.bench(jax.jit(f), *args, reps=reps)
    print(f"{name}: {1e3 * t:.3f} ms", flush=True)
    return t

  # the whole top-k: this module's variants and --ab_module's default, timed in turn
  cases = {}
  modules = {"this": tk, **other_modules()}
  for name, mod in modules.items():
    variants = {"default": mod.TopKBlocks()}
    if mod is tk and not _SMALL.value:
      variants.update({f"line_slots {s}": tk.TopKBlocks(line_slots=s) for s in (1, 2)})
    for v, blocks in variants.items():
      f = top_k_fn(mod, blocks, interpret)
      exact = bool((np.sort(np.asarray(f(x, n)), -1) == ref).all())
      print(f"{name} {v}: exact {exact}", flush=True)
      cases[f"{name} {v}"] = (f"{name} {v}", f, (x, n))
  for name, mod in modules.items():   # the first call alone (the rest of the top-k: the select)
    f = jax.jit(lambda s, n, mod=mod: mod.collect_candidates(s, n, k=K, interpret=interpret))
    cases[f"{name} collect call alone"] = (f"{name} collect call alone", f, (x, n))
  times = bench_common.interleaved(cases, rounds=1 if _SMALL.value else 3, reps=reps)
  for name, t in times.items():
    print(f"top_k {name}: {t and 1e3 * t:.3f} ms (median of rounds)", flush=True)
  if not _PARTS.value:
    return

  # the first call's parts (session 17: what made the collecting pass slow)
  thr_variants = {
      "threshold: block 1024, 4 bits, from memory (as in collect)":
          dict(block=1024, bits=4, list_block=0, list_bits=2, warps=4),
      "threshold: in registers (list_block 4096, 2 bits), 4 warps":
          dict(block=1024, bits=4, list_block=4096, list_bits=2, warps=4),
  }
  thrs = {}
  for name, kw in thr_variants.items():
    f = lambda s, n, kw=kw: threshold_call(s, n, lp, interpret=interpret, **kw)
    thrs[name] = np.asarray(f(x, n))
    timed(name, f, x, n)
  thr = jnp.asarray(next(iter(thrs.values())))
  for mode in ("scatter", "pos_only", "never", "never_pos", "never_iota", "never_dense", "no_store", "count"):
    f = lambda s, n, t, mode=mode: collect_call(s, n, t, lp, block=1024, mode=mode, warps=4,
                                                interpret=interpret)
    timed(f"collect given thr: {mode}, block 1024, 4 warps", f, x, n, thr)


_SMALL = flags.DEFINE_bool("small", False, "CPU interpret-mode check at [8, 16k].")
_AB = flags.DEFINE_list("ab_module", [], "Module paths of other dsa_topk versions to time beside.")
_LENGTHS = flags.DEFINE_list("lengths", [], "Only: the last causal chunk at these lengths, this module "
                              "vs --ab_module (bench_pipelined).")
_VARIANT = flags.DEFINE_multi_string("variant", [], "With --lengths: also these TopKBlocks variants, "
                                     "e.g. block=2048,num_warps=8 (repeatable).")
_SELECT_PARTS = flags.DEFINE_bool("select_parts", False, "With --lengths: also the select's parts alone "
                                  "(list loads, the search, the compaction, the -1 fill).")
_PARTS = flags.DEFINE_bool("parts", False, "Also time the collecting call's parts alone.")

if __name__ == "__main__":
  app.run(main)
