"""Fine-tuning and in-context learning: metrics, learning on real data, frozen parts stay
bitwise unchanged, the fine-tuned fixture classifier through the evaluation path, bad inputs."""

import glob
import json
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import shared_path
from hyena_jax.data import labelled
from hyena_jax.data import tokenizer as tok
from hyena_jax.downstream import (classifier, finetune, finetune_config, icl, linear_probe,
                                  task_metrics)
from hyena_jax.errors import InputError, OutputExistsError
from hyena_jax.model import config as config_lib
from hyena_jax.model.hyenadna import HyenaLM, SequenceClassifier
from hyena_jax.training import checkpoint as ckpt_lib
from hyena_jax.training import resume

TINY = dict(d_model=32, n_layer=2, d_inner=64, filter_order=16, l_max=256)


def _write_rows(path, rows):
  path.write_text("seq\tlabel\n" + "".join(f"{s}\t{label}\n" for s, label in rows))
  return str(path)


def _config(train, test, **train_fields):
  config = finetune_config.base_config()
  config.model.update(TINY)
  # The first 128 bases of each promoter: half the compute of the full 251.
  config.data.update(train=train, test=test, valid_fraction=0.0, max_length=128, truncate=True)
  config.train.update(batch_size=16, log_every_steps=1, **train_fields)
  config.eval.batch_size = 16
  config.optim.learning_rate = 3e-3
  config.mesh.data = 1
  return config


# ------------------------------------------------------------------------------------------------
# Metrics against hand-computed values


