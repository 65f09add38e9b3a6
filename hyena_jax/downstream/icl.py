r"""In-context learning with a pretrained HyenaDNA language model (SPEC sections 6.2-6.3).

    python -m hyena_jax.icl --config=configs/icl.py:soft_prompt --workdir=DIR \
        --config.pretrained=WORKDIR_OR_RELEASE --config.data.train=train.tsv

Classification becomes next-token prediction. Every context holds, for each class, `shots`
demonstrations drawn (seeded) from the training rows, shuffled, then the query:

    demo  = seq (left-padded to max_length, no [SEP]) + [SEP] + label_token + [SEP]
    query = seq (left-padded) + [SEP]           -> the model predicts the label token next

Label tokens as in the official code: 2 classes A(7)/N(11), 3 classes A(7)/G(9)/N(11). The
prediction is the next-token logit at the [SEP] before each label (argmax over the full
vocabulary); the loss is cross-entropy at those positions only (every demo and the query).

Modes:
  * soft_prompt: `n_soft` learnable embeddings, N(0, 0.02), prepended after the embedding layer
    (the embedding dropout covers them too); logits at the prompt positions are dropped; the
    language model stays frozen (no gradient is even computed for it).
  * instruction: no prompt; every weight of the language model is tuned.

Differences from the official scripts: the learning rate is constant (no ReduceLROnPlateau);
the best validation accuracy (not loss) selects the kept parameters; no reverse-complement
augmentation.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from hyena_jax import storage
from hyena_jax.data import labelled
from hyena_jax.data import tokenizer as tok
from hyena_jax.downstream import finetune_config
from hyena_jax.errors import InputError
from hyena_jax.model import config as config_lib
from hyena_jax.model.hyenadna import HyenaLM, copy_params
from hyena_jax.training import checkpoint as ckpt_lib
from hyena_jax.training import metrics_writer, optim
from hyena_jax.training import run_config as run_config_lib

MODES = ("soft_prompt", "instruction")


# ------------------------------------------------------------------------------------------------
# Contexts


def label_tokens(n_classes: int) -> np.ndarray:
  """Token id that stands for each class: [A, N] (2 classes) or [A, G, N] (3), as upstream."""
  if n_classes == 2:
    return np.array([tok.A, tok.N], np.int32)
  if n_classes == 3:
    return np.array([tok.A, tok.G, tok.N], np.int32)
  raise InputError(f"in-context learning defines label tokens for 2 or 3 classes (official "
                   f"A/N and A/G/N), got head.n_classes={n_classes}")


def context_length(max_length: int, n_classes: int, shots: int) -> int:
  """Tokens of one context: n_classes * shots demos of max_length + 3, and the query + [SEP]."""
  return n_classes * shots * (max_length + 3) + max_length + 1


def build_context(query: np.ndarray, query_label: int, demos: Sequence[tuple[np.ndarray, int]],
                  labels: np.ndarray) -> dict[str, np.ndarray]:
  """One context from left-padded sequences (int [max_length] each).

  Returns {"inputs": int32 [T], "targets": int32 [T] (the label token at prediction positions,
  else 0), "mask": float32 [T] (1 where the next token is a label: each demo's first [SEP] and
  the final [SEP] of the query)}.
  """
  pieces, positions, targets = [], [], []
  offset = 0
  for seq, label in demos:
    pieces += [seq, [tok.SEP, labels[label], tok.SEP]]
    positions.append(offset + len(seq))
    targets.append(labels[label])
    offset += len(seq) + 3
  pieces += [query, [tok.SEP]]
  positions.append(offset + len(query))
  targets.append(labels[query_label])
  inputs = np.concatenate([np.asarray(p, np.int32) for p in pieces])
  target = np.zeros_like(inputs)
  mask = np.zeros(inputs.shape, np.float32)
  target[positions], mask[positions] = targets, 1.0
  return {"inputs": inputs, "targets": target, "mask": mask}


def sample_demos(pool_labels: np.ndarray, n_classes: int, shots: int, rng: np.random.Generator,
                 exclude: int | None = None) -> np.ndarray:
  """`shots` row indices per class from the pool (never `exclude`), in shuffled order."""
  chosen = []
  for c in range(n_classes):
    rows = np.flatnonzero(pool_labels == c)
    rows = rows[rows != exclude] if exclude is not None else rows
    if len(rows) < shots:
      raise InputError(f"class {c} has {len(rows)} training row(s) to draw demonstrations from, "
                       f"fewer than icl.shots={shots}; lower icl.shots")
    chosen.append(rng.choice(rows, size=shots, replace=False))
  chosen = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
  return rng.permutation(chosen)


def make_contexts(queries: labelled.LabelledSplit, pool: labelled.LabelledSplit, *,
                  n_classes: int, shots: int, seed: int, pool_is_queries: bool = False
                  ) -> dict[str, np.ndarray]:
  """A context per query row, demos from `pool` (a query never demonstrates itself when the
  pool is the query set). Arrays [Q, T] as in `build_context`."""
  rng = np.random.default_rng(seed)
  labels = label_tokens(n_classes)
  rows = []
  for i in range(len(queries)):
    demo_rows = sample_demos(pool.labels, n_classes, shots, rng,
                             exclude=i if pool_is_queries else None)
    demos = [(pool.inputs[j], int(pool.labels[j])) for j in demo_rows]
    rows.append(build_context(queries.inputs[i], int(queries.labels[i]), demos, labels))
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


# ------------------------------------------------------------------------------------------------
# Model with a soft prompt


class SoftPrompt(nnx.Module):
  """n_soft learnable input embeddings [n_soft, d_model], initialised N(0, 0.02)."""

  def __init__(self, n_soft: int, d_model: int, *, rngs: nnx.Rngs):
    self.embedding = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (n_soft, d_model)))


def prompted_logits(lm: HyenaLM, prompt: jax.Array | None, inputs: jax.Array,
                    dropout_key: jax.Array | None = None) -> jax.Array:
  """inputs [B, T] -> next-token logits [B, T, V] with prompt [n_soft, d] (or None) prepended
  after the embedding layer; the logits at the prompt positions are dropped."""
  backbone = lm.backbone
  x = backbone.word_embeddings(inputs).astype(jnp.float32)  # [B, T, d]
  if prompt is not None:
    soft = jnp.broadcast_to(prompt.astype(jnp.float32), (x.shape[0], *prompt.shape))
    x = jnp.concatenate([soft, x], axis=1)                  # [B, n_soft + T, d]
  x = backbone.embed_dropout(x, rngs=dropout_key)
  hidden = backbone(None, embeddings=x).hidden
  n_soft = 0 if prompt is None else prompt.shape[0]
  return lm.logits_from_hidden(hidden[:, n_soft:])


def label_terms(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
  """Sums at label positions: cross-entropy over the full vocabulary, correct argmax, count, and
  the query's (last position's) correctness per row [B]."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return {"loss_sum": (nll * mask).sum(), "count": mask.sum(),
          "query_correct": correct[:, -1], "query_nll": nll[:, -1]}


