"""CANet wired into the program: the routed step (router gradients, guide hits,
loss terms), evaluation on the router's routes, results.json's histogram and
routed MACs, routed resume, the canet config and grid, the routed inference
benchmark's functions."""

import functools
import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from seqcompress_jax import bench_canet, profiling, report, train
from seqcompress_jax import config as config_lib
from seqcompress_jax import step as step_lib
from seqcompress_jax.checkpointing import Checkpoints
from seqcompress_jax.models import ModelSpec, Recommender, routing
from seqcompress_jax.models import router as router_lib
from seqcompress_jax.models.routing import RoutingSpace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V, L = 30, 6
SPACE = dict(route_embed_dims=(8, 16), route_hidden_dims=(8, 16), route_depths=(1, 2))
# Compilation dominates on CPU: no backend optimisation.
jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})


def tiny_spec(backbone: str = 'sasrec', **overrides) -> ModelSpec:
  fields = dict(embed_dim=16, hidden_dim=16, max_len=L, dilations=(1, 2), num_layers=2,
                num_heads=2, ffn_dim=32, dropout=0.0, router_dim=8, router_heads=2,
                router_ffn_dim=16, **SPACE)
  return ModelSpec(num_items=V, backbone=backbone, **{**fields, **overrides})


def windows(rows: int, seed: int) -> dict[str, np.ndarray]:
  """Left-padded training windows: inputs and targets [rows, L], each row
  with at least 2 items (its last target is an item)."""
  rng = np.random.default_rng(seed)
  items = rng.integers(1, V, (rows, L + 1))
  lengths = rng.integers(2, L + 2, rows)
  items[np.arange(L + 1) < (L + 1 - lengths)[:, None]] = 0
  inputs = items[:, :-1]
  return {'inputs': inputs.astype(np.int32),
          'targets': np.where(inputs == 0, 0, items[:, 1:]).astype(np.int32)}


def canet_config(presets: str = 'smoke', tmp_path=None):
  """configs/canet.py with presets, shrunk to a few-second run."""
  config = bench_canet.canet_config(presets)
  if tmp_path is not None:
    config.data.cache_dir = str(tmp_path / 'cache')
  config.data.synthetic.update(num_users=120, num_items=60, mean_len=12.0, max_len=30)
  config.data.update(max_len=10, batch_size=16, eval_batch_size=32)
  config.train.update(max_steps=6, eval_every_steps=3, log_every_steps=3)
  return config


def brute_force_ranks(logits: np.ndarray, targets: np.ndarray,
                      history: np.ndarray | None = None) -> np.ndarray:
  """Items 1..V-1 other than the target (and than the row's history) scoring
  strictly above the target, by loops."""
  ranks = []
  for row, target in enumerate(targets):
    excluded = {0, int(target)} | (set(history[row].tolist()) if history is not None else set())
    ranks.append(sum(logits[row, item] > logits[row, target]
                     for item in range(logits.shape[1]) if item not in excluded))
  return np.array(ranks)


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope='module')
def routed_run(tmp_path_factory):
  """A tiny routed run (SASRec, dropout 0.2, annealed temperature, a cost
  term) trained straight through: (config, workdir, results)."""
  root = tmp_path_factory.mktemp('canet')
  config = canet_config('smoke', root)
  config.canet.update(anneal='exponential', cost_weight=0.5)
  workdir = str(root / 'straight')
  return config, workdir, train.train_and_evaluate(config, workdir)


