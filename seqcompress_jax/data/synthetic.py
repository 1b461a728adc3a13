"""Synthetic interaction logs with long-tailed popularity and learnable order.

Items get Zipf weights 1 / rank^skew (raw ids are a random permutation, so they
do not reveal popularity) and a random latent topic; each item has `num_next`
successors drawn by popularity, mostly from its own topic. Each user favours a
few topics, picked in proportion to topic popularity. A sequence starts with a
popularity-weighted item from a favourite topic; each next item is, with
probability `follow_prob`, a random successor of the current one, else a fresh
draw from the user's topics. Lengths are min_len plus a geometric tail clipped
at max_len, tuned so that the mean is mean_len. Timestamps are a random start
per user plus whole-second gaps of about an hour.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from seqcompress_jax.data.interactions import DataError, Interactions

_TASTE = 3  # Favourite topics per user.
_LOCAL = 0.8  # Share of successors drawn from the item's own topic.
_START, _SPREAD, _GAP = 1.4e9, 3e7, 3600.0  # Seconds: epoch, spread, mean gap.


def _check(name: str, value: object, ok: bool, expected: str) -> None:
  if not ok:
    raise DataError(f'synthetic: argument {name}={value!r}, expected {expected}')


def _is_int(value: object) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _lengths(rng: np.random.Generator, num_users: int, mean_len: float,
             min_len: int, max_len: int) -> np.ndarray:
  """min_len + min(G, max_len - min_len), G geometric with P(G >= k) = q^k."""
  extra, cap = mean_len - min_len, max_len - min_len
  # Bisect q: E[min(G, cap)] = q (1 - q^cap) / (1 - q) grows with q.
  lo, hi = 0.0, 1.0
  for _ in range(40):
    q = (lo + hi) / 2
    lo, hi = (q, hi) if q * (1 - q**cap) / (1 - q) < extra else (lo, q)
  return min_len + np.minimum(rng.geometric(1 - lo, num_users) - 1, cap)


def generate(num_users: int, num_items: int, mean_len: float = 20.0,
             max_len: int = 200, min_len: int = 5, skew: float = 1.0,
             num_topics: int = 50, follow_prob: float = 0.6, num_next: int = 4,
             seed: int = 0) -> Interactions:
  """A random interaction log, rows ordered by user then strictly by time.

  Users are 0..num_users-1, items are raw ids in 0..num_items-1 (not all need
  occur), ratings are None. The same arguments always give the same log.
  """
  for name, value, least in (
      ('num_users', num_users, 1), ('num_items', num_items, 2), ('min_len', min_len, 1),
      ('num_topics', num_topics, 1), ('num_next', num_next, 1)):
    _check(name, value, _is_int(value) and value >= least, f'an integer >= {least}')
  _check('max_len', max_len, _is_int(max_len) and max_len >= min_len,
         f'an integer >= min_len={min_len}')
  _check('mean_len', mean_len, min_len <= mean_len <= max_len,
         f'a number in [min_len={min_len}, max_len={max_len}]')
  _check('skew', skew, 0 <= skew < math.inf, 'a finite number >= 0')
  _check('follow_prob', follow_prob, 0 <= follow_prob <= 1, 'a number in [0, 1]')
  rng = np.random.default_rng(seed)

  # Slots: items grouped by topic, by popularity rank within a topic.
  topic_of_rank = rng.integers(num_topics, size=num_items)
  rank = np.argsort(topic_of_rank, kind='stable')
  topic = topic_of_rank[rank]
  cum = np.cumsum((rank + 1.0) ** -skew)
  starts = np.searchsorted(topic, np.arange(num_topics + 1))
  lows = np.concatenate([[0.0], cum])[starts]

  def in_topics(t: np.ndarray) -> np.ndarray:  # Popularity-weighted, in topics t.
    u = lows[t] + rng.random(len(t)) * (lows[t + 1] - lows[t])
    return np.minimum(np.searchsorted(cum, u, side='right'), starts[t + 1] - 1)

  def anywhere(n: int) -> np.ndarray:  # Popularity-weighted over all items.
    u = rng.random(n) * cum[-1]
    return np.minimum(np.searchsorted(cum, u, side='right'), num_items - 1)

  successors = np.empty((num_next, num_items), np.int32)
  for row in successors:  # A loop over num_next bounds the temporaries' memory.
    local = rng.random(num_items) < _LOCAL
    row[local] = in_topics(topic[local])
    row[~local] = anywhere(num_items - int(np.count_nonzero(local)))
  taste = topic[anywhere(num_users * _TASTE)].reshape(num_users, _TASTE)

  lengths = _lengths(rng, num_users, mean_len, min_len, max_len)
  offsets = np.cumsum(lengths) - lengths
  slots = np.empty(int(lengths.sum()), np.int32)
  timestamp = np.empty(len(slots))
  current = np.zeros(num_users, np.int32)
  clock = _START + np.floor(rng.random(num_users) * _SPREAD)
  for pos in range(int(lengths.max())):
    users = np.flatnonzero(lengths > pos)
    follow = (rng.random(len(users)) < follow_prob) & (pos > 0)
    step = np.empty(len(users), np.int32)
    choice = rng.integers(num_next, size=int(np.count_nonzero(follow)))
    step[follow] = successors[choice, current[users[follow]]]
    fresh = users[~follow]
    step[~follow] = in_topics(taste[fresh, rng.integers(_TASTE, size=len(fresh))])
    current[users] = step
    clock[users] += 1.0 + np.floor(rng.exponential(_GAP, len(users)))
    slots[offsets[users] + pos] = step
    timestamp[offsets[users] + pos] = clock[users]

  item_ids = rng.permutation(num_items)  # Raw id of each slot.
  return Interactions(
      user=np.repeat(np.arange(num_users, dtype=np.int64), lengths),
      item=item_ids[slots], timestamp=timestamp, rating=None,
      source=f'synthetic(users={num_users},items={num_items},seed={seed})')
