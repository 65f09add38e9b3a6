"""Does pretraining pay on small data? Fine-tuning tiny-1k from a trained backbone, the same
architecture from scratch, and k-mer-count logistic regression, on small subsets of the two shared
GenomicBenchmarks sets, 3 seeds each.

    pip install -e .[bench]                       # scikit-learn, for the k-mer arm
    python benchmarks/bench_finetune.py           # ~10-20 min on a busy 2-core CPU
    python benchmarks/bench_finetune.py --recipe official --arms scratch \
        --out_name finetune_small_data_official_recipe
    python benchmarks/bench_finetune.py --rows 0 --epochs 4 --arms scratch   # every row

Sizes (defaults): each shared file (the public *test* split of the task) is cut to `--rows` 600
rows by a seeded permutation (numpy default_rng(0)); finetune then holds out 20% as test
(split_train_test seed 0) and 10% of the rest as validation (seed 1): 432 train / 48 valid /
120 test rows. The same split serves every arm and seed. Neural arms: `--recipe` small_data
(hyena_jax.finetune_config.small_data: batch 32, AdamW 2e-3, the official 1% warm-up), 3 epochs
= 39 steps, best validation checkpoint by the task's metric (accuracy) with constant predictors
ranked last, train.seed = 0, 1, 2. "pretrained" loads the trained tiny-1k backbone of
`$HYENA_JAX_SHARED/parity/tiny1k_classifier/weights.pt` (the official pretrained weights
fine-tuned on a human enhancer task) through `--config.pretrained` with a fresh head; "scratch"
is the same architecture randomly initialised. The k-mer arm counts k-mers (k = 4, 6) of the
same training rows, picks C of a logistic regression on validation MCC, and is deterministic
(sd 0). Prints a table, writes benchmarks/results/<out_name>.json and .png.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import platform
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
TASKS = ("human_enhancers_cohn", "human_nontata_promoters")
# Paper Table A.4 (tiny-1k, full data, 100 epochs): accuracy (%) from scratch and pretrained.
PAPER = {"human_enhancers_cohn": {"scratch": 72.9, "pretrained": 74.2},
         "human_nontata_promoters": {"scratch": 93.3, "pretrained": 96.6}}
NOTES = {"human_enhancers_cohn": "overlaps the backbone's own fine-tuning task (human enhancers; "
                                 "with its own head it scores 40.8%, MCC -0.19, on these 120 "
                                 "test rows: its labels or data differ from this set's)"}
BACKBONE = ("parity", "tiny1k_classifier", "weights.pt")


def task_config(task: str, recipe: str):
  path = ROOT / "configs" / "finetune.py"
  spec = importlib.util.spec_from_file_location("finetune_tasks", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(f"{task}:{recipe}")


def subset_file(task: str, shared: pathlib.Path, root: pathlib.Path, rows: int) -> str:
  """The first `rows` rows of a seeded permutation of the shared file (0 = all), as a TSV."""
  lines = (shared / "data" / "genomic_benchmarks" / f"{task}.test.tsv").read_text().splitlines()
  header, body = lines[0], lines[1:]
  if rows:
    body = [body[i] for i in np.random.default_rng(0).permutation(len(body))[:rows]]
  out = root / f"{task}.{rows or 'all'}.tsv"
  root.mkdir(parents=True, exist_ok=True)
  out.write_text(header + "\n" + "\n".join(body) + "\n")
  return str(out)


def neural_config(task: str, data: str, arm: str, seed: int, args, shared: pathlib.Path):
  config = task_config(task, args.recipe)
  if arm == "pretrained":
    config.pretrained = str(shared.joinpath(*BACKBONE))
  config.data.update(train=data, test_fraction=0.2, valid_fraction=0.1, split_seed=0)
  config.train.update(epochs=args.epochs, seed=seed, log_every_steps=10)
  if args.lr:
    config.optim.learning_rate = args.lr
  config.eval.batch_size = 40
  config.mesh.data = 1
  return config


def run_neural(task, data, arm, seed, args, shared, root) -> dict:
  from hyena_jax import finetune
  recipe = args.recipe + (f"_lr{args.lr:g}" if args.lr else "")
  workdir = root / recipe / task / f"{arm}_seed{seed}"
  if (workdir / "results.json").exists():  # resume an interrupted benchmark
    return json.loads((workdir / "results.json").read_text())
  start = time.perf_counter()
  results = finetune.finetune_and_evaluate(
      neural_config(task, data, arm, seed, args, shared), str(workdir))
  if results["status"] == "interrupted":  # SIGTERM/SIGINT: state saved; rerunning resumes it
    raise SystemExit(f"{workdir}: interrupted at step {results['step']}; rerun to resume")
  results["wall_seconds"] = round(time.perf_counter() - start, 1)
  (workdir / "results.json").write_text(json.dumps(results, indent=1))
  return results


def kmer_counts(inputs: np.ndarray, k: int) -> np.ndarray:
  """int32 token rows [N, L] (left [PAD]) -> k-mer frequencies [N, 4^k]; windows holding any
  non-ACGT token (pad, N) are skipped."""
  from hyena_jax import tokenizer as tok
  code = np.full(max(tok.A, tok.C, tok.G, tok.T) + 16, -1, np.int64)
  code[[tok.A, tok.C, tok.G, tok.T]] = np.arange(4)
  codes = code[inputs]
  windows = np.lib.stride_tricks.sliding_window_view(codes, k, axis=1)  # [N, L-k+1, k]
  index = (windows * 4 ** np.arange(k - 1, -1, -1)).sum(-1)
  valid = (windows >= 0).all(-1)
  counts = np.zeros((len(inputs), 4 ** k))
  rows = np.broadcast_to(np.arange(len(inputs))[:, None], index.shape)
  np.add.at(counts, (rows[valid], index[valid]), 1.0)
  return counts / np.maximum(counts.sum(1, keepdims=True), 1.0)


def run_kmer(splits, k: int, n_classes: int) -> dict:
  from sklearn.linear_model import LogisticRegression
  from sklearn.preprocessing import StandardScaler
  from hyena_jax import finetune
  start = time.perf_counter()
  x = {name: kmer_counts(split.inputs, k) for name, split in splits.items()}
  scaler = StandardScaler().fit(x["train"])
  x = {name: scaler.transform(v) for name, v in x.items()}
  best = None
  for c in (1e-3, 1e-2, 1e-1, 1.0):
    model = LogisticRegression(C=c, max_iter=3000).fit(x["train"], splits["train"].labels)
    valid = finetune.task_metrics(model.decision_function(x["valid"])[:, None] * [[-0.5, 0.5]]
                                  if n_classes == 2 else model.decision_function(x["valid"]),
                                  splits["valid"].labels, n_classes)
    if best is None or valid["mcc"] > best[0]["mcc"]:
      best = (valid, c, model)
  valid, c, model = best
  logits = model.decision_function(x["test"])
  logits = logits[:, None] * [[-0.5, 0.5]] if n_classes == 2 else logits
  return {"valid": valid, "test": finetune.task_metrics(logits, splits["test"].labels, n_classes),
          "C": c, "wall_seconds": round(time.perf_counter() - start, 1),
          "predictions": {"test": finetune.prediction_summary(logits, n_classes)}}


def mean_sd(values) -> tuple[float, float]:
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def summarise(runs: list[dict]) -> dict:
  out = {}
  for split in ("test", "valid"):
    for metric in ("accuracy", "mcc"):
      m, s = mean_sd([r[split][metric] for r in runs])
      out[f"{split}_{metric}"] = {"mean": m, "sd": s}
  out["collapsed_runs"] = sum(bool(r.get("collapsed")) for r in runs)
  out["wall_seconds"] = round(sum(r["wall_seconds"] for r in runs), 1)
  return out


def plot(table: dict, majority: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  tasks = list(table)
  arms = list(next(iter(table.values())))
  fig, ax = plt.subplots(figsize=(7, 3.6))
  width = 0.8 / len(arms)
  for j, arm in enumerate(arms):
    means = [100 * table[t][arm]["test_accuracy"]["mean"] for t in tasks]
    sds = [100 * table[t][arm]["test_accuracy"]["sd"] for t in tasks]
    ax.bar(np.arange(len(tasks)) + (j - (len(arms) - 1) / 2) * width, means, width, yerr=sds,
           capsize=3, label=arm)
  for i, t in enumerate(tasks):
    ax.hlines(100 * majority[t], i - 0.45, i + 0.45, colors="k", linestyles="dashed",
              label="majority class" if i == 0 else None)
  ax.set_xticks(range(len(tasks)), [t + ("*" if t in NOTES else "") for t in tasks])
  ax.set_ylabel("test accuracy % (mean ± sd, 3 seeds)")
  ax.set_ylim(40, 100)
  ax.legend(fontsize=8, ncol=3, loc="upper left")
  ax.set_title("tiny-1k fine-tuning on small subsets (*: overlaps the backbone's task)",
               fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tasks", nargs="+", default=list(TASKS))
  parser.add_argument("--arms", nargs="+", default=["pretrained", "scratch", "kmer"])
  parser.add_argument("--recipe", default="small_data", help="official | small_data")
  parser.add_argument("--rows", type=int, default=600, help="subset size per set (0 = all)")
  parser.add_argument("--epochs", type=int, default=3)
  parser.add_argument("--lr", type=float, default=0.0, help="peak learning rate (0 = the recipe's)")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--shared", default=os.environ.get(
      "HYENA_JAX_SHARED", str(ROOT.parent / "shared")))
  parser.add_argument("--workdir_root", default="/tmp/hyena_jax_bench_finetune")
  parser.add_argument("--out_name", default="finetune_small_data")
  args = parser.parse_args()
  shared, root = pathlib.Path(args.shared), pathlib.Path(args.workdir_root) / f"rows{args.rows}"

  import jax
  from hyena_jax import finetune
  bench_start = time.perf_counter()
  table, runs, majority, sizes = {}, {}, {}, {}
  for task in args.tasks:
    data = subset_file(task, shared, root, args.rows)
    splits = finetune.load_splits(neural_config(task, data, "scratch", 0, args, shared))
    sizes[task] = {k: len(v) for k, v in splits.items()}
    majority[task] = float(np.bincount(splits["test"].labels).max() / len(splits["test"]))
    table[task], runs[task] = {}, {}
    for arm in args.arms:
      if arm == "kmer":
        for k in (4, 6):
          r = run_kmer(splits, k, 2)
          runs[task][f"kmer{k}"] = [r]
          table[task][f"kmer{k}"] = summarise([r])
        continue
      results = [run_neural(task, data, arm, s, args, shared, root) for s in args.seeds]
      runs[task][arm] = [{k: r[k] for k in ("test", "valid", "best_step", "steps", "collapsed",
                                            "constant_valid_steps", "warnings", "predictions",
                                            "train_seconds", "wall_seconds", "init")}
                         for r in results]
      table[task][arm] = summarise(results)

  print(f"recipe {args.recipe} (lr {args.lr or 'of the recipe'}), {args.epochs} epochs, "
        f"seeds {args.seeds}; rows per split: "
        + "; ".join(f"{t} {s['train']}/{s['valid']}/{s['test']}" for t, s in sizes.items()))
  print(f"{'set':<24} {'arm':<11} {'test acc %':>12} {'test MCC':>13} {'valid acc %':>12} "
        f"{'valid MCC':>10} {'collapsed':>9} {'wall s':>7}")
  for task, arms in table.items():
    for arm, row in arms.items():
      ta, tm = row["test_accuracy"], row["test_mcc"]
      va, vm = row["valid_accuracy"], row["valid_mcc"]
      print(f"{task:<24} {arm:<11} {100 * ta['mean']:6.1f} ± {100 * ta['sd']:3.1f} "
            f"{tm['mean']:6.3f} ± {tm['sd']:.3f} {100 * va['mean']:6.1f} ± {100 * va['sd']:3.1f} "
            f"{vm['mean']:10.3f} {row['collapsed_runs']:>9} {row['wall_seconds']:>7.0f}")
    print(f"{'':<24} {'majority':<11} {100 * majority[task]:6.1f}"
          + (f"      * {NOTES[task]}" if task in NOTES else ""))
  total = time.perf_counter() - bench_start
  print(f"benchmark wall time {total:.0f} s")

  out_dir = ROOT / "benchmarks" / "results"
  out_dir.mkdir(parents=True, exist_ok=True)
  out = {"recipe": args.recipe, "learning_rate": args.lr or "the recipe's", "epochs": args.epochs,
         "seeds": args.seeds,
         "backbone": "/".join(BACKBONE) + " (official tiny-1k pretrained weights fine-tuned on a "
                     "human enhancer task; fresh 2-class head)",
         "subset": f"first {args.rows or 'all'} rows of numpy default_rng(0).permutation of each "
                   "shared file; then split_train_test(n, 0.2, seed 0) for test and 10% of the "
                   "rest (seed 1) for validation; the rest trains",
         "rows": sizes, "majority_class_test_accuracy": majority, "notes": NOTES,
         "paper_full_data_accuracy": PAPER, "table": table, "runs": runs,
         "wall_seconds": round(total, 1),
         "device": f"{jax.devices()[0].platform} ({platform.processor() or platform.machine()}, "
                   f"{os.cpu_count()} cores, shared with other jobs)"}
  path = out_dir / f"{args.out_name}.json"
  path.write_text(json.dumps(out, indent=1))
  plot(table, majority, str(out_dir / f"{args.out_name}.png"))
  print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
  main()
