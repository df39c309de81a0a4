"""Full softmax attention (MHA / GQA / MQA), optional sliding window and segments.

Three faces, in order of trust:
  attention_reference(...)           plain jnp, materializes the [Lq, Lk] scores;
  attention(..., implementation=)    the fast path: "xla", "cudnn", "pallas";
  Attention(nnx.Module)              projections, RoPE, QK-norm, output gate, KV cache.
"""

from collections.abc import Sequence
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lca.attention import common
from lca.layers import conv as conv_lib
from lca.layers import norms, rope


def attention_reference(q, k, v, *, causal: bool = True, window: int | None = None,
                        scale: float | None = None, segment_ids=None, kv_segment_ids=None,
                        q_positions=None, kv_positions=None) -> jax.Array:
  """Softmax attention, computed the obvious way in fp32.

  Args:
    q: [B, Lq, H, D]; k: [B, Lk, H_kv, D]; v: [B, Lk, H_kv, Dv].
    causal: key s visible to query t only if s <= t (by position).
    window: sliding window w (see `common.attention_mask`).
    scale: logit scale, default 1/sqrt(D).
    segment_ids: [B, Lq] ints for packed sequences; kv_segment_ids: [B, Lk],
      defaults to segment_ids (self-attention).
    q_positions, kv_positions: [B, Lq], [B, Lk] int positions; default bottom-right
      aligned aranges. A negative kv position marks an empty cache slot.
  Returns:
    [B, Lq, H, Dv] in q's dtype. Rows that see no key are zeros.
  """
  common.check_qkv(q, k, v)
  common.check_window(window)
  batch, q_len = q.shape[:2]
  default_q, default_kv = common.default_positions(batch, q_len, k.shape[1])
  q_positions = default_q if q_positions is None else q_positions
  kv_positions = default_kv if kv_positions is None else kv_positions
  if segment_ids is not None and kv_segment_ids is None:
    kv_segment_ids = segment_ids
  mask = common.attention_mask(q_positions, kv_positions, causal=causal, window=window,
                               q_segment_ids=segment_ids, kv_segment_ids=kv_segment_ids)
  return masked_attention_reference(q, k, v, mask, scale=scale)


def masked_attention_reference(q, k, v, mask, *, scale: float | None = None) -> jax.Array:
  """Softmax attention where mask [B, Lq, Lk] (bool) says which keys each query sees.

  q: [B, Lq, H, D]; k: [B, Lk, H_kv, D]; v: [B, Lk, H_kv, Dv]; the same mask for every
  head. Returns [B, Lq, H, Dv] in q's dtype (fp32 inside); rows that see no key are zeros.
  """
  batch, q_len, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[2]
  scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
  qg = q.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)
  logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
  mask = mask[:, None, None]  # [B, 1, 1, Lq, Lk]
  logits = jnp.where(mask, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  p = jnp.where(mask, jnp.exp(logits - row_max), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom > 0, denom, 1.0)
  out = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32))
  return out.reshape(batch, q_len, num_heads, v.shape[-1]).astype(q.dtype)


# ----------------------------------------------------------------------------- fast path


def _uses_custom_mask(q_positions, kv_positions, segment_ids) -> bool:
  return q_positions is not None or kv_positions is not None or segment_ids is not None


def _xla(q, k, v, *, causal, window, scale, segment_ids, kv_segment_ids, q_positions, kv_positions):
  """XLA through jax.nn.dot_product_attention; the reference einsum for custom masks."""
  if _uses_custom_mask(q_positions, kv_positions, segment_ids) or q.shape[1] != k.shape[1]:
    return attention_reference(q, k, v, causal=causal, window=window, scale=scale,
                               segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                               q_positions=q_positions, kv_positions=kv_positions)
  if v.shape[-1] > q.shape[-1]:
    raise NotImplementedError("implementation='xla' needs v's head_dim <= q's")
  return v_padded_to_q(jax.nn.dot_product_attention, q, k, v, scale=scale, is_causal=causal,
                       local_window_size=_jax_window(window, causal), implementation="xla")


def v_padded_to_q(attend, q, k, v, **kwargs):
  """attend(q, k, v, **kwargs) for a call that takes one head dim (jax.nn.dot_product_attention):
  a narrower v is zero-padded to q's head dim and the output cut back (zero columns of v leave
  the others unchanged). Also what the benchmarks time as the padded cuDNN baseline."""
  dv, dq = v.shape[-1], q.shape[-1]
  if dv >= dq:
    return attend(q, k, v, **kwargs)
  return attend(q, k, jnp.pad(v, [(0, 0)] * 3 + [(0, dq - dv)]), **kwargs)[..., :dv]


