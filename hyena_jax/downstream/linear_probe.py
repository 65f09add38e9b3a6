"""The linear probe: a classification (or regression) head fitted to frozen pooled features, the
first stage of LP-FT (Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features").

Host side, float64, deterministic: L-BFGS on L2-regularised cross-entropy (ridge in closed form
for regression), on features standardised by the training rows, with the scaling folded back so
that the head applies to the raw features.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hyena_jax.downstream import task_metrics

PROBE_L2 = (1.0, 1e-1, 1e-2, 1e-3, 1e-4)  # tried strongest first: a tie keeps the stronger one


def fit_linear_head(features: np.ndarray, labels: np.ndarray, n_classes: int, l2: float
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Head (kernel [d, C], bias [C]) minimising mean cross-entropy + l2/2 |kernel|^2 over
  features [N, d] (standardise them first), by L-BFGS; regression (n_classes = 1): ridge in
  closed form. Deterministic."""
  from scipy import optimize
  x = np.asarray(features, np.float64)
  n, d = x.shape
  if n_classes == 1:
    y = np.asarray(labels, np.float64)
    kernel = np.linalg.solve(x.T @ x / n + l2 * np.eye(d), x.T @ (y - y.mean()) / n)
    return kernel[:, None], np.array([y.mean()])
  onehot = np.eye(n_classes)[np.asarray(labels, np.int64)]

  def loss_and_grad(flat):
    kernel, bias = flat[:d * n_classes].reshape(d, n_classes), flat[d * n_classes:]
    logits = x @ kernel + bias
    logits -= logits.max(1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    residual = (np.exp(log_probs) - onehot) / n
    loss = -(onehot * log_probs).sum() / n + 0.5 * l2 * (kernel ** 2).sum()
    return loss, np.concatenate([(x.T @ residual + l2 * kernel).ravel(), residual.sum(0)])

  solution = optimize.minimize(loss_and_grad, np.zeros(d * n_classes + n_classes), jac=True,
                               method="L-BFGS-B", options={"maxiter": 1000})
  return (solution.x[:d * n_classes].reshape(d, n_classes), solution.x[d * n_classes:])


def fit_probe(features: dict[str, np.ndarray], labels: dict[str, np.ndarray],
                 n_classes: int, metric: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """The head fitted on features["train"] [N, d] with the L2 strength of PROBE_L2 that scores
  best on features["valid"] by `metric` (a task metric, or "loss": the smallest). Features are standardised by the training rows' mean
  and sd for the fit, and the scaling is folded back into the head, which therefore applies to
  the raw pooled features. Returns ({"kernel": [d, C], "bias": [C]} float32, report)."""
  mean = features["train"].mean(0, dtype=np.float64)
  scale = np.maximum(features["train"].std(0, dtype=np.float64), 1e-6)
  standard = lambda x: (np.asarray(x, np.float64) - mean) / scale  # noqa: E731
  best, scores = None, {}
  for l2 in PROBE_L2:
    kernel, bias = fit_linear_head(standard(features["train"]), labels["train"],
                                   n_classes, l2)
    kernel, bias = kernel / scale[:, None], bias - (mean / scale) @ kernel
    valid = task_metrics.task_metrics(features["valid"] @ kernel + bias, labels["valid"],
                                      n_classes)
    score = task_metrics.selection_score(valid, metric)
    scores[f"{l2:g}"] = valid[metric]
    if best is None or score > best[0]:
      best = (score, l2, kernel, bias)
  _, l2, kernel, bias = best
  head = {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32)}
  return head, {"l2": l2, f"valid_{metric}_by_l2": scores}
