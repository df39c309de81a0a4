"""DeepSeek Sparse Attention (DSA, DeepSeek-V3.2-Exp): lightning indexer + top-k tokens.

  I(t, s) = sum_j w(t, j) * ReLU(q_I(t, j) . k_I(s))       (H_I indexer heads of dim d_I)
  S_t     = top-k_s I(t, s) over the visible keys s          (k capped by the visible count)
  u_t     = Attn(q_t, {k_s, v_s : s in S_t})                (one index set for every head)

Indexer keys are shared by all indexer heads (MQA-like); the weights w come from the
query token. The main attention is MHA/GQA here; with num_kv_heads == 1 it is the
MQA form of MLA, where one gathered KV row serves every query head.

Faces, in order of trust:
  indexer_scores_reference / indexer_scores(..., implementation=)   [B, L, S] scores
  top_k_indices(scores, top_k)                                      [B, L, K] int32, -1 = none
  top_k_select(scores, top_k, implementation=)                      the same set, fast ("pallas":
                                                                    threshold search, any order)
  indexer_top_k(..., implementation=, chunk=)                       scores + top-k per query
                                                                    chunk, never [L, S] at once
  sparse_attention_reference (dense masking) / sparse_attention(..., implementation=)
  dsa_attention_reference / dsa_attention                           the three above chained
  quantize_index_keys -> FP8Keys                                    FP8 keys quantized once (the
                                                                    decode cache); accepted as k_idx
  indexer_kl_dense / indexer_kl_sparse                              the two training stages' losses
  DSAttention(nnx.Module)                                           layer kind "D", KV + indexer-key cache
  MLASparseAttention(mla.MLAttention)                               layer kind "S": V3.2, MLA's absorbed
                                                                    form over the top-k (latent cache)

Training from a dense checkpoint (the report): stage 1 ("dense warm-up", `stage=1`):
main attention dense, main model frozen, indexer trained with KL(p_t || softmax(I_t));
stage 2 ("sparse", `stage=2`): top-k attention, all parameters trained, the KL taken
over the selected set only. The indexer's input is always detached from the main
graph and the target p_t is a constant, so the KL only ever trains the indexer and
the LM loss never reaches it (top-k is not differentiable).
"""

from collections.abc import Sequence
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lca.attention import common, full, mla
from lca.layers import rope

FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0          # largest finite float8_e4m3fn
FP8_BLOCK = 128          # values per quantization scale (DeepSeek: one scale per 128)


# ----------------------------------------------------------------------------- checks


def check_indexer(q_idx, k_idx, weights) -> None:
  """q_idx [B, L, H_I, d_I], k_idx [B, S, d_I], weights [B, L, H_I]; raises naming the argument."""
  if q_idx.ndim != 4:
    raise ValueError(f"q_idx must be [batch, seq, index_heads, index_dim], got shape {q_idx.shape}")
  if k_idx.ndim != 3:
    raise ValueError(f"k_idx must be [batch, seq, index_dim] (one key per token), got shape {k_idx.shape}")
  if weights.shape != q_idx.shape[:3]:
    raise ValueError(f"weights must be [batch, seq, index_heads]={q_idx.shape[:3]}, got {weights.shape}")
  if k_idx.shape[0] != q_idx.shape[0] or k_idx.shape[2] != q_idx.shape[3]:
    raise ValueError(f"k_idx {k_idx.shape} does not match q_idx {q_idx.shape} on batch or index_dim")


def check_top_k(top_k) -> None:
  if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k <= 0:
    raise ValueError(f"top_k must be a positive int, got top_k={top_k!r}")


def check_indices(q, k, indices) -> None:
  if indices.ndim != 3 or indices.shape[:2] != q.shape[:2]:
    raise ValueError(f"indices must be [batch, q_seq, top_k] with [batch, q_seq]={q.shape[:2]}, "
                     f"got {indices.shape}")
  if not jnp.issubdtype(indices.dtype, jnp.integer):
    raise TypeError(f"indices must be integers, got {indices.dtype}")


def check_k_rope(q, k, v, k_rope) -> None:
  """MLA's split key: k_rope [B, S, H_kv, R] beside k [B, S, H_kv, D], q [B, L, H, D + R], v is k."""
  if v is not k:
    raise ValueError("with k_rope, v must be k (MLA's latent is both the key's first part and the value: "
                     "the shared form)")
  if k_rope.ndim != 4 or k_rope.shape[:3] != k.shape[:3] or k_rope.dtype != k.dtype:
    raise ValueError(f"k_rope must be [batch, seq, kv_heads, rope_dim] with k's {k.shape[:3]} and "
                     f"dtype {k.dtype}, got {k_rope.shape} {k_rope.dtype}")
  if q.ndim != 4 or q.shape[-1] != k.shape[-1] + k_rope.shape[-1]:
    raise ValueError(f"with k_rope, q's head dim must be k's + k_rope's = {k.shape[-1]} + "
                     f"{k_rope.shape[-1]}, got q {q.shape}")


def _positions(batch, q_len, kv_len, q_positions, kv_positions):
  default_q, default_kv = common.default_positions(batch, q_len, kv_len)
  return (default_q if q_positions is None else q_positions,
          default_kv if kv_positions is None else kv_positions)


def visible_mask(batch, q_len, kv_len, q_positions=None, kv_positions=None, segment_ids=None,
                 kv_segment_ids=None) -> jax.Array:
  """Causal (+ segment, + empty-slot) visibility -> bool [B, Lq, Lk]."""
  q_positions, kv_positions = _positions(batch, q_len, kv_len, q_positions, kv_positions)
  if segment_ids is not None and kv_segment_ids is None:
    kv_segment_ids = segment_ids
  return common.attention_mask(q_positions, kv_positions, causal=True,
                               q_segment_ids=segment_ids, kv_segment_ids=kv_segment_ids)


# ----------------------------------------------------------------------------- FP8


@functools.lru_cache(maxsize=None)
def hadamard_matrix(dim: int) -> np.ndarray:
  """Normalized Sylvester-Hadamard matrix [dim, dim] (orthogonal); dim a power of two."""
  if dim <= 0 or dim & (dim - 1):
    raise ValueError(f"a Hadamard rotation needs a power-of-two dim, got {dim}")
  h = np.ones((1, 1), np.float32)
  while h.shape[0] < dim:
    h = np.block([[h, h], [h, -h]])
  return h / np.sqrt(dim)


