"""Does large-1m fit? Per-device memory of its train step from the real TPU / GPU compilers.

Compiles (deviceless, nothing runs) large-1m's train step at batch 1 for each target x length x
remat x conv_impl and records what the compiler's memory analysis says, the program's flops and
HBM bytes with the roofline bound they imply (training/roofline.py), compile time and the custom
kernels in the program. Results are appended to the JSON file one compile at a time
(a long sweep can be stopped and resumed: done entries are skipped), then a table is printed
with the longest context that fits per target. Needs `pip install -e .[tpu]` / `.[cuda12]`.

  JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1 nice -n 5 python benchmarks/bench_aot_memory.py \
      --targets=h100,v5p-2 --lengths=131072,1048576,2097152,4194304 --remat=block,offload
`--kernel_only` compiles one layer's long convolution (forward and backward) instead of the
train step, into results/aot_long_conv.json: what the convolution itself costs. `--conv=none`
compiles the train step with the long convolution replaced by a pointwise product (every other
op and gradient kept): the floor that no convolution can go below.
`--sequence=8` shards each sequence over 8 devices of the target (context parallelism,
`mesh.sequence`; e.g. `--targets=v5p-16`); such rows name the target "v5p-16/cp8".
`--conv=pallas-bf16` is the Pallas kernel with its spectra stored in bfloat16
(`--config.model.pallas_spectra_dtype=bfloat16`).
GPU compiles run ptxas per kernel (minutes at 1M); TPU compiles of large configs take minutes
on a small host.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # quiets libtpu on a non-TPU host
os.environ.setdefault("TPU_WORKER_ID", "0")
# Compile-only libtpu touches no chip, so several such processes may share the host.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hyena_jax.training import aot  # noqa: E402
from hyena_jax.training import run_config

DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "results", "aot_memory.json")
KERNEL_OUT = os.path.join(os.path.dirname(__file__), "results", "aot_long_conv.json")


def _pointwise_instead_of_the_convolution():
  """fftconv.long_conv -> u * (k[:, 0] + D) (* gate): the same inputs and gradient paths (the
  filter MLP still runs) at the cost of an elementwise product."""
  from hyena_jax.model import fftconv  # pylint: disable=g-import-not-at-top

  def pointwise(u, k, d_bias, gate=None, *, impl):
    y = u * (k[:, :1] + d_bias[:, None]).astype(u.dtype)[None]
    return y if gate is None else y * gate
  fftconv.long_conv = pointwise


def large_1m_config(seq_len: int, remat: str, conv_impl: str, sequence: int = 1):
  """configs/1m.py's model and precision (bf16, scan_layers) at batch 1, one stage at seq_len,
  each sequence split over `sequence` devices (conv_impl 'none': see
  `_pointwise_instead_of_the_convolution`; 'pallas-bf16': pallas with bfloat16 spectra)."""
  if conv_impl == "none":
    _pointwise_instead_of_the_convolution()
  config = run_config.release_config("large-1m")
  config.model.dtype = "bfloat16"
  config.model.scan_layers = True
  config.model.remat = remat
  config.model.conv_impl = {"none": "fft", "pallas-bf16": "pallas"}.get(conv_impl, conv_impl)
  if conv_impl == "pallas-bf16":
    config.model.pallas_spectra_dtype = "bfloat16"
  config.model.l_max = max(config.model.l_max, seq_len + 2)
  config.train.global_batch_size = 1
  config.train.stages = ((1, seq_len, 1),)
  config.eval.batch_size = 1
  config.mesh.sequence = sequence
  return config


def _key(r):
  return (r["target"], r["seq_len"], r["remat"], r["conv_impl"])


def summary(results: list[dict]) -> str:
  lines = [aot.format_table(results), "", "longest context that fits (batch 1):"]
  for target in dict.fromkeys(r["target"] for r in results):
    for conv in ("fft", "pallas", "pallas-bf16"):
      fits = [r["seq_len"] for r in results
              if r["target"] == target and r["conv_impl"] == conv and r.get("fits")]
      tried = [r for r in results if r["target"] == target and r["conv_impl"] == conv]
      if tried:
        lines.append(f"  {target:>8} {conv:>11}: "
                     + (f"{max(fits):,} tokens" if fits else "none of the lengths tried")
                     + f" (tried {sorted({r['seq_len'] for r in tried})})")
  return "\n".join(lines)


def markdown(results: list[dict]) -> str:
  """The README table: one row per compile, sorted by target, length, remat, conv; with the
  roofline columns (per device and step: TFLOP, HBM GB, the bound, and tokens/s)."""
  rows = ["| target (HBM/device) | tokens | remat | conv | peak GiB | fits | TFLOP | HBM GB | "
          "bound s | tokens/s | compile s | kernels |",
          "|---|---:|---|---|---:|---|---:|---:|---:|---:|---:|---|"]
  order = {t: i for i, t in enumerate(dict.fromkeys(r["target"] for r in results))}
  for r in sorted(results, key=lambda r: (order[r["target"]], r["seq_len"], r["remat"],
                                          r["conv_impl"])):
    head = f"| {r['target']} ({r['hbm_gib']:g} GiB) | {r['seq_len']:,} | {r['remat']} | " \
           f"{r['conv_impl']} |"
    if not r.get("ok") and "peak_gib_at_least" in r:   # the TPU compiler's out-of-HBM verdict
      rows.append(f"{head} >= {r['peak_gib_at_least']:.1f} | **no** (refused) | | | | | "
                  f"{r['compile_s']:.0f} | |")
      continue
    if not r.get("ok"):
      error = r.get("error", "")
      rows.append(f"{head} | no | | | | | {r.get('compile_s', '')} | {error[:80]} |")
      continue
    kernels = ", ".join(f"{r[k]} {k}" for k in ("mosaic", "triton") if r.get(k)) or "none"
    roof = (f"{r['flops'] / 1e12:.1f} | {r['bytes'] / 1e9:,.0f} | {r['bound_s']:.3f} | "
            f"{r['tokens_per_s'] / 1e6:.2f} M" if "flops" in r else "| | |")
    rows.append(f"{head} {r['peak_gib']:.1f} | {'yes' if r['fits'] else '**no**'} | {roof} | "
                f"{r['compile_s']:.0f} | {kernels} |")
  return "\n".join(rows)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--targets", default="h100,v5p-2")
  parser.add_argument("--lengths", default="131072,1048576,2097152,4194304")
  parser.add_argument("--remat", default="block,offload")
  parser.add_argument("--conv", default="fft,pallas")
  parser.add_argument("--sequence", type=int, default=1,
                      help="context parallelism: devices each sequence is split over")
  parser.add_argument("--kernel_only", action="store_true",
                      help="one layer's long convolution, not the train step")
  parser.add_argument("--out", default=None,
                      help="JSON file (default results/aot_memory.json, or aot_long_conv.json)")
  parser.add_argument("--table_only", action="store_true", help="print the table of --out")
  parser.add_argument("--markdown", action="store_true", help="also print README's table")
  args = parser.parse_args()
  args.out = args.out or (KERNEL_OUT if args.kernel_only else DEFAULT_OUT)
  if "none" in args.conv.split(",") and args.conv != "none":
    parser.error("--conv=none replaces the convolution for the whole process: run it alone")
  results = json.load(open(args.out)) if os.path.exists(args.out) else []
  if not args.table_only:
    done = {_key(r) for r in results}
    targets = [aot.get_target(t) for t in args.targets.split(",")]
    for target in targets:
      for seq_len in (int(x) for x in args.lengths.split(",")):
        for remat in args.remat.split(","):
          for conv in args.conv.split(","):
            name = target.name + (f"/cp{args.sequence}" if args.sequence > 1 else "")
            if (name, seq_len, remat, conv) in done:
              continue
            config = large_1m_config(seq_len, remat, conv, sequence=args.sequence)
            report = aot.compile_for_target(config, target, kernel_only=args.kernel_only)
            report["conv_impl"], report["target"] = conv, name
            print(json.dumps(report), flush=True)
            results.append(report)
            os.makedirs(os.path.dirname(args.out), exist_ok=True)
            with open(args.out, "w") as f:
              json.dump(results, f, indent=1)
  print(summary(results))
  if args.markdown:
    print(markdown(results))


if __name__ == "__main__":
  from hyena_jax import cpu_runtime  # pylint: disable=g-import-not-at-top
  cpu_runtime.configure()  # the CPU settings the command-line tools apply
  main()
