"""Two real processes on localhost train, resume and evaluate as one process does.

Pairs of processes, each with 2 fake CPU devices, run the training program
(`seqcompress_jax.main --distributed`, this file run as a script) with a
jax.distributed coordinator on 127.0.0.1; JAX's CPU backend runs the
collectives between them over gloo (`jax_cpu_collectives_implementation`'s
default, nothing to set). The first pair trains 4 steps on a 4 x 1 mesh (data
parallel across the processes); the second resumes that run from its
checkpoint to step 6 on a 1 x 4 mesh (the item tables split across the
processes, each loading every row of every batch); the third evaluates it
(`--mode=eval`) on 2 x 2. This process trains the same 6 steps on one device,
and the two runs must agree: parameters and optimizer state within float
tolerance, the same losses, evaluations and results. Each process records the
files it writes (Python audit hooks): only process 0 writes the workdir's
config.json, metrics.jsonl, results.json, eval.json and TensorBoard events.
Two more pairs check sharding.process_rows (which rows of every batch a
process loads) on meshes laid out five ways over the processes' devices, and
save the same steps into two checkpoint folders at once, as the program's
`checkpoints` and `best` do (the processes' barriers must not mix).
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import subprocess
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import app
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from seqcompress_jax import main as main_lib
from seqcompress_jax import sharding
from seqcompress_jax import step as step_lib
from seqcompress_jax import train
from seqcompress_jax.checkpointing import Checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = 'configs/nextitnet.py:smoke'  # NextItNet with embedding dropout: the rng must agree too.
# A seconds-long run: 60 items, 61 ids with PAD, the item tables padded to 64
# rows (model.item_shards = 4) for the 1 x 4 and 2 x 2 meshes to split them.
OVERRIDES = {
    'data.synthetic.num_users': 120, 'data.synthetic.num_items': 65,
    'model.item_shards': 4,
    'data.synthetic.mean_len': 12.0, 'data.synthetic.max_len': 30,
    'data.max_len': 10, 'data.batch_size': 16, 'data.eval_batch_size': 32,
    'model.embed_dim': 16, 'model.hidden_dim': 16, 'model.dilations': (1, 2),
    'train.eval_every_steps': 2, 'train.log_every_steps': 2,
}
STEPS = 6
# The pairs of processes, one after the other: --config.FIELD=VALUE and flags.
PAIRS = {
    # --local_device_ids: GPUs only, so a no-op here but for the flag's path.
    'train': {'train.max_steps': 4, 'mesh.data': -1, 'mesh.model': 1,
              '--local_device_ids': '0,1'},
    'resume': {'train.max_steps': STEPS, 'mesh.data': 1, 'mesh.model': 4},
    'eval': {'train.max_steps': STEPS, 'mesh.data': 2, 'mesh.model': 2, '--mode': 'eval'},
}
# Files of the workdir that only process 0 writes, by pair; TensorBoard's
# events ('tensorboard') are written too when tensorboardX is installed.
OUTPUTS = {'train': {'config.json', 'metrics.jsonl', 'results.json'},
           'resume': {'config.json', 'metrics.jsonl', 'results.json'},
           'eval': {'config.json', 'eval.json'}}
TIMEOUT_S = 300
SAVES = 5  # Steps the 'save' pair saves into both folders.


def run_config(cache_dir: str):
  """The config the processes build from CONFIG, OVERRIDES and the last pair's fields."""
  config = main_lib.load_config_file(os.path.join(REPO, CONFIG))
  config.update_from_flattened_dict({**OVERRIDES, 'data.cache_dir': cache_dir,
                                     'train.max_steps': STEPS})
  return config


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def run_pair(name: str, root: str, args: Callable[[int], list[str]],
             timeout_s: float) -> list[str]:
  """Runs this file as a script in two processes (`args(i)`: process i's
  arguments) to the end; returns their logs."""
  # No backend optimisation: compiling dominates these tiny programs on CPU.
  env = {**os.environ, 'XLA_FLAGS': (os.environ.get('XLA_FLAGS', '')
                                     + ' --xla_force_host_platform_device_count=2'
                                     ' --xla_backend_optimization_level=0')}
  procs, logs = [], []
  for i in range(2):
    logs.append(os.path.join(root, f'{name}.{i}.log'))
    with open(logs[-1], 'w') as log:
      procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), *args(i)],
                                    env=env, stdout=log, stderr=subprocess.STDOUT))
  deadline = time.monotonic() + timeout_s
  try:
    codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    failure = f'exit codes {codes}' if any(codes) else ''
  except subprocess.TimeoutExpired:
    failure = f'still running after {timeout_s} s'
  finally:
    for p in procs:  # JAX catches SIGTERM (pre-emption), so kill.
      if p.poll() is None:
        p.kill()
        p.wait()
  texts = [open(log).read() for log in logs]
  if failure:
    raise AssertionError(f'{name}: {failure}\n' + '\n'.join(
        f'--- process {i} (last 3000 characters):\n{t[-3000:]}' for i, t in enumerate(texts)))
  return texts