def quantize_fp8(x: jax.Array, block: int = FP8_BLOCK):
  """x [..., D] -> (x8 float8_e4m3fn [..., D], scale float32 [..., D/block]).

  One scale per `block` consecutive values (block = min(128, D)): x ~ x8 * scale.
  """
  dim = x.shape[-1]
  block = min(block, dim)
  if dim % block:
    raise ValueError(f"FP8 quantization needs index_dim % {block} == 0, got index_dim={dim}")
  xb = x.astype(jnp.float32).reshape(*x.shape[:-1], dim // block, block)
  scale = jnp.maximum(jnp.max(jnp.abs(xb), axis=-1), 1e-12) / FP8_MAX
  x8 = (xb / scale[..., None]).astype(FP8).reshape(x.shape)
  return x8, scale


class FP8Keys(NamedTuple):
  """Indexer keys rotated and quantized once (`quantize_index_keys`): the FP8 key cache.

  values [B, S, d_I] float8_e4m3fn, scale [B, S, nb] float32 (nb = d_I / 128, 1 for
  d_I <= 128). Accepted wherever k_idx is (implies fp8=True); `.shape` is values'.
  """
  values: jax.Array
  scale: jax.Array

  @property
  def shape(self):
    return self.values.shape

  @property
  def ndim(self):
    return self.values.ndim


def _rotate(x):
  """Hadamard rotation of the last axis (when d_I is a power of two; identity otherwise), f32.

  bf16 / f16 inputs are multiplied by the +-1 matrix in their own dtype (exact products, f32
  sums) and scaled after: on a GPU that is a 16-bit tensor-core matmul instead of an f32 one,
  which XLA runs in TF32 and so rounds the normalized matrix's entries to 11 bits (H200, the
  FP8 indexer's queries at 128k: 5.9 vs 6.7 ms over all chunks, the same fp8 codes but for
  ~2e-6 of them; experiments/probe_dsa_baseline.py, session 23)."""
  dim = x.shape[-1]
  if dim & (dim - 1):
    return x.astype(jnp.float32)
  if x.dtype in (jnp.bfloat16, jnp.float16):
    signs = jnp.asarray(hadamard_matrix(dim) * np.sqrt(dim), x.dtype)   # exactly +-1
    return jnp.matmul(x, signs, preferred_element_type=jnp.float32) * np.float32(dim ** -0.5)
  return x.astype(jnp.float32) @ jnp.asarray(hadamard_matrix(dim))


def quantize_index_keys(k_idx) -> FP8Keys:
  """k_idx [B, S, d_I] -> FP8Keys: rotated, float8_e4m3fn + per-block scale (idempotent)."""
  if isinstance(k_idx, FP8Keys):
    return k_idx
  return FP8Keys(*quantize_fp8(_rotate(k_idx)))


def dequantize_index_keys(keys: FP8Keys) -> jax.Array:
  """FP8Keys -> approximate k_idx [B, S, d_I] float32 (rotation undone: H is symmetric orthogonal)."""
  v = keys.values.astype(jnp.float32)
  nb = keys.scale.shape[-1]
  v = (v.reshape(*v.shape[:-1], nb, -1) * keys.scale[..., None]).reshape(v.shape)
  return _rotate(v)


def fp8_operands(q_idx, k_idx, weights):
  """The FP8 indexer's inputs: Hadamard-rotate (when d_I is a power of two), quantize.

  k_idx may be FP8Keys (already quantized: used as is). Returns q8 [B, L, H_I, d_I],
  q_scale [B, L, H_I, nb], k8 [B, S, d_I], k_scale [B, S, nb] (nb = d_I / 128 blocks,
  1 for d_I <= 128) and weights as float32.
  """
  q8, q_scale = quantize_fp8(_rotate(q_idx))
  k8, k_scale = quantize_index_keys(k_idx)
  return q8, q_scale, k8, k_scale, weights.astype(jnp.float32)


def _resolve_fp8(k_idx, fp8):
  """FP8Keys imply fp8 (an explicit fp8=False is an error); None -> `default_fp8()`."""
  if isinstance(k_idx, FP8Keys):
    if fp8 is False:
      raise ValueError("k_idx is FP8Keys (quantized keys): fp8 must be True or None, got fp8=False")
    return True
  return default_fp8() if fp8 is None else bool(fp8)


# ----------------------------------------------------------------------------- indexer


def _dot_scores(q, k):
  """q [B, L, H_I, d], k [B, S, d] -> per-head logits [B, L, H_I, S] float32."""
  return jnp.einsum("bthd,bsd->bths", q, k, preferred_element_type=jnp.float32)


def _mask_scores(scores, mask):
  return jnp.where(mask, scores, -jnp.inf)


def indexer_scores_reference(q_idx, k_idx, weights, *, q_positions=None, kv_positions=None,
                             segment_ids=None, kv_segment_ids=None, fp8: bool = False) -> jax.Array:
  """Lightning-indexer scores, the obvious way.

  Args:
    q_idx: [B, L, H_I, d_I] indexer queries (RoPE already applied).
    k_idx: [B, S, d_I] indexer keys, shared by all indexer heads.
    weights: [B, L, H_I] per-query head weights (scale H_I^-1/2 d_I^-1/2 included).
    q_positions, kv_positions, segment_ids, kv_segment_ids: as `full.attention_reference`.
    fp8: emulate the FP8 path exactly: rotate, quantize to e4m3 with per-128 scales,
      products of the fp8 values accumulated in fp32. k_idx may be FP8Keys (implies fp8).
  Returns:
    I [B, L, S] float32; -inf where the key is not visible (future, other segment, empty).
  """
  check_indexer(q_idx, k_idx, weights)
  batch, q_len = q_idx.shape[:2]
  mask = visible_mask(batch, q_len, k_idx.shape[1], q_positions, kv_positions, segment_ids,
                      kv_segment_ids)
  if _resolve_fp8(k_idx, fp8):
    q8, q_scale, k8, k_scale, weights = fp8_operands(q_idx, k_idx, weights)
    nb = q_scale.shape[-1]
    qb = q8.astype(jnp.float32).reshape(*q8.shape[:3], nb, -1)
    kb = k8.astype(jnp.float32).reshape(*k8.shape[:2], nb, -1)
    per_block = jnp.einsum("bthnd,bsnd->bthsn", qb, kb)
    logits = jnp.einsum("bthsn,bthn,bsn->bths", per_block, q_scale, k_scale)
  else:
    logits = _dot_scores(q_idx, k_idx)
  scores = jnp.einsum("bths,bth->bts", jax.nn.relu(logits), weights.astype(jnp.float32))
  return _mask_scores(scores, mask)


def _xla_scores(q_idx, k_idx, weights, *, fp8, **mask_kw):
  """Same math as the reference; FP8 with one block per vector uses fp8 operands directly
  (cuBLASLt / the MMA units on GPU) and folds the scales out of the ReLU (they are > 0)."""
  if not _resolve_fp8(k_idx, fp8):
    return indexer_scores_reference(q_idx, k_idx, weights, fp8=False, **mask_kw)
  q8, q_scale, k8, k_scale, w = fp8_operands(q_idx, k_idx, weights)
  if q_scale.shape[-1] != 1:
    return indexer_scores_reference(q_idx, k_idx, weights, fp8=True, **mask_kw)
  logits = _dot_scores(q8, k8)
  scores = jnp.einsum("bths,bth->bts", jax.nn.relu(logits), w * q_scale[..., 0]) * k_scale[:, None, :, 0]
  batch, q_len = q_idx.shape[:2]
  return _mask_scores(scores, visible_mask(batch, q_len, k_idx.shape[1], **mask_kw))


def _pallas_scores(q_idx, k_idx, weights, *, fp8, q_positions, kv_positions, segment_ids,
                   kv_segment_ids, score_dtype=jnp.float32, fill_future=True):
  try:
    from pallas_kernels import dsa_indexer  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise NotImplementedError("implementation='pallas': pallas_kernels.dsa_indexer is not available") from e
  if segment_ids is not None or kv_segment_ids is not None:
    raise NotImplementedError("implementation='pallas' indexer does not take segment_ids")
  q_positions = _positions(q_idx.shape[0], q_idx.shape[1], k_idx.shape[1], q_positions, None)[0]
  # kv_positions None stays None: the kernels' default (key s at position s)
  return dsa_indexer.indexer_scores(q_idx, k_idx, weights, q_positions, kv_positions, fp8=fp8,
                                    out_dtype=score_dtype, fill_future=fill_future)


def _rounded(fn):
  """An fp32 scorer that also takes score_dtype (its fp32 scores rounded once, as the kernel
  writes them) and fill_future (it always fills)."""
  def run(*args, score_dtype=jnp.float32, fill_future=True, **kw):
    del fill_future
    return fn(*args, **kw).astype(score_dtype)
  return run


INDEXER_IMPLEMENTATIONS = {
    "reference": _rounded(lambda *a, **kw: indexer_scores_reference(*a, **kw)),
    "xla": _rounded(_xla_scores),
    "pallas": _pallas_scores,
}


def default_fp8() -> bool:
  """The FP8 indexer is the default on GPU (as in DeepSeek), bf16/fp32 elsewhere."""
  return jax.default_backend() == "gpu"


def _index_defaults():
  return ("pallas", "xla") if jax.default_backend() == "gpu" else ("xla",)


def selection_dtype(fp8: bool):
  """The dtype the top-k selects on: bfloat16 scores on the FP8 path, float32 otherwise.

  bf16 rounding (2e-3 relative on random scores, d_I = 128) is 20x below the FP8 indexer's own
  error (e4m3 operands: 4e-2), so it only reorders near-ties that fp8 already blurs: on random
  inputs the top-32 sets of the fp8 scores, rounded or not, overlap the exact fp32 sets alike
  (97%; tests/test_dsa.py). It halves the [chunk, S] score buffer and the top-k's bytes and
  passes (16-bit keys; NOTES_dsa.md, session 9). Ties go to the lower position.
  """
  return jnp.bfloat16 if fp8 else jnp.float32


def indexer_scores(q_idx, k_idx, weights, *, q_positions=None, kv_positions=None,
                   segment_ids=None, kv_segment_ids=None, fp8: bool | None = None,
                   score_dtype=jnp.float32, fill_future: bool = True,
                   implementation: str | Sequence[str] | None = None) -> jax.Array:
  """Indexer scores [B, L, S] score_dtype through "pallas", "xla" or "reference" (same math).

  fp8: None = `default_fp8()` (on GPU); k_idx FP8Keys (quantized once) implies fp8.
  score_dtype: the fp32 sums rounded once to this dtype (float32 or bfloat16).
  fill_future False: the "pallas" kernel may leave entries past every query of their tile
  unwritten (undefined, not -inf): only for a reader of entries before each query's t + 1.
  implementation None: GPU pallas then xla; CPU xla.
  """
  check_indexer(q_idx, k_idx, weights)
  if jnp.dtype(score_dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    raise ValueError(f"score_dtype must be float32 or bfloat16, got score_dtype={score_dtype!r}")
  fp8 = _resolve_fp8(k_idx, fp8)
  return full.dispatch(INDEXER_IMPLEMENTATIONS, implementation or _index_defaults(), q_idx, k_idx,
                       weights, fp8=fp8, q_positions=q_positions, kv_positions=kv_positions,
                       segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                       score_dtype=score_dtype, fill_future=fill_future, what="DSA indexer")


# ----------------------------------------------------------------------------- top-k


def top_k_indices(scores: jax.Array, top_k: int) -> jax.Array:
  """scores [B, L, S] (-inf = not visible) -> indices [B, L, K] int32, K = min(top_k, S).

  Sorted by descending score; slots beyond the visible count (k capped by t+1) are -1.
  """
  check_top_k(top_k)
  k = min(int(top_k), scores.shape[-1])
  if scores.dtype.itemsize < 4:   # exact in fp32; lax.top_k sorts bf16 2x slower (38 vs 19 ms, H100)
    scores = scores.astype(jnp.float32)
  values, indices = jax.lax.top_k(scores, k)
  return jnp.where(jnp.isfinite(values), indices, -1).astype(jnp.int32)


def _lengths_masked(scores, lengths):
  if lengths is None:
    return scores
  cols = jnp.arange(scores.shape[-1], dtype=jnp.int32)
  return jnp.where(cols < jnp.asarray(lengths)[..., None], scores, -jnp.inf)


def _xla_top_k(scores, top_k, *, lengths=None):
  return top_k_indices(_lengths_masked(scores, lengths), top_k)


def _pallas_top_k(scores, top_k, *, lengths=None):
  try:
    from pallas_kernels import dsa_topk  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise NotImplementedError("implementation='pallas': pallas_kernels.dsa_topk is not available") from e
  return dsa_topk.top_k(scores, int(top_k), lengths=lengths)


TOPK_KERNEL_MIN_ROWS = 64   # default top-k on GPU: the kernel from this many rows, or for rows
                            # long enough to sample (decode: the segmented collection), else lax.top_k


def _kernel_samples(width: int, dtype, top_k: int) -> bool:
  """Whether the top-k kernel's default launch samples rows of this width (longer than its capacity)."""
  try:
    from pallas_kernels import dsa_topk  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return dsa_topk.samples(width, dtype, top_k)


TOP_K_IMPLEMENTATIONS = {
    "xla": _xla_top_k,              # lax.top_k: a sort, indices by descending score
    "pallas": _pallas_top_k,        # threshold search + compaction, indices by position
}


def top_k_select(scores: jax.Array, top_k: int, *, lengths: jax.Array | None = None,
                 implementation: str | Sequence[str] | None = None) -> jax.Array:
  """The selected set of `top_k_indices`, through "pallas" (threshold search) or "xla".

  scores [B, L, S] (-inf = not visible); lengths [B, L] (optional): keys at or beyond
  it are treated as not visible (and the kernel does not read them). Returns
  [B, L, K] int32, K = min(top_k, S), -1 = none. The set equals `top_k_indices`'s
  (ties aside) but the order may differ: "pallas" lists positions in ascending order,
  its -1 slots last. None: on GPU the kernel for >= TOPK_KERNEL_MIN_ROWS rows (prefill
  chunks: 11x faster than lax.top_k at [2048, 128k]) and for fewer rows longer than the
  kernel's capacity (decode from ~6k keys: the collection split over segments; one bf16
  row on an H200: ~0.03 ms at 16k-128k, lax.top_k 0.06-0.09); lax.top_k for few short
  rows; CPU xla.
  """
  check_top_k(top_k)
  if implementation is None and jax.default_backend() == "gpu":
    rows = math.prod(scores.shape[:-1])
    kernel = rows >= TOPK_KERNEL_MIN_ROWS or _kernel_samples(scores.shape[-1], scores.dtype, int(top_k))
    implementation = ("pallas", "xla") if kernel else ("xla",)
  return full.dispatch(TOP_K_IMPLEMENTATIONS, implementation or _index_defaults(), scores,
                       int(top_k), lengths=lengths, what="DSA top-k")


def _query_chunks(length: int, chunk: int | None) -> int:
  return length if chunk is None or chunk >= length else chunk


def indexer_top_k(q_idx, k_idx, weights, *, top_k: int, q_positions=None, kv_positions=None,
                  segment_ids=None, kv_segment_ids=None, fp8: bool | None = None,
                  chunk: int | None = None, implementation=None,
                  topk_implementation=None, score_dtype=None) -> jax.Array:
  """Top-k key indices per query -> [B, L, K] int32 (-1 = none), never holding all [L, S].

  Queries are processed `chunk` at a time (all at once for None): scores for a chunk
  [B, chunk, S], then its top-k (`top_k_select` with topk_implementation; the order of
  a row's indices depends on it). Memory is O(chunk * S) instead of O(L * S). With
  the default key positions (0..S-1) query t's keys beyond t are not read by the top-k.
  FP8: the keys are rotated and quantized once here (or passed as FP8Keys), not per chunk.
  score_dtype: what the top-k selects on; None: `selection_dtype(fp8)` (bf16 on the FP8 path).
  """
  check_indexer(q_idx, k_idx, weights)
  check_top_k(top_k)
  fp8 = _resolve_fp8(k_idx, fp8)
  score_dtype = selection_dtype(fp8) if score_dtype is None else score_dtype
  if fp8:
    k_idx = quantize_index_keys(k_idx)
  batch, length = q_idx.shape[:2]
  default_kv = kv_positions is None
  q_positions, kv_positions = _positions(batch, length, k_idx.shape[1], q_positions, kv_positions)
  if segment_ids is not None and kv_segment_ids is None:
    kv_segment_ids = segment_ids

  def one(q, w, qp, seg):
    # with the default key positions the top-k reads each row only below t + 1 (`lengths`), so
    # the kernel need not write the wholly-future tiles: half its writes at prefill
    scores = indexer_scores(q, k_idx, w, q_positions=qp, kv_positions=kv_positions,
                            segment_ids=seg, kv_segment_ids=kv_segment_ids, fp8=fp8,
                            score_dtype=score_dtype, fill_future=not default_kv,
                            implementation=implementation)
    lengths = jnp.clip(qp + 1, 0, k_idx.shape[1]) if default_kv else None
    return top_k_select(scores, top_k, lengths=lengths, implementation=topk_implementation)

  chunk = _query_chunks(length, chunk)
  if chunk == length:
    return one(q_idx, weights, q_positions, segment_ids)
  pad = -length % chunk
  padq = lambda x, fill=0: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
  split = lambda x: jnp.moveaxis(x.reshape(batch, -1, chunk, *x.shape[2:]), 1, 0)
  seg = None if segment_ids is None else split(padq(segment_ids, -1))
  xs = (split(padq(q_idx)), split(padq(weights)), split(padq(q_positions, -1)), seg)
  out = jax.lax.map(lambda a: one(*a), xs)          # [n, B, chunk, K]
  return jnp.moveaxis(out, 0, 1).reshape(batch, -1, out.shape[-1])[:, :length]


# ----------------------------------------------------------------------------- sparse attention


def indices_to_mask(indices, kv_len: int) -> jax.Array:
  """indices [B, L, K] (-1 = none) -> bool [B, L, S]: which keys are selected."""
  hits = indices[..., None] == jnp.arange(kv_len, dtype=indices.dtype)
  return jnp.any(hits & (indices[..., None] >= 0), axis=-2)


def sparse_attention_reference(q, k, v, indices, *, scale: float | None = None) -> jax.Array:
  """Attention of each query over its selected keys, by dense masking.

  Args:
    q: [B, L, H, D]; k: [B, S, H_kv, D]; v: [B, S, H_kv, Dv] (H_kv = 1: MQA / MLA form).
    indices: [B, L, K] int key indices shared by every head of query t; -1 = none.
      Indices of one row must be distinct (top-k output is).
    scale: logit scale, default 1/sqrt(D).
  Returns:
    [B, L, H, Dv] in q's dtype; rows with no selected key are zeros.
  """
  common.check_qkv(q, k, v)
  check_indices(q, k, indices)
  return full.masked_attention_reference(q, k, v, indices_to_mask(indices, k.shape[1]), scale=scale)


def gather_rows(x, indices):
  """x [B, S, ...], indices [B, L, K] (-1 = none, read as row 0) -> [B, L, K, ...]."""
  return jax.vmap(lambda xb, ib: xb[jnp.maximum(ib, 0)])(x, indices)


def gathered_logits(q, k, indices, scale):
  """q [B, L, H, D], k [B, S, H_kv, D] -> logits [B, L, H, K] f32 over the selected keys, -inf at -1."""
  batch, q_len, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[2]
  kg = gather_rows(k, indices)                                      # [B, L, K, H_kv, D]
  qg = q.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)
  logits = jnp.einsum("btkgd,btnkd->btkgn", qg, kg, preferred_element_type=jnp.float32) * scale
  logits = logits.reshape(batch, q_len, num_heads, -1)
  return jnp.where(indices[:, :, None, :] >= 0, logits, -jnp.inf)


def sparse_attention_gather(q, k, v, indices, *, scale: float | None = None) -> jax.Array:
  """XLA form: gather the K selected rows per query, O(L * K) work and memory."""
  batch, q_len, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[2]
  scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
  logits = gathered_logits(q, k, indices, scale)                    # [B, L, H, K]
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  p = jnp.exp(logits - row_max)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom > 0, denom, 1.0)
  vg = gather_rows(v, indices).astype(jnp.float32)                  # [B, L, K, H_kv, Dv]
  p = p.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, -1)
  out = jnp.einsum("btkgn,btnkd->btkgd", p, vg)
  return out.reshape(batch, q_len, num_heads, v.shape[-1]).astype(q.dtype)


