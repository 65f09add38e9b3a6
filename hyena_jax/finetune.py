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
import sys
import time
import typing
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx, traverse_util

from hyena_jax import checkpoint as ckpt_lib
from hyena_jax import config as config_lib
from hyena_jax import data as data_lib
from hyena_jax import linear_probe, metrics_writer, optim, sharding, storage
from hyena_jax.task_metrics import (collapse_message, prediction_summary, selection_score,
                                    task_metrics)
from hyena_jax import run_config as run_config_lib
from hyena_jax import tokenizer as tok
from hyena_jax import train as train_lib
from hyena_jax.errors import InputError, OutputExistsError
from hyena_jax.finetune_config import METRICS
from hyena_jax.model import Pooling, SequenceClassifier

State = dict[str, Any]  # {"step": int32 [], "params": tree, "opt_state": tree}

# ------------------------------------------------------------------------------------------------
# Labelled data


@dataclasses.dataclass
class LabelledSplit:
  inputs: np.ndarray   # int32 [N, max_length], left-padded with [PAD], no [SEP]
  labels: np.ndarray   # int32 [N] class ids, or float32 [N] regression targets
  source: str          # where the rows came from (file, or file + hold-out description)

  def take(self, index: np.ndarray, source: str) -> "LabelledSplit":
    return LabelledSplit(self.inputs[index], self.labels[index], source)

  def __len__(self) -> int:
    return len(self.labels)


def read_split(path: str, labels_path: str = "", *, max_length: int, n_classes: int,
               truncate: bool = False, tokenizer: tok.CharacterTokenizer | None = None
               ) -> LabelledSplit:
  """Reads and encodes a labelled file: TSV/CSV `seq<TAB>label`, or FASTA + `name<TAB>label`.

  Errors name the file and line: a missing or non-numeric label, a class id outside
  [0, n_classes), a sequence longer than max_length (unless `truncate`), an empty file.
  """
  if not path:
    raise InputError("no data file given: set --config.data.train=PATH (TSV/CSV `seq<TAB>label`"
                     " or FASTA with --config.data.train_labels)")
  from hyena_jax import seqfiles  # pylint: disable=g-import-not-at-top
  regression = n_classes == 1
  suffix = path[:-3] if path.endswith(".gz") else path
  if suffix.endswith((".fa", ".fasta", ".fna")):
    if not labels_path:
      raise InputError(f"{path} is FASTA: give its labels (`name<TAB>label` per record) with the "
                       "matching data.*_labels field")
    seqs, labels, lines = seqfiles.read_labelled_fasta(path, labels_path,
                                                       float_labels=regression, return_lines=True)
  else:
    seqs, labels, lines = seqfiles.read_labelled_sequences(path, float_labels=regression,
                                                           return_lines=True)
  if not regression:
    bad = np.flatnonzero(labels >= n_classes)
    if bad.size:
      raise InputError(f"{path}:{lines[bad[0]]}: label {labels[bad[0]]} is not a class id of this "
                       f"task (head.n_classes={n_classes}: ids 0..{n_classes - 1}); "
                       f"{bad.size} such row(s)")
  if not truncate:
    lengths = np.fromiter((len(s) for s in seqs), np.int64, len(seqs))
    long = np.flatnonzero(lengths > max_length)
    if long.size:
      raise InputError(f"{path}:{lines[long[0]]}: sequence of {lengths[long[0]]} bases exceeds "
                       f"data.max_length={max_length} ({long.size} such row(s)); raise "
                       "data.max_length (at most model.l_max) or set data.truncate=True to keep "
                       "the first max_length bases")
  tokenizer = tokenizer or tok.CharacterTokenizer()
  inputs = tokenizer.encode_batch(seqs, max_length, add_eos=False, truncate=truncate)
  return LabelledSplit(inputs.astype(np.int32),
                       labels.astype(np.float32 if regression else np.int32), path)


