"""In-chunk backward of the chunkwise gated delta rule in Pallas (Triton lowering).

The backward of `pallas_kernels.gated_delta` first runs a reverse scan that yields every
chunk's initial state S and its end-state adjoint dS'. The chunks are then independent:
this kernel gives the gradients of the per-chunk map (q, k, v, b, log a | S) -> (O, S')
(`gated_delta._chunk_local`) for all chunks, one program per (batch, head, chunk).

Forward of one chunk (C = 64 rows; S [K, V]; rows of K, Q are k_t, q_t):
  g = cumsum(log a),  D[t, j] = e^{g_t - g_j} (j <= t, else 0),  E = diag(e^g),
  P = scale (Q K^T) ⊙ D,   A = strict_lower(diag(b) (K K^T) ⊙ D),   T = (I + A)^{-1},
  X = diag(b) V - E diag(b) K S,   U = T X          (beta=None: U = V)
  O = scale E Q S + P U,   S' = e^{g_C} S + K̃^T U,   K̃ = diag(e^{g_C - g}) K.
Backward, given dO and dS' (sums over V are split in blocks of `block_v` and accumulated):
  dU = P^T dO + K̃ dS'                       dP = dO U^T,   P̄ = dP ⊙ D
  dQ = scale E dO S^T + scale P̄ K            dK = scale P̄^T Q + diag(e^{g_C - g}) U dS'^T
  delta:  dT = dU X^T,  dX = T^T dU,  dA = -strict_lower(T^T dT T^T)
          dV = diag(b) dX,   dK += -diag(b e^g) dX S^T + G K + G^T K,  G = diag(b) (dA ⊙ D)
          db = rowsum(dX ⊙ V) + e^g ⊙ r2 + rowsum(dA ⊙ K K^T ⊙ D),   r2 = rowsum(K ⊙ (-dX S^T))
  GLA:    dV = dU
  dg (the decay terms; Z = scale P̄ ⊙ Q K^T + dA ⊙ A, the adjoint of D times D):
     dg = rowsum(Z) - colsum(Z) + rowsum(Q ⊙ scale E dO S^T) - e^{g_C - g} ⊙ r1 + b e^g ⊙ r2,
          r1 = rowsum(K ⊙ U dS'^T);   dg_C += e^{g_C} <S, dS'> + Σ_t e^{g_C - g_t} r1_t
  dlog a = reverse cumsum of dg within the chunk.

Precision: with bf16 inputs the products of q/k/v/S-sized tiles run as bf16 tensor-core
matmuls with fp32 accumulation (as the forward); the UT inverse and its adjoint (T, U = T X,
dT, dX = T^T dU, dA) run in fp32 on 1-pass tf32 (`Config.inverse_precision`). fp32 inputs:
full fp32 (HIGHEST) everywhere.
"""

import dataclasses
import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from pallas_kernels import resolve_interpret

CHUNK = 64


@dataclasses.dataclass(frozen=True)
class Config:
  """block_v: value columns per step of the in-program loop over V (the [K, block_v]
  slices of S and dS' and the [C, block_v] slices of v, dO, U are live at once).
  None: the best measured at 64k on H100 (NOTES_gated_delta.md), block_v 16 / 4 warps
  with the delta rule, 32 / 8 warps without."""
  block_v: int | None = None
  inverse_precision: str = "tf32"  # "tf32" (1-pass) or "tf32x3" on GPU; HIGHEST when interpreted
  num_warps: int | None = None
  num_stages: int = 1
  unroll: bool = False  # loop over V blocks in Python (static slices) instead of lax.fori_loop

  def resolved(self, delta: bool) -> "Config":
    block_v, num_warps = (16, 4) if delta else (32, 8)
    return dataclasses.replace(self, block_v=self.block_v or block_v,
                               num_warps=self.num_warps or num_warps)


def _iota(shape, dim):
  return lax.broadcasted_iota(jnp.int32, shape, dim)


