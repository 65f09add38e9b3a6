"""Throughput of the pretraining input pipeline (tokens/s), bundled E. coli genome.

    python benchmarks/bench_data.py                       # full: 1k, 32k, 1M x 0, 2 workers
    python benchmarks/bench_data.py --lengths 1024 --workers 0 --seconds 2   # smoke

Each setting builds the train pipeline with the augmentations on (rc_aug, random_offset), takes one
batch (start-up, worker spawn: reported apart), then times batches for at least --seconds.
Tokens per batch are kept near --tokens_per_batch (batch = max(1, tokens // seq_len)). Prints a
table and writes benchmarks/results/data.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time


def measure(seq_len: int, workers: int, tokens_per_batch: int, seconds: float,
            read_threads: int) -> dict:
  from hyena_jax.data import pretraining as data  # pylint: disable=g-import-not-at-top

  cfg = data.default_config()
  cfg.num_workers, cfg.read_threads = workers, read_threads
  cfg.rc_aug, cfg.random_offset = True, True
  batch = max(1, tokens_per_batch // seq_len)
  t0 = time.perf_counter()
  it = iter(data.make_pretrain_dataset(cfg, split="train", seq_len=seq_len,
                                       global_batch_size=batch, seed=0, process_index=0,
                                       process_count=1))
  next(it)
  first = time.perf_counter() - t0
  n, t1 = 0, time.perf_counter()
  while (elapsed := time.perf_counter() - t1) < seconds or n < 3:
    b = next(it)
    assert b["inputs"].shape == (batch, seq_len)
    n += 1
  it.close()
  return {"seq_len": seq_len, "workers": workers, "batch": batch, "batches": n,
          "seconds": round(elapsed, 3), "first_batch_s": round(first, 3),
          "tokens_per_s": round(n * batch * seq_len / elapsed)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 32768, 1048576])
  parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
  parser.add_argument("--tokens_per_batch", type=int, default=1 << 20)
  parser.add_argument("--seconds", type=float, default=10.0)
  parser.add_argument("--read_threads", type=int, default=2)
  parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "data.json"))
  args = parser.parse_args()

  rows = []
  print(f"{'seq_len':>9} {'workers':>7} {'batch':>6} {'first batch s':>13} {'Mtokens/s':>10}")
  for seq_len in args.lengths:
    for workers in args.workers:
      r = measure(seq_len, workers, args.tokens_per_batch, args.seconds, args.read_threads)
      rows.append(r)
      print(f"{r['seq_len']:>9} {r['workers']:>7} {r['batch']:>6} {r['first_batch_s']:>13.2f} "
            f"{r['tokens_per_s'] / 1e6:>10.2f}", flush=True)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  meta = {"cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
          "python": platform.python_version(), "genome": "bundled E. coli K-12 W3110",
          "augment": "rc_aug + random_offset", "read_threads": args.read_threads,
          "seconds_per_setting": args.seconds,
          "loadavg_1min_at_end": round(os.getloadavg()[0], 2)}  # >cpu_count: contended numbers
  out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
  print(f"wrote {out}")


if __name__ == "__main__":  # required: Grain workers are spawned and re-import this module
  main()
