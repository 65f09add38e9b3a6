"""Saving and resuming runs: what a pretraining checkpoint holds, which config changes a resume
accepts (`model.config.EXECUTION_FIELDS` always; optimizer fields when named), restoring the
newest checkpoint that passes its checksums, and the same for fine-tuning's resume state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util

from hyena_jax import storage
from hyena_jax.errors import InputError, OutputExistsError
from hyena_jax.model.config import EXECUTION_FIELDS
from hyena_jax.training import checkpoint as ckpt_lib
from hyena_jax.training import distributed
from hyena_jax.training import run as run_lib
from hyena_jax.training.run import Run, State

# Optimizer fields a resume may change when named in `allow_changed` (--allow_changed): they
# change how later steps update the parameters, not what the checkpoint holds.
CHANGEABLE_ON_RESUME = "optim"


def check_allow_changed(allow_changed: tuple[str, ...], config: ml_collections.ConfigDict
                         ) -> None:
  for name in allow_changed:
    section, _, key = name.partition(".")
    if section != CHANGEABLE_ON_RESUME or key not in config.optim:
      raise InputError(
          f"--allow_changed={name}: only optimizer fields may change on resume, named as "
          f"optim.<field> with <field> one of {', '.join(sorted(config.optim.keys()))}")


def config_differences(saved: dict, config: ml_collections.ConfigDict,
                       compared: Callable[[str], bool]) -> list[tuple[str, Any, Any]]:
  """(field, saved value, config value) of every `compared` field (a dotted name such as
  "optim.learning_rate") that differs between a checkpoint's config and `config`, sorted.

  The one comparison of every resume: pretraining and fine-tuning differ only in `compared`.
  """
  flat = lambda tree: traverse_util.flatten_dict(tree, sep=".")  # noqa: E731
  old, new = flat(saved), flat(ckpt_lib.config_to_json(config))
  return [(name, old.get(name), new.get(name)) for name in sorted(set(old) | set(new))
          if compared(name) and old.get(name) != new.get(name)]


def _not_execution(name: str) -> bool:
  """How a step is executed (model.config.EXECUTION_FIELDS) may change between runs of one
  workdir; what it computes may not."""
  section, _, key = name.partition(".")
  return not (section == "model" and key in EXECUTION_FIELDS)


def _pretraining_field(name: str) -> bool:
  """What a pretraining resume compares: the model, the optimizer, and the train fields that
  decide the data order and the schedule (not logging, evaluation or checkpoint intervals)."""
  section, _, key = name.partition(".")
  if section == "train":
    return key in ("global_batch_size", "stages", "seed")
  return section in ("model", CHANGEABLE_ON_RESUME) and _not_execution(name)


def _check_compatible(saved: dict, config: ml_collections.ConfigDict, workdir: str,
                      allow_changed: tuple[str, ...] = ()) -> dict[str, list]:
  """Refuses a checkpoint of a different run; returns {name: [old, new]} of allowed changes."""
  changes = {}
  for name, was, now in config_differences(saved, config, _pretraining_field):
    if name in allow_changed:
      changes[name] = [was, now]
      continue
    hint = ""
    if name.startswith(CHANGEABLE_ON_RESUME + "."):
      hint = (f"; or, to continue this run with the new value, add --allow_changed={name} "
              "(recorded in the checkpoint's progress)")
    raise InputError(
        f"{workdir} holds a checkpoint of a different run: {name} was {was!r}, the config says "
        f"{now!r}. Use a new --workdir, or pass --config.{name}={was!r} to resume it{hint}")
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
  # A finished run's last checkpoint is what it delivers: its parameters are verified too.
  finished = step >= run.total_steps
  data_stage = -1 if finished else int(progress.get("data_stage", -1))
  items = ("params",) if finished else (
      ("params", "opt_state") + (("data",) if data_stage >= 0 else ()))
  missing = ckpt_lib.missing_files(workdir, step, items)
  if missing:
    raise ckpt_lib.DamagedCheckpointError(
        f"checkpoint step {step} is damaged: {', '.join(missing)} missing")
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          run.abstract_state, run.state_shardings)
  restored = {}
  for item in ("params",) if finished else ("params", "opt_state"):
    error = None
    try:  # orbax/tensorstore raise many types for damaged files
      restored[item] = mngr.restore(step, args=ocp.args.Composite(
          **{item: ocp.args.StandardRestore(abstract[item])}))[item]
    except Exception as e:
      error = e
    if distributed.any_process(error is not None):  # each process reads its own shards
      reason = (f"{type(error).__name__}: {str(error)[:300]}" if error is not None else
                "another process could not read its part")
      raise ckpt_lib.DamagedCheckpointError(
          f"checkpoint step {step} is damaged: {where}/{item} cannot be restored "
          f"({reason})") from error
    expected = progress.get("fingerprints", {}).get(item)
    if expected is not None:  # checkpoints written before checksums existed have none
      ckpt_lib.verify_fingerprints(restored[item], expected,
                                   f"checkpoint step {step} is damaged: {where}/{item}")
  if finished:
    return Resumed(step, None, progress, config_changes=history)
  data_iter = None
  if data_stage >= 0:
    data_iter = iter(run_lib.train_dataset(run, data_stage))
    error = None
    try:
      mngr.restore(step, args=ocp.args.Composite(
          data=grain.checkpoint.CheckpointRestore(data_iter)))
    except Exception as e:
      error = e
    # Each process reads its own iterator state: a damaged one must fail every process's
    # restore of this step (see ckpt_lib.missing_files).
    if distributed.any_process(error is not None):
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
  old_tx, _ = run_lib.make_optimizer(old_optim, run.total_steps)
  params = run.abstract_state["params"]
  if jax.tree.structure(jax.eval_shape(old_tx.init, params)) != \
      jax.tree.structure(run.abstract_state["opt_state"]):
    names = ", ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in changes.items())
    raise InputError(f"{names} changes the structure of the optimizer state saved in "
                     f"{run.config_workdir}, so the run cannot continue with it; start a new "
                     f"--workdir with --config.checkpoint.init_from={run.config_workdir}")


def resume_latest(mngr: ocp.CheckpointManager, run: Run, allow_changed: tuple[str, ...],
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
      distributed.sync_processes("hyena_jax_moved_damaged_checkpoints")
      mngr.reload()
    return resumed
  if damaged:
    raise ckpt_lib.DamagedCheckpointError(
        f"every checkpoint in {ckpt_lib.checkpoint_dir(run.config_workdir)} is damaged (steps "
        f"{damaged}); nothing was moved. Use a new --workdir")
  return None


# ------------------------------------------------------------------------------------------------
# Fine-tuning runs (downstream/finetune.py): the latest state in WORKDIR/resume/, the best model in
# WORKDIR/checkpoints/.


def restore_finetune_state(resume_mngr: ocp.CheckpointManager, resume_dir: str, step: int,
                   progress: dict, like: State) -> State:
  """The state saved at `step` of WORKDIR/resume, laid out as `like`, checksums verified."""
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        {"params": like["params"], "opt_state": like["opt_state"]})
  where = ckpt_lib.step_dir(resume_dir, step)
  try:
    restored = resume_mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(target["params"]),
        opt_state=ocp.args.StandardRestore(target["opt_state"])))
  except (OSError, ValueError, KeyError) as error:
    raise ckpt_lib.DamagedCheckpointError(
        f"the fine-tuning state {where} cannot be restored ({error}); delete {resume_dir} to "
        "start over, or use a new --workdir") from error
  for item in ("params", "opt_state"):
    ckpt_lib.verify_fingerprints(restored[item], progress["fingerprints"][item],
                                 f"the fine-tuning state {where}/{item} is damaged: ")
  step_array = jax.device_put(jnp.asarray(step, jnp.int32), like["step"].sharding)
  return {"step": step_array, "params": restored["params"], "opt_state": restored["opt_state"]}


RESUME_SUBDIR = "resume"  # WORKDIR/resume/checkpoints/<step>/: the latest state (not the best)


def _check_same_finetune_run(saved: dict, config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses to resume a workdir whose run had a different config; how a step is executed
  (model.config.EXECUTION_FIELDS) may change, as in pretraining."""
  for name, was, now in config_differences(saved, config, _not_execution)[:1]:
    raise InputError(
        f"{workdir} holds a fine-tuning run with a different config: {name} was {was!r}, the "
        f"config says {now!r}. Use a new --workdir, or pass --config.{name}={was!r} to resume it")