def load_splits(config: ml_collections.ConfigDict) -> dict[str, LabelledSplit]:
  """train/valid/test splits from the files and hold-out fields of config.data (module doc of
  hyena_jax.finetune_config)."""
  d = config.data
  kw = dict(max_length=d.max_length, n_classes=config.head.n_classes, truncate=d.truncate)
  train = read_split(d.train, d.train_labels, **kw)
  if d.test:
    test = read_split(d.test, d.test_labels, **kw)
  else:
    tr, te = data_lib.split_train_test(len(train), d.test_fraction, d.split_seed)
    held = f"{d.train} (hold-out {d.test_fraction:g}, split_train_test seed {d.split_seed})"
    train, test = train.take(tr, f"{d.train} (rest after test hold-out)"), train.take(te, held)
  if d.valid:
    valid = read_split(d.valid, d.valid_labels, **kw)
  elif d.valid_fraction > 0:
    tr, va = data_lib.split_train_test(len(train), d.valid_fraction, d.split_seed + 1)
    held = (f"{train.source}: hold-out {d.valid_fraction:g} of the training rows "
            f"(split_train_test seed {d.split_seed + 1})")
    train, valid = train.take(tr, train.source), train.take(va, held)
  else:
    valid = LabelledSplit(test.inputs, test.labels, f"the test split ({test.source})")
  return {"train": train, "valid": valid, "test": test}


def check_trainable(train: LabelledSplit, config: ml_collections.ConfigDict) -> None:
  """Refuses to train a classifier on rows of one class (evaluating one is fine)."""
  present = np.unique(train.labels)
  if config.head.n_classes > 1 and len(present) < 2:
    raise InputError(
        f"the training rows of {config.data.train} hold one class only (label {present[0]}, "
        f"{len(train)} rows): a classifier needs examples of at least two classes; check the "
        "label column (and data.train_labels)")


# ------------------------------------------------------------------------------------------------
# Model


def execution_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Fields of config.model that apply to a pretrained architecture too (how it runs, dropout)."""
  names = ("dtype", "conv_impl", "remat", "scan_layers", "embed_dropout")
  return {k: config.model[k] for k in names if k in config.model}


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
  from hyena_jax import loading  # the loader shared with embed/score/generate
  loaded = loading.load(config.pretrained, step=config.pretrained_step,
                        shift=config.pretrained_shift)
  source, source_cfg = loaded.model, loaded.config
  cfg = dataclasses.replace(source_cfg, **execution_fields(config))
  model = SequenceClassifier(cfg, n_classes, pooling=pooling, rngs=rngs)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  loaded = nnx.to_pure_dict(nnx.state(source, nnx.Param))
  params["backbone"] = loaded["backbone"]
  what = f"backbone of {config.pretrained}"
  if config.keep_pretrained_head:
    if not isinstance(source, SequenceClassifier) or source.n_classes != n_classes:
      have = (f"a {source.n_classes}-class head" if isinstance(source, SequenceClassifier)
              else "no classification head (a language model)")
      raise InputError(f"keep_pretrained_head=True but {config.pretrained} has {have}; "
                       f"head.n_classes is {n_classes}. Set keep_pretrained_head=False for a "
                       "fresh head")
    params["output_transform"] = loaded["output_transform"]
    what += " with its head"
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  model.train()
  return model, what


def frozen_mask(params: Any, freeze_backbone: bool) -> Any:
  """Bool tree over the parameter dict: True for backbone leaves when freezing it."""
  return {k: jax.tree.map(lambda _: freeze_backbone and k == "backbone", v)
          for k, v in params.items()}


# ------------------------------------------------------------------------------------------------
# Linear probe (LP-FT's first stage; the fit itself is hyena_jax.linear_probe)


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


def evaluate(predict_fn: Callable, params: Any, split: LabelledSplit, n_classes: int,
             batch_size: int, batch_sharding=None) -> tuple[dict[str, float], np.ndarray]:
  """(metrics of the task family, outputs [N, n_classes]) of one split."""
  outputs = predict(predict_fn, params, split.inputs, batch_size, batch_sharding)
  return task_metrics(outputs, split.labels, n_classes), outputs


# ------------------------------------------------------------------------------------------------
# The loop


def _fit_probe(graphdef: nnx.GraphDef, params: Any, splits: dict[str, LabelledSplit],
               config: ml_collections.ConfigDict, batch_sharding) -> tuple[dict, dict]:
  """(head params, report) of the linear probe on the starting backbone's pooled features."""
  start = time.perf_counter()
  features_fn = jax.jit(make_features_fn(graphdef))
  features = {name: predict(features_fn, params, splits[name].inputs, config.eval.batch_size,
                            batch_sharding) for name in ("train", "valid", "test")}
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


