"""hyena_jax: HyenaDNA in JAX / Flax NNX, exact to the official PyTorch model.

The package follows the data flow (README, "Package layout"):
  data/ (tokenizer, sequence files, genome windows, labelled splits) -> model/ (config, Hyena
  operator, long convolution and its Pallas kernels, HyenaDNA) -> training/ (run, steps,
  sharding, checkpoints, resume) -> interop/ (PyTorch / HF weights) -> inference/ and
  downstream/ (embed, score, generate; fine-tuning, ICL). The modules directly in hyena_jax/ are
  the command-line tools (`python -m hyena_jax.<tool>`).

The library API, importable from here:

    import hyena_jax
    hyena_jax.configure_cpu()  # optional: the CPU tuning the command-line tools apply
    loaded = hyena_jax.load("LongSafari/hyenadna-tiny-1k-seqlen-hf")  # or a path, an orbax run
    emb = hyena_jax.embeddings(loaded.model, ["ACGT" * 64])  # [1, 1, d_model]
    lm = hyena_jax.HyenaLM(hyena_jax.released("tiny-1k"), rngs=flax.nnx.Rngs(0))

Importing hyena_jax changes nothing in the process (no XLA flags, no malloc settings) and does
not import JAX until a name is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
  from hyena_jax.cpu_runtime import configure as configure_cpu
  from hyena_jax.inference.embed import embed as embeddings
  from hyena_jax.inference.generate import generate as generate_sequences
  from hyena_jax.inference.score import log_likelihood, score_sequences, score_variants
  from hyena_jax.interop.loading import Loaded, load
  from hyena_jax.model.config import HyenaConfig, released
  from hyena_jax.model.hyenadna import HyenaLM, SequenceClassifier

__version__ = "0.1.0"

# name -> (module, attribute): imported on first use, so that `import hyena_jax` stays cheap.
_API = {
    "load": ("hyena_jax.interop.loading", "load"),
    "Loaded": ("hyena_jax.interop.loading", "Loaded"),
    "HyenaConfig": ("hyena_jax.model.config", "HyenaConfig"),
    "released": ("hyena_jax.model.config", "released"),
    "HyenaLM": ("hyena_jax.model.hyenadna", "HyenaLM"),
    "SequenceClassifier": ("hyena_jax.model.hyenadna", "SequenceClassifier"),
    "embeddings": ("hyena_jax.inference.embed", "embed"),
    "score_sequences": ("hyena_jax.inference.score", "score_sequences"),
    "log_likelihood": ("hyena_jax.inference.score", "log_likelihood"),
    "score_variants": ("hyena_jax.inference.score", "score_variants"),
    "generate_sequences": ("hyena_jax.inference.generate", "generate"),
    "configure_cpu": ("hyena_jax.cpu_runtime", "configure"),
}
__all__ = sorted(_API)


def __getattr__(name: str):
  if name in _API:
    module, attribute = _API[name]
    return getattr(importlib.import_module(module), attribute)
  raise AttributeError(f"module 'hyena_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