def finetune_resume_point(workdir: str, config: ml_collections.ConfigDict
                  ) -> tuple[int | None, dict | None]:
  """(latest resume step, its progress) after checking that the workdir holds this run;
  (None, None) for a fresh workdir, or for this run killed before its first resumable state."""
  resume_dir = storage.resolve(workdir) / RESUME_SUBDIR
  step = ckpt_lib.latest_step(resume_dir)
  if step is None:
    best = ckpt_lib.latest_step(workdir)
    if best is not None:
      saved = ckpt_lib.read_json_item(workdir, best, "config")
      # A best checkpoint records the architecture actually trained as "model": from a
      # pretrained source that is the source's, not config.model.
      different = config_differences(
          saved, config, lambda name: not (config.pretrained and name.startswith("model.")))
      if different:
        name, was, now = different[0]
        raise OutputExistsError(
            f"{workdir} already holds checkpoints of another run ({name} was {was!r}, the "
            f"config says {now!r}); use a new --workdir")
      # The same run, killed after saving a best checkpoint and before its resumable state:
      # starting over recomputes the same steps, so nothing is lost but time.
      logging.warning("%s holds a best checkpoint (step %d) of this run but no resumable state "
                      "(it was stopped between the two saves): starting it over from step 0",
                      workdir, best)
      ckpt_lib.checkpoint_dir(workdir).rmtree()
    return None, None
  progress = ckpt_lib.read_json_item(resume_dir, step, "progress")
  _check_same_finetune_run(progress["config"], config, workdir)
  return step, progress
