"""train_and_evaluate(config, workdir): the training program, top to bottom.

The train state (step.py) and the batch iterator's position are checkpointed,
so a resumed run continues bit-for-bit. Model selection is on validation; the best
parameters are evaluated once on test at the end. A routed model (CANet,
model.route_*) trains with step.Canet's objective and is evaluated on the
routes its router picks; results.json then reports the routes and their MACs.

The run is laid out on the device mesh of config.mesh (sharding.py): the
train state is created already sharded (item tables split over `model`), each
process loads its rows of every batch and they are assembled into global
arrays split over `data`, and the jitted step and rank functions keep those
layouts. Checkpoints restore onto the current mesh, whatever mesh wrote them.
Only process 0 writes config.json, metrics and results.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import traverse_util
from jax.sharding import Mesh

from seqcompress_jax import config as config_lib
from seqcompress_jax import compression, evaluate, profiling, rundir, sharding, writers
from seqcompress_jax import step as step_lib
from seqcompress_jax.checkpointing import Checkpoints
from seqcompress_jax.data import Dataset, load_dataset, pipeline
from seqcompress_jax.models import router as router_lib
from seqcompress_jax.models import routing
from seqcompress_jax.models.model import Recommender
from seqcompress_jax.models.spec import ModelSpec

# Fields that may change when a run in a workdir is resumed or re-evaluated.
_RESUMABLE_CHANGES = ('train.num_epochs', 'train.max_steps', 'train.log_every_steps',
                      'train.patience', 'data.cache_dir', 'eval.chunk_size',
                      'mesh.data', 'mesh.model')


# ---------------------------------------------------------------- set-up ----
@dataclasses.dataclass
class Run:
  """Everything derived from (config, workdir) before the first step."""
  config: ml_collections.ConfigDict
  workdir: str
  dataset: Dataset
  spec: ModelSpec
  model: Recommender
  valid: pipeline.EvalSet
  test: pipeline.EvalSet
  mesh: Mesh


def setup(config: ml_collections.ConfigDict, workdir: str) -> Run:
  """Loads data, builds the model spec and the mesh, validates, checks the workdir."""
  ds = load_dataset(config.data)
  config_lib.validate(config, ds.num_items)
  spec = ModelSpec.from_config(config.model, ds.num_items, ds.item_count)
  mesh = sharding.mesh_from_config(config)
  check_workdir(config, workdir)
  history_len = (config.eval.history_len or config.data.max_len
                 if config.eval.exclude_history else 0)
  return Run(config=config, workdir=workdir, dataset=ds, spec=spec,
             model=Recommender(spec),
             valid=pipeline.eval_set(ds, 'valid', config.data.max_len, history_len),
             test=pipeline.eval_set(ds, 'test', config.data.max_len, history_len),
             mesh=mesh)


def _flatten(tree: dict) -> dict[str, Any]:
  """{'a.b': leaf} of a nested dict."""
  return traverse_util.flatten_dict(tree, sep='.')


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes workdir/config.json, or checks that it describes this run."""
  path = os.path.join(workdir, 'config.json')
  current = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    saved, flat = _flatten(saved), _flatten(current)
    # A field added to base_config after the run started, at its default, is no change.
    defaults = _flatten(json.loads(config_lib.base_config().to_json_best_effort()))
    differ = [k for k in sorted(set(saved) | set(flat))
              if saved.get(k) != flat.get(k) and k not in _RESUMABLE_CHANGES
              and not (k not in saved and k in defaults and flat[k] == defaults[k])]
    if differ:
      raise config_lib.ConfigError(
          f'{workdir} holds a run of another config (differs in {", ".join(differ)}); '
          'use a new --workdir')
  if jax.process_index() == 0:
    writers.write_json(path, current)


def sampler_log_q(run: Run) -> jax.Array | None:
  """Unnormalised log popularity, log(1 + training count), for the sampled
  softmax's 'popularity' proposal; None when it is not used."""
  if run.spec.head != 'sampled' or run.spec.sampler != 'popularity':
    return None
  return jnp.log1p(jnp.asarray(run.dataset.item_count, jnp.float32))


