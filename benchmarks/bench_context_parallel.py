"""Context parallelism: memory per device and train-step time vs context length and device count.

For each device count N (default 1, 2, 4, 8) a subprocess starts with its own
XLA_FLAGS=--xla_force_host_platform_device_count=N (N fake CPU devices, or set --real_devices on
a GPU/TPU host), builds a data=1 x fsdp=1 x sequence=N mesh and, for each context length,
compiles the context-parallel train step (loss + gradients, `context_parallel.plan_memory`):
the planned bytes per device come from `compiled.memory_analysis()` (no allocation). Lengths up
to --run_max_len are also run to time the step. The longest context whose planned peak fits
--budget_gib per device is reported per N.

On fake CPU devices all "devices" share the host's cores and RAM: step times show overheads,
not speed-ups, and the memory plan is the CPU compiler's; the scaling with N is what to read.

  # quick smoke (8 small compiles: minutes on a busy 2-core machine)
  python benchmarks/bench_context_parallel.py --smoke
  # full CPU run (memory plan up to 4M tokens of the tiny-1k architecture, timings to 64k)
  python benchmarks/bench_context_parallel.py --model tiny-1k --max_len 4194304 --run_max_len 65536
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "context_parallel.json"


def _model_config(name: str):
  from hyena_jax.model.config import HyenaConfig, released
  if name == "smoke":
    return HyenaConfig(d_model=16, n_layer=2, d_inner=64, filter_order=8, l_max=64)
  return released(name)


def worker(args) -> None:
  """Runs in a subprocess that sees exactly N devices; prints one JSON line per length."""
  import jax
  import numpy as np
  from flax import nnx

  from hyena_jax.model.hyenadna import HyenaLM
  from hyena_jax.training import context_parallel as cp

  n = args.worker
  cfg = _model_config(args.model)
  length = args.min_len
  while length <= args.max_len:
    row = {"devices": n, "seq_len": length, "batch": args.batch, "backend": jax.default_backend()}
    try:
      t0 = time.perf_counter()
      rep = cp.plan_memory(cfg, seq_len=length, batch=args.batch, sequence=n,
                             dtype=args.dtype, remat=args.remat, return_compiled=True)
      row["compile_s"] = time.perf_counter() - t0
      compiled, run_cfg = rep.pop("compiled"), rep.pop("config")
      row.update({k: v for k, v in rep.items() if k.endswith("_bytes")})
      fits = rep["peak_bytes"] <= args.budget_gib * 2 ** 30
      row["fits_budget"] = fits
      if length <= args.run_max_len and fits:
        (p_sh, r_sh, ids_sh), _ = compiled.input_shardings
        _, params, rest = nnx.split(HyenaLM(run_cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
        params, rest = jax.device_put(params, p_sh), jax.device_put(rest, r_sh)
        ids = np.random.default_rng(0).integers(7, 11, (args.batch, length), dtype=np.int32)
        ids = jax.device_put(ids, ids_sh)
        jax.block_until_ready(compiled(params, rest, ids))  # warm-up
        times = []
        for _ in range(args.steps):
          t0 = time.perf_counter()
          jax.block_until_ready(compiled(params, rest, ids))
          times.append(time.perf_counter() - t0)
        row["step_s"] = float(np.median(times))
        row["tokens_per_s"] = args.batch * length / row["step_s"]
    except Exception as e:  # an OOM or compile failure ends this device count's sweep
      row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
      print(json.dumps(row), flush=True)
      return
    print(json.dumps(row), flush=True)
    if not row["fits_budget"]:
      return  # longer contexts need even more memory
    length *= 2


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--model", default="tiny-1k", help="a released config name, or 'smoke'")
  ap.add_argument("--devices", default="1,2,4,8")
  ap.add_argument("--min_len", type=int, default=4096)
  ap.add_argument("--max_len", type=int, default=4 * 2 ** 20)
  ap.add_argument("--run_max_len", type=int, default=65536, help="time steps up to this length")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--remat", default="block")
  ap.add_argument("--budget_gib", type=float, default=16.0, help="memory per device")
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--real_devices", action="store_true",
                  help="use the host's accelerators instead of N fake CPU devices")
  ap.add_argument("--smoke", action="store_true", help="tiny model, short lengths")
  ap.add_argument("--out", default=str(RESULTS))
  ap.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.smoke:
    args.model, args.min_len, args.max_len, args.run_max_len = "smoke", 512, 1024, 1024
    args.dtype, args.remat, args.budget_gib, args.steps = "float32", "none", 0.004, 2
  if args.worker:
    worker(args)
    return

  rows = []
  for n in [int(v) for v in args.devices.split(",")]:
    env = dict(os.environ)
    if not args.real_devices:
      env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"  # + cpu_runtime's flags
      env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, __file__, "--worker", str(n)] + [
        a for a in sys.argv[1:] if a != "--smoke"] + (
        ["--model", args.model, "--min_len", str(args.min_len), "--max_len", str(args.max_len),
         "--run_max_len", str(args.run_max_len), "--dtype", args.dtype, "--remat", args.remat,
         "--budget_gib", str(args.budget_gib), "--steps", str(args.steps)]
        if args.smoke else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    got = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not got:
      got.append({"devices": n, "error": out.stderr.strip().splitlines()[-1:]})
    rows += got

  longest = {}
  for r in rows:
    if r.get("fits_budget"):
      longest[r["devices"]] = max(longest.get(r["devices"], 0), r["seq_len"])
  mib = lambda b: f"{b / 2 ** 20:10.2f}" if b is not None else "         -"  # noqa: E731
  print(f"model={args.model} batch={args.batch} dtype={args.dtype} remat={args.remat} "
        f"budget={args.budget_gib} GiB/device")
  print(f"{'devices':>7} {'seq_len':>9} {'peak MiB':>10} {'temp MiB':>10} {'compile s':>9} "
        f"{'step s':>8} {'tok/s':>9}")
  for r in rows:
    if "error" in r and "seq_len" not in r:
      print(f"{r['devices']:>7} error: {r['error']}")
      continue
    step = f"{r['step_s']:8.3f}" if "step_s" in r else "       -"
    tps = f"{r['tokens_per_s']:9.0f}" if "tokens_per_s" in r else "        -"
    print(f"{r['devices']:>7} {r['seq_len']:>9} {mib(r.get('peak_bytes'))} "
          f"{mib(r.get('temp_bytes'))} {r.get('compile_s', 0):9.1f} {step} {tps}"
          + (f"  error: {r['error']}" if "error" in r else ""))
  for n, length in sorted(longest.items()):
    print(f"longest context fitting {args.budget_gib} GiB/device on {n} device(s): {length:,}")
  pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"model": args.model, "batch": args.batch, "dtype": args.dtype,
               "remat": args.remat, "budget_gib": args.budget_gib,
               "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
               "rows": rows, "longest_fitting": {str(k): v for k, v in longest.items()}},
              f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  from hyena_jax import cpu_runtime  # pylint: disable=g-import-not-at-top
  cpu_runtime.configure()  # the CPU settings the command-line tools apply
  main()
