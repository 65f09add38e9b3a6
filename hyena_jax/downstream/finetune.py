r"""Sequence classification (and regression) fine-tuning, SPEC section 6.1.

    python -m hyena_jax.finetune --config=configs/finetune.py:human_enhancers_cohn \
        --workdir=runs/cohn --config.data.train=PATH.tsv [--model=WORKDIR_OR_FILE]

Read top to bottom in data-flow order: metrics -> labelled data -> model (scratch, orbax workdir
or official PyTorch release) -> steps -> the loop (evaluate, early stopping, best checkpoint,
resumable state) -> results.json.

Resuming: WORKDIR/resume/ holds the latest state (saved at every evaluation and on
SIGTERM/SIGINT); the same command on the same workdir continues from it, bitwise equal to an
uninterrupted run, and on a finished run changes nothing.

The official recipe: the head pools the final hidden states (mean over ALL positions, left
[PAD] included, or the last token) into Linear(d_model, n_classes); AdamW with the implicit-filter
group, timm cosine with warm-up, full fine-tuning (or a frozen backbone). Known differences from
the official code: the learning-rate schedule is defined in real optimizer steps (upstream counts
`ceil(train_len / batch) * epochs` too, so they agree when train_len is the real row count);
float32 instead of fp16 AMP; the last incomplete training batch is dropped.

Model selection: the best validation checkpoint by eval.metric, except that a constant
predictor (one class for every validation row; prediction_summary) ranks below any checkpoint
that separates classes; constant predictions are logged as a warning and recorded in
results.json (`collapsed`, `constant_valid_steps`, `warnings`, `predictions`). Small data or a
CPU: finetune_config.small_data.
"""

from __future__ import annotations

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
from flax import nnx

from hyena_jax import storage
from hyena_jax.data import labelled
from hyena_jax.downstream import classifier, finetune_config, linear_probe
from hyena_jax.downstream.task_metrics import (collapse_message, prediction_summary,
                                               selection_score, task_metrics)
from hyena_jax.errors import DivergedError, InputError
from hyena_jax.model import mesh_axes
from hyena_jax.training import checkpoint as ckpt_lib
from hyena_jax.training import distributed, metrics_writer, resume, sharding

# ------------------------------------------------------------------------------------------------
# Linear probe (LP-FT's first stage; the fit itself is linear_probe.py)


def _fit_probe(graphdef: nnx.GraphDef, params: Any, splits: dict[str, labelled.LabelledSplit],
               config: ml_collections.ConfigDict, batch_sharding) -> tuple[dict, dict]:
  """(head params, report) of the linear probe on the starting backbone's pooled features."""
  start = time.perf_counter()
  features_fn = jax.jit(classifier.make_features_fn(graphdef))
  features = {name: classifier.predict(features_fn, params, splits[name].inputs,
                                       config.eval.batch_size, batch_sharding)
              for name in ("train", "valid", "test")}
  head, report = linear_probe.fit_probe(
      features, {name: splits[name].labels for name in ("train", "valid")},
      config.head.n_classes, config.eval.metric)
  # Reported only (never used to choose): what the probe alone scores, beside the fine-tuned
  # model's test metrics in results.json.
  for name in ("valid", "test"):
    report[name] = task_metrics(features[name] @ head["kernel"] + head["bias"],
                                splits[name].labels, config.head.n_classes)
  report["seconds"] = round(time.perf_counter() - start, 1)
  logging.info("linear probe: head fitted to %d rows of frozen features (l2 %g, valid %s by "
               "l2 %s) in %.1f s", len(splits["train"]), report["l2"], config.eval.metric,
               report[f"valid_{config.eval.metric}_by_l2"], report["seconds"])
  return head, report