# ------------------------------------------------------------------------------------------------
# Steps. Parameters are {"lm": ..., "prompt": ...}; `trainable` names the part that gets
# gradients (the other is passed as a constant).


def split_params(params: dict, mode: str) -> tuple[dict, dict]:
  """(trainable, fixed) parts of {"lm", "prompt"} for a mode."""
  if mode not in MODES:
    raise InputError(f"icl.mode must be one of {MODES}, got {mode!r}")
  if mode == "soft_prompt":
    return {"prompt": params["prompt"]}, {"lm": params["lm"]}
  return {"lm": params["lm"]}, {k: v for k, v in params.items() if k != "lm"}


def _forward(lm_graphdef, params, inputs, key, train: bool):
  lm = nnx.merge(lm_graphdef, params["lm"])
  if not train:
    lm.eval()
  prompt = params["prompt"]["embedding"] if params.get("prompt") else None
  return prompted_logits(lm, prompt, inputs, key)


def make_train_step(lm_graphdef: nnx.GraphDef, tx: optax.GradientTransformation, *, seed: int
                    ) -> Callable:
  """(state, batch) -> (state, metrics); state {"step", "trainable", "fixed", "opt_state"};
  batch {"inputs", "targets": int32 [B, T], "mask": f32 [B, T]}."""
  def step_fn(state, batch):
    key = jax.random.fold_in(jax.random.key(seed), state["step"])

    def loss(trainable):
      logits = _forward(lm_graphdef, {**state["fixed"], **trainable}, batch["inputs"], key, True)
      terms = label_terms(logits, batch["targets"], batch["mask"])
      return terms["loss_sum"] / jnp.maximum(terms["count"], 1.0)

    value, grads = jax.value_and_grad(loss)(state["trainable"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
    return {**state, "step": state["step"] + 1, "opt_state": opt_state,
            "trainable": optax.apply_updates(state["trainable"], updates)}, {"loss": value}

  return step_fn


def make_eval_fn(lm_graphdef: nnx.GraphDef) -> Callable:
  def eval_fn(params, batch):
    logits = _forward(lm_graphdef, params, batch["inputs"], None, False)
    return label_terms(logits, batch["targets"], batch["mask"])
  return eval_fn


def evaluate(eval_fn: Callable, params: dict, contexts: dict[str, np.ndarray], batch_size: int
             ) -> dict[str, float]:
  """Query accuracy and loss (at the last position), plus the loss over all label positions."""
  n = len(contexts["inputs"])
  correct, nll, loss_sum, count = [], [], 0.0, 0.0
  for start in range(0, n, batch_size):
    batch = {k: v[start:start + batch_size] for k, v in contexts.items()}
    rows = len(batch["inputs"])
    if rows < batch_size:  # pad with all-masked copies: one compiled shape
      batch = {k: np.concatenate([v, np.repeat(v[:1], batch_size - rows, 0)])
               for k, v in batch.items()}
      batch["mask"][rows:] = 0.0
    terms = jax.device_get(eval_fn(params, batch))
    correct.append(terms["query_correct"][:rows])
    nll.append(terms["query_nll"][:rows])
    loss_sum += float(terms["loss_sum"])  # padded rows are fully masked
    count += float(terms["count"])
  return {"accuracy": float(np.concatenate(correct).mean()),
          "query_loss": float(np.concatenate(nll).mean()),
          "label_loss": loss_sum / max(count, 1.0)}


# ------------------------------------------------------------------------------------------------
# Model loading and the loop


def load_lm(config: ml_collections.ConfigDict) -> tuple[HyenaLM, str]:
  """The language model (train mode) from config.pretrained, or random from config.model."""
  fields = finetune_config.pretrained_overrides(config)
  if not config.pretrained:
    logging.warning("no config.pretrained: in-context learning on a randomly initialised model")
    lm = HyenaLM(config_lib.from_dict(config.model.to_dict()),
                 rngs=nnx.Rngs(params=config.train.seed))
    lm.train()
    return lm, "scratch"
  from hyena_jax.interop import loading
  loaded = loading.load(config.pretrained, step=config.pretrained_step,
                        shift=config.pretrained_shift)
  source, cfg = loaded.model, loaded.config
  lm = copy_params(source, HyenaLM(dataclasses.replace(cfg, **fields), rngs=nnx.Rngs(0)),
                   ("backbone",))
  lm.train()
  return lm, f"{config.pretrained}"


def icl_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Tunes (soft prompt or all weights) and reports query accuracy on valid/test before and
  after; writes WORKDIR/{results.json, metrics.jsonl} and the best tuned parameters
  (prompt.npy for soft prompting, an orbax LM checkpoint for instruction tuning)."""
  storage.check_access(workdir, "--workdir")
  icl, n_classes, max_length = config.icl, config.head.n_classes, config.data.max_length
  label_tokens(n_classes)  # validates n_classes early
  if icl.mode not in MODES:
    raise InputError(f"icl.mode must be one of {MODES}, got {icl.mode!r}")
  problems = run_config_lib.training_errors(config)
  if problems:
    raise InputError("invalid ICL config:\n  " + "\n  ".join(problems))
  splits = labelled.load_splits(config)
  lm, init = load_lm(config)
  n_soft = icl.n_soft if icl.mode == "soft_prompt" else 0
  length = n_soft + context_length(max_length, n_classes, icl.shots)
  if length > lm.config.l_max:
    raise InputError(f"a context of {icl.shots} shot(s) per class needs {length} positions "
                     f"(with {n_soft} soft tokens) but the model's l_max is {lm.config.l_max}; "
                     "lower icl.shots, icl.n_soft or data.max_length (with data.truncate)")
  storage.makedirs(workdir)  # only once the config and data have been checked
  lm_graphdef, lm_params = nnx.split(lm, nnx.Param)
  params = {"lm": nnx.to_pure_dict(lm_params), "prompt": {}}
  if n_soft:
    prompt = SoftPrompt(n_soft, lm.config.d_model, rngs=nnx.Rngs(params=config.train.seed))
    params["prompt"] = nnx.to_pure_dict(nnx.state(prompt, nnx.Param))

  rng = np.random.default_rng(config.train.seed)
  train = splits["train"]
  if icl.train_examples:
    rows = np.sort(rng.permutation(len(train))[:icl.train_examples])
    tune_set = train.take(rows, f"{icl.train_examples} rows of {train.source}")
  else:
    tune_set = train

  def limit(split):
    if not icl.eval_examples or len(split) <= icl.eval_examples:
      return split
    return split.take(np.sort(rng.permutation(len(split))[:icl.eval_examples]), split.source)
  eval_sets = {name: make_contexts(limit(splits[name]), train, n_classes=n_classes,
                                   shots=icl.shots, seed=config.train.seed + i + 1)
               for i, name in enumerate(("valid", "test"))}

  trainable, fixed = split_params(params, icl.mode)
  o = config.optim
  tx = optax.MultiSteps(optim.make_optimizer(
      learning_rate=o.learning_rate, weight_decay=o.weight_decay,
      filter_weight_decay=o.filter_weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
      grad_clip=o.grad_clip), every_k_schedule=icl.grad_accum)
  state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "fixed": fixed,
           "opt_state": tx.init(trainable)}
  train_step = jax.jit(make_train_step(lm_graphdef, tx, seed=config.train.seed))
  eval_fn = jax.jit(make_eval_fn(lm_graphdef))
  params_of = lambda s: {**s["fixed"], **s["trainable"]}  # noqa: E731
  writer = metrics_writer.MetricsWriter(workdir)
  batch = icl.batch_size
  before = {k: evaluate(eval_fn, params, v, batch) for k, v in eval_sets.items()}
  logging.info("before tuning: valid acc %.4f, test acc %.4f", before["valid"]["accuracy"],
               before["test"]["accuracy"])
  best = {"epoch": 0, "accuracy": before["valid"]["accuracy"], "trainable": trainable}
  per_epoch = len(tune_set) // batch
  total = per_epoch * config.train.epochs
  logging.info("rows: tuning %d / valid %d / test %d; %d epoch(s) of %d micro-steps (%d per "
               "optimizer step): %d micro-steps", len(tune_set),
               *(len(next(iter(eval_sets[name].values()))) for name in ("valid", "test")),
               config.train.epochs, per_epoch, icl.grad_accum,
               total)
  micro, start, first_done = 0, time.perf_counter(), None
  for epoch in range(1, config.train.epochs + 1):
    contexts = make_contexts(tune_set, tune_set, n_classes=n_classes, shots=icl.shots,
                             seed=config.train.seed + 1000 * epoch, pool_is_queries=True)
    order = np.random.default_rng([config.train.seed, epoch]).permutation(len(tune_set))
    losses = []
    for b in range(0, len(order) - batch + 1, batch):
      rows = order[b:b + batch]
      state, metrics = train_step(state, {k: v[rows] for k, v in contexts.items()})
      micro += 1
      losses.append(metrics["loss"])
      # As finetune: the first micro-step shows once compiled; the ETA leaves the compile out.
      if micro == 1 or micro % config.train.log_every_steps == 0 or micro == total:
        now = time.perf_counter()
        if micro == 1:
          first_done, eta = now, "(the first micro-step includes compiling it)"
        else:
          eta = f"ETA {(now - first_done) / (micro - 1) * (total - micro):.0f} s"
        logging.info("micro-step %d/%d (epoch %d)  loss %.4f  %.1f s  %s", micro, total, epoch,
                     float(np.mean(jax.device_get(losses[-config.train.log_every_steps:]))),
                     now - start, eta)
    if not losses:
      raise InputError(f"{len(tune_set)} tuning rows do not fill one batch of "
                       f"icl.batch_size={batch}")
    train_loss = float(np.mean(jax.device_get(losses)))
    valid = evaluate(eval_fn, params_of(state), eval_sets["valid"], batch)
    writer.write(epoch, {"loss": train_loss, **{f"valid_{k}": v for k, v in valid.items()}})
    logging.info("epoch %d  train label loss %.4f  valid acc %.4f  valid query loss %.4f",
                 epoch, train_loss, valid["accuracy"], valid["query_loss"])
    # Keeps the best tuned epoch (ties: the earlier one), never the untuned weights.
    if valid["accuracy"] > best["accuracy"] or best["epoch"] == 0:
      best = {"epoch": epoch, "accuracy": valid["accuracy"],
              "trainable": jax.tree.map(np.asarray, state["trainable"])}
  tuned = {**fixed, **best["trainable"]}
  after = {k: evaluate(eval_fn, tuned, v, batch) for k, v in eval_sets.items()}
  writer.close(plot=config.train.epochs > 0, loss_label="cross-entropy at label tokens (nats)")
  if n_soft:
    storage.save_npy(storage.resolve(workdir) / "prompt.npy", tuned["prompt"]["embedding"])
  elif config.train.epochs:
    state_ = nnx.state(lm, nnx.Param)
    nnx.replace_by_pure_dict(state_, tuned["lm"])
    nnx.update(lm, state_)
    run_config = ckpt_lib.config_to_json(config)
    run_config["model"] = dataclasses.asdict(lm.config)
    run_config["head"] = {"n_classes": 0, "pooling": ""}  # a language model
    ckpt_lib.save_model(workdir, lm, run_config, step=best["epoch"])
  results = {"mode": icl.mode, "init": init, "n_soft": n_soft, "shots_per_class": icl.shots,
             "context_length": length, "tuning_rows": len(tune_set), "best_epoch": best["epoch"],
             "before": before, "after": after,
             "train_seconds": round(time.perf_counter() - start, 1),
             "rows": {k: len(v) for k, v in splits.items()},
             "config": ckpt_lib.config_to_json(config)}
  storage.write_atomically(storage.resolve(workdir) / "results.json",
                           json.dumps(results, indent=1))
  logging.info("test accuracy %.4f before, %.4f after tuning", before["test"]["accuracy"],
               after["test"]["accuracy"])
  return results