def test_metrics_match_hand_computed_values():
  labels, preds = np.array([0, 0, 1, 1, 1, 2]), np.array([0, 1, 1, 1, 0, 2])
  np.testing.assert_array_equal(task_metrics.confusion_matrix(labels, preds, 3),
                                [[1, 1, 0], [1, 2, 0], [0, 0, 1]])
  assert task_metrics.accuracy(labels, preds) == pytest.approx(4 / 6)
  # c = 4, s = 6, t = p = (2, 3, 1): (24 - 14) / sqrt((36 - 14)^2) = 10 / 22.
  assert task_metrics.mcc(labels, preds, 3) == pytest.approx(10 / 22)
  # F1 per class: 2/4, 4/6, 1.
  assert task_metrics.macro_f1(labels, preds, 3) == pytest.approx((0.5 + 4 / 6 + 1) / 3)
  # Binary: TP 2, FN 1, FP 1, TN 1 -> (2 - 1) / sqrt(3 * 3 * 2 * 2).
  assert task_metrics.mcc(np.array([1, 1, 1, 0, 0]), np.array([1, 0, 1, 0, 1]), 2) == \
      pytest.approx(1 / 6)
  assert task_metrics.mcc(np.array([0, 1, 1]), np.array([1, 1, 1]), 2) == 0.0  # undefined -> 0
  # A class absent from labels and predictions does not count (as scikit-learn).
  assert task_metrics.macro_f1(np.array([0, 1]), np.array([0, 0]), 3) == pytest.approx((2 / 3) / 2)
  out = task_metrics.task_metrics(np.array([[0.0, np.log(3.0)], [2.0, 0.0]]), np.array([1, 1]), 2)
  assert out["loss"] == pytest.approx((-np.log(0.75) - np.log(1 / (1 + np.e ** 2))) / 2)
  assert out["accuracy"] == 0.5
  reg = task_metrics.task_metrics(np.array([[1.0], [2.0], [4.0]]), np.array([1.0, 2.0, 3.0]), 1)
  assert reg["loss"] == pytest.approx(1 / 3)
  assert reg["r2"] == pytest.approx(0.5)
  assert reg["pearson"] == pytest.approx(9 / np.sqrt(84))
  assert reg["spearman"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------
# Fine-tuning


def test_early_stopping_after_patience_evaluations_without_improvement(tmp_path, promoters):
  train = _write_rows(tmp_path / "train.tsv", promoters[:64])
  test = _write_rows(tmp_path / "test.tsv", promoters[64:])
  config = _config(train, test, epochs=5, eval_every_steps=1, patience=2)
  results = finetune.finetune_and_evaluate(config, str(tmp_path / "run"))
  rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  accs = [r["valid_accuracy"] for r in rows if "valid_accuracy" in r]
  assert results["stopped_early"] and results["steps"] < 20
  # It stopped exactly `patience` evaluations after the best, which nothing later beat.
  assert results["steps"] == results["best_step"] + 2
  assert accs[results["best_step"] - 1] == max(accs) > max(accs[:results["best_step"] - 1] + [0])


def test_a_stopped_finetune_resumes_bitwise_and_a_finished_one_changes_nothing(tmp_path,
                                                                             promoters):
  train = _write_rows(tmp_path / "train.tsv", promoters[:64])
  test = _write_rows(tmp_path / "test.tsv", promoters[64:])
  # 4 steps per epoch, evaluated every 3: the stop at step 7 is mid-epoch and between evaluations.
  config = _config(train, test, epochs=3, eval_every_steps=3)
  config.model.embed_dropout = 0.1  # dropout keys must follow the step across the resume
  config.train.linear_probe = True  # the fitted head and its step-0 evaluation resume too
  whole = finetune.finetune_and_evaluate(config, str(tmp_path / "whole"))
  assert whole["linear_probe"]["l2"] in linear_probe.PROBE_L2
  workdir = str(tmp_path / "resumed")
  stopped = finetune.finetune_and_evaluate(config, workdir, stop_after_steps=7)
  assert stopped == {"status": "interrupted", "step": 7}
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  resumed = finetune.finetune_and_evaluate(config, workdir)
  assert resumed["status"] == whole["status"] == "finished" and resumed["resumed_at"] == [7]
  for key in ("test", "valid", "best_step", "steps", "constant_valid_steps", "warnings"):
    assert resumed[key] == whole[key], key
  untimed = lambda probe: {k: v for k, v in probe.items() if k != "seconds"}  # noqa: E731
  assert untimed(resumed["linear_probe"]) == untimed(whole["linear_probe"])
  read = lambda run: [json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")]
  assert read("resumed") == read("whole")  # no step twice, none missing
  assert [r["step"] for r in read("whole") if "valid_accuracy" in r] == [0, 3, 6, 9, 12]
  # Best = highest validation accuracy among non-constant predictors (earliest on ties).
  valid = [(r["step"], r["valid_accuracy"], r["valid_constant"]) for r in read("whole")
           if "valid_accuracy" in r]
  assert whole["best_step"] == max(valid, key=lambda v: (not v[2], v[1], -v[0]))[0]
  assert whole["rows"] == {"train": 64, "valid": 16, "test": 16}
  assert set(whole["test"]) == {"loss", "accuracy", "mcc", "macro_f1"}
  assert json.load(open(tmp_path / "whole" / "results.json"))["test"] == whole["test"]
  # The kept checkpoint is the best one, restorable as a classifier, and gave the test outputs.
  model, run_config, step = ckpt_lib.restore_model(str(tmp_path / "whole"), whole["best_step"])
  assert step == whole["best_step"] and ckpt_lib.head_of(run_config) == (2, "mean")
  split = labelled.read_split(test, max_length=128, n_classes=2, truncate=True)
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(split.inputs))),
                             np.load(tmp_path / "whole" / "test_outputs.npy"), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_array_equal(np.load(tmp_path / "resumed" / "test_outputs.npy"),
                                np.load(tmp_path / "whole" / "test_outputs.npy"))
  best = [ckpt_lib.restore_model(str(tmp_path / run), whole["best_step"])[0]
          for run in ("whole", "resumed")]
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(best[0], nnx.Param)),
               nnx.to_pure_dict(nnx.state(best[1], nnx.Param)))
  final = [ckpt_lib.read_json_item(os.path.join(tmp_path, run, resume.RESUME_SUBDIR), 12,
                                   "progress")["fingerprints"] for run in ("whole", "resumed")]
  assert final[0] == final[1]  # the last params and optimizer state, bit for bit
  # A finished run: rerunning it returns its results and writes nothing.
  mtimes = {p: os.path.getmtime(p) for p in glob.glob(f"{workdir}/**", recursive=True)}
  assert finetune.finetune_and_evaluate(config, workdir) == resumed
  assert {p: os.path.getmtime(p) for p in glob.glob(f"{workdir}/**", recursive=True)} == mtimes
  # Stopped between a best checkpoint and the resumable state (the resume/ folder gone): the
  # rerun starts over and ends as the uninterrupted run; another run's checkpoints are refused.
  window = str(tmp_path / "window")
  assert finetune.finetune_and_evaluate(config, window, stop_after_steps=4)["step"] == 4
  shutil.rmtree(os.path.join(window, resume.RESUME_SUBDIR))
  config.train.seed += 1
  with pytest.raises(OutputExistsError, match=r"checkpoints of another run \(train.seed was"):
    finetune.finetune_and_evaluate(config, window)
  config.train.seed -= 1
  restarted = finetune.finetune_and_evaluate(config, window)
  assert restarted["test"] == whole["test"] and restarted["resumed_at"] == []
  config.optim.learning_rate = 1e-3
  with pytest.raises(InputError, match="optim.learning_rate was 0.003"):
    finetune.finetune_and_evaluate(config, workdir)