def _pallas_sparse(q, k, v, indices, *, scale, k_rope=None):
  try:
    from pallas_kernels import dsa_attention  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise NotImplementedError("implementation='pallas': pallas_kernels.dsa_attention is not available") from e
  if k_rope is not None:   # the kernel's split key: one gathered latent row is both k and v
    return dsa_attention.sparse_attention(q, k, None, indices, k_rope=k_rope, scale=scale)
  return dsa_attention.sparse_attention(q, k, v, indices, scale=scale)


def _joined_key(fn):
  """A [k ; k_rope] key for the paths that take one key tensor (k_rope's dims appended)."""
  def run(q, k, v, indices, *, scale, k_rope=None):
    if k_rope is not None:
      k = jnp.concatenate([k, k_rope], axis=-1)
    return fn(q, k, v, indices, scale=scale)
  return run


SPARSE_IMPLEMENTATIONS = {
    "reference": _joined_key(lambda *a, **kw: sparse_attention_reference(*a, **kw)),
    "xla": _joined_key(lambda *a, **kw: sparse_attention_gather(*a, **kw)),
    "pallas": _pallas_sparse,
}


def sparse_attention(q, k, v, indices, *, k_rope=None, scale: float | None = None,
                     implementation: str | Sequence[str] | None = None) -> jax.Array:
  """Attention over the selected keys through "pallas", "xla" (gather) or "reference".

  Same arguments and result as `sparse_attention_reference`. None: GPU pallas then
  xla; CPU xla. k_rope [B, S, H_kv, R] (MLA's absorbed form, `MLASparseAttention`): the
  key is [k ; k_rope] and q is [B, L, H, D + R]; v must then be k (the latent).
  """
  if k_rope is not None:
    k_rope = k_rope.astype(k.dtype)
    check_k_rope(q, k, v, k_rope)
  common.check_qkv(q if k_rope is None else q[..., :k.shape[-1]], k, v)
  check_indices(q, k, indices)
  return full.dispatch(SPARSE_IMPLEMENTATIONS, implementation or _index_defaults(), q, k, v,
                       indices.astype(jnp.int32), scale=scale, what="DSA sparse attention",
                       **({} if k_rope is None else {"k_rope": k_rope}))


