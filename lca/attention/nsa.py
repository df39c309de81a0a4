"""Native Sparse Attention (NSA, arXiv 2502.11089): compression + selection + window.

  o_t = g_t^cmp · Attn(q_t, K̃^cmp, Ṽ^cmp) + g_t^slc · Attn(q_t, K^slc_t, V^slc_t)
        + g_t^win · Attn(q_t, K_{t-w+1..t}, V_{t-w+1..t}),   g = sigmoid(MLP(x_t)) per head.

Compression: blocks of l tokens with stride d (block i = tokens [i·d, i·d + l)) are
mapped by a learnable MLP φ (with an intra-block position embedding) to one key and
one value; query t sees compressed block i iff it has ended, i·d + l - 1 <= t.
Selection: the compression probabilities, summed over the heads of a GQA group, are
re-binned onto selection blocks of l' tokens:
  p^slc_t[j] = Σ_{m < l'/d} Σ_{n < l/d} p^cmp_t[(l'/d)·j + m - n],
i.e. each compressed block counts once per d-token chunk it shares with selection
block j (SPEC's formula, 0-indexed; p^slc = p^cmp when l = l' = d). Each (query,
group) keeps the top-n blocks, of which block 0 and the two blocks ending at the
query (the current and the previous one) are always kept; it attends to their
tokens causally. Window: causal sliding window of w tokens.

All three branches read the same (RoPE'd) k and v; the paper gives each branch its
own projections, which lca leaves to the layer (it shares them to keep one KV cache).

Faces:
  compress(x, params, ...)                  φ over overlapping blocks -> [B, Nc, H_kv, D]
  nsa_reference(q, k, v, kc, vc, gates, ...)  dense masks, plain jnp
  nsa(..., implementation=)                 "xla" (gathers selected blocks), "pallas"
                                            (pallas_kernels/nsa.py), "reference"
  decode_attention(q, gates, positions, cache, implementation=)
                                            one step over the caches: "pallas" (fused,
                                            pallas_kernels/nsa_decode.py, T = 1) or "xla"
  NSAttention(nnx.Module)                   the layer (letter "N"), with a decode cache
"""

from collections.abc import Sequence
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lca.attention import common, full, local


