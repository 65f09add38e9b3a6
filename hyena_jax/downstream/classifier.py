"""The fine-tuned classifier: built from scratch or around a pretrained backbone, its losses,
its jitted train/predict steps (optionally with a frozen backbone) and its optimizer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from hyena_jax.data import labelled
from hyena_jax.data import tokenizer as tok
from hyena_jax.downstream import finetune_config
from hyena_jax.downstream.task_metrics import task_metrics
from hyena_jax.errors import InputError
from hyena_jax.model import config as config_lib
from hyena_jax.model.hyenadna import SequenceClassifier, copy_params
from hyena_jax.training import optim
from hyena_jax.training.steps import State


def build_classifier(config: ml_collections.ConfigDict) -> tuple[SequenceClassifier, str]:
  """The classifier to fine-tune, in train mode: from scratch (config.model) or with the backbone
  (and optionally the head) of `config.pretrained`. Returns (model, description of the init)."""
  n_classes, pooling = config.head.n_classes, config.head.pooling
  rngs = nnx.Rngs(params=config.train.seed)
  if not config.pretrained:
    cfg = config_lib.from_dict(config.model.to_dict())
    model = SequenceClassifier(cfg, n_classes, pooling=pooling, rngs=rngs)
    model.train()
    return model, "scratch"
  from hyena_jax.interop import loading  # the loader shared with embed/score/generate
  loaded = loading.load(config.pretrained, step=config.pretrained_step,
                        shift=config.pretrained_shift)
  source, source_cfg = loaded.model, loaded.config
  cfg = dataclasses.replace(source_cfg, **finetune_config.pretrained_overrides(config))
  model = SequenceClassifier(cfg, n_classes, pooling=pooling, rngs=rngs)
  groups = ("backbone",)
  what = f"backbone of {config.pretrained}"
  if config.keep_pretrained_head:
    if not isinstance(source, SequenceClassifier) or source.n_classes != n_classes:
      have = (f"a {source.n_classes}-class head" if isinstance(source, SequenceClassifier)
              else "no classification head (a language model)")
      raise InputError(f"keep_pretrained_head=True but {config.pretrained} has {have}; "
                       f"head.n_classes is {n_classes}. Set keep_pretrained_head=False for a "
                       "fresh head")
    groups += ("output_transform",)
    what += " with its head"
  copy_params(source, model, groups)
  model.train()
  return model, what


def frozen_mask(params: Any, freeze_backbone: bool) -> Any:
  """Bool tree over the parameter dict: True for backbone leaves when freezing it."""
  return {k: jax.tree.map(lambda _: freeze_backbone and k == "backbone", v)
          for k, v in params.items()}


# ------------------------------------------------------------------------------------------------
# Linear probe (LP-FT's first stage; the fit itself is linear_probe.py)


def make_features_fn(graphdef: nnx.GraphDef) -> Callable[[Any, jax.Array], jax.Array]:
  """(params, inputs [B, L]) -> pooled features [B, d_model], dropout off."""
  def features_fn(params, inputs):
    model = nnx.merge(graphdef, params)
    model.eval()
    return model.features(inputs)
  return features_fn


# ------------------------------------------------------------------------------------------------
# Steps (pure functions; decided once from the config when built)


def classification_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """logits [B, C] f32, labels int [B] -> mean cross-entropy."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def regression_loss(preds: jax.Array, targets: jax.Array) -> jax.Array:
  """preds [B, 1], targets float [B] -> mean squared error."""
  return jnp.mean((preds[:, 0] - targets) ** 2)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, loss_fn: Callable, *, seed: int,
                    frozen: Any = None) -> Callable[[State, dict], tuple[State, dict]]:
  """batch {"inputs": int32 [B, L], "labels": [B]}. Frozen leaves get no gradient at all
  (stop_gradient, so XLA drops their backward pass), and the optimizer zeroes their update."""
  def step_fn(state: State, batch: dict) -> tuple[State, dict]:
    key = jax.random.fold_in(jax.random.key(seed), state["step"])

    def loss(params):
      if frozen is not None:
        params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)
      return loss_fn(nnx.merge(graphdef, params)(batch["inputs"], dropout_key=key),
                     batch["labels"])

    value, grads = jax.value_and_grad(loss)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    metrics = {"loss": value, "grad_norm": optax.tree.norm(grads),
               "learning_rate": schedule(state["step"])}
    return {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state}, metrics

  return step_fn


def make_predict_fn(graphdef: nnx.GraphDef) -> Callable[[Any, jax.Array], jax.Array]:
  """(params, inputs [B, L]) -> head outputs [B, n_classes], dropout off."""
  def predict_fn(params, inputs):
    model = nnx.merge(graphdef, params)
    model.eval()
    return model(inputs)
  return predict_fn


def predict(predict_fn: Callable, params: Any, inputs: np.ndarray, batch_size: int,
            batch_sharding: jax.sharding.Sharding | None = None) -> np.ndarray:
  """Head outputs for all rows [N, n_classes]; the last batch is padded with [PAD] rows (one
  compiled shape) whose outputs are dropped."""
  outputs = []
  for start in range(0, len(inputs), batch_size):
    chunk = inputs[start:start + batch_size]
    n = len(chunk)
    if n < batch_size:
      chunk = np.concatenate([chunk, np.full((batch_size - n, chunk.shape[1]), tok.PAD,
                                             chunk.dtype)])
    chunk = jax.device_put(chunk, batch_sharding) if batch_sharding is not None else chunk
    outputs.append(np.asarray(jax.device_get(predict_fn(params, chunk)))[:n])
  return np.concatenate(outputs).astype(np.float32)


def evaluate(predict_fn: Callable, params: Any, split: labelled.LabelledSplit, n_classes: int,
             batch_size: int, batch_sharding=None) -> tuple[dict[str, float], np.ndarray]:
  """(metrics of the task family, outputs [N, n_classes]) of one split."""
  outputs = predict(predict_fn, params, split.inputs, batch_size, batch_sharding)
  return task_metrics(outputs, split.labels, n_classes), outputs


# ------------------------------------------------------------------------------------------------
# The loop


def optimizer_and_schedule(config: ml_collections.ConfigDict, total_steps: int, frozen: Any):
  o = config.optim
  schedule = optim.learning_rate_schedule(o.learning_rate, max(total_steps, 1),
                                          int(o.warmup_fraction * total_steps),
                                          init_lr=o.init_lr, min_lr_ratio=o.min_lr_ratio)
  tx = optim.make_optimizer(learning_rate=schedule, weight_decay=o.weight_decay,
                            filter_weight_decay=o.filter_weight_decay, b1=o.b1, b2=o.b2,
                            eps=o.eps, grad_clip=o.grad_clip, frozen=frozen)
  return tx, schedule
