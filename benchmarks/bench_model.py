"""Tokens/s of the HyenaDNA model: forward, forward+backward, and a full train step.

  python benchmarks/bench_model.py                       # tiny-1k, L = 1k, 8k, 32k, 131k, batch 1
  python benchmarks/bench_model.py --modes=train --lengths=1024,32768 --batch=1

Prints a table and writes benchmarks/results/model_<platform>.json. Reference (issue 2): the
official PyTorch model on a 2-core CPU (float32, 2 threads) ran fwd+bwd at about 27k tokens/s at
1k and 7.7k tokens/s at 131k.
"""

import argparse
import json
import os
import time

import cpu_models  # benchmarks/cpu_models.py
import jax
import optax

from hyena_jax.model import config as config_lib
from hyena_jax.training import optim


def _time(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))          # compile + warm up
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="tiny-1k", help="released config name")
  parser.add_argument("--lengths", default="1024,8192,32768,131072")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--modes", default="forward,fwd+bwd,train")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--remat", default="none")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default="")
  args = parser.parse_args()

  lengths = [int(x) for x in args.lengths.split(",")]
  cfg = config_lib.released(args.model, l_max=max(max(lengths), 1026), dtype=args.dtype,
                            remat=args.remat)
  params, forward, loss_fn = cpu_models.jax_lm(cfg)
  tx = optim.make_optimizer(learning_rate=1e-4)
  forward = jax.jit(forward)
  fwd_bwd = jax.jit(jax.grad(loss_fn))

  @jax.jit
  def train_step(p, opt_state, ids):
    grads = jax.grad(loss_fn)(p, ids)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state

  rows = []
  for length in lengths:
    ids = jax.random.randint(jax.random.key(0), (args.batch, length), 7, 11)
    for mode in args.modes.split(","):
      if mode == "forward":
        seconds = _time(forward, (params, ids), args.repeats)
      elif mode == "fwd+bwd":
        seconds = _time(fwd_bwd, (params, ids), args.repeats)
      elif mode == "train":
        seconds = _time(train_step, (params, tx.init(params), ids), args.repeats)
      else:
        raise ValueError(f"unknown mode {mode!r}")
      rows.append({"model": args.model, "mode": mode, "length": length, "batch": args.batch,
                   "dtype": args.dtype, "seconds": seconds,
                   "tokens_per_s": args.batch * length / seconds})
      print(f"{args.model:>10} {mode:>8} L={length:>7} B={args.batch}  {seconds * 1e3:9.1f} ms"
            f"  {rows[-1]['tokens_per_s']:>10,.0f} tok/s", flush=True)

  platform = jax.devices()[0].platform
  out = args.out or os.path.join(os.path.dirname(__file__), "results", f"model_{platform}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  meta = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
          "cpu_count": os.cpu_count(), "xla_flags": os.environ.get("XLA_FLAGS", "")}
  with open(out, "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  print(f"wrote {out}")


if __name__ == "__main__":
  from hyena_jax import cpu_runtime  # pylint: disable=g-import-not-at-top
  cpu_runtime.configure()  # the CPU settings the command-line tools apply
  main()
