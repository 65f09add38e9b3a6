"""One forward of large-1m (random init, batch 1, float32) at long contexts: peak RSS and seconds.

    python benchmarks/bench_long_inference.py [--lengths=131072,262144,524288,1000000]
        [--arms=long,jit,torch] [--repeats=2] [--output=benchmarks/results/long_inference.json]

Arms, each run in a fresh process (so its peak RSS is its own):
  long   hyena_jax.inference.long_forward.last_logits: chunked positions, grouped channels, one
         jitted call per layer (the path embed/score/ use for long inputs);
  jit    the plain `jax.jit` forward (`model(ids)[:, -1]`), what the tools ran before;
  torch  the official model's maths (hyena_jax.interop.torch_reference, the official standalone
         code's structure, checked against the parity fixtures) under torch.no_grad.
Seconds are per forward after the first call (which compiles, for JAX; torch runs once); with
--repeats=1 only the first call is timed. An arm whose process dies (out of memory) is reported as such. The
last-position logits of `long` and `jit` are compared where both ran.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
arm, length, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
import numpy as np
rng = np.random.default_rng(0)
ids = rng.integers(7, 11, (1, length)).astype(np.int32)
times = []
if arm == "torch":
  import torch
  torch.set_num_threads(int(sys.argv[4]))
  from hyena_jax.interop import formats, torch_reference
  from hyena_jax.model.config import released
  cfg = released("large-1m")
  torch.manual_seed(0)
  model = torch_reference.HyenaDNAForCausalLM({**formats.hf_config(cfg), "shift": cfg.shift}).eval()
  with torch.no_grad():
    for _ in range(repeats):
      t0 = time.perf_counter()
      logits = model(torch.from_numpy(ids).long())
      last = logits[0, -1].float().numpy()
      del logits
      times.append(time.perf_counter() - t0)
else:
  import hyena_jax
  hyena_jax.configure_cpu()
  import jax
  from flax import nnx
  from hyena_jax.inference import long_forward
  from hyena_jax.model.config import released
  from hyena_jax.model.hyenadna import HyenaLM
  model = HyenaLM(released("large-1m"), rngs=nnx.Rngs(0))
  model.eval()
  if arm == "jit":
    forward = nnx.jit(lambda m, x: m(x)[:, -1])
  else:
    forward = lambda m, x: long_forward.last_logits(m, x)
  for _ in range(repeats):
    t0 = time.perf_counter()
    last = np.asarray(jax.block_until_ready(forward(model, ids)))[0]
    times.append(time.perf_counter() - t0)
peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2 ** 30
print("RESULT " + json.dumps({"times_s": times, "peak_rss_gb": peak_gb,
                              "last_logits": [float(v) for v in last]}))
"""


def run_arm(arm: str, length: int, repeats: int, threads: int, timeout: int) -> dict:
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  t0 = time.perf_counter()
  try:
    proc = subprocess.run([sys.executable, "-c", CHILD, arm, str(length), str(repeats),
                           str(threads)], env=env, capture_output=True, text=True,
                          timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"arm": arm, "length": length, "ok": False, "why": f"timeout after {timeout} s"}
  wall = time.perf_counter() - t0
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode != 0 or not lines:
    why = ("killed (out of memory?)" if proc.returncode in (-9, 137) else
           f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    return {"arm": arm, "length": length, "ok": False, "why": why, "wall_s": wall}
  result = json.loads(lines[-1][len("RESULT "):])
  times = result.pop("times_s")
  return {"arm": arm, "length": length, "ok": True, "wall_s": round(wall, 1),
          "first_call_s": round(times[0], 1),
          "s_per_forward": round(min(times[1:]) if len(times) > 1 else times[0], 1),
          "peak_rss_gb": round(result["peak_rss_gb"], 2), "last_logits": result["last_logits"]}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--lengths", default="131072,262144,524288,1000000")
  parser.add_argument("--arms", default="long,jit,torch")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
  parser.add_argument("--timeout", type=int, default=3600)
  parser.add_argument("--skip", default="jit:524288,jit:1000000",
                      help="arm:length pairs not to run (the jit forward at 524k needs ~18 GB)")
  parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" /
                                              "long_inference.json"))
  args = parser.parse_args()
  skip = {tuple(s.split(":")) for s in args.skip.split(",") if s}
  rows = []
  for length in [int(v) for v in args.lengths.split(",")]:
    for arm in args.arms.split(","):
      if (arm, str(length)) in skip:
        rows.append({"arm": arm, "length": length, "ok": False, "why": "skipped (--skip)"})
        continue
      # torch compiles nothing: its first forward is its steady state.
      repeats = 1 if arm == "torch" else args.repeats
      row = run_arm(arm, length, repeats, args.threads, args.timeout)
      rows.append(row)
      print(json.dumps({k: v for k, v in row.items() if k != "last_logits"}), flush=True)
  by = {(r["arm"], r["length"]): r for r in rows if r.get("ok")}
  for (arm, length), row in by.items():
    if arm == "long" and ("jit", length) in by:
      a, b = row["last_logits"], by[("jit", length)]["last_logits"]
      row["max_abs_diff_vs_jit"] = max(abs(x - y) for x, y in zip(a, b))
  print(f"\n{'arm':>6} {'tokens':>10} {'peak RSS GB':>12} {'s/forward':>10} {'1st call s':>11}")
  for r in rows:
    if r.get("ok"):
      print(f"{r['arm']:>6} {r['length']:>10,} {r['peak_rss_gb']:>12.2f} "
            f"{r['s_per_forward']:>10.1f} {r['first_call_s']:>11.1f}")
    else:
      print(f"{r['arm']:>6} {r['length']:>10,} {r['why']}")
  for r in rows:
    r.pop("last_logits", None)
  pathlib.Path(args.output).write_text(json.dumps(
      {"model": "large-1m (random init), batch 1, float32", "threads": args.threads,
       "machine": f"{os.cpu_count()} cores", "rows": rows}, indent=1) + "\n")
  print(f"wrote {args.output}")


if __name__ == "__main__":
  main()
