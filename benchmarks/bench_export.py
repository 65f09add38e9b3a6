"""Export / convert cost for released model sizes (random weights): seconds, file size, peak RSS.

    python benchmarks/bench_export.py                        # tiny-1k, small-32k, large-1m
    python benchmarks/bench_export.py --models=tiny-1k       # quick smoke

Peak RSS is the process high-water mark, so models run from smallest to largest and each row's
value includes everything before it. Writes benchmarks/results/export.json.
"""

import json
import os
import resource
import sys
import tempfile
import time

from absl import app, flags
from flax import nnx

from hyena_jax.interop import convert, export
from hyena_jax.model import config as config_lib
from hyena_jax.training import checkpoint

flags.DEFINE_list("models", ["tiny-1k", "small-32k", "large-1m"], "Released configs to export.")
flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "results", "export.json"),
                    "JSON results path.")
FLAGS = flags.FLAGS


def _rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv):
  del argv
  rows = []
  for name in FLAGS.models:
    cfg = config_lib.released(name)
    with tempfile.TemporaryDirectory() as tmp:
      run = os.path.join(tmp, "run")
      checkpoint.save_model(run, checkpoint.build_model(cfg, rngs=nnx.Rngs(0)),
                            {"model": cfg.to_dict()})
      t0 = time.perf_counter()
      out = export.export(run, os.path.join(tmp, "hf"))
      t_export = time.perf_counter() - t0
      size = os.path.getsize(os.path.join(out, "model.safetensors"))
      t0 = time.perf_counter()
      convert.convert(out, os.path.join(tmp, "back"))
      t_convert = time.perf_counter() - t0
    rows.append(dict(model=name, l_max=cfg.l_max, file_mb=size / 2**20, export_s=t_export,
                     convert_s=t_convert, peak_rss_mb=_rss_mb()))
    print(f"{name:>12} l_max={cfg.l_max:>9,} file {size / 2**20:8.1f} MB  export {t_export:6.2f} s"
          f"  convert {t_convert:6.2f} s  peak RSS {_rss_mb():7.0f} MB", flush=True)
  os.makedirs(os.path.dirname(FLAGS.out), exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump({"device": "cpu", "python": sys.version.split()[0], "rows": rows}, f, indent=2)


if __name__ == "__main__":
  from hyena_jax import cpu_runtime  # pylint: disable=g-import-not-at-top
  cpu_runtime.configure()  # the CPU settings the command-line tools apply
  app.run(main)