def make_evaluator(run: Run) -> Callable[[Any, str], dict[str, Any]]:
  """(params, 'valid' | 'test') -> metrics, under the configured protocol.

  A routed model ranks each example with the route its router picks: the
  argmax or, with canet.gumbel_at_test, a Gumbel-sampled route whose noise is
  keyed by the seed, the split and the example's index (so it does not
  depend on batching). The route runs on the masked path with one-hot
  weights, the same function as its sliced sub-model. The metrics then add
  'routed_cost' (the mean MACs(route) / MACs(full) of canet.cost_macs) and
  'routing' (route_summary of the examples' routes).
  """
  model, e, spec = run.model, run.config.eval, run.spec
  score = functools.partial(step_lib.item_scores, model)
  if spec.routed:
    num_routes = routing.RoutingSpace.of(spec).num_routes

    def encode(params, inputs):  # inputs: {'items' [b, L], 'routes' [b]}.
      return step_lib.last_state(model, params, inputs['items'],
                                 jax.nn.one_hot(inputs['routes'], num_routes))
  else:
    encode = functools.partial(step_lib.last_state, model)

  if e.protocol == 'full':
    rank_fn = evaluate.make_rank_fn(encode, score, run.dataset.num_items, e.chunk_size,
                                    e.exclude_history, run.mesh)
  else:
    rank_fn = evaluate.make_sampled_rank_fn(encode, score)

  negatives = {  # Drawn once: every evaluation ranks against the same ones.
      split: evaluate.sample_negatives(
          getattr(run, split).targets, run.dataset.num_items, e.num_negatives,
          e.negative_sampler, run.dataset.item_count, seed=run.config.seed)
      for split in ('valid', 'test')} if e.protocol == 'sampled' else {}

  def batches(split: str) -> Iterator[dict[str, jax.Array]]:
    stream = pipeline.eval_batches(getattr(run, split), run.config.data.eval_batch_size,
                                   *sharding.process_rows(run.mesh))
    if negatives:
      stream = evaluate.with_negatives(stream, negatives[split])
    return (sharding.global_batch(run.mesh, batch) for batch in stream)

  if not spec.routed:
    return lambda params, split: evaluate.evaluate(rank_fn, params, batches(split), e.ks)

  gumbel = run.config.canet.gumbel_at_test
  route_fn = jax.jit(functools.partial(_eval_routes, spec, gumbel))
  costs = routing.relative_costs(spec, run.config.canet.cost_macs)

  def routed_evaluator(params: Any, split: str) -> dict[str, Any]:
    split_key = jax.random.fold_in(jax.random.key(run.config.seed),
                                   ('valid', 'test').index(split))
    chosen = []

    def with_routes() -> Iterator[dict[str, Any]]:
      for batch in batches(split):
        routes = route_fn(params, batch['inputs'], batch['index'], split_key)
        chosen.append((routes, batch['weights']))
        yield {**batch, 'inputs': {'items': batch['inputs'], 'routes': routes}}

    metrics = evaluate.evaluate(rank_fn, params, with_routes(), e.ks)
    routes = np.concatenate([r[w > 0] for r, w in map(sharding.to_host, chosen)])
    return {**metrics, 'routed_cost': float(costs[routes].mean()),
            'routing': route_summary(spec, routes)}

  return routed_evaluator


def _eval_routes(spec: ModelSpec, gumbel: bool, params: Any, inputs: jax.Array,
                 index: jax.Array, split_key: jax.Array) -> jax.Array:
  """int32 [b]: the argmax routes, or Gumbel-sampled ones keyed per example index."""
  keys = None
  if gumbel:
    keys = jax.vmap(functools.partial(jax.random.fold_in, split_key))(jnp.maximum(index, 0))
  return step_lib.choose_routes(spec, params, inputs, keys)


def _macs_per_route(spec: ModelSpec) -> np.ndarray:
  """float64 [R, 2]: each route's MACs per sequence at inference, with and
  without the output layer (routing.route_macs); the last row is the full model."""
  return np.array([[m['inference'], m['inference'] - m['output']]
                   for m in (routing.route_macs(spec, route)
                             for route in routing.RoutingSpace.of(spec).routes)], float)


def route_summary(spec: ModelSpec, routes: np.ndarray) -> dict[str, Any]:
  """Routes chosen (indices [N] into the routing space): the count of every
  route with its (E, H, D), and their average MACs per sequence at inference,
  with and without the output layer, absolute and relative to the full model."""
  space = routing.RoutingSpace.of(spec)
  counts = np.bincount(routes, minlength=space.num_routes)
  macs = _macs_per_route(spec)
  mean = counts @ macs / max(1, counts.sum())
  return {
      'histogram': [{'route': i, **route._asdict(), 'count': int(count)}
                    for i, (route, count) in enumerate(zip(space.routes, counts))],
      'macs': {'inference': float(mean[0]), 'without_output': float(mean[1]),
               'inference_relative': float(mean[0] / macs[-1, 0]),
               'without_output_relative': float(mean[1] / macs[-1, 1])}}


def routing_costs(spec: ModelSpec) -> dict[str, Any]:
  """The full model's MACs per sequence at inference (with and without the
  output layer) and the router's, absolute and as a share of them."""
  full = dict(zip(('inference', 'without_output'), map(int, _macs_per_route(spec)[-1])))
  router = router_lib.router_macs(spec)
  return {'num_routes': routing.RoutingSpace.of(spec).num_routes, 'full_macs': full,
          'router_macs': router, 'router_relative': {k: router / v for k, v in full.items()}}


