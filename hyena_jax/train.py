"""Pretraining loop, read top to bottom in data-flow order:
mesh -> input -> model and optimizer (initialised sharded) -> step -> checkpoint -> eval -> loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
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
from etils import epath
from flax import nnx

from hyena_jax import checkpoint as ckpt_lib
from hyena_jax import data as data_lib
from hyena_jax import optim, run_config, sharding, storage
from hyena_jax import metrics_writer
from hyena_jax.config import HyenaConfig
from hyena_jax.errors import InputError
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
    from hyena_jax import context_parallel
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
    raise ValueError("the valid split produced no tokens: check data.bed/valid_fraction")
  loss = totals["loss_sum"] / totals["count"]
  return {"valid_loss": loss, "valid_perplexity": math.exp(min(loss, 50.0)),
          "valid_accuracy": totals["correct"] / totals["count"]}


# ------------------------------------------------------------------------------------------------
# Checkpoints

# Optimizer fields a resume may change when named in `allow_changed` (--allow_changed): they
# change how later steps update the parameters, not what the checkpoint holds.
CHANGEABLE_ON_RESUME = "optim"


class DivergedError(InputError, FloatingPointError):
  """Training produced NaN/Inf; the message says how to resume with a lower learning rate."""


def _check_allow_changed(allow_changed: tuple[str, ...], config: ml_collections.ConfigDict
                         ) -> None:
  for name in allow_changed:
    section, _, key = name.partition(".")
    if section != CHANGEABLE_ON_RESUME or key not in config.optim:
      raise InputError(
          f"--allow_changed={name}: only optimizer fields may change on resume, named as "
          f"optim.<field> with <field> one of {', '.join(sorted(config.optim.keys()))}")


# How the step is executed may change between runs of one workdir; what it computes may not.
EXECUTION_FIELDS = ("remat", "scan_layers", "conv_impl")


def _check_compatible(saved: dict, config: ml_collections.ConfigDict, workdir: str,
                      allow_changed: tuple[str, ...] = ()) -> dict[str, list]:
  """Refuses a checkpoint of a different run; returns {name: [old, new]} of allowed changes."""
  current = ckpt_lib.config_to_json(config)
  execution = set(EXECUTION_FIELDS)
  changes = {}
  for section, keys in (("model", None), ("train", ("global_batch_size", "stages", "seed")),
                        ("optim", None)):
    old, new = saved.get(section, {}), current[section]
    for key in keys or sorted((set(old) | set(new)) - execution):
      if old.get(key) == new.get(key):
        continue
      name = f"{section}.{key}"
      if name in allow_changed:
        changes[name] = [old.get(key), new.get(key)]
        continue
      hint = ""
      if section == CHANGEABLE_ON_RESUME:
        hint = (f"; or, to continue this run with the new value, add --allow_changed={name} "
                "(recorded in the checkpoint's progress)")
      raise InputError(
          f"{workdir} holds a checkpoint of a different run: {name} was {old.get(key)!r}, the "
          f"config says {new.get(key)!r}. Use a new --workdir, or pass "
          f"--config.{name}={old.get(key)!r} to resume it{hint}")
  return changes


def save_checkpoint(mngr: ocp.CheckpointManager, run: Run, state: State, data_iter,
                    data_stage: int, metrics: dict | None = None, force: bool = False,
                    config_changes: list | None = None) -> None:
  step = int(jax.device_get(state["step"]))
  # Checksums of every array (orbax stores none for array data): verified on resume.
  sums = {"params": ckpt_lib.fingerprints(state["params"]),
          "opt_state": ckpt_lib.fingerprints(state["opt_state"])}
  progress = {"step": step, "data_stage": data_stage, "fingerprints": sums,
              "config_changes": config_changes or []}
  items = {"params": ocp.args.StandardSave(state["params"]),
           "opt_state": ocp.args.StandardSave(state["opt_state"]),
           "config": ocp.args.JsonSave(ckpt_lib.config_to_json(run.config)),
           "progress": ocp.args.JsonSave(progress)}
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iter)
  mngr.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)


@dataclasses.dataclass
class Resumed:
  """What a resume restored from checkpoint `step` (state is None for a finished run)."""
  step: int
  state: State | None
  progress: dict
  data_iter: Any = None        # iterator of the train stage `progress["data_stage"]`, restored
  config_changes: list = dataclasses.field(default_factory=list)


def restore_checkpoint(mngr: ocp.CheckpointManager, run: Run, step: int,
                       allow_changed: tuple[str, ...] = ()) -> Resumed:
  """Restores and verifies step `step`; DamagedCheckpointError names what is wrong with it."""
  workdir = run.config_workdir
  where = ckpt_lib.step_dir(workdir, step)
  saved_config = ckpt_lib.read_json_item(workdir, step, "config")
  progress = ckpt_lib.read_json_item(workdir, step, "progress")
  changes = _check_compatible(saved_config, run.config, workdir, allow_changed)
  history = list(progress.get("config_changes", []))
  if changes:
    _check_same_optimizer_state(saved_config, run, changes)
    history.append({"step": step, **changes})
  if step >= run.total_steps:
    return Resumed(step, None, progress, config_changes=history)
  data_stage = int(progress.get("data_stage", -1))
  items = ("params", "opt_state") + (("data",) if data_stage >= 0 else ())
  missing = ckpt_lib.missing_files(workdir, step, items)
  if missing:
    raise ckpt_lib.DamagedCheckpointError(
        f"checkpoint step {step} is damaged: {', '.join(missing)} missing")
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          run.abstract_state, run.state_shardings)
  restored = {}
  for item in ("params", "opt_state"):
    error = None
    try:  # orbax/tensorstore raise many types for damaged files
      restored[item] = mngr.restore(step, args=ocp.args.Composite(
          **{item: ocp.args.StandardRestore(abstract[item])}))[item]
    except Exception as e:
      error = e
    if _any_process(error is not None):  # each process reads its own shards
      reason = (f"{type(error).__name__}: {str(error)[:300]}" if error is not None else
                "another process could not read its part")
      raise ckpt_lib.DamagedCheckpointError(
          f"checkpoint step {step} is damaged: {where}/{item} cannot be restored "
          f"({reason})") from error
    expected = progress.get("fingerprints", {}).get(item)
    if expected is not None:  # checkpoints written before checksums existed have none
      ckpt_lib.verify_fingerprints(restored[item], expected,
                                   f"checkpoint step {step} is damaged: {where}/{item}")
  data_iter = None
  if data_stage >= 0:
    data_iter = iter(train_dataset(run, data_stage))
    error = None
    try:
      mngr.restore(step, args=ocp.args.Composite(
          data=grain.checkpoint.CheckpointRestore(data_iter)))
    except Exception as e:
      error = e
    # Each process reads its own iterator state: a damaged one must fail every process's
    # restore of this step (see ckpt_lib.missing_files).
    if _any_process(error is not None):
      reason = (f"{type(error).__name__}: {str(error)[:300]}" if error is not None else
                "another process's state failed")
      raise ckpt_lib.DamagedCheckpointError(
          f"checkpoint step {step} is damaged: its data iterator in {where}/data cannot be "
          f"restored ({reason})") from error
  state = {"step": jax.device_put(jnp.asarray(step, jnp.int32), run.state_shardings["step"]),
           "params": restored["params"], "opt_state": restored["opt_state"]}
  return Resumed(step, state, progress, data_iter, history)


def _check_same_optimizer_state(saved_config: dict, run: Run, changes: dict) -> None:
  """An allowed optimizer change must keep the optimizer state's structure (grad_clip 0 <-> >0
  adds or removes a transform), else the saved state cannot be restored into it."""
  old_optim = ml_collections.ConfigDict({**run.config.optim.to_dict(), **saved_config["optim"]})
  old_tx, _ = make_optimizer(old_optim, run.total_steps)
  params = run.abstract_state["params"]
  if jax.tree.structure(jax.eval_shape(old_tx.init, params)) != \
      jax.tree.structure(run.abstract_state["opt_state"]):
    names = ", ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in changes.items())
    raise InputError(f"{names} changes the structure of the optimizer state saved in "
                     f"{run.config_workdir}, so the run cannot continue with it; start a new "
                     f"--workdir with --config.checkpoint.init_from={run.config_workdir}")


def _resume(mngr: ocp.CheckpointManager, run: Run, allow_changed: tuple[str, ...],
            skip_damaged: bool) -> Resumed | None:
  """The newest checkpoint that restores and verifies, or None when there is none.

  A damaged newest step stops the run with its name, unless `skip_damaged`: then older steps
  are tried and the damaged newer ones moved to WORKDIR/damaged_checkpoints/ (only once a good
  one restored, so a failure changes nothing).
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  damaged = []
  for i, step in enumerate(steps):
    try:
      resumed = restore_checkpoint(mngr, run, step, allow_changed)
    except ckpt_lib.DamagedCheckpointError as e:
      older = steps[i + 1:]
      if not skip_damaged:
        fix = (f"Re-run with --skip_damaged_checkpoints to resume from step {older[0]} (the "
               f"damaged step moves to {storage.display(run.config_workdir)}/damaged_checkpoints/"
               "), or use a new --workdir" if older else
               "No earlier checkpoint exists: use a new --workdir")
        raise ckpt_lib.DamagedCheckpointError(f"{e}. {fix}") from e
      logging.warning("skipping %s", e)
      damaged.append(step)
      continue
    if damaged:  # every process found the same steps damaged; one moves them
      if jax.process_index() == 0:
        for bad in damaged:
          logging.warning("moved damaged checkpoint step %d to %s", bad,
                          ckpt_lib.move_aside(run.config_workdir, bad))
      _sync_processes("hyena_jax_moved_damaged_checkpoints")
      mngr.reload()
    return resumed
  if damaged:
    raise ckpt_lib.DamagedCheckpointError(
        f"every checkpoint in {ckpt_lib.checkpoint_dir(run.config_workdir)} is damaged (steps "
        f"{damaged}); nothing was moved. Use a new --workdir")
  return None