# ----------------------------------------------------------------------------- DSA


def dsa_attention_reference(q, k, v, q_idx, k_idx, weights, *, top_k: int, scale=None,
                            q_positions=None, kv_positions=None, segment_ids=None,
                            kv_segment_ids=None, fp8: bool = False):
  """Indexer -> top-k -> attention over the selected keys, all by reference.

  Returns (out [B, L, H, Dv], indices [B, L, K]). With top_k >= every t+1 the selected
  set is all visible keys, and the result is dense causal attention. The top-k selects on
  the scores rounded to `selection_dtype(fp8)`, as `indexer_top_k` does.
  """
  scores = indexer_scores_reference(q_idx, k_idx, weights, q_positions=q_positions,
                                    kv_positions=kv_positions, segment_ids=segment_ids,
                                    kv_segment_ids=kv_segment_ids, fp8=fp8)
  indices = top_k_indices(scores.astype(selection_dtype(fp8)), top_k)
  return sparse_attention_reference(q, k, v, indices, scale=scale), indices


def dsa_attention(q, k, v, q_idx, k_idx, weights, *, top_k: int, scale=None, q_positions=None,
                  kv_positions=None, segment_ids=None, kv_segment_ids=None, fp8=None,
                  chunk: int | None = None, implementation=None, index_implementation=None,
                  topk_implementation=None):
  """`dsa_attention_reference` through the fast paths -> (out, indices).

  implementation: sparse attention ("pallas", "xla", "reference"); index_implementation:
  the indexer's; topk_implementation: the top-k's ("pallas", "xla"; see `top_k_select`:
  the selected sets agree, their order need not); chunk: queries per indexer chunk
  (bounds the [chunk, S] score buffer).
  """
  indices = indexer_top_k(q_idx, k_idx, weights, top_k=top_k, q_positions=q_positions,
                          kv_positions=kv_positions, segment_ids=segment_ids,
                          kv_segment_ids=kv_segment_ids, fp8=fp8, chunk=chunk,
                          implementation=index_implementation,
                          topk_implementation=topk_implementation)
  return sparse_attention(q, k, v, indices, scale=scale, implementation=implementation), indices