def test_sigterm_saves_the_state_and_the_rerun_finishes(tmp_path, promoters, monkeypatch):
  train = _write_rows(tmp_path / "train.tsv", promoters[:64])
  test = _write_rows(tmp_path / "test.tsv", promoters[64:])
  config = _config(train, test, epochs=1)
  write = finetune.metrics_writer.MetricsWriter.write

  def write_then_signal(self, step, metrics):  # the signal lands in the middle of step 2's logging
    write(self, step, metrics)
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(finetune.metrics_writer.MetricsWriter, "write", write_then_signal)
  workdir = str(tmp_path / "run")
  assert finetune.finetune_and_evaluate(config, workdir) == {
      "status": "interrupted", "step": 2, "signal": "SIGTERM"}
  monkeypatch.undo()
  resumed = finetune.finetune_and_evaluate(config, workdir)
  assert resumed["status"] == "finished" and resumed["resumed_at"] == [2] and resumed["steps"] == 4


def test_recommended_recipe_keeps_what_the_linear_probe_has_on_real_data(tmp_path):
  """The small_data recipe (LP-FT) from the trained tiny-1k backbone on 600 real rows of
  human_nontata_promoters (bench_finetune's default subset and split: 432 train / 48 valid /
  120 test), 3 epochs = 39 steps, against the linear probe alone on the same split: not worse
  by more than 3 of the 120 test rows, and at least 10 points over the majority class."""
  weights = shared_path("parity", "tiny1k_classifier", "weights.pt")
  path = shared_path("data", "genomic_benchmarks", "human_nontata_promoters.test.tsv")
  lines = path.read_text().splitlines()[1:]
  picked = [lines[i] for i in np.random.default_rng(0).permutation(len(lines))[:600]]
  train = tmp_path / "train.tsv"
  train.write_text("".join(line + "\n" for line in picked))
  config = finetune_config.task_config("human_nontata_promoters", max_length=251, n_classes=2,
                                       metric="accuracy", recipe="small_data")
  assert config.train.linear_probe
  config.pretrained = str(weights)
  config.data.update(train=str(train), test_fraction=0.2, valid_fraction=0.1, split_seed=0)
  config.train.update(seed=0, log_every_steps=13)
  config.eval.batch_size = 40
  config.mesh.data = 1
  results = finetune.finetune_and_evaluate(config, str(tmp_path / "run"))
  probe = results["linear_probe"]  # the probe alone, on the same split (reported, not chosen)
  labels = labelled.load_splits(config)["test"].labels
  majority = np.bincount(labels).max() / len(labels)
  assert results["rows"] == {"train": 432, "valid": 48, "test": 120}
  assert results["steps"] == 39 and "backbone of" in results["init"]
  assert not results["collapsed"] and not results["warnings"]
  assert results["test"]["accuracy"] >= probe["test"]["accuracy"] - 3 / 120, (results, probe)
  assert results["test"]["accuracy"] >= majority + 0.10, (results["test"], majority)
  if results["best_step"] == 0:  # the probe kept: the same head, so the same test metrics
    assert results["test"] == pytest.approx(probe["test"], abs=1e-6)