# ---------------------------------------------------------------- loop ------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_at_step: int | None = None) -> dict[str, Any]:
  """Trains with early stopping on validation, then tests the best parameters.

  Resumes from workdir/checkpoints when there is one. `stop_at_step` ends the
  run early as if pre-empted (used to test resumption). Returns results.json.
  """
  wall_start = time.time()
  run = setup(config, workdir)
  c = config.train
  windows = pipeline.train_windows(run.dataset, config.data.max_len, config.data.train_stride)
  batches = pipeline.TrainBatches(windows, config.data.batch_size, config.data.shuffle_seed,
                                  *sharding.process_rows(run.mesh))
  total_steps = c.max_steps or c.num_epochs * batches.steps_per_epoch
  eval_every = c.eval_every_steps or batches.steps_per_epoch
  tx = step_lib.make_optimizer(config.optim, total_steps)
  canet = (step_lib.make_canet(run.spec, config.canet, total_steps, config.eval.chunk_size,
                               run.mesh) if run.spec.routed else None)
  state, state_shardings = step_lib.create_state(run.spec, tx, config.seed, run.mesh)
  latest = Checkpoints(os.path.join(workdir, 'checkpoints'), max_to_keep=2)
  best = Checkpoints(os.path.join(workdir, 'best'), max_to_keep=1)
  meta = {'iterator': batches.state(), 'best_metric': -math.inf, 'best_step': 0,
          'bad_evals': 0, 'train_s': 0.0, 'eval_s': 0.0, 'done': False}
  if latest.latest_step() is not None:
    state, meta = latest.restore(state)
    batches.restore(meta['iterator'])
    logging.info('Resumed from step %d of %s', int(state['step']), workdir)
  writer = writers.MetricWriter(workdir)
  evaluator = make_evaluator(run)
  log_q = sampler_log_q(run)
  step = int(state['step'])
  # Without the item tables' padding (model.item_shards): the real model.
  real_params = jax.eval_shape(functools.partial(step_lib.init_params, run.spec.unpadded,
                                                   config.seed))
  logging.info('%s: %d training windows, %d steps/epoch, %d steps; params %s',
               run.spec.backbone, len(windows), batches.steps_per_epoch, total_steps,
               profiling.count_params(real_params))

  compile_start = time.perf_counter()
  step_fn = step_lib.jit_train_step(run.model, tx, log_q, run.mesh, state_shardings,
                                    canet).lower(
      state, sharding.global_batch(run.mesh, _example_batch(batches))).compile()
  compile_s = time.perf_counter() - compile_start
  flops_per_step = profiling.compiled_flops(step_fn)
  logging.info('Compiled the train step in %.1f s (%.3g GFLOP/step)',
               compile_s, flops_per_step / 1e9)

  pending, interval_start, throughput = [], time.perf_counter(), []
  while step < total_steps and not meta['done'] and step != stop_at_step:
    state, metrics = step_fn(state, sharding.global_batch(run.mesh, next(batches)))
    step += 1
    pending.append(metrics)
    evaluate_now = step % eval_every == 0 or step == total_steps
    if evaluate_now or step % c.log_every_steps == 0:
      pending = jax.device_get(pending)  # Waits for the interval's steps to finish.
      seconds = time.perf_counter() - interval_start
      meta['train_s'] += seconds
      _check_finite(pending, c.max_bad_steps, step)
      rates = {**{k: float(np.mean([m[k] for m in pending]))
                  for k in pending[0] if k not in ('finite', 'targets')},
               'step_ms': 1e3 * seconds / len(pending),
               'positions_per_s': sum(int(m['targets']) for m in pending) / seconds,
               'sequences_per_s': len(pending) * config.data.batch_size / seconds,
               'gflops_per_s': flops_per_step * len(pending) / seconds / 1e9}
      writer.write(step, 'train', rates)
      throughput.append(rates)
      logging.info('step %d/%d epoch %.2f loss %.4f%s | %.0f positions/s %.0f seq/s '
                   '%.1f ms/step %.1f GFLOP/s | ETA %s', step, total_steps,
                   step / batches.steps_per_epoch, rates['loss'],
                   f" (nll {rates['nll']:.4f}, routed cost {rates['routed_cost']:.3f})"
                   if canet else '', rates['positions_per_s'],
                   rates['sequences_per_s'], rates['step_ms'], rates['gflops_per_s'],
                   _duration((total_steps - step) * seconds / len(pending)))
      pending = []
    if evaluate_now:
      eval_start = time.perf_counter()
      evaluated = step_lib.eval_params(state)
      valid = evaluator(evaluated, 'valid')
      # Diagnostic only: never read by selection or stopping.
      trace = evaluator(evaluated, 'test') if c.trace_test else None
      meta['eval_s'] += time.perf_counter() - eval_start
      writer.write(step, 'valid', _scalars(valid))
      if trace is not None:
        writer.write(step, 'test_trace', _scalars(trace))
      if valid[c.metric] > meta['best_metric']:
        meta.update(best_metric=valid[c.metric], best_step=step, bad_evals=0)
        best.save(step, evaluated, {'valid': valid})
      else:
        meta['bad_evals'] += 1
        meta['done'] = meta['bad_evals'] >= c.patience
      logging.info('valid @%d: %s | best %s %.4f @%d', step, _fmt(valid),
                   c.metric, meta['best_metric'], meta['best_step'])
      meta['iterator'] = batches.state()
      latest.save(step, state, meta)
    if not pending:  # Logged: the next interval starts now, evaluation excluded.
      interval_start = time.perf_counter()

  if step == stop_at_step:  # Pre-empted: save where we are (unless evaluation just did) and leave.
    if latest.latest_step() != step:
      meta['iterator'] = batches.state()
      latest.save(step, state, meta)
    for closing in (latest, best, writer):
      closing.close()
    return {}
  best.close()  # Waits for the last best save to land.
  best_params, best_meta = best.restore(state['params'])
  eval_start = time.perf_counter()
  test = evaluator(best_params, 'test')
  meta['eval_s'] += time.perf_counter() - eval_start
  writer.write(meta['best_step'], 'test', _scalars(test))
  logging.info('test (best step %d): %s', meta['best_step'], _fmt(test))
  results = {
      'backbone': run.spec.backbone, 'best_step': meta['best_step'], 'steps': step,
      'epochs': step / batches.steps_per_epoch, 'stopped_early': meta['done'],
      'valid': best_meta['valid'], 'test': test,
      'params': profiling.count_params(real_params),
      'param_bytes': profiling.param_bytes(real_params),
      'macs_per_sequence': profiling.macs(run.spec),
      'throughput': {k: _steady(throughput, k) for k in
                     ('positions_per_s', 'sequences_per_s', 'step_ms', 'gflops_per_s')},
      'compile_s': compile_s, 'train_s': meta['train_s'], 'eval_s': meta['eval_s'],
      'wall_s': time.time() - wall_start}
  if run.spec.routed:
    results['routing'] = routing_costs(run.spec)
  if c.compression_report:
    n = min(len(run.test), config.data.eval_batch_size)
    results['compression'] = compression.report(
        run.spec.unpadded, _example_batch(batches),
        {'inputs': run.test.inputs[:n], 'targets': run.test.targets[:n, None]})
    logging.info('Against the uncompressed model of the same widths:\n%s',
                 compression.format_report(results['compression']))
  if jax.process_index() == 0:
    writers.write_json(os.path.join(workdir, 'results.json'), results)
  latest.close()
  writer.close()
  return results