# ----------------------------------------------------------------------------- training losses


def _kl(p, log_q, valid):
  """Sum over the last axis of p (log p - log q), 0 where p == 0 or not valid."""
  safe_p = jnp.where(valid & (p > 0), p, 1.0)
  terms = jnp.where(valid & (p > 0), p * (jnp.log(safe_p) - jnp.where(valid, log_q, 0.0)), 0.0)
  return jnp.sum(terms, axis=-1)


def _mean_over_queries(kl, row_valid):
  return jnp.sum(jnp.where(row_valid, kl, 0.0)) / jnp.maximum(jnp.sum(row_valid), 1)


def indexer_kl_dense(q, k, scores, *, scale=None, q_positions=None, kv_positions=None,
                     segment_ids=None, kv_segment_ids=None) -> jax.Array:
  """Stage 1 ("dense warm-up") loss: mean_t KL(p_t || softmax(I_t)) over visible keys.

  p_t = the main attention distribution of query t summed over heads and L1-normalized
  (= the mean over heads), computed from q [B, L, H, D], k [B, S, H_kv, D] as a
  constant (no gradient reaches the main model). scores: indexer I [B, L, S] (-inf
  where not visible). Returns a float32 scalar whose gradient flows into `scores` only.
  """
  q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
  batch, q_len, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[2]
  scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
  mask = visible_mask(batch, q_len, k.shape[1], q_positions, kv_positions, segment_ids,
                      kv_segment_ids)
  qg = q.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)
  logits = jnp.einsum("btkgd,bskd->btkgs", qg, k, preferred_element_type=jnp.float32) * scale
  logits = jnp.where(mask[:, :, None, None], logits, -jnp.inf).reshape(batch, q_len, num_heads, -1)
  row_valid = jnp.any(mask, axis=-1)
  p = jax.nn.softmax(jnp.where(row_valid[..., None, None], logits, 0.0), axis=-1)
  p = jnp.where(mask[:, :, None], p, 0.0).mean(axis=2)             # [B, L, S]
  log_q = jax.nn.log_softmax(jnp.where(mask, scores, -1e30), axis=-1)
  return _mean_over_queries(_kl(p, log_q, mask), row_valid)


