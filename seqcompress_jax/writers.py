"""Run outputs: metrics as JSON lines (plus TensorBoard events when tensorboardX
is installed), and JSON files written atomically. Only process 0 writes."""

from __future__ import annotations

import json
import os
from typing import Any

import jax

from seqcompress_jax.files import atomic_write


def write_json(path: str, value: Any) -> None:
  """Writes `value` as indented JSON, atomically."""
  atomic_write(path, json.dumps(value, indent=2, sort_keys=True).encode())


class MetricWriter:
  """Appends {'step', 'split', **scalars} lines to workdir/metrics.jsonl."""

  def __init__(self, workdir: str):
    self._active = jax.process_index() == 0
    self._tb = None
    if not self._active:
      return
    os.makedirs(workdir, exist_ok=True)
    self._file = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
    try:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, 'tensorboard'))
    except ImportError:
      pass

  def write(self, step: int, split: str, scalars: dict[str, float]) -> None:
    if not self._active:
      return
    record = {'step': int(step), 'split': split,
              **{k: float(v) for k, v in scalars.items()}}
    self._file.write(json.dumps(record) + '\n')
    self._file.flush()
    if self._tb is not None:
      for name, value in scalars.items():
        tag = f"{split}/{name.replace('@', '_at_')}"  # TensorBoard rejects '@'.
        self._tb.add_scalar(tag, float(value), int(step))

  def close(self) -> None:
    if self._active:
      self._file.close()
      if self._tb is not None:
        self._tb.close()
