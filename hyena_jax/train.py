"""Pretraining loop, read top to bottom in data-flow order:
mesh -> input -> model and optimizer (initialised sharded) -> step -> checkpoint -> eval -> loop.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import time
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from hyena_jax import checkpoint as ckpt_lib
from hyena_jax import data as data_lib
from hyena_jax import optim, run_config, sharding
from hyena_jax import metrics_writer
from hyena_jax.config import HyenaConfig
from hyena_jax.model import HyenaLM

State = dict[str, Any]  # {"step": int32 [], "params": tree, "opt_state": tree}


# ------------------------------------------------------------------------------------------------
# Loss and steps (pure functions; nothing here branches on the config at run time)


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


@dataclasses.dataclass
class Run:
  """Everything built once per run from the config."""
  config: ml_collections.ConfigDict
  model_cfg: HyenaConfig
  mesh: jax.sharding.Mesh
  graphdef: nnx.GraphDef
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  state_shardings: State
  abstract_state: State
  total_steps: int
  bounds: list[int]
  forward: Callable | None  # context-parallel forward when mesh.sequence > 1, else None
  config_workdir: str = ""


def build_run(config: ml_collections.ConfigDict, devices: list | None = None) -> Run:
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.sequence,
                            devices=devices)
  model_cfg = run_config.validate(config, mesh.shape["data"] * mesh.shape["fsdp"])
  total = run_config.total_steps(config)
  schedule = optim.learning_rate_schedule(
      config.optim.learning_rate, total, int(config.optim.warmup_fraction * total),
      init_lr=config.optim.init_lr, min_lr_ratio=config.optim.min_lr_ratio)
  tx = optim.make_optimizer(
      learning_rate=schedule, weight_decay=config.optim.weight_decay,
      filter_weight_decay=config.optim.filter_weight_decay, b1=config.optim.b1,
      b2=config.optim.b2, eps=config.optim.eps, grad_clip=config.optim.grad_clip)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: HyenaLM(model_cfg, rngs=nnx.Rngs(0))))
  abstract = jax.eval_shape(lambda: init_state(model_cfg, tx, config.train.seed))
  replicated = sharding.replicated(mesh)
  shardings = {"step": replicated, "params": sharding.tree_shardings(abstract["params"], mesh),
               "opt_state": sharding.tree_shardings(abstract["opt_state"], mesh)}
  forward = None
  if config.mesh.sequence > 1:
    from hyena_jax import context_parallel
    forward = functools.partial(_context_parallel_forward, context_parallel.forward, mesh)
  return Run(config, model_cfg, mesh, graphdef, tx, schedule, shardings, abstract, total,
             run_config.stage_boundaries(config), forward)


def _context_parallel_forward(cp_forward: Callable, mesh, model, ids, dropout_key):
  return cp_forward(model, ids, mesh, dropout_key=dropout_key)


def init_state(model_cfg: HyenaConfig, tx: optax.GradientTransformation, seed: int) -> State:
  model = HyenaLM(model_cfg, rngs=nnx.Rngs(params=seed))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def stage_of(run: Run, step: int) -> int:
  """Index of the stage that runs optimizer step `step` (0-based)."""
  for i in range(len(run.bounds) - 1):
    if step < run.bounds[i + 1]:
      return i
  return len(run.bounds) - 2


def train_dataset(run: Run, stage: int):
  _, seq_len, _ = run.config.train.stages[stage]
  return data_lib.make_pretrain_dataset(
      run.config.data, split="train", seq_len=seq_len,
      global_batch_size=run.config.train.global_batch_size,
      seed=run.config.train.seed + 1000 * stage)


def evaluate(run: Run, eval_step: Callable, params: Any) -> dict[str, float]:
  """Loss, perplexity and next-base accuracy on the valid split at the last stage's length."""
  seq_len = run.config.train.stages[-1][1]
  # In-process reading: a few batches do not repay starting worker processes at every eval.
  data_cfg = ml_collections.ConfigDict(run.config.data.to_dict())
  data_cfg.num_workers = 0
  ds = data_lib.make_pretrain_dataset(data_cfg, split="valid", seq_len=seq_len,
                                      global_batch_size=run.config.eval.batch_size,
                                      seed=run.config.train.seed, num_epochs=1)
  totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
  batch_sharding = sharding.batch_sharding(run.mesh)
  for i, batch in enumerate(ds):
    if i >= run.config.eval.num_batches:
      break
    with jax.set_mesh(run.mesh):  # custom kernels (pallas_conv) shard_map over this mesh
      terms = jax.device_get(eval_step(params, data_lib.to_global_batch(batch, batch_sharding)))
    for k in totals:
      totals[k] += float(terms[k])
  if totals["count"] == 0:
    raise ValueError("the valid split produced no tokens: check data.bed/valid_fraction")
  loss = totals["loss_sum"] / totals["count"]
  return {"valid_loss": loss, "valid_perplexity": math.exp(min(loss, 50.0)),
          "valid_accuracy": totals["correct"] / totals["count"]}


