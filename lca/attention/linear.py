"""Linear attention, gated linear attention and the gated delta rule (Gated DeltaNet).

All three are recurrences over a matrix state S [K, V] per head (o_t = scale * q_t S_t):

  linear          S_t = S_{t-1} + k_t v_t^T               (optional normalizer z_t = sum k)
  gated linear    S_t = a_t S_{t-1} + k_t v_t^T           (a_t in (0, 1) per head: Mamba-2 / RetNet)
  gated delta     S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T   (arXiv 2412.06464)

(S is stored [K, V], the transpose of the papers' [V, K]; q and k are L2-normalized
by the layer, not here.) Faces, in order of trust:

  gated_delta_rule_reference(...)      step by step (`gated_delta_rule_step` under lax.scan);
  gated_delta_rule_chunked(...)        chunkwise-parallel (chunk 64, WY/UT form), plain XLA;
  gated_delta_rule(..., implementation=)  "pallas" (pallas_kernels.gated_delta), "chunked",
                                       "reference";
  gated_delta_rule_step(...)           one decoding step on the fixed-size state.

`beta=None` turns the gated delta rule into gated linear attention (u = v), so the
same chunked code and kernel serve both. Layout: q, k [B, L, H, K], v [B, L, H, V],
beta and log_alpha [B, L, H] (log_alpha = log a_t <= 0), state [B, H, K, V] float32.

Chunkwise form (per chunk of C tokens, g = cumsum(log a) inside the chunk, gamma = e^g,
D[t, j] = e^{g_t - g_j} for j <= t). Writing S_t = a_t S_{t-1} + k_t u_t^T with
u_t = b_t (v_t - a_t S_{t-1}^T k_t) and unrolling from the chunk's initial state S_0:

  A = strict_lower(diag(b) K K^T * D),  T = (I + A)^{-1}      (the UT transform)
  w = T diag(b gamma) K,  u = T diag(b) V                      (the WY representation)
  U = u - w S_0
  O = scale * (diag(gamma) Q S_0 + (Q K^T * D * causal) U)
  S_C = gamma_C S_0 + (diag(gamma_C / gamma) K)^T U
"""

from collections.abc import Sequence
import math

import jax
import jax.numpy as jnp

from lca.attention import full

_FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16)
_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- checks


def check_inputs(q, k, v, beta, log_alpha, initial_state=None) -> None:
  """Raises ValueError/TypeError naming the argument when shapes or dtypes are wrong."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"{name} must be [batch, seq, heads, head_dim], got shape {x.shape}")
    if x.dtype not in _FLOATS:
      raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
  if q.shape != k.shape:
    raise ValueError(f"q and k must have the same shape, got q {q.shape} and k {k.shape}")
  if v.shape[:3] != q.shape[:3]:
    raise ValueError(f"v must agree with q on [batch, seq, heads], got q {q.shape} and v {v.shape}")
  for name, x in (("beta", beta), ("log_alpha", log_alpha)):
    if x is not None and x.shape != q.shape[:3]:
      raise ValueError(f"{name} must be [batch, seq, heads] = {q.shape[:3]}, got shape {x.shape}")
  if initial_state is not None:
    want = (q.shape[0], q.shape[2], q.shape[3], v.shape[3])
    if initial_state.shape != want:
      raise ValueError(f"initial_state must be [batch, heads, K, V] = {want}, got {initial_state.shape}")


def check_chunk_size(chunk_size) -> None:
  if not isinstance(chunk_size, int) or chunk_size < 16 or chunk_size & (chunk_size - 1):
    raise ValueError(f"chunk_size must be a power of two >= 16, got chunk_size={chunk_size!r}")


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """x / ||x|| over the last axis, computed in fp32, returned in x's dtype."""
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def _default_scale(scale, head_dim):
  return 1.0 / math.sqrt(head_dim) if scale is None else scale


def _zeros_state(q, v):
  return jnp.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3]), jnp.float32)


# ----------------------------------------------------------------------------- recurrent


