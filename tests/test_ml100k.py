"""MovieLens-100K end to end: fetched from PyPI (the RecBole wheel), verified,
prepared, and checked against an independent numpy computation."""

import os
import zipfile

import numpy as np
import pytest

from seqcompress_jax.data import data_config, load_dataset, pipeline

pytestmark = pytest.mark.network


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp('cache'))


@pytest.fixture(scope='module')
def ml100k(cache):
  cfg = data_config()
  cfg.cache_dir = cache
  return load_dataset(cfg)


@pytest.fixture(scope='module')
def raw(cache, ml100k):
  """(user, item, rating, timestamp) rows of the fetched file, by numpy alone."""
  return np.loadtxt(os.path.join(cache, 'raw', 'ml-100k.inter'), skiprows=1,
                    delimiter='\t', dtype=np.int64)


def test_sizes(ml100k):
  assert (ml100k.num_users, ml100k.num_items - 1, len(ml100k.items)) == (943, 1682, 100_000)
  assert len(ml100k.test_user) == len(ml100k.valid_user) == 943
  assert ml100k.stats['train_interactions'] == 100_000 - 2 * 943


def test_sequences_and_ids_match_an_independent_computation(ml100k, raw):
  order = np.lexsort((np.arange(len(raw)), raw[:, 3], raw[:, 0]))
  user, item = raw[order, 0], raw[order, 1]
  assert np.array_equal(ml100k.raw_item[ml100k.items], item)
  assert np.array_equal(np.repeat(ml100k.raw_user, ml100k.lengths), user)
  # Training = all but the last two of each user: count, sort by (-count, raw id).
  starts = np.searchsorted(user, np.unique(user))
  position = np.arange(len(user)) - np.repeat(starts, np.diff(np.append(starts, len(user))))
  length = np.bincount(user)[user]
  ids, counts = np.unique(item[position < length - 2], return_counts=True)
  by_frequency = ids[np.lexsort((ids, -counts))]
  assert np.array_equal(ml100k.raw_item[1:len(by_frequency) + 1], by_frequency)


def test_test_targets_are_each_users_last_item(ml100k, raw):
  test = pipeline.eval_set(ml100k, 'test', max_len=50)
  last = {}
  for u, i, _, t in raw[np.lexsort((np.arange(len(raw)), raw[:, 3]))]:
    last[u] = i
  assert [last[u] for u in ml100k.raw_user[test.users]] == \
      ml100k.raw_item[test.targets].tolist()


def test_local_u_data_and_zip_give_the_same_dataset(ml100k, cache, tmp_path):
  with open(os.path.join(cache, 'raw', 'ml-100k.inter'), 'rb') as f:
    u_data = f.read().split(b'\n', 1)[1]
  (tmp_path / 'u.data').write_bytes(u_data)
  with zipfile.ZipFile(tmp_path / 'ml-100k.zip', 'w') as z:
    z.writestr('ml-100k/u.data', u_data)
  for path in (tmp_path / 'u.data', tmp_path / 'ml-100k.zip'):
    cfg = data_config()
    cfg.path, cfg.cache_dir = str(path), str(tmp_path / f'cache-{path.name}')
    ds = load_dataset(cfg)
    assert np.array_equal(ds.items, ml100k.items)
    assert np.array_equal(ds.raw_item, ml100k.raw_item)
