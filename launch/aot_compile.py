r"""Compile a config's train step for TPUs or GPUs you don't have, and print what it needs.

The real compilers run deviceless on any CPU host (install `pip install -e .[tpu]` for TPU
targets, `.[cuda12]` for GPU targets). Examples:
  # large-1m's last stage on a v5p-8 slice and on one H100:
  python launch/aot_compile.py --config=configs/1m.py --target=v5p-8,h100
  # the long convolution alone (forward + backward), pallas, 131k tokens, as JSON:
  python launch/aot_compile.py --config=configs/1m.py --target=v5e-1 --kernel_only --json \
      --config.model.conv_impl=pallas --seq_len=131072
  # on this host's own devices (CPU: fake devices, CPU-planned memory):
  python launch/aot_compile.py --config=configs/1m.py --devices=8 --platform=cpu
Targets: TPU slices (v4-8, v5e-4, v5p-8, v6e-8, ... or a topology such as v5p:2x2x2) and GPUs
(h100, h200, h100x8, h200x8); an unknown name lists the known ones. By default the last
(longest) stage is compiled; --stage picks another, --seq_len overrides its length (l_max is
raised to match). GPU compiles run ptxas on every kernel: minutes per kernel at long lengths.
"""

import json
import os
import sys

# Deviceless (--target): the accelerator compilers are used as libraries and jax itself runs on
# the CPU. Set before anything imports jax (config files import hyena_jax while flags are parsed).
for _arg in sys.argv:  # flags that must act before jax starts
  if _arg.startswith("--devices=") and _arg != "--devices=0":  # fake CPU devices
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_arg.split('=')[1]}")
  if _arg.startswith("--platform=") and _arg != "--platform=":
    os.environ["JAX_PLATFORMS"] = _arg.split("=")[1]
if any(a.startswith("--target=") for a in sys.argv):
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
# Compile-only libtpu touches no chip, so several such processes may share the host.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_TARGET = flags.DEFINE_list("target", [], "Comma-separated compile targets (see docstring).")
_DEVICES = flags.DEFINE_integer("devices", 0, "Fake CPU devices to create (no --target); 0 = real.")
_PLATFORM = flags.DEFINE_string("platform", "", "Force a JAX platform for --devices (cpu, ...).")
_STAGE = flags.DEFINE_integer("stage", -1, "Which train.stages entry to compile.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 0, "Override the stage's sequence length (0 = keep).")
_KERNEL_ONLY = flags.DEFINE_bool("kernel_only", False, "Compile one long convolution only.")
_JSON = flags.DEFINE_bool("json", False, "Print the reports as JSON instead of a table.")
_LOWER_ONLY = flags.DEFINE_bool("lower_only", False, "Stop after lowering (no --target).")


def main(argv):
  del argv
  from hyena_jax import aot, errors

  config = flags.FLAGS.config
  if _SEQ_LEN.value:
    with config.unlocked():
      steps, _, accum = config.train.stages[_STAGE.value]
      stages = list(config.train.stages)
      stages[_STAGE.value] = (steps, _SEQ_LEN.value, accum)
      config.train.stages = tuple(stages)
      config.model.l_max = max(config.model.l_max, _SEQ_LEN.value + 2)
  try:
    if not _TARGET.value:
      report = aot.compile_train_step(config, stage=_STAGE.value, lower_only=_LOWER_ONLY.value)
      print(json.dumps(report) if _JSON.value else
            "\n".join(f"{k:>32}: {v}" for k, v in report.items()))
      return
    targets = [aot.get_target(name) for name in _TARGET.value]  # all names checked first
    reports = []
    for target in targets:
      reports.append(aot.compile_for_target(config, target, stage=_STAGE.value,
                                            kernel_only=_KERNEL_ONLY.value))
      if _JSON.value:
        print(json.dumps(reports[-1]), flush=True)
  except errors.InputError as e:
    sys.exit(f"aot_compile: {e}")
  if not _JSON.value:
    print(aot.format_table(reports))


if __name__ == "__main__":
  app.run(main)