def gated_delta_rule_step(state, q, k, v, beta, log_alpha, *, scale=None):
  """One token of the gated delta rule (gated linear attention when beta is None).

  state: [B, H, K, V] float32; q, k: [B, H, K]; v: [B, H, V]; beta, log_alpha: [B, H].
  Returns (o [B, H, V] in q's dtype, new state [B, H, K, V] float32).
  """
  scale = _default_scale(scale, q.shape[-1])
  f32 = lambda x: x.astype(jnp.float32)
  s = jnp.exp(f32(log_alpha))[..., None, None] * state
  u = f32(v)
  if beta is not None:
    u = f32(beta)[..., None] * (u - jnp.einsum("bhk,bhkv->bhv", f32(k), s, precision=_HIGHEST))
  s = s + f32(k)[..., :, None] * u[..., None, :]
  o = jnp.einsum("bhk,bhkv->bhv", f32(q) * scale, s, precision=_HIGHEST)
  return o.astype(q.dtype), s


def gated_delta_rule_reference(q, k, v, beta, log_alpha, *, scale=None, initial_state=None):
  """The recurrence token by token (lax.scan of `gated_delta_rule_step`).

  q, k: [B, L, H, K]; v: [B, L, H, V]; beta (or None), log_alpha: [B, L, H];
  initial_state: [B, H, K, V] or None (zeros). Returns (o [B, L, H, V], final state).
  """
  check_inputs(q, k, v, beta, log_alpha, initial_state)
  state = _zeros_state(q, v) if initial_state is None else initial_state.astype(jnp.float32)
  t_major = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)

  def step(s, xs):
    q_t, k_t, v_t, b_t, a_t = xs
    o_t, s = gated_delta_rule_step(s, q_t, k_t, v_t, b_t, a_t, scale=scale)
    return s, o_t

  state, o = jax.lax.scan(step, state, tuple(map(t_major, (q, k, v, beta, log_alpha))))
  return jnp.moveaxis(o, 0, 1), state


def gated_linear_attention_reference(q, k, v, log_alpha, *, scale=None, initial_state=None):
  """S_t = a_t S_{t-1} + k_t v_t^T, o_t = scale q_t S_t, token by token. Shapes as above."""
  return gated_delta_rule_reference(q, k, v, None, log_alpha, scale=scale, initial_state=initial_state)


# ----------------------------------------------------------------------------- chunkwise


