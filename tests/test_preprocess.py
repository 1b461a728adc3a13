"""Filtering, ordering, k-core, splits and frequency indexing on hand-made logs."""

import numpy as np
import pytest

from seqcompress_jax.data import dataset, preprocess, split
from seqcompress_jax.data.interactions import DataError, Interactions


def log(rows, rating=True):
  """Interactions from (user, item, timestamp[, rating]) tuples."""
  rows = np.array(rows, dtype=np.float64)
  return Interactions(user=rows[:, 0].astype(np.int64), item=rows[:, 1].astype(np.int64),
                      timestamp=rows[:, 2],
                      rating=rows[:, 3].astype(np.float32) if rating else None,
                      source='test.log')


def test_chronological_breaks_timestamp_ties_by_original_row():
  inter = log([(2, 30, 5, 1), (1, 10, 7, 1), (2, 20, 5, 1), (1, 11, 3, 1), (2, 10, 4, 1)])
  ordered = preprocess.chronological(inter)
  assert ordered.user.tolist() == [1, 1, 2, 2, 2]
  assert ordered.item.tolist() == [11, 10, 10, 30, 20]  # 30 before 20: same time, earlier row


@pytest.mark.parametrize('policy, expected', [
    ('none', [10, 20, 10, 10, 30]),
    ('first', [10, 20, 30]),
    ('last', [20, 10, 30]),
])
def test_deduplicate(policy, expected):
  inter = log([(1, 10, 1, 1), (1, 20, 2, 1), (1, 10, 3, 1), (1, 10, 4, 1), (2, 30, 1, 1)])
  out = preprocess.deduplicate(preprocess.chronological(inter), policy)
  assert out.item.tolist() == expected


def test_deduplicate_rejects_unknown_policy():
  with pytest.raises(DataError, match="data.dedup.*'sometimes'"):
    preprocess.deduplicate(log([(1, 1, 1, 1)]), 'sometimes')


def brute_force_core(pairs, user_core, item_core):
  """The k-core by removing one violating user or item at a time."""
  pairs = list(pairs)
  while True:
    users = {u: sum(1 for p in pairs if p[0] == u) for u, _ in pairs}
    items = {i: sum(1 for p in pairs if p[1] == i) for _, i in pairs}
    bad = next((p for p in pairs if users[p[0]] < user_core or items[p[1]] < item_core), None)
    if bad is None:
      return sorted(pairs)
    pairs = [p for p in pairs if p[0] != bad[0]] if users[bad[0]] < user_core else \
        [p for p in pairs if p[1] != bad[1]]


def test_k_core_cascades_to_the_fixed_point():
  # Item 5 has 2 users; user 3 has 2 items. With k = 2 the first pass keeps
  # user 3 (2 items) but drops item 9 (1 user), which drops user 3's count
  # to 1, which drops item 5's count to 1, ...: only the dense part survives.
  rows = [(1, 1), (1, 2), (2, 1), (2, 2), (3, 5), (3, 9), (4, 5)]
  inter = log([(u, i, t, 1) for t, (u, i) in enumerate(rows)])
  out = preprocess.k_core(inter, 2, 2)
  assert sorted(zip(out.user.tolist(), out.item.tolist())) == [(1, 1), (1, 2), (2, 1), (2, 2)]


@pytest.mark.parametrize('seed', range(5))
def test_k_core_matches_brute_force(seed):
  rng = np.random.default_rng(seed)
  pairs = {(int(u), int(i)) for u, i in zip(rng.integers(0, 30, 200), rng.zipf(1.5, 200) % 40)}
  inter = log([(u, i, t, 1) for t, (u, i) in enumerate(sorted(pairs))])
  out = preprocess.k_core(inter, 4, 3)
  expected = brute_force_core(pairs, 4, 3)
  assert 0 < len(expected) < len(pairs)  # The case prunes something and keeps something.
  assert sorted(zip(out.user.tolist(), out.item.tolist())) == expected


