"""Fine-tuning configs of the benchmark tasks: one table, one row per task.

Pick a task (and optionally a recipe) after a colon:
  python -m hyena_jax.finetune --config=configs/finetune.py:TASK[:RECIPE] --workdir=DIR \
      --config.data.train=train.tsv --config.data.test=test.tsv [--model=PRETRAINED]
RECIPE is "official" (default; SPEC 6.1: mean pooling, AdamW 6e-4, batch 128, 100 epochs, 1%
warm-up; a GPU recipe) or "small_data" (CPUs and up to a few thousand rows: a linear probe,
then fine-tuning at batch 32, AdamW 5e-4, 3 epochs, best validation loss;
finetune_config.small_data). `python -m hyena_jax.finetune --config=configs/finetune.py:TASK
--print_config` prints every field. ICL configs are configs/icl.py.

Data: each task's train/test split as TSV `seq<TAB>label`.

GenomicBenchmarks (model tiny-1k: d_model 128, 2 layers; metric accuracy; pretrained weights
hyenadna-tiny-1k-seqlen). 1 GPU: minutes; CPU: hours at the official recipe. The paper's Table A.4
(tiny-1k, official splits, 100 epochs) and what small_data reaches on CPU are in README's
"Fine-tuning" table (benchmarks/bench_finetune.py --full).
  * human_enhancers_cohn (all 500 bp), human_nontata_promoters (all 251 bp).
  * demo_coding_vs_intergenomic_seqs, demo_human_or_worm (all 200 bp).
  * human_enhancers_ensembl (median 269 bp, longest 573), human_ocr_ensembl (median 315,
    longest 593), human_ensembl_regulatory (3 classes; median 401, longest 802).
  * dummy_mouse_enhancers_ensembl (median 2381 bp, longest 4707): longer than tiny-1k's context,
    so the config sizes a from-scratch model for it (model.l_max 4709); with a 1k pretrained
    model pass --config.data.max_length=1024 --config.data.truncate=True.

Nucleotide Transformer benchmark (model tiny-1k-d256: d_model 256, 2 layers; pretrained weights
hyenadna-tiny-1k-seqlen-d256; task names prefixed nt_). The paper's per-task launch settings are
not public; expect roughly the paper's NT table. Metric mcc for the histone marks (H3, H3K14ac,
H3K36me3, H3K4me1, H3K4me2, H3K4me3, H3K79me3, H3K9ac, H4, H4ac; up to 500 bp) and enhancers /
enhancers_types (up to 200 bp; the latter 3 classes); macro_f1 for promoter_all /
promoter_no_tata / promoter_tata (up to 300 bp) and splice_sites_acceptors / _donors (up to
600 bp).
"""

import difflib

from hyena_jax import errors
from hyena_jax.downstream import finetune_config

_GB = dict(n_classes=2, metric="accuracy", model="tiny-1k")
_NT = dict(n_classes=2, metric="mcc", model="tiny-1k-d256")
_NT_F1 = dict(_NT, metric="macro_f1")

# task -> task_config keyword arguments (plus "l_max" to override model.l_max).
TASKS = {
    # GenomicBenchmarks
    "demo_coding_vs_intergenomic_seqs": dict(_GB, max_length=200),
    "demo_human_or_worm": dict(_GB, max_length=200),
    "dummy_mouse_enhancers_ensembl": dict(_GB, max_length=4707, l_max=4709),
    "human_enhancers_cohn": dict(_GB, max_length=500),
    "human_enhancers_ensembl": dict(_GB, max_length=573),
    "human_ensembl_regulatory": dict(_GB, max_length=802, n_classes=3),
    "human_nontata_promoters": dict(_GB, max_length=251),
    "human_ocr_ensembl": dict(_GB, max_length=593),
    # Nucleotide Transformer benchmark
    "nt_H3": dict(_NT, max_length=500),
    "nt_H3K14ac": dict(_NT, max_length=500),
    "nt_H3K36me3": dict(_NT, max_length=500),
    "nt_H3K4me1": dict(_NT, max_length=500),
    "nt_H3K4me2": dict(_NT, max_length=500),
    "nt_H3K4me3": dict(_NT, max_length=500),
    "nt_H3K79me3": dict(_NT, max_length=500),
    "nt_H3K9ac": dict(_NT, max_length=500),
    "nt_H4": dict(_NT, max_length=500),
    "nt_H4ac": dict(_NT, max_length=500),
    "nt_enhancers": dict(_NT, max_length=200),
    "nt_enhancers_types": dict(_NT, max_length=200, n_classes=3),
    "nt_promoter_all": dict(_NT_F1, max_length=300),
    "nt_promoter_no_tata": dict(_NT_F1, max_length=300),
    "nt_promoter_tata": dict(_NT_F1, max_length=300),
    "nt_splice_sites_acceptors": dict(_NT_F1, max_length=600),
    "nt_splice_sites_donors": dict(_NT_F1, max_length=600),
}


def get_config(arg: str = ""):
  """The config of `arg` = "TASK" or "TASK:RECIPE" (recipe "official" unless given)."""
  task, _, recipe = arg.partition(":")
  if task not in TASKS:
    guess = difflib.get_close_matches(task, list(TASKS), n=1, cutoff=0.6)
    hint = f" (did you mean {guess[0]}?)" if guess else ""
    what = f"unknown fine-tuning task {task!r}{hint}" if task else "no fine-tuning task given"
    raise errors.InputError(
        f"{what}: pick one with --config=configs/finetune.py:TASK[:small_data]; tasks: "
        f"{', '.join(TASKS)}")
  kwargs = dict(TASKS[task])
  l_max = kwargs.pop("l_max", None)
  config = finetune_config.task_config(task, recipe=recipe or "official", **kwargs)
  if l_max is not None:
    config.model.l_max = l_max
  return config