@dataclasses.dataclass(frozen=True)
class NSASizes:
  """Block sizes of NSA (paper defaults). Validated on construction."""

  block_len: int = 32       # l: compression block length
  block_stride: int = 16    # d: compression stride
  select_block: int = 64    # l': selection block length
  num_selected: int = 16    # n: selected blocks per (query, group), forced ones included
  window: int = 512         # w: sliding window
  num_initial: int = 1      # always-selected blocks at the start
  num_local: int = 2        # always-selected blocks ending at the query

  def __post_init__(self):
    for name in ("block_len", "block_stride", "select_block", "num_selected", "window"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"NSA {name} must be a positive int, got {name}={value!r}")
    if self.block_len % self.block_stride:
      raise ValueError(f"NSA block_len={self.block_len} must be a multiple of "
                       f"block_stride={self.block_stride}")
    if self.select_block % self.block_stride:
      raise ValueError(f"NSA select_block={self.select_block} must be a multiple of "
                       f"block_stride={self.block_stride}")
    if self.num_initial < 0 or self.num_local < 1:
      raise ValueError(f"NSA needs num_initial >= 0 and num_local >= 1 (the query's own block), "
                       f"got num_initial={self.num_initial}, num_local={self.num_local}")
    if self.num_selected < self.num_initial + self.num_local:
      raise ValueError(f"NSA num_selected={self.num_selected} must be at least num_initial + "
                       f"num_local = {self.num_initial + self.num_local} (the forced blocks)")

  def num_compressed(self, length: int) -> int:
    """Compressed blocks that fit in `length` tokens: floor((L - l) / d) + 1, or 0."""
    return max(0, (length - self.block_len) // self.block_stride + 1)

  def num_select_blocks(self, length: int) -> int:
    return -(-length // self.select_block)

  def check_length(self, length: int) -> None:
    if self.num_selected > self.num_select_blocks(length):
      raise ValueError(
          f"NSA num_selected={self.num_selected} is larger than the number of selection blocks "
          f"ceil({length} / select_block={self.select_block}) = {self.num_select_blocks(length)}")


# ----------------------------------------------------------------------------- compression


def init_compress_params(key, block_len: int, head_dim: int, hidden: int) -> dict:
  """φ's parameters: pe [l, D], w1 [l·D, hidden], b1 [hidden], w2 [hidden, D], b2 [D]."""
  k1, k2, k3 = jax.random.split(key, 3)
  return dict(
      pe=0.02 * jax.random.normal(k1, (block_len, head_dim), jnp.float32),
      w1=jax.random.normal(k2, (block_len * head_dim, hidden), jnp.float32) / math.sqrt(block_len * head_dim),
      b1=jnp.zeros((hidden,), jnp.float32),
      w2=0.1 * jax.random.normal(k3, (hidden, head_dim), jnp.float32) / math.sqrt(hidden),
      b2=jnp.zeros((head_dim,), jnp.float32))


def overlapping_blocks(x, *, block_len: int, block_stride: int) -> jax.Array:
  """x: [B, L, H, D] -> [B, Nc, l, H, D], block i = tokens [i·d, i·d + l) (slices, no gather)."""
  batch, length = x.shape[:2]
  nc = max(0, (length - block_len) // block_stride + 1)
  per = block_len // block_stride
  chunks = x[:, :(nc + per - 1) * block_stride].reshape(batch, nc + per - 1, block_stride, *x.shape[2:])
  return jnp.concatenate([chunks[:, j:j + nc] for j in range(per)], axis=2)


def compress(x, params: dict, *, block_len: int, block_stride: int) -> jax.Array:
  """φ over overlapping blocks: x [B, L, H, D] -> [B, Nc, H, D], Nc = floor((L - l)/d) + 1.

  φ(block) = mean(block) + W2 gelu(W1 flatten(block + pe) + b1) + b2: an MLP on the
  position-encoded block, added to mean pooling so that training starts from it.
  """
  if x.shape[1] < block_len:
    return jnp.zeros((x.shape[0], 0, *x.shape[2:]), x.dtype)
  blocks = overlapping_blocks(x, block_len=block_len, block_stride=block_stride)
  batch, nc, l, heads, dim = blocks.shape
  w = lambda name: params[name].astype(x.dtype)
  flat = (blocks + w("pe")[None, None, :, None, :]).transpose(0, 1, 3, 2, 4).reshape(batch, nc, heads, l * dim)
  hidden = jax.nn.gelu(flat @ w("w1") + w("b1"))
  return (jnp.mean(blocks, axis=2) + hidden @ w("w2") + w("b2")).astype(x.dtype)


def compressed_positions(num_blocks: int, block_len: int, block_stride: int) -> jax.Array:
  """Position of each compressed block's last token, i·d + l - 1 -> [Nc] int32."""
  return jnp.arange(num_blocks, dtype=jnp.int32) * block_stride + block_len - 1


def overlap_matrix(num_compressed: int, num_select: int, block_len: int, block_stride: int,
                   select_block: int) -> np.ndarray:
  """M [Nc, Ns]: d-chunks shared by compressed block i and selection block j (p^slc = p^cmp M)."""
  i = np.arange(num_compressed)[:, None]
  j = np.arange(num_select)[None, :]
  per_c, per_s = block_len // block_stride, select_block // block_stride
  lo = np.maximum(i, j * per_s)
  hi = np.minimum(i + per_c, (j + 1) * per_s)
  return np.maximum(hi - lo, 0).astype(np.float32)


def rebin(p, *, num_select: int, sizes: "NSASizes") -> jax.Array:
  """p [..., Nc] -> [..., Ns]: the same as p @ overlap_matrix(...), by shifted sums (no [Nc, Ns])."""
  per_c = sizes.block_len // sizes.block_stride
  per_s = sizes.select_block // sizes.block_stride
  chunks = num_select * per_s
  nc = p.shape[-1]
  p = jnp.pad(p, [(0, 0)] * (p.ndim - 1) + [(per_c - 1, max(0, chunks - nc))])
  # chunk u holds blocks u - per_c + 1 .. u, i.e. padded indices u .. u + per_c - 1
  mass = sum(p[..., n:n + chunks] for n in range(per_c))
  return mass.reshape(*mass.shape[:-1], num_select, per_s).sum(-1)


# ----------------------------------------------------------------------------- reference


def _positions(batch: int, length: int, q_positions):
  if q_positions is None:
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  return q_positions.astype(jnp.int32)


def _masked_attention(q, k, v, mask, scale) -> jax.Array:
  """Softmax attention with a per-group mask. q [B,T,H,D], k/v [B,S,Hkv,*], mask [B,Hkv,T,S]."""
  batch, t_len, heads, dim = q.shape
  kv_heads = k.shape[2]
  qg = q.reshape(batch, t_len, kv_heads, heads // kv_heads, dim)
  logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
  mask = mask[:, :, None]
  logits = jnp.where(mask, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  p = jnp.where(mask, jnp.exp(logits - jnp.where(jnp.isfinite(row_max), row_max, 0.0)), 0.0)
  p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
  out = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32))
  return out.reshape(batch, t_len, heads, v.shape[-1]).astype(q.dtype)


def compressed_probs_reference(q, k_cmp, *, sizes: NSASizes, scale: float, q_positions=None):
  """Compression-branch probabilities -> [B, H_kv, G, T, Nc] fp32 (0 where not visible)."""
  batch, t_len, heads, dim = q.shape
  nc, kv_heads = k_cmp.shape[1], k_cmp.shape[2]
  t = _positions(batch, t_len, q_positions)
  visible = compressed_positions(nc, sizes.block_len, sizes.block_stride)[None, None] <= t[:, :, None]
  qg = q.reshape(batch, t_len, kv_heads, heads // kv_heads, dim)
  logits = jnp.einsum("btkgd,bskd->bkgts", qg, k_cmp, preferred_element_type=jnp.float32) * scale
  logits = jnp.where(visible[:, None, None], logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  p = jnp.exp(logits - jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  return p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)


def compressed_attention_reference(q, k_cmp, v_cmp, *, sizes: NSASizes, scale=None, q_positions=None):
  """Query t attends to compressed blocks ending at or before t. -> [B, T, H, Dv]; zeros before l - 1."""
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
  if k_cmp.shape[1] == 0:
    return jnp.zeros((*q.shape[:3], v_cmp.shape[-1]), q.dtype)
  p = compressed_probs_reference(q, k_cmp, sizes=sizes, scale=scale, q_positions=q_positions)
  out = jnp.einsum("bkgts,bskd->btkgd", p, v_cmp.astype(jnp.float32))
  return out.reshape(*q.shape[:3], v_cmp.shape[-1]).astype(q.dtype)


def block_importance_reference(q, k_cmp, *, sizes: NSASizes, num_select: int, scale=None,
                               q_positions=None) -> jax.Array:
  """p^slc summed over each group's heads -> [B, H_kv, T, Ns] fp32 (no gradient)."""
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
  batch, t_len = q.shape[:2]
  kv_heads = k_cmp.shape[2]
  if k_cmp.shape[1] == 0:
    return jnp.zeros((batch, kv_heads, t_len, num_select), jnp.float32)
  p = compressed_probs_reference(jax.lax.stop_gradient(q), jax.lax.stop_gradient(k_cmp),
                                 sizes=sizes, scale=scale, q_positions=q_positions)
  return rebin(p.sum(axis=2), num_select=num_select, sizes=sizes)


def select_blocks(importance, *, sizes: NSASizes, q_positions=None) -> jax.Array:
  """Top-n selection blocks per (query, group) -> [B, H_kv, T, n] int32, ascending, -1 = none.

  importance: [B, H_kv, T, Ns]. Blocks after the query's own block are never taken;
  block < num_initial and the num_local blocks ending at the query always are.
  """
  batch, kv_heads, t_len, ns = importance.shape
  t = _positions(batch, t_len, q_positions)
  current = (t // sizes.select_block)[:, None, :, None]
  j = jnp.arange(ns)[None, None, None, :]
  forced = (j < sizes.num_initial) | ((j <= current) & (current - j < sizes.num_local))
  score = jnp.where(forced, jnp.inf, jnp.where(j <= current, importance, -jnp.inf))
  values, idx = jax.lax.top_k(score, min(sizes.num_selected, ns))
  idx = jnp.where(values == -jnp.inf, ns, idx)   # ns sorts last, then becomes -1
  if sizes.num_selected > ns:                    # the layer on short sequences: every block
    idx = jnp.pad(idx, ((0, 0),) * 3 + ((0, sizes.num_selected - ns),), constant_values=ns)
  idx = jnp.sort(idx, axis=-1)
  return jnp.where(idx == ns, -1, idx).astype(jnp.int32)


def selected_attention_reference(q, k, v, block_idx, *, select_block: int, scale=None,
                                 q_positions=None) -> jax.Array:
  """Causal attention over the tokens of each group's selected blocks (dense mask).

  q [B, T, H, D], k/v [B, S, H_kv, *] (key s at position s), block_idx [B, H_kv, T, n].
  """
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
  batch, t_len = q.shape[:2]
  s_len = k.shape[1]
  ns = -(-s_len // select_block)
  chosen = jnp.any(jax.nn.one_hot(block_idx, ns, dtype=jnp.bool_), axis=-2)  # [B, Hkv, T, Ns]
  token_chosen = jnp.repeat(chosen, select_block, axis=-1)[..., :s_len]
  t = _positions(batch, t_len, q_positions)
  causal = jnp.arange(s_len)[None, None, :] <= t[:, :, None]
  return _masked_attention(q, k, v, token_chosen & causal[:, None], scale)


def window_attention_reference(q, k, v, *, window: int, scale=None, q_positions=None) -> jax.Array:
  batch, t_len = q.shape[:2]
  kv_pos = jnp.broadcast_to(jnp.arange(k.shape[1], dtype=jnp.int32), (batch, k.shape[1]))
  return full.attention_reference(q, k, v, causal=True, window=window, scale=scale,
                                  q_positions=_positions(batch, t_len, q_positions), kv_positions=kv_pos)


def combine(gates, o_cmp, o_slc, o_win) -> jax.Array:
  """gates [B, T, H, 3] (cmp, slc, win) weighting three [B, T, H, Dv] outputs."""
  g = gates.astype(jnp.float32)
  out = (g[..., 0:1] * o_cmp.astype(jnp.float32) + g[..., 1:2] * o_slc.astype(jnp.float32)
         + g[..., 2:3] * o_win.astype(jnp.float32))
  return out.astype(o_win.dtype)


def _check(q, k, v, k_cmp, v_cmp, gates, sizes: NSASizes, strict: bool = True):
  common.check_qkv(q, k, v)
  common.check_qkv(q, k_cmp, v_cmp)
  if gates.shape != (*q.shape[:3], 3):
    raise ValueError(f"gates must be [B, T, H, 3]={(*q.shape[:3], 3)}, got {gates.shape}")
  if k_cmp.shape[1] != sizes.num_compressed(k.shape[1]):
    raise ValueError(f"k_cmp has {k_cmp.shape[1]} blocks but {k.shape[1]} keys make "
                     f"{sizes.num_compressed(k.shape[1])} with l={sizes.block_len}, d={sizes.block_stride}")
  if strict:
    sizes.check_length(k.shape[1])


def nsa_reference(q, k, v, k_cmp, v_cmp, gates, *, sizes: NSASizes = NSASizes(), scale=None,
                  q_positions=None, return_selection: bool = False):
  """NSA with dense masks, everything in fp32.

  Args:
    q: [B, T, H, D]; k, v: [B, S, H_kv, D/Dv] (key s at position s); k_cmp, v_cmp:
      [B, Nc, H_kv, D/Dv] from `compress`; gates: [B, T, H, 3] in [0, 1].
    q_positions: [B, T]; default arange(T) (training: T == S).
  Returns:
    [B, T, H, Dv] (and the selected blocks [B, H_kv, T, n] if return_selection).
  """
  _check(q, k, v, k_cmp, v_cmp, gates, sizes)
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
  ns = sizes.num_select_blocks(k.shape[1])
  o_cmp = compressed_attention_reference(q, k_cmp, v_cmp, sizes=sizes, scale=scale, q_positions=q_positions)
  imp = block_importance_reference(q, k_cmp, sizes=sizes, num_select=ns, scale=scale, q_positions=q_positions)
  idx = select_blocks(imp, sizes=sizes, q_positions=q_positions)
  o_slc = selected_attention_reference(q, k, v, idx, select_block=sizes.select_block, scale=scale,
                                       q_positions=q_positions)
  o_win = window_attention_reference(q, k, v, window=sizes.window, scale=scale, q_positions=q_positions)
  out = combine(gates, o_cmp, o_slc, o_win)
  return (out, idx) if return_selection else out


# ----------------------------------------------------------------------------- fast path


def selected_attention_gather(q, k, v, block_idx, *, select_block: int, scale=None,
                              q_positions=None) -> jax.Array:
  """Same math as `selected_attention_reference`, reading only the n·l' selected keys (XLA gather)."""
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
  batch, t_len, heads, dim = q.shape
  s_len, kv_heads = k.shape[1], k.shape[2]
  ns = -(-s_len // select_block)
  pad = ns * select_block - s_len
  kb = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(batch, ns, select_block, kv_heads, dim)
  vb = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(batch, ns, select_block, kv_heads, -1)
  safe = jnp.maximum(block_idx, 0)                                           # [B, Hkv, T, n]
  take = jax.vmap(jax.vmap(lambda blocks, i: blocks[i], in_axes=(2, 0)), in_axes=(0, 0))
  k_sel = take(kb, safe)                                                     # [B, Hkv, T, n, l', D]
  v_sel = take(vb, safe)
  t = _positions(batch, t_len, q_positions)
  tok = block_idx[..., None] * select_block + jnp.arange(select_block)       # [B, Hkv, T, n, l']
  mask = (block_idx[..., None] >= 0) & (tok <= t[:, None, :, None, None]) & (tok < s_len)
  qg = q.reshape(batch, t_len, kv_heads, heads // kv_heads, dim)
  logits = jnp.einsum("btkgd,bktnsd->bktgns", qg, k_sel, preferred_element_type=jnp.float32) * scale
  logits = jnp.where(mask[:, :, :, None], logits, -jnp.inf)
  logits = logits.reshape(*logits.shape[:4], -1)
  p = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bktgs,bktsd->btkgd", p, v_sel.reshape(*v_sel.shape[:3], -1, v_sel.shape[-1]).astype(jnp.float32))
  return out.reshape(batch, t_len, heads, v.shape[-1]).astype(q.dtype)


def _nsa_xla(q, k, v, k_cmp, v_cmp, gates, *, sizes, scale, q_positions, window_implementation,
             kernel_tuning):
  del kernel_tuning
  ns = sizes.num_select_blocks(k.shape[1])
  o_cmp = compressed_attention_reference(q, k_cmp, v_cmp, sizes=sizes, scale=scale, q_positions=q_positions)
  imp = block_importance_reference(q, k_cmp, sizes=sizes, num_select=ns, scale=scale, q_positions=q_positions)
  idx = select_blocks(imp, sizes=sizes, q_positions=q_positions)
  o_slc = selected_attention_gather(q, k, v, idx, select_block=sizes.select_block, scale=scale,
                                    q_positions=q_positions)
  o_win = _window(q, k, v, sizes, scale, q_positions, window_implementation)
  return combine(gates, o_cmp, o_slc, o_win)


def _window(q, k, v, sizes, scale, q_positions, window_implementation):
  if q_positions is not None or q.shape[1] != k.shape[1]:
    return window_attention_reference(q, k, v, window=sizes.window, scale=scale, q_positions=q_positions)
  return local.local_attention(q, k, v, window=sizes.window, scale=scale,
                               implementation=window_implementation)


def _nsa_pallas(q, k, v, k_cmp, v_cmp, gates, *, sizes, scale, q_positions, window_implementation,
                kernel_tuning):
  if q_positions is not None or q.shape[1] != k.shape[1]:
    raise NotImplementedError("implementation='pallas' is self-attention (T == S) without q_positions")
  from pallas_kernels import nsa as nsa_kernels  # pylint: disable=g-import-not-at-top
  tuning = nsa_kernels.Tuning() if kernel_tuning is None else kernel_tuning
  o_cmp, o_slc = nsa_kernels.nsa_cmp_slc(q, k, v, k_cmp, v_cmp, sizes=sizes, scale=scale, tuning=tuning)
  window = lambda q, k, v: _window(q, k, v, sizes, scale, None, window_implementation)
  o_win = (nsa_kernels.on_stream(window, 1) if tuning.branch_streams else window)(q, k, v)
  return combine(gates, o_cmp, o_slc, o_win)


def _nsa_ref(q, k, v, k_cmp, v_cmp, gates, *, sizes, scale, q_positions, window_implementation,
             kernel_tuning):
  del window_implementation, kernel_tuning
  return nsa_reference(q, k, v, k_cmp, v_cmp, gates, sizes=sizes, scale=scale, q_positions=q_positions)


IMPLEMENTATIONS = {"xla": _nsa_xla, "pallas": _nsa_pallas, "reference": _nsa_ref}


def nsa(q, k, v, k_cmp, v_cmp, gates, *, sizes: NSASizes = NSASizes(), scale=None, q_positions=None,
        implementation: str | Sequence[str] | None = None, window_implementation=None,
        kernel_tuning=None, strict: bool = True) -> jax.Array:
  """NSA through the chosen implementation; same math as `nsa_reference`.

  implementation: "pallas" (GPU kernels; interpret mode on CPU), "xla", "reference",
  a sequence tried in order, or None (GPU: pallas then xla; CPU: xla).
  window_implementation: passed to `local.local_attention` for the window branch.
  kernel_tuning: a `pallas_kernels.nsa.Tuning` for implementation "pallas" (launch shapes and kernel
    paths, e.g. `Tuning(sel_dq_from_ds=True)`); None = its defaults. The others ignore it.
  strict: raise when n exceeds the number of selection blocks; the layer passes
    False so that sequences shorter than n·l' select every block.
  """
  _check(q, k, v, k_cmp, v_cmp, gates, sizes, strict)
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
  if implementation is None:
    implementation = ("pallas", "xla") if jax.default_backend() == "gpu" else "xla"
  return full.dispatch(IMPLEMENTATIONS, implementation, q, k, v, k_cmp, v_cmp, gates, what="nsa",
                       sizes=sizes, scale=scale, q_positions=q_positions,
                       window_implementation=window_implementation, kernel_tuning=kernel_tuning)


# ----------------------------------------------------------------------------- decode


def init_nsa_cache(batch: int, capacity: int, num_kv_heads: int, head_dim: int, sizes: NSASizes,
                   dtype) -> dict:
  """Raw KV (k, v, pos as `full.init_kv_cache`, no ring) plus compressed kc, vc [B, Nc_max, H_kv, D]."""
  cache = full.init_kv_cache(batch, capacity, num_kv_heads, head_dim, dtype)
  nc = max(1, sizes.num_compressed(capacity))
  shape = (batch, nc, num_kv_heads, head_dim)
  return dict(cache, kc=jnp.zeros(shape, dtype), vc=jnp.zeros(shape, dtype))


def update_compressed(cache: dict, positions, compress_fn, sizes: NSASizes) -> dict:
  """Appends the compressed tokens of the blocks that end at one of `positions` [B, T].

  compress_fn(blocks [B, n, l, H_kv, D], which: "k" | "v") -> [B, n, H_kv, D]. Block i
  ends at i·d + l - 1; a chunk of T tokens completes at most ceil(T/d) blocks.
  """
  l, d = sizes.block_len, sizes.block_stride
  nc_max = cache["kc"].shape[1]
  t_len = positions.shape[1]
  count = min(-(-t_len // d), nc_max)
  last = positions[:, -1]                                             # [B]
  newest = (last - l + 1) // d                                        # last completed block
  ids = newest[:, None] - jnp.arange(count - 1, -1, -1)[None, :]      # [B, count]
  first_new = (positions[:, 0] - l + 1 + d - 1) // d                  # first block ending in chunk
  valid = (ids >= 0) & (ids >= first_new[:, None]) & (ids < nc_max)
  starts = jnp.clip(ids, 0, None) * d
  gather = jax.vmap(jax.vmap(lambda x, s: jax.lax.dynamic_slice_in_dim(x, s, l, axis=0), (None, 0)), (0, 0))
  safe = jnp.clip(ids, 0, nc_max - 1)
  batch_idx = jnp.arange(positions.shape[0])[:, None]
  new = {}
  for name, src in (("kc", "k"), ("vc", "v")):
    blocks = gather(cache[src], starts)                                # [B, count, l, H, D]
    comp = compress_fn(blocks, src).astype(cache[name].dtype)
    old = cache[name][batch_idx, safe]
    new[name] = cache[name].at[batch_idx, safe].set(jnp.where(valid[..., None, None], comp, old))
  return dict(cache, **new)


def cached_nsa(q, k, v, gates, positions, cache: dict, *, compress_fn, sizes: NSASizes, scale=None,
               implementation=None):
  """NSA of T new tokens over the cache plus themselves -> (out [B, T, H, Dv], new cache).

  Reads only what NSA needs: compressed KV, the n selected blocks (gathered) and the
  last w + T - 1 raw tokens. Equals the forward at the same positions.
  implementation: as `decode_attention`.
  """
  cache = dict(cache, **full.write_kv_cache(cache, k, v, positions))
  cache = update_compressed(cache, positions, compress_fn, sizes)
  return decode_attention(q, gates, positions, cache, sizes=sizes, scale=scale,
                          implementation=implementation), cache


def _decode_pallas(q, gates, positions, cache, *, sizes, scale):
  from pallas_kernels import nsa_decode  # pylint: disable=g-import-not-at-top
  if cache["k"].dtype != q.dtype or cache["kc"].dtype != q.dtype:
    cache = {name: cache[name].astype(q.dtype) for name in ("k", "v", "kc", "vc")}
  return nsa_decode.nsa_decode(q, gates, positions, cache, sizes=sizes, scale=scale)


def decode_attention(q, gates, positions, cache: dict, *, sizes: NSASizes, scale=None,
                     implementation: str | Sequence[str] | None = None) -> jax.Array:
  """NSA of queries at `positions` [B, T] over a filled cache (reads only) -> [B, T, H, Dv].

  implementation: "pallas" (pallas_kernels/nsa_decode.py: one token per sequence,
  3 launches), "xla", a sequence tried in order, or None (GPU: pallas then xla;
  CPU: xla). "pallas" raises NotImplementedError for T > 1 (a prompt chunk).
  """
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
  if implementation is None:
    implementation = ("pallas", "xla") if jax.default_backend() == "gpu" else "xla"
  return full.dispatch(DECODE_IMPLEMENTATIONS, implementation, q, gates, positions, cache,
                       what="nsa decode", sizes=sizes, scale=scale)


def _decode_xla(q, gates, positions, cache: dict, *, sizes: NSASizes, scale) -> jax.Array:
  """`decode_attention` in XLA: compressed attention, importance, top-n, gathered blocks, window."""
  capacity = cache["k"].shape[1]
  k_all, v_all = cache["k"].astype(q.dtype), cache["v"].astype(q.dtype)
  kc, vc = cache["kc"].astype(q.dtype), cache["vc"].astype(q.dtype)
  ns = sizes.num_select_blocks(capacity)
  if sizes.num_compressed(capacity) == 0:
    kc, vc = kc[:, :0], vc[:, :0]
  o_cmp = compressed_attention_reference(q, kc, vc, sizes=sizes, scale=scale, q_positions=positions)
  imp = block_importance_reference(q, kc, sizes=sizes, num_select=ns, scale=scale, q_positions=positions)
  idx = select_blocks(imp, sizes=sizes, q_positions=positions)
  o_slc = selected_attention_gather(q, k_all, v_all, idx, select_block=sizes.select_block, scale=scale,
                                    q_positions=positions)
  span = min(capacity, sizes.window + q.shape[1] - 1)
  start = jnp.clip(positions[:, -1] + 1 - span, 0, capacity - span)
  cut = jax.vmap(lambda x, s: jax.lax.dynamic_slice_in_dim(x, s, span, axis=0))
  kv_pos = start[:, None] + jnp.arange(span, dtype=jnp.int32)[None]
  o_win = full.attention_reference(q, cut(k_all, start), cut(v_all, start), causal=True,
                                   window=sizes.window, scale=scale, q_positions=positions,
                                   kv_positions=kv_pos)
  return combine(gates, o_cmp, o_slc, o_win)


DECODE_IMPLEMENTATIONS = {"xla": _decode_xla, "pallas": _decode_pallas}


# ----------------------------------------------------------------------------- module


class Compressor(nnx.Module):
  """φ's parameters (see `compress`)."""

  def __init__(self, sizes: NSASizes, head_dim: int, hidden: int, *, rngs: nnx.Rngs):
    init = init_compress_params(rngs.params(), sizes.block_len, head_dim, hidden)
    self.pe, self.w1, self.b1, self.w2, self.b2 = (nnx.Param(init[n]) for n in ("pe", "w1", "b1", "w2", "b2"))
    self.sizes = sizes

  def params(self) -> dict:
    return dict(pe=self.pe[...], w1=self.w1[...], b1=self.b1[...], w2=self.w2[...], b2=self.b2[...])

  def compress(self, x) -> jax.Array:
    """x [B, L, H_kv, D] -> [B, Nc, H_kv, D]."""
    return compress(x, self.params(), block_len=self.sizes.block_len, block_stride=self.sizes.block_stride)


class NSAttention(nnx.Module):
  """NSA layer: q/k/v/o projections, RoPE, φ for keys and values, per-head gate MLP.

  Training: `nsa(...)` on the whole sequence (segment_ids are not supported).
  Decoding: a raw KV cache of `capacity` tokens plus the compressed KV; one-token steps
  go through the fused Pallas decode on GPU (`decode_attention`'s default).
  """

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
               rngs: nnx.Rngs, sizes: NSASizes = NSASizes(), compress_hidden: int | None = None,
               gate_hidden: int = 64, rope_base: float = 10_000.0, qk_norm: bool = False,
               implementation=None, kernel_tuning=None, dtype=jnp.float32):
    """kernel_tuning: a `pallas_kernels.nsa.Tuning` for the Pallas training path (None: defaults)."""
    if not isinstance(sizes, NSASizes):
      raise TypeError(f"sizes must be an NSASizes, got {type(sizes).__name__}")
    full.init_projections(self, d_model, num_heads, num_kv_heads, head_dim, rngs=rngs,
                          qk_norm=qk_norm)
    init = nnx.initializers.lecun_normal()
    self.wg1 = nnx.Param(init(rngs.params(), (d_model, gate_hidden)))
    self.wg2 = nnx.Param(0.1 * init(rngs.params(), (gate_hidden, num_heads * 3)))
    self.bg2 = nnx.Param(jnp.zeros((num_heads * 3,), jnp.float32))
    hidden = compress_hidden or 2 * head_dim
    self.phi_k = Compressor(sizes, head_dim, hidden, rngs=rngs)
    self.phi_v = Compressor(sizes, head_dim, hidden, rngs=rngs)
    self.sizes = sizes
    self.rope_base = rope_base
    self.implementation = implementation
    self.kernel_tuning = kernel_tuning
    self.dtype = dtype

  @classmethod
  def from_model_config(cls, cfg, rngs: nnx.Rngs) -> "NSAttention":
    """From `lca.model.ModelConfig` (its `nsa_*` fields); bad sizes or kernel tuning raise ValueError."""
    from pallas_kernels import nsa as nsa_kernels  # pylint: disable=g-import-not-at-top
    sizes = NSASizes(block_len=cfg.nsa_block_len, block_stride=cfg.nsa_block_stride,
                     select_block=cfg.nsa_select_block, num_selected=cfg.nsa_num_selected,
                     window=cfg.nsa_window, num_initial=cfg.nsa_num_initial,
                     num_local=cfg.nsa_num_local)
    return cls(cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, rngs=rngs, sizes=sizes,
               compress_hidden=cfg.nsa_compress_hidden or None, gate_hidden=cfg.nsa_gate_hidden,
               rope_base=cfg.rope_base, qk_norm=cfg.qk_norm, implementation=cfg.implementation,
               kernel_tuning=nsa_kernels.Tuning.from_string(cfg.nsa_kernel_tuning),
               dtype=cfg.compute_dtype)

  def init_cache(self, batch: int, capacity: int, dtype=None) -> dict:
    return init_nsa_cache(batch, capacity, self.num_kv_heads, self.head_dim, self.sizes,
                          dtype or self.dtype)

  def cache_bytes_per_token(self, context: int, bytes_per_value: int = 2) -> float:
    """Raw KV plus one compressed key and value per d tokens."""
    compressed = self.sizes.num_compressed(context) / max(context, 1)
    return 2 * self.num_kv_heads * self.head_dim * bytes_per_value * (1 + compressed)

  def gates(self, x) -> jax.Array:
    """Per-head sigmoid gates (cmp, slc, win) -> [B, L, H, 3]."""
    w = lambda param: param[...].astype(self.dtype)
    h = jax.nn.silu(x @ w(self.wg1))
    g = jax.nn.sigmoid(h @ w(self.wg2) + w(self.bg2))
    return g.reshape(*x.shape[:2], self.num_heads, 3)

  def compress_blocks(self, blocks, which: str) -> jax.Array:
    """blocks [B, n, l, H_kv, D] (each one whole block) -> [B, n, H_kv, D]."""
    batch, n, l = blocks.shape[:3]
    flat = blocks.reshape(batch, n * l, *blocks.shape[3:])
    phi = self.phi_k if which == "k" else self.phi_v
    return compress(flat, phi.params(), block_len=l, block_stride=l)

  def __call__(self, x, positions, *, cache: dict | None = None, segment_ids=None):
    """x: [B, L, d_model], positions: [B, L] -> ([B, L, d_model], new cache or None)."""
    if segment_ids is not None:
      raise NotImplementedError("NSAttention does not support segment_ids (packed sequences)")
    batch, length, _ = x.shape
    x = x.astype(self.dtype)
    q, k, v = full.project_qkv(self, x, positions)
    gates = self.gates(x)

    if cache is None:
      k_cmp, v_cmp = self.phi_k.compress(k), self.phi_v.compress(v)
      out = nsa(q, k, v, k_cmp, v_cmp, gates, sizes=self.sizes, implementation=self.implementation,
                kernel_tuning=self.kernel_tuning, strict=False)
    else:
      out, cache = cached_nsa(q, k, v, gates, positions, cache, compress_fn=self.compress_blocks,
                              sizes=self.sizes)
    out = out.reshape(batch, length, self.num_heads * self.head_dim)
    return out @ self.wo[...].astype(self.dtype), cache
