"""Benchmark of the gated long convolution alone: XLA FFT (`fft`) vs the Pallas kernel (`pallas`).

For each length L (1k ... 1M) it times the forward and the forward+backward of
`(causal_conv(u, k) + D u) * gate` at FlashFFTConv's table shape B=64, D=768, scaled down for
long L so that B * D * L stays at 64 * 768 * 4096 elements, and reports the achieved bandwidth:
the op's compulsory HBM traffic (read u, gate, k; write y; plus dy in / du, dgate, dk out for the
backward) divided by the time, as a percentage of the device's peak memory bandwidth.

Full run on a GPU/TPU (writes benchmarks/results/long_conv.json and .png):
    python benchmarks/bench_long_conv.py
CPU smoke (the Pallas kernel runs in the slow interpreter there, so leave it out):
    python benchmarks/bench_long_conv.py --lengths 1024,4096 --impls fft --reps 2 --elements 262144
(`--impls fft,pallas --elements 16384` also runs the interpreted kernel, as a correctness check.)
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp

from hyena_jax.model import fftconv
from hyena_jax.model.kernels import pallas_conv

RESULTS = pathlib.Path(__file__).resolve().parent / "results"

# Peak memory bandwidth (bytes/s) by `device_kind` substring, first match wins (vendor specs).
PEAK_BANDWIDTH = [
    ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("H200", 4.8e12), ("GH200", 4.0e12),
    ("B200", 8.0e12), ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12), ("L40S", 0.864e12), ("L4", 0.3e12), ("A10", 0.6e12),
    ("TPU v6", 1.64e12), ("TPU v5 lite", 0.819e12), ("TPU v5e", 0.819e12),
    ("TPU v5p", 2.765e12), ("TPU v5", 2.765e12), ("TPU v4", 1.2e12),
]
# FlashFFTConv's table shape, and the element budget that shape has at L = 4096.
BATCH, CHANNELS = 64, 768
ELEMENTS = BATCH * CHANNELS * 4096


def device_info() -> dict:
  dev = jax.devices()[0]
  peak = next((bw for name, bw in PEAK_BANDWIDTH if name.lower() in dev.device_kind.lower()), None)
  return {"platform": dev.platform, "device_kind": dev.device_kind, "peak_bandwidth": peak,
          "jax": jax.__version__}


def is_oom(err: Exception) -> bool:
  text = str(err)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() or "OOM" in text


def time_fn(fn: Callable, *args, reps: int) -> float:
  """Median wall time (s) of `fn(*args)` after one compile+warm-up call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def shape_for(length: int, batch: int = BATCH, channels: int = CHANNELS,
              elements: int = ELEMENTS) -> tuple[int, int]:
  """(B, D) for length L: the table's B=64, D=768, batch reduced first, then channels."""
  b = max(1, min(batch, elements // (channels * length)))
  d = max(1, min(channels, elements // (b * length)))
  return b, d


def conv_fns(impl: str, interpret: bool | None):
  conv = (fftconv.fft_long_conv if impl == "fft" else
          lambda u, k, d, g: pallas_conv.long_conv(u, k, d, g, interpret=interpret))

  def fwd_bwd(u, k, d, g, ct):
    y, vjp = jax.vjp(conv, u, k, d, g)
    return y, vjp(ct)

  return jax.jit(conv), jax.jit(fwd_bwd)


def op_bytes(b: int, d: int, length: int, itemsize: int, mode: str) -> int:
  """Compulsory HBM traffic: fwd reads u, gate, k (fp32) and writes y; bwd adds dy in and
  du, dgate, dk out (plus u, gate, k read again)."""
  act = b * d * length * itemsize
  filt = d * length * 4
  fwd = 3 * act + filt
  return fwd if mode == "fwd" else fwd + 5 * act + 2 * filt


def run(lengths: list[int], impls: list[str], dtype: str, reps: int,
        interpret: bool | None, elements: int = ELEMENTS) -> list[dict]:
  info = device_info()
  rows = []
  for length in lengths:
    b, d = shape_for(length, elements=elements)
    ks = jax.random.split(jax.random.key(0), 5)
    dt = jnp.dtype(dtype)
    u = jax.random.normal(ks[0], (b, d, length), dt)
    k = jax.random.normal(ks[1], (d, length), jnp.float32) / length
    dbias = jax.random.normal(ks[2], (d,), jnp.float32)
    gate = jax.random.normal(ks[3], (b, d, length), dt)
    ct = jax.random.normal(ks[4], (b, d, length), dt)
    reference = None
    for impl in impls:
      fwd, fwd_bwd = conv_fns(impl, interpret)
      for mode, fn, args in (("fwd", fwd, (u, k, dbias, gate)),
                             ("fwd+bwd", fwd_bwd, (u, k, dbias, gate, ct))):
        row = {"impl": impl, "mode": mode, "length": length, "batch": b, "channels": d,
               "dtype": dtype}
        try:
          seconds = time_fn(fn, *args, reps=reps)
          nbytes = op_bytes(b, d, length, dt.itemsize, mode)
          row.update(time_ms=seconds * 1e3, bandwidth_gbs=nbytes / seconds / 1e9)
          if info["peak_bandwidth"]:
            row["roofline_pct"] = 100 * nbytes / seconds / info["peak_bandwidth"]
          if mode == "fwd":  # a cheap check that the timed kernel computes the right thing
            out = fn(*args).astype(jnp.float32)
            reference = out if reference is None else reference
            row["max_rel_err_vs_first"] = float(
                jnp.abs(out - reference).max() / jnp.abs(reference).max())
        except Exception as err:  # noqa: BLE001 - record OOMs and go on; re-raise anything else
          if not is_oom(err):
            raise
          row["status"] = "oom"
        rows.append(row)
        print(format_row(row), flush=True)
  return rows


def format_row(row: dict) -> str:
  if row.get("status") == "oom":
    return f"{row['impl']:>7} {row['mode']:>8} L={row['length']:>8}  OOM"
  pct = f"{row['roofline_pct']:6.1f}%" if "roofline_pct" in row else "     -"
  return (f"{row['impl']:>7} {row['mode']:>8} L={row['length']:>8} B={row['batch']:>3} "
          f"D={row['channels']:>4}  {row['time_ms']:10.3f} ms  {row['bandwidth_gbs']:8.1f} GB/s  "
          f"{pct}")


def plot(rows: list[dict], path: pathlib.Path, title: str, key: str = "impl") -> None:
  """Time vs length, log-log, one line per (key, mode); OOM points are left out."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  series = sorted({(r[key], r["mode"]) for r in rows})
  for name, mode in series:
    pts = [(r["length"], r["time_ms"]) for r in rows
           if r[key] == name and r["mode"] == mode and "time_ms" in r]
    if pts:
      xs, ys = zip(*sorted(pts))
      ax.plot(xs, ys, marker="o", label=f"{name} {mode}")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("sequence length")
  ax.set_ylabel("time (ms)")
  ax.set_title(title)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def save(name: str, rows: list[dict], args: argparse.Namespace, title: str,
         key: str = "impl") -> None:
  RESULTS.mkdir(parents=True, exist_ok=True)
  payload = {"device": device_info(), "args": vars(args), "rows": rows}
  (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1))
  plot(rows, RESULTS / f"{name}.png", title, key)
  print(f"wrote {RESULTS / (name + '.json')} and {name}.png")


def int_list(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--lengths", type=int_list,
                      default=[1 << e for e in range(10, 21)], help="comma-separated lengths")
  parser.add_argument("--impls", default="fft,pallas", help="comma-separated: fft, pallas")
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--elements", type=int, default=ELEMENTS,
                      help="B * D * L budget per length (default: 64 * 768 * 4096)")
  parser.add_argument("--interpret", action="store_true",
                      help="force the Pallas interpreter (default: only on CPU)")
  parser.add_argument("--name", default="long_conv", help="output file stem under results/")
  args = parser.parse_args()
  impls = [x for x in args.impls.split(",") if x]
  bad = set(impls) - {"fft", "pallas"}
  if bad:
    parser.error(f"unknown impl(s) {sorted(bad)}; choose from fft, pallas")
  info = device_info()
  print(f"device: {info['device_kind']} ({info['platform']}), peak bandwidth "
        f"{info['peak_bandwidth'] or 'unknown'} B/s")
  rows = run(args.lengths, impls, args.dtype, args.reps, True if args.interpret else None,
             args.elements)
  save(args.name, rows, args, f"gated long conv on {info['device_kind']} ({args.dtype})")


if __name__ == "__main__":
  from hyena_jax import cpu_runtime  # pylint: disable=g-import-not-at-top
  cpu_runtime.configure()  # the CPU settings the command-line tools apply
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  main()
