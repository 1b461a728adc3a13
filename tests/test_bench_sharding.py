"""The sharding benchmark's pieces on tiny sizes: the two model specs, and (in
a subprocess with 4 fake CPU devices, as JAX fixes its device count when it
starts) per-device parameter bytes and a few sharded train steps on an odd
catalogue, checked against the bytes counted by hand."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from seqcompress_jax import bench_sharding

V, D = 1001, 16  # Odd: the item tables are padded to 1,004 rows for 4 devices.

_ON_4_DEVICES = f'''
import json, jax
jax.config.update('jax_num_cpu_devices', 4)
from seqcompress_jax import bench_sharding as b
mesh = b.make_mesh(4)
params = {{v: b.param_memory(b.model_spec(v, {V}, {D}, 5, 4), mesh) for v in b.VARIANTS}}
train = {{'full:8': b.train_memory(b.model_spec('full', {V}, 8, 5, 4), mesh, 2, 2)}}
results = {{'params': params, 'train': train}}
print(json.dumps({{**results, 'table': b.format_tables(results)}}))
'''


@pytest.fixture(scope='module')
def on_4_devices() -> dict:
  done = subprocess.run([sys.executable, '-c', _ON_4_DEVICES], capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-4000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


def test_model_spec():
  full = bench_sharding.model_spec('full', V, D, 5, 4)
  cprec = bench_sharding.model_spec('cprec', V, D, 5, 4)
  for spec in (full, cprec):
    assert (spec.num_items, spec.embed_dim, spec.hidden_dim, spec.item_shards) == (V, D, D, 4)
    assert spec.dilations == (1, 4)
  assert (full.embedding, full.head) == ('full', 'full')
  assert (cprec.embedding, cprec.head, cprec.block_widths) == ('block', 'adaptive', (16, 4, 1))
  # The Zipf cutoffs at 50% / 80% of the interactions, and each tail's loss capacity.
  assert cprec.cutoffs == (25, 225, V)
  assert len(cprec.tail_capacity) == 2 and 0 < cprec.tail_capacity[1] < 1


def test_full_model_bytes_per_device(on_4_devices):
  r = on_4_devices['params']['full']
  items = 4 * (V * D * 2 + V)  # float32 embedding [V, D], kernel [D, V], bias [V].
  assert r['item_table_bytes'] == items
  assert r['replicated_bytes'] == items + r['small_bytes']
  # Each device: a quarter of the padded tables (1,004 rows), all the rest.
  assert r['per_device_bytes'] == r['min_per_device_bytes'] == r['arithmetic_bytes'] == (
      4 * (1004 * D * 2 + 1004) // 4 + r['small_bytes'])
  assert r['meets_target'] and r['per_device_bytes'] <= r['target_bytes']


def test_cprec_bytes_per_device(on_4_devices):
  r = on_4_devices['params']['cprec']
  # Split: the tails' tables [200, 4], [776, 1] and outputs [4, 200], [1, 776].
  assert r['item_table_bytes'] == 4 * 2 * (200 * 4 + 776 * 1)
  # Not padded (multiples of 4): a quarter each.
  assert r['per_device_bytes'] == r['arithmetic_bytes'] == (
      2 * (200 * 4 + 776 * 1) + r['small_bytes'])
  assert r['meets_target']


def test_sharded_train_steps(on_4_devices):
  r = on_4_devices['train']['full:8']
  assert (r['num_items'], r['dim'], r['model'], r['batch_size'], r['max_len']) == (V, 8, 4, 2, 5)
  assert len(r['losses']) == 2 and np.all(np.isfinite(r['losses']))
  assert r['losses'][1] < r['losses'][0]  # Two steps on the same batch.
  # Parameters and Adam's two moments: a quarter of the padded tables each.
  tables = 4 * (1004 * 8 * 2 + 1004) // 4
  assert 3 * tables < r['state_bytes_per_device'] < 3 * tables + 3 * 4 * 5000
  assert r['xla_per_device']['temporaries_bytes'] > 0 and r['peak_rss_mib'] > 0
  table = on_4_devices['table'].splitlines()
  assert table[2].startswith('| full | 1,001 | 16 |') and table[3].startswith('| cprec |')
  assert table[-1].startswith('| full | 1,001 | 8 | 2 x 5 |')
