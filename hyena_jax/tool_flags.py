"""The flags several command-line tools share, each with one meaning in every tool.

--model is any model source (`hyena_jax.load`), --step the checkpoint of an orbax run to read,
--output what the tool writes, --workdir the run folder a training tool writes, --config an
ml_collections file. Each tool's module defines its flags at import (it is only imported to be
run), calls these for the shared ones, and ends with `flags.adopt_module_key_flags` of this
module and of `cli` so that its --help lists them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from absl import flags

from hyena_jax import cli


class ModelFlags(NamedTuple):
  model: Any
  step: Any
  revision: Any
  shift: Any


def define_model_flags(model_help: str = "orbax run, official weights file or folder, or Hub "
                       "repo id ORG/NAME (see hyena_jax.load)") -> ModelFlags:
  """--model, --step, --revision, --shift: the arguments of `hyena_jax.load`."""
  return ModelFlags(
      flags.DEFINE_string("model", None, model_help),
      flags.DEFINE_integer("step", None, "orbax run: checkpoint step to read (default: latest)"),
      flags.DEFINE_string("revision", None, "Hub repo id: branch, tag or commit (default: main)"),
      flags.DEFINE_float("shift", None, "official weights: modulation shift (default 0.05)"))


def load_model(model_flags: ModelFlags) -> Any:
  """`hyena_jax.load` of the --model/--step/--revision/--shift flags (a `Loaded`)."""
  from hyena_jax.interop import loading  # pylint: disable=g-import-not-at-top
  return loading.load(model_flags.model.value, step=model_flags.step.value,
                      revision=model_flags.revision.value, shift=model_flags.shift.value)


def define_tuning_flags(config_help: str, workdir_help: str) -> tuple[Any, Any]:
  """--config, --workdir and --model (short for --config.pretrained) of the tools that tune a
  pretrained model (finetune, icl); returns the holders of --config and --workdir."""
  config = cli.define_config_file("config", None, config_help)
  workdir = flags.DEFINE_string("workdir", None, workdir_help)
  cli.define_config_alias("model", "config", "pretrained", "Starting weights: any source "
                      "hyena_jax.load reads (a released model folder or Hub id, an orbax run, a "
                      "weights file)")
  cli.mark_required(["config", "workdir"])
  return config, workdir


def define_max_memory_flag() -> Any:
  """--max_memory_gb of the tools that run long sequences (inference/long_forward.py)."""
  return flags.DEFINE_float(
      "max_memory_gb", None, "memory the forward may use (default: what the host has "
      "available); sequences too long for one jitted forward within it run in bounded memory "
      "(long contexts), and a request that cannot fit is refused, naming the length that would")


class SequenceInputFlags(NamedTuple):
  format: Any
  column: Any
  name_column: Any


def define_sequence_input_flags() -> SequenceInputFlags:
  """--format, --column, --name_column: how to read --input (FASTA or a table)."""
  return SequenceInputFlags(
      flags.DEFINE_enum("format", "auto", ["auto", "fasta", "table"],
                        "--input's format; auto = by its suffix (FASTA: .fa/.fasta/.fna, tables: "
                        ".tsv/.csv/.txt, each optionally .gz)"),
      flags.DEFINE_string("column", "0", "table: sequence column (index or header name)"),
      flags.DEFINE_string("name_column", None, "table: name column (index or header name)"))


def sequence_input(input_flags: SequenceInputFlags) -> dict[str, Any]:
  """The reader arguments (fmt, column, name_column) of `define_sequence_input_flags`' flags."""
  return {"fmt": input_flags.format.value, "column": _column(input_flags.column.value),
          "name_column": _column(input_flags.name_column.value)}


def _column(value: str | None) -> int | str | None:
  """A table column flag: an integer index or a header name."""
  return None if value is None else int(value) if value.lstrip("-").isdigit() else value
