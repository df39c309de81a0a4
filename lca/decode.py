"""Prefill + incremental decoding with per-layer caches, greedy or sampled.

Each layer's mixer owns its cache layout (`init_cache`): full attention keeps a
fixed-capacity KV cache, local attention a window-sized ring buffer, recurrent
layers a fixed state. The model threads the list of caches through; this module
only drives the loop.
"""

import jax
import jax.numpy as jnp
from flax import nnx


def sample_token(logits, key, *, temperature: float = 0.0, top_k: int | None = None):
  """logits [B, V] -> tokens [B] int32. temperature 0 is greedy (argmax)."""
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def prefill(model, prompt, caches):
  """Runs the prompt [B, P] through the model, filling caches -> (logits [B, P, V], caches)."""
  positions = jnp.broadcast_to(jnp.arange(prompt.shape[1], dtype=jnp.int32), prompt.shape)
  return model(prompt, positions, caches=caches)


def decode_step(model, tokens, position, caches):
  """One new token per sequence. tokens [B] at `position` -> (logits [B, V], caches)."""
  positions = jnp.full((tokens.shape[0], 1), position, jnp.int32)
  logits, caches = model(tokens[:, None], positions, caches=caches)
  return logits[:, -1], caches


def stepwise_logits(model, tokens, prompt_len: int, *, capacity: int | None = None):
  """The logits of tokens [B, T] as decoding computes them -> (logits [B, T, V], caches).

  The first prompt_len tokens run as one prefill into fresh caches (capacity: default T),
  then every later token as its own cached call at its position. When each mixer's cache is
  right this equals model(tokens) up to rounding: the check that a new layer kind decodes
  like it trains. Each call is jitted (one compile for the prompt, one for the steps).
  """
  batch, length = tokens.shape
  if not 0 < prompt_len <= length:
    raise ValueError(f"prompt_len must be in [1, {length}] for tokens of length {length}, got {prompt_len}")
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  run = nnx.jit(lambda m, t, p, c: m(t, p, caches=c))
  logits, caches = run(model, tokens[:, :prompt_len], positions[:, :prompt_len],
                       model.init_caches(batch, length if capacity is None else capacity))
  steps = [logits]
  for t in range(prompt_len, length):
    logits, caches = run(model, tokens[:, t:t + 1], positions[:, t:t + 1], caches)
    steps.append(logits)
  return jnp.concatenate(steps, axis=1), caches


def generate(model, prompt, max_new_tokens: int, *, key=None, temperature: float = 0.0,
             top_k: int | None = None, capacity: int | None = None, cache_dtype=None):
  """Continues `prompt` [B, P] by max_new_tokens tokens -> [B, P + max_new_tokens] int32.

  capacity: tokens a full-attention cache can hold (default P + max_new_tokens);
  local layers keep only their window whatever the capacity.
  The prefill and the scanned decode loop are each compiled once.
  """
  prompt = jnp.asarray(prompt, jnp.int32)
  if prompt.ndim != 2 or prompt.shape[1] == 0:
    raise ValueError(f"prompt must be [batch, length] with length > 0, got shape {prompt.shape}")
  if max_new_tokens < 0:
    raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
  total = prompt.shape[1] + max_new_tokens
  capacity = total if capacity is None else capacity
  if total > capacity:
    raise ValueError(f"prompt length {prompt.shape[1]} + max_new_tokens {max_new_tokens} = {total} "
                     f"is longer than the cache capacity={capacity}")
  key = jax.random.key(0) if key is None else key
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, prompt, key):
    model = nnx.merge(graphdef, state)
    caches = model.init_caches(prompt.shape[0], capacity, cache_dtype)
    logits, caches = prefill(model, prompt, caches)
    first = sample_token(logits[:, -1], jax.random.fold_in(key, 0), temperature=temperature, top_k=top_k)

    def body(carry, i):
      token, caches = carry
      logits, caches = decode_step(model, token, prompt.shape[1] + i, caches)
      nxt = sample_token(logits, jax.random.fold_in(key, i + 1), temperature=temperature, top_k=top_k)
      return (nxt, caches), token

    if max_new_tokens == 0:
      return prompt
    (_, _), tokens = jax.lax.scan(body, (first, caches), jnp.arange(max_new_tokens))
    return jnp.concatenate([prompt, tokens.T], axis=1)

  return run(state, prompt, key)
