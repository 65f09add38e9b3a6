"""The pretraining run config: the recipe every file in configs/ starts from.

A config file is `get_config()` returning `base_config()` with fields changed, read top to
bottom. `validate(config)` runs before anything is built and says what to fix.
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections

from hyena_jax.errors import InputError
from hyena_jax.model import mesh_axes
from hyena_jax.model.config import HyenaConfig


def base_config() -> ml_collections.ConfigDict:
  from hyena_jax.data import \
      pretraining as data  # the data fields are declared beside the pipeline that reads them

  config = ml_collections.ConfigDict()
  # Model hyperparameters: every HyenaConfig field, with its defaults (tiny-1k).
  config.model = ml_collections.ConfigDict(dataclasses.asdict(HyenaConfig()))
  # Input pipeline (FASTA/BED, workers, augmentation); see hyena_jax/data/pretraining.py.
  config.data = data.default_config()

  config.train = ml_collections.ConfigDict()
  # Seed of parameter init, data order and dropout.
  config.train.seed = 2222
  # Sequences per optimizer step, constant across stages (the official recipe keeps it fixed).
  config.train.global_batch_size = 256
  # Sequence-length warm-up: (steps, seq_len, grad_accum) per stage. Each stage compiles one
  # step; grad_accum splits the global batch into that many micro-batches (memory), the
  # learning-rate schedule runs over the sum of steps without restarting.
  config.train.stages = ((10_000, 1024, 1),)
  # Log a line (and JSONL/TensorBoard metrics) every N steps.
  config.train.log_every_steps = 50

  config.optim = optim_config()

  config.mesh = ml_collections.ConfigDict()
  # Device mesh; -1 takes the remaining devices. fsdp shards parameters and optimizer state.
  config.mesh.data = -1
  config.mesh.fsdp = 1
  # Context parallelism (split each sequence over devices); 1 = off.
  config.mesh.sequence = 1

  config.eval = ml_collections.ConfigDict()
  # Evaluate on the valid split every N steps (and at the end); 0 = only at the end.
  config.eval.every_steps = 1000
  # Batches per evaluation (at the last stage's seq_len); each holds eval.batch_size sequences.
  config.eval.num_batches = 16
  config.eval.batch_size = 32

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 1000
  # Keep the last N checkpoints plus the best by validation loss.
  config.checkpoint.keep_last = 3
  config.checkpoint.keep_best = True
  config.checkpoint.async_save = True
  # Start from the parameters of another run's (or a converted release's) checkpoint when the
  # workdir has none of its own: "" or a workdir path.
  config.checkpoint.init_from = ""
  return config


def optim_config() -> ml_collections.ConfigDict:
  """AdamW recipe fields (SPEC 5), shared by pretraining and fine-tuning configs."""
  optim = ml_collections.ConfigDict()
  optim.learning_rate = 6e-4
  # Linear warm-up length as a fraction of all steps (timm warmup_t = 0.01 t_initial upstream).
  optim.warmup_fraction = 0.01
  optim.init_lr = 1e-6
  optim.min_lr_ratio = 0.1
  optim.weight_decay = 0.1
  # The implicit-filter MLP is trained without weight decay (upstream `_optim` group).
  optim.filter_weight_decay = 0.0
  optim.b1 = 0.9
  optim.b2 = 0.999
  optim.eps = 1e-8
  optim.grad_clip = 1.0
  return optim


def total_steps(config: ml_collections.ConfigDict) -> int:
  return sum(int(stage[0]) for stage in config.train.stages)


def stage_boundaries(config: ml_collections.ConfigDict) -> list[int]:
  """First step of each stage, plus the total at the end."""
  bounds = [0]
  for stage in config.train.stages:
    bounds.append(bounds[-1] + int(stage[0]))
  return bounds


def validate(config: ml_collections.ConfigDict, data_parallel: int | None = None) -> HyenaConfig:
  """Checks the run config before anything is built; returns the model config.

  `data_parallel` is the number of devices the batch is split over (mesh data x fsdp).
  """
  from hyena_jax.model import config as config_lib
  model = config_lib.from_dict(config.model.to_dict())
  errors = training_errors(config)
  stages = config.train.stages
  if not stages:
    errors.append("train.stages is empty; give at least one (steps, seq_len, grad_accum)")
  batch = config.train.global_batch_size
  if not _is_int(batch) or batch < 1:
    errors.append(f"train.global_batch_size must be a positive int, got {batch!r}")
    batch = None  # the per-stage batch checks below would only repeat this
  for name in ("checkpoint.every_steps", "checkpoint.keep_last"):
    errors += _int_at_least(config, name, 1)
  errors += _int_at_least(config, "eval.every_steps", 0, "(0 = evaluate only at the end)")
  for axis in mesh_axes.AXES:  # config.mesh has one field per mesh axis
    size = config.mesh[axis]
    if not _is_int(size) or not (size == -1 or size >= 1):
      errors.append(f"mesh.{axis} must be >= 1, or -1 for the remaining devices; got {size!r}")
  sequence = config.mesh.sequence
  if _is_int(sequence) and sequence > 1 and model.d_model % sequence:
    errors.append(f"mesh.sequence={sequence} does not divide model.d_model={model.d_model}: "
                  "context parallelism splits the channels of the long convolution over the "
                  "sequence axis; choose a sequence axis size that divides d_model")
  for i, stage in enumerate(stages):
    if len(stage) != 3 or not all(isinstance(v, int) and v > 0 for v in stage):
      errors.append(f"train.stages[{i}]={stage!r}: expected (steps, seq_len, grad_accum) of "
                    "positive ints")
      continue
    steps, seq_len, accum = stage
    if seq_len > model.l_max:
      errors.append(f"train.stages[{i}] seq_len={seq_len} exceeds model.l_max={model.l_max}; "
                    "raise model.l_max or shorten the stage")
    if batch is None:
      continue
    if batch % accum:
      errors.append(f"train.stages[{i}] grad_accum={accum} does not divide "
                    f"train.global_batch_size={batch}")
    elif data_parallel and (batch // accum) % data_parallel:
      errors.append(f"train.stages[{i}]: micro-batch {batch // accum} (global_batch_size/"
                    f"grad_accum) is not divisible by the {data_parallel} data-parallel devices")
  if config.eval.batch_size < 1 or config.eval.num_batches < 0:
    errors.append("eval.batch_size must be >= 1 and eval.num_batches >= 0")
  elif data_parallel and config.eval.batch_size % data_parallel:
    errors.append(f"eval.batch_size={config.eval.batch_size} is not divisible by the "
                  f"{data_parallel} data-parallel devices")
  if errors:
    raise InputError("invalid run config:\n  " + "\n  ".join(errors))
  return model


def training_errors(config: ml_collections.ConfigDict) -> list[str]:
  """What pretraining, fine-tuning and ICL configs share: optimizer fields, the logging interval
  and a trainable compute dtype. Returns one message per problem (empty when all is well)."""
  errors = _int_at_least(config, "train.log_every_steps", 1)
  optim = config.optim
  if not _is_real(optim.learning_rate) or optim.learning_rate <= 0:
    errors.append(f"optim.learning_rate must be > 0, got {optim.learning_rate!r}")
  for name in ("init_lr", "weight_decay", "filter_weight_decay", "grad_clip"):
    if not _is_real(optim[name]) or optim[name] < 0:
      errors.append(f"optim.{name} must be >= 0, got {optim[name]!r}"
                    + (" (0 = no clipping)" if name == "grad_clip" else ""))
  if not _is_real(optim.eps) or optim.eps <= 0:
    errors.append(f"optim.eps must be > 0, got {optim.eps!r}")
  for name in ("b1", "b2", "warmup_fraction"):
    if not _is_real(optim[name]) or not 0 <= optim[name] < 1:
      errors.append(f"optim.{name} must be in [0, 1), got {optim[name]!r}")
  if not _is_real(optim.min_lr_ratio) or not 0 <= optim.min_lr_ratio <= 1:
    errors.append(f"optim.min_lr_ratio must be in [0, 1], got {optim.min_lr_ratio!r}")
  if "model" in config and config.model.get("dtype") == "float16":
    errors.append("model.dtype='float16' cannot train: there is no loss scaling, so small "
                  "gradients underflow to 0; use 'bfloat16' (same memory, float32's range)")
  return errors


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int_at_least(config: ml_collections.ConfigDict, name: str, low: int, note: str = ""
                  ) -> list[str]:
  section, key = name.split(".")
  value = config[section][key]
  if _is_int(value) and value >= low:
    return []
  return [f"{name} must be an int >= {low}{' ' + note if note else ''}, got {value!r}"]


def warmup_stages(final_seq_len: int, *, final_steps: int, warmup_steps_per_stage: int,
                  global_batch_size: int, max_tokens_per_micro_batch: int,
                  start_seq_len: int = 64) -> tuple[tuple[int, int, int], ...]:
  """Sequence-length warm-up as in the paper: start at 64 and double up to the final length.

  Each stage gets the gradient accumulation that keeps one micro-batch under
  `max_tokens_per_micro_batch` tokens (a power of two dividing the global batch).
  """
  lengths = []
  seq_len = min(start_seq_len, final_seq_len)
  while seq_len < final_seq_len:
    lengths.append(seq_len)
    seq_len *= 2
  lengths.append(final_seq_len)
  stages = []
  for i, length in enumerate(lengths):
    accum = 1
    while (global_batch_size // accum) * length > max_tokens_per_micro_batch and \
        accum < global_batch_size and global_batch_size % (accum * 2) == 0:
      accum *= 2
    steps = final_steps if i == len(lengths) - 1 else warmup_steps_per_stage
    stages.append((steps, length, accum))
  return tuple(stages)


def release_config(name: str) -> ml_collections.ConfigDict:
  """base_config() with the model of a released size; l_max = seq_len + 2 as upstream."""
  from hyena_jax.model import config as config_lib
  config = base_config()
  config.model.update(dataclasses.asdict(config_lib.released(name)))
  return config