def test_mean_nonpad_pooling_averages_only_the_sequence_own_positions():
  """Left-padded rows of 5, 12 and 16 bases: "mean_nonpad" is the mean of the final hidden states
  over each row's own positions; "mean" (official) averages the [PAD] positions too."""
  cfg = config_lib.from_dict(TINY)
  model = SequenceClassifier(cfg, 2, pooling="mean_nonpad", rngs=nnx.Rngs(0))
  model.eval()
  lengths, width = (5, 12, 16), 16
  rng = np.random.default_rng(0)
  ids = np.full((3, width), tok.PAD, np.int32)
  for row, n in enumerate(lengths):
    ids[row, width - n:] = rng.choice([tok.A, tok.C, tok.G, tok.T], n)
  hidden = np.asarray(model.backbone(jnp.asarray(ids)).hidden, np.float64)
  by_hand = np.stack([hidden[row, width - n:].mean(0) for row, n in enumerate(lengths)])
  np.testing.assert_allclose(np.asarray(model.features(jnp.asarray(ids))), by_hand,
                             rtol=1e-5, atol=1e-6)
  kernel = np.asarray(model.output_transform.kernel[...], np.float64)
  bias = np.asarray(model.output_transform.bias[...], np.float64)
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), by_hand @ kernel + bias,
                             rtol=1e-5, atol=1e-6)
  model.pooling = "mean"
  official = np.asarray(model.features(jnp.asarray(ids)))
  np.testing.assert_allclose(official[2], by_hand[2], rtol=1e-5, atol=1e-6)  # no padding
  assert np.abs(official[:2] - by_hand[:2]).max() > 1e-3  # padding counted
  config = finetune_config.base_config()
  config.head.pooling = "max"
  with pytest.raises(InputError, match="head.pooling='max'"):
    finetune_config.validate_config(config, 1)


def test_linear_probe_fits_the_head_to_raw_features():
  """Three separable classes in features with a large offset and scale: the probe standardises
  for the fit and folds the scaling back, so its head applies to the raw features and equals
  the standardised fit; the validation split picks the L2 strength; ridge for regression."""
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(3, 8)) * 3.0
  labels = rng.integers(0, 3, 600)
  raw = 50.0 + 10.0 * (centres[labels] + rng.normal(size=(600, 8)))
  head, report = linear_probe.fit_probe({"train": raw[:400], "valid": raw[400:500]},
                                        {"train": labels[:400], "valid": labels[400:500]}, 3,
                                        "accuracy")
  assert head["kernel"].shape == (8, 3) and head["bias"].shape == (3,)
  assert report["l2"] in linear_probe.PROBE_L2 and set(report["valid_accuracy_by_l2"]) == {
      f"{l2:g}" for l2 in linear_probe.PROBE_L2}
  held_out = raw[500:] @ head["kernel"] + head["bias"]
  assert (held_out.argmax(1) == labels[500:]).mean() > 0.95
  mean, scale = raw[:400].mean(0), raw[:400].std(0)
  kernel, bias = linear_probe.fit_linear_head((raw[:400] - mean) / scale, labels[:400], 3,
                                          report["l2"])
  np.testing.assert_allclose(held_out, ((raw[500:] - mean) / scale) @ kernel + bias,
                             rtol=1e-4, atol=1e-3)
  targets = raw[:, :3] @ np.array([0.5, -1.0, 2.0]) + 7.0
  kernel, bias = linear_probe.fit_linear_head((raw - raw.mean(0)) / raw.std(0), targets, 1, 1e-6)
  predictions = ((raw - raw.mean(0)) / raw.std(0)) @ kernel[:, 0] + bias[0]
  np.testing.assert_allclose(predictions, targets, rtol=1e-5, atol=1e-4)