def _cudnn(q, k, v, *, causal, window, scale, segment_ids, kv_segment_ids, q_positions, kv_positions):
  if jax.default_backend() != "gpu":
    raise NotImplementedError(f"implementation='cudnn' needs a GPU, the backend is {jax.default_backend()}")
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    raise NotImplementedError(f"implementation='cudnn' needs bfloat16 or float16 inputs, got {q.dtype}")
  if _uses_custom_mask(q_positions, kv_positions, segment_ids):
    raise NotImplementedError("implementation='cudnn' does not take positions or segment_ids here")
  if q.shape[1] != k.shape[1]:
    raise NotImplementedError("implementation='cudnn' is used for self-attention (Lq == Lk) only")
  if v.shape[-1] != q.shape[-1]:
    try:
      return _cudnn_other_v_dim(q, k, v, causal=causal, window=window, scale=scale)
    except NotImplementedError:
      if v.shape[-1] > q.shape[-1]:
        raise
  return v_padded_to_q(jax.nn.dot_product_attention, q, k, v, scale=scale, is_causal=causal,
                       local_window_size=_jax_window(window, causal), implementation="cudnn")


def _cudnn_other_v_dim(q, k, v, *, causal, window, scale):
  """cuDNN with v's head dim other than q's (MLA's dense prefill: q.k 192, v 128).

  jax.nn.dot_product_attention takes one head dim; jax's cuDNN module beneath it takes two
  (cuDNN >= 9.10 on Hopper or later). That module is private to jax, so anything it refuses,
  or its absence, is a NotImplementedError here (`_cudnn` then pads a narrower v for jax.nn's
  call). H200, 128 heads, 128k causal: 1280 ms against 1482 with v zero-padded to 192
  (experiments/probe_dsa_baseline.py, session 23)."""
  if window is not None:
    raise NotImplementedError("implementation='cudnn' with v's head dim other than q's takes no window")
  try:
    from jax._src.cudnn import fused_attention_stablehlo as cudnn  # pylint: disable=g-import-not-at-top
    mask = cudnn.MaskType.CAUSAL if causal else cudnn.MaskType.NO_MASK
    return cudnn.dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5 if scale is None else scale,
                                       mask_type=mask)
  except (ImportError, AttributeError, ValueError, NotImplementedError, RuntimeError) as e:
    raise NotImplementedError(f"implementation='cudnn' with v's head dim ({v.shape[-1]}) other than "
                              f"q's ({q.shape[-1]}): {type(e).__name__}: {e}") from e


def _pallas(q, k, v, *, causal, window, scale, segment_ids, kv_segment_ids, q_positions, kv_positions):
  try:
    from pallas_kernels import flash  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise NotImplementedError("implementation='pallas': pallas_kernels.flash is not available") from e
  if q_positions is not None or kv_positions is not None:
    raise NotImplementedError("implementation='pallas' takes segment_ids, not explicit positions")
  if kv_segment_ids is not None and kv_segment_ids is not segment_ids:
    raise NotImplementedError("implementation='pallas' needs kv_segment_ids == segment_ids")
  return flash.flash_attention(q, k, v, causal=causal, window=window, scale=scale,
                               segment_ids=segment_ids)


def _jax_window(window, causal):
  """Our window w as jax's (left, right) local_window_size."""
  if window is None:
    return None
  return (window - 1, 0 if causal else window - 1)


IMPLEMENTATIONS = {
    "xla": _xla,
    "cudnn": _cudnn,
    "pallas": _pallas,
    "reference": lambda q, k, v, **kw: attention_reference(q, k, v, **kw),
}


def default_implementations() -> tuple[str, ...]:
  """Tried in order when implementation=None: the fastest measured first on GPU.

  H100, bf16 (experiments/results/bench_attention): cuDNN trains fastest; the Pallas
  flash kernel (0.6-0.95x cuDNN) takes what cuDNN does not (segment ids, fp32, head
  dims cuDNN rejects) and decodes from caches (faster than cuDNN there).
  """
  if jax.default_backend() == "gpu":
    return ("cudnn", "pallas", "xla")
  return ("xla",)


