"""hyena_jax: HyenaDNA in JAX / Flax NNX, exact to the official PyTorch model.

Data flow: config -> tokenizer/data -> model (hyena, fftconv) -> train (sharding, optim) ->
checkpoint -> export. See README.md.

    import hyena_jax
    loaded = hyena_jax.load("LongSafari/hyenadna-tiny-1k-seqlen-hf")  # or a path, or an orbax run
    loaded.model, loaded.config
"""

from typing import TYPE_CHECKING

from hyena_jax import cpu_runtime

# CPU flags and malloc settings, before anything creates JAX's CPU backend (cpu_runtime.py).
cpu_runtime.configure()

if TYPE_CHECKING:
  from hyena_jax.loading import Loaded, load

__all__ = ["Loaded", "load"]
__version__ = "0.1.0"


def __getattr__(name: str):
  # Imported on first use, so `import hyena_jax.<module>` does not pay for jax, flax and the
  # model.
  if name in __all__:
    from hyena_jax import loading  # pylint: disable=g-import-not-at-top
    return getattr(loading, name)
  raise AttributeError(f"module 'hyena_jax' has no attribute {name!r}")
