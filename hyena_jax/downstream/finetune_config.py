"""Fine-tuning and in-context-learning run configs (SPEC section 6): the recipe every task of
configs/finetune.py (and configs/icl.py) starts from.

configs/finetune.py is a table of tasks whose `get_config("TASK[:RECIPE]")` returns
`task_config(...)` (configs/icl.py returns `icl_config()`) with the task fields set;
`--config=configs/finetune.py:TASK:small_data` picks the CPU /
small-data recipe (small_data()). Data are files the user provides:

  * TSV/CSV: one row per sequence, `seq<TAB>label` (`.csv`: comma), optional header naming the
    columns `seq`/`sequence` and `label`; `.gz` allowed. Labels are class ids 0..n_classes-1
    (or real numbers for regression, head.n_classes = 1).
  * FASTA: `data.train = "x.fa"` with `data.train_labels = "x.labels.tsv"` holding
    `name<TAB>label` per record (the first word of the header line is the name).

Without `data.test` the test split is a seeded hold-out of `data.train` (`data.test_fraction`,
`data.split_seed`); without `data.valid`, validation (early stopping, best checkpoint) is a
seeded hold-out of the remaining training rows (`data.valid_fraction`), or with
`valid_fraction = 0` the test split itself, as the official code does ("val" = test split).
"""

from __future__ import annotations

import dataclasses
import typing

import ml_collections
from ml_collections import config_dict

from hyena_jax.errors import InputError
from hyena_jax.model.config import STARTING_POINT_OVERRIDES, HyenaConfig
from hyena_jax.model.hyenadna import Pooling
from hyena_jax.training import run_config

METRICS = ("accuracy", "mcc", "macro_f1", "pearson", "spearman", "r2")


def base_config() -> ml_collections.ConfigDict:
  """Classification fine-tuning with the official recipe (AdamW 6e-4, wd 0.1, batch 128, cosine
  with 1% warm-up from 1e-6 to 0.1x, clip 1.0, embed dropout 0.1, mean pooling, seed 2222): a
  GPU recipe for full data sets. On a CPU or with a few thousand rows or fewer use
  small_data(config) (task table: `--config=configs/finetune.py:TASK:small_data`)."""
  config = ml_collections.ConfigDict()
  # Task name (goes into results.json).
  config.task = ""
  # Model hyperparameters for training from scratch (every HyenaConfig field, tiny-1k defaults).
  # With `pretrained` the architecture comes from the checkpoint instead; only the execution
  # fields (dtype, conv_impl, remat, scan_layers) and embed_dropout are taken from here.
  config.model = ml_collections.ConfigDict(dataclasses.asdict(HyenaConfig()))
  # Starting weights: "" = from scratch; an orbax workdir (ours, or one written by
  # `python -m hyena_jax.convert`); or an official PyTorch release file/folder
  # (.safetensors / weights.ckpt / weights.pt with its config.json).
  config.pretrained = ""
  # Step of an orbax workdir to start from (None = latest).
  config.pretrained_step = config_dict.placeholder(int)
  # Modulation shift of official PyTorch files (None = the loader's default, 0.05; SPEC 1.5).
  config.pretrained_shift = config_dict.placeholder(float)
  # Keep the pretrained checkpoint's classification head (to evaluate or continue a fine-tuned
  # model) instead of a fresh one (the official `load_backbone` re-initialises the head).
  config.keep_pretrained_head = False

  config.head = ml_collections.ConfigDict()
  # Number of classes; 1 = regression (MSE loss).
  config.head.n_classes = 2
  # mean (over all positions, left [PAD] included: official) | mean_nonpad (over the sequence's
  # own positions only; the same as mean when every sequence fills data.max_length) | last |
  # first | sum. Only mean exports to the official PyTorch layouts.
  config.head.pooling = "mean"

  config.data = ml_collections.ConfigDict()
  # Labelled training file (TSV/CSV, or FASTA with train_labels). Required.
  config.data.train = ""
  config.data.train_labels = ""
  # Validation file ("" = hold out data.valid_fraction of the training rows; see module doc).
  config.data.valid = ""
  config.data.valid_labels = ""
  # Test file ("" = hold out data.test_fraction of the training file).
  config.data.test = ""
  config.data.test_labels = ""
  config.data.test_fraction = 0.2
  config.data.valid_fraction = 0.1
  # Seed of the hold-out permutations (hyena_jax.data.split_train_test).
  config.data.split_seed = 0
  # Every sequence is left-padded with [PAD] to max_length (no [SEP]: official encoding).
  config.data.max_length = 1024
  # Longer sequences are an error naming file and line, unless truncate (keep the first bases).
  config.data.truncate = False

  config.train = ml_collections.ConfigDict()
  config.train.seed = 2222
  config.train.batch_size = 128
  # Passes over the training rows (last incomplete batch dropped; reshuffled every epoch).
  config.train.epochs = 100
  # If > 0, overrides epochs with an exact number of optimizer steps. epochs = 0 and
  # num_steps = 0: evaluate the starting weights only.
  config.train.num_steps = 0
  # Freeze the backbone (train only the head); the official recipe fine-tunes everything.
  config.train.freeze_backbone = False
  # Linear probe first (LP-FT): before any step, fit the fresh head to the frozen backbone's pooled
  # training features (L2-regularised logistic regression, or ridge for regression, its strength
  # picked on validation), evaluate it as step 0 (a candidate for the best checkpoint), then
  # fine-tune from there. With epochs = num_steps = 0 the run is a linear probe alone. Not in the
  # official recipe; small_data turns it on.
  config.train.linear_probe = False
  config.train.log_every_steps = 50
  # Evaluate on validation every N steps (0 = once per epoch) and at the end.
  config.train.eval_every_steps = 0
  # Early stopping: stop after this many evaluations without improving the validation metric
  # (0 = never stop early).
  config.train.patience = 0

  config.optim = run_config.optim_config()

  config.eval = ml_collections.ConfigDict()
  # Metric for early stopping and the best checkpoint; the results report all that apply.
  # accuracy | mcc | macro_f1 (classification); pearson | spearman | r2 (regression); or loss
  # (the validation cross-entropy / MSE, lowest best: steadier than accuracy on a few hundred
  # validation rows).
  config.eval.metric = "accuracy"
  config.eval.batch_size = 128

  config.mesh = ml_collections.ConfigDict()
  # Data-parallel devices (-1 = all); the batch sizes must divide by it.
  config.mesh.data = -1
  return config