def validate_config(config: ml_collections.ConfigDict, n_devices: int) -> None:
  errors = run_config_lib.training_errors(config)
  if config.head.n_classes < 1:
    errors.append(f"head.n_classes must be >= 1 (1 = regression), got {config.head.n_classes}")
  regression = config.head.n_classes == 1
  allowed = (METRICS[3:] if regression else METRICS[:3]) + ("loss",)
  if config.eval.metric not in allowed:
    errors.append(f"eval.metric={config.eval.metric!r} does not suit "
                  f"{'regression' if regression else 'classification'}: use one of {allowed}")
  for name in ("train.batch_size", "eval.batch_size"):
    section, key = name.split(".")
    value = config[section][key]
    if value < 1 or value % n_devices:
      errors.append(f"{name}={value} must be positive and divisible by the {n_devices} "
                    "data-parallel device(s) (or set mesh.data)")
  if config.head.pooling not in typing.get_args(Pooling):
    errors.append(f"head.pooling={config.head.pooling!r}: use one of "
                  f"{typing.get_args(Pooling)}")
  if config.train.epochs < 0 or config.train.num_steps < 0 or config.train.patience < 0:
    errors.append("train.epochs, train.num_steps and train.patience must be >= 0")
  if errors:
    raise InputError("invalid fine-tuning config:\n  " + "\n  ".join(errors))