# ------------------------------------------------------------------------------------------------
# Checkpoints


def _check_compatible(saved: dict, config: ml_collections.ConfigDict, workdir: str) -> None:
  current = ckpt_lib.config_to_json(config)
  # How the step is executed may change between runs; what it computes may not.
  execution = {"remat", "scan_layers", "conv_impl"}
  for section, keys in (("model", None), ("train", ("global_batch_size", "stages", "seed")),
                        ("optim", None)):
    old, new = saved.get(section, {}), current[section]
    for key in keys or sorted((set(old) | set(new)) - execution):
      if old.get(key) != new.get(key):
        raise ValueError(
            f"{workdir} holds a checkpoint of a different run: {section}.{key} was "
            f"{old.get(key)!r}, the config says {new.get(key)!r}. Use a new --workdir, or pass "
            f"--config.{section}.{key}={old.get(key)!r} to resume it")


def save_checkpoint(mngr: ocp.CheckpointManager, run: Run, state: State, data_iter,
                    data_stage: int, metrics: dict | None = None, force: bool = False) -> None:
  step = int(jax.device_get(state["step"]))
  items = {"params": ocp.args.StandardSave(state["params"]),
           "opt_state": ocp.args.StandardSave(state["opt_state"]),
           "config": ocp.args.JsonSave(ckpt_lib.config_to_json(run.config)),
           "progress": ocp.args.JsonSave({"step": step, "data_stage": data_stage})}
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iter)
  mngr.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)


def restore_checkpoint(mngr: ocp.CheckpointManager, run: Run, step: int) -> tuple[State, dict]:
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          run.abstract_state, run.state_shardings)
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract["params"]),
        opt_state=ocp.args.StandardRestore(abstract["opt_state"]),
        progress=ocp.args.JsonRestore()))
  except Exception as e:  # orbax/tensorstore raise many types for damaged files
    path = os.path.join(ckpt_lib.checkpoint_dir(run.config_workdir), str(step))
    raise RuntimeError(
        f"checkpoint {path} cannot be restored ({type(e).__name__}: {e}). It is damaged or "
        "from another program: move it out of the checkpoints folder to resume from the "
        "previous step, or use a new --workdir") from e
  state = {"step": jax.device_put(jnp.asarray(step, jnp.int32), run.state_shardings["step"]),
           "params": restored["params"], "opt_state": restored["opt_state"]}
  return state, dict(restored["progress"])


