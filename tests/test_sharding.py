"""Sharding on 8 fake CPU devices: data x model meshes 8x1, 4x2 and 2x4 train
and rank as one device does, item tables are split over `model`, no device
ever holds a whole catalogue row, checkpoints and runs move between one device
and a mesh, mesh configs are checked.

The catalogue is odd (V = 61 ids), so no mesh splits it as it is: every
model pads its item tables (model.item_shards = 8), and the reference is the
unpadded model on one device.

JAX fixes its device count when it starts, and the other test files run on
one device, so the `check_*` functions run in a subprocess started with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (pytest collecting them
there with `-o python_functions=check_*`), once for the whole file; each
`test_on_8_fake_devices[check_*]` at the end reports one's outcome. The
subprocess also restores a checkpoint this process wrote on one device, and
leaves a checkpoint and a run written on meshes for this process to read.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

import jax
import ml_collections
import numpy as np
import pytest

from seqcompress_jax import config as config_lib
from seqcompress_jax import evaluate, rundir, sharding, train
from seqcompress_jax import step as step_lib
from seqcompress_jax.checkpointing import Checkpoints
from seqcompress_jax.config import ConfigError
from seqcompress_jax.models import ModelSpec, Recommender
from seqcompress_jax.models.blocks import AdaptiveSoftmax

_SHARED = 'SEQCOMPRESS_SHARDING_TEST_DIR'  # Folder shared with the subprocess.
V, L, B = 61, 6, 16  # V: odd, so no mesh splits the tables without padding.
SHARDS = 8  # model.item_shards: item axes padded to multiples of 8 (V: to 64).
MESHES = ((8, 1), (4, 2), (2, 4))  # (data, model).
# Blocks [0, 9), [9, 34), [34, 61): tails of 25 and 27 items, both padded to
# 32 (sizes no other array of these tests has, per device or whole).
CUTOFFS = (9, 34)
SPECS = {
    'full': dict(backbone='nextitnet', dilations=(1, 2)),
    'cprec': dict(backbone='nextitnet', dilations=(1, 2), embedding='block',
                  head='adaptive', cutoffs=CUTOFFS, tail_capacity=(0.5, 0.5),
                  sharing='cross-block'),
    'canet': dict(backbone='sasrec', num_layers=2, num_heads=2, ffn_dim=32, dropout=0.2,
                  route_embed_dims=(8, 16), route_hidden_dims=(8, 16), route_depths=(1, 2),
                  router_dim=8, router_heads=2, router_ffn_dim=16),
}
# The item axis of every item table, written out per model (sharding.ITEM_AXES
# as patterns): the tables that must be split over `model`.
ITEM_TABLES = {
    'full': {'embed/embedding': 0, 'head/kernel': 1, 'head/bias': 0},
    'tied': {'embed/embedding': 0, 'head/bias': 0},
    'cprec': {'embed/tail_2_table': 0, 'embed/tail_3_table': 0,
              'head/tail_2_out': 1, 'head/tail_3_out': 1},
    'canet': {'embed/embedding': 0, 'head/kernel': 1, 'head/bias': 0,
              'router/embed/embedding': 0},
}
# The lengths of those item axes, unpadded and padded.
CATALOGUE = {'full': {V, 64}, 'tied': {V, 64}, 'cprec': {25, 27, 32}, 'canet': {V, 64}}


def make_spec(name: str, item_shards: int = SHARDS) -> ModelSpec:
  fields = SPECS['full'] if name == 'tied' else SPECS[name]
  return ModelSpec(num_items=V, embed_dim=16, hidden_dim=16, max_len=L, tied=name == 'tied',
                   item_shards=item_shards, **fields)


def make_config(data: int = -1, model: int = 1) -> ml_collections.ConfigDict:
  config = config_lib.base_config()
  config.mesh.update(data=data, model=model)
  config.data.update(batch_size=B, eval_batch_size=B)
  config.model.item_shards = SHARDS
  return config


def run_config(root: str, data: int, model: int) -> ml_collections.ConfigDict:
  """A seconds-long run of the program: 60 items, V = 61 ids with PAD, the
  item tables padded to 64 (model.item_shards = 4)."""
  config = config_lib.apply_presets(config_lib.base_config(), 'smoke')
  config.data.cache_dir = os.path.join(root, 'cache')
  config.data.synthetic.update(num_users=120, num_items=65, mean_len=12.0, max_len=30)
  config.data.update(max_len=10, batch_size=16, eval_batch_size=32)
  config.model.update(embed_dim=16, hidden_dim=16, dilations=(1, 2), item_shards=4)
  config.train.update(max_steps=6, eval_every_steps=3, log_every_steps=3)
  config.mesh.update(data=data, model=model)
  return config


def optimizer():
  return step_lib.make_optimizer(config_lib.base_config().optim, total_steps=10)


def make_canet(spec: ModelSpec, mesh) -> step_lib.Canet | None:
  if not spec.routed:
    return None
  section = config_lib.base_config().canet
  section.update(cost_weight=0.3)
  return step_lib.make_canet(spec, section, total_steps=10, chunk_size=24, mesh=mesh)


def windows(seed: int) -> dict[str, np.ndarray]:
  """B left-padded training windows (inputs, targets [B, L])."""
  rng = np.random.default_rng(seed)
  items = rng.integers(1, V, (B, L + 1))
  items[np.arange(L + 1) < rng.integers(0, L - 1, B)[:, None]] = 0
  inputs = items[:, :-1]
  return {'inputs': inputs.astype(np.int32),
          'targets': np.where(inputs == 0, 0, items[:, 1:]).astype(np.int32)}


def leaves(tree) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def unpad(tree, like):
  """The arrays of `tree` (a padded model's parameters, or state) cut to the
  shapes of `like`'s (the unpadded model's), after checking that what is cut
  off is zero: the padding never trains."""
  def cut(x, y):
    x, inside = np.asarray(x), tuple(slice(0, n) for n in np.shape(y))
    padded = np.zeros_like(x)
    padded[inside] = x[inside]
    np.testing.assert_array_equal(padded, x)
    return x[inside]

  return jax.tree.map(cut, tree, like)


def save(directory: str, state, meta: dict) -> None:
  """A checkpoint of `state` and, beside it, its values as numpy."""
  checkpoints = Checkpoints(directory, max_to_keep=1)
  checkpoints.save(int(state['step']), state, meta)
  checkpoints.close()
  np.savez(directory + '.npz', *leaves(state))


def restore_and_compare(directory: str, like) -> tuple:
  """The checkpoint restored like `like`, checked against the saved values."""
  checkpoints = Checkpoints(directory, max_to_keep=1)
  state, meta = checkpoints.restore(like)
  checkpoints.close()
  saved = np.load(directory + '.npz')
  values = leaves(state)
  assert len(values) == len(saved.files)
  for i, value in enumerate(values):
    np.testing.assert_array_equal(value, saved[f'arr_{i}'])
  return state, meta


# ---------------------------------------------------------------- 8 fake devices


@pytest.fixture
def shared_dir() -> str:
  assert jax.device_count() == 8, 'run through test_on_8_fake_devices'
  return os.environ[_SHARED]


def make_mesh(data: int, model: int):
  return sharding.mesh_from_config(make_config(data, model))


def check_mesh_config_errors_name_the_field(shared_dir):
  bad = [((3, -1), 'mesh.data'), ((-1, 3), 'mesh.model'), ((2, 2), 'mesh.data'),
         ((-1, -1), 'mesh.model'), ((0, 1), 'mesh.data'), ((-1, 0), 'mesh.model')]
  for (data, model), field in bad:
    with pytest.raises(ConfigError, match=f'^{re.escape(field)}:'):
      make_mesh(data, model)
  for data, model in (('2', 4), (True, 8), (2.0, 4)):  # Not integers.
    with pytest.raises(ConfigError, match='^mesh.data:'):
      sharding.mesh_shape(ml_collections.ConfigDict({'data': data, 'model': model}), 8)
  config = make_config(8, 1)
  config.data.batch_size = 12
  with pytest.raises(ConfigError, match='^data.batch_size:'):
    sharding.mesh_from_config(config)
  config = make_config(-1, 2)  # data = 4
  config.data.eval_batch_size = 6
  with pytest.raises(ConfigError, match='^data.eval_batch_size:'):
    sharding.mesh_from_config(config)
  assert make_mesh(-1, 2).shape == {'data': 4, 'model': 2}
  assert make_mesh(1, -1).shape == {'data': 1, 'model': 8}
  # mesh.model must divide model.item_shards, wherever the two meet.
  config = make_config(2, 4)
  config.model.item_shards = 6
  with pytest.raises(ConfigError, match='^model.item_shards: .* mesh.model = 4'):
    sharding.mesh_from_config(config)
  with pytest.raises(ConfigError, match='^model.item_shards: .* mesh.model = 4'):
    step_lib.create_state(make_spec('full', item_shards=2), optimizer(), 0, make_mesh(2, 4))
  # An item table whose item axis does not split evenly (V = 61, not padded).
  unpadded = jax.eval_shape(functools.partial(step_lib.init_params, make_spec('full', 1), 0))
  with pytest.raises(ConfigError, match=r'^model.item_shards: .*embed/embedding \(61, 16\)'):
    sharding.param_shardings(make_mesh(2, 4), unpadded)


def _path(key_path) -> str:
  return '/'.join(str(k.key) for k in key_path if isinstance(k, jax.tree_util.DictKey))


def check_item_tables_are_split_over_model(shared_dir):
  for name, tables in ITEM_TABLES.items():
    params = jax.eval_shape(functools.partial(step_lib.init_params, make_spec(name), 0))
    paths = [(_path(path), x.ndim) for path, x in jax.tree_util.tree_flatten_with_path(params)[0]]
    assert set(tables) <= {path for path, _ in paths}
    for data, model in MESHES:
      specs = [s.spec for s in jax.tree.leaves(
          sharding.param_shardings(make_mesh(data, model), params))]
      expected = [sharding.P(*('model' if i == tables[path] else None for i in range(ndim)))
                  if path in tables else sharding.P() for path, ndim in paths]
      assert specs == expected, name


def assert_params_layout(params, tables: dict[str, int], model: int) -> None:
  """Every device holds 1/model of each item table along its item axis and
  the whole of every other parameter."""
  def check(key_path, x):
    shape = list(x.shape)
    if _path(key_path) in tables:
      shape[tables[_path(key_path)]] //= model
    assert all(list(s.data.shape) == shape for s in x.addressable_shards), key_path

  jax.tree_util.tree_map_with_path(check, params)


def assert_layout(state, tables: dict[str, int], model: int) -> None:
  """assert_params_layout, and Adam's statistics are laid out like their
  parameters, its count replicated."""
  assert_params_layout(state['params'], tables, model)
  adam = state['opt_state'][1][0]
  for moments in (adam.mu, adam.nu):
    jax.tree.map(assert_same_layout, moments, state['params'])
  assert adam.count.sharding.is_fully_replicated


def assert_same_layout(x: jax.Array, y: jax.Array) -> None:
  assert x.sharding.is_equivalent_to(y.sharding, x.ndim)


def assert_no_catalogue_row(compiled, catalogue: set[int], model: int) -> None:
  """In a compiled program's per-device (partitioned) HLO, no array has a
  dimension as long as an item table's item axis (`catalogue`: V, or the
  tails' sizes): no device holds, computes or receives a whole row of items'
  logits, scores, weights or gradients, only its 1/model share."""
  shapes = []
  for line in compiled.as_text().splitlines():
    match = re.match(r'\s*(?:ROOT )?%\S+ = (.*?) ([\w-]+)\(', line)
    if match:
      shapes += [(match.group(2), tuple(int(d) for d in dims.split(',') if d))
                 for dims in re.findall(r'[a-z]+\d+\[([\d,]*)\]', match.group(1))]
  whole = [(op, dims) for op, dims in shapes if catalogue & set(dims)]
  assert not whole, whole[:5]
  assert any(max(catalogue) // model in dims for _, dims in shapes)  # The shares are there.


# Attention key biases get a zero gradient in exact arithmetic (softmax is
# shift-invariant): their updates are rounding noise, which Adam scales up to
# about the learning rate per step, so they are compared to that.
_NOISE = re.compile(r'.*attn/key/bias')
_LR = config_lib.base_config().optim.learning_rate


def assert_close(actual, expected, steps: int) -> None:
  def check(key_path, x, y):
    x, y = np.asarray(x), np.asarray(y)
    if _NOISE.fullmatch(_path(key_path)):
      np.testing.assert_allclose(x, y, atol=2 * _LR * steps, err_msg=str(key_path))
    else:
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5 * np.abs(y).max(),
                                 err_msg=str(key_path))

  jax.tree_util.tree_map_with_path(check, actual, expected)


def _steps(spec: ModelSpec, mesh=None) -> tuple:
  """Two train steps from the seed-0 state: on `mesh` as train.py runs them
  (and the compiled step), or (no mesh) unsharded on one device."""
  tx, model = optimizer(), Recommender(spec)
  batches = [windows(seed) for seed in (1, 2)]
  if mesh is None:
    state = step_lib.init_state(spec, tx, 0)
    step = jax.jit(functools.partial(step_lib.train_step, model, tx, None,
                                     canet=make_canet(spec, None))).lower(
        state, batches[0]).compile()
  else:
    state, shardings = step_lib.create_state(spec, tx, 0, mesh)
    batches = [sharding.global_batch(mesh, batch) for batch in batches]
    step = step_lib.jit_train_step(model, tx, None, mesh, shardings,
                                   make_canet(spec, mesh)).lower(state, batches[0]).compile()
  losses = []
  for batch in batches:
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  return state, losses, step


@pytest.mark.parametrize('name, meshes', [('full', MESHES), ('cprec', MESHES),
                                          ('tied', ((2, 4),)), ('canet', ((2, 4),))])
def check_sharded_train_step_matches_one_device(shared_dir, name, meshes):
  # Against the unpadded model on one device: the padded model on one device
  # (mesh None), then on the meshes.
  spec = make_spec(name)
  expected_state, expected_losses, _ = _steps(spec.unpadded)
  for mesh, model in [(None, 1)] + [(make_mesh(data, model), model) for data, model in meshes]:
    state, losses, step = _steps(spec, mesh)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
    assert int(state['step']) == 2
    for part in ('params', 'opt_state'):
      assert_close(unpad(state[part], expected_state[part]), expected_state[part], steps=2)
    if mesh is not None:
      assert_layout(state, ITEM_TABLES[name], model)
    if model > 1:
      assert_no_catalogue_row(step, CATALOGUE[name], model)


def rank_inputs(seed: int) -> dict[str, np.ndarray]:
  """An evaluation batch: B sequences, their targets and their histories."""
  rng = np.random.default_rng(seed)
  inputs = rng.integers(0, V, (B, L)).astype(np.int32)
  return {'inputs': inputs, 'targets': rng.integers(1, V, B).astype(np.int32),
          'history': inputs}


def brute_force_ranks(logits: np.ndarray, batch: dict[str, np.ndarray],
                      tolerance: float) -> tuple[np.ndarray, np.ndarray]:
  """Per row, the items (not PAD, not the target, not in the history) scoring
  more than `tolerance` above the target, and those within it of the target."""
  above, near = [], []
  for row, target in enumerate(batch['targets']):
    excluded = {0, int(target)} | set(batch['history'][row].tolist())
    others = np.array([i for i in range(V) if i not in excluded])
    gap = logits[row, others] - logits[row, target]
    above.append((gap > tolerance).sum())
    near.append((np.abs(gap) <= tolerance).sum())
  return np.array(above), np.array(near)


def rank_fn_of(spec: ModelSpec, mesh=None) -> evaluate.RankFn:
  """Full ranking of `spec`, history excluded, 18 items a chunk (on a mesh
  rounded up to a multiple of mesh.model: 20 on 2x4): the 60 items in 3 or 4
  chunks, the last one part padding."""
  model_ = Recommender(spec)
  return evaluate.make_rank_fn(functools.partial(step_lib.last_state, model_),
                               functools.partial(step_lib.item_scores, model_), V, 18,
                               exclude_history=True, mesh=mesh)


@pytest.mark.parametrize('name', ['full', 'cprec'])
def check_sharded_ranks_match_one_device(shared_dir, name):
  spec = make_spec(name)
  params, unpadded = step_lib.init_params(spec, 0), step_lib.init_params(spec.unpadded, 0)
  unpad(params, unpadded)  # The padded model starts where the unpadded one does.
  batches = [rank_inputs(seed) for seed in (1, 2)]
  expected = [np.asarray(rank_fn_of(spec.unpadded)(unpadded, batch)) for batch in batches]
  model_ = Recommender(spec.unpadded)
  logits = jax.jit(lambda p, x: model_.apply({'params': p}, x, method=lambda m, x: m.logits(
      m(x, train=False)[:, -1])))
  for batch, ranks in zip(batches, expected):  # Against brute force, as a reference.
    above, near = brute_force_ranks(np.asarray(logits(unpadded, batch['inputs'])), batch, 1e-5)
    assert np.all(above <= ranks) and np.all(ranks <= above + near)
    # The padded model on one device.
    np.testing.assert_array_equal(rank_fn_of(spec)(params, batch), ranks)
  for data, model in MESHES:
    mesh = make_mesh(data, model)
    sharded_params = jax.device_put(params, sharding.param_shardings(mesh, params))
    rank_fn = rank_fn_of(spec, mesh)
    for batch, ranks in zip(batches, expected):
      batch = sharding.global_batch(mesh, batch)
      sharded = rank_fn(sharded_params, batch)
      assert sharded.sharding.spec == sharding.P('data')
      np.testing.assert_array_equal(np.asarray(sharded), ranks)
    if model > 1:
      assert_no_catalogue_row(jax.jit(rank_fn).lower(sharded_params, batch).compile(),
                              CATALOGUE[name], model)


def check_tail_passes_scan_each_device_s_own_items(shared_dir):
  # The adaptive softmax's tail passes (prepare's normalisers, topk) over
  # tails of several chunks: its 8 parts of 3 and 4 items (one item a step)
  # split over `model`, against log_probs of the unpadded head on one device.
  kwargs = dict(num_items=V, features=16, cutoffs=CUTOFFS, widths=(16, 8, 4))
  head = AdaptiveSoftmax(**kwargs, norm_chunk=SHARDS, item_shards=SHARDS)
  single = AdaptiveSoftmax(**kwargs)
  hidden = jax.random.normal(jax.random.key(1), (B, 16))
  params = head.init(jax.random.key(0), hidden, method='prepare')['params']
  real = unpad(params, single.init(jax.random.key(0), hidden, method='prepare')['params'])
  log_probs = single.apply({'params': real}, hidden, method='log_probs')
  expected_norm = np.stack([  # logsumexp of each tail's logits (h Q_j) O_j.
      jax.nn.logsumexp(np.asarray(hidden) @ real[f'tail_{j}_proj'] @ real[f'tail_{j}_out'],
                       axis=-1) for j in (2, 3)], axis=-1)
  expected_top = jax.lax.top_k(log_probs, 5)
  prepare = jax.jit(lambda p, h: head.apply({'params': p['head']}, h, method='prepare'))
  topk = jax.jit(lambda p, h: head.apply({'params': p['head']}, h, 5, method='topk'))
  for data, model in ((4, 2), (2, 4)):
    mesh = make_mesh(data, model)
    sharded = jax.device_put({'head': params},
                             sharding.param_shardings(mesh, {'head': params}))
    batch = sharding.global_batch(mesh, hidden)
    np.testing.assert_allclose(prepare(sharded, batch)['tail_norm'], expected_norm,
                               rtol=1e-5)
    scores, items = topk(sharded, batch)
    np.testing.assert_allclose(scores, expected_top[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(items, expected_top[1])
    for fn in (prepare, topk):  # 8 parts x top 5 = 40 candidates: no tail's size.
      assert_no_catalogue_row(fn.lower(sharded, batch).compile(), CATALOGUE['cprec'], model)


def check_checkpoints_move_between_one_device_and_a_mesh(shared_dir):
  spec, tx = make_spec('cprec'), optimizer()
  mesh = make_mesh(4, 2)
  like, shardings = step_lib.create_state(spec, tx, 0, mesh)
  # Written on one device by this file's fixture: restored onto the mesh.
  state, meta = restore_and_compare(os.path.join(shared_dir, 'one_device'), like)
  assert meta == {'devices': 1} and int(state['step']) == 1
  jax.tree.map(assert_same_layout, state, like)
  assert_layout(state, ITEM_TABLES['cprec'], model=2)
  # Written on the mesh: restored on one device by the test in the parent process.
  state, _ = step_lib.jit_train_step(Recommender(spec), tx, None, mesh, shardings)(
      like, sharding.global_batch(mesh, windows(1)))
  save(os.path.join(shared_dir, 'mesh_4x2'), state, {'devices': 8})


def check_a_run_resumes_on_another_mesh(shared_dir):
  # Pre-empted on a 4x2 mesh, resumed on 2x4; this file's last test then
  # evaluates it on one device.
  workdir = os.path.join(shared_dir, 'run')
  assert train.train_and_evaluate(run_config(shared_dir, 4, 2), workdir, stop_at_step=4) == {}
  results = train.train_and_evaluate(run_config(shared_dir, 2, 4), workdir)
  assert results['steps'] == 6 and results['test']['num_examples'] == 120
  # The real parameters: 61 ids, not the 64 rows of the padded table.
  assert results['params']['embedding'] == V * 16
  assert results['param_bytes'] == 4 * results['params']['total']
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:  # One evaluation per run.
    assert [r['step'] for r in map(json.loads, f) if r['split'] == 'valid'] == [3, 6]


def check_restore_params_reads_a_run_back_sharded(shared_dir):
  # The run check_a_run_resumes_on_another_mesh wrote (2x4; its 'best'
  # parameters), and a copy without 'best' (its latest train state's).
  workdir = os.path.join(shared_dir, 'run')
  latest_only = os.path.join(shared_dir, 'run_latest_only')
  shutil.copytree(workdir, latest_only, ignore=shutil.ignore_patterns('best'))
  config = run_config(shared_dir, 4, 2)
  spec = train.setup(config, workdir).spec
  tables = {'embed/embedding': 0, 'head/kernel': 1, 'head/bias': 0}
  for directory, which in ((workdir, 'best (step 6)'), (latest_only, 'latest (step 6)')):
    whole, whole_which = rundir.restore_params(config, spec, directory)
    assert whole_which == which
    assert all(len(x.devices()) == 1 for x in jax.tree.leaves(whole))
    for data, model in ((4, 2), (8, 1)):
      mesh = make_mesh(data, model)
      params, restored_which = rundir.restore_params(config, spec, directory, mesh)
      assert restored_which == which
      for x, expected in zip(jax.tree.leaves(params),
                             jax.tree.leaves(sharding.param_shardings(mesh, params))):
        assert x.sharding.is_equivalent_to(expected, x.ndim)
      assert_params_layout(params, tables, model)
      jax.tree.map(np.testing.assert_array_equal, params, whole)
  with pytest.raises(ConfigError, match='^model.item_shards: .* mesh.model = 8'):
    rundir.restore_params(config, spec, workdir, make_mesh(1, 8))  # 8 does not divide 4.


# ---------------------------------------------------------------- this process


@pytest.fixture(scope='module')
def fake_devices(tmp_path_factory) -> tuple[str, dict[str, list[tuple[str, str]]]]:
  """Writes a one-device checkpoint, runs the check_* functions on 8 fake
  devices; returns the folder shared with them and {check: [(case, '' if it
  passed, else its report)]}."""
  shared = tmp_path_factory.mktemp('sharding')
  config = make_config()
  config.mesh.data = 1
  mesh = sharding.mesh_from_config(config, jax.devices()[:1])
  spec = make_spec('cprec')
  state, shardings = step_lib.create_state(spec, optimizer(), 1, mesh)
  state, _ = step_lib.jit_train_step(Recommender(spec), optimizer(), None, mesh, shardings)(
      state, sharding.global_batch(mesh, windows(1)))
  save(str(shared / 'one_device'), state, {'devices': 1})

  report = shared / 'report.xml'
  # No backend optimisation: compiling dominates these tiny programs on CPU.
  flags = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
           ' --xla_backend_optimization_level=0')
  done = subprocess.run(
      [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
       '-o', 'python_functions=check_*', f'--junitxml={report}', os.path.abspath(__file__)],
      env={**os.environ, 'XLA_FLAGS': flags, _SHARED: str(shared)},
      capture_output=True, text=True, timeout=600)
  if not report.exists():
    raise RuntimeError(f'the 8-device run left no report:\n{done.stdout}\n{done.stderr}')
  outcomes = {}
  for case in ElementTree.parse(report).iter('testcase'):
    problems = [f'{p.tag}: {p.get("message")}\n{p.text}' for p in case
                if p.tag in ('failure', 'error', 'skipped')]
    name = case.get('name')
    outcomes.setdefault(name.split('[')[0], []).append((name, '\n'.join(problems)))
  return str(shared), outcomes


@pytest.mark.parametrize('check', sorted(name for name in list(globals())
                                         if name.startswith('check_')))
def test_on_8_fake_devices(fake_devices, check):
  cases = fake_devices[1].get(check)
  assert cases, f'{check} did not run on the 8 fake devices'
  failed = [f'{name}:\n{problem}' for name, problem in cases if problem]
  assert not failed, '\n\n'.join(failed)


def test_a_checkpoint_written_on_a_4x2_mesh_restores_on_one_device(fake_devices):
  init = functools.partial(step_lib.init_state, make_spec('cprec'), optimizer(), 0)
  directory = os.path.join(fake_devices[0], 'mesh_4x2')
  state, meta = restore_and_compare(directory, jax.jit(init)())
  assert meta == {'devices': 8} and int(state['step']) == 1
  assert all(len(x.devices()) == 1 for x in jax.tree.leaves(state))
  # A target without shardings (a jax.eval_shape result, as rundir's) too.
  abstract = jax.eval_shape(init)
  assert all(x.sharding is None for x in jax.tree.leaves(abstract))
  restore_and_compare(directory, abstract)


def test_a_run_trained_on_meshes_evaluates_the_same_on_one_device(fake_devices):
  shared, _ = fake_devices
  workdir = os.path.join(shared, 'run')
  with open(os.path.join(workdir, 'results.json')) as f:
    on_mesh = json.load(f)['test']
  config = run_config(shared, -1, 1)  # --mode=eval of the run, on this one device.
  assert train.evaluate_checkpoint(config, workdir)['test'] == on_mesh

