"""Train / validation / test protocols over per-user sequences.

A split never copies items. It says, per user, how many leading items are
training data (`train_len`), and names each evaluation example by
(user, position): the target is the item at that position and the input is
everything before it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from seqcompress_jax.data.interactions import DataError

PROTOCOLS = ('loo', 'random_seq')


@dataclasses.dataclass(frozen=True)
class Split:
  train_len: np.ndarray  # int64 [num_users]: items[:train_len] are training data
  valid_user: np.ndarray  # int64 [num_valid]
  valid_pos: np.ndarray  # int64 [num_valid]: index of the target in the sequence
  test_user: np.ndarray  # int64 [num_test]
  test_pos: np.ndarray  # int64 [num_test]


def leave_one_out(lengths: np.ndarray) -> Split:
  """Per user: train on all but the last two, validate on the second-to-last,
  test on the last. Users with fewer than 3 items only train."""
  lengths = np.asarray(lengths, dtype=np.int64)
  evaluated = np.flatnonzero(lengths >= 3)
  train_len = np.where(lengths >= 3, lengths - 2, lengths)
  return Split(train_len=train_len,
               valid_user=evaluated, valid_pos=lengths[evaluated] - 2,
               test_user=evaluated, test_pos=lengths[evaluated] - 1)


def random_sequences(lengths: np.ndarray, test_fraction: float,
                     valid_fraction: float, seed: int) -> Split:
  """The CpRec protocol: shuffle users with a fixed seed; the last
  `test_fraction` of them are test sequences and `valid_fraction` of the rest
  validation sequences, each evaluated on its last item. Users with fewer than
  2 items always train."""
  for name, value in (('test_fraction', test_fraction),
                      ('valid_fraction', valid_fraction)):
    if not 0.0 <= value < 1.0:
      raise DataError(f'data.{name}: expected a fraction in [0, 1), got {value}')
  lengths = np.asarray(lengths, dtype=np.int64)
  candidates = np.random.default_rng(seed).permutation(np.flatnonzero(lengths >= 2))
  num_test = int(round(test_fraction * len(candidates)))
  num_valid = int(round(valid_fraction * (len(candidates) - num_test)))
  test_user = np.sort(candidates[len(candidates) - num_test:])
  valid_user = np.sort(candidates[len(candidates) - num_test - num_valid:
                                  len(candidates) - num_test])
  train_len = lengths.copy()
  train_len[test_user] = 0
  train_len[valid_user] = 0
  return Split(train_len=train_len,
               valid_user=valid_user, valid_pos=lengths[valid_user] - 1,
               test_user=test_user, test_pos=lengths[test_user] - 1)


def make_split(lengths: np.ndarray, protocol: str, *, test_fraction: float = 0.2,
               valid_fraction: float = 0.1, seed: int = 0) -> Split:
  """Dispatches on `protocol` ('loo' or 'random_seq')."""
  if protocol == 'loo':
    return leave_one_out(lengths)
  if protocol == 'random_seq':
    return random_sequences(lengths, test_fraction, valid_fraction, seed)
  raise DataError(f'data.split: expected one of {PROTOCOLS}, got {protocol!r}')
