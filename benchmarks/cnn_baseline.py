"""The GenomicBenchmarks paper's CNN baseline (Grešová et al. 2023), in Flax NNX.

Architecture as `genomic_benchmarks.models.torch.CNN`: an embedding of 100 dims, three blocks of
Conv1d(kernel 8, no padding) -> BatchNorm -> ReLU -> MaxPool(2) with 16, 8 and 4 channels, then
Flatten -> Linear(512) -> Linear(n_out) with no activation between the two linears. Trained as
their experiments: Adam (lr 1e-3, PyTorch defaults), batch 64, 10 epochs.

One deliberate difference: the original applies a sigmoid to its single output and then
`binary_cross_entropy_with_logits` to that probability (a sigmoid twice), and supports 2 classes
only. Here the head gives one logit per class and the loss is softmax cross-entropy, so that any
number of classes works and the loss is the intended one. The best epoch on the validation split
(by accuracy) is kept, as for the HyenaDNA arms.

    from cnn_baseline import train_cnn
    result = train_cnn(splits, n_classes=2, seed=0)   # splits as hyena_jax.finetune.load_splits
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from hyena_jax.data import labelled
from hyena_jax.data import tokenizer as tok
from hyena_jax.downstream import task_metrics


class CNN(nnx.Module):
  """token ids [B, L] -> logits [B, n_classes]."""

  def __init__(self, length: int, n_classes: int, *, rngs: nnx.Rngs, embedding_dim: int = 100,
               channels: tuple[int, ...] = (16, 8, 4), kernel: int = 8, hidden: int = 512):
    self.embed = nnx.Embed(tok.VOCAB_SIZE, embedding_dim, rngs=rngs)
    self.convs, self.norms = nnx.List(), nnx.List()
    width = embedding_dim
    for out in channels:
      self.convs.append(nnx.Conv(width, out, kernel_size=(kernel,), padding="VALID", rngs=rngs))
      self.norms.append(nnx.BatchNorm(out, momentum=0.9, epsilon=1e-5, rngs=rngs))
      width = out
      length = (length - kernel + 1) // 2
    if length < 1:
      raise ValueError("sequences too short for three conv + pool blocks")
    self.lin1 = nnx.Linear(length * width, hidden, rngs=rngs)
    self.lin2 = nnx.Linear(hidden, n_classes, rngs=rngs)

  def __call__(self, ids: jax.Array) -> jax.Array:
    x = self.embed(ids)                                        # [B, L, E]
    for conv, norm in zip(self.convs, self.norms):
      x = jax.nn.relu(norm(conv(x)))
      x = nnx.max_pool(x, window_shape=(2,), strides=(2,))     # floor(L / 2), as MaxPool1d(2)
    return self.lin2(self.lin1(x.reshape(x.shape[0], -1)))


def train_cnn(splits: dict[str, labelled.LabelledSplit], n_classes: int, seed: int, *,
              epochs: int = 10, batch_size: int = 64, learning_rate: float = 1e-3,
              metric: str = "accuracy") -> dict[str, Any]:
  """Trains on splits["train"], keeps the epoch best on splits["valid"] by `metric`, evaluates
  it on splits["test"]. Returns {"valid", "test" (task_metrics), "best_epoch", "epochs",
  "wall_seconds", "predictions"}."""
  start = time.perf_counter()
  train = splits["train"]
  model = CNN(train.inputs.shape[1], n_classes, rngs=nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, optax.adam(learning_rate), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, inputs, labels):
    def loss_fn(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(inputs), labels).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  @nnx.jit
  def logits(model, inputs):
    return model(inputs)

  def outputs(split):
    model.eval()
    out = [np.asarray(logits(model, split.inputs[i:i + 256]))
           for i in range(0, len(split), 256)]
    model.train()
    return np.concatenate(out)

  best = None
  for epoch in range(epochs):
    order = np.random.default_rng([seed, epoch]).permutation(len(train))
    for i in range(len(train) // batch_size):  # the last incomplete batch is dropped
      rows = order[i * batch_size:(i + 1) * batch_size]
      step(model, optimizer, jnp.asarray(train.inputs[rows]), jnp.asarray(train.labels[rows]))
    valid = task_metrics.task_metrics(outputs(splits["valid"]), splits["valid"].labels, n_classes)
    if best is None or valid[metric] > best[0][metric]:
      best = (valid, epoch + 1, jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model))))
  valid, best_epoch, saved = best
  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, saved)
  nnx.update(model, state)
  test_outputs = outputs(splits["test"])
  return {"valid": valid, "best_epoch": best_epoch, "epochs": epochs,
          "test": task_metrics.task_metrics(test_outputs, splits["test"].labels, n_classes),
          "predictions": {"test": task_metrics.prediction_summary(test_outputs, n_classes)},
          "wall_seconds": round(time.perf_counter() - start, 1)}
