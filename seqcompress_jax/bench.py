"""Benchmark on random batches: compile time, train and eval speed, peak memory,
parameters and MACs per backbone and width, each in a fresh process (own RSS).

  python -m seqcompress_jax.bench --backbones=nextitnet,sasrec --widths=32,64,128
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import jax
import numpy as np
from absl import app, flags

from seqcompress_jax import config as config_lib
from seqcompress_jax import profiling, writers
from seqcompress_jax.data import pipeline
from seqcompress_jax.models.spec import ModelSpec


def random_batch(rng: np.random.Generator, batch_size: int, max_len: int,
                 num_items: int) -> dict[str, np.ndarray]:
  """Uniform items in 1..V-1; every 8th row is left-padded to a random length."""
  window = rng.integers(1, num_items, (batch_size, max_len + 1), dtype=np.int32)
  length = np.where(np.arange(batch_size) % 8 == 0,
                    rng.integers(2, max_len + 2, batch_size), max_len + 1)
  window[np.arange(max_len + 1) < (max_len + 1 - length)[:, None]] = 0
  return pipeline.split_window(window)


def run_one(backbone: str, width: int, num_items: int, batch_size: int, max_len: int,
            steps: int, dtype: str = 'float32', eval_sequences: int = 1024) -> dict[str, Any]:
  """Times the train step and full-ranking evaluation of one model size
  (`dtype`: the compute dtype; parameters stay float32)."""
  config = config_lib.base_config()
  config.data.max_len = max_len
  config.model.update(backbone=backbone, embed_dim=width, hidden_dim=width,
                      ffn_dim=4 * width, dtype=dtype)
  spec = ModelSpec.from_config(config.model, num_items)
  rng = np.random.default_rng(0)
  batch = random_batch(rng, batch_size, max_len, num_items)
  eval_batch = random_batch(rng, eval_sequences, max_len, num_items)
  return {'device': jax.devices()[0].device_kind, 'backbone': backbone, 'width': width,
          'dtype': dtype, **profiling.measure(spec, batch, eval_batch, steps)}


# Table columns: (title, key of run_one's result, format).
_COLUMNS = (
    ('backbone', 'backbone', '{}'), ('width', 'width', '{}'), ('params', 'params', '{:,}'),
    ('MACs/seq', 'macs_inference', '{:,}'), ('compile s', 'compile_s', '{:.2f}'),
    ('ms/step', 'step_ms', '{:.1f}'), ('seq/s', 'sequences_per_s', '{:,.0f}'),
    ('positions/s', 'positions_per_s', '{:,.0f}'), ('GFLOP/s', 'gflops_per_s', '{:.1f}'),
    ('eval ms', 'eval_ms', '{:.1f}'), ('eval seq/s', 'eval_sequences_per_s', '{:,.0f}'),
    ('peak RSS MiB', 'peak_rss_mib', '{:,}'), ('peak device MiB', 'peak_device_mib', '{:,}'))


def main(argv: list[str]) -> None:
  del argv
  sizes = dict(num_items=flags.FLAGS.num_items, batch_size=flags.FLAGS.batch_size,
               max_len=flags.FLAGS.max_len, steps=flags.FLAGS.steps, dtype=flags.FLAGS.dtype)
  if flags.FLAGS.one:
    backbone, width = flags.FLAGS.one.split(':')
    print(json.dumps(run_one(backbone, int(width), **sizes)))
    return
  rows = []
  for backbone in flags.FLAGS.backbones:
    for width in flags.FLAGS.widths:
      out = subprocess.run([sys.executable, '-m', 'seqcompress_jax.bench',
                            f'--one={backbone}:{width}']
                           + [f'--{name}={value}' for name, value in sizes.items()],
                           capture_output=True, text=True, check=True)
      rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
  columns = [c for c in _COLUMNS if any(r[c[1]] is not None for r in rows)]  # CPU: no device.
  print(f'{rows[0]["device"]}, compute dtype {flags.FLAGS.dtype}\n')
  print('| ' + ' | '.join(title for title, _, _ in columns) + ' |')
  print('|' + '---|' * len(columns))
  for r in rows:
    print('| ' + ' | '.join(fmt.format(r[key]) for _, key, fmt in columns) + ' |')
  if flags.FLAGS.out:
    writers.write_json(flags.FLAGS.out, {**sizes, 'runs': rows})


if __name__ == '__main__':  # Flags here, not at import: tests import this module.
  flags.DEFINE_list('backbones', ['nextitnet', 'sasrec'], 'Backbones to run.')
  flags.DEFINE_list('widths', ['32', '64', '128'], 'embed_dim = hidden_dim values.')
  flags.DEFINE_integer('num_items', 1683, 'Vocabulary size V, PAD included.')
  flags.DEFINE_integer('batch_size', 256, 'Training sequences per step.')
  flags.DEFINE_integer('max_len', 50, 'Positions per sequence.')
  flags.DEFINE_integer('steps', 20, 'Timed training steps.')
  flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype.')
  flags.DEFINE_string('out', '', 'Write the results as JSON here.')
  flags.DEFINE_string('one', '', 'Internal: run one BACKBONE:WIDTH in this process.')
  app.run(main)
