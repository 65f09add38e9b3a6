"""Pretraining loop, read top to bottom in data-flow order:
mesh -> input -> model and optimizer (initialised sharded) -> step -> checkpoint -> eval -> loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx

from hyena_jax import storage
from hyena_jax.data import pretraining as data_lib
from hyena_jax.errors import DivergedError, InputError
from hyena_jax.model.config import STARTING_POINT_OVERRIDES
from hyena_jax.training import checkpoint as ckpt_lib
from hyena_jax.training import distributed, metrics_writer, resume
from hyena_jax.training import run as run_lib
from hyena_jax.training import sharding, steps
from hyena_jax.training.steps import State

# ------------------------------------------------------------------------------------------------
# Loss and steps (pure functions; nothing here branches on the config at run time)


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
  resume.check_allow_changed(allow_changed, config)
  # Validate the config and open the data before creating the workdir: a mistake leaves nothing.
  storage.check_access(workdir, "--workdir")
  if config.checkpoint.init_from:
    storage.check_access(config.checkpoint.init_from, "checkpoint.init_from")
  run = dataclasses.replace(run_lib.build_run(config), config_workdir=workdir)
  final_path = storage.makedirs(workdir) / "final_metrics.json"
  with distributed.Preemption() as preemption:
    mngr = ckpt_lib.make_manager(
        workdir, keep_last=config.checkpoint.keep_last,
        keep_best=config.checkpoint.keep_best and config.eval.num_batches > 0,
        async_save=config.checkpoint.async_save)
    try:
      resumed = resume.resume_latest(mngr, run, allow_changed, skip_damaged_checkpoints)
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


def _finished(run: run_lib.Run, final_path: epath.Path) -> dict[str, Any]:
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


def _train(run: run_lib.Run, mngr: ocp.CheckpointManager, resumed: resume.Resumed | None,
           preemption, stop_after_steps: int | None, final_path: epath.Path) -> dict[str, Any]:
  config, workdir = run.config, run.config_workdir
  logging.info("mesh %s; %d steps in %d stage(s)", dict(run.mesh.shape), run.total_steps,
               len(config.train.stages))
  batch_sharding = sharding.batch_sharding(run.mesh)
  eval_step = jax.jit(steps.make_eval_step(run.graphdef, run.forward),
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
    state = jax.jit(lambda: run_lib.init_state(run.model_cfg, run.tx, config.train.seed),
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
      stage = run_lib.stage_of(run, step)
      if stage != compiled_stage:  # one compilation per stage, none inside it
        _, seq_len, accum = config.train.stages[stage]
        train_step = jax.jit(
            steps.make_train_step(run.graphdef, run.tx, run.schedule, grad_accum=accum,
                            seed=config.train.seed, forward=run.forward),
            in_shardings=(run.state_shardings, batch_sharding),
            out_shardings=(run.state_shardings, None), donate_argnums=0)
        compiled_stage = stage
        logging.info("stage %d: seq_len %d, grad_accum %d, steps %d..%d", stage, seq_len, accum,
                     run.bounds[stage], run.bounds[stage + 1] - 1)
      if data_stage != stage:  # a resumed iterator continues; a new stage starts a fresh one
        data_iter = iter(run_lib.train_dataset(run, stage))
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
        eval_metrics = run_lib.evaluate(run, eval_step, state["params"])
        writer.write(step, eval_metrics)
        logging.info("step %d  valid loss %.4f  perplexity %.3f  accuracy %.3f", step,
                     eval_metrics["valid_loss"], eval_metrics["valid_perplexity"],
                     eval_metrics["valid_accuracy"])
        final_metrics.update(eval_metrics)
      if (last or stopping or eval_metrics is not None
          or step % config.checkpoint.every_steps == 0):
        # The iterator belongs to the stage of the *next* step; at a stage boundary the next
        # stage starts a fresh one, so none is saved.
        keep_iter = not last and run_lib.stage_of(run, step) == stage
        if not _params_finite(state):
          raise _diverged("parameters became non-finite (no checkpoint was written)", step,
                          last_saved, config)
        with _saving(workdir, mngr):
          resume.save_checkpoint(mngr, run, state, data_iter if keep_iter else None,
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


def _params_from(workdir: str, run: run_lib.Run):
  """Parameters of another run's checkpoint (e.g. a converted release), sharded like ours."""
  model, saved, _ = ckpt_lib.restore_model(workdir, shardings=run.state_shardings["params"])
  saved_cfg = ckpt_lib.model_config(saved)
  ours = {name: getattr(run.model_cfg, name) for name in STARTING_POINT_OVERRIDES}
  differ = [f"model.{name}: {getattr(saved_cfg, name)!r} there, {getattr(run.model_cfg, name)!r} "
            "in the config" for name, value in dataclasses.asdict(saved_cfg).items()
            if name not in ours and value != getattr(run.model_cfg, name)]
  if differ:
    raise InputError(f"checkpoint.init_from={workdir} holds another architecture ("
                     f"{'; '.join(differ)}): set those fields as the checkpoint has them, or "
                     "start without init_from")
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
