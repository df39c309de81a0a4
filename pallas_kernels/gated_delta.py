"""Chunkwise gated delta rule (Gated DeltaNet) in Pallas (Triton lowering), with custom_vjp.

Math (per head; S [K, V]; chunks of C = 64 tokens; g = cumsum of log a inside the chunk;
D[t, j] = exp(g_t - g_j) for j <= t), see lca/attention/linear.py for the derivation:

  prep  (parallel over chunks)  A = strict_lower(diag(b) K K^T * D), T = (I + A)^{-1},
                                w = T diag(b e^g) K, u = T diag(b) V, P = scale Q K^T * D (causal)
  scan  (sequential in chunks)  U = u - w S;  O = scale e^g Q S + P U;
                                S <- e^{g_C} S + (e^{g_C - g} K)^T U

Kernels:
  _prep_kernel     grid (B, H, N): the UT transform by doubling, w, u, P;
  _forward_kernel  grid (B, H, V/block_v): the chunk scan; S stays in registers;
                   optionally stores the state at each chunk start (for the backward);
  _backward_kernel grid (B, H, V/block_v): the reverse scan of the state adjoint,
                   dU = P^T dO + (e^{g_C - g} K) dS', dS <- e^{g_C} dS' + (scale e^g Q)^T dO - w^T dU;
                   stores dS at every chunk end.
The backward then has every chunk's initial state and its end-state adjoint, so the
chunks are independent: the input gradients come from one Pallas program per chunk
(pallas_kernels/gated_delta_bwd.py), whose reference is the batched XLA vjp of the
per-chunk map (q, k, v, b, log a) -> (O, S_end) (`_chunk_local`).

The UT inverse's matmuls take fp16 operands by default: the same 10-bit mantissa as
1-pass tf32 at twice the tensor-core rate, and the values are bounded (|A| <= 1 with
unit-norm keys, b in (0, 1), decays <= 1). NOTES_gated_delta.md compares this with a
split of the scan into a state-only scan and a parallel output kernel (slower: the
states travel through HBM).

beta=None gives gated linear attention (u = v, no prep beyond P). NOTES_gated_delta.md
has the FLOP/byte counts and measurements.
"""

import dataclasses
import functools
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from pallas_kernels import gated_delta_bwd
from pallas_kernels import resolve_interpret

CHUNK = 64


@dataclasses.dataclass(frozen=True)
class Config:
  """Launch parameters. block_v: value columns per program of the scans (the state
  tile is [K, block_v] in registers)."""
  block_v: int = 16                # best of 16/32 at 64k on H100 (NOTES_gated_delta.md)
  inverse_precision: str = "fp16"  # UT-transform matmuls: "fp16", "tf32" or "tf32x3" (~fp32); the
                                   # three give equal end-to-end error on H100, fp16 in 1/5 the time
  num_warps_prep: int = 4
  num_warps_scan: int = 4
  num_stages: int = 3              # the scan's load pipeline: 3 is 1.4x faster than 2 at 64k
  # The backward's in-chunk gradients: the Pallas kernel's launch parameters, or "xla" for
  # its reference (one batched jax.vjp of `_chunk_local`, the path before the kernel).
  local_grads: gated_delta_bwd.Config | str = gated_delta_bwd.Config()


def _mm(a, b, dtype, *, trans_a=False, trans_b=False):
  """Matmul with operands cast to `dtype` (bf16 inputs: bf16 tensor cores, fp32 accumulation)."""
  return plgpu.dot(a.astype(dtype), b.astype(dtype), trans_a=trans_a, trans_b=trans_b)


def _mm_f32(a, b, interpret, mode="fp16"):
  """fp32 matmul for the UT transform: fp16 operands (the same 10-bit mantissa as tf32, at
  twice the tensor-core rate), 1-pass tf32, or 3-pass tf32 (~fp32) on the GPU; exact fp32
  when interpreted."""
  if interpret:
    return plgpu.dot(a, b, precision=lax.Precision.HIGHEST)
  if mode == "fp16":
    return plgpu.dot(a.astype(jnp.float16), b.astype(jnp.float16))
  precision = (lax.DotAlgorithmPreset.TF32_TF32_F32_X3 if mode == "tf32x3"
               else lax.DotAlgorithmPreset.TF32_TF32_F32)
  return plgpu.dot(a, b, precision=precision)