def dispatch(table: dict, implementation, *args, what: str = "attention", **kwargs):
  """Runs the first implementation of `table` that supports the arguments.

  implementation: a name, a sequence of names tried in order, or None for
  `default_implementations()`. A single explicit name that cannot handle the
  arguments raises its NotImplementedError; unknown names raise ValueError.
  """
  names = default_implementations() if implementation is None else implementation
  names = (names,) if isinstance(names, str) else tuple(names)
  unknown = [n for n in names if n not in table]
  if unknown or not names:
    raise ValueError(f"unknown {what} implementation={implementation!r}; known: {sorted(table)}")
  errors = []
  for name in names:
    try:
      return table[name](*args, **kwargs)
    except NotImplementedError as e:
      errors.append(f"{name}: {e}")
  if len(names) == 1:
    raise NotImplementedError(errors[0])
  raise NotImplementedError(f"no {what} implementation supports these arguments: " + "; ".join(errors))


def attention(q, k, v, *, causal: bool = True, window: int | None = None,
              scale: float | None = None, segment_ids=None, kv_segment_ids=None,
              q_positions=None, kv_positions=None,
              implementation: str | Sequence[str] | None = None) -> jax.Array:
  """Softmax attention through the chosen implementation; same math as the reference.

  Arguments as `attention_reference`. implementation: "xla", "cudnn", "pallas",
  "reference", a sequence tried in order, or None (GPU: cudnn, pallas, xla; CPU: xla).
  """
  common.check_qkv(q, k, v)
  common.check_window(window)
  return dispatch(IMPLEMENTATIONS, implementation, q, k, v, causal=causal, window=window,
                  scale=scale, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                  q_positions=q_positions, kv_positions=kv_positions)


# ----------------------------------------------------------------------------- KV cache


def init_kv_cache(batch: int, capacity: int, num_kv_heads: int, head_dim: int, dtype) -> dict:
  """An empty KV cache: k, v [B, C, H_kv, D] and pos [B, C] (-1 = empty slot)."""
  shape = (batch, capacity, num_kv_heads, head_dim)
  return dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
              pos=jnp.full((batch, capacity), -1, jnp.int32))


def write_kv_cache(cache: dict, k, v, positions) -> dict:
  """Writes k, v [B, T, H_kv, D] at slots positions % C (a ring buffer when C is a window).

  When T > C only the last C tokens are kept, as a ring buffer would after T writes.
  """
  capacity = cache["k"].shape[1]
  if k.shape[1] > capacity:
    k, v, positions = k[:, -capacity:], v[:, -capacity:], positions[:, -capacity:]
  slots = positions % capacity
  batch_idx = jnp.arange(k.shape[0])[:, None]
  return dict(k=cache["k"].at[batch_idx, slots].set(k.astype(cache["k"].dtype)),
              v=cache["v"].at[batch_idx, slots].set(v.astype(cache["v"].dtype)),
              pos=cache["pos"].at[batch_idx, slots].set(positions.astype(jnp.int32)))


def _decodes_with_pallas(implementation) -> bool:
  """True when "pallas" is the first of the named implementations that can attend a
  cache (cuDNN here takes no positions, so it never can)."""
  names = default_implementations() if implementation is None else implementation
  names = (names,) if isinstance(names, str) else tuple(names)
  for name in names:
    if name != "cudnn":
      return name == "pallas"
  return False


