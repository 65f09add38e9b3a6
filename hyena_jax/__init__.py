"""hyena_jax: HyenaDNA in JAX / Flax NNX, exact to the official PyTorch model.

Data flow: config -> tokenizer/data -> model (hyena, fftconv) -> train (sharding, optim) ->
checkpoint -> export. See README.md.
"""

__version__ = "0.1.0"
