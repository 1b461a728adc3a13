"""The prepared dataset: frequency-indexed sequences, a split, statistics, and
its atomic on-disk cache (`arrays.npz` + `meta.json`)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np

from seqcompress_jax.data.interactions import DataError
from seqcompress_jax.data.preprocess import Sequences
from seqcompress_jax.data.split import Split

PAD = 0
_ARRAYS = ('items', 'offsets', 'train_len', 'valid_user', 'valid_pos',
           'test_user', 'test_pos', 'item_count', 'raw_item', 'raw_user')


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Sequences over frequency-sorted item indices, plus the split.

  Item index 0 is PAD; 1 is the most frequent item in the training data, ties
  broken by raw id; items never seen in training come last. `raw_item[i]` is
  the raw id of index i (`raw_item[0]` is a placeholder: -1 or '').
  """

  items: np.ndarray  # int32 [num_interactions], 1..num_items-1
  offsets: np.ndarray  # int64 [num_users + 1]
  train_len: np.ndarray  # int64 [num_users]
  valid_user: np.ndarray
  valid_pos: np.ndarray
  test_user: np.ndarray
  test_pos: np.ndarray
  item_count: np.ndarray  # int64 [num_items]: training frequency, 0 for PAD
  raw_item: np.ndarray  # [num_items]
  raw_user: np.ndarray  # [num_users]
  meta: dict[str, Any]

  @property
  def num_items(self) -> int:
    """Vocabulary size V, PAD included."""
    return len(self.raw_item)

  @property
  def num_users(self) -> int:
    return len(self.raw_user)

  @property
  def lengths(self) -> np.ndarray:
    return np.diff(self.offsets)

  @property
  def stats(self) -> dict[str, Any]:
    return self.meta['stats']

  def eval_examples(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(user, position) of the 'valid' or 'test' examples."""
    if split not in ('valid', 'test'):
      raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    return getattr(self, f'{split}_user'), getattr(self, f'{split}_pos')


def index_by_frequency(seqs: Sequences, split: Split, meta: dict[str, Any]) -> Dataset:
  """Re-indexes item codes by descending training frequency (ties by raw id)."""
  lengths = seqs.lengths
  position = np.arange(len(seqs.items)) - np.repeat(seqs.offsets[:-1], lengths)
  in_train = position < np.repeat(split.train_len, lengths)
  count = np.bincount(seqs.items[in_train], minlength=len(seqs.raw_item))
  # Codes are in raw-id order, so a stable sort on -count breaks ties by raw id.
  order = np.argsort(-count, kind='stable')
  index_of_code = np.empty(len(order), dtype=np.int64)
  index_of_code[order] = np.arange(1, len(order) + 1)
  pad_id = np.array([-1 if seqs.raw_item.dtype.kind in 'iu' else ''],
                    dtype=seqs.raw_item.dtype)
  dataset = Dataset(
      items=index_of_code[seqs.items].astype(np.int32),
      offsets=seqs.offsets,
      train_len=split.train_len,
      valid_user=split.valid_user, valid_pos=split.valid_pos,
      test_user=split.test_user, test_pos=split.test_pos,
      item_count=np.concatenate([[0], count[order]]).astype(np.int64),
      raw_item=np.concatenate([pad_id, seqs.raw_item[order]]),
      raw_user=seqs.raw_user,
      meta=dict(meta))
  dataset.meta['stats'] = statistics(dataset)
  return dataset


def statistics(ds: Dataset) -> dict[str, Any]:
  """Sizes, length distribution, density and the long tail of item popularity."""
  lengths = ds.lengths
  num_items = ds.num_items - 1
  mass = np.cumsum(ds.item_count[1:]) / max(1, ds.item_count.sum())
  items_for_mass = {f'{int(q * 100)}%': int(np.searchsorted(mass, q - 1e-12) + 1)
                    for q in (0.5, 0.8, 0.9, 0.95, 0.99)}
  mass_of_top = {f'{p}%': float(mass[max(1, int(num_items * p / 100)) - 1])
                 for p in (1, 5, 10, 20, 50)}
  return {
      'users': int(ds.num_users),
      'items': int(num_items),
      'interactions': int(len(ds.items)),
      'train_interactions': int(ds.item_count.sum()),
      'valid_examples': int(len(ds.valid_user)),
      'test_examples': int(len(ds.test_user)),
      'density': float(len(ds.items) / max(1, ds.num_users * num_items)),
      'length': {
          'min': int(lengths.min()), 'mean': float(lengths.mean()),
          'median': float(np.median(lengths)),
          'p90': float(np.percentile(lengths, 90)), 'max': int(lengths.max())},
      'items_covering_train_mass': items_for_mass,
      'train_mass_of_top_items': mass_of_top,
  }


def format_statistics(stats: dict[str, Any]) -> str:
  """A short human-readable table of `statistics`."""
  length = stats['length']
  lines = [
      f"users {stats['users']:,}  items {stats['items']:,}  "
      f"interactions {stats['interactions']:,}  density {stats['density']:.4%}",
      f"train interactions {stats['train_interactions']:,}  "
      f"valid examples {stats['valid_examples']:,}  test examples {stats['test_examples']:,}",
      f"sequence length: min {length['min']}  median {length['median']:g}  "
      f"mean {length['mean']:.1f}  p90 {length['p90']:g}  max {length['max']}",
      'items covering the training mass: ' + '  '.join(
          f'{k} -> {v:,}' for k, v in stats['items_covering_train_mass'].items()),
      'training mass of the top items: ' + '  '.join(
          f'{k} -> {v:.1%}' for k, v in stats['train_mass_of_top_items'].items()),
  ]
  return '\n'.join(lines)


def save(ds: Dataset, directory: str) -> None:
  """Writes the dataset to `directory` atomically: a sibling temp dir, renamed."""
  parent = os.path.dirname(os.path.abspath(directory))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.tmp-', dir=parent)
  try:
    np.savez(os.path.join(tmp, 'arrays.npz'),
             **{name: getattr(ds, name) for name in _ARRAYS})
    with open(os.path.join(tmp, 'meta.json'), 'w') as f:
      json.dump(ds.meta, f, indent=2, sort_keys=True)
    try:
      os.rename(tmp, directory)
    except OSError:  # Another process won the race: its copy is identical.
      if not os.path.exists(os.path.join(directory, 'meta.json')):
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def load(directory: str) -> Dataset:
  """Reads a dataset written by `save` (no pickle)."""
  try:
    with open(os.path.join(directory, 'meta.json')) as f:
      meta = json.load(f)
    with np.load(os.path.join(directory, 'arrays.npz'), allow_pickle=False) as z:
      arrays = {name: z[name] for name in _ARRAYS}
  except (OSError, ValueError, KeyError) as e:
    raise DataError(f'cannot read the prepared dataset in {directory}: {e}') from e
  return Dataset(meta=meta, **arrays)
