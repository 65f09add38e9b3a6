r"""Sampling continuations of a DNA prompt, with an incremental (cached) Hyena decoder.

(`python -m hyena_jax.generate` runs it from the command line.)

Only base tokens are sampled (A C G T, plus N with `allow_n`): the other logits are dropped
before temperature and top-k. temperature 0 is greedy decoding. Step t draws with
`fold_in(PRNGKey(seed), t)`, so a seed reproduces the samples exactly, whichever method runs.

Both methods run the whole loop inside one jitted `lax.fori_loop` over a fixed buffer of
T = bucket(len(prompt) + num_new) tokens (a power of two, capped at l_max), so nothing
recompiles per step; sampling settings are traced values, so one compilation per method and
(num_samples, T) serves every prompt length, temperature, top-k and seed:

  * "recompute" runs the full model on the buffer at every step and reads position t-1
    (exact by causality; the positions after t are still [PAD] and influence nothing before
    them). Cost per new base: a full forward at length T, O(T log T) per layer for the FFT
    convolution plus O(T d^2) projections.
  * "cached" (default) runs the full model once on the prompt (prefill) and then advances one
    position at a time. Per layer it caches the last two in_proj outputs (the 3-tap short
    filter's state), the gated inputs u_s = v_s * x1_s of the long convolution for s < t,
    and the filter k (flipped and zero-padded). The long convolution at t is then one dot
    product, y_t = sum_{s<=t} k[t-s] u_s + D u_t, O(T d) per layer (T, not t: the buffer has a
    fixed size), and everything else touches one position: O(d^2 + T d) per layer per base.

Nothing here repeats the model: prefill and step run the model's blocks (`model.Block.apply`)
with `HyenaOperator.prefill` / `HyenaOperator.step` (hyena.py) as the mixer. `conv_impl` is
honoured wherever a long convolution runs: the recompute forward and the prefill go through the
`fftconv.long_conv` dispatch (fft or pallas). A step has no sequence to convolve: its one output
position is a dot product over the cache (`fftconv.long_conv_step`), identical for both values.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hyena_jax.data import tokenizer as tok
from hyena_jax.inference import batching as inference
from hyena_jax.model import hyena
from hyena_jax.model.hyenadna import HyenaLM

Method = Literal["cached", "recompute"]


@dataclasses.dataclass
class Generation:
  prompt: str
  sequences: list[str]      # the continuations (without the prompt), one per sample
  tokens: np.ndarray        # int32 [num_samples, num_new]
  logits: np.ndarray        # float32 [num_samples, num_new, V]: what each new token was drawn from


def _sample(logits: jax.Array, key: jax.Array, params: dict) -> jax.Array:
  """logits [B, V] -> token ids [B], drawn among the allowed tokens only.

  `params` holds traced values (one compilation serves every setting): `allowed` bool [V],
  `temperature` (0 = greedy), `top_k` (0 = off).
  """
  logits = jnp.where(params["allowed"], logits.astype(jnp.float32), -jnp.inf)
  greedy = jnp.argmax(logits, axis=-1)
  scaled = logits / jnp.maximum(params["temperature"], 1e-6)
  kth = jnp.take_along_axis(jnp.sort(scaled, axis=-1),
                            jnp.full((scaled.shape[0], 1), scaled.shape[-1]) - params["top_k"],
                            axis=-1, mode="clip")
  scaled = jnp.where((params["top_k"] > 0) & (scaled < kth), -jnp.inf, scaled)
  drawn = jax.random.categorical(key, scaled, axis=-1)
  return jnp.where(params["temperature"] > 0, drawn, greedy).astype(jnp.int32)


@nnx.jit
def _generate_recompute(model: HyenaLM, buf: jax.Array, start: jax.Array, stop: jax.Array,
                        key: jax.Array, params: dict) -> tuple[jax.Array, jax.Array]:
  """buf [B, T] holds the prompt in [0, start); fills [start, stop). Returns (buf, logits
  [B, T, V] with row t = the logits token t was drawn from)."""
  def body(t, carry):
    buf, record = carry
    logits = model(buf)[:, t - 1]
    token = _sample(logits, jax.random.fold_in(key, t), params)
    return buf.at[:, t].set(token), record.at[:, t].set(logits)

  record = jnp.zeros(buf.shape + (model.config.padded_vocab_size,), jnp.float32)
  return jax.lax.fori_loop(start, stop, body, (buf, record))


# ------------------------------------------------------------------------------------------------
# Incremental decoding


def _prefill(model: HyenaLM, buf: jax.Array, start: jax.Array
             ) -> tuple[list[hyena.DecodeCache], jax.Array]:
  """One forward over buf [B, T] (the model's blocks, `HyenaOperator.prefill` as the mixer):
  per-layer caches of positions < start, and the logits [B, V] at position start - 1."""
  backbone = model.backbone
  x = backbone.embed(buf)                                                   # [B, T, d] float32
  caches = []
  for block in backbone.layers:
    x, cache = block.apply(x, lambda mixer, u: mixer.prefill(u, start))
    caches.append(cache)
  last = jax.lax.dynamic_index_in_dim(x, start - 1, axis=1, keepdims=False)  # [B, d]
  return caches, model.logits_from_hidden(backbone.ln_f(last))


def _step(model: HyenaLM, caches: list[hyena.DecodeCache], token: jax.Array, t: jax.Array
          ) -> tuple[jax.Array, list[hyena.DecodeCache]]:
  """Advances every layer by one position (`HyenaOperator.step` as the mixer): token [B] at
  position t -> logits [B, V] at t, and the caches advanced past t."""
  backbone = model.backbone
  x = backbone.embed(token[:, None])                                        # [B, 1, d] float32
  new_caches = []
  for block, cache in zip(backbone.layers, caches):
    x, cache = block.apply(x, lambda mixer, u, cache=cache: mixer.step(u, cache, t))
    new_caches.append(cache)
  return model.logits_from_hidden(backbone.ln_f(x[:, 0])), new_caches


@nnx.jit
def _generate_cached(model: HyenaLM, buf: jax.Array, start: jax.Array, stop: jax.Array,
                     key: jax.Array, params: dict) -> tuple[jax.Array, jax.Array]:
  """Same contract as `_generate_recompute`, decoding incrementally after one prefill."""
  caches, logits = _prefill(model, buf, start)

  def body(t, carry):
    buf, record, caches, logits = carry
    token = _sample(logits, jax.random.fold_in(key, t), params)
    buf, record = buf.at[:, t].set(token), record.at[:, t].set(logits)
    logits, caches = _step(model, caches, token, t)
    return buf, record, caches, logits

  record = jnp.zeros(buf.shape + (model.config.padded_vocab_size,), jnp.float32)
  buf, record, _, _ = jax.lax.fori_loop(start, stop, body, (buf, record, caches, logits))
  return buf, record


# ------------------------------------------------------------------------------------------------
# Public API


def generate(model: HyenaLM, prompt: str, num_new: int, *, num_samples: int = 1,
             temperature: float = 1.0, top_k: int = 0, seed: int = 0, allow_n: bool = False,
             method: Method = "cached", tokenizer: tok.CharacterTokenizer | None = None
             ) -> Generation:
  """Samples `num_samples` continuations of `num_new` bases after `prompt` (at least one base).

  len(prompt) + num_new must fit the model's l_max. See the module docstring for the methods
  and the sampling rules; both methods give the same tokens for the same seed.
  """
  model = inference.require_lm(model, "generation")
  tokenizer = tokenizer or tok.CharacterTokenizer()
  if method not in ("cached", "recompute"):
    raise ValueError(f"method must be 'cached' or 'recompute', got {method!r}")
  prompt_ids = tokenizer.encode(prompt, add_eos=False, where="prompt")
  if prompt_ids.size == 0:
    raise ValueError("the prompt is empty: give at least one base to condition on")
  if num_new < 1 or num_samples < 1:
    raise ValueError(f"num_new and num_samples must be >= 1, got {num_new}, {num_samples}")
  total, l_max = prompt_ids.size + num_new, model.config.l_max
  if total > l_max:
    raise ValueError(f"prompt ({prompt_ids.size} bases) + num_new ({num_new}) = {total} exceeds "
                     f"l_max={l_max}; shorten the prompt (keep its end) or generate fewer bases")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
  allowed = (tok.A, tok.C, tok.G, tok.T) + ((tok.N,) if allow_n else ())
  if not 0 <= top_k <= len(allowed):
    raise ValueError(f"top_k must lie in 0..{len(allowed)} (0 = no top-k), got {top_k}")
  length = inference.bucket_length(total, l_max)
  buf = np.full((num_samples, length), tok.PAD, np.int32)
  buf[:, :prompt_ids.size] = prompt_ids
  mask = np.zeros(model.config.padded_vocab_size, bool)
  mask[list(allowed)] = True
  params = {"allowed": jnp.asarray(mask), "temperature": jnp.float32(temperature),
            "top_k": jnp.int32(top_k)}
  run = _generate_cached if method == "cached" else _generate_recompute
  out, record = run(model, jnp.asarray(buf), jnp.int32(prompt_ids.size), jnp.int32(total),
                    jax.random.PRNGKey(seed), params)
  tokens = np.asarray(out)[:, prompt_ids.size:total]
  return Generation(prompt=prompt, sequences=[tokenizer.decode(row) for row in tokens],
                    tokens=tokens, logits=np.asarray(record)[:, prompt_ids.size:total])
