"""Prepares a dataset (cached) and prints its statistics.

  python -m seqcompress_jax.data.prepare --dataset=ml-100k
  python -m seqcompress_jax.data.prepare --dataset=file --data.path=ratings.dat \
      --data.user_core=5 --data.item_core=5
  python -m seqcompress_jax.data.prepare --dataset=synthetic \
      --data.synthetic.num_users=500000 --data.synthetic.num_items=1000000
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from seqcompress_jax.config import ConfigError, check_overrides
from seqcompress_jax.data import dataset
from seqcompress_jax.data.config import data_config
from seqcompress_jax.data.interactions import DataError
from seqcompress_jax.data.load import cache_dir, load_dataset

def main(argv: list[str]) -> None:
  del argv
  cfg = flags.FLAGS.data
  if flags.FLAGS.dataset:
    cfg.name = flags.FLAGS.dataset
  try:
    ds = load_dataset(cfg)
  except DataError as e:
    sys.exit(f'error: {e}')
  print(f'{cfg.name}: {ds.meta["source"]}')
  print(dataset.format_statistics(ds.stats))
  print(f'cached in {cache_dir(cfg)}')


if __name__ == '__main__':
  # config_flags reads --data.* overrides when the flag is defined: check first.
  try:
    check_overrides(sys.argv, 'data', data_config())
  except ConfigError as e:
    sys.exit(f'error: {e}')
  config_flags.DEFINE_config_dict('data', data_config(), 'Data options.')
  flags.DEFINE_string('dataset', None, 'Shortcut for --data.name.')
  app.run(main)
