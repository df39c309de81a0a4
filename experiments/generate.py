"""Samples text from a training checkpoint.

    python -m experiments.generate --workdir=results/demo/local_global --prompt="def " --length=200
"""

from absl import app, flags, logging
import jax
import jax.numpy as jnp

from lca import data, decode, train

_WORKDIR = flags.DEFINE_string("workdir", "results/demo/local_global", "Training workdir.")
_PROMPT = flags.DEFINE_string("prompt", "def ", "Text to continue.")
_LENGTH = flags.DEFINE_integer("length", 200, "New bytes to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Sample among the k most likely bytes.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  model, _ = train.load_model(_WORKDIR.value)
  prompt = jnp.asarray(data.encode(_PROMPT.value), jnp.int32)[None]
  out = decode.generate(model, prompt, _LENGTH.value, key=jax.random.key(_SEED.value),
                        temperature=_TEMPERATURE.value, top_k=_TOP_K.value)
  print(data.decode(out[0]))


if __name__ == "__main__":
  app.run(main)
