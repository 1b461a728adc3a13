"""CpRec wired into the model and the program: cutoffs from the config, exact
full-ranking with the adaptive head, a compressed run end to end."""

import jax
import numpy as np
import pytest

from seqcompress_jax import config as config_lib
from seqcompress_jax import bench_cprec, evaluate, profiling, rundir, train
from seqcompress_jax.data import pipeline
from seqcompress_jax.models import model as model_lib
from seqcompress_jax.models.spec import ModelSpec


def cprec_model_config(**overrides):
  config = config_lib.base_config()
  config.data.max_len = 8
  config.model.update(backbone='nextitnet', embed_dim=16, hidden_dim=16, dilations=(1, 2),
                      embedding='block', head='adaptive', sharing='cross-block', **overrides)
  return config.model


def test_cutoffs_come_from_the_training_mass():
  # 10 items: the top 2 hold 50% of 20 interactions, the top 5 hold 80%.
  count = np.array([0, 6, 4, 3, 2, 1, 1, 1, 1, 1, 0])
  spec = ModelSpec.from_config(cprec_model_config(cutoff_mass=(0.5, 0.8)), 11, count)
  assert spec.cutoffs == (3, 6, 11)
  assert spec.block_widths == (16, 4, 1)
  # Tails hold 6 and 4 of the 20 interactions; capacity_factor 1.5 by default.
  np.testing.assert_allclose(spec.tail_capacity, (1.5 * 6 / 20, 1.5 * 4 / 20))
  off = ModelSpec.from_config(cprec_model_config(cutoff_mass=(0.5, 0.8), capacity_factor=0),
                              11, count)
  assert off.tail_capacity == ()
  with pytest.raises(config_lib.ConfigError, match='model.capacity_factor'):
    ModelSpec.from_config(cprec_model_config(capacity_factor=-1.0), 11, count)
  with pytest.raises(config_lib.ConfigError, match='model.tail_capacity'):
    ModelSpec(num_items=11, backbone='nextitnet', head='adaptive', cutoffs=(4, 8),
              tail_capacity=(0.5,))
  explicit = ModelSpec.from_config(cprec_model_config(cutoffs=(4, 8)), 11)
  assert explicit.cutoffs == (4, 8, 11)
  with pytest.raises(config_lib.ConfigError, match='model.cutoffs'):
    ModelSpec.from_config(cprec_model_config(), 11)  # no counts to cut from
  with pytest.raises(config_lib.ConfigError, match='model.cutoffs'):
    ModelSpec.from_config(cprec_model_config(cutoffs=(8, 4)), 11)
  with pytest.raises(config_lib.ConfigError, match='model.tied'):
    ModelSpec.from_config(cprec_model_config(cutoffs=(4, 8), tied=True), 11)


def test_full_ranking_with_the_adaptive_head_is_exact():
  spec = ModelSpec.from_config(cprec_model_config(cutoffs=(6, 15)), 30)
  model = model_lib.Recommender(spec)
  params = model_lib.init(spec, jax.random.key(0))
  rng = np.random.default_rng(0)
  inputs = rng.integers(0, 30, (13, 8)).astype(np.int32)
  targets = rng.integers(1, 30, 13).astype(np.int32)

  def encode(p, x):
    return model.apply({'params': p}, x, method=lambda m, x: m.rank_context(
        m(x, train=False)[:, -1]))

  def score(p, context, items):
    return model.apply({'params': p}, context, items, method='score')

  examples = pipeline.EvalSet(inputs=inputs, targets=targets, users=np.arange(13), history=None)
  rank_fn = evaluate.make_rank_fn(encode, score, 30, chunk_size=7)
  ranks = evaluate.ranks_of(rank_fn, params, pipeline.eval_batches(examples, 4))
  log_p = np.asarray(model.apply({'params': params}, inputs, method=lambda m, x: m.logits(
      m(x, train=False)[:, -1])), np.float64)
  assert np.allclose(np.exp(log_p[:, 1:]).sum(axis=1), 1.0, atol=1e-5)
  target = log_p[np.arange(13), targets]
  brute = (log_p[:, 1:] > target[:, None] + 1e-5).sum(axis=1)
  near = (np.abs(log_p[:, 1:] - target[:, None]) <= 1e-5).sum(axis=1) - 1
  assert np.all(ranks >= brute) and np.all(ranks <= brute + near)


def test_norm_chunk_reaches_the_head_and_keeps_topk_exact():
  # model.norm_chunk sets the tail passes' step (a speed knob): any value gives
  # the same top k as ranking log_probs.
  rng = np.random.default_rng(1)
  inputs = rng.integers(0, 30, (9, 8)).astype(np.int32)
  results = []
  for chunk in (2, 8192):
    spec = ModelSpec.from_config(cprec_model_config(cutoffs=(6, 15), norm_chunk=chunk), 30)
    model = model_lib.Recommender(spec)
    params = model_lib.init(spec, jax.random.key(0))
    assert model.apply({'params': params}, method=lambda m: m.head.norm_chunk) == chunk
    results.append(model.apply({'params': params}, inputs, method=lambda m, x: (
        m.head.topk(m(x, train=False)[:, -1], 5, 4),
        jax.lax.top_k(m.logits(m(x, train=False)[:, -1]), 5))))
  for (scores, items), (exact_scores, exact_items) in results:
    np.testing.assert_array_equal(items, exact_items)
    np.testing.assert_allclose(scores, exact_scores, rtol=1e-6, atol=1e-5)