class Preemption:
  """Turns SIGTERM (preemption) and SIGINT (Ctrl-C) into a flag the loop checks between steps:
  it saves a checkpoint and stops, and the run reports "interrupted". A second Ctrl-C stops at
  once, without saving. SIGINT is left alone where it is ignored (nohup, background jobs) or
  handled by the embedding program."""

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict = {}

  @property
  def requested(self) -> bool:
    return self.signum is not None

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      if sig == signal.SIGINT and signal.getsignal(sig) is not signal.default_int_handler:
        continue
      try:
        self._previous[sig] = signal.signal(sig, self._handler)
      except ValueError:  # not in the main thread (e.g. some test runners): no handler
        pass
    return self

  def _handler(self, signum, frame):
    if signum == signal.SIGINT and self.signum is not None:
      raise KeyboardInterrupt
    self.signum = self.signum or signum
    logging.warning("%s received: saving a checkpoint after this step, then exiting%s",
                    signal.Signals(signum).name,
                    " (Ctrl-C again stops at once, without saving)"
                    if signum == signal.SIGINT else "")

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}

  def agreed(self) -> bool:
    """Whether any process has been asked to stop: the same answer on every process.

    A signal reaches the processes of a multi-host run at slightly different moments, and a
    checkpoint needs all of them at the same step; so after every step each process contributes
    its flag to one all-gather and all stop after the step at which the first one was asked.
    (One host round trip per step; a single process only reads its flag.)
    """
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.int32(self.signum or 0))
    if self.signum is None and flags.any():  # stop with the signal another process received
      self.signum = int(flags[flags > 0][0])
    return bool(flags.any())


