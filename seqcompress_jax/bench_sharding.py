"""Memory of vocab-parallel item tables on fake CPU devices (issue 6's targets).

Params: the parameters of a `--params_items` catalogue at width `--params_dim`
(default 2M items, d = 256) created sharded on a mesh data = 1, model =
`--devices` (sharding.create: jit(init, out_shardings)), for the full model
(embedding + full softmax) and CpRec (block embedding + adaptive softmax):
the bytes each device holds, measured from the arrays' addressable shards,
against the arithmetic of the layout (NamedSharding.shard_shape) and against
replicated (the whole unpadded model on every device). The target: per-device
bytes <= replicated / model + the replicated (small) layers.

Train: `--steps` train steps (step_lib.jit_train_step, the state donated) on a
`--train_items` catalogue (default 10M) split over the same mesh, on batches
of i.i.d. Zipf ids: the process's peak RSS, each device's train state
(addressable shards) and XLA's per-device buffers of the compiled step
(memory_analysis: JAX exposes no per-device memory statistics on CPU).

Models: NextItNet (dilations (1, 4)), embed = hidden = d, item tables cut
into `--devices` parts (model.item_shards); CpRec's cutoffs cover 50% / 80%
of the expected Zipf interactions, each tail's loss capacity 1.5x its share
(the base config's cutoff_mass and capacity_factor). Each measurement runs in
a fresh process (its own peak RSS); this process sets the fake device count
before JAX starts.

  python -m seqcompress_jax.bench_sharding --devices=8 --out=bench_sharding.json
"""

from __future__ import annotations

import collections
import functools
import json
import resource
import subprocess
import sys
import time
from typing import Any

import jax
import numpy as np
from absl import app, flags
from jax.sharding import Mesh

from seqcompress_jax import bench_cprec, sharding, writers
from seqcompress_jax import config as config_lib
from seqcompress_jax import step as step_lib
from seqcompress_jax.models.model import Recommender
from seqcompress_jax.models.spec import ModelSpec

FLAGS = flags.FLAGS
VARIANTS = ('full', 'cprec')
_MIB = 2**20


def model_spec(variant: str, num_items: int, dim: int, max_len: int,
               item_shards: int) -> ModelSpec:
  """The 'full' or 'cprec' model of the module docstring."""
  cfg = config_lib.base_config().model
  cfg.update(dilations=(1, 4), embed_dim=dim, hidden_dim=dim, max_len=max_len, dropout=0.0,
             item_shards=item_shards)
  if variant == 'cprec':
    cfg.update(embedding='block', head='adaptive')
  counts = np.round(np.concatenate([[0.0], 1e12 * bench_cprec.zipf_weights(num_items)]))
  return ModelSpec.from_config(cfg, num_items, counts.astype(np.int64))


def make_mesh(model: int) -> Mesh:
  """The mesh data = 1, model = `model` over the first `model` devices."""
  config = config_lib.base_config()
  config.mesh.update(data=1, model=model)
  config.data.update(batch_size=1, eval_batch_size=1)
  config.model.item_shards = model
  return sharding.mesh_from_config(config, jax.devices()[:model])


def device_bytes(tree: Any) -> dict[int, int]:
  """Bytes each device holds of the arrays of `tree`, by device id."""
  held = collections.Counter()
  for x in jax.tree.leaves(tree):
    for shard in x.addressable_shards:
      held[shard.device.id] += shard.data.nbytes
  return dict(held)


def _nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
  return int(np.prod(shape)) * dtype.itemsize


