"""Running rows through programs compiled for a few fixed batch sizes (numpy
only: the export loader uses it without the model code).

  for chunk, bucket in chunks(rows, (8, 64, 512)):
    values = program[bucket](pad_rows(inputs[chunk], bucket))
    out[chunk] = values[:len(chunk)]
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np


def check_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
  """`buckets` as a tuple of ints, or ValueError unless they are increasing
  positive sizes."""
  if (not buckets or any(isinstance(b, bool) or int(b) != b for b in buckets)
      or list(buckets) != sorted(set(buckets)) or buckets[0] < 1):
    raise ValueError(f'buckets: expected increasing positive sizes, got {buckets!r}')
  return tuple(int(b) for b in buckets)


def chunks(rows: np.ndarray, buckets: Sequence[int]) -> Iterator[tuple[np.ndarray, int]]:
  """(chunk, bucket): `rows` in consecutive chunks of at most buckets[-1], each
  with the smallest bucket that holds it."""
  largest = buckets[-1]
  for start in range(0, len(rows), largest):
    chunk = rows[start:start + largest]
    yield chunk, next(b for b in buckets if b >= len(chunk))


def pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
  """`array` [n, ...] with zero rows appended up to `rows` (PAD sequences)."""
  return np.pad(array, [(0, rows - len(array))] + [(0, 0)] * (array.ndim - 1))
