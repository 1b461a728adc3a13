"""The training program end to end on a tiny synthetic log: train, checkpoint,
resume bit-for-bit, evaluate, results; the NaN guard; schedules; bad configs."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqcompress_jax import config as config_lib
from seqcompress_jax import main as main_lib
from seqcompress_jax import rundir
from seqcompress_jax import step as step_lib
from seqcompress_jax import train
from seqcompress_jax.checkpointing import Checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(tmp_path, backbone='nextitnet'):
  config = config_lib.apply_presets(config_lib.base_config(), 'smoke')
  config.data.cache_dir = str(tmp_path / 'cache')
  config.data.synthetic.update(num_users=120, num_items=60, mean_len=12.0, max_len=30)
  config.data.max_len = 10
  config.data.batch_size = 16
  config.data.eval_batch_size = 32
  config.model.update(backbone=backbone, embed_dim=16, hidden_dim=16, ffn_dim=32,
                      dilations=(1, 2), num_layers=1)
  config.train.update(max_steps=12, eval_every_steps=6, log_every_steps=3)
  return config


@pytest.mark.parametrize('backbone', ['nextitnet', 'sasrec'])
def test_train_evaluate_and_outputs(tmp_path, backbone):
  config = tiny_config(tmp_path, backbone)
  workdir = str(tmp_path / 'run')
  results = train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, 'results.json')) as f:
    assert json.load(f)['test'] == results['test']
  assert results['steps'] == 12 and results['best_step'] in (6, 12)
  assert 0.0 <= results['test']['NDCG@10'] <= results['test']['HR@10'] <= 1.0
  assert results['test']['num_examples'] == 120
  assert results['params']['total'] == sum(
      results['params'][k] for k in ('embedding', 'middle', 'output'))
  assert results['macs_per_sequence']['inference'] > 0
  assert results['throughput']['positions_per_s'] > 0
  splits = [json.loads(line)['split'] for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert splits.count('valid') == 2 and splits.count('test') == 1 and 'train' in splits
  # --mode=eval re-evaluates the best checkpoint and gets the same test metrics.
  again = train.evaluate_checkpoint(config, workdir)
  assert again['test'] == results['test']


def test_test_trace_is_a_diagnostic_only(tmp_path):
  config = tiny_config(tmp_path)
  plain = train.train_and_evaluate(config, str(tmp_path / 'plain'))
  config.train.trace_test = True
  traced = train.train_and_evaluate(config, str(tmp_path / 'traced'))
  assert (traced['best_step'], traced['test']) == (plain['best_step'], plain['test'])
  rows = [json.loads(line) for line in open(tmp_path / 'traced' / 'metrics.jsonl')]
  trace = {row['step']: row for row in rows if row['split'] == 'test_trace'}
  assert sorted(trace) == [6, 12]  # One per evaluation.
  assert trace[traced['best_step']]['NDCG@10'] == pytest.approx(traced['test']['NDCG@10'])
  assert not any(row['split'] == 'test_trace' for row in
                 map(json.loads, open(tmp_path / 'plain' / 'metrics.jsonl')))


@pytest.mark.parametrize('variant', ['sampled', 'tied_bf16_history'])
def test_other_heads_and_protocols_run_end_to_end(tmp_path, variant):
  config = tiny_config(tmp_path)
  config.train.update(max_steps=4, eval_every_steps=4)
  if variant == 'sampled':
    config.model.update(head='sampled', sampler='popularity', num_samples=16)
    config.eval.update(protocol='sampled', num_negatives=20)
  else:
    config.model.update(tied=True, dtype='bfloat16')
    config.eval.exclude_history = True
  results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert np.isfinite(results['valid']['NDCG@10']) and results['test']['num_examples'] == 120
  if variant == 'sampled':  # ranks among 21 candidates: HR@20 misses only rank 20
    assert results['test']['HR@20'] >= 0.5
  else:
    vocabulary = results['params']['embedding'] // config.model.embed_dim
    assert results['params']['output'] == vocabulary  # tied: the head keeps its bias only


def final_state(config, workdir, step=None):
  """The latest checkpoint of `workdir` (or the one at `step`) and its JSON side-car."""
  run = train.setup(config, workdir)
  tx = step_lib.make_optimizer(config.optim, config.train.max_steps)
  like = step_lib.init_state(run.spec, tx, config.seed)
  ckpt = Checkpoints(os.path.join(workdir, 'checkpoints'), max_to_keep=2)
  state, meta = ckpt.restore(like, step)
  ckpt.close()
  return state, meta


@pytest.mark.parametrize('eval_every', [100, 5])  # Pre-empted between evaluations, or at one.
def test_resume_is_bit_for_bit(tmp_path, eval_every):
  config = tiny_config(tmp_path, 'sasrec')  # dropout: the rng must resume too
  config.train.update(max_steps=10, eval_every_steps=eval_every)
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  train.train_and_evaluate(config, straight)
  assert train.train_and_evaluate(config, resumed, stop_at_step=5) == {}
  train.train_and_evaluate(config, resumed)
  (a, a_meta), (b, b_meta) = final_state(config, straight), final_state(config, resumed)
  assert int(a['step']) == int(b['step']) == 10
  assert a_meta['iterator'] == b_meta['iterator']
  jax.tree.map(np.testing.assert_array_equal, a['params'], b['params'])
  jax.tree.map(np.testing.assert_array_equal, a['opt_state'], b['opt_state'])


def test_moving_average_matches_a_numpy_reference():
  decay, steps = 0.9, 30
  tx = step_lib.average_params(decay)
  params = {'w': jnp.array([1.0, -2.0])}
  state = tx.init(params)
  rng = np.random.default_rng(0)
  average, w = np.array([1.0, -2.0]), np.array([1.0, -2.0])
  for t in range(steps):
    updates = {'w': jnp.asarray(rng.normal(size=2), jnp.float32)}
    passed, state = tx.update(updates, state, params)
    np.testing.assert_array_equal(passed['w'], updates['w'])  # Updates pass unchanged.
    params = {'w': params['w'] + updates['w']}
    w = w + np.asarray(updates['w'])
    rate = min(decay, (1 + t) / (10 + t))
    average = rate * average + (1 - rate) * w
  np.testing.assert_allclose(state.average['w'], average, rtol=1e-5)
  assert int(state.count) == steps


def test_moving_average_is_what_is_evaluated_kept_and_resumed(tmp_path):
  config = tiny_config(tmp_path, 'sasrec')
  config.optim.ema_decay = 0.9
  config.train.update(max_steps=10, eval_every_steps=5)
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  train.train_and_evaluate(config, straight)
  train.train_and_evaluate(config, resumed, stop_at_step=5)
  train.train_and_evaluate(config, resumed)
  (a, _), (b, _) = final_state(config, straight), final_state(config, resumed)
  jax.tree.map(np.testing.assert_array_equal, a['opt_state'], b['opt_state'])
  assert not np.array_equal(step_lib.eval_params(a)['embed']['embedding'],
                            a['params']['embed']['embedding'])
  # The best checkpoint holds the average of its step (evaluations at 5 and 10 are both kept).
  best_step = json.load(open(os.path.join(straight, 'results.json')))['best_step']
  at_best, _ = final_state(config, straight, step=best_step)
  restored, which = rundir.restore_params(config, train.setup(config, straight).spec,
                                          straight)
  assert which == f'best (step {best_step})'
  jax.tree.map(np.testing.assert_array_equal, restored, step_lib.eval_params(at_best))


def test_workdir_of_another_config_is_refused(tmp_path):
  config = tiny_config(tmp_path)
  config.train.max_steps = 2
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  config.model.embed_dim = 32
  with pytest.raises(config_lib.ConfigError, match='another config.*model.embed_dim'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))


def test_non_finite_step_leaves_the_state_unchanged(tmp_path):
  config = tiny_config(tmp_path)
  run = train.setup(config, str(tmp_path / 'run'))
  tx = step_lib.make_optimizer(config.optim, 10)
  state = step_lib.init_state(run.spec, tx, config.seed)
  table = state['params']['embed']['embedding']
  state['params']['embed']['embedding'] = table.at[3].set(jnp.inf)
  batch = {'inputs': jnp.full((4, 10), 3, jnp.int32), 'targets': jnp.full((4, 10), 5, jnp.int32)}
  new, metrics = step_lib.train_step(run.model, tx, None, state, batch)
  assert not bool(metrics['finite']) and int(new['step']) == 1
  jax.tree.map(np.testing.assert_array_equal, new['params'], state['params'])
  jax.tree.map(np.testing.assert_array_equal, new['opt_state'], state['opt_state'])
  with pytest.raises(FloatingPointError, match='non-finite'):
    train._check_finite([{'finite': False}] * 3, max_bad_steps=3, step=7)


@pytest.mark.parametrize('schedule, at_end', [('constant', 1e-2), ('cosine', 0.0),
                                              ('exponential', 1e-3)])
def test_schedules_warm_up_then_reach_their_end_value(schedule, at_end):
  optim = config_lib.base_config().optim
  optim.update(learning_rate=1e-2, schedule=schedule, warmup_steps=10, decay_rate=0.1)
  lr = step_lib.make_schedule(optim, total_steps=110)
  assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(5e-3)
  assert float(lr(10)) == pytest.approx(1e-2)
  assert float(lr(110)) == pytest.approx(at_end, abs=1e-9)


def test_adam_weight_decay_is_l2_and_adamw_is_decoupled():
  optim = config_lib.base_config().optim
  optim.update(learning_rate=0.1, weight_decay=0.5, grad_clip=0.0)
  params, zero_grad = {'w': jnp.array([2.0])}, {'w': jnp.array([0.0])}
  adam = step_lib.make_optimizer(optim, 10)
  update, _ = adam.update(zero_grad, adam.init(params), params)
  assert float(update['w'][0]) == pytest.approx(-0.1, rel=1e-4)  # Adam normalises wd * w
  optim.optimizer = 'adamw'
  adamw = step_lib.make_optimizer(optim, 10)
  update, _ = adamw.update(zero_grad, adamw.init(params), params)
  assert float(update['w'][0]) == pytest.approx(-0.1 * 0.5 * 2.0)


def test_bad_configs_name_the_field(tmp_path):
  config = tiny_config(tmp_path)
  for field, value, message in [
      (('eval', 'ks'), (5, 100), 'eval.ks'),
      (('train', 'metric'), 'NDCG@50', 'train.metric'),
      (('optim', 'learning_rate'), -1.0, 'optim.learning_rate'),
  ]:
    bad = config.copy_and_resolve_references()
    bad[field[0]][field[1]] = value
    with pytest.raises(config_lib.ConfigError, match=message):
      train.setup(bad, str(tmp_path / 'run'))
  with pytest.raises(config_lib.ConfigError, match='unknown preset'):
    config_lib.apply_presets(config_lib.base_config(), 'smoke,turbo')


def test_unknown_override_is_named():
  argv = ['main', '--config=configs/nextitnet.py:smoke', '--config.model.embed_dimm=3']
  cwd = os.getcwd()
  os.chdir(REPO)
  try:
    with pytest.raises(config_lib.ConfigError, match="config.model has no field 'embed_dimm'"):
      main_lib.check_overrides(argv)
    main_lib.check_overrides(argv[:2] + ['--config.model.embed_dim=3'])
  finally:
    os.chdir(cwd)


def test_command_line_smoke_run(tmp_path):
  env = {**os.environ, 'SEQCOMPRESS_DATA': str(tmp_path / 'cache')}
  cmd = [sys.executable, '-m', 'seqcompress_jax.main', '--config=configs/nextitnet.py:smoke',
         f'--workdir={tmp_path / "run"}', '--config.train.max_steps=4']
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert os.path.exists(tmp_path / 'run' / 'results.json')
  bad = subprocess.run(cmd[:4] + [f'--workdir={tmp_path / "bad"}', '--config.data.max_len=-1'],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1 and 'error: data.max_len' in bad.stderr
