"""Optimizer of the HyenaDNA recipe (SPEC section 5), with the schedule defined in steps.

AdamW (0.9, 0.999, eps 1e-8), weight decay 0.1 on every parameter except the implicit-filter MLP
(its Linear layers and the shared Sin frequency: weight decay 0, same learning rate), gradient
clipping at global norm 1.0, linear warm-up from 1e-6 then cosine decay to 0.1 x peak.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(peak_lr: float, total_steps: int, warmup_steps: int, *,
                           init_lr: float = 1e-6, min_lr_ratio: float = 0.1) -> optax.Schedule:
  """timm CosineLRScheduler as upstream configures it, stepped per optimizer step.

  lr(s) = init + s (peak - init) / warmup for s < warmup, else
  min + (peak - min)(1 + cos(pi s / total)) / 2, clamped at min after `total_steps`.
  """
  if total_steps < 1 or not 0 <= warmup_steps < max(total_steps, 1):
    raise ValueError(f"need total_steps >= 1 and 0 <= warmup_steps < total_steps, got "
                     f"total_steps={total_steps}, warmup_steps={warmup_steps}")
  min_lr = min_lr_ratio * peak_lr

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = init_lr + step * (peak_lr - init_lr) / max(warmup_steps, 1)
    progress = jnp.minimum(step / total_steps, 1.0)
    cosine = min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < warmup_steps, warm, cosine)

  return schedule


def is_implicit_filter(path: tuple) -> bool:
  """Parameters of the implicit-filter MLP (upstream `_optim` group with weight decay 0)."""
  names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
  return "filter_fn" in names and ("implicit_filter" in names or names[-1] == "freq")


def weight_decay_labels(params: Any) -> Any:
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "filter" if is_implicit_filter(path) else "default", params)


def make_optimizer(*, learning_rate: optax.ScalarOrSchedule, weight_decay: float = 0.1,
                   filter_weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, grad_clip: float = 1.0,
                   frozen: Any = None) -> optax.GradientTransformation:
  """AdamW with the two weight-decay groups; `frozen` is an optional bool tree (True = frozen)."""
  def adamw(wd):
    return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=wd)
  tx = optax.multi_transform({"default": adamw(weight_decay), "filter": adamw(filter_weight_decay)},
                             weight_decay_labels)
  chain = [optax.clip_by_global_norm(grad_clip)] if grad_clip else []
  tx = optax.chain(*chain, tx)
  if frozen is not None:
    labels = jax.tree.map(lambda f: "frozen" if f else "trainable", frozen)
    tx = optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)
  return tx