RECIPES = ("official", "small_data")


def small_data(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The CPU / small-data recipe, for a few hundred to a few thousand rows and minutes of CPU:
  LP-FT (train.linear_probe: the fresh head fitted to the frozen backbone's features first and
  evaluated as step 0), then full fine-tuning at batch 32, AdamW peak 5e-4, 3 epochs, keeping
  the checkpoint with the lowest validation loss (eval.metric = "loss"; the probe's L2 is picked
  the same way), so that fine-tuning replaces the probe only when it improves on it. Everything
  else as the official recipe. Start from a pretrained backbone.

  Why (benchmarks/bench_finetune.py --full, all rows of the two shared GenomicBenchmarks sets,
  100 steps, 3 seeds; README "Fine-tuning"): plain fine-tuning from a random head scored below
  the probe of the same backbone on promoters (80.2 +- 1.2 vs 80.7) and an earlier recipe
  (2e-3) 7-9 points below it on two small sets; LP-FT selected by validation accuracy kept a
  worse probe on cohn (69.1) because accuracy on 556 validation rows moves by 2-3 rows between
  checkpoints; selected by validation loss it scored 71.7 (cohn) and 82.2 +- 0.3 (promoters),
  the best neural arm on both. k-mer logistic regression still scores higher at this training
  budget (72.2 and 86.3).

  From scratch the mean-pooled features of an untrained backbone are nearly the same for every
  sequence (common component ~13x the between-sequence variation), so small runs pass through a
  constant predictor first; with batch 128 on 432 rows (9 steps) 3 of 6 scratch runs ended
  there (finetune_small_data_official_recipe.json). Selection ranks constant predictors last and
  warns (hyena_jax.task_metrics.prediction_summary).
  """
  config.train.batch_size = 32
  config.train.epochs = 3
  config.train.linear_probe = True
  config.optim.learning_rate = 5e-4
  config.eval.metric = "loss"
  return config


def task_config(task: str, *, max_length: int, n_classes: int, metric: str,
                model: str = "tiny-1k", recipe: str = "official") -> ml_collections.ConfigDict:
  """base_config() for one benchmark task, with the released architecture the paper used.

  recipe: "official" (the paper's: batch 128, 100 epochs, lr 6e-4, 1% warm-up; a GPU recipe) or
  "small_data" (small_data(): for CPUs and a few hundred to a few thousand rows). From the command
  line: --config=configs/finetune.py:TASK:small_data.
  """
  from hyena_jax.model import config as config_lib
  if recipe not in RECIPES:
    raise InputError(f"unknown fine-tuning recipe {recipe!r}: use one of {RECIPES} "
                     "(--config=configs/finetune.py:TASK:small_data)")
  config = base_config()
  config.task = task
  config.model.update(dataclasses.asdict(config_lib.released(model)))
  config.data.max_length = max_length
  config.head.n_classes = n_classes
  config.eval.metric = metric
  return small_data(config) if recipe == "small_data" else config


def icl_config() -> ml_collections.ConfigDict:
  """In-context learning (SPEC 6.2-6.3) on top of a pretrained language model.

  mode "soft_prompt": n_soft learnable embeddings (N(0, 0.02)) prepended after the embedding
  layer, LM frozen, AdamW lr 1e-3 wd 0. mode "instruction": every weight tuned (lr 1e-4, wd 0,
  one epoch) on `train_examples` examples. Both show `shots` demonstrations PER CLASS (drawn from
  the training rows with the seed) before each query; the loss is taken at label positions only.
  """
  config = base_config()
  # Only what ICL reads: no classification head (labels are tokens), no batch/eval/mesh fields of
  # fine-tuning (ICL has its own in config.icl), no early stopping.
  del config["keep_pretrained_head"], config["eval"], config["mesh"], config.head["pooling"]
  for name in ("batch_size", "num_steps", "freeze_backbone", "linear_probe", "eval_every_steps",
               "patience"):
    del config.train[name]
  config.icl = ml_collections.ConfigDict()
  # soft_prompt | instruction
  config.icl.mode = "soft_prompt"
  # Learnable prompt embeddings (soft_prompt mode).
  config.icl.n_soft = 32
  # Demonstrations per class in each context (0 = the query alone).
  config.icl.shots = 2
  # Training rows used for tuning (instruction mode: {2, 16, 64, 256} in the paper; 0 = all).
  config.icl.train_examples = 0
  # Contexts per optimizer step (official: batch 2 x grad-accum 8 for soft prompting).
  config.icl.batch_size = 2
  config.icl.grad_accum = 8
  # Test queries evaluated (0 = all); each is shown with its own seeded demonstrations.
  config.icl.eval_examples = 0
  config.train.epochs = 20
  config.train.seed = 12345
  config.optim.learning_rate = 1e-3
  config.optim.weight_decay = 0.0
  config.head.n_classes = 2
  return config


def pretrained_overrides(config: ml_collections.ConfigDict) -> dict:
  """Fields of config.model that a fine-tune (or ICL) sets on a pretrained architecture: how it
  computes and the recipe's embedding dropout (`STARTING_POINT_OVERRIDES`); the rest comes
  with the weights."""
  return {k: config.model[k] for k in STARTING_POINT_OVERRIDES if k in config.model}


def validate_config(config: ml_collections.ConfigDict, n_devices: int) -> None:
  problems = run_config.training_errors(config)
  if config.head.n_classes < 1:
    problems.append(f"head.n_classes must be >= 1 (1 = regression), got {config.head.n_classes}")
  regression = config.head.n_classes == 1
  allowed = (METRICS[3:] if regression else METRICS[:3]) + ("loss",)
  if config.eval.metric not in allowed:
    problems.append(f"eval.metric={config.eval.metric!r} does not suit "
                  f"{'regression' if regression else 'classification'}: use one of {allowed}")
  for name in ("train.batch_size", "eval.batch_size"):
    section, key = name.split(".")
    value = config[section][key]
    if value < 1 or value % n_devices:
      problems.append(f"{name}={value} must be positive and divisible by the {n_devices} "
                    "data-parallel device(s) (or set mesh.data)")
  if config.head.pooling not in typing.get_args(Pooling):
    problems.append(f"head.pooling={config.head.pooling!r}: use one of "
                  f"{typing.get_args(Pooling)}")
  if config.train.epochs < 0 or config.train.num_steps < 0 or config.train.patience < 0:
    problems.append("train.epochs, train.num_steps and train.patience must be >= 0")
  if problems:
    raise InputError("invalid fine-tuning config:\n  " + "\n  ".join(problems))
