"""hyena_jax: HyenaDNA in JAX / Flax NNX, exact to the official PyTorch model.

Data flow: config -> tokenizer/data -> model (hyena, fftconv) -> train (sharding, optim) ->
checkpoint -> export. See README.md.

    import hyena_jax
    loaded = hyena_jax.load("LongSafari/hyenadna-tiny-1k-seqlen-hf")  # or a path, or an orbax run
    loaded.model, loaded.config
"""

from hyena_jax.loading import Loaded, load

__all__ = ["Loaded", "load"]
__version__ = "0.1.0"
