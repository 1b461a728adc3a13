"""Entry point: python -m seqcompress_jax.main --config=configs/X.py --workdir=DIR.

  --config=configs/nextitnet.py:smoke   a preset (see the config file)
  --config.model.embed_dim=128           any field overridden
  --mode=train | eval                    eval: metrics of the workdir's best model

Re-running a train command with the same workdir resumes from its latest
checkpoint.
"""

from __future__ import annotations

import importlib.util
import logging as std_logging
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from seqcompress_jax import config as config_lib
from seqcompress_jax import train
from seqcompress_jax.config import ConfigError
from seqcompress_jax.data import DataError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file[:presets].',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder for checkpoints and results.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval'], 'What to do.')
flags.mark_flags_as_required(['config', 'workdir'])


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """`path[:arg]` -> get_config(arg), as config_flags loads it."""
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('_config', path)
  if module_spec is None or module_spec.loader is None:
    raise ConfigError(f'--config: cannot load {path}')
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except FileNotFoundError as e:
    raise ConfigError(f'--config: no such file {path}') from e
  return module.get_config(arg or None)


def check_overrides(argv: list[str]) -> None:
  """Fails clearly on --config.a.b=v where the config file has no field a.b."""
  spec = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if spec is not None:
    config_lib.check_overrides(argv, 'config', load_config_file(spec))


def parse_flags(argv: list[str]) -> list[str]:
  try:
    check_overrides(argv)
    return flags.FLAGS(argv)
  except (ConfigError, flags.Error) as e:
    sys.exit(f'error: {e}')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.INFO)
  # Orbax logs every save at INFO; keep its warnings only.
  logging.get_absl_handler().addFilter(
      lambda record: record.levelno >= std_logging.WARNING or 'orbax' not in record.pathname)
  try:
    if _MODE.value == 'train':
      train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    else:
      train.evaluate_checkpoint(_CONFIG.value, _WORKDIR.value)
  except (ConfigError, DataError, FileNotFoundError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
