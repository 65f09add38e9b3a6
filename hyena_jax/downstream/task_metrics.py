"""Metrics of fine-tuning tasks, host side (numpy): accuracy, MCC, macro-F1 for classification,
MSE, Pearson, Spearman and R^2 for regression, and the constant-predictor check.

Classification: labels and predictions are int arrays [N]; outputs are logits [N, n_classes]
(regression: predictions [N, 1]).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, n_classes: int) -> np.ndarray:
  """C[i, j] = number of rows of true class i predicted as j; int64 [n_classes, n_classes]."""
  matrix = np.zeros((n_classes, n_classes), np.int64)
  np.add.at(matrix, (np.asarray(labels, np.int64), np.asarray(preds, np.int64)), 1)
  return matrix


def accuracy(labels: np.ndarray, preds: np.ndarray) -> float:
  return float(np.mean(np.asarray(labels) == np.asarray(preds)))


def mcc(labels: np.ndarray, preds: np.ndarray, n_classes: int) -> float:
  """Matthews correlation (multi-class form of Gorodkin 2004, as scikit-learn); 0 when undefined.

  (c s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2)(s^2 - sum_k t_k^2)), with c correct rows,
  s all rows, t_k rows of true class k and p_k rows predicted as k.
  """
  cm = confusion_matrix(labels, preds, n_classes).astype(np.float64)
  t, p, c, s = cm.sum(1), cm.sum(0), np.trace(cm), cm.sum()
  denom = np.sqrt((s * s - p @ p) * (s * s - t @ t))
  return float((c * s - p @ t) / denom) if denom > 0 else 0.0


def macro_f1(labels: np.ndarray, preds: np.ndarray, n_classes: int) -> float:
  """Unweighted mean of per-class F1 = 2TP / (2TP + FP + FN) over the classes that occur in
  labels or predictions (as scikit-learn's average='macro'); a class with no TP scores 0."""
  cm = confusion_matrix(labels, preds, n_classes).astype(np.float64)
  tp, fp, fn = np.diag(cm), cm.sum(0) - np.diag(cm), cm.sum(1) - np.diag(cm)
  present = (cm.sum(0) + cm.sum(1)) > 0
  f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=(2 * tp + fp + fn) > 0)
  return float(f1[present].mean())


def r2_score(targets: np.ndarray, preds: np.ndarray) -> float:
  """Coefficient of determination 1 - SS_res / SS_tot (0 when the targets are constant)."""
  targets, preds = np.asarray(targets, np.float64), np.asarray(preds, np.float64)
  ss_tot = np.sum((targets - targets.mean()) ** 2)
  return float(1.0 - np.sum((targets - preds) ** 2) / ss_tot) if ss_tot > 0 else 0.0


def task_metrics(outputs: np.ndarray, labels: np.ndarray, n_classes: int) -> dict[str, float]:
  """All metrics of the task family plus the loss. outputs: logits [N, n_classes] (regression:
  predictions [N, 1]); labels: int [N] (regression: float [N])."""
  outputs = np.asarray(outputs, np.float64)
  if n_classes == 1:
    from scipy import stats
    pred, target = outputs[:, 0], np.asarray(labels, np.float64)
    constant = np.ptp(pred) == 0 or np.ptp(target) == 0
    return {"loss": float(np.mean((pred - target) ** 2)),
            "pearson": 0.0 if constant else float(stats.pearsonr(pred, target)[0]),
            "spearman": 0.0 if constant else float(stats.spearmanr(pred, target)[0]),
            "r2": r2_score(target, pred)}
  labels = np.asarray(labels, np.int64)
  log_probs = outputs - np.logaddexp.reduce(outputs, axis=1, keepdims=True)
  preds = outputs.argmax(1)
  return {"loss": float(-log_probs[np.arange(len(labels)), labels].mean()),
          "accuracy": accuracy(labels, preds), "mcc": mcc(labels, preds, n_classes),
          "macro_f1": macro_f1(labels, preds, n_classes)}


def prediction_summary(outputs: np.ndarray, n_classes: int) -> dict[str, Any]:
  """How varied a split's predictions are, to catch a collapsed (constant) predictor.

  outputs: logits [N, n_classes] (regression: predictions [N, 1]). Classification: `constant`
  when every row gets the same argmax class; `logit_spread` is the largest range over rows of a
  logit relative to class 0's (for 2 classes, the range of logit_1 - logit_0). Regression:
  `constant` when the predictions' range is below 1e-6 of their scale.
  """
  outputs = np.asarray(outputs, np.float64)
  if n_classes == 1:
    pred = outputs[:, 0]
    spread = float(np.ptp(pred))
    return {"constant": bool(spread <= 1e-6 * max(1.0, float(np.abs(pred).max()))),
            "prediction_spread": spread}
  counts = np.bincount(outputs.argmax(1), minlength=n_classes)
  relative = outputs - outputs[:, :1]
  return {"constant": bool(np.count_nonzero(counts) == 1 and len(outputs) > 1),
          "predicted_class_counts": counts.tolist(),
          "logit_spread": float(np.ptp(relative, axis=0).max())}


def collapse_message(summary: dict[str, Any], split: str, step: int) -> str:
  """The warning for a constant predictor (prediction_summary(...)["constant"] is True)."""
  if "predicted_class_counts" in summary:
    counts = summary["predicted_class_counts"]
    what = (f"every one of its {sum(counts)} rows is predicted as class "
            f"{int(np.argmax(counts))} (logit spread {summary['logit_spread']:.2g})")
  else:
    what = f"prediction spread {summary['prediction_spread']:.2g}"
  return (f"collapsed to a constant predictor on {split} at step {step}: {what}. On small data "
          "start from a pretrained backbone (--config.pretrained), use the small_data recipe "
          "(--config=configs/finetune.py:TASK:small_data) or train longer")


def selection_score(metrics: dict[str, float], metric: str) -> float:
  """How a checkpoint (or a probe's L2) ranks by eval.metric, higher better: the metric itself,
  or minus the loss for metric = "loss"."""
  return -metrics["loss"] if metric == "loss" else metrics[metric]
