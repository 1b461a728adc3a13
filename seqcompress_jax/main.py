"""Entry point: python -m seqcompress_jax.main --config=configs/X.py --workdir=DIR.

  --config=configs/nextitnet.py:smoke   a preset (see the config file)
  --config.model.embed_dim=128           any field overridden
  --mode=train | eval                    eval: metrics of the workdir's best model
  --mode=export [--export_dir=DIR] [--export_k=50] [--export_topk=fast|full]
                                         a self-contained directory for serving the
                                         workdir's model (export.py; default
                                         WORKDIR/export); --config may be left out:
                                         the run's own config.json is used
  --config.mesh.data=-1 --config.mesh.model=8   the device mesh (sharding.py)
  --distributed                          one process of a multi-process run

Re-running a train command with the same workdir resumes from its latest
checkpoint.

Multi-process (multi-host) runs: start the same command on every host with
--distributed, or with the environment variable SEQCOMPRESS_DISTRIBUTED=1
(which sets its default). It calls jax.distributed.initialize() before
anything else. On TPU pods, under SLURM and Open MPI the coordinator, the
process count and this process's id are found automatically; elsewhere give
them, e.g. on two processes of one machine:

  python -m seqcompress_jax.main --config=... --workdir=... --distributed
      --coordinator_address=127.0.0.1:12345 --num_processes=2 --process_id=0  (and =1)

The mesh then spans the devices of every process, each process loads its own
rows of every batch, and only process 0 writes the workdir's logs and results.

Under SLURM JAX gives each process the GPU of its local rank; with one
process per node, --local_device_ids=0,1,...,G-1 gives it the node's G GPUs
(launch/slurm_gpu.sh does both). The workdir must be one folder that every
process sees (a shared file system): each process saves its shards of the
checkpoints there.
"""

from __future__ import annotations

import importlib.util
import logging as std_logging
import os
import sys

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from seqcompress_jax import config as config_lib
from seqcompress_jax import export, train
from seqcompress_jax.config import ConfigError
from seqcompress_jax.data import DataError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file[:presets].',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder for checkpoints and results.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'export'], 'What to do.')
_EXPORT_DIR = flags.DEFINE_string('export_dir', None,
                                  'With --mode=export: where to write it (default WORKDIR/export).')
_EXPORT_K = flags.DEFINE_integer('export_k', export.DEFAULT_K,
                                 'With --mode=export: the most items a recommendation can hold.')
_EXPORT_TOPK = flags.DEFINE_enum(
    'export_topk', 'fast', export.TOPK_METHODS, "With --mode=export, CpRec's adaptive "
    'softmax: its fast exact top-k, or the top k of all its log-probabilities (export.py).')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', os.environ.get('SEQCOMPRESS_DISTRIBUTED') == '1',
    'Call jax.distributed.initialize() first: one process of a multi-process run '
    '(default: the environment variable SEQCOMPRESS_DISTRIBUTED=1).')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'With --distributed: host:port of process 0 '
    '(default: found by jax.distributed, or JAX_COORDINATOR_ADDRESS).')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'With --distributed: the number of processes (default: found).')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'With --distributed: this process, 0..num_processes-1 (default: found).')
_LOCAL_DEVICE_IDS = flags.DEFINE_list(
    'local_device_ids', None, 'With --distributed: the local GPUs this process uses, e.g. '
    '0,1,2,3 for one process per node (default: all of them, except under SLURM and Open '
    'MPI, where JAX gives each process the one GPU of its local rank).')
flags.register_validator('local_device_ids',
                         lambda ids: ids is None or all(i.isdigit() for i in ids),
                         message='expected comma-separated device numbers, e.g. 0,1,2,3')
flags.mark_flags_as_required(['workdir'])
flags.register_multi_flags_validator(
    ['config', 'mode'], lambda f: f['config'] is not None or f['mode'] == 'export',
    message='--config is required (except with --mode=export)')


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
  if _DISTRIBUTED.value:
    jax.distributed.initialize(
        _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
        None if _LOCAL_DEVICE_IDS.value is None else [int(i) for i in _LOCAL_DEVICE_IDS.value])
  logging.set_verbosity(logging.INFO)
  # Orbax logs every save at INFO; keep its warnings only.
  logging.get_absl_handler().addFilter(
      lambda record: record.levelno >= std_logging.WARNING or 'orbax' not in record.pathname)
  try:
    if _MODE.value == 'train':
      train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    elif _MODE.value == 'eval':
      train.evaluate_checkpoint(_CONFIG.value, _WORKDIR.value)
    else:
      if _CONFIG.value is not None:
        logging.info('--mode=export exports the run as its config.json describes it; '
                     '--config is not used')
      manifest = export.export_run(_WORKDIR.value, _EXPORT_DIR.value, _EXPORT_K.value,
                                   topk=_EXPORT_TOPK.value)
      logging.info('Exported the %s model of %s (%s) to %s', manifest['kind'], _WORKDIR.value,
                   manifest['source']['checkpoint'],
                   _EXPORT_DIR.value or os.path.join(_WORKDIR.value, 'export'))
  except (ConfigError, DataError, FileNotFoundError, export.ExportError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