def test_routed_run_writes_routes_and_macs_and_ranks_as_the_sliced_routes(routed_run):
  config, workdir, results = routed_run
  with open(os.path.join(workdir, 'results.json')) as f:
    assert json.load(f) == json.loads(json.dumps(results))
  spec = train.setup(config, workdir).spec
  space = RoutingSpace.of(spec)
  full = profiling.macs(spec)
  assert results['routing']['full_macs'] == {
      'inference': full['inference'], 'without_output': full['embedding'] + full['middle']}
  assert results['routing']['router_macs'] == router_lib.router_macs(spec)
  router_params = router_lib.init(spec, jax.random.key(0))
  assert results['params']['router'] == sum(x.size for x in jax.tree.leaves(router_params))
  assert results['params']['total'] == sum(
      results['params'][k] for k in ('embedding', 'middle', 'output', 'router'))
  for split in ('valid', 'test'):
    summary = results[split]['routing']
    counts = np.array([entry['count'] for entry in summary['histogram']])
    assert counts.sum() == results[split]['num_examples'] == 120
    assert [(e['embed_dim'], e['hidden_dim'], e['depth']) for e in summary['histogram']] == [
        tuple(route) for route in space.routes]
    macs = [routing.route_macs(spec, route) for route in space.routes]
    inference = sum(c * m['inference'] for c, m in zip(counts, macs)) / 120
    middle = sum(c * (m['embedding'] + m['middle']) for c, m in zip(counts, macs)) / 120
    np.testing.assert_allclose(summary['macs']['inference'], inference)
    np.testing.assert_allclose(summary['macs']['inference_relative'],
                               inference / full['inference'])
    np.testing.assert_allclose(summary['macs']['without_output_relative'],
                               middle / (full['embedding'] + full['middle']))
    np.testing.assert_allclose(results[split]['routed_cost'],
                               summary['macs']['inference_relative'])
  lines = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  train_lines = [line for line in lines if line['split'] == 'train']
  assert all({'nll', 'guide_loss', 'routed_cost', 'temperature'} <= set(line)
             for line in train_lines)
  assert [line['step'] for line in lines if line['split'] == 'valid'] == [3, 6]
  assert train.evaluate_checkpoint(config, workdir)['test'] == results['test']

  # The benchmark's trained case picks the same routes for the test users, and
  # the sliced sub-models of those routes rank the targets as the evaluation did.
  run = train.setup(config, workdir)
  _, params, inputs, routes = bench_canet.trained_case(workdir, len(run.test))
  np.testing.assert_array_equal(inputs, run.test.inputs)
  np.testing.assert_array_equal(np.bincount(routes, minlength=space.num_routes), counts)
  model_params = {k: v for k, v in params.items() if k != 'router'}
  infer = router_lib.RoutedInference(spec, buckets=(128,), compiler_options={
      'xla_backend_optimization_level': 0})
  logits = np.asarray(infer(model_params, inputs, routes))
  ranks = brute_force_ranks(logits, run.test.targets)
  np.testing.assert_allclose(results['test']['MRR'], np.mean(1 / (ranks + 1)), rtol=1e-9)
  np.testing.assert_allclose(results['test']['NDCG@10'],
                             np.mean(np.where(ranks < 10, 1 / np.log2(ranks + 2), 0)),
                             rtol=1e-9)


def final_state(config, workdir):
  tx = step_lib.make_optimizer(config.optim, config.train.max_steps)
  like = step_lib.init_state(train.setup(config, workdir).spec, tx, config.seed)
  ckpt = Checkpoints(os.path.join(workdir, 'checkpoints'), max_to_keep=2)
  state, meta = ckpt.restore(like)
  ckpt.close()
  return state, meta


def test_routed_resume_is_bit_for_bit(routed_run, tmp_path):
  # Dropout, Gumbel noise and the annealed temperature must all resume.
  config, straight, _ = routed_run
  resumed = str(tmp_path / 'resumed')
  assert train.train_and_evaluate(config, resumed, stop_at_step=4) == {}
  train.train_and_evaluate(config, resumed)
  (a, a_meta), (b, b_meta) = final_state(config, straight), final_state(config, resumed)
  assert int(a['step']) == int(b['step']) == 6 and 'router' in a['params']
  assert a_meta['iterator'] == b_meta['iterator']
  jax.tree.map(np.testing.assert_array_equal, a['params'], b['params'])
  jax.tree.map(np.testing.assert_array_equal, a['opt_state'], b['opt_state'])


# ---------------------------------------------------------------- the routed step


def make_canet(spec: ModelSpec, **canet):
  section = config_lib.base_config().canet
  section.update(**canet)
  return step_lib.make_canet(spec, section, total_steps=10, chunk_size=7)