def train_pair(name: str, root: str, workdir: str, cache_dir: str) -> list[str]:
  """`seqcompress_jax.main --distributed` on two processes (PAIRS[name])."""
  fields = {**OVERRIDES, 'data.cache_dir': cache_dir, **PAIRS[name]}
  flags = [f'--config={os.path.join(REPO, CONFIG)}', f'--workdir={workdir}', '--distributed',
           f'--coordinator_address=127.0.0.1:{free_port()}', '--num_processes=2']
  flags += [f'{k}={v}' if k.startswith('--') else f'--config.{k}={v}'
            for k, v in fields.items()]
  return run_pair(name, root, lambda i: ['main', record_path(root, name, i), *flags,
                                         f'--process_id={i}'], TIMEOUT_S)


def record_path(root: str, name: str, process: int) -> str:
  """Where process `process` of pair `name` records the files it writes."""
  return os.path.join(root, f'{name}.{process}.writes.json')


@pytest.fixture(scope='module')
def runs(tmp_path_factory) -> dict:
  """The one-process run, then the three pairs on another workdir."""
  root = str(tmp_path_factory.mktemp('multiprocess'))
  cache_dir = os.path.join(root, 'cache')  # Filled by the one-process run first.
  one = os.path.join(root, 'one_process')
  results = train.train_and_evaluate(run_config(cache_dir), one)
  two = os.path.join(root, 'two_processes')
  logs = {name: train_pair(name, root, two, cache_dir) for name in PAIRS}
  return {'root': root, 'one': one, 'two': two, 'results': results, 'logs': logs,
          'cache_dir': cache_dir}


def read_json(path: str):
  with open(path) as f:
    return json.load(f)


def metrics_by_step(workdir: str, split: str) -> dict[int, dict]:
  """metrics.jsonl's records of a split by step (a later record of a step wins)."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r for r in map(json.loads, f) if r['split'] == split}


def assert_metrics_close(actual: dict, expected: dict, keys=None) -> None:
  """Equal (within float rounding) at `keys`, by default every metric of `expected`."""
  keys = sorted(set(expected) - {'step', 'split'}) if keys is None else keys
  assert {k: actual[k] for k in keys} == pytest.approx({k: expected[k] for k in keys},
                                                        rel=1e-5, abs=1e-6)


def latest_state(config, workdir: str):
  """The latest train state of `workdir`, on this process's one device."""
  run = train.setup(config, workdir)
  tx = step_lib.make_optimizer(config.optim, config.train.max_steps)
  checkpoints = Checkpoints(os.path.join(workdir, 'checkpoints'), max_to_keep=2)
  state, meta = checkpoints.restore(jax.jit(
      lambda: step_lib.init_state(run.spec, tx, config.seed))())
  checkpoints.close()
  return state, meta


