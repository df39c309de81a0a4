"""DeepSeekMoE with auxiliary-loss-free load balancing (DeepSeek-V3, arXiv 2412.19437).

    y_t = sum_shared FFN_i(u_t) + sum_{i in TopK} g_{i,t} FFN_i(u_t)
    s_{i,t} = sigmoid(u_t . e_i)                     affinities
    TopK    = top-K over s_{i,t} + b_i               (b only routes, optionally within
                                                      the best groups of experts)
    g_{i,t} = route_scale * s_{i,t} / sum_{j in TopK} s_{j,t}

The bias b (a `RoutingBias`, not an nnx.Param, so no gradient reaches it) takes a
step b <- b - gamma * sign(load - mean load) per training step, written by the
loss call; an optional sequence-wise balance loss alpha * sum_i f_i P_i completes it.

  route(...)                 affinities, top-K selection and gates;
  experts_reference(...)     every expert on every token, combined by the gates
                             (obviously correct, E/K times the FLOPs);
  experts_blocked(...)       sort the (token, expert) pairs by expert, pad each expert's
                             group to whole blocks of rows, one batched matmul over
                             the blocks with each block's expert weights: only the
                             chosen experts are computed (plus < 1 block of padding each);
  experts_ragged(...)        the same sort, then `jax.lax.ragged_dot` (XLA:CPU and, per
                             the GPU benchmark, XLA:GPU compute it densely over all groups);
  moe_experts(..., implementation="blocked" | "ragged" | "dense");
  MoE(nnx.Module)            router, bias, shared and routed experts; load metrics.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from lca.layers import mlp


class RoutingBias(nnx.Variable):
  """The aux-loss-free routing bias b [E]: carried in the train state, never differentiated."""


def route(x, w_router, bias, *, top_k: int, num_groups: int = 1, top_groups: int = 1,
          route_scale: float = 1.0):
  """Sigmoid routing with a selection-only bias.

  Args:
    x: [N, D] tokens; w_router: [D, E]; bias: [E].
    top_k: routed experts per token; num_groups / top_groups: the experts form
      num_groups equal groups and a token picks only from its best top_groups
      (group score: the sum of its two best biased affinities, as in V3).
  Returns:
    gates [N, K] float32 (sum to route_scale per token; the bias is not in them),
    experts [N, K] int32 (distinct per token), scores [N, E] float32 affinities.
  """
  scores = jax.nn.sigmoid(jnp.dot(x, w_router.astype(x.dtype), preferred_element_type=jnp.float32))
  biased = scores + jax.lax.stop_gradient(bias.astype(jnp.float32))
  if num_groups > 1:
    n, e = biased.shape
    grouped = biased.reshape(n, num_groups, e // num_groups)
    group_score = jnp.sum(jax.lax.top_k(grouped, min(2, e // num_groups))[0], axis=-1)  # [N, G]
    _, best = jax.lax.top_k(group_score, top_groups)
    keep = jnp.zeros((n, num_groups), bool).at[jnp.arange(n)[:, None], best].set(True)
    biased = jnp.where(jnp.repeat(keep, e // num_groups, axis=1), biased, -jnp.inf)
  _, experts = jax.lax.top_k(biased, top_k)
  chosen = jnp.take_along_axis(scores, experts, axis=-1)
  gates = route_scale * chosen / jnp.sum(chosen, axis=-1, keepdims=True)
  return gates, experts.astype(jnp.int32), scores


def expert_counts(experts, num_experts: int) -> jax.Array:
  """experts [..., K] -> tokens routed to each expert [E] float32."""
  return jnp.zeros((num_experts,), jnp.float32).at[experts.reshape(-1)].add(1.0)


def updated_bias(bias, counts, speed: float) -> jax.Array:
  """One aux-loss-free step: b_i - speed if expert i is over the mean load, + speed if under."""
  return jax.lax.stop_gradient(bias - speed * jnp.sign(counts - jnp.mean(counts)))


def sequence_balance_loss(scores, experts, top_k: int) -> jax.Array:
  """V3's sequence-wise balance loss sum_i f_i P_i, averaged over sequences (times alpha outside).

  scores: [B, L, E] affinities; experts: [B, L, K]. f_i = E / (K L) * #{t: i in TopK_t};
  P_i = mean_t s_{i,t} / sum_j s_{j,t}. Equals 1 when both are uniform.
  """
  num_experts, length = scores.shape[-1], scores.shape[1]
  chosen = jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=jnp.float32), axis=2)  # [B, L, E]
  f = jax.lax.stop_gradient(num_experts / (top_k * length) * jnp.sum(chosen, axis=1))  # [B, E]
  p = jnp.mean(scores / jnp.sum(scores, axis=-1, keepdims=True), axis=1)  # [B, E]
  return jnp.mean(jnp.sum(f * p, axis=-1))


# ----------------------------------------------------------------------------- experts


def _swiglu_experts_dense(x, w_gate, w_up, w_down):
  """x [N, D], weights [E, D, F] / [E, F, D] -> [N, E, D]: every expert on every token."""
  h = jax.nn.silu(jnp.einsum("nd,edf->nef", x, w_gate)) * jnp.einsum("nd,edf->nef", x, w_up)
  return jnp.einsum("nef,efd->ned", h, w_down)


def experts_reference(x, gates, experts, w_gate, w_up, w_down) -> jax.Array:
  """sum_k gates[n, k] * FFN_{experts[n, k]}(x[n]), computing all E experts densely.

  x: [N, D]; gates: [N, K]; experts: [N, K] int; w_gate, w_up: [E, D, F]; w_down: [E, F, D]
  -> [N, D] in x's dtype.
  """
  all_out = _swiglu_experts_dense(x, w_gate, w_up, w_down)             # [N, E, D]
  weights = jnp.sum(jax.nn.one_hot(experts, w_gate.shape[0], dtype=jnp.float32)
                    * gates[..., None], axis=1)                          # [N, E]
  return jnp.einsum("ne,ned->nd", weights, all_out.astype(jnp.float32)).astype(x.dtype)


def experts_ragged(x, gates, experts, w_gate, w_up, w_down) -> jax.Array:
  """Same as `experts_reference`, computing only the N*K chosen (token, expert) pairs.

  The pairs are sorted by expert so each expert's tokens are contiguous, then each
  matmul is one `jax.lax.ragged_dot` over the E groups; results are unsorted and
  summed over K.
  """
  n, k = experts.shape
  num_experts = w_gate.shape[0]
  flat = experts.reshape(-1)
  order = jnp.argsort(flat, stable=True)                       # [N*K] pair ids by expert
  sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  xs = x[order // k]                                           # [N*K, D]
  h = jax.nn.silu(jax.lax.ragged_dot(xs, w_gate, sizes)) * jax.lax.ragged_dot(xs, w_up, sizes)
  ys = jax.lax.ragged_dot(h, w_down, sizes)                    # [N*K, D]
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(n * k, dtype=order.dtype))
  ys = ys[inverse].reshape(n, k, -1).astype(jnp.float32)
  return jnp.einsum("nk,nkd->nd", gates, ys).astype(x.dtype)


def _block_rows(pairs: int, num_experts: int) -> int:
  """Rows per block: about the mean group size, a power of two in [8, 512]."""
  mean = max(1, pairs // num_experts)
  return int(min(512, max(8, 1 << (mean.bit_length() - 1))))


def experts_blocked(x, gates, experts, w_gate, w_up, w_down, *, block_rows: int | None = None) -> jax.Array:
  """Same as `experts_reference`, computing only the chosen pairs (dropless, static shapes).

  The N*K pairs are sorted by expert; expert e's group starts at a multiple of
  `block_rows` (padding rows are zeros), so each block belongs to one expert. The
  static row count N*K + E*(block_rows - 1), rounded up to blocks, bounds any routing.
  Each matmul is one batched einsum of the blocks against their experts' weights.
  """
  n, k = experts.shape
  num_experts, d = w_gate.shape[0], x.shape[1]
  pairs = n * k
  b = block_rows or _block_rows(pairs, num_experts)
  num_blocks = -(-(pairs + num_experts * (b - 1)) // b)
  flat = experts.reshape(-1)
  order = jnp.argsort(flat, stable=True)                        # sorted slot -> pair id
  sizes = jnp.bincount(flat, length=num_experts)
  padded = (sizes + b - 1) // b * b
  padded_start = jnp.cumsum(padded) - padded                    # [E]
  start = jnp.cumsum(sizes) - sizes
  # Gathers only (no scatter): padded row r of expert e holds sorted slot
  # start_e + (r - padded_start_e) when that is inside e's group, else zeros.
  block_expert = jnp.searchsorted(jnp.cumsum(padded), jnp.arange(num_blocks) * b, side="right")
  block_expert = jnp.minimum(block_expert, num_experts - 1)     # trailing empty blocks: any expert
  row_expert = jnp.repeat(block_expert, b)
  offset = jnp.arange(num_blocks * b) - padded_start[row_expert]
  valid = offset < sizes[row_expert]
  slot = jnp.clip(start[row_expert] + offset, 0, pairs - 1)
  xb = jnp.where(valid[:, None], x[order[slot] // k], 0).reshape(num_blocks, b, d)
  h = (jax.nn.silu(jnp.einsum("nbd,ndf->nbf", xb, w_gate[block_expert]))
       * jnp.einsum("nbd,ndf->nbf", xb, w_up[block_expert]))
  yb = jnp.einsum("nbf,nfd->nbd", h, w_down[block_expert]).reshape(num_blocks * b, d)
  # Row of each pair: its expert's padded start + its rank among that expert's pairs.
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(pairs, dtype=order.dtype))
  pair_row = padded_start[flat] + inverse - start[flat]
  ys = yb[pair_row].reshape(n, k, d)
  return jnp.einsum("nk,nkd->nd", gates.astype(ys.dtype), ys, preferred_element_type=jnp.float32).astype(x.dtype)


IMPLEMENTATIONS = {"blocked": experts_blocked, "ragged": experts_ragged, "dense": experts_reference}


def moe_experts(x, gates, experts, w_gate, w_up, w_down, *, implementation=None) -> jax.Array:
  """Routed-expert output through "blocked" (default), "ragged" or "dense"; arguments as
  `experts_reference`."""
  implementation = implementation or "blocked"
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown MoE implementation={implementation!r}; known: {sorted(IMPLEMENTATIONS)}")
  if x.ndim != 2 or gates.shape != experts.shape or gates.shape[0] != x.shape[0]:
    raise ValueError(f"need x [N, D], gates and experts [N, K]; got {x.shape}, {gates.shape}, {experts.shape}")
  if w_gate.shape[1] != x.shape[1] or w_down.shape != (w_gate.shape[0], w_gate.shape[2], x.shape[1]):
    raise ValueError(f"expert weights must be [E, D, F], [E, D, F], [E, F, D] with D={x.shape[1]}, got "
                     f"{w_gate.shape}, {w_up.shape}, {w_down.shape}")
  return IMPLEMENTATIONS[implementation](x, gates, experts, w_gate, w_up, w_down)


# ----------------------------------------------------------------------------- module


def check_config(cfg) -> None:
  """Raises ValueError for bad moe_* fields of a ModelConfig."""
  e = cfg.moe_num_experts
  if e < 0:
    raise ValueError(f"model.moe_num_experts must be >= 0, got {e}")
  if e == 0:
    return
  if cfg.moe_num_groups <= 0 or e % cfg.moe_num_groups:
    raise ValueError(f"model.moe_num_experts={e} must be a multiple of model.moe_num_groups={cfg.moe_num_groups}")
  if not 1 <= cfg.moe_top_groups <= cfg.moe_num_groups:
    raise ValueError(f"model.moe_top_groups must be in [1, moe_num_groups={cfg.moe_num_groups}], "
                     f"got {cfg.moe_top_groups}")
  reachable = cfg.moe_top_groups * (e // cfg.moe_num_groups)
  if not 1 <= cfg.moe_top_k <= reachable:
    raise ValueError(f"model.moe_top_k must be in [1, {reachable}] (moe_top_groups * experts per group), "
                     f"got {cfg.moe_top_k}")
  if cfg.moe_d_ff <= 0 or cfg.moe_num_shared < 0:
    raise ValueError(f"model.moe_d_ff must be > 0 and moe_num_shared >= 0, got {cfg.moe_d_ff}, {cfg.moe_num_shared}")
  if cfg.moe_bias_speed < 0 or cfg.moe_balance_weight < 0 or cfg.moe_route_scale <= 0:
    raise ValueError(f"model.moe_bias_speed, moe_balance_weight must be >= 0 and moe_route_scale > 0, got "
                     f"{cfg.moe_bias_speed}, {cfg.moe_balance_weight}, {cfg.moe_route_scale}")
  if cfg.moe_implementation not in (None, *IMPLEMENTATIONS):
    raise ValueError(f"model.moe_implementation must be None or one of {sorted(IMPLEMENTATIONS)}, "
                     f"got {cfg.moe_implementation!r}")


class MoE(nnx.Module):
  """DeepSeekMoE layer. `__call__(x, train=)` -> (y, stats); with train=True the
  routing bias takes its aux-loss-free step (written into `self.bias`)."""

  def __init__(self, d_model: int, *, num_experts: int, top_k: int, d_ff: int, rngs: nnx.Rngs,
               num_shared: int = 1, num_groups: int = 1, top_groups: int = 1,
               route_scale: float = 1.0, bias_speed: float = 1e-3,
               implementation=None, dtype=jnp.float32):
    if num_experts <= 0 or not 1 <= top_k <= num_experts or num_experts % num_groups:
      raise ValueError(f"need 1 <= top_k={top_k} <= num_experts={num_experts}, num_experts a multiple "
                       f"of num_groups={num_groups}")
    init = nnx.initializers.lecun_normal(batch_axis=(0,))
    self.router = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (d_model, num_experts)))
    self.bias = RoutingBias(jnp.zeros((num_experts,), jnp.float32))
    self.w_gate = nnx.Param(init(rngs.params(), (num_experts, d_model, d_ff)))
    self.w_up = nnx.Param(init(rngs.params(), (num_experts, d_model, d_ff)))
    self.w_down = nnx.Param(init(rngs.params(), (num_experts, d_ff, d_model)))
    # n shared experts of width F are one SwiGLU of width n F (their sum).
    self.shared = mlp.SwiGLU(d_model, num_shared * d_ff, rngs=rngs, dtype=dtype) if num_shared else None
    self.num_experts, self.top_k = num_experts, top_k
    self.num_groups, self.top_groups, self.route_scale = num_groups, top_groups, route_scale
    self.bias_speed = bias_speed
    self.implementation = implementation
    self.dtype = dtype

  def __call__(self, x, *, train: bool = False):
    """x: [B, L, D] -> (y [B, L, D], stats: counts [E], balance_loss, max_violation)."""
    batch, length, d = x.shape
    x = x.astype(self.dtype)
    flat = x.reshape(-1, d)
    bias = self.bias[...]
    gates, experts, scores = route(flat, self.router[...], bias, top_k=self.top_k,
                                   num_groups=self.num_groups, top_groups=self.top_groups,
                                   route_scale=self.route_scale)
    cast = lambda p: p[...].astype(self.dtype)
    y = moe_experts(flat, gates, experts, cast(self.w_gate), cast(self.w_up), cast(self.w_down),
                    implementation=self.implementation).reshape(batch, length, d)
    if self.shared is not None:
      y = y + self.shared(x)
    counts = expert_counts(experts, self.num_experts)
    stats = {"counts": counts,
             "max_violation": jnp.max(counts) / jnp.mean(counts) - 1.0,
             "balance_loss": sequence_balance_loss(scores.reshape(batch, length, -1),
                                                   experts.reshape(batch, length, -1), self.top_k)}
    if train and self.bias_speed > 0:
      # A new Variable rather than an in-place write: the loss call may run under a
      # transform (jax.value_and_grad in lca.train) nested inside the trace that made
      # the old one, where NNX forbids mutating it.
      self.bias = RoutingBias(updated_bias(bias, counts, self.bias_speed))
    return y, stats