def _restore_state(resume_mngr: ocp.CheckpointManager, resume_dir: str, step: int,
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


def _tx_and_schedule(config: ml_collections.ConfigDict, total_steps: int, frozen: Any):
  o = config.optim
  schedule = optim.learning_rate_schedule(o.learning_rate, max(total_steps, 1),
                                          int(o.warmup_fraction * total_steps),
                                          init_lr=o.init_lr, min_lr_ratio=o.min_lr_ratio)
  tx = optim.make_optimizer(learning_rate=schedule, weight_decay=o.weight_decay,
                            filter_weight_decay=o.filter_weight_decay, b1=o.b1, b2=o.b2,
                            eps=o.eps, grad_clip=o.grad_clip, frozen=frozen)
  return tx, schedule


RESUME_SUBDIR = "resume"  # WORKDIR/resume/checkpoints/<step>/: the latest state (not the best)


def _config_differences(saved: dict, config: ml_collections.ConfigDict,
                        ignore: set[str]) -> list[tuple[str, Any, Any]]:
  """(field, saved value, config value) of every field that differs, outside `ignore`."""
  flat = lambda tree: traverse_util.flatten_dict(tree, sep=".")  # noqa: E731
  old, new = flat(saved), flat(ckpt_lib.config_to_json(config))
  return [(name, old.get(name), new.get(name)) for name in sorted((set(old) | set(new)) - ignore)
          if old.get(name) != new.get(name)]


def _check_same_run(saved: dict, config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses to resume a workdir whose run had a different config; how a step is executed
  (train.EXECUTION_FIELDS) may change, as in pretraining."""
  execution = {f"model.{name}" for name in train_lib.EXECUTION_FIELDS}
  for name, was, now in _config_differences(saved, config, execution)[:1]:
    raise InputError(
        f"{workdir} holds a fine-tuning run with a different config: {name} was {was!r}, the "
        f"config says {now!r}. Use a new --workdir, or pass --config.{name}={was!r} to resume it")


def _resume_state(workdir: str, config: ml_collections.ConfigDict
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
      different = [d for d in _config_differences(saved, config, set())
                   if not (config.pretrained and d[0].startswith("model."))]
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
  _check_same_run(progress["config"], config, workdir)
  return step, progress


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
  resume_step, progress = _resume_state(workdir, config)
  results_path = storage.resolve(workdir) / "results.json"
  if progress is not None and progress["done"] and results_path.exists():
    results = json.loads(results_path.read_text())
    logging.info("%s: the fine-tuning run finished at step %d; nothing to do (test %s)", workdir,
                 progress["step"], results.get("test"))
    return results
  with train_lib.Preemption() as preemption:  # the same signal handling as pretraining
    return _finetune(config, workdir, resume_step, progress, stop_after_steps, preemption)


def _finetune(config: ml_collections.ConfigDict, workdir: str, resume_step: int | None,
              progress: dict | None, stop_after_steps: int | None, preemption) -> dict[str, Any]:
  mesh = sharding.make_mesh(config.mesh.data, 1, 1)
  n_devices = mesh.shape["data"]
  validate_config(config, n_devices)
  splits = load_splits(config)
  if config.train.epochs or config.train.num_steps:
    check_trainable(splits["train"], config)
  n_classes = config.head.n_classes
  model, init = build_classifier(config)
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
  frozen = frozen_mask(params, config.train.freeze_backbone)
  batch = config.train.batch_size
  steps_per_epoch = len(splits["train"]) // batch
  total = config.train.num_steps or config.train.epochs * steps_per_epoch
  if total and steps_per_epoch == 0:
    raise InputError(f"{len(splits['train'])} training rows do not fill one batch of "
                     f"train.batch_size={batch}; lower it")
  tx, schedule = _tx_and_schedule(config, total, frozen if config.train.freeze_backbone else None)
  replicated, batch_sharding = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  probe = progress.get("linear_probe") if progress is not None else None
  if config.train.linear_probe and progress is None:  # a resumed run has its head in the state
    params["output_transform"], probe = _fit_probe(graphdef, params, splits, config,
                                                   batch_sharding)
  state = jax.device_put({"step": jnp.zeros((), jnp.int32), "params": params,
                          "opt_state": tx.init(params)}, replicated)
  loss_fn = regression_loss if n_classes == 1 else classification_loss
  train_step = jax.jit(make_train_step(graphdef, tx, schedule, loss_fn, seed=config.train.seed,
                                       frozen=frozen if config.train.freeze_backbone else None),
                       donate_argnums=0)
  predict_fn = jax.jit(make_predict_fn(graphdef))
  run_eval = lambda params, split: evaluate(  # noqa: E731
      predict_fn, params, splits[split], n_classes, config.eval.batch_size, batch_sharding)

  run_config = ckpt_lib.config_to_json(config)
  run_config["model"] = dataclasses.asdict(model.config)  # the architecture actually trained
  mngr = ckpt_lib.make_manager(workdir, keep_last=1, keep_best=True, async_save=False,
                               best_metric="valid_objective")
  resume_dir = storage.resolve(workdir) / RESUME_SUBDIR
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
    state = _restore_state(resume_mngr, resume_dir, resume_step, progress, state)
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
        raise FloatingPointError(f"non-finite loss at step {step}: lower optim.learning_rate")
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


def main(argv) -> None:
  from absl import app, flags
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  result = finetune_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
  if result.get("status") == "interrupted":  # saved; rerun the same command to resume
    sys.exit(128 + signal.Signals[result.get("signal", "SIGTERM")].value)


if __name__ == "__main__":
  from absl import flags
  from hyena_jax import cli
  cli.define_config_file("config", None, "Fine-tuning config, e.g. "
                         "configs/finetune.py:human_enhancers_cohn[:small_data]")
  flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results.json go.")
  cli.define_config_alias("model", "config", "pretrained", "Starting weights: a released model "
                          "folder or name, an orbax workdir or a weights file")
  cli.mark_required(["config", "workdir"])
  cli.run(main)
