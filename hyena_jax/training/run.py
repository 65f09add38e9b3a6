"""A pretraining run built from its config: mesh, model config, optimizer and schedule, the
sharded abstract state, the train/eval steps per stage, the datasets and the evaluation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from hyena_jax.data import pretraining as data_lib
from hyena_jax.errors import InputError
from hyena_jax.model.config import HyenaConfig
from hyena_jax.model.hyenadna import HyenaLM
from hyena_jax.training import optim, run_config, sharding
from hyena_jax.training.steps import State


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
  sharding.check_process_rows(mesh)
  model_cfg = run_config.validate(config, mesh.shape["data"] * mesh.shape["fsdp"])
  total = run_config.total_steps(config)
  tx, schedule = make_optimizer(config.optim, total)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: HyenaLM(model_cfg, rngs=nnx.Rngs(0))))
  abstract = jax.eval_shape(lambda: init_state(model_cfg, tx, config.train.seed))
  replicated = sharding.replicated(mesh)
  shardings = {"step": replicated, "params": sharding.tree_shardings(abstract["params"], mesh),
               "opt_state": sharding.tree_shardings(abstract["opt_state"], mesh)}
  forward = None
  if config.mesh.sequence > 1:
    from hyena_jax.training import context_parallel
    forward = functools.partial(_context_parallel_forward, context_parallel.forward, mesh)
  return Run(config, model_cfg, mesh, graphdef, tx, schedule, shardings, abstract, total,
             run_config.stage_boundaries(config), forward)


def make_optimizer(optim_cfg: ml_collections.ConfigDict, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer and learning-rate schedule of a run's `optim` config section."""
  schedule = optim.learning_rate_schedule(
      optim_cfg.learning_rate, total_steps, int(optim_cfg.warmup_fraction * total_steps),
      init_lr=optim_cfg.init_lr, min_lr_ratio=optim_cfg.min_lr_ratio)
  tx = optim.make_optimizer(
      learning_rate=schedule, weight_decay=optim_cfg.weight_decay,
      filter_weight_decay=optim_cfg.filter_weight_decay, b1=optim_cfg.b1, b2=optim_cfg.b2,
      eps=optim_cfg.eps, grad_clip=optim_cfg.grad_clip)
  return tx, schedule


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
    raise InputError("the valid split produced no tokens: check data.bed (rows with split valid) "
                     "or data.valid_fraction")
  loss = totals["loss_sum"] / totals["count"]
  return {"valid_loss": loss, "valid_perplexity": math.exp(min(loss, 50.0)),
          "valid_accuracy": totals["correct"] / totals["count"]}


# ------------------------------------------------------------------------------------------------
# Checkpoints
