"""Interaction log -> filtered, chronologically ordered per-user sequences.

Steps, in order: rating threshold, stable chronological order (timestamp, then
original row), de-duplication of (user, item) pairs, iterative k-core to a fixed
point, and the grouping into one sequence per user. Item ids stay "codes"
(dense, in raw-id order) here; `dataset.py` re-indexes them by training
frequency once the split is known.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from seqcompress_jax.data.interactions import DataError, Interactions

DEDUP_POLICIES = ('none', 'first', 'last')


@dataclasses.dataclass(frozen=True)
class Sequences:
  """One chronological item sequence per user, stored as CSR.

  items[offsets[u]:offsets[u+1]] are user u's item codes, oldest first.
  Codes index `raw_item` / `raw_user`, which are sorted by raw id.
  """

  items: np.ndarray  # int64 [num_interactions]
  offsets: np.ndarray  # int64 [num_users + 1]
  raw_item: np.ndarray  # [num_item_codes]
  raw_user: np.ndarray  # [num_users]

  @property
  def lengths(self) -> np.ndarray:
    return np.diff(self.offsets)


def chronological(inter: Interactions) -> Interactions:
  """Rows ordered by (user, timestamp, original row): a stable, total order."""
  _, user_code = np.unique(inter.user, return_inverse=True)
  order = np.lexsort((np.arange(len(inter)), inter.timestamp, user_code))
  return inter.take(order)


def deduplicate(inter: Interactions, policy: str) -> Interactions:
  """Keeps the first or last interaction of each (user, item) pair in time.

  Expects chronologically ordered rows (see `chronological`).
  """
  if policy not in DEDUP_POLICIES:
    raise DataError(f'data.dedup: expected one of {DEDUP_POLICIES}, got {policy!r}')
  if policy == 'none':
    return inter
  _, user_code = np.unique(inter.user, return_inverse=True)
  _, item_code = np.unique(inter.item, return_inverse=True)
  pair = user_code.astype(np.int64) * (item_code.max() + 1) + item_code
  if policy == 'first':
    _, keep = np.unique(pair, return_index=True)
  else:
    _, reversed_first = np.unique(pair[::-1], return_index=True)
    keep = len(pair) - 1 - reversed_first
  return inter.take(np.sort(keep))


def k_core(inter: Interactions, user_core: int, item_core: int) -> Interactions:
  """Drops users with < user_core and items with < item_core interactions,
  repeatedly, until every remaining user and item satisfies both bounds."""
  _, user_code = np.unique(inter.user, return_inverse=True)
  _, item_code = np.unique(inter.item, return_inverse=True)
  keep = np.ones(len(inter), dtype=bool)
  while True:
    user_count = np.bincount(user_code[keep], minlength=user_code.max() + 1)
    item_count = np.bincount(item_code[keep], minlength=item_code.max() + 1)
    ok = keep & (user_count[user_code] >= user_core) & (item_count[item_code] >= item_core)
    if np.array_equal(ok, keep):
      return inter.take(keep)
    keep = ok


def filter_interactions(inter: Interactions, *, min_rating: float = 0.0,
                        dedup: str = 'none', user_core: int = 0,
                        item_core: int = 0) -> Interactions:
  """Applies the rating threshold, ordering, de-duplication and k-core.

  Raises DataError naming the step that left nothing.
  """
  if len(inter) == 0:
    raise DataError(f'{inter.source}: no interactions')
  if min_rating > 0:
    if inter.rating is None:
      raise DataError(f'data.min_rating={min_rating} needs ratings, but '
                      f'{inter.source} has no rating column')
    inter = inter.take(inter.rating >= min_rating)
    _require_rows(inter, f'the rating filter (data.min_rating={min_rating})')
  inter = deduplicate(chronological(inter), dedup)
  if user_core > 1 or item_core > 1:
    inter = k_core(inter, user_core, item_core)
    _require_rows(inter, f'the k-core filter (data.user_core={user_core}, '
                  f'data.item_core={item_core})')
  return inter


def _require_rows(inter: Interactions, step: str) -> None:
  if len(inter) == 0:
    raise DataError(f'{step} removed every interaction of {inter.source}')


def to_sequences(inter: Interactions) -> Sequences:
  """Groups chronologically ordered rows (see `chronological`) by user."""
  raw_user, user_code = np.unique(inter.user, return_inverse=True)
  raw_item, item_code = np.unique(inter.item, return_inverse=True)
  if np.any(np.diff(user_code) < 0):
    raise ValueError('to_sequences expects rows grouped by user in raw-id order')
  counts = np.bincount(user_code, minlength=len(raw_user))
  offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
  return Sequences(items=item_code.astype(np.int64), offsets=offsets,
                   raw_item=raw_item, raw_user=raw_user)