def indexer_kl_sparse(q, k, scores, indices, *, scale=None) -> jax.Array:
  """Stage 2 ("sparse") loss: mean_t KL(p_t || softmax(I_t)), both restricted to S_t.

  p_t: the main (sparse) attention distribution over the selected keys, mean over
  heads, a constant. scores: I [B, L, S]; indices [B, L, K] (-1 = none).
  """
  q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
  valid = indices >= 0                                              # [B, L, K]
  row_valid = jnp.any(valid, axis=-1)
  logits = gathered_logits(q, k, indices, scale)                    # [B, L, H, K]
  p = jax.nn.softmax(jnp.where(row_valid[..., None, None], logits, 0.0), axis=-1)
  p = jnp.where(valid[:, :, None], p, 0.0).mean(axis=2)             # [B, L, K]
  selected = jnp.take_along_axis(scores, jnp.maximum(indices, 0), axis=-1)
  log_q = jax.nn.log_softmax(jnp.where(valid, selected, -1e30), axis=-1)
  return _mean_over_queries(_kl(p, log_q, valid), row_valid)


# ----------------------------------------------------------------------------- module


STAGES = (0, 1, 2)   # 0: sparse, no indexer loss; 1: dense warm-up + KL; 2: sparse + KL


class IndexerKL(nnx.Intermediate):
  """The indexer KL of the layer's last forward (a scalar; 0 in stage 0)."""


class Indexer(nnx.Module):
  """Lightning-indexer projections: H_I queries and weights per token, one shared key.

  q_I = W_q x (RoPE on the first `rope_dim` dims), k_I = LayerNorm(W_k x) (RoPE likewise),
  w = (W_w x) * H_I^-1/2 * d_I^-1/2. DeepSeek computes q_I from MLA's query latent c^Q
  (`query_dim` = d_c', `queries(..., q_input=c_Q)`); without MLA from the layer input.
  """

  def __init__(self, d_model: int, index_heads: int, index_dim: int, rope_dim: int, *,
               rngs: nnx.Rngs, rope_base: float = 10_000.0, dtype=jnp.float32,
               query_dim: int | None = None):
    for name, val in (("index_heads", index_heads), ("index_dim", index_dim)):
      if not isinstance(val, (int, np.integer)) or val <= 0:
        raise ValueError(f"DSA {name} must be a positive int, got {name}={val!r}")
    if rope_dim < 0 or rope_dim % 2 or rope_dim > index_dim:
      raise ValueError(f"DSA rope_dim must be even and in [0, index_dim={index_dim}], got {rope_dim}")
    init = nnx.initializers.lecun_normal()
    self.wq = nnx.Param(init(rngs.params(), (query_dim or d_model, index_heads * index_dim)))
    self.wk = nnx.Param(init(rngs.params(), (d_model, index_dim)))
    self.ww = nnx.Param(init(rngs.params(), (d_model, index_heads)))
    self.k_norm_scale = nnx.Param(jnp.ones((index_dim,), jnp.float32))
    self.k_norm_bias = nnx.Param(jnp.zeros((index_dim,), jnp.float32))
    self.index_heads, self.index_dim, self.rope_dim = index_heads, index_dim, rope_dim
    self.rope_base = rope_base
    self.dtype = dtype

  def _rope(self, x, positions):
    if not self.rope_dim:
      return x
    return rope.apply_rope(x, positions, rope.rope_frequencies(self.rope_dim, self.rope_base))

  def keys(self, x, positions):
    """x [B, L, d_model] -> k_I [B, L, d_I]."""
    k = (x @ self.wk[...].astype(self.dtype)).astype(jnp.float32)
    mean = k.mean(-1, keepdims=True)
    var = jnp.mean(jnp.square(k - mean), -1, keepdims=True)
    k = (k - mean) * jax.lax.rsqrt(var + 1e-6) * self.k_norm_scale[...] + self.k_norm_bias[...]
    return self._rope(k.astype(self.dtype)[:, :, None], positions)[:, :, 0]

  def queries(self, x, positions, q_input=None):
    """x [B, L, d_model] (q_input [B, L, query_dim]: q_I's input, default x) ->
    (q_I [B, L, H_I, d_I], weights [B, L, H_I] float32)."""
    batch, length, _ = x.shape
    q_in = x if q_input is None else q_input
    q = (q_in @ self.wq[...].astype(self.dtype)).reshape(batch, length, self.index_heads, self.index_dim)
    w = (x @ self.ww[...].astype(self.dtype)).astype(jnp.float32)
    return self._rope(q, positions), w * (self.index_heads * self.index_dim) ** -0.5


# ----------------------------------------------------------------------------- layers
# DSAttention (MHA/GQA main attention, kind "D") and MLASparseAttention (MLA, kind "S") share
# the indexer, its cache and the training stages through the functions below.


