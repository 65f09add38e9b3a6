"""Compile a config's train step ahead of time and print its memory needs per device.

Catches out-of-memory before renting hardware. Examples:
  # 1M context, one 80 GB GPU (run on any machine with a GPU jaxlib, or on the GPU host):
  python launch/aot_compile.py --config=configs/1m.py --config.train.global_batch_size=1 \
      --config.eval.batch_size=1 --devices=1
  # on a CPU-only machine with 8 fake devices (shows the sharded program and CPU-planned memory):
  python launch/aot_compile.py --config=configs/1m.py --devices=8 --platform=cpu
  # a TPU slice without the hardware (needs libtpu installed): --topology=v5p:2x2x2
By default the last (longest) stage is compiled; --stage picks another.
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_DEVICES = flags.DEFINE_integer("devices", 0, "Fake CPU devices to create (CPU only); 0 = real.")
_PLATFORM = flags.DEFINE_string("platform", "", "Force a JAX platform (cpu, gpu, tpu).")
_TOPOLOGY = flags.DEFINE_string("topology", "", "TPU topology to compile for, e.g. v5p:2x2x2.")
_STAGE = flags.DEFINE_integer("stage", -1, "Which train.stages entry to compile.")
_LOWER_ONLY = flags.DEFINE_bool("lower_only", False, "Stop after lowering (no XLA compile).")


def main(argv):
  del argv
  if _DEVICES.value:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_DEVICES.value}")
  if _PLATFORM.value:
    os.environ["JAX_PLATFORMS"] = _PLATFORM.value
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from hyena_jax import aot  # imported after XLA_FLAGS are set

  devices = None
  if _TOPOLOGY.value:
    from jax.experimental import topologies
    devices = topologies.get_topology_desc(platform="tpu", topology_name=_TOPOLOGY.value).devices
  report = aot.compile_train_step(flags.FLAGS.config, stage=_STAGE.value, devices=devices,
                                  lower_only=_LOWER_ONLY.value)
  for key, value in report.items():
    print(f"{key:>32}: {value}")


if __name__ == "__main__":
  app.run(main)