def param_memory(spec: ModelSpec, mesh: Mesh) -> dict[str, Any]:
  """Per-device parameter bytes of `spec` created sharded on `mesh`: measured
  (the most any device holds), by the arithmetic of the layout, replicated
  (the unpadded model), and the target (replicated / model + small layers)."""
  init = functools.partial(step_lib.init_params, spec, 0)
  start = time.perf_counter()
  params, shardings = sharding.create(init, functools.partial(sharding.param_shardings, mesh))
  jax.block_until_ready(params)
  init_s = time.perf_counter() - start
  layout = list(zip(jax.tree.leaves(params), jax.tree.leaves(shardings)))
  arithmetic = sum(_nbytes(s.shard_shape(x.shape), x.dtype) for x, s in layout)
  real = jax.tree.leaves(jax.eval_shape(functools.partial(step_lib.init_params,
                                                          spec.unpadded, 0)))
  items = sum(_nbytes(x.shape, x.dtype) for x, (_, s) in zip(real, layout)
              if not s.is_fully_replicated)
  small = sum(_nbytes(x.shape, x.dtype) for x, (_, s) in zip(real, layout)
              if s.is_fully_replicated)
  model = mesh.shape[sharding.MODEL]
  per_device = device_bytes(params)
  target = (items + small) / model + small
  return {'num_items': spec.num_items, 'dim': spec.embed_dim, 'model': model,
          'replicated_bytes': items + small, 'item_table_bytes': items, 'small_bytes': small,
          'per_device_bytes': max(per_device.values()),
          'min_per_device_bytes': min(per_device.values()),
          'arithmetic_bytes': arithmetic, 'target_bytes': target,
          'meets_target': max(per_device.values()) <= target,
          'init_s': init_s, 'peak_rss_mib': _peak_rss_mib()}


def train_memory(spec: ModelSpec, mesh: Mesh, batch_size: int, steps: int) -> dict[str, Any]:
  """`steps` train steps of `spec` on `mesh` (one batch of Zipf ids): losses,
  times, the train state and XLA's buffers per device, the peak RSS."""
  tx = step_lib.make_optimizer(config_lib.base_config().optim, steps)
  start = time.perf_counter()
  state, shardings = step_lib.create_state(spec, tx, 0, mesh)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - start
  batch = sharding.global_batch(mesh, bench_cprec.zipf_batch(
      np.random.default_rng(0), batch_size, spec.max_len, spec.num_items))
  start = time.perf_counter()
  step_fn = step_lib.jit_train_step(Recommender(spec), tx, None, mesh, shardings).lower(
      state, batch).compile()
  compile_s = time.perf_counter() - start
  analysis = step_fn.memory_analysis()
  losses, times = [], []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = step_fn(state, batch)
    losses.append(float(metrics['loss']))  # Waits for the step.
    times.append(time.perf_counter() - start)
  state_bytes = device_bytes(state)
  return {'num_items': spec.num_items, 'dim': spec.embed_dim,
          'model': mesh.shape[sharding.MODEL],
          'batch_size': batch_size, 'max_len': spec.max_len, 'losses': losses,
          'step_s': float(np.median(times)), 'init_s': init_s, 'compile_s': compile_s,
          'state_bytes_per_device': max(state_bytes.values()),
          'xla_per_device': {
              'arguments_bytes': analysis.argument_size_in_bytes,
              'outputs_bytes': analysis.output_size_in_bytes,
              'aliased_bytes': analysis.alias_size_in_bytes,
              'temporaries_bytes': analysis.temp_size_in_bytes},
          'peak_rss_mib': _peak_rss_mib()}


def _peak_rss_mib() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # KiB on Linux.