class _Preemption:
  """Turns SIGTERM into a flag the loop checks between steps (save, then exit)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # not in the main thread (e.g. some test runners): no handler
      self._previous = None
    return self

  def _handler(self, signum, frame):
    logging.warning("SIGTERM received: saving a checkpoint before exiting")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


# ------------------------------------------------------------------------------------------------
# The loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop_after_steps: int | None = None) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns the final metrics.

  `stop_after_steps` ends the loop early after that many steps of this call, as a preemption
  would (a checkpoint is saved) — used by tests of exact resumption.
  """
  os.makedirs(workdir, exist_ok=True)
  run = dataclasses.replace(build_run(config), config_workdir=workdir)
  logging.info("mesh %s; %d steps in %d stage(s)", dict(run.mesh.shape), run.total_steps,
               len(config.train.stages))
  batch_sharding = sharding.batch_sharding(run.mesh)
  eval_step = jax.jit(make_eval_step(run.graphdef, run.forward),
                      in_shardings=(run.state_shardings["params"], batch_sharding))

  mngr = ckpt_lib.make_manager(workdir, keep_last=config.checkpoint.keep_last,
                               keep_best=config.checkpoint.keep_best and config.eval.num_batches > 0,
                               async_save=config.checkpoint.async_save)
  start = mngr.latest_step()
  progress = {"data_stage": -1}
  if start is not None:
    saved_config, _ = ckpt_lib.read_run_config(workdir, start)
    _check_compatible(saved_config, config, workdir)
    state, progress = restore_checkpoint(mngr, run, start)
    logging.info("resumed from %s at step %d", workdir, start)
  else:
    state = jax.jit(lambda: init_state(run.model_cfg, run.tx, config.train.seed),
                    out_shardings=run.state_shardings)()
    if config.checkpoint.init_from:
      state["params"] = _params_from(config.checkpoint.init_from, run)
    start = 0

  writer = metrics_writer.MetricsWriter(workdir, resume_step=start)
  step = start
  final_metrics: dict[str, Any] = {}
  data_iter, data_stage, compiled_stage, train_step = None, -1, -1, None
  tokens_since, time_since = 0, time.perf_counter()
  steps_this_call = 0
  last_finite = start
  with _Preemption() as preemption:
    while step < run.total_steps:
      stage = stage_of(run, step)
      if stage != compiled_stage:  # one compilation per stage, none inside it
        _, seq_len, accum = config.train.stages[stage]
        train_step = jax.jit(
            make_train_step(run.graphdef, run.tx, run.schedule, grad_accum=accum,
                            seed=config.train.seed, forward=run.forward),
            in_shardings=(run.state_shardings, batch_sharding),
            out_shardings=(run.state_shardings, None), donate_argnums=0)
        compiled_stage = stage
        logging.info("stage %d: seq_len %d, grad_accum %d, steps %d..%d", stage, seq_len, accum,
                     run.bounds[stage], run.bounds[stage + 1] - 1)
      if data_stage != stage:
        data_iter = iter(train_dataset(run, stage))
        if progress.get("data_stage") == stage and step == start:
          mngr.restore(step, args=ocp.args.Composite(
              data=grain.checkpoint.CheckpointRestore(data_iter)))
        data_stage = stage
      batch = data_lib.to_global_batch(next(data_iter), batch_sharding)
      with jax.set_mesh(run.mesh):  # custom kernels (pallas_conv) shard_map over this mesh
        state, metrics = train_step(state, batch)
      step += 1
      steps_this_call += 1
      tokens_since += int(np.prod(batch["inputs"].shape))

      last = step == run.total_steps
      stopping = preemption.requested or (stop_after_steps is not None
                                          and steps_this_call >= stop_after_steps)
      if step % config.train.log_every_steps == 0 or last or stopping:
        metrics = jax.device_get(metrics)
        if not all(np.isfinite(v) for v in metrics.values()):
          raise FloatingPointError(
              f"non-finite training metrics at step {step} (finite at step {last_finite}): "
              f"{metrics}. Lower optim.learning_rate or check the data; the last checkpoint "
              "holds finite values and the run resumes from it")
        last_finite = step
        elapsed = time.perf_counter() - time_since
        tokens_per_s = tokens_since / max(elapsed, 1e-9)
        eta = (run.total_steps - step) * elapsed / max(config.train.log_every_steps, 1)
        writer.write(step, {**{k: float(v) for k, v in metrics.items()},
                            "tokens_per_s": tokens_per_s})
        logging.info("step %d/%d  loss %.4f  acc %.3f  lr %.2e  %.0f tok/s  ETA %s", step,
                     run.total_steps, metrics["loss"], metrics["accuracy"],
                     metrics["learning_rate"], tokens_per_s, _format_eta(eta))
        tokens_since, time_since = 0, time.perf_counter()

      eval_now = last or (config.eval.every_steps and step % config.eval.every_steps == 0)
      eval_metrics = None
      if eval_now and config.eval.num_batches > 0:
        eval_metrics = evaluate(run, eval_step, state["params"])
        writer.write(step, eval_metrics)
        logging.info("step %d  valid loss %.4f  perplexity %.3f  accuracy %.3f", step,
                     eval_metrics["valid_loss"], eval_metrics["valid_perplexity"],
                     eval_metrics["valid_accuracy"])
        final_metrics.update(eval_metrics)
      if (last or stopping or eval_metrics is not None
          or step % config.checkpoint.every_steps == 0):
        # The iterator belongs to the stage of the *next* step; at a stage boundary the next
        # stage starts a fresh one, so none is saved.
        keep_iter = not last and stage_of(run, step) == stage
        _assert_finite(state, step)
        save_checkpoint(mngr, run, state, data_iter if keep_iter else None,
                        stage if keep_iter else -1, metrics=eval_metrics, force=stopping)
      if stopping:
        logging.info("stopping at step %d; resume by running the same command", step)
        break
  mngr.wait_until_finished()
  mngr.close()
  writer.close(plot=step == run.total_steps)
  final_metrics["step"] = step
  if steps_this_call:
    final_metrics["train_loss"] = float(jax.device_get(metrics["loss"]))
  with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
    json.dump(final_metrics, f, indent=1)
  return final_metrics


def _assert_finite(state: State, step: int) -> None:
  """Never write a checkpoint holding NaN/Inf parameters."""
  finite = jax.tree.reduce(jnp.logical_and,
                           jax.tree.map(lambda x: jnp.isfinite(x).all(), state["params"]))
  if not bool(finite):
    raise FloatingPointError(f"parameters became non-finite by step {step}; no checkpoint was "
                             "written. Lower optim.learning_rate and resume from the last one")


def _params_from(workdir: str, run: Run):
  """Parameters of another run's checkpoint (e.g. a converted release), sharded like ours."""
  model, saved, _ = ckpt_lib.restore_model(workdir, shardings=run.state_shardings["params"])
  saved_cfg = ckpt_lib.model_config(saved)
  if dataclasses.replace(saved_cfg, dtype=run.model_cfg.dtype, remat=run.model_cfg.remat,
                         conv_impl=run.model_cfg.conv_impl, scan_layers=run.model_cfg.scan_layers,
                         embed_dropout=run.model_cfg.embed_dropout) != run.model_cfg:
    raise ValueError(f"checkpoint.init_from={workdir} has model {saved_cfg}, which differs from "
                     f"config.model {run.model_cfg}")
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
