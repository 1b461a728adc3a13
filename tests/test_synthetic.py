"""Tests for the synthetic interaction generator."""

import numpy as np
import pytest

from seqcompress_jax.data.interactions import DataError
from seqcompress_jax.data.synthetic import generate


def _top_decile_share(items: np.ndarray, num_items: int) -> float:
  counts = np.sort(np.bincount(items, minlength=num_items))[::-1]
  return counts[:num_items // 10].sum() / counts.sum()


def _hit_rates(user: np.ndarray, item: np.ndarray, num_items: int) -> tuple[float, float]:
  """HR@10 on each user's last item: first-order transitions, popularity."""
  last = np.r_[user[1:] != user[:-1], True]
  target, train_user, train_item = item[last], user[~last], item[~last]
  popularity = np.bincount(train_item, minlength=num_items)
  popular_hr = np.isin(target, np.argsort(-popularity, kind='stable')[:10]).mean()
  same = train_user[1:] == train_user[:-1]
  pairs = train_item[:-1][same] * num_items + train_item[1:][same]
  counts = np.bincount(pairs, minlength=num_items**2).reshape(num_items, num_items)
  previous = train_item[np.r_[train_user[1:] != train_user[:-1], True]]
  # Transition counts first, popularity breaks ties (and covers empty rows).
  scores = counts[previous] + popularity / (popularity.max() + 1.0)
  top = np.argpartition(-scores, 10, axis=1)[:, :10]
  return (top == target[:, None]).any(axis=1).mean(), popular_hr


def test_deterministic_per_seed():
  a, b = generate(300, 200, seed=3), generate(300, 200, seed=3)
  for field in ('user', 'item', 'timestamp'):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
  assert a.rating is None
  assert a.source == 'synthetic(users=300,items=200,seed=3)'
  c = generate(300, 200, seed=4)
  assert len(a) != len(c) or not np.array_equal(a.item, c.item)


def test_shapes_order_lengths_and_ids():
  data = generate(2000, 300, mean_len=12.0, min_len=3, max_len=40, seed=1)
  assert data.user.dtype == np.int64 and data.item.dtype == np.int64
  assert data.timestamp.dtype == np.float64
  assert len(data.user) == len(data.item) == len(data.timestamp) > 0
  assert np.all(np.diff(data.user) >= 0)  # Users one after another.
  lengths = np.bincount(data.user)
  assert len(lengths) == 2000 and lengths.min() >= 3 and lengths.max() <= 40
  assert abs(lengths.mean() - 12.0) < 0.5
  same_user = data.user[1:] == data.user[:-1]
  assert np.all(np.diff(data.timestamp)[same_user] > 0)
  assert data.item.min() >= 0 and data.item.max() < 300


@pytest.mark.parametrize('mean_len, expected', [(5.0, 5), (9.0, 9)])
def test_lengths_at_the_bounds(mean_len, expected):
  data = generate(100, 50, mean_len=mean_len, min_len=5, max_len=9)
  assert np.all(np.bincount(data.user) == expected)


def test_skew_concentrates_popularity():
  skewed = generate(2000, 500, skew=1.2, seed=0)
  flat = generate(2000, 500, skew=0.0, seed=0)
  assert _top_decile_share(skewed.item, 500) > 0.7
  assert _top_decile_share(flat.item, 500) < 0.3


def test_item_ids_do_not_reveal_popularity():
  data = generate(2000, 500, skew=1.2, seed=0)
  counts = np.bincount(data.item, minlength=500)
  assert abs(np.corrcoef(np.arange(500), np.log1p(counts))[0, 1]) < 0.2


def test_transitions_beat_popularity():
  # Seeds 0..29 gave transition HR@10 0.64-0.68 and popularity 0.15-0.21.
  data = generate(2000, 1000, skew=0.7, seed=0)
  transition_hr, popular_hr = _hit_rates(data.user, data.item, 1000)
  assert transition_hr >= 2 * popular_hr
  assert transition_hr > 0.5


@pytest.mark.parametrize('kwargs, name', [
    (dict(num_users=0), 'num_users'),
    (dict(num_items=1), 'num_items'),
    (dict(num_items=10.0), 'num_items'),
    (dict(min_len=0), 'min_len'),
    (dict(min_len=10, max_len=9), 'max_len'),
    (dict(mean_len=4.0), 'mean_len'),
    (dict(mean_len=201.0), 'mean_len'),
    (dict(mean_len=float('nan')), 'mean_len'),
    (dict(skew=-0.1), 'skew'),
    (dict(skew=float('inf')), 'skew'),
    (dict(num_topics=0), 'num_topics'),
    (dict(follow_prob=1.5), 'follow_prob'),
    (dict(num_next=0), 'num_next'),
])
def test_invalid_arguments(kwargs, name):
  args = {'num_users': 10, 'num_items': 20, **kwargs}
  with pytest.raises(DataError, match=f'argument {name}='):
    generate(**args)