def test_collapse_detector_warns_in_the_log_and_results(tmp_path, caplog):
  """Identical sequences with mixed labels: any model predicts one class for every row, so every
  validation evaluation is a constant predictor, deterministically."""
  rows = [("ACGTTGCA" * 4, i % 2) for i in range(40)]
  data = _write_rows(tmp_path / "same.tsv", rows)
  config = _config(data, "", epochs=2)
  config.data.update(max_length=32, valid_fraction=0.25)  # 24 train / 8 valid / 8 test rows
  config.train.batch_size = 8
  config.train.log_every_steps = 10
  with caplog.at_level("INFO"):
    results = finetune.finetune_and_evaluate(config, str(tmp_path / "run"))
  progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
  # Progress shows from the first step on (log_every_steps=10 > 6 steps), then with an ETA.
  assert "the first step includes compiling it" in progress[0] and "step 1/6" in progress[0]
  assert any("step 6/6" in m and "ETA 0 s" in m for m in progress), progress
  logged = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert any("collapsed to a constant predictor on validation" in m for m in logged), logged
  saved = json.load(open(tmp_path / "run" / "results.json"))
  assert saved["collapsed"] is results["collapsed"] is True
  assert saved["collapsed"] and saved["predictions"]["valid"]["constant"]
  assert saved["collapsed_on_test"] and saved["predictions"]["test"]["constant"]
  assert saved["constant_valid_steps"] == [3, 6]  # one evaluation per epoch
  assert any("constant predictor" in w for w in saved["warnings"])
  assert sum(saved["predictions"]["valid"]["predicted_class_counts"]) == 8
  # The summary itself: constant only when one class takes every row.
  varied = task_metrics.prediction_summary(np.array([[0.0, 1.0], [1.0, 0.0]]), 2)
  assert not varied["constant"] and varied["logit_spread"] == pytest.approx(2.0)
  assert task_metrics.prediction_summary(np.array([[0.0, 1.0], [0.0, 1.5]]), 2)["constant"]
  assert task_metrics.prediction_summary(np.array([[2.0], [2.0]]), 1)["constant"]