def test_guide_hits_match_a_brute_force_top_k():
  spec = tiny_spec()
  params = step_lib.init_params(spec, 0)
  batch = windows(12, seed=1)
  model = Recommender(spec)
  smallest = RoutingSpace.of(spec).routes[0]
  logits = np.asarray(model.apply({'params': params}, batch['inputs'], method=lambda m, x:
                                  m.logits(m(x, train=False, route=smallest)[:, -1])))
  inputs, k = batch['inputs'], 3
  # Row 0: its best item outside its history (a hit); row 1: its worst (a miss);
  # row 2: an item of its own history, which still competes as the target.
  for row, pick in ((0, np.argmax), (1, np.argmin)):
    outside = [i for i in range(1, V) if i not in set(inputs[row].tolist())]
    batch['targets'][row, -1] = outside[pick(logits[row, outside])]
  batch['targets'][2, -1] = inputs[2, -1]
  hits = np.asarray(jit(make_canet(spec, guide_k=k).guide_hits)(params, batch))
  expected = brute_force_ranks(logits, batch['targets'][:, -1], inputs) < k
  np.testing.assert_array_equal(hits, expected)
  assert hits[0] and not hits[1] and 0 < hits.sum() < len(hits)


@pytest.mark.parametrize('backbone, weights', [
    ('sasrec', (0.3, 0.2, 0.5)),
    # L_SR alone: the router learns through the straight-through masked model.
    ('nextitnet', (0.0, 0.0, 0.0)),
])
def test_routed_step_trains_the_router_and_adds_the_routing_terms(backbone, weights):
  spec = tiny_spec(backbone)
  batch = windows(16, seed=2)
  tx = step_lib.make_optimizer(config_lib.base_config().optim, 10)
  state = step_lib.init_state(spec, tx, seed=0)
  canet = make_canet(spec, **dict(zip(('guide_weight', 'uniform_weight', 'cost_weight'),
                                      weights)))
  step = jit(functools.partial(step_lib.train_step, Recommender(spec), tx, None, canet=canet))
  new, metrics = step(state, batch)
  metrics = jax.device_get(metrics)
  assert bool(metrics['finite'])
  # Every router parameter moved: Adam's first update is zero only for a zero gradient.
  moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(),
                       new['params']['router'], state['params']['router'])
  for path, value in jax.tree_util.tree_leaves_with_path(moved):
    assert value > 0, path
  # The terms against numpy: the router's distribution and the chosen routes' costs.
  logits = np.asarray(router_lib.Router(spec).apply({'params': state['params']['router']},
                                                    batch['inputs']), np.float64)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  costs = routing.relative_costs(spec)
  np.testing.assert_allclose(metrics['expected_cost'], (p @ costs).mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics['uniform_loss'], -np.log(p).mean(), rtol=1e-5)
  rng = jax.random.fold_in(jax.random.wrap_key_data(state['rng']), 0)
  routes = np.asarray(routing.straight_through(logits, jax.random.fold_in(rng, 2))).argmax(-1)
  np.testing.assert_allclose(metrics['routed_cost'], costs[routes].mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics['loss'], metrics['nll'] + sum(
      w * metrics[term] for w, term in zip(weights,
                                           ('guide_loss', 'uniform_loss', 'expected_cost'))),
                             rtol=1e-6)
  assert metrics['temperature'] == 1.0 and 0 <= metrics['guide_hits'] <= 1


def test_temperature_anneals_to_its_floor():
  section = config_lib.base_config().canet
  section.update(temperature=2.0, anneal='exponential', final_temperature=0.5)
  schedule = step_lib.temperature_schedule(section, total_steps=100)
  assert float(schedule(0)) == 2.0 and float(schedule(50)) == pytest.approx(1.0)
  assert float(schedule(100)) == pytest.approx(0.5) and float(schedule(500)) == 0.5
  section.anneal = 'none'
  assert float(step_lib.temperature_schedule(section, 100)(100)) == 2.0


# ---------------------------------------------------------------- evaluation


def test_gumbel_routes_at_test_are_keyed_by_example_not_by_batch():
  spec = tiny_spec()
  params = step_lib.init_params(spec, 0)
  inputs = windows(16, seed=3)['inputs']
  index = np.arange(16)
  key = jax.random.key(7)

  def routes(gumbel, rows):
    return np.asarray(jit(functools.partial(train._eval_routes, spec, gumbel))(
        params, inputs[rows], index[rows], key))

  sampled = routes(True, slice(0, 16))
  # The same routes when the examples come in other batches.
  np.testing.assert_array_equal(np.concatenate([routes(True, slice(0, 8)),
                                                routes(True, slice(8, 16))]), sampled)
  argmax = routes(False, slice(0, 16))
  logits = router_lib.Router(spec).apply({'params': params['router']}, inputs)
  np.testing.assert_array_equal(argmax, np.asarray(logits).argmax(-1))
  assert len(set(sampled.tolist())) > len(set(argmax.tolist()))  # Near-uniform router.


