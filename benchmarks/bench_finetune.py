"""GenomicBenchmarks fine-tuning from scratch (tiny-1k architecture) on the two shared test
splits, next to the paper's Table A.4, plus the fine-tuned fixture classifier's logits.

    python benchmarks/bench_finetune.py                       # CPU budget run: 1 epoch each
    python benchmarks/bench_finetune.py --epochs 100 --batch_size 128 --lr 6e-4   # full recipe

Each file (the public *test* split of the task) is split deterministically: 20% test with
`split_train_test(n, 0.2, seed)`, then 10% of the rest as validation (seed + 1) for early
stopping / the best checkpoint; the remaining 72% trains. A task whose workdir already holds a
results.json is not retrained (its numbers are collected). Prints a table and writes
benchmarks/results/finetune_genomic_benchmarks.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import platform

# Faster CPU backward passes (as hyena_jax.main); must precede jax's backend initialisation.
if "xla_cpu_experimental_ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_cpu_experimental_ynn_fusion_type=-reduce").strip()

# Paper Table A.4 (tiny-1k): accuracy (%) from scratch and pretrained.
PAPER = {"human_enhancers_cohn": {"scratch": 72.9, "pretrained": 74.2},
         "human_nontata_promoters": {"scratch": 93.3, "pretrained": 96.6}}


def run_task(task: str, shared: pathlib.Path, workdir: pathlib.Path, args) -> dict:
  from hyena_jax import finetune
  results_path = workdir / "results.json"
  if results_path.exists():
    return json.loads(results_path.read_text())
  path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "finetune" / f"{task}.py"
  spec = importlib.util.spec_from_file_location(task, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.train = str(shared / "data" / "genomic_benchmarks" / f"{task}.test.tsv")
  config.data.update(test_fraction=0.2, valid_fraction=0.1, split_seed=args.seed)
  config.train.update(epochs=args.epochs, batch_size=args.batch_size, log_every_steps=20,
                      eval_every_steps=args.eval_every_steps, patience=args.patience)
  config.eval.batch_size = 64
  config.optim.learning_rate = args.lr
  config.mesh.data = 1
  return finetune.finetune_and_evaluate(config, str(workdir))


def fixture_logits(shared: pathlib.Path, workdir: pathlib.Path) -> dict:
  """The fine-tuned tiny1k_classifier fixture through finetune's evaluation path."""
  import numpy as np
  from hyena_jax import finetune, finetune_config
  folder = shared / "parity" / "tiny1k_classifier"
  workdir.mkdir(parents=True, exist_ok=True)
  data = workdir / "fixture_sequences.tsv"
  seqs = (folder / "sequences.txt").read_text().split()
  data.write_text("".join(f"{s}\t1\n" for s in seqs))  # enhancer sequences; labels unused here
  config = finetune_config.base_config()
  config.pretrained, config.keep_pretrained_head = str(folder / "weights.pt"), True
  config.data.update(train=str(data), test=str(data), valid_fraction=0.0, max_length=512)
  config.train.update(epochs=0, batch_size=8)
  config.eval.batch_size, config.mesh.data = 8, 1
  if not (workdir / "eval" / "test_outputs.npy").exists():
    finetune.finetune_and_evaluate(config, str(workdir / "eval"))
  got = np.load(workdir / "eval" / "test_outputs.npy")
  want = np.load(folder / "class_logits.npy")
  return {"rows": len(seqs), "max_abs_diff": float(np.abs(got - want).max()),
          "allclose_1e-4": bool(np.allclose(got, want, rtol=1e-4, atol=1e-4)),
          "argmax_equal": bool((got.argmax(1) == want.argmax(1)).all())}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tasks", nargs="+", default=list(PAPER))
  parser.add_argument("--shared", default=os.environ.get(
      "HYENA_JAX_SHARED", str(pathlib.Path(__file__).resolve().parents[2] / "shared")))
  parser.add_argument("--workdir_root", default="/tmp/hyena_jax_bench_finetune")
  parser.add_argument("--epochs", type=int, default=1)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--lr", type=float, default=2e-3)
  parser.add_argument("--eval_every_steps", type=int, default=0)
  parser.add_argument("--patience", type=int, default=0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" /
                                           "finetune_genomic_benchmarks.json"))
  args = parser.parse_args()
  shared, root = pathlib.Path(args.shared), pathlib.Path(args.workdir_root)

  import jax
  rows = []
  print(f"{'task':<26} {'epochs':>6} {'train s':>8} {'test acc %':>10} {'MCC':>6} "
        f"{'paper scratch':>13} {'paper pretrained':>16}")
  for task in args.tasks:
    r = run_task(task, shared, root / task, args)
    row = {"task": task, "epochs": round(r["epochs"], 3), "steps": r["steps"],
           "best_step": r["best_step"], "train_seconds": r["train_seconds"],
           "rows": r["rows"], "split": r["sources"], "test": r["test"], "valid": r["valid"],
           "learning_rate": r["config"]["optim"]["learning_rate"],
           "eval_every_steps": r["config"]["train"]["eval_every_steps"],
           "batch_size": r["config"]["train"]["batch_size"], "paper_accuracy": PAPER.get(task)}
    rows.append(row)
    paper = PAPER.get(task, {})
    print(f"{task:<26} {row['epochs']:>6.2f} {row['train_seconds']:>8.0f} "
          f"{100 * r['test']['accuracy']:>10.1f} {r['test']['mcc']:>6.3f} "
          f"{paper.get('scratch', float('nan')):>13.1f} "
          f"{paper.get('pretrained', float('nan')):>16.1f}")
  fixture = fixture_logits(shared, root / "tiny1k_classifier")
  print(f"tiny1k_classifier fixture via the evaluation path: max |logit diff| "
        f"{fixture['max_abs_diff']:.2e} (allclose 1e-4: {fixture['allclose_1e-4']})")
  out = {"model": "tiny-1k architecture (d_model 128, 2 layers, l_max 1026), from scratch",
         "split": f"split_train_test(n, 0.2, seed={args.seed}) for test, then 10% of the rest "
                  f"(seed {args.seed + 1}) for validation; the rest trains",
         "device": f"{jax.devices()[0].platform} ({platform.processor() or platform.machine()}, "
                   f"{os.cpu_count()} cores, shared with other jobs)",
         "tasks": rows, "tiny1k_classifier_fixture": fixture}
  pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
