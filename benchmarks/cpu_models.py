"""The two models the CPU benchmarks time, built one way for all of them (bench_model.py,
bench_vs_torch.py, bench_cpu_profile.py, bench_torch_reference.py).

Imports are inside the functions: a torch-only benchmark process never loads jax, and the
reverse.
"""

from __future__ import annotations

from typing import Any, Callable


def jax_lm(cfg) -> tuple[dict, Callable[[Any, Any], Any], Callable[[Any, Any], Any]]:
  """HyenaLM(cfg) -> (params, forward(params, ids) -> logits, loss(params, ids) -> summed
  next-token NLL as in training), both unjitted; ids [B, L] int."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from hyena_jax.model.hyenadna import HyenaLM  # pylint: disable=g-import-not-at-top
  from hyena_jax.training import steps  # pylint: disable=g-import-not-at-top

  model = HyenaLM(cfg, rngs=nnx.Rngs(0))
  model.eval()
  graphdef, params = nnx.split(model, nnx.Param)

  def forward(p, ids):
    return nnx.merge(graphdef, p)(ids)

  def loss(p, ids):
    logits = forward(p, ids)
    return steps.lm_loss_terms(logits, ids, jnp.ones(ids.shape, jnp.float32))["loss_sum"]

  return nnx.to_pure_dict(params), forward, loss


def torch_lm(cfg):
  """The PyTorch reference (`hyena_jax.torch_reference`) with cfg's architecture."""
  from hyena_jax.interop import torch_reference  # pylint: disable=g-import-not-at-top
  return torch_reference.HyenaDNAForCausalLM({
      "d_model": cfg.d_model, "n_layer": cfg.n_layer, "d_inner": cfg.d_inner,
      "max_seq_len": cfg.l_max, "vocab_size": cfg.vocab_size, "emb_dim": cfg.emb_dim,
      "filter_order": cfg.filter_order, "num_inner_mlps": cfg.num_inner_mlps,
      "activation_freq": cfg.activation_freq,
      "layer_norm_epsilon": cfg.layer_norm_epsilon,
      "pad_vocab_size_multiple": cfg.pad_vocab_size_multiple})
