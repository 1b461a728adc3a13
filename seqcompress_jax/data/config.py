"""The `config.data` section: which dataset, how to prepare, split and batch it."""

from __future__ import annotations

import ml_collections

from seqcompress_jax.data.interactions import DataError

SOURCES = ('ml-100k', 'synthetic', 'file')
ML100K_ORIGINS = ('pypi', 'grouplens')

# Fields that change the prepared arrays, and hence the cache key. The rest
# (windows, batches) are applied on the fly when batches are built.
PREPARATION_FIELDS = ('min_rating', 'dedup', 'user_core', 'item_core', 'split',
                      'test_fraction', 'valid_fraction', 'split_seed')


def data_config() -> ml_collections.ConfigDict:
  """Defaults: MovieLens-100K, leave-one-out, max_len 50."""
  c = ml_collections.ConfigDict()
  c.name = 'ml-100k'  # One of SOURCES.
  # ml-100k: where to get it when `path` is empty: 'pypi' (the RecBole 1.2.1
  # wheel, fetched with pip) or 'grouplens' (the official zip over HTTPS).
  c.origin = 'pypi'
  # 'file': the user's log. 'ml-100k': optionally a local ml-100k.zip / u.data.
  c.path = ''
  # Reader options for 'file' (see formats.read_interactions).
  c.format = 'auto'
  c.sep = ''  # '' = the format's default.
  c.header = True  # Generic 'csv' only: the first line names the columns.
  c.user_field = 'user'
  c.item_field = 'item'
  c.time_field = 'timestamp'
  c.rating_field = ''  # '' = no rating column.
  c.synthetic = ml_collections.ConfigDict(dict(
      num_users=6000, num_items=3000, mean_len=30.0, max_len=200, min_len=5,
      skew=0.8, num_topics=50, follow_prob=0.6, num_next=4, seed=0))
  # Preprocessing.
  c.min_rating = 0.0  # Keep interactions rated >= this; 0 keeps all.
  c.dedup = 'none'  # 'none' | 'first' | 'last' occurrence of a (user, item).
  c.user_core = 0  # Iterative k-core: 0 or 1 = no filter.
  c.item_core = 0
  # Split.
  c.split = 'loo'  # 'loo' | 'random_seq' (the CpRec protocol).
  c.test_fraction = 0.2  # random_seq only.
  c.valid_fraction = 0.1  # random_seq only: carved out of the training users.
  c.split_seed = 0
  # Windows and batches.
  c.max_len = 50
  # Step between a long history's windows; 0 = max_len. Smaller: more context
  # per target (each is still trained once), at up to max_len / stride the compute.
  c.train_stride = 0
  c.batch_size = 256
  c.eval_batch_size = 1024
  c.shuffle_seed = 0
  c.cache_dir = ''  # '' = $SEQCOMPRESS_DATA or ~/.cache/seqcompress_jax.
  return c


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Raises DataError naming the first `data.*` field with an invalid value."""
  checks = [
      ('name', cfg.name in SOURCES, f'one of {SOURCES}'),
      ('origin', cfg.origin in ML100K_ORIGINS, f'one of {ML100K_ORIGINS}'),
      ('min_rating', cfg.min_rating >= 0, 'a rating >= 0 (0 keeps all)'),
      ('user_core', cfg.user_core >= 0, 'an integer >= 0'),
      ('item_core', cfg.item_core >= 0, 'an integer >= 0'),
      ('max_len', cfg.max_len >= 1, 'an integer >= 1'),
      ('train_stride', 0 <= cfg.train_stride <= cfg.max_len,
       f'an integer in [0, max_len = {cfg.max_len}] (0 = max_len)'),
      ('batch_size', cfg.batch_size >= 1, 'an integer >= 1'),
      ('eval_batch_size', cfg.eval_batch_size >= 1, 'an integer >= 1'),
  ]
  for field, ok, expected in checks:
    if not ok:
      raise DataError(f'data.{field}: expected {expected}, got {cfg[field]!r}')
