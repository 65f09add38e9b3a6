"""The jitted language-model steps: next-token loss terms, one optimizer step (with gradient
accumulation over micro-batches by `lax.scan`), and one evaluation step. Pure functions of
(params, opt_state, batch); `run.py` builds them for a run's mesh and stage.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

State = dict[str, Any]  # {"step": int32 [], "params": tree, "opt_state": tree}


def lm_loss_terms(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
  """Sums over tokens: logits [B, L, V] f32, targets [B, L] int, mask [B, L] f32."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return {"loss_sum": (nll * mask).sum(), "correct": (correct * mask).sum(), "count": mask.sum()}


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, grad_accum: int, seed: int,
                    forward: Callable | None = None) -> Callable[[State, dict], tuple[State, dict]]:
  """One optimizer step over a global batch split into `grad_accum` micro-batches.

  batch: {"inputs", "targets": int32 [B, L], "loss_mask": f32 [B, L]}. Micro-batch rows are
  b = m * grad_accum + a, so splitting keeps each device's rows on that device. The loss is the
  mean over all unmasked tokens of the global batch, exactly as without accumulation.
  `forward(model, inputs, dropout_key) -> logits` replaces the plain model call (context
  parallelism).
  """
  forward = forward or (lambda model, ids, key: model(ids, dropout_key=key))

  def step_fn(state: State, batch: dict) -> tuple[State, dict]:
    total_count = jnp.maximum(batch["loss_mask"].sum(), 1.0)
    step_key = jax.random.fold_in(jax.random.key(seed), state["step"])

    def micro_loss(params, micro, key):
      logits = forward(nnx.merge(graphdef, params), micro["inputs"], key)
      terms = lm_loss_terms(logits, micro["targets"], micro["loss_mask"])
      return terms["loss_sum"] / total_count, terms

    grad_fn = jax.grad(micro_loss, has_aux=True)
    if grad_accum == 1:
      grads, terms = grad_fn(state["params"], batch, step_key)
    else:
      micro = jax.tree.map(
          lambda x: jnp.swapaxes(x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]),
                                 0, 1), batch)

      def body(carry, inputs):
        index, mb = inputs
        g, t = grad_fn(state["params"], mb, jax.random.fold_in(step_key, index))
        return jax.tree.map(jnp.add, carry, (g, t)), None

      zeros = (jax.tree.map(jnp.zeros_like, state["params"]),
               {k: jnp.zeros((), jnp.float32) for k in ("loss_sum", "correct", "count")})
      (grads, terms), _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum), micro))
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    count = jnp.maximum(terms["count"], 1.0)
    metrics = {"loss": terms["loss_sum"] / count, "accuracy": terms["correct"] / count,
               "grad_norm": optax.tree.norm(grads), "learning_rate": schedule(state["step"])}
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  return step_fn


def make_eval_step(graphdef: nnx.GraphDef, forward: Callable | None = None
                   ) -> Callable[[Any, dict], dict]:
  forward = forward or (lambda model, ids, key: model(ids))

  def eval_fn(params, batch):
    model = nnx.merge(graphdef, params)
    model.eval()
    logits = forward(model, batch["inputs"], None)
    return lm_loss_terms(logits, batch["targets"], batch["loss_mask"])
  return eval_fn


# ------------------------------------------------------------------------------------------------
# Building blocks of a run