def _any_process(flag: bool) -> bool:
  """Whether `flag` holds on any process (the same answer everywhere)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(multihost_utils.process_allgather(np.int32(flag)).any())


def _sync_processes(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


# ------------------------------------------------------------------------------------------------
# The loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop_after_steps: int | None = None, *,
                       allow_changed: tuple[str, ...] | list[str] = (),
                       skip_damaged_checkpoints: bool = False) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns its final metrics.

  The result has "status": "finished" — the metrics are then also in WORKDIR/final_metrics.json,
  written once when the last step is done; re-running a finished run returns them and changes
  nothing — or "interrupted" when a signal (SIGTERM, SIGINT: its name under "signal") or
  `stop_after_steps` (tests of exact resumption) ended the call early. An interrupted run has
  saved a checkpoint and resumes when run again; it writes no final_metrics.json.
  `allow_changed` names optimizer fields ("optim.learning_rate") the config may change from the
  checkpoint's (e.g. after a NaN stop); `skip_damaged_checkpoints` resumes from the newest
  checkpoint that restores and verifies, moving damaged newer ones aside.
  """
  allow_changed = tuple(allow_changed)
  _check_allow_changed(allow_changed, config)
  # Validate the config and open the data before creating the workdir: a mistake leaves nothing.
  storage.check_access(workdir, "--workdir")
  if config.checkpoint.init_from:
    storage.check_access(config.checkpoint.init_from, "checkpoint.init_from")
  run = dataclasses.replace(build_run(config), config_workdir=workdir)
  final_path = storage.makedirs(workdir) / "final_metrics.json"
  with Preemption() as preemption:
    mngr = ckpt_lib.make_manager(
        workdir, keep_last=config.checkpoint.keep_last,
        keep_best=config.checkpoint.keep_best and config.eval.num_batches > 0,
        async_save=config.checkpoint.async_save)
    try:
      resumed = _resume(mngr, run, allow_changed, skip_damaged_checkpoints)
      if resumed is not None and resumed.step >= run.total_steps:
        result = _finished(run, final_path)
      else:
        if jax.process_index() == 0 and final_path.exists():
          final_path.unlink()  # left by an older version when interrupted: not final
        result = _train(run, mngr, resumed, preemption, stop_after_steps, final_path)
    except BaseException:
      # A save in flight completes even when a step raised; its own failure must not hide the
      # error already on its way.
      with contextlib.suppress(Exception):
        mngr.wait_until_finished()
      with contextlib.suppress(Exception):
        mngr.close()
      raise
    with _saving(workdir, mngr):
      mngr.wait_until_finished()
      mngr.close()
    return result