def _last(x):
  """x[-1] of a 1-D tile, without scalar indexing."""
  return jnp.sum(jnp.where(_iota(x.shape, 0) == x.shape[0] - 1, x, 0.0))


def _precisions(dtype, interpret, inverse_precision):
  """(precision of the q/k/v/S-tile matmuls, precision of the inverse-path matmuls)."""
  if interpret:
    return lax.Precision.HIGHEST, lax.Precision.HIGHEST
  main = lax.Precision.HIGHEST if dtype == jnp.float32 else None
  inv = (lax.DotAlgorithmPreset.TF32_TF32_F32_X3 if inverse_precision == "tf32x3"
         else lax.DotAlgorithmPreset.TF32_TF32_F32)
  return main, (lax.Precision.HIGHEST if dtype == jnp.float32 else inv)


def _unit_lower_inverse(a, mm_f32):
  """(I + A)^{-1} for strictly lower-triangular A [C, C], by doubling of diagonal blocks."""
  rows, cols = _iota(a.shape, 0), _iota(a.shape, 1)
  t = jnp.where(rows == cols, 1.0, 0.0) - jnp.where(rows // 2 == cols // 2, a, 0.0)
  s = 2
  while s < a.shape[0]:
    off = jnp.where((rows // (2 * s) == cols // (2 * s)) & (rows // s != cols // s), a, 0.0)
    t = t - mm_f32(mm_f32(t, off), t)
    s *= 2
  return t


def _bwd_kernel(q_ref, k_ref, v_ref, do_ref, beta_ref, la_ref, s_ref, ds_ref, dq_ref, dk_ref,
                dv_ref, *out_refs, scale, delta, block_v, interpret, inverse_precision, unroll):
  """One chunk of one head. Blocks: q, k [C, K]; v, dO [C, V]; beta, log a [C]; S, dS' [K, V].

  Registers: only T, P, K, the accumulators dP, dT [C, C], dQ, dK [C, K] and [C] vectors live
  across the loop over V blocks; Q K^T, K K^T and the decay are recomputed after it, and
  the row sums with K use K S and K dS' (rowsum(K ⊙ U dS'^T) = rowsum(K dS' ⊙ U)).
  """
  k = k_ref[...]
  dtype = k.dtype
  prec, prec_inv = _precisions(dtype, interpret, inverse_precision)

  def mm(a, b, **kw):  # q/k/v/S-sized products: input dtype, fp32 accumulation
    return plgpu.dot(a.astype(dtype), b.astype(dtype), precision=prec, **kw)

  def mm_f32(a, b, **kw):  # the UT inverse and its adjoint
    return plgpu.dot(a, b, precision=prec_inv, **kw)

  head_k, head_v = k.shape[-1], v_ref.shape[-1]
  rows, cols = _iota((CHUNK, CHUNK), 0), _iota((CHUNK, CHUNK), 1)
  causal, strict = rows >= cols, rows > cols
  g = jnp.sum(jnp.where(causal, la_ref[...][None, :], 0.0), axis=1)  # cumsum in the chunk
  g_last = _last(g)
  eg, ekd = jnp.exp(g), jnp.exp(g_last - g)
  decay = lambda: jnp.where(causal, jnp.exp(jnp.where(causal, g[:, None] - g[None, :], 0.0)), 0.0)
  p = (mm(q_ref[...], k, trans_b=True) * (scale * decay())).astype(dtype)
  if delta:
    b = beta_ref[...]
    beg = b * eg
    t = _unit_lower_inverse(jnp.where(strict, mm(k, k, trans_b=True) * decay(), 0.0) * b[:, None],
                            mm_f32)

  def body(j, carry):
    dp, dt, dq_s, dk_acc, r1, r2, rb, s_ds = carry
    vcols = slice(j * block_v, (j + 1) * block_v) if unroll else pl.ds(j * block_v, block_v)
    v = v_ref[:, vcols].astype(jnp.float32)
    do = do_ref[:, vcols]
    s, ds = s_ref[:, vcols], ds_ref[:, vcols]
    kds = mm(k, ds)
    if delta:
      ks = mm(k, s)
      x = (v - eg[:, None] * ks) * b[:, None]
      u = mm_f32(t, x)
    else:
      u = v
    du = mm(p, do, trans_a=True) + ekd[:, None] * kds
    dp = dp + mm(do, u, trans_b=True)
    dq_s = dq_s + mm(do, s, trans_b=True)
    dk_acc = dk_acc + mm(u * ekd[:, None], ds, trans_b=True)
    r1 = r1 + jnp.sum(kds * u, axis=1)
    s_ds = s_ds + jnp.sum(s * ds, axis=1)
    if delta:
      dt = dt + mm_f32(du, x, trans_b=True)
      dx = mm_f32(t, du, trans_a=True)
      dv = dx * b[:, None]
      rb = rb + jnp.sum(dx * v, axis=1)
      r2 = r2 - jnp.sum(dx * ks, axis=1)
      dk_acc = dk_acc - mm(dx * beg[:, None], s, trans_b=True)
    else:
      dv = du
    dv_ref[:, vcols] = dv.astype(dv_ref.dtype)
    return dp, dt, dq_s, dk_acc, r1, r2, rb, s_ds

  zeros = lambda *shape: jnp.zeros(shape, jnp.float32)
  carry = (zeros(CHUNK, CHUNK), zeros(CHUNK, CHUNK), zeros(CHUNK, head_k), zeros(CHUNK, head_k),
           zeros(CHUNK), zeros(CHUNK), zeros(CHUNK), zeros(head_k))
  if unroll:
    for j in range(head_v // block_v):
      carry = body(j, carry)
  else:
    carry = lax.fori_loop(0, head_v // block_v, body, carry)
  dp, dt, dq_s, dk, r1, r2, rb, s_ds = carry

  q = q_ref[...]
  d = decay()
  qk = mm(q, k, trans_b=True)
  pbar = dp * d
  dq = (scale * eg)[:, None] * dq_s
  dg = jnp.sum(q.astype(jnp.float32) * dq, axis=1) - ekd * r1
  dq = dq + scale * mm(pbar, k)
  dk = dk + scale * mm(pbar, q, trans_a=True)
  z = scale * pbar * qk
  dg_last = jnp.exp(g_last) * jnp.sum(s_ds) + jnp.sum(ekd * r1)
  if delta:
    kkd = jnp.where(strict, mm(k, k, trans_b=True) * d, 0.0)
    da = -jnp.where(strict, mm_f32(mm_f32(t, dt, trans_a=True), t, trans_b=True), 0.0)
    z = z + da * kkd * b[:, None]
    gm = da * d * b[:, None]
    dk = dk + mm(gm, k) + mm(gm, k, trans_a=True)
    dg = dg + beg * r2
    out_refs[0][...] = rb + eg * r2 + jnp.sum(da * kkd, axis=1)
  dg = dg + jnp.sum(z, axis=1) - jnp.sum(z, axis=0)
  dg = dg + jnp.where(_iota((CHUNK,), 0) == CHUNK - 1, dg_last, 0.0)
  dq_ref[...] = dq.astype(dq_ref.dtype)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  out_refs[-1][...] = jnp.sum(jnp.where(causal, dg[:, None], 0.0), axis=0)  # reverse cumsum


def chunk_local_grads(q, k, v, beta, log_alpha, states, dstates, do, *, scale, delta,
                      interpret=None, config: Config = Config()):
  """Gradients of every chunk's (q, k, v, b, log a) -> (O, S_end) given S and dS_end.

  q, k: [B, Lp, H, K]; v, do: [B, Lp, H, V]; beta, log_alpha: [B, Lp, H] float32 (beta
  unused, may be None, when delta is False);
  states, dstates: [B, H, N*K, V] float32 (chunk n's initial state and end-state adjoint
  in rows n*K:(n+1)*K); Lp = 64 N. Returns (dq, dk, dv, dbeta, dlog_alpha) in the dtypes
  of q, k, v, beta, log_alpha (dbeta zero when delta is False), equal to
  `chunk_local_grads_reference`.
  """
  batch, length, heads, head_k = q.shape
  head_v = v.shape[-1]
  if beta is None:
    if delta:
      raise ValueError("chunk_local_grads with delta=True needs beta, got None")
    beta = jnp.zeros(log_alpha.shape, jnp.float32)
  if length % CHUNK:
    raise ValueError(f"chunk_local_grads needs Lp a multiple of {CHUNK}, got q.shape {q.shape}")
  n = length // CHUNK
  if states.shape != (batch, heads, n * head_k, head_v) or dstates.shape != states.shape:
    raise ValueError(f"states/dstates must be {(batch, heads, n * head_k, head_v)}, got "
                     f"{states.shape}, {dstates.shape}")
  config = config.resolved(delta)
  block_v = min(config.block_v, head_v)
  if head_v % block_v:
    raise ValueError(f"config.block_v ({config.block_v}) must divide V ({head_v})")
  interpret = resolve_interpret(interpret)
  tile = lambda d: pl.BlockSpec((None, CHUNK, None, d), lambda b, h, c: (b, c, h, 0))
  vec = pl.BlockSpec((None, CHUNK, None), lambda b, h, c: (b, c, h))
  state = pl.BlockSpec((None, None, head_k, head_v), lambda b, h, c: (b, h, c, 0))
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
               jax.ShapeDtypeStruct(v.shape, v.dtype)]
  out_specs = [tile(head_k), tile(head_k), tile(head_v)]
  vec_out = jax.ShapeDtypeStruct(log_alpha.shape, jnp.float32)
  out_shape += [vec_out, vec_out] if delta else [vec_out]
  out_specs += [vec, vec] if delta else [vec]
  outs = pl.pallas_call(
      functools.partial(_bwd_kernel, scale=scale, delta=delta, block_v=block_v,
                        interpret=interpret, inverse_precision=config.inverse_precision,
                        unroll=config.unroll),
      grid=(batch, heads, n),
      in_specs=[tile(head_k), tile(head_k), tile(head_v), tile(head_v), vec, vec, state, state],
      out_specs=out_specs, out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                           num_stages=config.num_stages),
      interpret=interpret, name="gated_delta_chunk_bwd",
  )(q, k, v, do.astype(q.dtype), beta.astype(jnp.float32), log_alpha.astype(jnp.float32),
    states, dstates)
  dq, dk, dv = outs[:3]
  dbeta = outs[3] if delta else jnp.zeros(beta.shape, jnp.float32)
  return dq, dk, dv, dbeta.astype(beta.dtype), outs[-1].astype(log_alpha.dtype)


def chunk_local_grads_reference(q, k, v, beta, log_alpha, states, dstates, do, *, scale, delta,
                                interpret=None, config: Config = Config()):
  """`chunk_local_grads` as one batched XLA jax.vjp of `gated_delta._chunk_local` (the
  backward's path before this kernel). Same signature; interpret and config are unused."""
  del interpret, config
  from pallas_kernels import gated_delta  # pylint: disable=g-import-not-at-top
  batch, length, heads, head_k = q.shape
  head_v = v.shape[-1]
  n = length // CHUNK
  as_chunks = lambda s: s.reshape(batch, heads, n, head_k, head_v)
  precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else lax.Precision.DEFAULT
  local = functools.partial(gated_delta._chunk_local, state=as_chunks(states), scale=scale,
                            delta=delta, precision=precision)
  chunks = gated_delta._chunks
  _, vjp = jax.vjp(local, chunks(q), chunks(k), chunks(v), chunks(beta), chunks(log_alpha))
  grads = vjp((chunks(do).astype(jnp.float32), as_chunks(dstates)))
  return tuple(gated_delta._unchunks(x).astype(x_in.dtype)
               for x, x_in in zip(grads, (q, k, v, beta, log_alpha)))