def test_filters_name_the_step_that_emptied_the_log():
  inter = log([(1, 1, 1, 2), (1, 2, 2, 3), (2, 1, 3, 1)])
  with pytest.raises(DataError, match=r'rating filter \(data.min_rating=4.0\).*test.log'):
    preprocess.filter_interactions(inter, min_rating=4.0)
  with pytest.raises(DataError, match=r'k-core filter \(data.user_core=5'):
    preprocess.filter_interactions(inter, user_core=5)
  with pytest.raises(DataError, match='needs ratings.*no rating column'):
    preprocess.filter_interactions(log([(1, 1, 1)], rating=False), min_rating=3.0)
  kept = preprocess.filter_interactions(inter, min_rating=2.0)
  assert kept.item.tolist() == [1, 2]


def test_to_sequences_groups_users_in_time_order():
  inter = preprocess.chronological(log([(7, 30, 2, 1), (3, 10, 1, 1), (7, 10, 1, 1)]))
  seqs = preprocess.to_sequences(inter)
  assert seqs.raw_user.tolist() == [3, 7]
  assert seqs.offsets.tolist() == [0, 1, 3]
  assert seqs.raw_item[seqs.items].tolist() == [10, 10, 30]


def test_leave_one_out():
  s = split.leave_one_out(np.array([5, 2, 3]))
  assert s.train_len.tolist() == [3, 2, 1]
  assert s.valid_user.tolist() == [0, 2] and s.valid_pos.tolist() == [3, 1]
  assert s.test_user.tolist() == [0, 2] and s.test_pos.tolist() == [4, 2]


def test_random_sequences_is_seeded_disjoint_and_sized():
  lengths = np.array([1] + [4] * 99)
  s = split.random_sequences(lengths, test_fraction=0.2, valid_fraction=0.1, seed=3)
  again = split.random_sequences(lengths, test_fraction=0.2, valid_fraction=0.1, seed=3)
  other = split.random_sequences(lengths, test_fraction=0.2, valid_fraction=0.1, seed=4)
  assert s.test_user.tolist() == again.test_user.tolist() != other.test_user.tolist()
  assert len(s.test_user) == 20 and len(s.valid_user) == 8  # round(0.1 * 79)
  assert not set(s.test_user) & set(s.valid_user)
  assert 0 not in s.test_user and s.train_len[0] == 1  # too short to evaluate
  assert (s.train_len[s.test_user] == 0).all() and (s.test_pos == 3).all()
  trained = np.flatnonzero(s.train_len > 0)
  assert len(trained) == 72 and (s.train_len[trained] == lengths[trained]).all()


def test_make_split_rejects_bad_values():
  with pytest.raises(DataError, match="data.split.*'kfold'"):
    split.make_split(np.array([3]), 'kfold')
  with pytest.raises(DataError, match='data.test_fraction'):
    split.make_split(np.array([3]), 'random_seq', test_fraction=1.5)


def test_frequency_index_counts_training_items_only():
  # Raw items: 50 x3 in training, 40 x3 (tie with 50: lower raw id first),
  # 60 x1, and 70 only as a held-out target.
  seqs = preprocess.Sequences(
      items=np.array([0, 1, 2, 0, 1, 3, 1, 1, 0, 2, 3]),  # codes into raw_item
      offsets=np.array([0, 6, 11]),
      raw_item=np.array([40, 50, 60, 70]), raw_user=np.array([1, 2]))
  s = split.leave_one_out(seqs.lengths)  # holds out positions 4, 5 and 9, 10
  ds = dataset.index_by_frequency(seqs, s, {})
  assert ds.raw_item.tolist() == [-1, 40, 50, 60, 70]
  assert ds.item_count.tolist() == [0, 3, 3, 1, 0]
  assert ds.raw_item[ds.items].tolist() == [40, 50, 60, 40, 50, 70, 50, 50, 40, 60, 70]
  assert ds.stats['items_covering_train_mass']['50%'] == 2
  assert ds.stats['train_interactions'] == 7
