"""Cost per generated base: cached (incremental) decoder vs full recomputation.

    python benchmarks/bench_generate.py                      # full run (tiny-16k shapes)
    python benchmarks/bench_generate.py --lengths=128,256 --num_new=16 --l_max=1026   # smoke

For each buffer length T the prompt has T - num_new bases, so the loop runs at the bucket T.
Per-base cost = (time(num_new) - time(1)) / (num_new - 1), which removes the prefill, the
transfers and the dispatch; each time is the best of --repeats runs after a compile run.
Weights are random (cost does not depend on them). Prints a table and writes
benchmarks/results/generate.json.
"""

import json
import os
import platform
import time

import jax
from absl import app, flags
from flax import nnx

from hyena_jax.inference import generate
from hyena_jax.model.config import HyenaConfig
from hyena_jax.model.hyenadna import HyenaLM

_LENGTHS = flags.DEFINE_list("lengths", ["1024", "4096", "16384"], "buffer lengths T")
_NUM_NEW = flags.DEFINE_integer("num_new", 64, "generated bases per timed run")
_SAMPLES = flags.DEFINE_integer("num_samples", 1, "samples (batch rows)")
_D_MODEL = flags.DEFINE_integer("d_model", 128, "model width")
_N_LAYER = flags.DEFINE_integer("n_layer", 2, "blocks")
_L_MAX = flags.DEFINE_integer("l_max", 16386, "model l_max (>= every length)")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed runs per point (best is kept)")
_METHODS = flags.DEFINE_list("methods", ["cached", "recompute"], "decoders to time")
_OUT = flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "results",
                                               "generate.json"), "JSON output")


def _best_time(fn, repeats: int) -> float:
  fn()  # compile (same shapes for every prompt length in the bucket)
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def main(argv):
  del argv
  cfg = HyenaConfig(d_model=_D_MODEL.value, n_layer=_N_LAYER.value, d_inner=4 * _D_MODEL.value,
                    l_max=_L_MAX.value)
  model = HyenaLM(cfg, rngs=nnx.Rngs(0))
  model.eval()
  n = _NUM_NEW.value
  rows = []
  print(f"{'T':>7} {'method':>10} {'ms/base':>9} {'prefill+1 (ms)':>15}")
  for length in map(int, _LENGTHS.value):
    if length > cfg.l_max or length - n < 1:
      raise ValueError(f"length {length} must lie in (num_new, l_max={cfg.l_max}]")
    prompt = ("ACGT" * length)[:length - n]
    for method in _METHODS.value:
      def run(k, method=method, prompt=prompt):
        out = generate.generate(model, prompt, k, num_samples=_SAMPLES.value, seed=0,
                                method=method)
        return out.tokens
      t1 = _best_time(lambda: run(1), _REPEATS.value)
      tn = _best_time(lambda: run(n), _REPEATS.value)
      per_base = (tn - t1) / (n - 1)
      rows.append({"length": length, "method": method, "ms_per_base": 1e3 * per_base,
                   "first_base_ms": 1e3 * t1})
      print(f"{length:>7} {method:>10} {1e3 * per_base:>9.3f} {1e3 * t1:>15.1f}", flush=True)
  result = {"config": {"d_model": cfg.d_model, "n_layer": cfg.n_layer, "l_max": cfg.l_max,
                       "num_new": n, "num_samples": _SAMPLES.value},
            "device": str(jax.devices()[0]), "platform": platform.platform(),
            "jax": jax.__version__, "rows": rows}
  os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  from hyena_jax import cpu_runtime  # pylint: disable=g-import-not-at-top
  cpu_runtime.configure()  # the CPU settings the command-line tools apply
  app.run(main)
