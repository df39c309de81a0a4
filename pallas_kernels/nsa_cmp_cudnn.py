"""NSA's compressed branch as one square causal attention, so cuDNN's flash kernels can run it.

Position t sees the compressed blocks i that end at or before it: i·d + l - 1 <= t, that is
i <= j(t) = (t - l + 1) // d. The d positions t = l - 1 + j·d + r (r < d) all see blocks 0..j,
so the branch is causal attention over Nc "positions" j, each of which holds the d·G query rows
of a GQA group: q at (t, head g·G + h) becomes row j, head (g·d + r)·G + h of a
[B, Nc, H_kv·d·G, D] query. Head block g still maps to kv head g, and the compressed keys
[B, Nc, H_kv, D] are used as they are. Positions t < l - 1 see no block (o = 0, LSE2 = +inf).
The FLOPs are the branch's own (no mask is wasted beyond causal attention's diagonal tiles).

This is not a Pallas kernel. It is the paper's own choice: "compression and sliding window
attention are compatible with existing FlashAttention-2 kernels" (NSA §3.4). The Pallas kernels
(`pallas_kernels.nsa._cmp_attention`) stay the CPU path and the fallback.

  to_causal(q, ...)                       [B, L, H, D] -> [B, Nc, H_kv·d·G, D]
  from_causal(x, ...)                     [B, Nc, H_kv·d·G, ...] -> [B, L, H, ...], `fill` before l - 1
  compressed_attention(q, kc, vc, ...)    -> o [B, L, H, Dv], LSE2 [B, L, H] (+inf = none)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels import pad_axis

LOG2E = math.log2(math.e)


def to_causal(q, *, num_compressed: int, num_kv_heads: int, block_len: int, block_stride: int):
  """q [B, L, H, D] -> [B, Nc, H_kv·d·G, D]; row j, head (g·d + r)·G + h holds position
  l - 1 + j·d + r, head g·G + h (positions past L are zeros; Nc may exceed the block count)."""
  batch, _, heads, dim = q.shape
  nc, d, g = num_compressed, block_stride, heads // num_kv_heads
  x = pad_axis(q[:, block_len - 1:], 1, nc * d)     # L - l + 1 <= Nc·d positions
  x = x.reshape(batch, nc, d, num_kv_heads, g, dim).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(batch, nc, heads * d, dim)


def from_causal(x, *, length: int, num_kv_heads: int, block_len: int, block_stride: int, fill=0.0):
  """Inverse of `to_causal` for x [B, Nc, H_kv·d·G, *rest] -> [B, L, H, *rest]; the l - 1 first
  positions, which see no compressed block, hold `fill`."""
  batch, nc, rows, *rest = x.shape
  d = block_stride
  g = rows // (num_kv_heads * d)
  x = x.reshape(batch, nc, num_kv_heads, d, g, *rest).swapaxes(2, 3)
  x = x.reshape(batch, nc * d, num_kv_heads * g, *rest)[:, :length - (block_len - 1)]
  widths = [(0, 0), (block_len - 1, 0)] + [(0, 0)] * (x.ndim - 2)
  return jnp.pad(x, widths, constant_values=fill)


def cudnn_causal(q, k, v, scale: float):
  """cuDNN's causal flash attention with its softmax statistics: q [B, T, N, D], k [B, T, K, D],
  v [B, T, K, Dv] -> o [B, T, N, Dv], LSE [B, N, T] (natural log of sum exp(scale·q·k), fp32).

  jax.nn.dot_product_attention does not return the LSE; jax's cuDNN module beneath it does
  (`return_residual`). That module is private to jax, so what it refuses, or its absence, is a
  NotImplementedError here."""
  try:
    from jax._src.cudnn import fused_attention_stablehlo as cudnn  # pylint: disable=g-import-not-at-top
    return cudnn.dot_product_attention(q, k, v, scale=scale, mask_type=cudnn.MaskType.CAUSAL,
                                       return_residual=True)
  except (ImportError, AttributeError, TypeError, ValueError, NotImplementedError, RuntimeError) as e:
    raise NotImplementedError(f"the compressed branch on cuDNN: {type(e).__name__}: {e}") from e


def compressed_attention(q, kc, vc, *, block_len: int, block_stride: int, scale: float,
                         attention=cudnn_causal):
  """q [B, L, H, D], kc [B, Nc, H_kv, D], vc [B, Nc, H_kv, Dv] -> o [B, L, H, Dv] in q's dtype,
  LSE2 [B, L, H] fp32 (log2 domain as the Pallas kernels', +inf for a position that sees no block;
  no gradient flows through it).

  attention(q', kc, vc, scale) -> (o', natural-log LSE [B, N, T]): `cudnn_causal`, or any causal
  attention with that contract (the CPU tests pass a plain-jnp one)."""
  if kc.shape[1] == 0:   # L < l: no block has ended yet
    return (jnp.zeros((*q.shape[:3], vc.shape[-1]), q.dtype), jnp.full(q.shape[:3], jnp.inf, jnp.float32))
  # an even number of positions j: jax's cuDNN path refuses odd lengths when it differentiates
  # ("Unsupported sequence length Q 4095, KV 4095" at 64k). A zero key past the last block is seen
  # only by the padded rows j >= Nc, which are dropped.
  n = kc.shape[1] + kc.shape[1] % 2
  kc, vc = pad_axis(kc, 1, n), pad_axis(vc, 1, n)
  layout = dict(num_kv_heads=kc.shape[2], block_len=block_len, block_stride=block_stride)
  o, lse = attention(to_causal(q, num_compressed=n, **layout), kc, vc, scale)
  o = from_causal(o, length=q.shape[1], **layout)
  lse = jax.lax.stop_gradient(lse).swapaxes(1, 2) * LOG2E       # [B, Nc, N]
  return o.astype(q.dtype), from_causal(lse, length=q.shape[1], fill=jnp.inf, **layout)
