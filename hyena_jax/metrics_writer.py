"""What a user sees of a run: JSONL metrics, TensorBoard events, and a PNG of the curves."""

from __future__ import annotations

import json
import os
from typing import Mapping

import jax
from absl import logging


class MetricsWriter:
  """Appends `{"step": s, **metrics}` lines to WORKDIR/metrics.jsonl and TensorBoard events.

  Only process 0 writes. On resume, lines of steps after `resume_step` (written after the last
  checkpoint by the interrupted run) are dropped so the file reads as one uninterrupted run, and
  so is a partial last line (a kill while writing it). The file is rewritten by writing a new one
  and renaming it over the old, so a kill during the rewrite leaves the old file whole.
  """

  def __init__(self, workdir: str, resume_step: int = 0):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.workdir = workdir
    self.enabled = jax.process_index() == 0
    self._tb = None
    if not self.enabled:
      return
    if os.path.exists(self.path):
      with open(self.path) as f:
        text = f.read()
      kept = "".join(json.dumps(row) + "\n" for row in read_rows(self.path, text)
                     if row.get("step", 0) <= resume_step)
      if kept != text:
        write_atomically(self.path, kept)
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:  # TensorBoard output is optional; JSONL always works
      self._tb = None

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in metrics.items()}}) + "\n")
    if self._tb is not None:
      for key, value in metrics.items():
        self._tb.add_scalar(key, float(value), int(step))

  def close(self, plot: bool = True, loss_label: str = "cross-entropy (nats/base)") -> None:
    """`loss_label` names the y axis of curves.png: what the logged `loss` measures."""
    if not self.enabled:
      return
    if self._tb is not None:
      self._tb.close()
    if plot:
      plot_curves(self.path, os.path.join(self.workdir, "curves.png"), loss_label)


def read_rows(path: str, text: str | None = None) -> list[dict]:
  """The JSON rows of a metrics.jsonl; a line that is not JSON (a partial last line left by a
  kill, or damage) is dropped with a warning instead of failing every later resume."""
  if text is None:
    with open(path) as f:
      text = f.read()
  lines = text.splitlines()
  rows = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    except ValueError:
      where = ("its partial last line (the run was killed while writing it)"
               if number == len(lines) else f"line {number}, which is not a JSON object")
      logging.warning("%s: dropping %s: %.80r", path, where, line)
      continue
    rows.append(row)
  return rows


def write_atomically(path: str, text: str) -> None:
  """Writes `text` to a temporary file beside `path`, then renames it over `path`: readers and a
  kill at any moment see either the old file or the new one, never a truncated one."""
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def plot_curves(metrics_path: str, out_path: str,
                loss_label: str = "cross-entropy (nats/base)") -> str:
  """Training and validation loss against step, from metrics.jsonl, as a PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = read_rows(metrics_path)
  train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
  valid = [(r["step"], r["valid_loss"]) for r in rows if "valid_loss" in r]
  fig, ax = plt.subplots(figsize=(7, 4))
  if train:
    ax.plot(*zip(*train), label="train loss")
  if valid:
    ax.plot(*zip(*valid), "o-", label="valid loss")
  ax.set_xlabel("step")
  ax.set_ylabel(loss_label)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out_path, dpi=100)
  plt.close(fig)
  return out_path