def test_two_processes_train_and_resume_like_one(runs):
  one, two = runs['one'], runs['two']
  for log in runs['logs']['resume']:  # Both processes of the second pair resumed.
    assert 'Resumed from step 4' in log
  config = run_config(runs['cache_dir'])
  (a, a_meta), (b, b_meta) = latest_state(config, two), latest_state(config, one)
  assert int(a['step']) == int(b['step']) == STEPS
  assert a_meta['iterator'] == b_meta['iterator']
  trained = [{'params': s['params'], 'opt_state': s['opt_state']} for s in (a, b)]
  assert jax.tree.structure(trained[0]) == jax.tree.structure(trained[1])
  for (key_path, x), y in zip(jax.tree_util.tree_leaves_with_path(trained[0]),
                              map(np.asarray, jax.tree.leaves(trained[1]))):
    np.testing.assert_allclose(np.asarray(x), y, rtol=1e-4, atol=1e-5 * np.abs(y).max(),
                               err_msg=jax.tree_util.keystr(key_path))
  # The same training losses and evaluations at every step, and the same results.
  for split in ('train', 'valid'):
    ours, theirs = metrics_by_step(two, split), metrics_by_step(one, split)
    assert sorted(ours) == sorted(theirs) == [2, 4, 6]
    for step in ours:
      assert_metrics_close(ours[step], theirs[step],
                           ['loss', 'grad_norm'] if split == 'train' else None)
  results, expected = read_json(os.path.join(two, 'results.json')), runs['results']
  assert (results['steps'], results['best_step']) == (expected['steps'], expected['best_step'])
  assert results['params'] == expected['params']
  for split in ('valid', 'test'):
    assert_metrics_close(results[split], expected[split])
  assert metrics_by_step(two, 'test')[expected['best_step']] == {
      'step': expected['best_step'], 'split': 'test', **results['test']}


def test_two_processes_evaluate_a_checkpoint(runs):
  evaluated = read_json(os.path.join(runs['two'], 'eval.json'))
  results = read_json(os.path.join(runs['two'], 'results.json'))
  assert evaluated['checkpoint'] == f"best (step {results['best_step']})"
  for split in ('valid', 'test'):
    assert_metrics_close(evaluated[split], results[split])


def test_only_process_0_writes_the_outputs(runs):
  for name, outputs in OUTPUTS.items():
    written = [read_json(record_path(runs['root'], name, i)) for i in range(2)]
    tops = [{p.split(os.sep)[0] for p in w if not p.startswith(('checkpoints', 'best'))}
            for w in written]
    assert outputs <= tops[0] <= outputs | {'tensorboard'}, name
    assert tops[1] == set(), name
  with open(os.path.join(runs['two'], 'metrics.jsonl')) as f:  # Every record once.
    records = [(r['step'], r['split']) for r in map(json.loads, f)]
  assert len(records) == len(set(records)) and (4, 'test') in records


# The four devices of the two processes (0 and 1: process 0's, 2 and 3:
# process 1's) laid out as data x model meshes -> each process's
# process_rows, and the global batch (row ids) its block of 8 rows makes.
LAYOUTS = {
    'data 4, by process': ([[0], [1], [2], [3]], [(0, 2), (1, 2)], list(range(8))),
    'data 4, interleaved': ([[0], [2], [1], [3]], [(0, 2), (1, 2)], [0, 1, 4, 5, 2, 3, 6, 7]),
    'data 2 x model 2': ([[0, 1], [2, 3]], [(0, 2), (1, 2)], list(range(8))),
    'model across processes': ([[0, 2], [1, 3]], [(0, 1), (0, 1)], list(range(8))),
    'model 4': ([[0, 1, 2, 3]], [(0, 1), (0, 1)], list(range(8))),
}


def test_each_process_loads_the_rows_its_devices_hold(tmp_path):
  coordinator = f'127.0.0.1:{free_port()}'
  run_pair('rows', str(tmp_path), lambda i: ['rows', str(tmp_path), coordinator, str(i)],
           timeout_s=60)
  seen = [read_json(str(tmp_path / f'rows.{i}.json')) for i in range(2)]
  for name, (_, rows, batch) in LAYOUTS.items():
    assert [tuple(s[name]['rows']) for s in seen] == rows, name
    assert seen[0][name]['batch'] == seen[1][name]['batch'] == batch, name