def test_compressed_model_trains_end_to_end(tmp_path):
  config = config_lib.apply_presets(config_lib.base_config(), 'smoke')
  config.data.cache_dir = str(tmp_path / 'cache')
  config.data.synthetic.update(num_users=120, num_items=60, mean_len=12.0, max_len=30)
  config.data.update(max_len=10, batch_size=16, eval_batch_size=32)
  config.model.update(embed_dim=16, hidden_dim=16, dilations=(1, 2, 1, 2),
                      embedding='block', head='adaptive', sharing='cross-block')
  config.train.update(max_steps=6, eval_every_steps=3, log_every_steps=3,
                      compression_report=True)
  results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  report = results['compression']
  assert report['compressed']['params'] == results['params']
  assert report['ratio']['params_total'] == pytest.approx(
      report['uncompressed']['params']['total'] / results['params']['total'])
  assert report['ratio']['params_total'] > 1.5
  assert report['compressed']['step_ms'] > 0 and report['uncompressed']['eval_ms'] > 0
  assert np.isfinite(results['test']['NDCG@10'])
  spec = train.setup(config, str(tmp_path / 'run')).spec
  plain = ModelSpec(num_items=spec.num_items, backbone='nextitnet', embed_dim=16,
                    hidden_dim=16, max_len=10, dilations=(1, 2, 1, 2))
  compressed = profiling.count_params(model_lib.init(spec, jax.random.key(0)))
  uncompressed = profiling.count_params(model_lib.init(plain, jax.random.key(0)))
  assert results['params'] == compressed
  for part in ('embedding', 'middle', 'output'):
    assert compressed[part] < uncompressed[part]
  assert profiling.macs(spec)['output'] < profiling.macs(plain)['output']

  # The fast top-k's tail statistics on the trained run, against numpy.
  stats = bench_cprec.trained_tail_stats(str(tmp_path / 'run'), (1, spec.cutoffs[0]))
  params, _ = rundir.restore_params(config, spec, str(tmp_path / 'run'))
  test = train.setup(config, str(tmp_path / 'run')).test
  model = model_lib.Recommender(spec)
  log_p = np.asarray(model.apply({'params': params}, test.inputs, method=lambda m, x: m.logits(
      m(x, train=False)[:, -1])), np.float64)
  clusters = np.stack([np.logaddexp.reduce(log_p[:, a:b], axis=1)
                       for a, b in zip(spec.cutoffs, spec.cutoffs[1:])], axis=1)
  best_head = log_p[:, 1:spec.cutoffs[0]].max(axis=1, keepdims=True)
  np.testing.assert_allclose(stats['k=1']['rows_cluster_rule'],
                             (clusters > best_head).mean(axis=0))
  np.testing.assert_allclose(stats['k=1']['mean_cluster_p'], np.exp(clusters).mean(axis=0),
                             rtol=1e-5)
  # Rows whose exact top 1 (and top c1) lies in each tail; never above the rows opened.
  for k in (1, spec.cutoffs[0]):
    top = np.argsort(-log_p[:, 1:], axis=1, kind='stable')[:, :k] + 1
    expected = [((top >= a) & (top < b)).any(axis=1).mean()
                for a, b in zip(spec.cutoffs, spec.cutoffs[1:])]
    np.testing.assert_allclose(stats[f'k={k}']['rows_with_tail_in_topk'], expected)
    row = stats[f'k={k}']
    assert all(f <= g <= h for f, g, h in zip(row['rows_with_tail_in_topk'],
                                              row['rows_needing_tail'], row['rows_cluster_rule']))
  # k at least the head's size: every row needs every tail.
  assert stats[f'k={spec.cutoffs[0]}']['rows_needing_tail'] == [1.0] * (len(spec.cutoffs) - 1)


def load_cprec_config(arg):
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'configs', 'cprec.py')
  module_spec = importlib.util.spec_from_file_location('cprec_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize('backbone', ['nextitnet', 'sasrec'])
def test_every_cell_of_the_grid_builds(backbone):
  count = np.concatenate([[0], 4000 // np.arange(1, 401)])  # 1/rank popularity
  sizes = {}
  for blocks in ('full', 'block-input', 'block-softmax', 'both'):
    for scheme in ('none', 'cross-layer', 'cross-block', 'adjacent-layer', 'adjacent-block'):
      config = load_cprec_config(f'{blocks},{scheme},{backbone}')
      spec = ModelSpec.from_config(config.model, len(count), count)
      shapes = jax.eval_shape(lambda: model_lib.init(spec, jax.random.key(0)))
      sizes[blocks, scheme] = profiling.count_params(shapes)
  for blocks in ('full', 'block-input', 'block-softmax', 'both'):
    middle = {s: sizes[blocks, s]['middle'] for s in ('none', 'cross-layer', 'cross-block')}
    assert middle['none'] > middle['cross-block'] > middle['cross-layer']
  assert sizes['block-input', 'none']['embedding'] < sizes['full', 'none']['embedding']
  assert sizes['block-softmax', 'none']['output'] < sizes['full', 'none']['output']
  assert sizes['both', 'cross-block']['total'] < sizes['full', 'none']['total'] / 2
  with pytest.raises(config_lib.ConfigError, match="unknown preset 'turbo'"):
    load_cprec_config('both,turbo')
