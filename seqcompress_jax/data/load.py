"""load_dataset: the prepared dataset a config names, from the cache or built.

The cache entry is keyed by the source's fingerprint and the preparation
options (see config.PREPARATION_FIELDS) and written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os

import ml_collections

from seqcompress_jax.data import dataset as dataset_lib
from seqcompress_jax.data import preprocess, sources, split
from seqcompress_jax.data.config import PREPARATION_FIELDS, validate
from seqcompress_jax.data.dataset import Dataset
from seqcompress_jax.data.interactions import DataError

CACHE_VERSION = 1


def cache_dir(cfg: ml_collections.ConfigDict, fingerprint: dict | None = None) -> str:
  """The cache entry of `cfg`: keyed by the source's fingerprint (computed
  when not given: for a file, a hash of its content) and the options."""
  fingerprint = fingerprint or sources.fingerprint(cfg)
  key = json.dumps({'version': CACHE_VERSION, 'source': fingerprint,
                    'options': {k: cfg[k] for k in PREPARATION_FIELDS}},
                   sort_keys=True)
  digest = hashlib.sha256(key.encode()).hexdigest()[:16]
  return os.path.join(sources.cache_root(cfg.cache_dir), 'prepared',
                      f'{cfg.name}-{digest}')


def load_dataset(cfg: ml_collections.ConfigDict) -> Dataset:
  """The prepared dataset `cfg` (a `data_config()`) names, from cache or built."""
  validate(cfg)
  fingerprint = sources.fingerprint(cfg)  # Hashes a file source once.
  directory = cache_dir(cfg, fingerprint)
  if os.path.exists(os.path.join(directory, 'meta.json')):
    return dataset_lib.load(directory)
  inter = preprocess.filter_interactions(
      sources.read_source(cfg), min_rating=cfg.min_rating, dedup=cfg.dedup,
      user_core=cfg.user_core, item_core=cfg.item_core)
  seqs = preprocess.to_sequences(inter)
  the_split = split.make_split(
      seqs.lengths, cfg.split, test_fraction=cfg.test_fraction,
      valid_fraction=cfg.valid_fraction, seed=cfg.split_seed)
  if len(the_split.test_user) == 0:
    raise DataError(f'{inter.source}: no user has enough interactions for a test '
                    f'example under data.split={cfg.split!r}')
  meta = {'name': cfg.name, 'source': inter.source,
          'fingerprint': fingerprint,
          'options': {k: cfg[k] for k in PREPARATION_FIELDS}}
  ds = dataset_lib.index_by_frequency(seqs, the_split, meta)
  dataset_lib.save(ds, directory)
  return ds
