"""Where interactions come from: MovieLens-100K (fetched and verified), the
synthetic generator, or a user's file. Each source also has a fingerprint that
keys the prepared-data cache."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile

import ml_collections
import numpy as np

from seqcompress_jax.data import formats, synthetic
from seqcompress_jax.data.interactions import DataError, Interactions
from seqcompress_jax.files import atomic_write

RECBOLE_WHEEL = 'recbole==1.2.1'
RECBOLE_MEMBER = 'recbole/dataset_example/ml-100k/ml-100k.inter'
ML100K_INTER_SHA256 = '4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff'
ML100K_URL = 'https://files.grouplens.org/datasets/movielens/ml-100k.zip'
ML100K_ZIP_MD5 = '0e33842e24a9c977be4e0107933c0723'  # Published by GroupLens.
# sha256 of the (user, item, rating, timestamp) columns as little-endian int64,
# column after column, in file order. The RecBole .inter and GroupLens' u.data
# hold the same rows in the same order, so every origin must match it.
ML100K_CONTENT_SHA256 = 'f87fc0c7375bd73968688c631177b12bbdfd2fad858ac6f56dc32d9ce3f278c8'
DOWNLOAD_TIMEOUT_S = 20


def cache_root(configured: str = '') -> str:
  """The cache folder: `configured`, else $SEQCOMPRESS_DATA, else ~/.cache/..."""
  return os.path.abspath(os.path.expanduser(
      configured or os.environ.get('SEQCOMPRESS_DATA')
      or '~/.cache/seqcompress_jax'))


def file_digest(path: str, algorithm: str = 'sha256') -> str:
  """Hex digest of a file, read in 1 MiB chunks."""
  h = hashlib.new(algorithm)
  try:
    with open(path, 'rb') as f:
      for chunk in iter(lambda: f.read(1 << 20), b''):
        h.update(chunk)
  except OSError as e:
    raise DataError(f'cannot read {path}: {e.strerror}') from e
  return h.hexdigest()


def fingerprint(cfg: ml_collections.ConfigDict) -> dict:
  """What identifies the raw data of `cfg`, without reading it where possible."""
  if cfg.name == 'ml-100k':
    return {'name': 'ml-100k', 'content_sha256': ML100K_CONTENT_SHA256}
  if cfg.name == 'synthetic':
    return {'name': 'synthetic', **cfg.synthetic.to_dict()}
  if cfg.name == 'file':
    return {'name': 'file', 'sha256': file_digest(_log_path(cfg)),
            **{k: cfg[k] for k in ('format', 'sep', 'header', 'user_field',
                                   'item_field', 'time_field', 'rating_field')}}
  raise DataError(f"data.name: expected one of ('ml-100k', 'synthetic', 'file'), "
                  f'got {cfg.name!r}')


def _log_path(cfg: ml_collections.ConfigDict) -> str:
  if not cfg.path:
    raise DataError("data.path: data.name='file' needs the path of a log file")
  return cfg.path


def read_source(cfg: ml_collections.ConfigDict) -> Interactions:
  """Reads (fetching if needed) the raw interactions that `cfg` names."""
  if cfg.name == 'ml-100k':
    return read_ml100k(cfg.path, cfg.origin, cache_root(cfg.cache_dir))
  if cfg.name == 'synthetic':
    return synthetic.generate(**cfg.synthetic.to_dict())
  return formats.read_interactions(
      _log_path(cfg), cfg.format, sep=cfg.sep or None,
      header=cfg.header if cfg.format == 'csv' else None,
      user_field=cfg.user_field, item_field=cfg.item_field,
      time_field=cfg.time_field, rating_field=cfg.rating_field or None)


def read_ml100k(path: str, origin: str, root: str) -> Interactions:
  """MovieLens-100K from a local zip / u.data / .inter, or fetched by `origin`."""
  if not path:
    if origin == 'pypi':
      path = fetch_ml100k_from_pypi(root)
    elif origin == 'grouplens':
      path = fetch_ml100k_from_grouplens(root)
    else:
      raise DataError(f'data.origin: expected pypi or grouplens, got {origin!r}')
  if path.endswith('.zip'):
    inter = _read_zipped_u_data(path)
  else:
    inter = formats.read_interactions(path, 'auto')
  columns = [inter.user, inter.item, inter.rating, inter.timestamp]
  if inter.rating is None or any(c.dtype.kind not in 'iuf' for c in columns):
    raise DataError(f'{path}: not MovieLens-100K (expected numeric user, item, '
                    'rating and timestamp columns)')
  digest = hashlib.sha256(np.stack(columns).astype('<i8').tobytes()).hexdigest()
  if digest != ML100K_CONTENT_SHA256:
    raise DataError(f'{path}: content checksum {digest[:12]}... does not match '
                    f'MovieLens-100K ({ML100K_CONTENT_SHA256[:12]}...)')
  return inter


def _read_zipped_u_data(path: str) -> Interactions:
  try:
    with zipfile.ZipFile(path) as z, tempfile.TemporaryDirectory() as tmp:
      member = next((n for n in z.namelist() if n.endswith('/u.data')), None)
      if member is None:
        raise DataError(f'{path}: no ml-100k/u.data inside the zip')
      return formats.read_interactions(z.extract(member, tmp), 'u.data')
  except (OSError, zipfile.BadZipFile) as e:
    raise DataError(f'cannot read the zip {path}: {e}') from e


def fetch_ml100k_from_pypi(root: str) -> str:
  """The RecBole wheel's ml-100k.inter, via `pip download`, sha256-verified."""
  target = os.path.join(root, 'raw', 'ml-100k.inter')
  if os.path.exists(target) and file_digest(target) == ML100K_INTER_SHA256:
    return target
  with tempfile.TemporaryDirectory() as tmp:
    cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--only-binary=:all:',
           '--disable-pip-version-check', '-q', '-d', tmp, RECBOLE_WHEEL]
    try:
      run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
      raise DataError(f'could not run pip to fetch {RECBOLE_WHEEL}: {e}') from e
    wheels = [f for f in os.listdir(tmp) if f.endswith('.whl')]
    if run.returncode != 0 or not wheels:
      raise DataError(
          f'pip could not download {RECBOLE_WHEEL} (offline?). Pass a local copy '
          f'with --config.data.path=/path/to/ml-100k.zip (or u.data). pip said: '
          f'{run.stderr.strip()[-500:]}')
    with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as z:
      data = z.read(RECBOLE_MEMBER)
  _write_verified(data, target, hashlib.sha256(data).hexdigest(), ML100K_INTER_SHA256,
                  f'{RECBOLE_MEMBER} in {RECBOLE_WHEEL}')
  return target


def fetch_ml100k_from_grouplens(root: str) -> str:
  """The official GroupLens zip over HTTPS (short timeout), md5-verified."""
  target = os.path.join(root, 'raw', 'ml-100k.zip')
  if os.path.exists(target) and file_digest(target, 'md5') == ML100K_ZIP_MD5:
    return target
  try:
    with urllib.request.urlopen(ML100K_URL, timeout=DOWNLOAD_TIMEOUT_S) as response:
      data = response.read()
  except (urllib.error.URLError, OSError) as e:
    raise DataError(
        f'cannot download {ML100K_URL} ({e}); this machine may be offline. Use '
        "--config.data.origin=pypi or a local copy with --config.data.path") from e
  _write_verified(data, target, hashlib.md5(data).hexdigest(), ML100K_ZIP_MD5, ML100K_URL)
  return target


def _write_verified(data: bytes, target: str, digest: str, expected: str,
                    what: str) -> None:
  if digest != expected:
    raise DataError(f'checksum mismatch for {what}: got {digest}, expected {expected}')
  atomic_write(target, data)
