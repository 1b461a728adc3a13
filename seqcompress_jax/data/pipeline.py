"""Prepared dataset -> fixed-shape numpy batches.

Training uses every position of a window (teacher forcing): a window holds
max_len + 1 items, `inputs` are its first max_len and `targets` its last
max_len (see `split_window`). A history longer than a window is cut, from its
end backwards, into windows `stride` items apart; the earliest may be short and
is left-padded with PAD (0). Each training target is predicted once: where
windows overlap (stride < max_len), the earliest window that holds a target
trains it, where it has the most context.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from seqcompress_jax.data.dataset import PAD, Dataset
from seqcompress_jax.data.interactions import DataError


def last_items(ds: Dataset, users: np.ndarray, ends: np.ndarray,
               length: int) -> np.ndarray:
  """int32 [N, length]: items[ends - length : ends] of each user's sequence,
  left-padded with PAD where the sequence starts later."""
  starts = ds.offsets[users]
  index = (starts + ends)[:, None] + np.arange(-length, 0)[None, :]
  valid = index >= starts[:, None]
  return np.where(valid, ds.items[np.where(valid, index, 0)], PAD).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Windows:
  """Training windows: `items` int32 [N, max_len + 1], and `first` int32 [N],
  the first target position each window trains (the earlier ones are trained
  by an earlier window of the same user, with more context)."""

  items: np.ndarray
  first: np.ndarray

  def __len__(self) -> int:
    return len(self.items)

  def batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The inputs and targets of windows `rows` (see `split_window`)."""
    return split_window(self.items[rows], self.first[rows])


def train_windows(ds: Dataset, max_len: int, stride: int = 0) -> Windows:
  """Windows ending every `stride` items back from each user's last training
  item (0 = max_len), as many as it takes to reach the first item; every
  training target is trained once, each in the earliest window holding it.

  A smaller stride gives every target at least max_len - stride + 1 items of
  context (where the history has them), at up to max_len / stride times the
  windows per epoch (fewer where histories are short).
  """
  stride = stride or max_len
  users = np.flatnonzero(ds.train_len >= 2)
  n = ds.train_len[users]
  # Window k (0 = latest) ends at item n - k * stride; the earliest must start
  # at item 1 or before (item 0 is never a target).
  per_user = 1 + -(np.maximum(n - 1 - max_len, 0) // -stride)
  k = np.arange(per_user.sum()) - np.repeat(np.cumsum(per_user) - per_user, per_user)
  ends = np.repeat(n, per_user) - k * stride
  earliest = k == np.repeat(per_user, per_user) - 1
  first = np.where(earliest, 0, max_len - stride).astype(np.int32)
  return Windows(last_items(ds, np.repeat(users, per_user), ends, max_len + 1), first)


def split_window(window: np.ndarray, first: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """inputs = window[:, :-1], targets = window[:, 1:], except that a target
  whose input is PAD is PAD too (a user's first item is never predicted from
  nothing), as are the targets before position `first` [N] of each row: so
  `targets != PAD` is the whole loss mask."""
  inputs = window[:, :-1]
  drop = inputs == PAD
  if first is not None:
    drop |= np.arange(inputs.shape[1]) < first[:, None]
  return {'inputs': inputs, 'targets': np.where(drop, PAD, window[:, 1:])}


@dataclasses.dataclass(frozen=True)
class EvalSet:
  """Evaluation examples: the last max_len items before each target."""

  inputs: np.ndarray  # int32 [N, max_len]
  targets: np.ndarray  # int32 [N]
  users: np.ndarray  # int64 [N]
  history: np.ndarray | None  # int32 [N, history_len]: items to exclude, or None

  def __len__(self) -> int:
    return len(self.targets)


def eval_set(ds: Dataset, split: str, max_len: int, history_len: int = 0) -> EvalSet:
  """The 'valid' or 'test' examples; `history_len` > 0 adds that many of the
  most recent items before each target (for excluding seen items)."""
  users, positions = ds.eval_examples(split)
  targets = ds.items[ds.offsets[users] + positions]
  history = last_items(ds, users, positions, history_len) if history_len else None
  return EvalSet(inputs=last_items(ds, users, positions, max_len),
                 targets=targets.astype(np.int32), users=users, history=history)


def _host_rows(rows: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
  per_host = len(rows) // process_count
  return rows[process_index * per_host:(process_index + 1) * per_host]


def _check_hosts(batch_size: int, process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')
  if batch_size % process_count:
    raise DataError(f'batch size {batch_size} is not divisible by the '
                    f'{process_count} processes')


class TrainBatches:
  """Endless, seeded, shuffled training batches with a resumable position.

  Epoch e visits the windows in `default_rng([seed, e]).permutation` order and
  drops the remainder, so every batch has `batch_size` rows. Each process gets
  block `process_index` of `process_count` contiguous blocks of every global
  batch (the training program passes sharding.process_rows: the rows its
  devices hold, the whole batch on a mesh with data = 1).
  `state()` / `restore()` make a resumed run see exactly the same batches.
  """

  def __init__(self, windows: Windows, batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1):
    _check_hosts(batch_size, process_index, process_count)
    if len(windows) < batch_size:
      raise DataError(f'only {len(windows)} training windows, fewer than the '
                      f'batch size {batch_size}')
    self.windows = windows
    self.batch_size = batch_size
    self.seed = seed
    self.process_index = process_index
    self.process_count = process_count
    self.steps_per_epoch = len(windows) // batch_size
    self.epoch = 0
    self.position = 0
    self._order_epoch, self._order = -1, np.empty(0, np.int64)

  def state(self) -> dict[str, int]:
    """JSON-serialisable position: the next batch is batch `position` of `epoch`."""
    return {'epoch': self.epoch, 'position': self.position, 'seed': self.seed}

  def restore(self, state: dict[str, int]) -> None:
    if state['seed'] != self.seed:
      raise DataError(f"iterator state has seed {state['seed']}, this run {self.seed}")
    self.epoch, self.position = int(state['epoch']), int(state['position'])

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.position >= self.steps_per_epoch:
      self.epoch, self.position = self.epoch + 1, 0
    if self._order_epoch != self.epoch:
      rng = np.random.default_rng([self.seed, self.epoch])
      self._order_epoch, self._order = self.epoch, rng.permutation(len(self.windows))
    start = self.position * self.batch_size
    rows = _host_rows(self._order[start:start + self.batch_size],
                      self.process_index, self.process_count)
    self.position += 1
    return self.windows.batch(rows)


def eval_batches(examples: EvalSet, batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Fixed-shape batches over all examples; the last one is padded with rows
  of weight 0, so no example is dropped. `index` is the example's row in
  `examples` (-1 for padding)."""
  _check_hosts(batch_size, process_index, process_count)
  num_batches = -(len(examples) // -batch_size)
  index = np.full(num_batches * batch_size, -1, dtype=np.int64)
  index[:len(examples)] = np.arange(len(examples))
  for b in range(num_batches):
    rows = _host_rows(index[b * batch_size:(b + 1) * batch_size],
                      process_index, process_count)
    take = np.maximum(rows, 0)
    batch = {'inputs': examples.inputs[take], 'targets': examples.targets[take],
             'weights': (rows >= 0).astype(np.float32), 'index': rows}
    if examples.history is not None:
      batch['history'] = examples.history[take]
    yield batch
