"""Same-machine baseline: forward+backward tokens/s of the PyTorch reference module.

  python benchmarks/bench_torch_reference.py --lengths=1024,8192,32768,131072

`hyena_jax.torch_reference` follows the official computation (plain torch ops, FFT length 2L,
float32), so its speed stands in for the official model's on the same CPU. Writes
benchmarks/results/torch_reference_cpu.json; compare with bench_model.py's fwd+bwd rows.
"""

import argparse
import json
import os
import time

import cpu_models  # benchmarks/cpu_models.py
import torch

from hyena_jax.model import config as config_lib


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="tiny-1k")
  parser.add_argument("--lengths", default="1024,8192,32768,131072")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  lengths = [int(x) for x in args.lengths.split(",")]
  cfg = config_lib.released(args.model, l_max=max(max(lengths), 1026))
  model = cpu_models.torch_lm(cfg)
  rows = []
  for length in lengths:
    ids = torch.randint(7, 11, (args.batch, length))
    best = float("inf")
    for i in range(args.repeats + 1):
      start = time.perf_counter()
      model.zero_grad()
      model(ids).sum().backward()
      if i:  # the first run warms up allocators
        best = min(best, time.perf_counter() - start)
    rows.append({"model": args.model, "mode": "fwd+bwd", "length": length, "batch": args.batch,
                 "threads": args.threads, "seconds": best,
                 "tokens_per_s": args.batch * length / best})
    print(f"torch reference fwd+bwd L={length:>7} B={args.batch}  {best * 1e3:9.1f} ms"
          f"  {rows[-1]['tokens_per_s']:>10,.0f} tok/s", flush=True)
  out = os.path.join(os.path.dirname(__file__), "results", "torch_reference_cpu.json")
  with open(out, "w") as f:
    json.dump({"meta": {"torch": torch.__version__, "threads": args.threads}, "rows": rows}, f,
              indent=1)
  print(f"wrote {out}")


if __name__ == "__main__":
  from hyena_jax import cpu_runtime  # pylint: disable=g-import-not-at-top
  cpu_runtime.configure()  # the CPU settings the command-line tools apply
  main()