def finetune_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                          stop_after_steps: int | None = None) -> dict[str, Any]:
  """Fine-tunes on config.data, keeps the best validation checkpoint, evaluates it on the test
  split; writes WORKDIR/{results.json, metrics.jsonl, test_outputs.npy, checkpoints/} and
  returns the results dict (with "status": "finished"). train.epochs = train.num_steps = 0
  evaluates the initial weights.

  Resumable: at every evaluation (and when stopped) the latest state (params, optimizer state,
  step, best-selection and early-stopping state) goes to WORKDIR/resume/; running the same config
  on the workdir again continues from there and ends bitwise equal to an uninterrupted run (the
  data order and dropout keys are functions of the step). A finished run rerun returns its
  results.json and changes nothing; a different config is refused. SIGTERM/SIGINT, or
  `stop_after_steps` (tests), save the state after the current step and return
  {"status": "interrupted", "step": ..., ["signal": name]}.
  """
  storage.check_access(workdir, "--workdir")
  resume_step, progress = resume.finetune_resume_point(workdir, config)
  results_path = storage.resolve(workdir) / "results.json"
  if progress is not None and progress["done"] and results_path.exists():
    results = json.loads(results_path.read_text())
    logging.info("%s: the fine-tuning run finished at step %d; nothing to do (test %s)", workdir,
                 progress["step"], results.get("test"))
    return results
  with distributed.Preemption() as preemption:  # the same signal handling as pretraining
    return _finetune(config, workdir, resume_step, progress, stop_after_steps, preemption)


