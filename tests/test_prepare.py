"""load_dataset end to end: sources, the cache, its atomicity, bad input."""

import os
import subprocess
import sys

import numpy as np
import pytest

from seqcompress_jax.data import DataError, data_config, dataset, load, load_dataset, sources

LOG = """user,item,timestamp,rating
u1,a,1,5
u1,b,2,4
u1,c,3,3
u1,a,4,5
u2,b,1,2
u2,c,2,5
u2,d,3,4
u3,a,5,1
"""


@pytest.fixture
def file_config(tmp_path):
  path = tmp_path / 'log.csv'
  path.write_text(LOG)
  cfg = data_config()
  cfg.name, cfg.path, cfg.format = 'file', str(path), 'csv'
  cfg.rating_field = 'rating'
  cfg.cache_dir = str(tmp_path / 'cache')
  return cfg


def prepared_entries(cfg):
  root = os.path.join(cfg.cache_dir, 'prepared')
  return sorted(os.listdir(root)) if os.path.isdir(root) else []


def test_file_source_end_to_end(file_config):
  ds = load_dataset(file_config)
  # Training data (loo): u1's a, b; u2's b; u3's lone a (too short to evaluate).
  # a and b tie at 2 (raw-id order decides); c and d are only held out.
  assert ds.raw_item.tolist() == ['', 'a', 'b', 'c', 'd']
  assert ds.item_count.tolist() == [0, 2, 2, 0, 0]
  assert ds.raw_user.tolist() == ['u1', 'u2', 'u3']
  assert ds.raw_item[ds.items].tolist() == ['a', 'b', 'c', 'a', 'b', 'c', 'd', 'a']
  assert ds.test_user.tolist() == [0, 1] and ds.valid_pos.tolist() == [2, 1]
  assert ds.stats['interactions'] == 8 and ds.stats['users'] == 3


def test_cache_hit_does_not_read_the_source(file_config, monkeypatch):
  first = load_dataset(file_config)
  monkeypatch.setattr(sources, 'read_source', lambda cfg: pytest.fail('cache missed'))
  second = load_dataset(file_config)
  for name in ('items', 'offsets', 'raw_item', 'test_user', 'item_count'):
    assert np.array_equal(getattr(first, name), getattr(second, name))
  assert second.stats == first.stats
  assert len(prepared_entries(file_config)) == 1


def test_options_and_content_key_the_cache(file_config):
  load_dataset(file_config)
  file_config.min_rating = 3.0
  filtered = load_dataset(file_config)
  assert 'd' in filtered.raw_item and len(filtered.items) == 6
  with open(file_config.path, 'a') as f:
    f.write('u3,d,6,5\n')
  assert len(load_dataset(file_config).items) == 7
  assert len(prepared_entries(file_config)) == 3


def test_dedup_and_k_core_through_the_config(file_config):
  file_config.dedup = 'first'
  file_config.user_core = 3
  ds = load_dataset(file_config)  # u1 keeps a, b, c; u2 has b, c, d; u3 is dropped
  assert ds.raw_user.tolist() == ['u1', 'u2']
  assert ds.raw_item[ds.items].tolist() == ['a', 'b', 'c', 'b', 'c', 'd']


def test_a_failed_preparation_leaves_nothing(file_config, monkeypatch):
  file_config.min_rating = 6.0
  with pytest.raises(DataError, match='rating filter'):
    load_dataset(file_config)
  file_config.min_rating = 0.0

  def broken_savez(*args, **kwargs):
    raise OSError('disk full')

  monkeypatch.setattr(np, 'savez', broken_savez)
  with pytest.raises(OSError, match='disk full'):
    load_dataset(file_config)
  assert prepared_entries(file_config) == []  # no entry, no temp dir


