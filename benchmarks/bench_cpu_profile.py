"""Where CPU time goes: ours (XLA:CPU profile) and the torch reference (torch.profiler), by kind.

  python benchmarks/bench_cpu_profile.py                    # tiny-1k fwd+bwd, L = 1k, 8k, 32k
  python benchmarks/bench_cpu_profile.py --mode=forward --lengths=1024,131072

For each length it profiles one warm call of each side (one process per side and length, as
bench_vs_torch.py) and splits the busy time into matmuls, FFTs and everything else (elementwise
fusions, reductions, copies). Times are summed over operations, so with 2 threads running
operations side by side the sum can exceed the wall time. The "floor" column is ours' matmul +
FFT time: no rearrangement of the elementwise work makes a step faster than that, so
`torch wall / floor` bounds the speed-up reachable without faster matmuls or FFTs. Prints a
table and writes benchmarks/results/cpu_profile.json.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import cpu_models  # benchmarks/cpu_models.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _kind_jax(name: str) -> str | None:
  if name.startswith("$") or "Thunk" in name or "Pjit" in name or name.startswith("end:") or (
      "ThreadPool" in name or "PjRt" in name or "holds" in name or name in (
          "ParseArguments",)):
    return None
  if name.startswith(("ynn_fusion", "dot", "xnn_fusion", "onednn")):
    return "matmul"
  if name.startswith("fft"):
    return "fft"
  return "other"


def _kind_torch(name: str) -> str | None:
  if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul_backward"):
    return "matmul"
  if name.startswith("aten::_fft"):
    return "fft"
  return "other"


def _child_jax(args) -> dict:
  import jax  # pylint: disable=g-import-not-at-top

  from hyena_jax.model import config as config_lib  # pylint: disable=g-import-not-at-top

  cfg = config_lib.released(args.model, l_max=max(args.length, 1026))
  params, forward, loss_fn = cpu_models.jax_lm(cfg)
  fn = jax.jit(forward) if args.mode == "forward" else jax.jit(jax.grad(loss_fn))
  ids = jax.random.randint(jax.random.key(0), (1, args.length), 7, 11)
  for _ in range(2):
    jax.block_until_ready(fn(params, ids))
  wall = float("inf")
  for _ in range(3):
    start = time.perf_counter()
    jax.block_until_ready(fn(params, ids))
    wall = min(wall, time.perf_counter() - start)
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      jax.block_until_ready(fn(params, ids))
    trace = json.load(gzip.open(glob.glob(f"{trace_dir}/**/*perfetto_trace.json.gz",
                                          recursive=True)[0]))
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  kinds, ops = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and "dur" in e and (kind := _kind_jax(e["name"])):
      kinds[kind] += e["dur"] / 1e6
      ops[re.sub(r"\.\d+$", "", e["name"])] += e["dur"] / 1e6
  return {"wall_s": wall, "kinds_s": dict(kinds), "top_ops_s": dict(ops.most_common(12))}


def _child_torch(args) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  from torch.profiler import ProfilerActivity, profile  # pylint: disable=g-import-not-at-top

  from hyena_jax.model import config as config_lib  # pylint: disable=g-import-not-at-top

  cfg = config_lib.released(args.model, l_max=max(args.length, 1026))
  model = cpu_models.torch_lm(cfg)
  ids = torch.randint(7, 11, (1, args.length))

  def step():
    if args.mode == "forward":
      with torch.inference_mode():
        model(ids)
      return
    model.zero_grad(set_to_none=True)
    logits = model(ids)
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                      ids[:, 1:].reshape(-1), reduction="sum").backward()

  for _ in range(2):
    step()
  wall = float("inf")
  for _ in range(3):
    start = time.perf_counter()
    step()
    wall = min(wall, time.perf_counter() - start)
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    step()
  kinds, ops = collections.Counter(), collections.Counter()
  for avg in prof.key_averages():
    seconds = avg.self_cpu_time_total / 1e6
    kinds[_kind_torch(avg.key)] += seconds
    ops[avg.key] += seconds
  return {"wall_s": wall, "kinds_s": dict(kinds), "top_ops_s": dict(ops.most_common(12))}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="tiny-1k")
  parser.add_argument("--lengths", default="1024,8192,32768")
  parser.add_argument("--mode", default="fwd+bwd", choices=("forward", "fwd+bwd"))
  parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results",
                                                    "cpu_profile.json"))
  parser.add_argument("--child", choices=("jax", "torch"), help=argparse.SUPPRESS)
  parser.add_argument("--length", type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    result = (_child_jax if args.child == "jax" else _child_torch)(args)
    print(json.dumps(result))
    return

  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([REPO] + [p for p in os.environ.get(
                 "PYTHONPATH", "").split(os.pathsep) if p]))
  rows = []
  print(f"{args.model} {args.mode}, batch 1; busy time by kind (ms, summed over operations)")
  print(f"{'L':>7} {'side':>5} {'wall':>8} {'matmul':>8} {'fft':>8} {'other':>8}   "
        f"{'floor':>8} {'torch/floor':>11}")
  for length in [int(x) for x in args.lengths.split(",")]:
    row = {"length": length, "mode": args.mode, "load_before": os.getloadavg()[0]}
    for side in ("jax", "torch"):
      child_env = dict(env, HYENA_JAX_CPU_TUNING="0") if side == "torch" else env
      out = subprocess.run([sys.executable, os.path.abspath(__file__), f"--child={side}",
                            f"--length={length}", f"--mode={args.mode}",
                            f"--model={args.model}"], env=child_env, capture_output=True,
                           text=True, check=False)
      if out.returncode:
        sys.exit(f"{side} child failed at L={length}:\n{out.stderr[-3000:]}")
      row[side] = json.loads(out.stdout.strip().splitlines()[-1])
    floor = row["jax"]["kinds_s"].get("matmul", 0) + row["jax"]["kinds_s"].get("fft", 0)
    row["floor_s"] = floor
    row["torch_over_floor"] = row["torch"]["wall_s"] / floor
    for side in ("jax", "torch"):
      k = row[side]["kinds_s"]
      tail = (f"   {floor * 1e3:8.1f} {row['torch_over_floor']:10.2f}x" if side == "jax" else "")
      print(f"{length:>7} {side:>5} {row[side]['wall_s'] * 1e3:8.1f} "
            f"{k.get('matmul', 0) * 1e3:8.1f} {k.get('fft', 0) * 1e3:8.1f} "
            f"{k.get('other', 0) * 1e3:8.1f}{tail}", flush=True)
    rows.append(row)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"meta": {"model": args.model, "mode": args.mode, "cpu_count": os.cpu_count()},
               "rows": rows}, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  from hyena_jax import cpu_runtime  # pylint: disable=g-import-not-at-top
  cpu_runtime.configure()  # the CPU settings the command-line tools apply
  main()