def format_tables(results: dict[str, Any]) -> str:
  """The params and train measurements as two Markdown tables."""
  lines = ['| model | V | d | replicated MiB | item tables MiB | small layers MiB | per device '
           'MiB (measured) | per device MiB (arithmetic) | target MiB | meets target | '
           'init s | peak RSS MiB |', '|---|---|---|---|---|---|---|---|---|---|---|---|']
  for variant, r in results['params'].items():
    mib = [r[k] / _MIB for k in ('replicated_bytes', 'item_table_bytes', 'small_bytes',
                                 'per_device_bytes', 'arithmetic_bytes', 'target_bytes')]
    lines.append(f"| {variant} | {r['num_items']:,} | {r['dim']} | "
                 + ' | '.join(f'{m:,.1f}' for m in mib)
                 + f" | {r['meets_target']} | {r['init_s']:.1f} | {r['peak_rss_mib']:,} |")
  lines += ['', '| model | V | d | batch x positions | train state MiB per device | XLA '
            'temporaries MiB per device | step s | losses | peak RSS MiB |',
            '|---|---|---|---|---|---|---|---|---|']
  for run, r in results['train'].items():
    lines.append(
        f"| {run.split(':')[0]} | {r['num_items']:,} | {r['dim']} | {r['batch_size']} x {r['max_len']} | "
        f"{r['state_bytes_per_device'] / _MIB:,.1f} | "
        f"{r['xla_per_device']['temporaries_bytes'] / _MIB:,.1f} | {r['step_s']:.2f} | "
        f"{', '.join(f'{x:.3f}' for x in r['losses'])} | {r['peak_rss_mib']:,} |")
  return '\n'.join(lines)


def _in_subprocess(one: str) -> dict[str, Any]:
  """The JSON a fresh `--one` process prints, given this process's flags."""
  out = subprocess.run([sys.executable, '-m', 'seqcompress_jax.bench_sharding', *sys.argv[1:],
                        f'--one={one}'], capture_output=True, text=True)
  if out.returncode:
    raise RuntimeError(f'--one={one} failed:\n{out.stderr[-4000:]}')
  return json.loads(out.stdout.strip().splitlines()[-1])


def measure(one: str) -> dict[str, Any]:
  """One measurement with FLAGS' sizes: 'params:VARIANT' or 'train:VARIANT:DIM'."""
  kind, variant, *dim = one.split(':')
  if variant not in VARIANTS:
    raise ValueError(f'{one}: expected a variant in {VARIANTS}, got {variant!r}')
  mesh = make_mesh(FLAGS.devices)
  if kind == 'params':
    return param_memory(model_spec(variant, FLAGS.params_items, FLAGS.params_dim,
                                   FLAGS.max_len, FLAGS.devices), mesh)
  spec = model_spec(variant, FLAGS.train_items, int(dim[0]), FLAGS.max_len, FLAGS.devices)
  return train_memory(spec, mesh, FLAGS.batch_size, FLAGS.steps)


def main(argv: list[str]) -> None:
  del argv
  jax.config.update('jax_num_cpu_devices', FLAGS.devices)  # Before JAX starts.
  if FLAGS.one:
    print(json.dumps(measure(FLAGS.one)))
    return
  results = {'params': {variant: _in_subprocess(f'params:{variant}') for variant in VARIANTS},
             'train': {run: _in_subprocess(f'train:{run}') for run in FLAGS.train}}
  print(f'{FLAGS.devices} fake CPU devices, mesh data = 1 x model = {FLAGS.devices}\n')
  print(format_tables(results))
  if FLAGS.out:
    writers.write_json(FLAGS.out, results)


if __name__ == '__main__':  # Flags here, not at import: tests import this module.
  flags.DEFINE_integer('devices', 8, 'Fake CPU devices, all on mesh.model.')
  flags.DEFINE_integer('params_items', 2_000_000, 'Params: V, PAD included.')
  flags.DEFINE_integer('params_dim', 256, 'Params: embed_dim = hidden_dim.')
  flags.DEFINE_integer('train_items', 10_000_000, 'Train: V, PAD included.')
  flags.DEFINE_list('train', ['cprec:64', 'full:16'], f'Train: VARIANT:DIM runs, VARIANT '
                    f'one of {VARIANTS}, DIM embed_dim = hidden_dim.')
  flags.DEFINE_integer('batch_size', 2, 'Train: sequences per step.')
  flags.DEFINE_integer('max_len', 20, 'Positions per sequence.')
  flags.DEFINE_integer('steps', 3, 'Train: timed steps (after compiling).')
  flags.DEFINE_string('out', '', 'Write the results as JSON here.')
  flags.DEFINE_string('one', '', 'Internal: run one measurement (params:VARIANT or '
                      'train:VARIANT:DIM) in this process.')
  app.run(main)