def test_invalid_config_fields_are_named(file_config):
  for field, value, message in [('max_len', 0, 'data.max_len'), ('name', 'netflix', 'data.name'),
                                ('user_core', -1, 'data.user_core'),
                                ('train_stride', 10_000, r'data.train_stride: .*max_len')]:
    cfg = file_config.copy_and_resolve_references()
    cfg[field] = value
    with pytest.raises(DataError, match=message):
      load_dataset(cfg)
  file_config.path = ''
  with pytest.raises(DataError, match='data.path'):
    load_dataset(file_config)
  file_config.path = '/nonexistent/log.csv'
  with pytest.raises(DataError, match='/nonexistent/log.csv'):
    load_dataset(file_config)


def test_synthetic_source_is_cached_by_its_parameters(tmp_path):
  cfg = data_config()
  cfg.name, cfg.cache_dir = 'synthetic', str(tmp_path)
  cfg.synthetic.update(num_users=300, num_items=200, mean_len=12.0)
  ds = load_dataset(cfg)
  assert ds.num_users == 300 and ds.stats['interactions'] > 300 * 5
  assert (np.diff(ds.item_count[1:]) <= 0).all()  # frequency-sorted
  cfg.synthetic.seed = 1
  assert not np.array_equal(load_dataset(cfg).items, ds.items)
  assert len(prepared_entries(cfg)) == 2


def test_checksum_mismatch_writes_nothing(tmp_path, monkeypatch):
  class FakeResponse:
    def __enter__(self):
      return self

    def __exit__(self, *exc):
      return False

    def read(self):
      return b'not the movielens zip'

  monkeypatch.setattr(sources.urllib.request, 'urlopen', lambda url, timeout: FakeResponse())
  with pytest.raises(DataError, match='checksum mismatch.*ml-100k.zip'):
    sources.fetch_ml100k_from_grouplens(str(tmp_path))
  assert list(tmp_path.rglob('*')) == []


def test_offline_download_says_what_to_do(tmp_path, monkeypatch):
  def offline(url, timeout):
    raise sources.urllib.error.URLError('no route to host')

  monkeypatch.setattr(sources.urllib.request, 'urlopen', offline)
  with pytest.raises(DataError, match='offline.*data.path'):
    sources.fetch_ml100k_from_grouplens(str(tmp_path))


def test_a_file_that_is_not_ml100k_is_rejected(tmp_path):
  path = tmp_path / 'u.data'
  path.write_text('1\t2\t3\t881250949\n')
  with pytest.raises(DataError, match='u.data: content checksum .* does not match MovieLens-100K'):
    sources.read_ml100k(str(path), 'pypi', str(tmp_path))


def test_cache_dir_comes_from_the_environment(monkeypatch, tmp_path):
  monkeypatch.setenv('SEQCOMPRESS_DATA', str(tmp_path))
  cfg = data_config()
  assert load.cache_dir(cfg).startswith(str(tmp_path) + os.sep + 'prepared')
  assert sources.cache_root('/elsewhere') == '/elsewhere'


def test_saved_arrays_load_without_pickle(file_config):
  ds = load_dataset(file_config)
  entry = os.path.join(file_config.cache_dir, 'prepared', prepared_entries(file_config)[0])
  with np.load(os.path.join(entry, 'arrays.npz'), allow_pickle=False) as z:
    assert z['raw_item'].dtype.kind == 'U'
  assert dataset.load(entry).raw_user.tolist() == ds.raw_user.tolist()


def test_prepare_command_line(tmp_path):
  cmd = [sys.executable, '-m', 'seqcompress_jax.data.prepare', '--dataset=synthetic',
         f'--data.cache_dir={tmp_path}', '--data.synthetic.num_users=50',
         '--data.synthetic.num_items=40']
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-1000:]
  assert 'users 50' in out.stdout and f'cached in {tmp_path}' in out.stdout
  bad = subprocess.run(cmd + ['--data.synthetic.sed=1'], capture_output=True, text=True,
                       timeout=120)
  assert bad.returncode == 1 and "data.synthetic has no field 'sed'" in bad.stderr
  bad = subprocess.run(cmd + ['--data.min_rating=3'], capture_output=True, text=True,
                       timeout=120)
  assert bad.returncode == 1 and bad.stderr.startswith('error: data.min_rating=3.0 needs ratings')