# ---------------------------------------------------------------- config


@pytest.mark.parametrize('field, value', [
    ('temperature', 0.0), ('anneal', 'linear'), ('final_temperature', 2.0),
    ('guide_weight', -0.1), ('uniform_weight', -1.0), ('cost_weight', -0.5),
    ('cost_macs', 'train_forward'), ('guide_k', 0), ('guide_k', 30),
])
def test_bad_canet_values_name_the_field(field, value):
  config = canet_config()
  config.canet[field] = value
  with pytest.raises(config_lib.ConfigError, match=f'canet.{field}'):
    config_lib.validate(config, num_items=30)  # guide_k 30: more than the 29 items.


def test_canet_presets_and_their_errors():
  default = bench_canet.canet_config()
  spec = ModelSpec.from_config(default.model, 1683)
  assert (spec.backbone, spec.embed_dim, spec.num_layers, spec.num_heads, spec.ffn_dim,
          spec.dropout, spec.max_len) == ('sasrec', 128, 8, 4, 512, 0.2, 50)
  assert RoutingSpace.of(spec).num_routes == 36 and default.canet.guide_weight == 0.01
  # Presets apply in a fixed order: 'smoke' shrinks whatever backbone comes after it.
  small = ModelSpec.from_config(bench_canet.canet_config('smoke,nextitnet,cost-0.3').model, 60)
  assert small.backbone == 'nextitnet' and small.depth == 2 and small.routed
  assert bench_canet.canet_config('cost-0.3').canet.cost_weight == 0.3
  assert not ModelSpec.from_config(bench_canet.canet_config('full').model, 1683).routed
  # 'cpu' shrinks the space on either backbone, whatever order the presets come in.
  for presets, backbone in (('cpu', 'sasrec'), ('cpu,nextitnet', 'nextitnet')):
    cpu = ModelSpec.from_config(bench_canet.canet_config(presets).model, 1683)
    space = RoutingSpace.of(cpu)
    assert (cpu.backbone, cpu.embed_dim, cpu.hidden_dim, cpu.depth) == (backbone, 64, 64, 4)
    assert (space.embed_dims, space.depths, space.num_routes) == ((32, 48, 64), (1, 2, 3, 4), 36)
  assert not ModelSpec.from_config(bench_canet.canet_config('full,cpu').model, 1683).routed
  with pytest.raises(config_lib.ConfigError, match="preset 'cost-x'"):
    bench_canet.canet_config('cost-x')
  with pytest.raises(config_lib.ConfigError, match="unknown preset 'turbo'"):
    bench_canet.canet_config('turbo')
  bad = bench_canet.canet_config()
  bad.model.num_layers = 6  # The depths still end at 8.
  with pytest.raises(config_lib.ConfigError, match='model.route_depths'):
    ModelSpec.from_config(bad.model, 1683)


