"""Export (export.py, --mode=export): the exported top-k equals the in-process
model's for an uncompressed, a CpRec, a CANet and a CANet-over-CpRec model
(routed as in-process routing does); loading needs neither the model code nor the data; the
directory holds what the manifest says; bad exports are refused clearly."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from test_canet_train import canet_config
from test_train import REPO, tiny_config

from seqcompress_jax import bench_export, export, rundir, train
from seqcompress_jax import step as step_lib
from seqcompress_jax.checkpointing import Checkpoints
from seqcompress_jax.data import load_dataset
from seqcompress_jax.models import routing
from seqcompress_jax.models.model import Recommender

K = 10
BUCKETS = (1, 4, 16)
# Rounding: a score computed in another program shape (a bucket, a chunk of
# the adaptive softmax's fast top-k) may differ in the last bits.
TOLERANCE = 1e-5


def uncompressed_config(root):
  """tiny_config, its full top k taken 7 items at a time (several chunks)."""
  config = tiny_config(root)
  config.eval.chunk_size = 7
  return config


def cprec_config(root):
  """tiny_config with CpRec's blocks (cutoffs at the default training mass) and
  sharing; its full top k in chunks of 5 items."""
  config = tiny_config(root)
  config.model.update(embedding='block', head='adaptive', sharing='cross-block')
  config.eval.chunk_size = 5
  return config


CONFIGS = {'uncompressed': uncompressed_config, 'cprec': cprec_config,
           'canet': lambda root: canet_config('smoke', root),
           'canet-cprec': lambda root: canet_config('smoke,cprec', root)}
# Exports: (run, export_run's topk); CpRec's adaptive softmax has two methods.
EXPORTS = {'uncompressed': ('uncompressed', 'fast'), 'cprec': ('cprec', 'fast'),
           'cprec-full-topk': ('cprec', 'full'), 'canet': ('canet', 'fast'),
           'canet-cprec': ('canet-cprec', 'fast')}


def saved_run(config, workdir):
  """A run directory as training leaves it (config.json, best/) holding the
  initial parameters: an export does not depend on how they were found, and
  skipping training skips its compilation. Returns (spec, params)."""
  run = train.setup(config, workdir)
  params = step_lib.init_params(run.spec, config.seed)
  best = Checkpoints(os.path.join(workdir, 'best'), max_to_keep=1)
  best.save(1, params, {})
  best.close()
  return run.spec, params


def histories(num_items, max_len, rows, seed=0):
  """Left-padded item-index histories [rows, max_len], lengths 0..max_len."""
  rng = np.random.default_rng(seed)
  items = rng.integers(1, num_items, (rows, max_len)).astype(np.int32)
  lengths = rng.integers(0, max_len + 1, rows)
  lengths[:2] = (0, max_len)
  items[np.arange(max_len) < (max_len - lengths)[:, None]] = 0
  return items


def full_scores(spec, params, items):
  """float [B, V]: the in-process model's next-item scores; for CANet, the
  routed model's as evaluation computes them (the router's argmax route, on
  the masked path: one program for every route)."""
  route = None
  if spec.routed:
    routes = step_lib.choose_routes(spec, params, items)
    route = jax.nn.one_hot(routes, routing.RoutingSpace.of(spec).num_routes)
  return np.asarray(Recommender(spec).apply({'params': params}, items, method=lambda m, x: (
      m.logits(m(x, train=False, route=route)[:, -1]))))


def check_topk(scores, ids, full, items, exclude, k):
  """(scores, ids) [B, >= k] start with a top k of `full` [B, V] over the
  items 1..V-1 (less each row's history `items` when `exclude`), against a
  numpy sort: the k best values, each id allowed, distinct and scoring its
  value. Tie order is free."""
  for row in range(len(full)):
    allowed = np.ones(full.shape[1], bool)
    allowed[0] = False
    if exclude:
      allowed[items[row]] = False
    best = np.sort(full[row][allowed])[::-1][:k]
    np.testing.assert_allclose(scores[row, :k], best, rtol=0, atol=TOLERANCE)
    chosen = ids[row, :k]
    assert allowed[chosen].all() and len(set(chosen.tolist())) == k
    np.testing.assert_allclose(full[row, chosen], scores[row, :k], rtol=0, atol=TOLERANCE)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """EXPORTS' name -> (spec, params, export directory) of a saved run of each
  kind, exported with k = K and small buckets (to WORKDIR/export, or for the
  second CpRec method WORKDIR/export-full)."""
  root = tmp_path_factory.mktemp('export')
  saved = {kind: saved_run(make(root), str(root / kind)) for kind, make in CONFIGS.items()}
  out = {}
  for name, (kind, topk) in EXPORTS.items():
    directory = str(root / kind / ('export' if topk == 'fast' else 'export-full'))
    export.export_run(str(root / kind), directory, k=K, buckets=BUCKETS, topk=topk)
    out[name] = (*saved[kind], directory)
  return out


@pytest.mark.parametrize('name', EXPORTS)
def test_exported_topk_equals_the_in_process_model(runs, name):
  spec, params, directory = runs[name]
  model = export.load(directory)
  _, topk = EXPORTS[name]
  compressed = spec.uses_blocks or spec.sharing != 'none'
  kind = 'canet' if spec.routed else 'cprec' if compressed else 'uncompressed'
  assert (model.kind, model.k, model.max_len, model.routed) == (kind, K, spec.max_len,
                                                                spec.routed)
  assert spec.routed == name.startswith('canet')
  assert model.manifest['topk_method'] == ('fast' if spec.head == 'adaptive' and topk == 'fast'
                                           else 'full')
  # 21 rows: chunks of 16 and 5 (padded to 16); CANet's route groups use every bucket.
  items = histories(spec.num_items, spec.max_len, 21)
  full = full_scores(spec, params, items)
  for exclude in (False, True):
    scores, ids = model.topk(items, exclude_history=exclude)
    assert scores.shape == ids.shape == (21, K)
    check_topk(scores, ids, full, items, exclude, K)
  if model.routed:
    routes = model.routes(items)
    np.testing.assert_array_equal(routes, step_lib.choose_routes(spec, params, items))
    assert len(np.unique(routes)) >= 2  # The grouping by route is exercised.


def test_export_directory_holds_what_its_manifest_says(runs):
  spec, params, directory = runs['cprec']
  workdir = os.path.dirname(directory)
  with open(os.path.join(directory, export.MANIFEST)) as f:
    manifest = json.load(f)
  assert manifest['format_version'] == export.FORMAT_VERSION
  assert (manifest['kind'], manifest['k'], manifest['max_len'], manifest['buckets']) == (
      'cprec', K, spec.max_len, list(BUCKETS))
  assert manifest['config']['model']['head'] == 'adaptive'
  assert manifest['source']['checkpoint'] == 'best (step 1)' and manifest['metrics'] is None
  # The adaptive softmax's fast top-k: one module per batch size.
  assert manifest['functions']['topk']['files'] == {
      str(b): f'topk.b{b}.jaxexport' for b in BUCKETS}
  files = sorted([export.PARAMS, export.ITEMS] + [f'topk.b{b}.jaxexport' for b in BUCKETS])
  assert sorted(os.listdir(directory)) == sorted(files + [export.MANIFEST])
  assert sorted(manifest['sha256']) == sorted(manifest['sizes']['file_bytes']) == files
  leaves = jax.tree.leaves(params)
  assert manifest['sizes']['params'] == sum(x.size for x in leaves)
  with np.load(os.path.join(directory, export.PARAMS), allow_pickle=False) as z:
    np.testing.assert_array_equal(z['head/head'], params['head']['head'])
    assert len(z.files) == len(leaves)
  np.testing.assert_array_equal(export.load(directory).raw_item,
                                load_dataset(rundir.read_config(workdir).data).raw_item)
  # The symbolic-batch models: one module for every batch size.
  assert export.load(runs['cprec-full-topk'][2]).manifest['functions']['topk']['files'] == {
      'any': 'topk.jaxexport'}
  canet = export.load(runs['canet'][2]).manifest['functions']
  assert canet['router']['files'] == {'any': 'router.jaxexport'}
  routes = [entry['route'] for name, entry in canet.items() if name != 'router']
  assert routes == [list(r) for r in routing.RoutingSpace.of(runs['canet'][0]).routes]


def test_export_replaces_an_old_one_and_leaves_no_temp_files(runs, tmp_path):
  workdir = os.path.dirname(runs['uncompressed'][2])
  target = tmp_path / 'served'
  export.export_run(workdir, str(target), k=3, buckets=(4,))
  export.export_run(workdir, str(target), k=5, buckets=(4,))
  assert export.load(str(target)).k == 5
  assert os.listdir(tmp_path) == ['served']
  with pytest.raises(export.ExportError, match=r'k: expected an integer in \[1, '):
    export.export_run(workdir, str(tmp_path / 'bad'), k=0)
  assert os.listdir(tmp_path) == ['served']
  with pytest.raises(export.ExportError, match=r"topk: expected one of \('fast', 'full'\)"):
    export.export_run(workdir, str(tmp_path / 'bad'), topk='slow')
  with pytest.raises(FileNotFoundError, match='not a run directory'):
    export.export_run(str(tmp_path / 'nothing'))


def test_load_needs_neither_the_model_code_nor_the_data(runs, tmp_path):
  spec, params, directory = runs['canet']
  moved = tmp_path / 'elsewhere'
  shutil.copytree(directory, moved)
  items = histories(spec.num_items, spec.max_len, 3, seed=1)
  np.save(tmp_path / 'items.npy', items)
  script = '\n'.join([
      'import sys',
      "for name in ('flax', 'optax', 'orbax', 'ml_collections', 'seqcompress_jax.models',",
      "             'seqcompress_jax.data', 'seqcompress_jax.train', 'seqcompress_jax.rundir'):",
      '  sys.modules[name] = None  # Importing it fails.',
      'import numpy as np',
      'from seqcompress_jax import export',
      'scores, ids = export.load(sys.argv[1]).topk(np.load(sys.argv[2]))',
      'np.savez(sys.argv[3], scores=scores, ids=ids)'])
  env = {**os.environ, 'SEQCOMPRESS_DATA': str(tmp_path / 'no-data')}
  out = subprocess.run([sys.executable, '-c', script, str(moved), str(tmp_path / 'items.npy'),
                        str(tmp_path / 'out.npz')], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  with np.load(tmp_path / 'out.npz') as z:
    check_topk(z['scores'], z['ids'], full_scores(spec, params, items), items, False, K)


def test_mode_export_on_the_command_line(runs, tmp_path):
  workdir = os.path.dirname(runs['cprec'][2])
  results = {'valid': {'NDCG@10': 0.25}, 'test': {'NDCG@10': 0.125}, 'steps': 1}
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f)
  cmd = [sys.executable, '-m', 'seqcompress_jax.main', f'--workdir={workdir}']
  out = subprocess.run(cmd + ['--mode=export', f'--export_dir={tmp_path / "e"}',
                              '--export_k=4', '--export_topk=full'], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  manifest = export.load(str(tmp_path / 'e')).manifest
  assert (manifest['k'], manifest['kind'], manifest['topk_method']) == (4, 'cprec', 'full')
  assert manifest['metrics'] == {'valid': results['valid'], 'test': results['test']}
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1 and '--config is required (except with --mode=export)' in out.stderr


def _rewrite(directory, name, data):
  """Replaces a file of an export and its hash in the manifest."""
  with open(os.path.join(directory, name), 'wb') as f:
    f.write(data)
  path = os.path.join(directory, export.MANIFEST)
  with open(path) as f:
    manifest = json.load(f)
  manifest['sha256'][name] = export._sha256(os.path.join(directory, name))
  with open(path, 'w') as f:
    json.dump(manifest, f)


def test_bad_exports_are_refused_naming_the_file_and_field(runs, tmp_path):
  source = runs['uncompressed'][2]
  with pytest.raises(export.ExportError, match='no such export directory'):
    export.load(str(tmp_path / 'missing'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(export.ExportError, match=r'manifest.json: missing: .* is not an export'):
    export.load(str(tmp_path / 'empty'))

  def broken(name):
    directory = str(tmp_path / name)
    shutil.copytree(source, directory)
    return directory

  path = os.path.join(broken('not-json'), export.MANIFEST)
  with open(path, 'w') as f:
    f.write('{"format_version": 1,')
  with pytest.raises(export.ExportError, match=r'not-json/manifest.json: not valid JSON'):
    export.load(os.path.dirname(path))
  for field, value, message in [
      ('k', 'ten', r"field 'k': expected int, got 'ten'"),
      ('format_version', 2, r"field 'format_version': this code reads version 1, got 2"),
      ('buckets', [4, 1], r"field 'buckets': buckets: expected increasing positive sizes"),
      ('functions', {'topk': {'params': 'model'}}, r'field functions.topk: expected')]:
    path = os.path.join(broken(f'field-{field}'), export.MANIFEST)
    with open(path) as f:
      manifest = json.load(f)
    manifest[field] = value
    with open(path, 'w') as f:
      json.dump(manifest, f)
    with pytest.raises(export.ExportError, match=rf'field-{field}/manifest.json: {message}'):
      export.load(os.path.dirname(path))
  directory = broken('corrupted')
  with open(os.path.join(directory, 'topk.jaxexport'), 'r+b') as f:
    f.seek(100)
    f.write(b'\0\1\2\3')
  with pytest.raises(export.ExportError, match=r'corrupted/topk.jaxexport: sha256 differs'):
    export.load(directory)
  directory = broken('gone')
  os.remove(os.path.join(directory, export.PARAMS))
  with pytest.raises(export.ExportError, match=r'gone/params.npz: missing'):
    export.load(directory)
  # Files of another export, with the manifest's hashes made to match.
  directory = broken('mixed')
  with open(os.path.join(runs['cprec'][2], export.PARAMS), 'rb') as f:
    _rewrite(directory, export.PARAMS, f.read())
  with pytest.raises(export.ExportError, match=r'mixed/topk.jaxexport: params.npz does not '
                     'hold the parameters it takes'):
    export.load(directory)
  directory = broken('garbage')
  _rewrite(directory, 'topk.jaxexport', b'not a module')
  with pytest.raises(export.ExportError, match=r'garbage/topk.jaxexport: not a serialized'):
    export.load(directory)
  model = export.load(source)
  with pytest.raises(ValueError, match=r'items: expected integer item indices \[B, 10\]'):
    model.topk(np.zeros((2, 3), np.int32))
  with pytest.raises(ValueError, match=r'items: expected item indices in \[0, '):
    model.topk(np.full((2, 10), model.num_items, np.int32))
  with pytest.raises(ValueError, match='has no router'):
    model.routes(np.zeros((2, 10), np.int32))


def test_bench_export_measures_every_export_side_by_side(runs, tmp_path):
  workdirs = [os.path.dirname(runs[name][2]) for name in ('uncompressed', 'cprec')]
  result = bench_export.run(workdirs, str(tmp_path), k=3, requests=3, batch_size=5, runs=2,
                            topk_methods=('fast', 'full'))
  models = result['models']
  assert list(models) == ['uncompressed', 'cprec (fast top-k)', 'cprec (full top-k)']
  assert [m['kind'] for m in models.values()] == ['uncompressed', 'cprec', 'cprec']
  assert [m['programs'] for m in models.values()] == [1, len(export.BUCKETS), 1]
  for m in models.values():
    assert m['latency_ms']['requests'] == 3 and m['throughput']['batch_size'] == 5
    assert 0 < m['latency_ms']['median'] <= m['latency_ms']['p90']
    assert m['throughput']['sequences_per_s'] > 0
  table = bench_export.format_table(models, 5).splitlines()
  assert len(table) == 5 and table[3].startswith('| cprec (fast top-k) | cprec | ')
  calls = []
  seconds = bench_export.take_turns({'a': lambda i: calls.append(('a', i)),
                                     'b': lambda i: calls.append(('b', i))}, 2)
  assert calls == [('a', 0), ('b', 0), ('a', 1), ('b', 1)] and seconds['a'].shape == (2,)