def unit_lower_inverse(a: jax.Array) -> jax.Array:
  """(I + a)^{-1} for strictly lower-triangular a [..., C, C], C a power of two.

  Doubling on diagonal blocks: if X inverts the block diagonal of size s of I + a,
  the inverse for size 2s is X - X a_off X, with a_off the lower-left s x s block of
  each 2s block (exact, since a_off X a_off = 0). log2(C) levels of matmuls; as
  stable as blocked forward substitution, unlike the Neumann product.
  """
  size = a.shape[-1]
  i, j = jnp.arange(size)[:, None], jnp.arange(size)[None, :]
  x = jnp.eye(size, dtype=a.dtype) - jnp.where((i // 2 == j // 2) & (i > j), a, 0)
  s = 2
  while s < size:
    off = jnp.where((i // (2 * s) == j // (2 * s)) & (i // s != j // s), a, 0)
    x = x - jnp.matmul(jnp.matmul(x, off, precision=_HIGHEST), x, precision=_HIGHEST)
    s *= 2
  return x


def chunk_prepare(q, k, v, beta, log_alpha, *, scale):
  """Per-chunk WY/UT quantities; every input has the chunk axis second to last.

  q, k: [..., C, K]; v: [..., C, V]; beta (or None), log_alpha: [..., C] (not yet
  cumulated). Returns a dict of float32 arrays: w [..., C, K] (None without beta),
  u [..., C, V], p [..., C, C] (scaled, causal, decayed Q K^T), qg = scale*gamma*Q,
  kg = (gamma_C / gamma) K, decay = gamma_C [...].
  """
  f32 = lambda x: x.astype(jnp.float32)
  q, k, v = f32(q), f32(k), f32(v)
  g = jnp.cumsum(f32(log_alpha), axis=-1)
  size = q.shape[-2]
  i, j = jnp.arange(size)[:, None], jnp.arange(size)[None, :]
  decay = jnp.exp(jnp.where(i >= j, g[..., :, None] - g[..., None, :], -jnp.inf))  # D
  qk = jnp.einsum("...ck,...jk->...cj", q, k, precision=_HIGHEST)
  p = scale * qk * decay
  out = dict(p=p, qg=scale * jnp.exp(g)[..., None] * q,
             kg=jnp.exp(g[..., -1:] - g)[..., None] * k, decay=jnp.exp(g[..., -1]))
  if beta is None:
    out.update(w=None, u=v)
    return out
  beta = f32(beta)
  kk = jnp.einsum("...ck,...jk->...cj", k, k, precision=_HIGHEST)
  t = unit_lower_inverse(jnp.where(i > j, beta[..., :, None] * kk * decay, 0.0))
  out["w"] = jnp.matmul(t, (beta * jnp.exp(g))[..., None] * k, precision=_HIGHEST)
  out["u"] = jnp.matmul(t, beta[..., None] * v, precision=_HIGHEST)
  return out


def chunk_apply(prep: dict, state):
  """One chunk from its initial state [..., K, V] -> (o [..., C, V], final state), float32."""
  mm = lambda a, b: jnp.matmul(a, b, precision=_HIGHEST)
  u = prep["u"] if prep["w"] is None else prep["u"] - mm(prep["w"], state)
  o = mm(prep["qg"], state) + mm(prep["p"], u)
  new_state = prep["decay"][..., None, None] * state + mm(jnp.swapaxes(prep["kg"], -1, -2), u)
  return o, new_state


def to_chunks(x, chunk_size: int):
  """[B, L, H, ...] -> [B, H, N, C, ...], zero-padded at the end (zeros change nothing)."""
  pad = -x.shape[1] % chunk_size
  x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  x = x.reshape(x.shape[0], -1, chunk_size, *x.shape[2:])
  return jnp.moveaxis(x, 3, 1)


def from_chunks(x, length: int):
  """[B, H, N, C, ...] -> [B, L, H, ...]."""
  x = jnp.moveaxis(x, 1, 3)
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


def gated_delta_rule_chunked(q, k, v, beta, log_alpha, *, scale=None, initial_state=None,
                             chunk_size: int = 64):
  """Chunkwise-parallel gated delta rule in plain XLA; same math as the reference.

  Within-chunk work (UT transform, WY factors) is batched over all chunks; a
  lax.scan carries the [K, V] state between chunks. Any length (padded to the chunk).
  Shapes as `gated_delta_rule_reference`.
  """
  check_inputs(q, k, v, beta, log_alpha, initial_state)
  check_chunk_size(chunk_size)
  length = q.shape[1]
  scale = _default_scale(scale, q.shape[-1])
  chunks = lambda x: None if x is None else to_chunks(x, chunk_size)
  prep = chunk_prepare(chunks(q), chunks(k), chunks(v), chunks(beta), chunks(log_alpha), scale=scale)
  state = _zeros_state(q, v) if initial_state is None else initial_state.astype(jnp.float32)

  def step(s, prep_n):
    o_n, s = chunk_apply(prep_n, s)
    return s, o_n

  n_major = jax.tree.map(lambda x: jnp.moveaxis(x, 2, 0), prep)
  state, o = jax.lax.scan(step, state, n_major)
  return from_chunks(jnp.moveaxis(o, 0, 2), length).astype(q.dtype), state


# ----------------------------------------------------------------------------- fast path


def _pallas(q, k, v, beta, log_alpha, *, scale, initial_state, chunk_size):
  try:
    from pallas_kernels import gated_delta  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise NotImplementedError("implementation='pallas': pallas_kernels.gated_delta is missing") from e
  if chunk_size != gated_delta.CHUNK:
    raise NotImplementedError(f"implementation='pallas' uses chunk {gated_delta.CHUNK}, got {chunk_size}")
  return gated_delta.chunk_gated_delta_rule(q, k, v, beta, log_alpha, scale=scale,
                                            initial_state=initial_state)


IMPLEMENTATIONS = {
    "pallas": _pallas,
    "chunked": gated_delta_rule_chunked,
    "reference": lambda *a, chunk_size, **kw: gated_delta_rule_reference(*a, **kw),
}


def default_implementations() -> tuple[str, ...]:
  return ("pallas", "chunked") if jax.default_backend() == "gpu" else ("chunked",)


def gated_delta_rule(q, k, v, beta, log_alpha, *, scale=None, initial_state=None,
                     chunk_size: int = 64,
                     implementation: str | Sequence[str] | None = None):
  """The gated delta rule (beta None: gated linear attention) -> (o, final state).

  Arguments as `gated_delta_rule_reference`; implementation: "pallas", "chunked",
  "reference", a sequence tried in order, or None (GPU: pallas, chunked; CPU: chunked).
  """
  check_inputs(q, k, v, beta, log_alpha, initial_state)
  check_chunk_size(chunk_size)
  names = default_implementations() if implementation is None else implementation
  return full.dispatch(IMPLEMENTATIONS, names, q, k, v, beta, log_alpha, scale=scale,
                       initial_state=initial_state, chunk_size=chunk_size, what="gated delta rule")


def gated_linear_attention(q, k, v, log_alpha, *, scale=None, initial_state=None,
                           chunk_size: int = 64, implementation=None):
  """S_t = a_t S_{t-1} + k_t v_t^T, o_t = scale q_t S_t -> (o, final state)."""
  return gated_delta_rule(q, k, v, None, log_alpha, scale=scale, initial_state=initial_state,
                          chunk_size=chunk_size, implementation=implementation)


# ----------------------------------------------------------------------------- linear attention

FEATURE_MAPS = {
    "elu1": lambda x: jax.nn.elu(x) + 1.0,  # Katharopoulos et al. 2020
    "relu": jax.nn.relu,
    "identity": lambda x: x,
}


def _feature_map(name):
  if name not in FEATURE_MAPS:
    raise ValueError(f"unknown feature_map={name!r}; known: {sorted(FEATURE_MAPS)}")
  return FEATURE_MAPS[name]


def linear_attention_reference(q, k, v, *, feature_map: str = "elu1", normalize: bool = True,
                               scale=None, eps: float = 1e-6):
  """Causal linear attention, quadratic form: o_t = sum_{s<=t} (phi(q_t).phi(k_s)) v_s [/ z_t].

  q, k: [B, L, H, K], v: [B, L, H, V] -> [B, L, H, V]. With normalize, divides by
  z_t = sum_{s<=t} phi(q_t).phi(k_s) (+ eps); without, scales by `scale` (1/sqrt(K)).
  """
  check_inputs(q, k, v, None, None)
  phi = _feature_map(feature_map)
  fq, fk = phi(q.astype(jnp.float32)), phi(k.astype(jnp.float32))
  length = q.shape[1]
  scores = jnp.einsum("bthk,bshk->bhts", fq, fk, precision=_HIGHEST)
  scores = jnp.where(jnp.tril(jnp.ones((length, length), bool)), scores, 0.0)
  o = jnp.einsum("bhts,bshv->bthv", scores, v.astype(jnp.float32), precision=_HIGHEST)
  if normalize:
    o = o / (jnp.sum(scores, axis=-1).transpose(0, 2, 1)[..., None] + eps)
  else:
    o = o * _default_scale(scale, q.shape[-1])
  return o.astype(q.dtype)


def linear_attention(q, k, v, *, feature_map: str = "elu1", normalize: bool = True, scale=None,
                     eps: float = 1e-6, chunk_size: int = 64, implementation=None):
  """Linear attention in O(L): the gated recurrence with a = 1; the normalizer z_t rides
  along as an extra value channel of ones. Same math as `linear_attention_reference`."""
  check_inputs(q, k, v, None, None)
  phi = _feature_map(feature_map)
  fq, fk = phi(q.astype(jnp.float32)), phi(k.astype(jnp.float32))
  vv = v.astype(jnp.float32)
  if normalize:
    vv = jnp.concatenate([vv, jnp.ones(vv.shape[:-1] + (1,), vv.dtype)], axis=-1)
  zeros = jnp.zeros(q.shape[:3], jnp.float32)
  o, _ = gated_delta_rule(fq, fk, vv, None, zeros, scale=1.0, chunk_size=chunk_size,
                          implementation=implementation or "chunked")
  if normalize:
    o = o[..., :-1] / (o[..., -1:] + eps)
  else:
    o = o * _default_scale(scale, q.shape[-1])
  return o.astype(q.dtype)
