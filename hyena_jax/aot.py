"""Deviceless compilation of a config's train step for TPUs and GPUs you don't have
(`hyena_jax.training.aot`; its docstring lists the targets and examples).

    python -m hyena_jax.aot --config=configs/1m.py --target=v5p-8,h100

Exit status: 0 when every program compiled and fits in its target's memory; 3 when one does not
fit or its compiler refused it (--allow_not_fitting keeps 0, for sweeps that chart limits); 2 for
a usage error (an unknown target, a missing --config, a target whose compiler is not installed).
Each target's row is printed as soon as it is compiled.
"""

import os
import sys


def _deviceless_environment(argv: list[str]) -> None:
  """Flags that must act before jax is imported: fake CPU devices, a forced platform, and for
  --target the CPU as jax's own platform (the accelerator compilers run as libraries)."""
  for arg in argv:
    if arg.startswith("--devices=") and arg != "--devices=0":
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                 f" --xla_force_host_platform_device_count={arg.split('=')[1]}")
    if arg.startswith("--platform=") and arg != "--platform=":
      os.environ["JAX_PLATFORMS"] = arg.split("=")[1]
  if any(a.startswith("--target=") for a in argv):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  # No TPU VM's metadata to read: name this host as the only worker, which keeps libtpu's
  # start-up from printing an INVALID_ARGUMENT error about worker hostnames.
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_WORKER_ID", "0")
  # Compile-only libtpu touches no chip, so several such processes may share the host.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


_deviceless_environment(sys.argv)  # this module is only imported to be run

# pylint: disable=g-import-not-at-top,wrong-import-position
import json

import jax
from absl import app, flags

from hyena_jax import cli
from hyena_jax.training import aot

_CONFIG = cli.define_config_file("config", None, "Training config file, e.g. configs/1m.py")
_TARGET = flags.DEFINE_list("target", [], "Comma-separated compile targets (see "
                            "hyena_jax.training.aot).")
_DEVICES = flags.DEFINE_integer("devices", 0, "Fake CPU devices to create (no --target); 0 = real.")
_PLATFORM = flags.DEFINE_string("platform", "", "Force a JAX platform for --devices (cpu, ...).")
_STAGE = flags.DEFINE_integer("stage", -1, "Which train.stages entry to compile.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 0, "Override the stage's sequence length (0 = keep).")
_KERNEL_ONLY = flags.DEFINE_bool("kernel_only", False, "Compile one long convolution only.")
_JSON = flags.DEFINE_bool("json", False, "Print the reports as JSON instead of a table.")
_LOWER_ONLY = flags.DEFINE_bool("lower_only", False, "Stop after lowering (no --target).")
_ALLOW_NOT_FITTING = flags.DEFINE_bool(
    "allow_not_fitting", False, "Exit 0 even when a program does not fit or is refused.")

EXIT_NOT_FITTING = 3
flags.adopt_module_key_flags(cli)
cli.mark_required(["config"])


def main(argv: list[str]) -> None:
  """Compiles the config's train step (or one long convolution) and prints the reports."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if _SEQ_LEN.value:
    with config.unlocked():
      stages = list(config.train.stages)
      steps, _, accum = stages[_STAGE.value]
      stages[_STAGE.value] = (steps, _SEQ_LEN.value, accum)
      config.train.stages = tuple(stages)
      config.model.l_max = max(config.model.l_max, _SEQ_LEN.value + 2)
  if not _TARGET.value:
    report = aot.compile_train_step(config, stage=_STAGE.value, lower_only=_LOWER_ONLY.value)
    print(json.dumps(report) if _JSON.value else
          "\n".join(f"{k:>32}: {v}" for k, v in report.items()))
    return
  # Every name and every target's compiler checked before the first (minutes-long) compile.
  targets = [aot.get_target(name) for name in _TARGET.value]
  for target in targets:
    aot.check_compiler(target)
  # Deviceless executables cannot be loaded back from the persistent cache (no client).
  jax.config.update("jax_enable_compilation_cache", False)
  failed = []
  if not _JSON.value:
    print(aot.TABLE_HEADER, flush=True)
  for target in targets:
    report = aot.compile_for_target(config, target, stage=_STAGE.value,
                                    kernel_only=_KERNEL_ONLY.value)
    print(json.dumps(report) if _JSON.value else aot.format_row(report), flush=True)
    if not (report.get("ok") and report.get("fits", True)):
      failed.append(target.name)
  if failed and not _ALLOW_NOT_FITTING.value:
    print(f"error: {', '.join(failed)}: the program does not fit or was refused (see above); "
          "--allow_not_fitting exits 0", file=sys.stderr)
    sys.exit(EXIT_NOT_FITTING)


if __name__ == "__main__":
  cli.run(main)