@contextlib.contextmanager
def _saving(workdir: str, mngr: ocp.CheckpointManager):
  """Turns a storage failure of a checkpoint save (disk full, permissions), raised now or by the
  background save it surfaces from, into one CheckpointSaveError line."""
  try:
    yield
  except Exception as error:  # pylint: disable=broad-except
    if ckpt_lib.save_failure(error, workdir) is None:
      raise
    with contextlib.suppress(Exception):  # saves still in flight decide the newest complete step
      mngr.wait_until_finished()
    raise ckpt_lib.save_failure(error, workdir) from error


def _finished(run: Run, final_path: epath.Path) -> dict[str, Any]:
  """A finished run: its final metrics, unchanged. A kill between the last checkpoint and
  final_metrics.json leaves them only in metrics.jsonl: rebuilt from there once."""
  step = run.total_steps
  if final_path.exists():
    final = json.loads(final_path.read_text())
    logging.info("%s: the run finished at step %d; nothing to do (final metrics: %s)",
                 run.config_workdir, step, final)
    return final
  rows = [r for r in metrics_writer.read_rows(final_path.parent / "metrics.jsonl")
          if r.get("step") == step]
  valid, train_loss = {}, {}
  for row in rows:
    valid.update({k: v for k, v in row.items() if k.startswith("valid_")})
    train_loss.update({"train_loss": row["loss"]} if "loss" in row else {})
  final = {"status": "finished", "step": step, **valid, **train_loss}  # the order _train writes
  _write_final(final, final_path)
  logging.info("%s: the run finished at step %d; wrote its final metrics %s", run.config_workdir,
               step, final)
  return final


def _write_final(final: dict, final_path: epath.Path) -> None:
  """final_metrics.json and curves.png, written by process 0 only."""
  if jax.process_index() == 0:
    storage.write_atomically(final_path, json.dumps(final, indent=1))
    curves = metrics_writer.plot_curves(final_path.parent / "metrics.jsonl",
                                        final_path.parent / "curves.png")
    logging.info("final metrics: %s; loss curves: %s", final_path, curves)


def _diverged(what: str, step: int, last_saved: int | None, config) -> DivergedError:
  fix = f"--config.optim.learning_rate={config.optim.learning_rate / 2:g}"
  if last_saved is None:
    how = (f"No checkpoint was written in this workdir yet: start again with a lower learning "
           f"rate, e.g. {fix}, or check the data")
  else:
    how = (f"The checkpoint of step {last_saved} holds finite values: continue from it with a "
           f"lower learning rate by re-running the same command with {fix} "
           "--allow_changed=optim.learning_rate (or check the data)")
  return DivergedError(f"{what} at step {step}. {how}")