def _iota(shape, dim):
  return lax.broadcasted_iota(jnp.int32, shape, dim)


def _last(x):
  """x[-1] of a 1-D tile, without scalar indexing."""
  return jnp.sum(jnp.where(_iota(x.shape, 0) == x.shape[0] - 1, x, 0.0))


# ----------------------------------------------------------------------------- kernels


def _prep_kernel(q_ref, k_ref, v_ref, beta_ref, g_ref, p_ref, *out_refs, scale, delta, interpret,
                 mode):
  """One chunk of one head: P (and w, u with delta). Blocks: q, k [C, K], v [C, V], beta, g [C]."""
  q, k = q_ref[...], k_ref[...]
  dtype = q.dtype
  g = g_ref[...]
  rows, cols = _iota((CHUNK, CHUNK), 0), _iota((CHUNK, CHUNK), 1)
  decay = jnp.where(rows >= cols, jnp.exp(jnp.where(rows >= cols, g[:, None] - g[None, :], 0.0)), 0.0)
  p_ref[...] = (_mm(q, k, dtype, trans_b=True) * (scale * decay)).astype(p_ref.dtype)
  if not delta:
    return
  w_ref, u_ref = out_refs
  beta = beta_ref[...]
  a = jnp.where(rows > cols, _mm(k, k, dtype, trans_b=True) * beta[:, None] * decay, 0.0)
  # (I + A)^{-1} by doubling of the inverted diagonal blocks (see linear.unit_lower_inverse).
  t = jnp.where(rows == cols, 1.0, 0.0) - jnp.where(rows // 2 == cols // 2, a, 0.0)
  s = 2
  while s < CHUNK:
    off = jnp.where((rows // (2 * s) == cols // (2 * s)) & (rows // s != cols // s), a, 0.0)
    t = t - _mm_f32(_mm_f32(t, off, interpret, mode), t, interpret, mode)
    s *= 2
  kb = k.astype(jnp.float32) * (beta * jnp.exp(g))[:, None]
  vb = v_ref[...].astype(jnp.float32) * beta[:, None]
  w_ref[...] = _mm_f32(t, kb, interpret, mode).astype(w_ref.dtype)
  u_ref[...] = _mm_f32(t, vb, interpret, mode).astype(u_ref.dtype)


def _forward_kernel(q_ref, k_ref, u_ref, g_ref, p_ref, s0_ref, *refs, num_chunks, scale, delta,
                    store_states):
  """The chunk scan for one (batch, head, value block). Blocks are whole sequences."""
  refs = list(refs)
  w_ref = refs.pop(0) if delta else None
  o_ref, sT_ref = refs[:2]
  states_ref = refs[2] if store_states else None
  dtype = q_ref.dtype
  head_k = q_ref.shape[-1]

  def body(n, state):
    rows = pl.ds(n * CHUNK, CHUNK)
    if store_states:
      states_ref[pl.ds(n * head_k, head_k), :] = state.astype(states_ref.dtype)
    g = g_ref[rows]
    g_last = _last(g)
    u = u_ref[rows, :].astype(jnp.float32)
    if delta:
      u = u - _mm(w_ref[rows, :], state, dtype)
    qg = q_ref[rows, :].astype(jnp.float32) * (scale * jnp.exp(g))[:, None]
    o = _mm(qg, state, dtype) + _mm(p_ref[rows, :], u, dtype)
    o_ref[rows, :] = o.astype(o_ref.dtype)
    kg = k_ref[rows, :].astype(jnp.float32) * jnp.exp(g_last - g)[:, None]
    return jnp.exp(g_last) * state + _mm(kg, u, dtype, trans_a=True)

  state = lax.fori_loop(0, num_chunks, body, s0_ref[...].astype(jnp.float32))
  sT_ref[...] = state


def _backward_kernel(q_ref, k_ref, g_ref, p_ref, do_ref, dsT_ref, *refs, num_chunks, scale, delta):
  """Reverse scan of the state adjoint for one (batch, head, value block)."""
  refs = list(refs)
  w_ref = refs.pop(0) if delta else None
  dstates_ref, ds0_ref = refs
  dtype = q_ref.dtype
  head_k = q_ref.shape[-1]

  def body(i, dstate):
    n = num_chunks - 1 - i
    rows = pl.ds(n * CHUNK, CHUNK)
    dstates_ref[pl.ds(n * head_k, head_k), :] = dstate
    g = g_ref[rows]
    g_last = _last(g)
    do = do_ref[rows, :]
    kg = k_ref[rows, :].astype(jnp.float32) * jnp.exp(g_last - g)[:, None]
    du = _mm(p_ref[rows, :], do, dtype, trans_a=True) + _mm(kg, dstate, dtype)
    qg = q_ref[rows, :].astype(jnp.float32) * (scale * jnp.exp(g))[:, None]
    dstate = jnp.exp(g_last) * dstate + _mm(qg, do, dtype, trans_a=True)
    if delta:
      dstate = dstate - _mm(w_ref[rows, :], du, dtype, trans_a=True)
    return dstate

  ds0_ref[...] = lax.fori_loop(0, num_chunks, body, dsT_ref[...].astype(jnp.float32))


# ----------------------------------------------------------------------------- launchers


def _launch_prep(q, k, v, beta, g, *, scale, delta, cfg, interpret):
  batch, length, heads, head_k = q.shape
  head_v = v.shape[-1]
  n = length // CHUNK
  tile = lambda d: pl.BlockSpec((None, CHUNK, None, d), lambda b, h, c: (b, c, h, 0))
  vec = pl.BlockSpec((None, CHUNK, None), lambda b, h, c: (b, c, h))
  p_spec = pl.BlockSpec((None, None, CHUNK, CHUNK), lambda b, h, c: (b, h, c, 0))
  out_shape = [jax.ShapeDtypeStruct((batch, heads, length, CHUNK), q.dtype)]
  out_specs = [p_spec]
  if delta:
    out_shape += [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(v.shape, q.dtype)]
    out_specs += [tile(head_k), tile(head_v)]
  return pl.pallas_call(
      functools.partial(_prep_kernel, scale=scale, delta=delta, interpret=interpret,
                        # fp32 inputs ask for fp32 accuracy: 3-pass tf32
                        mode="tf32x3" if q.dtype == jnp.float32 else cfg.inverse_precision),
      grid=(batch, heads, n),
      in_specs=[tile(head_k), tile(head_k), tile(head_v), vec, vec],
      out_specs=out_specs, out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps_prep, num_stages=1),
      interpret=interpret, name="gated_delta_prep",
  )(q, k, v, beta, g)


def _scan_specs(length, head_k, head_v, block_v, num_chunks):
  whole = lambda d: pl.BlockSpec((None, length, None, d), lambda b, h, j: (b, 0, h, 0))
  vcols = pl.BlockSpec((None, length, None, block_v), lambda b, h, j: (b, 0, h, j))
  vec = pl.BlockSpec((None, length, None), lambda b, h, j: (b, 0, h))
  p = pl.BlockSpec((None, None, length, CHUNK), lambda b, h, j: (b, h, 0, 0))
  state = pl.BlockSpec((None, None, head_k, block_v), lambda b, h, j: (b, h, 0, j))
  states = pl.BlockSpec((None, None, num_chunks * head_k, block_v), lambda b, h, j: (b, h, 0, j))
  return whole, vcols, vec, p, state, states


def _launch_forward(q, k, u, g, p, s0, w, *, scale, delta, store_states, cfg, interpret):
  batch, length, heads, head_k = q.shape
  head_v = u.shape[-1]
  n = length // CHUNK
  block_v = min(cfg.block_v, head_v)
  whole, vcols, vec, p_spec, state, states = _scan_specs(length, head_k, head_v, block_v, n)
  in_specs = [whole(head_k), whole(head_k), vcols, vec, p_spec, state] + ([whole(head_k)] if delta else [])
  out_shape = [jax.ShapeDtypeStruct((batch, length, heads, head_v), q.dtype),
               jax.ShapeDtypeStruct((batch, heads, head_k, head_v), jnp.float32)]
  out_specs = [vcols, state]
  if store_states:
    out_shape.append(jax.ShapeDtypeStruct((batch, heads, n * head_k, head_v), jnp.float32))
    out_specs.append(states)
  args = [q, k, u, g, p, s0] + ([w] if delta else [])
  return pl.pallas_call(
      functools.partial(_forward_kernel, num_chunks=n, scale=scale, delta=delta,
                        store_states=store_states),
      grid=(batch, heads, head_v // block_v), in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps_scan, num_stages=cfg.num_stages),
      interpret=interpret, name="gated_delta_forward",
  )(*args)


def _launch_backward(q, k, g, p, do, dsT, w, *, scale, delta, cfg, interpret):
  batch, length, heads, head_k = q.shape
  head_v = do.shape[-1]
  n = length // CHUNK
  block_v = min(cfg.block_v, head_v)
  whole, vcols, vec, p_spec, state, states = _scan_specs(length, head_k, head_v, block_v, n)
  in_specs = [whole(head_k), whole(head_k), vec, p_spec, vcols, state] + ([whole(head_k)] if delta else [])
  out_shape = [jax.ShapeDtypeStruct((batch, heads, n * head_k, head_v), jnp.float32),
               jax.ShapeDtypeStruct((batch, heads, head_k, head_v), jnp.float32)]
  args = [q, k, g, p, do, dsT] + ([w] if delta else [])
  return pl.pallas_call(
      functools.partial(_backward_kernel, num_chunks=n, scale=scale, delta=delta),
      grid=(batch, heads, head_v // block_v), in_specs=in_specs, out_specs=[states, state],
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps_scan, num_stages=cfg.num_stages),
      interpret=interpret, name="gated_delta_backward",
  )(*args)


# ----------------------------------------------------------------------------- per-chunk map (XLA)


def _chunk_local(q, k, v, beta, log_alpha, state, *, scale, delta, precision):
  """One chunk given its initial state -> (O, S_end); every input [B, H, N, C, ...].

  Plain jnp, used by the backward as a batched vjp over all chunks at once.
  """
  f32 = lambda x: x.astype(jnp.float32)
  mm = functools.partial(jnp.matmul, precision=precision)
  q, k, v = f32(q), f32(k), f32(v)
  g = jnp.cumsum(f32(log_alpha), axis=-1)
  rows, cols = _iota((CHUNK, CHUNK), 0), _iota((CHUNK, CHUNK), 1)
  decay = jnp.exp(jnp.where(rows >= cols, g[..., :, None] - g[..., None, :], -jnp.inf))
  p = scale * mm(q, jnp.swapaxes(k, -1, -2)) * decay
  u = v
  if delta:
    beta = f32(beta)
    a = jnp.where(rows > cols, beta[..., :, None] * mm(k, jnp.swapaxes(k, -1, -2)) * decay, 0.0)
    t = jnp.eye(CHUNK, dtype=jnp.float32) - jnp.where(rows // 2 == cols // 2, a, 0.0)
    s = 2
    while s < CHUNK:
      off = jnp.where((rows // (2 * s) == cols // (2 * s)) & (rows // s != cols // s), a, 0.0)
      t = t - mm(mm(t, off), t)
      s *= 2
    w = mm(t, (beta * jnp.exp(g))[..., None] * k)
    u = mm(t, beta[..., None] * v) - mm(w, state)
  o = mm(scale * jnp.exp(g)[..., None] * q, state) + mm(p, u)
  kg = jnp.exp(g[..., -1:] - g)[..., None] * k
  s_end = jnp.exp(g[..., -1])[..., None, None] * state + mm(jnp.swapaxes(kg, -1, -2), u)
  return o, s_end


def _chunks(x):
  """[B, Lp, H, ...] -> [B, H, N, C, ...]."""
  x = x.reshape(x.shape[0], -1, CHUNK, *x.shape[2:])
  return jnp.moveaxis(x, 3, 1)


def _unchunks(x):
  """[B, H, N, C, ...] -> [B, Lp, H, ...]."""
  x = jnp.moveaxis(x, 1, 3)
  return x.reshape(x.shape[0], -1, *x.shape[3:])


# ----------------------------------------------------------------------------- custom_vjp


def _forward(q, k, v, beta, log_alpha, s0, *, scale, delta, store_states, cfg, interpret):
  """Padded inputs [B, Lp, H, *] -> (o, final state, states or None, residual tensors)."""
  batch, length, heads, _ = q.shape
  g = jnp.cumsum(log_alpha.astype(jnp.float32).reshape(batch, -1, CHUNK, heads), axis=2)
  g = g.reshape(batch, length, heads)
  outs = _launch_prep(q, k, v, beta, g, scale=scale, delta=delta, cfg=cfg, interpret=interpret)
  p, (w, u) = outs[0], (outs[1:] if delta else (None, v))
  outs = _launch_forward(q, k, u, g, p, s0, w, scale=scale, delta=delta,
                         store_states=store_states, cfg=cfg, interpret=interpret)
  states = outs[2] if store_states else None
  return outs[0], outs[1], states, (g, p, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _gated_delta(q, k, v, beta, log_alpha, s0, scale, delta, cfg, interpret):
  o, s_end, _, _ = _forward(q, k, v, beta, log_alpha, s0, scale=scale, delta=delta,
                            store_states=False, cfg=cfg, interpret=interpret)
  return o, s_end


def _gated_delta_fwd(q, k, v, beta, log_alpha, s0, scale, delta, cfg, interpret):
  o, s_end, states, (g, p, w) = _forward(q, k, v, beta, log_alpha, s0, scale=scale, delta=delta,
                                         store_states=True, cfg=cfg, interpret=interpret)
  return (o, s_end), (q, k, v, beta, log_alpha, g, p, w, states)


def _gated_delta_bwd(scale, delta, cfg, interpret, res, cotangents):
  q, k, v, beta, log_alpha, g, p, w, states = res
  do, ds_end = cotangents
  dstates, ds0 = _launch_backward(q, k, g, p, do.astype(q.dtype), ds_end.astype(jnp.float32), w,
                                  scale=scale, delta=delta, cfg=cfg, interpret=interpret)
  # Every chunk now has its initial state and its end-state adjoint: the chunks are
  # independent, one Pallas program each (gated_delta_bwd; `_chunk_local` is its reference).
  if cfg.local_grads == "xla":
    local_grads, local_cfg = gated_delta_bwd.chunk_local_grads_reference, gated_delta_bwd.Config()
  else:
    local_grads, local_cfg = gated_delta_bwd.chunk_local_grads, cfg.local_grads
  dq, dk, dv, dbeta, dlog_alpha = local_grads(q, k, v, beta, log_alpha, states, dstates, do,
                                              scale=scale, delta=delta, interpret=interpret,
                                              config=local_cfg)
  return dq, dk, dv, dbeta, dlog_alpha, ds0


_gated_delta.defvjp(_gated_delta_fwd, _gated_delta_bwd)


def chunk_gated_delta_rule(q, k, v, beta, log_alpha, *, scale=None, initial_state=None,
                           config: Config = Config(), interpret=None):
  """Gated delta rule (beta None: gated linear attention) -> (o [B, L, H, V], state [B, H, K, V]).

  q, k: [B, L, H, K]; v: [B, L, H, V]; beta, log_alpha: [B, L, H] (log_alpha <= 0);
  initial_state: [B, H, K, V] float32 or None. K and V must be powers of two >= 16;
  any L (zero-padded to a multiple of 64). Differentiable in all array arguments.
  """
  batch, length, heads, head_k = q.shape
  head_v = v.shape[-1]
  for name, d in (("K (q/k head_dim)", head_k), ("V (v head_dim)", head_v)):
    if d < 16 or d & (d - 1):
      raise NotImplementedError(f"pallas gated delta rule needs {name} a power of two >= 16, got {d}")
  if k.dtype != q.dtype or v.dtype != q.dtype:
    raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
  interpret = resolve_interpret(interpret)
  scale = 1.0 / math.sqrt(head_k) if scale is None else float(scale)
  delta = beta is not None
  pad = -length % CHUNK
  padded = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  beta = jnp.zeros(q.shape[:3], jnp.float32) if beta is None else beta.astype(jnp.float32)
  s0 = (jnp.zeros((batch, heads, head_k, head_v), jnp.float32) if initial_state is None
        else initial_state.astype(jnp.float32))
  o, state = _gated_delta(padded(q), padded(k), padded(v), padded(beta),
                          padded(log_alpha.astype(jnp.float32)), s0, scale, delta, config, interpret)
  return o[:, :length], state