def test_frozen_backbone_leaves_the_backbone_bitwise_unchanged(tmp_path, promoters):
  config = _config("", "", epochs=1)
  config.train.freeze_backbone = True
  model, _ = classifier.build_classifier(config)
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(params)
  frozen = classifier.frozen_mask(params, True)
  tx, schedule = classifier.optimizer_and_schedule(config, 3, frozen)
  step = jax.jit(classifier.make_train_step(graphdef, tx, schedule,
                                            classifier.classification_loss, seed=0,
                                            frozen=frozen))
  inputs = tok.CharacterTokenizer().encode_batch([r[0] for r in promoters[:16]], 128,
                                                 add_eos=False, truncate=True)
  batch = {"inputs": inputs, "labels": np.array([int(r[1]) for r in promoters[:16]], np.int32)}
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
  for _ in range(3):
    state, metrics = step(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  for a, b in zip(jax.tree.leaves(params["backbone"]),
                  jax.tree.leaves(state["params"]["backbone"])):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(params["output_transform"]["kernel"],
                            state["params"]["output_transform"]["kernel"])


def test_fixture_classifier_through_the_evaluation_path(tmp_path):
  folder = shared_path("parity", "tiny1k_classifier")
  seqs = (folder / "sequences.txt").read_text().split()
  data = _write_rows(tmp_path / "fixture.tsv", [(s, 1) for s in seqs])  # 8 enhancer sequences
  split = labelled.read_split(data, max_length=512, n_classes=2)
  np.testing.assert_array_equal(split.inputs, np.load(folder / "tokens.npy"))
  config = finetune_config.base_config()
  config.pretrained = str(folder / "weights.pt")
  config.keep_pretrained_head = True
  config.data.update(train=data, test=data, valid_fraction=0.0, max_length=512)
  config.train.update(epochs=0, batch_size=8)
  config.eval.batch_size = 8
  config.mesh.data = 1
  results = finetune.finetune_and_evaluate(config, str(tmp_path / "eval"))
  np.testing.assert_allclose(np.load(tmp_path / "eval" / "test_outputs.npy"),
                             np.load(folder / "class_logits.npy"), rtol=1e-4, atol=1e-4)
  assert results["steps"] == 0 and "with its head" in results["init"]
  # A head of another size cannot be kept.
  config.keep_pretrained_head = True
  config.head.n_classes = 3
  with pytest.raises(ValueError, match="2-class head"):
    classifier.build_classifier(config)


def test_bad_inputs_raise_clear_errors(tmp_path, promoters):
  seq = promoters[0][0]
  cases = [(f"{seq}\t1\n{seq}\t\n", r"bad\.tsv:2: label '' is not an integer"),
           (f"{seq}\t1\n{seq}\tx\n", r"bad\.tsv:2: label 'x'"),
           (f"{seq}\t0\n{seq}\t2\n", r"bad\.tsv:2: label 2 is not a class id"),
           (f"{seq}\t0\n{seq}A\t1\n", r"bad\.tsv:2: sequence of 252 bases exceeds"),
           ("seq\tlabel\n", "no labelled sequences"),
           (f"{seq[:10]}-\t0\n", "invalid character")]
  for text, message in cases:
    (tmp_path / "bad.tsv").write_text(text)
    with pytest.raises(ValueError, match=message):
      labelled.read_split(str(tmp_path / "bad.tsv"), max_length=251, n_classes=2)
  (tmp_path / "bad.tsv").write_text(f"{seq}A\t1\n")
  cut = labelled.read_split(str(tmp_path / "bad.tsv"), max_length=251, n_classes=2,
                            truncate=True)
  assert cut.inputs.shape == (1, 251)
  (tmp_path / "x.fa").write_text(f">a\n{seq}\n")
  with pytest.raises(ValueError, match="is FASTA: give its labels"):
    labelled.read_split(str(tmp_path / "x.fa"), max_length=251, n_classes=2)
  (tmp_path / "x.labels").write_text("b\t1\n")
  with pytest.raises(ValueError, match=r"x\.fa:1: record 'a' has no label"):
    labelled.read_split(str(tmp_path / "x.fa"), str(tmp_path / "x.labels"), max_length=251,
                        n_classes=2)
  with pytest.raises(ValueError, match="no data file given"):
    labelled.read_split("", max_length=251, n_classes=2)
  config = _config("", "")
  config.eval.metric = "r2"
  with pytest.raises(ValueError, match="does not suit classification"):
    finetune_config.validate_config(config, 1)
  (tmp_path / "one.tsv").write_text("".join(f"{s}\t1\n" for s, _ in promoters[:20]))
  config = _config(str(tmp_path / "one.tsv"), "")
  with pytest.raises(InputError, match=r"one\.tsv hold one class only \(label 1, 16 rows\)"):
    finetune.finetune_and_evaluate(config, str(tmp_path / "one_class_run"))
  assert not (tmp_path / "one_class_run").exists()


def test_regression_targets_are_read_as_floats(tmp_path, promoters):
  seq = promoters[0][0]
  (tmp_path / "r.csv").write_text(f"sequence,label\n{seq},0.5\n{seq},-1.25\n")
  split = labelled.read_split(str(tmp_path / "r.csv"), max_length=251, n_classes=1)
  assert split.labels.dtype == np.float32 and split.labels.tolist() == [0.5, -1.25]
  (tmp_path / "r.csv").write_text(f"{seq},0.5\n{seq},abc\n")
  with pytest.raises(ValueError, match=r"r\.csv:2: label 'abc' is not a number"):
    labelled.read_split(str(tmp_path / "r.csv"), max_length=251, n_classes=1)
  loss = classifier.regression_loss(jnp.array([[1.0], [2.0]]), jnp.array([0.0, 0.0]))
  assert float(loss) == pytest.approx(2.5)


# ------------------------------------------------------------------------------------------------
# In-context learning


def test_context_format_places_labels_after_sep():
  labels = icl.label_tokens(2)
  np.testing.assert_array_equal(labels, [tok.A, tok.N])
  np.testing.assert_array_equal(icl.label_tokens(3), [tok.A, tok.G, tok.N])
  ctx = icl.build_context(np.array([4, 7, 8]), 0,
                          [(np.array([4, 9, 10]), 0), (np.array([11, 7, 7]), 1)], labels)
  np.testing.assert_array_equal(ctx["inputs"], [4, 9, 10, 1, 7, 1, 11, 7, 7, 1, 11, 1, 4, 7, 8, 1])
  assert np.flatnonzero(ctx["mask"]).tolist() == [3, 9, 15]
  assert ctx["targets"][[3, 9, 15]].tolist() == [7, 11, 7]
  assert len(ctx["inputs"]) == icl.context_length(3, 2, 1)
  with pytest.raises(ValueError, match="2 or 3 classes"):
    icl.label_tokens(4)


def _icl_config(train, test, mode):
  config = finetune_config.icl_config()
  config.model.update(TINY)
  config.data.update(train=train, test=test, valid_fraction=0.0, max_length=24, truncate=True)
  config.icl.update(mode=mode, n_soft=4, shots=1, batch_size=2, grad_accum=2)
  config.train.update(epochs=1, log_every_steps=4)
  return config


def test_soft_prompting_changes_only_the_prompt(tmp_path, promoters):
  train = _write_rows(tmp_path / "train.tsv", promoters[:16])
  test = _write_rows(tmp_path / "test.tsv", promoters[64:72])
  config = _icl_config(train, test, "soft_prompt")
  splits = labelled.load_splits(config)
  contexts = icl.make_contexts(splits["train"], splits["train"], n_classes=2, shots=1, seed=0,
                               pool_is_queries=True)
  assert contexts["inputs"].shape == (16, icl.context_length(24, 2, 1))
  lm = HyenaLM(config_lib.from_dict(config.model.to_dict()), rngs=nnx.Rngs(0))
  lm.train()
  graphdef, lm_params = nnx.split(lm, nnx.Param)
  prompt = icl.SoftPrompt(4, 32, rngs=nnx.Rngs(1))
  params = {"lm": nnx.to_pure_dict(lm_params), "prompt": nnx.to_pure_dict(nnx.state(prompt))}
  trainable, fixed = icl.split_params(params, "soft_prompt")
  assert set(trainable) == {"prompt"} and set(fixed) == {"lm"}
  tx = optax.adamw(1e-2, weight_decay=0.0)
  state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "fixed": fixed,
           "opt_state": tx.init(trainable)}
  step = jax.jit(icl.make_train_step(graphdef, tx, seed=0))
  for i in range(3):
    state, _ = step(state, {k: v[2 * i:2 * i + 2] for k, v in contexts.items()})
  for a, b in zip(jax.tree.leaves(params["lm"]), jax.tree.leaves(state["fixed"]["lm"])):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(params["prompt"]["embedding"],
                            state["trainable"]["prompt"]["embedding"])