def _train(run: Run, mngr: ocp.CheckpointManager, resumed: Resumed | None, preemption,
           stop_after_steps: int | None, final_path: epath.Path) -> dict[str, Any]:
  config, workdir = run.config, run.config_workdir
  logging.info("mesh %s; %d steps in %d stage(s)", dict(run.mesh.shape), run.total_steps,
               len(config.train.stages))
  batch_sharding = sharding.batch_sharding(run.mesh)
  eval_step = jax.jit(make_eval_step(run.graphdef, run.forward),
                      in_shardings=(run.state_shardings["params"], batch_sharding))
  if resumed is not None:
    start, state = resumed.step, resumed.state
    data_iter, data_stage = resumed.data_iter, int(resumed.progress.get("data_stage", -1))
    history = resumed.config_changes
    changed_now = history[-1] if history and history[-1]["step"] == start else {}
    for name, value in changed_now.items():
      if name != "step":
        logging.warning("resuming with %s changed from %r to %r (--allow_changed)", name, *value)
    logging.info("resumed from %s at step %d", workdir, start)
  else:
    state = jax.jit(lambda: init_state(run.model_cfg, run.tx, config.train.seed),
                    out_shardings=run.state_shardings)()
    if config.checkpoint.init_from:
      state["params"] = _params_from(config.checkpoint.init_from, run)
    start, data_iter, data_stage, history = 0, None, -1, []

  writer = metrics_writer.MetricsWriter(workdir, resume_step=start)
  step = start
  last_saved = start if resumed is not None else None
  final_metrics: dict[str, Any] = {}
  compiled_stage, train_step = -1, None
  tokens_since, time_since, step_at_line = 0, time.perf_counter(), start
  steps_this_call = 0
  last_finite = start
  stop_requested = False
  try:
    while step < run.total_steps and not stop_requested:
      if last_saved is not None:
        with _saving(workdir, mngr):  # a background save that failed stops the run before more work
          mngr.check_for_errors()
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
      if data_stage != stage:  # a resumed iterator continues; a new stage starts a fresh one
        data_iter = iter(train_dataset(run, stage))
        data_stage = stage
      batch = data_lib.to_global_batch(next(data_iter), batch_sharding)
      with jax.set_mesh(run.mesh):  # custom kernels (pallas_conv) shard_map over this mesh
        state, metrics = train_step(state, batch)
      step += 1
      steps_this_call += 1
      tokens_since += int(np.prod(batch["inputs"].shape))

      last = step == run.total_steps
      stop_requested = preemption.agreed()
      stopping = stop_requested or (stop_after_steps is not None
                                    and steps_this_call >= stop_after_steps)
      if step % config.train.log_every_steps == 0 or last or stopping:
        metrics = jax.device_get(metrics)
        if not all(np.isfinite(v) for v in metrics.values()):
          raise _diverged(f"non-finite training metrics {metrics} (finite at step "
                          f"{last_finite})", step, last_saved, config)
        last_finite = step
        elapsed = time.perf_counter() - time_since
        tokens_per_s = tokens_since / max(elapsed, 1e-9)
        # From the steps since the last line: a stop (Ctrl-C) logs after fewer than
        # log_every_steps of them.
        eta = (run.total_steps - step) * elapsed / max(step - step_at_line, 1)
        writer.write(step, {**{k: float(v) for k, v in metrics.items()},
                            "tokens_per_s": tokens_per_s})
        logging.info("step %d/%d  loss %.4f  acc %.3f  lr %.2e  %.0f tok/s  ETA %s", step,
                     run.total_steps, metrics["loss"], metrics["accuracy"],
                     metrics["learning_rate"], tokens_per_s, _format_eta(eta))
        tokens_since, time_since, step_at_line = 0, time.perf_counter(), step

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
        if not _params_finite(state):
          raise _diverged("parameters became non-finite (no checkpoint was written)", step,
                          last_saved, config)
        with _saving(workdir, mngr):
          save_checkpoint(mngr, run, state, data_iter if keep_iter else None,
                          stage if keep_iter else -1, metrics=eval_metrics, force=stopping,
                          config_changes=history)
        last_saved = step
      if stopping:
        break
  except BaseException:
    with contextlib.suppress(OSError):  # a full disk fails the metrics files too: say it once
      writer.close(plot=False)
    raise
  writer.close(plot=step == run.total_steps)
  with _saving(workdir, mngr):
    mngr.wait_until_finished()
  if step < run.total_steps:
    result = {"status": "interrupted", "step": step}
    if preemption.requested:
      result["signal"] = signal.Signals(preemption.signum).name
    if steps_this_call:
      result["train_loss"] = float(jax.device_get(metrics["loss"]))
    logging.warning("interrupted at step %d/%d%s; the checkpoint of step %s resumes it: run the "
                    "same command again", step, run.total_steps,
                    f" by {result['signal']}" if "signal" in result else "", last_saved)
    return result
  final_metrics = {"status": "finished", "step": step, **final_metrics,
                   "train_loss": float(jax.device_get(metrics["loss"]))}
  _write_final(final_metrics, final_path)
  return final_metrics


# One jitted reduction, not one eager op per array: in a multi-process run every computation on
# global arrays is a collective program all processes must launch alike, and dozens of small
# eager ones per checkpoint deadlocked gloo on CPU (jax 0.10.2).
_all_finite = jax.jit(lambda tree: jnp.stack(
    [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]).all())


def _params_finite(state: State) -> bool:
  """Never write a checkpoint holding NaN/Inf parameters."""
  return bool(jax.device_get(_all_finite(state["params"])))


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