def _finetune(config: ml_collections.ConfigDict, workdir: str, resume_step: int | None,
              progress: dict | None, stop_after_steps: int | None, preemption) -> dict[str, Any]:
  mesh = sharding.make_mesh(config.mesh.data, 1, 1)
  n_devices = mesh.shape[mesh_axes.DATA_AXIS]
  finetune_config.validate_config(config, n_devices)
  splits = labelled.load_splits(config)
  if config.train.epochs or config.train.num_steps:
    labelled.check_trainable(splits["train"], config)
  n_classes = config.head.n_classes
  model, init = classifier.build_classifier(config)
  if config.data.max_length > model.config.l_max:
    raise InputError(f"data.max_length={config.data.max_length} exceeds the model's l_max="
                     f"{model.config.l_max}; lower it (with data.truncate=True) or use a model "
                     "with a longer context")
  # Created only after the config, data and model checks, so that a mistake leaves nothing.
  storage.makedirs(workdir)
  logging.info("init: %s; rows train %d / valid %d / test %d", init, len(splits["train"]),
               len(splits["valid"]), len(splits["test"]))

  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(params)
  frozen = classifier.frozen_mask(params, config.train.freeze_backbone)
  batch = config.train.batch_size
  steps_per_epoch = len(splits["train"]) // batch
  total = config.train.num_steps or config.train.epochs * steps_per_epoch
  if total and steps_per_epoch == 0:
    raise InputError(f"{len(splits['train'])} training rows do not fill one batch of "
                     f"train.batch_size={batch}; lower it")
  tx, schedule = classifier.optimizer_and_schedule(
      config, total, frozen if config.train.freeze_backbone else None)
  replicated, batch_sharding = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  probe = progress.get("linear_probe") if progress is not None else None
  if config.train.linear_probe and progress is None:  # a resumed run has its head in the state
    params["output_transform"], probe = _fit_probe(graphdef, params, splits, config,
                                                   batch_sharding)
  state = jax.device_put({"step": jnp.zeros((), jnp.int32), "params": params,
                          "opt_state": tx.init(params)}, replicated)
  loss_fn = classifier.regression_loss if n_classes == 1 else classifier.classification_loss
  train_step = jax.jit(classifier.make_train_step(
      graphdef, tx, schedule, loss_fn, seed=config.train.seed,
      frozen=frozen if config.train.freeze_backbone else None), donate_argnums=0)
  predict_fn = jax.jit(classifier.make_predict_fn(graphdef))
  run_eval = lambda params, split: classifier.evaluate(  # noqa: E731
      predict_fn, params, splits[split], n_classes, config.eval.batch_size, batch_sharding)

  run_config = ckpt_lib.config_to_json(config)
  run_config["model"] = dataclasses.asdict(model.config)  # the architecture actually trained
  mngr = ckpt_lib.make_manager(workdir, keep_last=1, keep_best=True, async_save=False,
                               best_metric="valid_objective")
  resume_dir = storage.resolve(workdir) / resume.RESUME_SUBDIR
  resume_mngr = ckpt_lib.make_manager(resume_dir, keep_last=1, keep_best=False, async_save=False)
  metric = config.eval.metric
  eval_every = config.train.eval_every_steps or steps_per_epoch
  # Selection ranks (not constant, score): a constant predictor on validation never displaces a
  # checkpoint that separates classes, however its accuracy compares (on an imbalanced valid
  # split the majority class alone scores well).
  best = {"step": 0, "score": -np.inf, "constant": True}
  since_best, stopped_early, step, start = 0, False, 0, time.perf_counter()
  rng_epoch, order = -1, None
  warnings, constant_steps, earlier_seconds, resumed_at = [], [], 0.0, []
  if progress is not None:
    state = resume.restore_finetune_state(resume_mngr, resume_dir, resume_step, progress, state)
    step, since_best = progress["step"], progress["since_best"]
    stopped_early = progress["stopped_early"]
    best = dict(progress["best"])
    best["score"] = -np.inf if best["score"] is None else best["score"]
    warnings, constant_steps = list(progress["warnings"]), list(progress["constant_steps"])
    earlier_seconds, resumed_at = progress["train_seconds"], progress["resumed_at"] + [step]
    # Best checkpoints saved after the resumed state (a kill between the two saves) are
    # recomputed identically by the steps to come; orbax refuses to save a step that exists.
    for later in [s for s in mngr.all_steps() if s > step]:
      mngr.delete(later)
    logging.info("resuming the fine-tuning run in %s at step %d/%d (best so far: step %d)",
                 workdir, step, total, best["step"])
  # Rows of steps after the resumed state were written by the interrupted run: dropped.
  writer = metrics_writer.MetricsWriter(workdir, resume_step=step)
  first_step = step + 1

  def save_resume_state(step, done):
    if step in resume_mngr.all_steps():
      return
    sums = {"params": ckpt_lib.fingerprints(state["params"]),
            "opt_state": ckpt_lib.fingerprints(state["opt_state"])}
    progress = {"step": step, "done": done, "stopped_early": stopped_early,
                "since_best": since_best,
                "best": {**best, "score": None if best["score"] == -np.inf else best["score"]},
                "warnings": warnings, "constant_steps": constant_steps,
                "train_seconds": earlier_seconds + time.perf_counter() - start,
                "resumed_at": resumed_at, "fingerprints": sums, "linear_probe": probe,
                "config": ckpt_lib.config_to_json(config)}
    resume_mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state["params"]),
        opt_state=ocp.args.StandardSave(state["opt_state"]),
        progress=ocp.args.JsonSave(progress)))

  def save(step, params, score, constant=False):
    objective = score - (1e6 if constant else 0.0)
    mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                            config=ocp.args.JsonSave(run_config)),
              metrics={"valid_objective": -objective})

  def evaluate_and_select(step: int) -> bool:
    """Evaluates on validation, saves a new best checkpoint; True when patience has run out."""
    nonlocal best, since_best
    valid, valid_outputs = run_eval(state["params"], "valid")
    summary = prediction_summary(valid_outputs, n_classes)
    spread = summary.get("logit_spread", summary.get("prediction_spread"))
    writer.write(step, {**{f"valid_{k}": v for k, v in valid.items()},
                        "valid_constant": int(summary["constant"]), "valid_spread": spread})
    logging.info("step %d  valid %s  spread %.3g", step,
                 "  ".join(f"{k} {v:.4f}" for k, v in valid.items()), spread)
    if summary["constant"]:
      constant_steps.append(step)
      if len(constant_steps) == 1:  # once in the log; every such step goes to results.json
        warnings.append(collapse_message(summary, "validation", step))
        logging.warning("%s", warnings[-1])
    score = selection_score(valid, metric)
    if (not summary["constant"], score) > (not best["constant"], best["score"]):
      best = {"step": step, "score": score, "constant": summary["constant"]}
      since_best = 0
      save(step, state["params"], score, summary["constant"])
      return False
    since_best += 1
    if config.train.patience and since_best >= config.train.patience:
      logging.info("early stop at step %d: valid %s has not improved for %d evaluations "
                   "(best %.4f at step %d)", step, metric, since_best,
                   abs(best["score"]) if metric == "loss" else best["score"], best["step"])
      return True
    return False

  if probe is not None and total and progress is None:
    evaluate_and_select(0)  # the probe is a candidate: fine-tuning must beat it to replace it
    save_resume_state(0, done=False)

  while step < total and not stopped_early:  # stopped_early: a resumed early stop
    epoch, pos = divmod(step, steps_per_epoch)
    if epoch != rng_epoch:  # a fresh permutation every epoch, from (seed, epoch)
      order = np.random.default_rng([config.train.seed, epoch]).permutation(len(splits["train"]))
      rng_epoch = epoch
    rows = order[pos * batch:(pos + 1) * batch]
    host = {"inputs": splits["train"].inputs[rows], "labels": splits["train"].labels[rows]}
    state, metrics = train_step(state, jax.device_put(host, batch_sharding))
    step += 1
    # Step 1 is logged too, so that progress shows as soon as the step has compiled; the ETA
    # uses the steps after it (compile time excluded).
    if step == first_step or step % config.train.log_every_steps == 0 or step == total:
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if not np.isfinite(metrics["loss"]):
        raise DivergedError(f"non-finite loss at step {step}: lower optim.learning_rate and run "
                            "again in a new --workdir")
      now = time.perf_counter()
      if step == first_step:
        first_step_done = now
        eta = "(the first step includes compiling it)"
      else:
        eta = f"ETA {(now - first_step_done) / (step - first_step) * (total - step):.0f} s"
      if step % config.train.log_every_steps == 0 or step == total:
        writer.write(step, {**metrics, "epoch": step / steps_per_epoch})
      logging.info("step %d/%d (epoch %.2f)  loss %.4f  lr %.2e  %.1f s  %s", step, total,
                   step / steps_per_epoch, metrics["loss"], metrics["learning_rate"],
                   now - start, eta)
    if step % eval_every == 0 or step == total:
      stopped_early = evaluate_and_select(step)
      # After the best checkpoint: a resumed state never names a best step that is not saved.
      save_resume_state(step, done=stopped_early or step == total)
      if stopped_early:
        break
    if step < total and (preemption.agreed() or
                         (stop_after_steps is not None and step >= stop_after_steps)):
      save_resume_state(step, done=False)
      writer.close(plot=False)
      mngr.close()
      resume_mngr.close()
      logging.info("stopped at step %d/%d; the state is saved in %s: run the same command again "
                   "to resume", step, total, resume_dir)
      result = {"status": "interrupted", "step": step}
      if preemption.requested:
        result["signal"] = signal.Signals(preemption.signum).name
      return result
  train_seconds = earlier_seconds + time.perf_counter() - start

  params = state["params"]
  if total:
    mngr.wait_until_finished()
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          params)
    params = mngr.restore(best["step"], args=ocp.args.Composite(
        params=ocp.args.StandardRestore(target)))["params"]
  else:  # evaluation only: keep the initial weights as the run's checkpoint
    if 0 not in mngr.all_steps():
      save(0, params, 0.0)
    mngr.wait_until_finished()
    save_resume_state(0, done=True)
  mngr.close()
  resume_mngr.close()
  valid, valid_outputs = run_eval(params, "valid")
  test, test_outputs = run_eval(params, "test")
  storage.save_npy(storage.resolve(workdir) / "test_outputs.npy", test_outputs)
  writer.close(plot=bool(total), loss_label="mean squared error" if config.head.n_classes == 1
               else "cross-entropy (nats/sequence)")
  predictions = {"valid": prediction_summary(valid_outputs, n_classes),
                 "test": prediction_summary(test_outputs, n_classes)}
  if predictions["valid"]["constant"]:
    if total:
      message = (f"the selected checkpoint (step {best['step']}) is a constant predictor: every "
                 f"validation evaluation ({len(constant_steps)} of them) was constant")
    else:
      message = collapse_message(predictions["valid"], "validation", 0)
    warnings.append(message)
    logging.warning("%s", message)
  results = {
      "status": "finished", "resumed_at": resumed_at,
      "task": config.task, "metric": metric, "init": init,
      "test": test, "valid": valid, "predictions": predictions,
      "collapsed": predictions["valid"]["constant"], "constant_valid_steps": constant_steps,
      "collapsed_on_test": predictions["test"]["constant"],
      "warnings": warnings, "linear_probe": probe, "best_step": best["step"], "steps": step,
      "epochs": step / max(steps_per_epoch, 1), "stopped_early": stopped_early,
      "train_seconds": round(train_seconds, 1),
      "rows": {k: len(v) for k, v in splits.items()},
      "sources": {k: v.source for k, v in splits.items()},
      "devices": f"{n_devices} x {jax.devices()[0].platform}",
      "config": run_config,
  }
  # Written atomically: a rerun takes an existing results.json as the sign of a finished run.
  storage.write_atomically(storage.resolve(workdir) / "results.json",
                           json.dumps(results, indent=1))
  logging.info("test %s (best valid %s %.4f at step %d)",
               "  ".join(f"{k} {v:.4f}" for k, v in test.items()), metric,
               abs(best["score"]) if metric == "loss" else best["score"], best["step"])
  return results


# ------------------------------------------------------------------------------------------------
# Command line
