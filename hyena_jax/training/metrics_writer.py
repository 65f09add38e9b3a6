"""What a user sees of a run: JSONL metrics, TensorBoard events, and a PNG of the curves.

The workdir may be local or a gs:// URL (see `storage`); every file is written through it.
"""

from __future__ import annotations

import io
import json
import os
from typing import Mapping

import jax
import numpy as np
from absl import logging

from hyena_jax import storage


class MetricsWriter:
  """Appends `{"step": s, **metrics}` lines to WORKDIR/metrics.jsonl and TensorBoard events.

  Only process 0 writes. On resume, lines of steps after `resume_step` (written after the last
  checkpoint by the interrupted run) are dropped so the file reads as one uninterrupted run, and
  so is a partial last line (a kill while writing it). The file is rewritten atomically
  (`storage.write_atomically`), so a kill during the rewrite leaves the old file whole.
  Locally each row is appended; an object store has no append, so there the whole file is
  uploaded again with each row (one small object: a row per logged step).
  """

  def __init__(self, workdir: str, resume_step: int = 0):
    self.path = storage.resolve(workdir) / "metrics.jsonl"
    self.workdir = storage.resolve(workdir)
    self.enabled = jax.process_index() == 0
    self._tb = None
    self._text = ""  # an object store's file content (re-uploaded whole with each row)
    if not self.enabled:
      return
    if self.path.exists():
      text = self.path.read_text()
      kept = "".join(json.dumps(row) + "\n" for row in read_rows(self.path, text)
                     if row.get("step", 0) <= resume_step)
      if kept != text:
        storage.write_atomically(self.path, kept)
      self._text = kept
    try:
      from tensorboardX import SummaryWriter, record_writer
    except ImportError:  # TensorBoard output is optional; JSONL always works
      return
    if storage.is_url(self.workdir):
      record_writer.register_writer_factory(storage.scheme(self.workdir), _ObjectWriterFactory())
    self._tb = SummaryWriter(os.fspath(self.workdir / "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    row = json.dumps({"step": int(step), **{k: float(v) for k, v in metrics.items()}}) + "\n"
    if storage.is_url(self.path):
      self._text += row
      storage.write_atomically(self.path, self._text)
    else:
      with open(self.path, "a") as f:
        f.write(row)
    if self._tb is not None:
      for key, value in metrics.items():
        self._tb.add_scalar(key, float(value), int(step))

  def close(self, plot: bool = True, loss_label: str = "cross-entropy (nats/base)") -> None:
    """`loss_label` names the y axis of curves.png: what the logged `loss` measures."""
    if not self.enabled:
      return
    if self._tb is not None:
      tb, self._tb = self._tb, None
      try:
        tb.close()
      except OSError:
        # tensorboardX retries an unclosed writer at exit, with a traceback; its file is as
        # lost now as then (a full disk), so mark it closed and let the caller report once.
        for writer in tb.all_writers.values():
          writer.event_writer._closed = True  # pylint: disable=protected-access
        raise
    if plot:
      plot_curves(self.path, self.workdir / "curves.png", loss_label)


class _ObjectWriter:
  """A TensorBoard events file in an object store: kept in memory, uploaded whole at each flush
  (tensorboardX flushes every 2 minutes and on close). Replaces tensorboardX's own gs:// writer,
  which uploads again when garbage-collected, after close: at exit, and for minutes of retries
  when the network is gone."""

  def __init__(self, path: str):
    self.path = path
    self.buffer = io.BytesIO()

  def write(self, data: bytes) -> None:
    self.buffer.write(data)

  def flush(self) -> None:
    storage.write_atomically(self.path, self.buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _ObjectWriterFactory:
  """tensorboardX's record-writer factory interface, for URLs (see `_ObjectWriter`)."""

  def open(self, path: str) -> _ObjectWriter:
    return _ObjectWriter(path)

  def directory_check(self, path: str) -> None:
    del path  # object stores have no folders to create


def read_rows(path: storage.PathLike, text: str | None = None) -> list[dict]:
  """The JSON rows of a metrics.jsonl; a line that is not JSON (a partial last line left by a
  kill, or damage) is dropped with a warning instead of failing every later resume."""
  if text is None:
    text = storage.resolve(path).read_text()
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


def clipped_y_range(points: list[tuple[int, float]]) -> tuple[tuple[float, float] | None, str]:
  """(y limits, title) that keep an outlier from flattening the trend: the axis spans the bulk of
  the (step, loss) points (up to the 90th percentile, plus a margin); points above it are named
  in the title. (None, "") when nothing needs clipping."""
  values = np.array([v for _, v in points], np.float64)
  values = values[np.isfinite(values)]
  if values.size < 4:
    return None, ""
  low, high = np.percentile(values, [0, 90])
  pad = 0.15 * max(high - low, 1e-6)
  top = high + pad
  outside = [(step, v) for step, v in points if v > top]
  if not outside:
    return None, ""
  step, worst = max(outside, key=lambda point: point[1])
  return (low - pad, top), (f"y axis clipped at {top:.3g}; {len(outside)} point(s) above it, "
                            f"the highest {worst:.3g} at step {step}")


def plot_curves(metrics_path: storage.PathLike, out_path: storage.PathLike,
                loss_label: str = "cross-entropy (nats/base)") -> str:
  """Training and validation loss against step, from metrics.jsonl, as a PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = read_rows(metrics_path)
  train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
  valid = [(r["step"], r["valid_loss"]) for r in rows if "valid_loss" in r]
  fig, ax = plt.subplots(figsize=(7, 4))
  if train:  # markers too, so that a short run's few points show
    ax.plot(*zip(*train), ".-" if len(train) < 30 else "-", label="train loss")
  if valid:
    ax.plot(*zip(*valid), "o-", label="valid loss")
  ylim, title = clipped_y_range(train + valid)
  if ylim is not None:
    ax.set_ylim(*ylim)
  if title:
    ax.set_title(title, fontsize=9)
  ax.set_xlabel("step")
  ax.set_ylabel(loss_label)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=100)
  plt.close(fig)
  storage.write_atomically(out_path, png.getvalue())
  return os.fspath(out_path)
