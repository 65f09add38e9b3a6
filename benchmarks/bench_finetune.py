"""Does pretraining pay, and does fine-tuning keep it? The trained tiny-1k backbone fine-tuned with
the recommended recipe, plainly fine-tuned, linearly probed, the same architecture from scratch,
the GenomicBenchmarks paper's CNN and k-mer logistic regression, on the same split, 3 seeds.

    pip install -e .[bench]                        # scikit-learn (k-mers), matplotlib (plot)
    python benchmarks/bench_finetune.py --full     # README's table: every row of both shared
                                                   # sets, every arm (~60 min, idle 2-core CPU)
    python benchmarks/bench_finetune.py            # 600-row subsets (~15 min)
    python benchmarks/bench_finetune.py --data my_set=train.tsv,test.tsv --arms recommended probe
    python benchmarks/bench_finetune.py --rows 2000 --trim 100 --arms probe recommended \
        --pooling mean mean_nonpad --out_name finetune_pooling     # variable-length sequences

Data: `--data NAME=TRAIN[,TEST]` (TSV/CSV `seq<TAB>label`, any number of classes: ids 0..C-1);
default the two shared GenomicBenchmarks files (their public *test* splits). Without TEST the
file is split as finetune does: test = the first 20% of numpy default_rng(0).permutation(n),
validation = 10% of the rest (seed 1), the rest trains; with TEST, validation is 10% of TRAIN.
`--rows N` first keeps N rows of a default_rng(0) permutation; `--trim MIN` then cuts every
sequence to a window of random length in [MIN, its length] at a random offset (default_rng(1)),
so that sequences differ in length and get left [PAD]. Every arm sees the same split.

Arms (the neural ones with train.seed = each of --seeds; batch 32, AdamW with the implicit-filter
group, cosine from the recipe's peak; the best validation checkpoint by the task's metric):
  recommended  the small_data recipe (finetune_config.small_data: LP-FT) from the trained backbone
  finetune     the same without its linear-probe stage: plain full fine-tuning at the same rate
  scratch      the same as finetune, randomly initialised, at peak 2e-3 (lower peaks collapse
               more often from scratch: finetune_config.small_data)
  probe        the linear probe alone (frozen backbone; deterministic)
  cnn          benchmarks/cnn_baseline.py (the GenomicBenchmarks CNN; 10 epochs, Adam 1e-3)
  kmer         k-mer (k = 4, 6) frequencies + logistic regression, C picked on validation MCC
"trained backbone" = `$HYENA_JAX_SHARED/parity/tiny1k_classifier/weights.pt`: the official
pretrained tiny-1k fine-tuned on a human enhancer task, loaded through config.pretrained with a
fresh head. `--full` sets --rows 0 --steps 100 --arms (all): 100 steps of 32 rows (0.64 epoch of
cohn, 0.49 of nontata) is what fits an hour of CPU for the whole table.

Prints a table; writes OUTPUT/<out_name>.json (arguments, split, every run) and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_TASKS = {"human_enhancers_cohn": 500, "human_nontata_promoters": 251}  # name: max length
ARMS = ("recommended", "finetune", "scratch", "probe", "cnn", "kmer")
NEURAL = ("recommended", "finetune", "scratch", "probe")
# GenomicBenchmarks accuracy on the official splits (all training rows): the CNN of the
# GenomicBenchmarks paper (Grešová et al. 2023) and tiny-1k in the HyenaDNA paper (Table A.4).
PAPER = {"human_enhancers_cohn": {"cnn": 69.5, "hyenadna_scratch": 72.9,
                                  "hyenadna_pretrained": 74.2},
         "human_nontata_promoters": {"cnn": 84.6, "hyenadna_scratch": 93.3,
                                     "hyenadna_pretrained": 96.6}}
BACKBONE = ("parity", "tiny1k_classifier", "weights.pt")
# From scratch a higher peak than small_data's: lower ones left more runs constant predictors.
SCRATCH_LR = 2e-3


def read_rows(path: str) -> tuple[str, list[tuple[str, str]]]:
  """(header line or "", [(sequence, label)]) of a TSV/CSV with a `seq<TAB>label` body."""
  lines = pathlib.Path(path).read_text().splitlines()
  sep = "," if path.endswith(".csv") else "\t"
  header = lines[0] if lines and not lines[0].split(sep)[-1].strip().lstrip("-").isdigit() else ""
  rows = [tuple(line.split(sep)[:2]) for line in lines[1 if header else 0:] if line.strip()]
  return header, rows


def prepare(name: str, train: str, test: str, args, root: pathlib.Path) -> dict:
  """Writes the (sub-sampled, trimmed) TSVs the runs read; returns the set's description."""
  header, rows = read_rows(train)
  described = [f"{train}: {len(rows)} rows"]
  if args.rows:
    rows = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))[:args.rows]]
    described.append(f"first {len(rows)} of numpy default_rng(0).permutation")
  test_rows = read_rows(test)[1] if test else []
  if args.trim:
    rng = np.random.default_rng(1)

    def trim(seq):
      keep = int(rng.integers(min(args.trim, len(seq)), len(seq) + 1))
      start = int(rng.integers(0, len(seq) - keep + 1))
      return seq[start:start + keep]

    rows = [(trim(s), y) for s, y in rows]
    test_rows = [(trim(s), y) for s, y in test_rows]
    described.append(f"each sequence cut to a window of random length in [{args.trim}, its "
                     "length] at a random offset (numpy default_rng(1))")
  folder = root / name
  folder.mkdir(parents=True, exist_ok=True)

  def write(path, body):
    path.write_text("seq\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in body))
    return str(path)

  files = {"train": write(folder / "train.tsv", rows)}
  if test_rows:
    files["test"] = write(folder / "test.tsv", test_rows)
  lengths = [len(s) for s, _ in rows + test_rows]
  labels = [int(y) for _, y in rows]
  return {"name": name, "files": files, "source": "; ".join(described),
          "max_length": SHARED_TASKS.get(name) if not args.trim and name in SHARED_TASKS
          else max(lengths), "n_classes": max(labels) + 1,
          "length_range": [min(lengths), max(lengths)]}


def neural_config(data: dict, arm: str, seed: int, pooling: str, args, shared: pathlib.Path):
  from hyena_jax.downstream import finetune_config
  config = finetune_config.task_config(data["name"], max_length=data["max_length"],
                                       n_classes=data["n_classes"], metric="accuracy",
                                       recipe="small_data")
  if arm != "scratch":
    config.pretrained = str(shared.joinpath(*BACKBONE))
  config.head.pooling = pooling
  config.data.update(train=data["files"]["train"], test=data["files"].get("test", ""),
                     test_fraction=0.2, valid_fraction=0.1, split_seed=0)
  config.train.update(seed=seed, log_every_steps=25)
  config.train.linear_probe = arm in ("recommended", "probe")
  if arm == "probe":
    config.train.update(epochs=0, num_steps=0)
  elif args.steps:
    config.train.update(num_steps=args.steps, eval_every_steps=max(args.steps // 3, 1))
  else:
    config.train.epochs = args.epochs
  if arm == "scratch":
    config.optim.learning_rate = SCRATCH_LR
  if args.lr:
    config.optim.learning_rate = args.lr
  if args.metric:
    config.eval.metric = args.metric
  config.eval.batch_size = 64
  config.mesh.data = 1
  return config


def run_neural(data, arm, seed, pooling, args, shared, root) -> dict:
  from hyena_jax.downstream import finetune
  workdir = root / data["name"] / f"{arm}_{pooling}_seed{seed}"
  if (workdir / "results.json").exists():  # finished earlier: an interrupted benchmark resumes
    results = json.loads((workdir / "results.json").read_text())
    if "wall_seconds" in results:
      return results
  start = time.perf_counter()
  results = finetune.finetune_and_evaluate(
      neural_config(data, arm, seed, pooling, args, shared), str(workdir))
  if results["status"] == "interrupted":  # SIGTERM/SIGINT: state saved; rerunning resumes it
    raise SystemExit(f"{workdir}: interrupted at step {results['step']}; rerun to resume")
  results["wall_seconds"] = round(time.perf_counter() - start, 1)
  (workdir / "results.json").write_text(json.dumps(results, indent=1))
  return results


def run_cnn(splits, n_classes: int, seed: int, folder: pathlib.Path) -> dict:
  """The CNN baseline of one seed; its results are kept, so that a rerun reuses them."""
  path = folder / f"cnn_seed{seed}.json"
  if path.exists():
    return json.loads(path.read_text())
  import cnn_baseline  # pylint: disable=g-import-not-at-top  (benchmarks/ is on sys.path)
  result = cnn_baseline.train_cnn(splits, n_classes, seed)
  folder.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=1))
  return result


def kmer_counts(inputs: np.ndarray, k: int) -> np.ndarray:
  """int32 token rows [N, L] (left [PAD]) -> k-mer frequencies [N, 4^k]; windows holding any
  non-ACGT token (pad, N) are skipped."""
  from hyena_jax.data import tokenizer as tok
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


def class_scores(model, x: np.ndarray, n_classes: int) -> np.ndarray:
  """Logit-like scores [N, n_classes] of a scikit-learn linear classifier."""
  scores = model.decision_function(x)
  return scores[:, None] * [[-0.5, 0.5]] if n_classes == 2 else scores


def run_kmer(splits, k: int, n_classes: int) -> dict:
  from sklearn.linear_model import LogisticRegression
  from sklearn.preprocessing import StandardScaler

  from hyena_jax.downstream import task_metrics
  start = time.perf_counter()
  x = {name: kmer_counts(split.inputs, k) for name, split in splits.items()}
  scaler = StandardScaler().fit(x["train"])
  x = {name: scaler.transform(v) for name, v in x.items()}
  best = None
  for c in (1e-3, 1e-2, 1e-1, 1.0):
    model = LogisticRegression(C=c, max_iter=3000).fit(x["train"], splits["train"].labels)
    valid = task_metrics.task_metrics(class_scores(model, x["valid"], n_classes),
                                  splits["valid"].labels, n_classes)
    if best is None or valid["mcc"] > best[0]["mcc"]:
      best = (valid, c, model)
  valid, c, model = best
  logits = class_scores(model, x["test"], n_classes)
  return {"valid": valid, "test": task_metrics.task_metrics(logits, splits["test"].labels, n_classes),
          "C": c, "wall_seconds": round(time.perf_counter() - start, 1),
          "predictions": {"test": task_metrics.prediction_summary(logits, n_classes)}}


def mean_sd(values) -> tuple[float, float]:
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def summarise(runs: list[dict]) -> dict:
  out = {}
  for split in ("test", "valid"):
    for metric in ("accuracy", "mcc"):
      m, s = mean_sd([r[split][metric] for r in runs])
      out[f"{split}_{metric}"] = {"mean": m, "sd": s}
  out["runs"] = len(runs)
  out["collapsed_runs"] = sum(bool(r.get("collapsed")) for r in runs)
  out["wall_seconds"] = round(sum(r["wall_seconds"] for r in runs), 1)
  return out


def plot(table: dict, majority: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  sets = list(table)
  arms = list(dict.fromkeys(arm for rows in table.values() for arm in rows))
  fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(arms) * len(sets), 3.8))
  width = 0.8 / len(arms)
  for j, arm in enumerate(arms):
    x = [i + (j - (len(arms) - 1) / 2) * width for i, s in enumerate(sets) if arm in table[s]]
    rows = [table[s][arm]["test_accuracy"] for s in sets if arm in table[s]]
    ax.bar(x, [100 * r["mean"] for r in rows], width, yerr=[100 * r["sd"] for r in rows],
           capsize=3, label=arm)
  for i, s in enumerate(sets):
    ax.hlines(100 * majority[s], i - 0.45, i + 0.45, colors="k", linestyles="dashed",
              label="majority class" if i == 0 else None)
  ax.set_xticks(range(len(sets)), sets)
  ax.set_ylabel("test accuracy % (mean ± sd over seeds)")
  low = min(100 * majority[s] for s in sets)
  ax.set_ylim(max(0, low - 10), 100)
  ax.legend(fontsize=7, ncol=4, loc="upper left")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def parse_data(specs: list[str] | None, shared: pathlib.Path) -> dict[str, tuple[str, str]]:
  if not specs:
    folder = shared / "data" / "genomic_benchmarks"
    return {name: (str(folder / f"{name}.test.tsv"), "") for name in SHARED_TASKS}
  sets = {}
  for spec in specs:
    name, _, files = spec.partition("=")
    train, _, test = files.partition(",")
    if not name or not train:
      sys.exit(f"error: --data {spec!r}: use NAME=TRAIN.tsv[,TEST.tsv]")
    for path in filter(None, (train, test)):
      if not pathlib.Path(path).is_file():
        sys.exit(f"error: --data {spec!r}: no such file {path}")
    sets[name] = (train, test)
  return sets


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", nargs="+", metavar="NAME=TRAIN[,TEST]",
                      help="labelled TSV/CSV files (default: the two shared GenomicBenchmarks)")
  parser.add_argument("--full", action="store_true",
                      help="the README table: --rows 0 --steps 100, every arm")
  parser.add_argument("--arms", nargs="+", choices=ARMS, default=None)
  parser.add_argument("--pooling", nargs="+", default=["mean"],
                      choices=["mean", "mean_nonpad", "last"], help="head pooling(s) to compare")
  parser.add_argument("--rows", type=int, default=None, help="rows kept per file (0 = all)")
  parser.add_argument("--trim", type=int, default=0,
                      help="cut sequences to random lengths of at least this (0 = keep)")
  parser.add_argument("--epochs", type=int, default=3, help="neural arms, when --steps is 0")
  parser.add_argument("--steps", type=int, default=None, help="optimizer steps (0 = --epochs)")
  parser.add_argument("--lr", type=float, default=0.0, help="peak learning rate (0 = recipe's)")
  parser.add_argument("--metric", default="", choices=["", "accuracy", "mcc", "loss"],
                      help="validation selection of the neural arms ('' = the recipe's)")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--shared", default=os.environ.get(
      "HYENA_JAX_SHARED", str(ROOT.parent / "shared")))
  parser.add_argument("--workdir_root", default="/tmp/hyena_jax_bench_finetune",
                      help="run folders (finished runs are reused when the benchmark reruns)")
  parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results"),
                      help="folder for the JSON and the plot")
  parser.add_argument("--out_name", default=None)
  args = parser.parse_args()
  if args.full:
    args.rows = 0 if args.rows is None else args.rows
    args.steps = 100 if args.steps is None else args.steps
  args.rows = 600 if args.rows is None else args.rows
  args.steps = args.steps or 0
  args.arms = args.arms or list(ARMS)
  args.out_name = args.out_name or ("finetune_full" if args.full else "finetune_small_data")
  shared = pathlib.Path(args.shared)
  if any(arm != "scratch" and arm in NEURAL for arm in args.arms) and not (
      shared.joinpath(*BACKBONE).is_file()):
    sys.exit(f"error: the trained backbone {shared.joinpath(*BACKBONE)} is missing: set "
             "HYENA_JAX_SHARED or --shared, or run only --arms scratch cnn kmer")
  tag = (f"rows{args.rows}_trim{args.trim}_" + (f"steps{args.steps}" if args.steps
                                                else f"epochs{args.epochs}")
         + (f"_lr{args.lr:g}" if args.lr else "") + (f"_select_{args.metric}" if args.metric
                                                        else ""))
  root = pathlib.Path(args.workdir_root) / tag

  import jax

  sys.path.insert(0, str(ROOT / "benchmarks"))
  bench_start = time.perf_counter()
  table, runs, majority, sets = {}, {}, {}, {}
  for name, (train, test) in parse_data(args.data, shared).items():
    data = prepare(name, train, test, args, root / "data")
    config = neural_config(data, "scratch", 0, "mean", args, shared)
    from hyena_jax.data import labelled  # pylint: disable=g-import-not-at-top
    splits = labelled.load_splits(config)
    n_classes = data["n_classes"]
    data["rows"] = {k: len(v) for k, v in splits.items()}
    sets[name] = data
    majority[name] = float(np.bincount(splits["test"].labels).max() / len(splits["test"]))
    table[name], runs[name] = {}, {}
    for arm in args.arms:
      if arm == "kmer":
        for k in (4, 6):
          result = run_kmer(splits, k, n_classes)
          runs[name][f"kmer{k}"], table[name][f"kmer{k}"] = [result], summarise([result])
        continue
      if arm == "cnn":
        results = [run_cnn(splits, n_classes, seed, root / name) for seed in args.seeds]
        runs[name]["cnn"], table[name]["cnn"] = results, summarise(results)
        continue
      for pooling in args.pooling:
        label = arm if len(args.pooling) == 1 else f"{arm} ({pooling})"
        seeds = args.seeds[:1] if arm == "probe" else args.seeds  # the probe is deterministic
        results = [run_neural(data, arm, s, pooling, args, shared, root) for s in seeds]
        keep = ("test", "valid", "best_step", "steps", "collapsed", "constant_valid_steps",
                "warnings", "predictions", "linear_probe", "train_seconds", "wall_seconds",
                "init")
        runs[name][label] = [{k: r.get(k) for k in keep} for r in results]
        table[name][label] = summarise(results)
      print(f"{name}: {arm} done ({time.perf_counter() - bench_start:.0f} s)", flush=True)

  recipe = ((f"{args.steps} steps" if args.steps else f"{args.epochs} epochs") + " of batch 32"
            + f", best checkpoint by validation {args.metric or 'accuracy (the recipe)'}")
  print(f"recipe: {recipe}, peak lr {args.lr or 'of small_data'}; seeds {args.seeds}")
  print(f"{'set':<24} {'arm':<26} {'test acc %':>12} {'test MCC':>15} {'valid acc %':>12} "
        f"{'collapsed':>9} {'wall s':>7}")
  for name, arms in table.items():
    s = sets[name]["rows"]
    print(f"{name} ({s['train']} train / {s['valid']} valid / {s['test']} test rows)")
    for arm, row in arms.items():
      ta, tm, va = row["test_accuracy"], row["test_mcc"], row["valid_accuracy"]
      print(f"{'':<24} {arm:<26} {100 * ta['mean']:6.1f} ± {100 * ta['sd']:3.1f} "
            f"{tm['mean']:7.3f} ± {tm['sd']:.3f} {100 * va['mean']:6.1f} ± {100 * va['sd']:3.1f} "
            f"{row['collapsed_runs']:>9} {row['wall_seconds']:>7.0f}")
    print(f"{'':<24} {'majority class':<26} {100 * majority[name]:6.1f}"
          + (f"   paper (official split, all rows): {PAPER[name]}" if name in PAPER else ""))
  total = time.perf_counter() - bench_start
  print(f"benchmark wall time {total:.0f} s")

  out_dir = pathlib.Path(args.output)
  out_dir.mkdir(parents=True, exist_ok=True)
  out = {"arguments": vars(args), "recipe": recipe, "sets": sets,
         "backbone": "/".join(BACKBONE) + " (official tiny-1k pretrained weights fine-tuned on a "
                     "human enhancer task; fresh head)",
         "split": "without a test file: test = first 20% of numpy default_rng(0).permutation(n) "
                  "(finetune's split_train_test seed 0), validation = 10% of the rest (seed 1)",
         "majority_class_test_accuracy": majority, "paper_official_split_accuracy": PAPER,
         "table": table, "runs": runs, "wall_seconds": round(total, 1),
         "device": f"{jax.devices()[0].platform} ({platform.processor() or platform.machine()}, "
                   f"{os.cpu_count()} cores)"}
  path = out_dir / f"{args.out_name}.json"
  path.write_text(json.dumps(out, indent=1))
  plot(table, majority, str(out_dir / f"{args.out_name}.png"))
  print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
  from hyena_jax import cpu_runtime  # pylint: disable=g-import-not-at-top
  cpu_runtime.configure()  # the CPU settings the command-line tools apply
  main()