def test_two_folders_save_the_same_steps_at_once(tmp_path):
  # Without distinct barrier names (checkpointing.Checkpoints) the two folders'
  # saves of one step collide in the coordination service: a process fails
  # ("Barrier ... is already ongoing") and the other waits until killed.
  coordinator = f'127.0.0.1:{free_port()}'
  run_pair('save', str(tmp_path), lambda i: ['save', str(tmp_path), coordinator, str(i)],
           timeout_s=60)
  for name in ('best', 'checkpoints'):
    folder = Checkpoints(str(tmp_path / name), max_to_keep=1)
    tree, meta = folder.restore({'x': jnp.zeros(8)})
    assert folder.latest_step() == SAVES and meta == {'step': SAVES}
    np.testing.assert_array_equal(tree['x'], 10 * SAVES + np.arange(8.0))
    folder.close()


# ---------------------------------------------------------------- one process of a pair
def _record_writes(path: str, workdir: str) -> None:
  """Records (in `path`, at exit) the files under `workdir` that this process
  opens for writing or renames into place, relative to it."""
  workdir = os.path.abspath(workdir)
  written: set[str] = set()

  def hook(event: str, args: tuple) -> None:
    if event == 'open':
      name, mode, flags = args
      writes = (set(mode) & set('wax+') if isinstance(mode, str)
                else mode is None and flags & (os.O_WRONLY | os.O_RDWR))
    elif event == 'os.rename':  # os.rename and os.replace.
      name, writes = args[1], True
    else:
      return
    if writes and isinstance(name, (str, bytes, os.PathLike)):
      name = os.path.abspath(os.fsdecode(name))
      if name.startswith(workdir + os.sep):
        relative = os.path.relpath(name, workdir)
        if not os.path.basename(relative).startswith('.tmp-'):  # files.atomic_write's.
          written.add(relative)

  sys.addaudithook(hook)
  atexit.register(lambda: open(path, 'w').write(json.dumps(sorted(written))))


def _rows(directory: str, process_id: int) -> None:
  """Writes directory/rows.PROCESS.json: for each of LAYOUTS, this process's
  process_rows and the global batch (gathered whole) of its block of the
  rows 0..7."""
  devices = jax.devices()  # Process 0's two, then process 1's.
  seen = {}
  for name, (layout, _, _) in LAYOUTS.items():
    mesh = Mesh(np.array(devices)[np.array(layout)], (sharding.DATA, sharding.MODEL))
    k, n = sharding.process_rows(mesh)
    block = np.arange(8)[k * 8 // n:(k + 1) * 8 // n]
    seen[name] = {'rows': [k, n],
                  'batch': sharding.to_host(sharding.global_batch(mesh, block)).tolist()}
  with open(os.path.join(directory, f'rows.{process_id}.json'), 'w') as f:
    json.dump(seen, f)


def _save_together(directory: str, process_id: int) -> None:
  """Saves steps 1..SAVES of an array split over both processes into the
  folders `best` and `checkpoints` of `directory`, one right after the other."""
  rows = NamedSharding(jax.make_mesh((4,), ('data',)), P('data'))
  folders = [Checkpoints(os.path.join(directory, name), max_to_keep=1)
             for name in ('best', 'checkpoints')]
  for step in range(1, SAVES + 1):
    x = jax.make_array_from_process_local_data(rows, 10 * step + 4 * process_id + np.arange(4.0))
    for folder in folders:
      folder.save(step, {'x': x}, {'step': step})
  for folder in folders:
    folder.close()


if __name__ == '__main__':
  # One process of a pair:
  #   python tests/test_multiprocess.py main RECORD FLAGS...: `python -m
  #     seqcompress_jax.main FLAGS...`, recording the files it writes;
  #   python tests/test_multiprocess.py rows|save DIR COORDINATOR PROCESS_ID.
  mode, *arguments = sys.argv[1:]
  if mode == 'main':
    record, flags = arguments[0], arguments[1:]
    _record_writes(record, next(f.split('=', 1)[1] for f in flags
                                if f.startswith('--workdir=')))
    sys.argv = ['seqcompress_jax.main', *flags]
    app.run(main_lib.main, flags_parser=main_lib.parse_flags)
  else:
    directory, coordinator, process = arguments
    jax.distributed.initialize(coordinator, 2, int(process))
    {'rows': _rows, 'save': _save_together}[mode](directory, int(process))
