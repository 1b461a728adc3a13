"""The raw interaction log every source produces: one row per (user, item, time)."""

from __future__ import annotations

import dataclasses

import numpy as np


class DataError(ValueError):
  """Unusable input data. The message names the file, line or field at fault."""


@dataclasses.dataclass(frozen=True)
class Interactions:
  """Parallel arrays, one entry per interaction, in the order they were read.

  Raw ids are int64 when every id in the column is an integer, else str
  (numpy unicode), so that "ties by raw id" sorts 2 before 10 for MovieLens and
  lexicographically for Amazon ASINs. Timestamps are float64; `rating` is None
  for sources without ratings. `source` names the origin for error messages.
  """

  user: np.ndarray
  item: np.ndarray
  timestamp: np.ndarray
  rating: np.ndarray | None
  source: str

  def __post_init__(self):
    n = len(self.user)
    columns = {'item': self.item, 'timestamp': self.timestamp}
    if self.rating is not None:
      columns['rating'] = self.rating
    for name, column in columns.items():
      if len(column) != n:
        raise DataError(f'{self.source}: column {name!r} has {len(column)} '
                        f'rows, expected {n} like the user column')

  def __len__(self) -> int:
    return len(self.user)

  def take(self, index: np.ndarray) -> Interactions:
    """Rows selected by a boolean mask or an index array, same order."""
    return Interactions(
        user=self.user[index],
        item=self.item[index],
        timestamp=self.timestamp[index],
        rating=None if self.rating is None else self.rating[index],
        source=self.source)


def raw_ids(values: np.ndarray | list, field: str, source: str) -> np.ndarray:
  """Normalises a column of ids: int64 if all integral, else str."""
  values = np.asarray(values)
  if values.dtype.kind in 'iu':
    return values.astype(np.int64)
  if values.dtype.kind == 'f':
    if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
      raise DataError(f'{source}: field {field!r} holds non-integer numbers')
    return values.astype(np.int64)
  values = np.char.strip(values.astype(str))
  if np.any(values == ''):
    row = int(np.argmax(values == ''))
    raise DataError(f'{source}: field {field!r} is empty in data row {row + 1}')
  # Ids like ASIN '0000000116' stay strings: converting would drop the zeros.
  if np.all(np.char.isdigit(values)) and not np.any(
      np.char.startswith(values, '0') & (np.char.str_len(values) > 1)):
    try:
      return values.astype(np.int64)
    except OverflowError:
      pass
  return values