def test_instruction_tuning_end_to_end(tmp_path, promoters, caplog):
  train = _write_rows(tmp_path / "train.tsv", promoters[:16])
  test = _write_rows(tmp_path / "test.tsv", promoters[64:72])
  config = _icl_config(train, test, "instruction")
  config.icl.train_examples = 8
  with caplog.at_level("INFO"):
    results = icl.icl_and_evaluate(config, str(tmp_path / "run"))
  assert results["tuning_rows"] == 8 and results["n_soft"] == 0
  # Progress as finetune's: row counts, then micro-steps out of the total with an ETA.
  logged = [r.getMessage() for r in caplog.records]
  per_epoch = 8 // config.icl.batch_size
  total = per_epoch * config.train.epochs
  assert any(m.startswith("rows: tuning 8 / valid ") and f": {total} micro-steps" in m
             for m in logged), logged
  progress = [m for m in logged if m.startswith("micro-step ")]
  assert progress[0].startswith(f"micro-step 1/{total} ") and "includes compiling" in progress[0]
  assert progress[-1].startswith(f"micro-step {total}/{total} ") and "ETA 0 s" in progress[-1]
  for split in ("before", "after"):
    assert 0.0 <= results[split]["test"]["accuracy"] <= 1.0
    assert np.isfinite(results[split]["test"]["label_loss"])
  tuned, _, _ = ckpt_lib.restore_model(str(tmp_path / "run"))
  init = HyenaLM(config_lib.from_dict(config.model.to_dict()),
                 rngs=nnx.Rngs(params=config.train.seed))
  changed = [not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(nnx.state(init, nnx.Param)),
                 jax.tree.leaves(nnx.state(tuned, nnx.Param)))]
  assert all(changed)  # every weight is tuned