def cached_attention(q, k, v, positions, cache: dict, *, window, scale, implementation):
  """Causal attention of new tokens over the cache plus themselves -> (out, new cache).

  q: [B, T, H, D], k/v: [B, T, H_kv, D] at positions [B, T].
  A full cache (window None) is written first and attended in place. A window-sized
  ring buffer is attended together with the new tokens, then written, so a chunk
  longer than one token never overwrites keys its own earlier queries still need.
  When "pallas" is the first implementation that can attend a cache, a full cache is
  attended by the flash-decoding kernel (`pallas_kernels.flash_decode`) with
  kv_lengths = positions[:, -1] + 1: it assumes what the decode loop does, that each
  row's T positions are contiguous and that slot s holds position s (a full cache fed
  from position 0).
  """
  if window is None and _decodes_with_pallas(implementation):
    from pallas_kernels import flash_decode  # pylint: disable=g-import-not-at-top
    cache = write_kv_cache(cache, k, v, positions)
    out = flash_decode.flash_decode(q, cache["k"].astype(q.dtype), cache["v"].astype(q.dtype),
                                    positions[:, -1].astype(jnp.int32) + 1, scale=scale)
    return out, cache
  if window is None:
    cache = write_kv_cache(cache, k, v, positions)
    k_all, v_all, kv_pos = cache["k"], cache["v"], cache["pos"]
  else:
    k_all = jnp.concatenate([cache["k"], k.astype(cache["k"].dtype)], axis=1)
    v_all = jnp.concatenate([cache["v"], v.astype(cache["v"].dtype)], axis=1)
    kv_pos = jnp.concatenate([cache["pos"], positions.astype(jnp.int32)], axis=1)
    cache = write_kv_cache(cache, k, v, positions)
  out = attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), causal=True, window=window,
                  scale=scale, q_positions=positions, kv_positions=kv_pos,
                  implementation=implementation)
  return out, cache


# ----------------------------------------------------------------------------- module


def init_projections(layer: nnx.Module, d_model: int, num_heads: int, num_kv_heads: int,
                     head_dim: int, *, rngs: nnx.Rngs, qk_norm: bool) -> None:
  """Gives `layer` what `project_qkv` reads, and W_o: wq, wk, wv, wo (LeCun normal, drawn
  in that order), q_norm/k_norm (RMSNorm per head, or None) and the head counts."""
  if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads:
    raise ValueError(f"num_heads={num_heads} must be a positive multiple of num_kv_heads={num_kv_heads}")
  init = nnx.initializers.lecun_normal()
  p = lambda *shape: nnx.Param(init(rngs.params(), shape))
  layer.wq = p(d_model, num_heads * head_dim)
  layer.wk = p(d_model, num_kv_heads * head_dim)
  layer.wv = p(d_model, num_kv_heads * head_dim)
  layer.wo = p(num_heads * head_dim, d_model)
  layer.q_norm = norms.RMSNorm(head_dim) if qk_norm else None
  layer.k_norm = norms.RMSNorm(head_dim) if qk_norm else None
  layer.num_heads, layer.num_kv_heads, layer.head_dim = num_heads, num_kv_heads, head_dim


def project_qkv(layer: nnx.Module, x, positions):
  """The prologue of every softmax-attention layer: q/k/v projections, QK-norm, RoPE.

  layer: holds nnx.Params wq [d_model, H*D], wk, wv [d_model, H_kv*D], q_norm/k_norm
    (RMSNorm, or None for no QK-norm), num_heads, num_kv_heads, head_dim, rope_base,
    dtype, and optionally rope_scaling = (scaling, factor, original_length) (default
    plain RoPE; YaRN's temperature is folded into q).
  x: [B, L, d_model] in layer.dtype; positions: [B, L].
  Returns q [B, L, H, D], k, v [B, L, H_kv, D] in layer.dtype.
  """
  batch, length, _ = x.shape
  w = lambda param: param[...].astype(layer.dtype)
  q = (x @ w(layer.wq)).reshape(batch, length, layer.num_heads, layer.head_dim)
  k = (x @ w(layer.wk)).reshape(batch, length, layer.num_kv_heads, layer.head_dim)
  v = (x @ w(layer.wv)).reshape(batch, length, layer.num_kv_heads, layer.head_dim)
  if layer.q_norm is not None:
    q, k = layer.q_norm(q), layer.k_norm(k)
  scaling = getattr(layer, "rope_scaling", ("none", 1.0, None))
  freqs, mscale = rope.scaled_rope_frequencies(layer.head_dim, layer.rope_base, *scaling)
  q, k = rope.apply_rope(q, positions, freqs), rope.apply_rope(k, positions, freqs)
  if mscale != 1.0:  # YaRN temperature: logits * mscale^2
    q = q * jnp.asarray(mscale ** 2, q.dtype)
  return q, k, v