@pytest.mark.parametrize('presets', ['cprec,smoke', 'cprec,adjacent-block,smoke'])
def test_canet_over_cprec_masked_routes_equal_sliced_routes(presets):
  config = bench_canet.canet_config(presets)
  if 'adjacent-block' in presets:  # Two blocks of two layers share; depths 1, 2, 4.
    config.model.update(num_layers=4, route_depths=(1, 2, 4))
  config.data.max_len = L
  count = np.concatenate([[0], 600 // np.arange(1, 60)])  # 1/rank popularity.
  spec = ModelSpec.from_config(config.model, len(count), count)
  assert spec.embedding == 'block' and spec.head == 'adaptive' and spec.sharing != 'none'
  space = RoutingSpace.of(spec)
  model = Recommender(spec)
  params = step_lib.init_params(spec, 0)
  rng = np.random.default_rng(4)
  inputs = rng.integers(1, len(count), (space.num_routes, L)).astype(np.int32)
  routes = np.arange(space.num_routes)

  @jit
  def logits(params, inputs):
    def run(route):
      return model.apply({'params': params}, inputs, method=lambda m, x: m.logits(
          m(x, train=False, route=route)[:, -1]))
    return run(jax.nn.one_hot(routes, space.num_routes)), [run(r) for r in space.routes]

  masked, sliced = logits(params, inputs)
  for k in routes:
    np.testing.assert_allclose(masked[k], sliced[k][k], rtol=1e-5, atol=5e-6,
                               err_msg=str(space.routes[k]))


def test_old_workdirs_without_the_canet_fields_still_resume(tmp_path):
  config = config_lib.apply_presets(config_lib.base_config(), 'smoke')
  saved = json.loads(config.to_json_best_effort())
  del saved['canet']
  for name in ('route_embed_dims', 'route_hidden_dims', 'route_depths', 'router_dim'):
    del saved['model'][name]
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'config.json').write_text(json.dumps(saved))
  train.check_workdir(config, str(workdir))  # Fields added since, at their defaults.
  (workdir / 'config.json').write_text(json.dumps(saved))
  config.canet.cost_weight = 0.5
  with pytest.raises(config_lib.ConfigError, match='another config.*canet.cost_weight'):
    train.check_workdir(config, str(workdir))


# ---------------------------------------------------------------- grid, benchmark


def load_sweep():
  spec = importlib.util.spec_from_file_location('sweep', os.path.join(REPO, 'launch', 'sweep.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_canet_cost_grid_loads_and_tabulates_routed_macs(tmp_path):
  sweep = load_sweep()
  grid = sweep.load_grid('canet-cost')
  assert grid[0][0] == 'full' and len({name for name, _, _ in grid}) == len(grid) >= 4
  configs, weights = [], []
  for name, path, overrides in grid:
    file, _, presets = path.partition(':')
    assert file == 'configs/canet.py' and overrides == {}
    config = bench_canet.canet_config(presets)
    routed = ModelSpec.from_config(config.model, 1683).routed
    assert routed == (name != 'full')
    configs.append(config)
    weights.append(config.canet.cost_weight)
  assert len(set(weights[1:])) == len(grid) - 1
  # A table of a plain and a routed run: routed MACs are the test average.
  results = {'params': {'total': 1000}, 'macs_per_sequence': {'inference': 200},
             'valid': {'NDCG@10': 0.1}, 'test': {'NDCG@10': 0.1, 'HR@10': 0.2}, 'train_s': 1,
             'throughput': {'sequences_per_s': 10.0}}
  routed = json.loads(json.dumps(results))
  routed['test']['routing'] = {'macs': {'inference': 50.0}}
  root = tmp_path / 'grid'
  for (name, _, _), config, r in zip(grid[:2], configs, (results, routed)):
    (root / name).mkdir(parents=True)
    (root / name / 'results.json').write_text(json.dumps(r))
    (root / name / 'config.json').write_text(config.to_json_best_effort())
  rows = sweep.table_rows(grid, str(root))
  assert [(row['routed MACs/seq'], row['routed MACs %']) for row in rows] == [(200, 100.0),
                                                                              (50, 25.0)]
  assert [row['method'] for row in rows] == [
      'SASRec', f'CANet cost {weights[1]:g} (SASRec)']
  report.write_report(rows, str(root))
  assert 'routed MACs %' in (root / 'table.md').read_text()


def test_bench_canet_functions_run_on_tiny_sizes():
  spec = tiny_spec()
  params, inputs, routes = bench_canet.synthetic_case(spec, 16, mix=(0, 3, 7))
  assert inputs.shape == (16, L) and sorted(np.bincount(routes)[[0, 3, 7]]) == [5, 5, 6]
  result = bench_canet.measure(spec, params, inputs, routes, runs=1, buckets=(8,))
  assert result['programs_compiled'] == 3 and result['max_abs_difference'] < 1e-4
  assert set(result['ms']) == {'full', 'masked', 'router', 'routed', 'routed_total'}
  assert all(t > 0 for t in result['ms'].values())
  assert result['ms']['routed_total'] == result['ms']['router'] + result['ms']['routed']
  assert sum(e['count'] for e in result['routes']['histogram']) == 16
  costs = routing.relative_costs(spec)
  np.testing.assert_allclose(result['routes']['macs']['inference_relative'],
                             costs[routes].mean())
  table = bench_canet.format_table(result)
  assert table.count('\n| ') == 1 + 5 and 'router' in table  # The header and 5 rows.