def init_index_cache(batch: int, capacity: int, index_dim: int, fp8: bool, dtype) -> dict:
  """The indexer-key part of a DSA decode cache: k_idx [B, C, d_I] (FP8: float8_e4m3fn values
  plus k_idx_scale [B, C, nb] float32, rotated and quantized when written)."""
  if fp8:
    return dict(k_idx=jnp.zeros((batch, capacity, index_dim), FP8),
                k_idx_scale=jnp.ones((batch, capacity, -(-index_dim // min(FP8_BLOCK, index_dim))), jnp.float32))
  return dict(k_idx=jnp.zeros((batch, capacity, index_dim), dtype))


def index_cache_bytes(index_dim: int, fp8: bool, bytes_per_value: int) -> float:
  """Cached indexer-key bytes per token (FP8: 1 byte a value + a 4-byte scale per 128)."""
  return index_dim + 4 * -(-index_dim // FP8_BLOCK) if fp8 else index_dim * bytes_per_value


def write_index_cache(cache: dict, k_idx, positions):
  """Writes the new indexer keys k_idx [B, T, d_I] at slots positions % C.

  Returns (the cache's new index entries, all cached keys as the indexer takes them:
  FP8Keys or an array in k_idx's dtype).
  """
  slots = positions % cache["k_idx"].shape[1]
  bidx = jnp.arange(k_idx.shape[0])[:, None]
  if "k_idx_scale" in cache:    # FP8 key cache: quantize the new keys once, when written
    k8, k_scale = quantize_index_keys(jax.lax.stop_gradient(k_idx))
    new = dict(k_idx=cache["k_idx"].at[bidx, slots].set(k8),
               k_idx_scale=cache["k_idx_scale"].at[bidx, slots].set(k_scale))
    return new, FP8Keys(new["k_idx"], new["k_idx_scale"])
  new = dict(k_idx=cache["k_idx"].at[bidx, slots].set(k_idx.astype(cache["k_idx"].dtype)))
  return new, new["k_idx"].astype(k_idx.dtype)


def _init_selection(layer, d_model, *, rngs, index_heads, index_dim, index_rope_dim, top_k, fp8,
                    stage, chunk, index_implementation, dense_implementation, topk_implementation,
                    rope_base, query_dim=None):
  """Sets a DSA layer's indexer and selection settings (after the main attention's __init__)."""
  layer.indexer = Indexer(d_model, index_heads, index_dim, index_rope_dim, rngs=rngs,
                          rope_base=rope_base, dtype=layer.dtype, query_dim=query_dim)
  layer.top_k, layer.fp8, layer.stage, layer.chunk = int(top_k), fp8, stage, chunk
  layer.index_implementation = index_implementation
  layer.dense_implementation = dense_implementation   # stage 1's dense attention
  layer.topk_implementation = topk_implementation     # None: see top_k_select
  layer.indexer_kl = IndexerKL(jnp.zeros((), jnp.float32))


def _check_selection(top_k, stage):
  check_top_k(top_k)
  if stage not in STAGES:
    raise ValueError(f"DSA stage must be one of {STAGES}, got stage={stage!r}")


def _selection_kwargs(cfg) -> dict:
  """The indexer / selection keyword arguments of a DSA layer from a ModelConfig (dsa_*)."""
  return dict(index_heads=cfg.dsa_index_heads, index_dim=cfg.dsa_index_dim, top_k=cfg.dsa_top_k,
              fp8=cfg.dsa_fp8, stage=cfg.dsa_stage, chunk=cfg.dsa_chunk or None,
              dense_implementation=cfg.implementation)


def _fp8_cache(layer) -> bool:
  return default_fp8() if layer.fp8 is None else bool(layer.fp8)


def _attend_selected(layer, q_idx, k_idx, weights, *, q, k, scale, dense, sparse, mask_kw):
  """The three stages of a DSA layer (see STAGES); returns the main attention's output.

  q [B, L, H, D], k [B, S, H_kv, D]: the main logits' operands (for the KL target p_t);
  dense(): full causal attention; sparse(indices [B, L, K]): attention over the top-k.
  Stages 1, 2 store the indexer KL in `layer.indexer_kl`.
  """
  # the KL's scores: differentiable, unquantized (an FP8 key cache is dequantized)
  k_kl = dequantize_index_keys(k_idx).astype(q_idx.dtype) if isinstance(k_idx, FP8Keys) else k_idx
  if layer.stage == 1:
    out = dense()
    scores = indexer_scores(q_idx, k_kl, weights, fp8=False, implementation="xla", **mask_kw)
    layer.indexer_kl = IndexerKL(indexer_kl_dense(q, k, scores, scale=scale, **mask_kw))
    return out
  stop = jax.lax.stop_gradient
  indices = indexer_top_k(stop(q_idx), jax.tree.map(stop, k_idx), stop(weights), top_k=layer.top_k,
                          fp8=layer.fp8, chunk=layer.chunk, implementation=layer.index_implementation,
                          topk_implementation=layer.topk_implementation, **mask_kw)
  out = sparse(indices)
  if layer.stage == 2:
    scores = indexer_scores(q_idx, k_kl, weights, fp8=False, implementation="xla", **mask_kw)
    layer.indexer_kl = IndexerKL(indexer_kl_sparse(q, k, scores, indices, scale=scale))
  return out


class DSAttention(full.Attention):
  """Causal attention over the top-k tokens chosen by a lightning indexer (layer kind "D").

  Projections, RoPE, QK-norm and output gate as `full.Attention`; with num_kv_heads == 1
  the main attention is the MQA form. `stage` selects training behaviour (see STAGES):
  stages 1 and 2 store the indexer KL of the last forward in `self.indexer_kl`
  (an `IndexerKL` variable, present in every stage so the state's structure is fixed;
  sum over layers with `indexer_kl`). Decode cache: k, v, pos as full attention plus the
  indexer keys: k_idx [B, C, d_I]; with the FP8 indexer (fp8, or None on GPU) they are
  rotated and quantized once when written: k_idx [B, C, d_I] float8_e4m3fn and
  k_idx_scale [B, C, nb] float32 (`FP8Keys`).
  """

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
               rngs: nnx.Rngs, index_heads: int = 64, index_dim: int = 128, top_k: int = 2048,
               rope_dim: int = 64, fp8: bool | None = None, stage: int = 0,
               chunk: int | None = None, index_implementation=None, dense_implementation=None,
               topk_implementation=None, rope_base: float = 10_000.0, **kwargs):
    _check_selection(top_k, stage)
    super().__init__(d_model, num_heads, num_kv_heads, head_dim, rngs=rngs, rope_base=rope_base,
                     **kwargs)
    _init_selection(self, d_model, rngs=rngs, index_heads=index_heads, index_dim=index_dim,
                    index_rope_dim=rope_dim, top_k=top_k, fp8=fp8, stage=stage, chunk=chunk,
                    index_implementation=index_implementation,
                    dense_implementation=dense_implementation,
                    topk_implementation=topk_implementation, rope_base=rope_base)

  @classmethod
  def from_model_config(cls, cfg, rngs: nnx.Rngs) -> "DSAttention":
    """The layer of kind "D" from `lca.model.ModelConfig` (fields dsa_*)."""
    sparse_impl = cfg.implementation if cfg.implementation in SPARSE_IMPLEMENTATIONS else None
    return cls(cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, rngs=rngs,
               rope_dim=cfg.dsa_rope_dim, rope_base=cfg.global_rope_base or cfg.rope_base,
               qk_norm=cfg.qk_norm, output_gate=cfg.output_gate, implementation=sparse_impl,
               dtype=cfg.compute_dtype, **_selection_kwargs(cfg))

  def init_cache(self, batch: int, capacity: int, dtype=None) -> dict:
    cache = full.init_kv_cache(batch, capacity, self.num_kv_heads, self.head_dim, dtype or self.dtype)
    return cache | init_index_cache(batch, capacity, self.indexer.index_dim, _fp8_cache(self),
                                    dtype or self.dtype)

  def cache_bytes_per_token(self, context: int, bytes_per_value: int = 2) -> float:
    """KV plus one indexer key per token (FP8: 1 byte a value + a 4-byte scale per 128)."""
    return (2 * self.num_kv_heads * self.head_dim * bytes_per_value
            + index_cache_bytes(self.indexer.index_dim, _fp8_cache(self), bytes_per_value))

  def __call__(self, x, positions, *, cache: dict | None = None, segment_ids=None):
    """x: [B, L, d_model], positions: [B, L] -> ([B, L, d_model], new cache or None)."""
    x = x.astype(self.dtype)
    q, k, v = full.project_qkv(self, x, positions)
    x_idx = jax.lax.stop_gradient(x)          # the indexer never trains the main graph
    q_idx, weights = self.indexer.queries(x_idx, positions)
    k_idx = self.indexer.keys(x_idx, positions)
    mask_kw = dict(segment_ids=segment_ids)
    if cache is not None:
      index_entries, k_idx = write_index_cache(cache, k_idx, positions)
      cache = dict(full.write_kv_cache(cache, k, v, positions)) | index_entries
      k, v = cache["k"].astype(q.dtype), cache["v"].astype(q.dtype)
      mask_kw = dict(q_positions=positions, kv_positions=cache["pos"])
    out = _attend_selected(
        self, q_idx, k_idx, weights, q=q, k=k, scale=None,
        dense=lambda: full.attention(q, k, v, causal=True, implementation=self.dense_implementation,
                                     **mask_kw),
        sparse=lambda idx: sparse_attention(q, k, v, idx, implementation=self.implementation),
        mask_kw=mask_kw)
    return self.output(out, x), cache


class MLASparseAttention(mla.MLAttention):
  """DeepSeek-V3.2's attention (layer kind "S"): MLA whose absorbed form attends only over
  the top-k keys of a lightning indexer.

  The main attention is MQA over the cached latents (V3.2's DSA "instantiated under MLA"):
  query [q_C W_UK^T ; q_R] (d_c + d_R per head), key [c_KV ; k_R], value c_KV, the output
  latent up-projected by W_UV; one gathered latent row serves every head
  (`sparse_attention(..., k_rope=)`). The indexer's queries come from MLA's query latent
  c_Q, its weights and keys from the layer input, all detached from the main graph.
  Parameters are MLAttention's plus `indexer`, so a trained "M" model converts to "S" by
  path (`experiments/dsa_convert.py`). Stages as `DSAttention` (stage 1's dense attention
  is MLA's naive form); decode cache: the latent cache (c_kv, k_rope, pos) plus the
  indexer keys (`init_index_cache`).
  """

  def __init__(self, d_model: int, num_heads: int, *, rngs: nnx.Rngs, index_heads: int = 64,
               index_dim: int = 128, top_k: int = 2048, index_rope_dim: int = 64,
               fp8: bool | None = None, stage: int = 0, chunk: int | None = None,
               index_implementation=None, dense_implementation=None, topk_implementation=None,
               rope_base: float = 10_000.0, **mla_kwargs):
    _check_selection(top_k, stage)
    super().__init__(d_model, num_heads, rngs=rngs, rope_base=rope_base, **mla_kwargs)
    _init_selection(self, d_model, rngs=rngs, index_heads=index_heads, index_dim=index_dim,
                    index_rope_dim=index_rope_dim, top_k=top_k, fp8=fp8, stage=stage, chunk=chunk,
                    index_implementation=index_implementation,
                    dense_implementation=dense_implementation,
                    topk_implementation=topk_implementation, rope_base=rope_base,
                    query_dim=mla_kwargs.get("q_rank") or d_model)

  @classmethod
  def from_model_config(cls, cfg, rngs: nnx.Rngs) -> "MLASparseAttention":
    """The layer of kind "S" from `lca.model.ModelConfig` (fields mla_* and dsa_*)."""
    kwargs = mla.layer_kwargs(cfg) | _selection_kwargs(cfg)
    kwargs["implementation"] = cfg.implementation if cfg.implementation in SPARSE_IMPLEMENTATIONS else None
    return cls(cfg.d_model, cfg.num_heads, rngs=rngs, index_rope_dim=cfg.dsa_rope_dim, **kwargs)

  def init_cache(self, batch: int, capacity: int, dtype=None) -> dict:
    return super().init_cache(batch, capacity, dtype) | init_index_cache(
        batch, capacity, self.indexer.index_dim, _fp8_cache(self), dtype or self.dtype)

  def cache_bytes_per_token(self, context: int, bytes_per_value: int = 2) -> float:
    """The latent (d_c + d_R values) plus one indexer key per token."""
    return (super().cache_bytes_per_token(context, bytes_per_value)
            + index_cache_bytes(self.indexer.index_dim, _fp8_cache(self), bytes_per_value))

  def __call__(self, x, positions, *, cache: dict | None = None, segment_ids=None):
    """x: [B, L, d_model], positions: [B, L] -> ([B, L, d_model], new cache or None)."""
    batch, length, _ = x.shape
    x = x.astype(self.dtype)
    c_q = self.query_latent(x)
    q_nope, q_rope, c_kv, k_rope, scale = self.project(x, positions, c_q)
    w_uk, w_uv = self.w_uk[...].astype(self.dtype), self.w_uv[...].astype(self.dtype)
    x_idx = jax.lax.stop_gradient(x)          # the indexer never trains the main graph
    q_idx, weights = self.indexer.queries(x_idx, positions, jax.lax.stop_gradient(c_q))
    k_idx = self.indexer.keys(x_idx, positions)
    mask_kw = dict(segment_ids=segment_ids)
    if cache is not None:
      index_entries, k_idx = write_index_cache(cache, k_idx, positions)
      cache = mla.write_latent_cache(cache, c_kv, k_rope, positions) | index_entries
      c_kv, k_rope = cache["c_kv"].astype(self.dtype), cache["k_rope"].astype(self.dtype)
      mask_kw = dict(q_positions=positions, kv_positions=cache["pos"])
    # absorbed form: q_C . (c W_UK) = (q_C W_UK^T) . c; one latent row is every head's k and v
    q = jnp.concatenate([jnp.einsum("bthd,chd->bthc", q_nope, w_uk), q_rope], axis=-1)
    latent, k_r = c_kv[:, :, None], k_rope[:, :, None]                 # [B, S, 1, d_c], [.., d_R]

    def sparse(indices):
      o_latent = sparse_attention(q, latent, latent, indices, k_rope=k_r, scale=scale,
                                  implementation=self.implementation)  # [B, L, H, d_c]
      return jnp.einsum("bthc,chd->bthd", o_latent, w_uv)

    out = _attend_selected(
        self, q_idx, k_idx, weights, q=q, k=jnp.concatenate([latent, k_r], axis=-1), scale=scale,
        dense=lambda: mla.mla_attention_naive(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, scale=scale,
                                              attention_implementation=self.dense_implementation,
                                              **mask_kw),
        sparse=sparse, mask_kw=mask_kw)
    out = out.reshape(batch, length, self.num_heads * self.v_head_dim)
    return out @ self.wo[...].astype(self.dtype), cache


DSA_LAYERS = (DSAttention, MLASparseAttention)


def indexer_kl(model: nnx.Module) -> jax.Array:
  """Sum over the model's DSA layers of the indexer KL of their last forward (float32)."""
  return sum((jnp.sum(x) for x in jax.tree.leaves(nnx.state(model, IndexerKL))), jnp.float32(0.0))


def set_stage(model: nnx.Module, stage: int) -> None:
  """Sets `stage` on every DSA layer of a model (0 sparse, 1 dense warm-up, 2 sparse + KL)."""
  if stage not in STAGES:
    raise ValueError(f"DSA stage must be one of {STAGES}, got stage={stage!r}")
  for _, module in nnx.iter_graph(model):
    if isinstance(module, DSA_LAYERS):
      module.stage = stage