def _example_batch(batches: pipeline.TrainBatches) -> dict[str, np.ndarray]:
  """A batch of the right shape, leaving the iterator where it was."""
  position = batches.state()
  batch = next(batches)
  batches.restore(position)
  return batch


def _check_finite(metrics: list[dict], max_bad_steps: int, step: int) -> None:
  bad = 0
  for m in reversed(metrics):
    if bool(m['finite']):
      break
    bad += 1
  if bad >= max_bad_steps:
    raise FloatingPointError(f'{bad} consecutive non-finite steps up to step {step}: '
                             'lower optim.learning_rate or set optim.grad_clip')


def _steady(rates: list[dict[str, float]], name: str) -> float:
  """Median of a logged rate, leaving out the first interval (warm-up)."""
  values = [r[name] for r in rates[1:] or rates]
  return float(np.median(values)) if values else 0.0


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
  """The metrics without the nested 'routing' summary."""
  return {k: v for k, v in metrics.items() if not isinstance(v, dict)}


def _fmt(metrics: dict[str, Any]) -> str:
  return ' '.join(f'{k} {v:.4f}' for k, v in _scalars(metrics).items() if k != 'num_examples')


def _duration(seconds: float) -> str:
  return time.strftime('%H:%M:%S', time.gmtime(max(0.0, seconds)))


# ---------------------------------------------------------------- eval mode -
def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """--mode=eval: validation and test metrics of the best (else latest) params."""
  run = setup(config, workdir)
  params, which = rundir.restore_params(config, run.spec, workdir, run.mesh)
  evaluator = make_evaluator(run)
  out = {'checkpoint': which, 'valid': evaluator(params, 'valid'),
         'test': evaluator(params, 'test')}
  logging.info('%s: valid %s | test %s', which, _fmt(out['valid']), _fmt(out['test']))
  if jax.process_index() == 0:
    writers.write_json(os.path.join(workdir, 'eval.json'), out)
  return out