class Attention(nnx.Module):
  """Causal self-attention layer: q/k/v/o projections, RoPE, optional QK-norm and gate.

  With `window` set it is a sliding-window (local) layer whose decode cache is a
  ring buffer of `window` slots. `output_gate` is Qwen3-Next's gated attention:
  o <- o * sigmoid(x W_g) per head and channel, before W_o. `conv_size` > 0 first mixes
  the last `conv_size` tokens into each position, x <- x + causal_conv(x) (depthwise; a
  Canon-A layer, Allen-Zhu 2025): what the short conv of Qwen3-Next's linear layers gives
  them, so a position sees its predecessor without learning a previous-token head first
  (it speeds up learning induction/recall several-fold; the cache then keeps the last
  conv_size - 1 inputs).
  """

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
               rngs: nnx.Rngs, window: int | None = None, rope_base: float = 10_000.0,
               qk_norm: bool = False, output_gate: bool = False,
               implementation=None, dtype=jnp.float32, rope_scaling: str = "none",
               rope_scaling_factor: float = 1.0, rope_original_length: int = 0,
               conv_size: int = 0):
    common.check_window(window)
    if conv_size < 0 or conv_size == 1:
      raise ValueError(f"conv_size must be 0 (off) or >= 2, got {conv_size}")
    self.conv_size = conv_size
    self.conv = nnx.Param(jax.random.uniform(
        rngs.params(), (conv_size, d_model), minval=-1.0, maxval=1.0) / math.sqrt(conv_size)
    ) if conv_size else None
    init_projections(self, d_model, num_heads, num_kv_heads, head_dim, rngs=rngs, qk_norm=qk_norm)
    self.wg = nnx.Param(nnx.initializers.lecun_normal()(
        rngs.params(), (d_model, num_heads * head_dim))) if output_gate else None
    self.window = window
    self.rope_base = rope_base
    # Context extension (rope.scaled_rope_frequencies); checked here, applied in __call__.
    self.rope_scaling = (rope_scaling, rope_scaling_factor, rope_original_length or None)
    rope.scaled_rope_frequencies(head_dim, rope_base, *self.rope_scaling)
    self.implementation = implementation
    self.dtype = dtype

  def init_cache(self, batch: int, capacity: int, dtype=None) -> dict:
    """Cache for `capacity` tokens; a local layer keeps only min(window, capacity)."""
    if self.window is not None:
      capacity = min(capacity, self.window)
    cache = init_kv_cache(batch, capacity, self.num_kv_heads, self.head_dim, dtype or self.dtype)
    if self.conv is not None:
      cache["conv"] = jnp.zeros((batch, self.conv_size - 1, self.conv.shape[1]), dtype or self.dtype)
    return cache

  def cache_bytes_per_token(self, context: int, bytes_per_value: int = 2) -> float:
    """KV-cache bytes per token at a given context length (bounded for local layers)."""
    kept = context if self.window is None else min(context, self.window)
    conv = 0 if self.conv is None else (self.conv_size - 1) * self.conv.shape[1] * bytes_per_value
    return (2 * self.num_kv_heads * self.head_dim * bytes_per_value * kept + conv) / context

  def attend(self, q, k, v, segment_ids):
    """Training-time attention. Packed documents: RoPE positions restart per
    document while the mask follows the segments."""
    return attention(q, k, v, causal=True, window=self.window, segment_ids=segment_ids,
                     implementation=self.implementation)

  def output(self, out, x):
    """Attention output [B, L, H, D] -> [B, L, d_model]: the output gate (if any), W_o."""
    w = lambda param: param[...].astype(self.dtype)
    out = out.reshape(*out.shape[:2], self.num_heads * self.head_dim)
    if self.wg is not None:
      out = out * jax.nn.sigmoid(x @ w(self.wg))
    return out @ w(self.wo)

  def __call__(self, x, positions, *, cache: dict | None = None, segment_ids=None):
    """x: [B, L, d_model], positions: [B, L] -> ([B, L, d_model], new cache or None)."""
    x = x.astype(self.dtype)
    if self.conv is not None:
      tail = (jnp.zeros((x.shape[0], self.conv_size - 1, x.shape[2]), x.dtype) if cache is None
              else cache["conv"])
      mixed, tail = conv_lib.causal_conv(x, self.conv[...], tail, segment_ids)
      x = x + mixed
    q, k, v = project_qkv(self, x, positions)
    if cache is None:
      out = self.attend(q, k, v, segment_ids)
    else:
      kv_cache = {name: value for name, value in cache.items() if name != "conv"}
      out, cache = cached_attention(q, k, v, positions, kv_cache, window=self.window, scale=None,
                                    implementation=self.implementation)
      if self.conv is not None:
        cache["conv"] = tail.astype(kv_cache["k"].dtype)
    return self.output(out, x), cache
