"""CANet routed inference speed (issue 5): the router plus route-grouped, truly
sliced sub-models (router.RoutedInference) against the full model, at batch
1,024, measured side by side in one process.

Model and routes: with --workdir, the trained run's model (its best
checkpoint) and the routes its router picks (argmax) for the run's test
sequences, cycled to --batch_size rows; else configs/canet.py's model
(--presets, e.g. nextitnet or cprec) over --num_items items with random
parameters and random sequences, and a synthetic route mix: the routes of
--mix (default: every route of the space) equally often, shuffled.

Timed (median of --runs after one untimed call, which compiles):
  full model         next-item logits [B, V] at the last position, one program
  masked path        the same routes on the training path (one-hot route
                     weights: every tensor at full width, so full cost)
  router             route logits and their argmax
  routed sub-models  RoutedInference: rows grouped by route on the host,
                     padded to bucket sizes, one compiled program per
                     (route, bucket), results scattered back
  routed total       router + routed sub-models
The routed logits are checked against the masked path's. MACs: the average
over the batch's routes, with and without the output layer, and the router's
own, relative to the full model (train.route_summary, train.routing_costs).

  python -m seqcompress_jax.bench_canet --out=canet.json
  python -m seqcompress_jax.bench_canet --workdir=runs/canet --out=canet.json
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from absl import app, flags

from seqcompress_jax import bench, bench_cprec, profiling, rundir, train, writers
from seqcompress_jax import step as step_lib
from seqcompress_jax.data import load_dataset, pipeline
from seqcompress_jax.models import router as router_lib
from seqcompress_jax.models import routing
from seqcompress_jax.models.model import Recommender
from seqcompress_jax.models.spec import ModelSpec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Allowed |routed - masked| logit difference: float32 rounding of sums over
# different widths (tests/test_canet.py observes <= 5e-7 at small widths).
TOLERANCE = 1e-3


def canet_config(presets: str = '') -> ml_collections.ConfigDict:
  """configs/canet.py's get_config(presets)."""
  path = os.path.join(REPO, 'configs', 'canet.py')
  module_spec = importlib.util.spec_from_file_location('canet_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(presets or None)


def synthetic_case(spec: ModelSpec, batch_size: int, mix: Sequence[int] = (),
                   seed: int = 0) -> tuple[dict, np.ndarray, np.ndarray]:
  """Random parameters (router included), random sequences [B, L] (bench.random_batch)
  and routes [B]: the route indices of `mix` (default: all) equally often, shuffled."""
  rng = np.random.default_rng(seed)
  mix = np.asarray(mix or range(routing.RoutingSpace.of(spec).num_routes))
  inputs = bench.random_batch(rng, batch_size, spec.max_len, spec.num_items)['inputs']
  routes = rng.permutation(np.resize(mix, batch_size)).astype(np.int32)
  return step_lib.init_params(spec, seed), inputs, routes


def trained_case(workdir: str, batch_size: int
                 ) -> tuple[ModelSpec, dict, np.ndarray, np.ndarray]:
  """The run's spec, best parameters, its test sequences cycled to
  `batch_size` rows, and the routes its router picks for them (argmax)."""
  config = rundir.read_config(workdir)
  ds = load_dataset(config.data)
  spec = ModelSpec.from_config(config.model, ds.num_items, ds.item_count)
  if not spec.routed:
    raise ValueError(f'{workdir} holds a run without routing (model.route_* empty)')
  params, _ = rundir.restore_params(config, spec, workdir)
  test = pipeline.eval_set(ds, 'test', config.data.max_len)
  inputs = test.inputs[np.arange(batch_size) % len(test)]
  routes = jax.jit(functools.partial(step_lib.choose_routes, spec))(params, inputs)
  return spec, params, inputs, np.asarray(routes)


def measure(spec: ModelSpec, params: dict, inputs: np.ndarray, routes: np.ndarray,
            runs: int = 10, buckets: Sequence[int] = tuple(2 ** i for i in range(3, 11))
            ) -> dict[str, Any]:
  """Times (ms per batch), throughputs, speed-ups over the full model, the
  routed-vs-masked logit difference, and the MACs of the batch's routes."""
  model = Recommender(spec)
  num_routes = routing.RoutingSpace.of(spec).num_routes
  model_params = {k: v for k, v in params.items() if k != 'router'}

  def logits(p, x, route=None):
    return model.apply({'params': p}, x, method=lambda m, x: m.logits(
        m(x, train=False, route=route)[:, -1]))

  full = jax.jit(logits)
  masked = jax.jit(lambda p, x, r: logits(p, x, jax.nn.one_hot(r, num_routes)))
  router = jax.jit(functools.partial(step_lib.choose_routes, spec))
  routed = router_lib.RoutedInference(spec, buckets=buckets)
  inputs, routes = np.asarray(inputs), np.asarray(routes)
  calls = {'full': lambda: full(model_params, inputs),
           'masked': lambda: masked(model_params, inputs, routes),
           'router': lambda: router(params, inputs),
           'routed': lambda: routed(model_params, inputs, routes)}
  ms = {name: 1e3 * profiling.median_seconds(call, runs, warmup=1)
        for name, call in calls.items()}
  ms['routed_total'] = ms['router'] + ms['routed']
  difference = np.abs(np.asarray(calls['routed']()) - np.asarray(calls['masked']())).max()
  batch = len(inputs)
  return {
      'device': jax.devices()[0].device_kind, 'batch_size': batch,
      'ms': ms, 'sequences_per_s': {name: 1e3 * batch / t for name, t in ms.items()},
      'speedup': {name: ms['full'] / ms[name] for name in ('masked', 'routed', 'routed_total')},
      'programs_compiled': routed.num_compiled, 'max_abs_difference': float(difference),
      'routes': train.route_summary(spec, routes), 'costs': train.routing_costs(spec)}


_ROWS = (('full model', 'full'), ('masked path (training path)', 'masked'),
         ('router', 'router'), ('routed sub-models', 'routed'),
         ('routed total (router + sub-models)', 'routed_total'))


def format_table(result: dict[str, Any]) -> str:
  """A Markdown table of `measure`'s result and a summary line."""
  lines = [f"batch {result['batch_size']:,} on {result['device']}", '',
           '| | ms / batch | sequences/s | speed-up vs full |', '|---|---|---|---|']
  for title, key in _ROWS:
    speedup = result['speedup'].get(key)
    lines.append(f"| {title} | {result['ms'][key]:,.2f} | "
                 f"{result['sequences_per_s'][key]:,.0f} | "
                 f"{'' if speedup is None else f'{speedup:.2f}x'} |")
  macs, costs = result['routes']['macs'], result['costs']
  used = sum(entry['count'] > 0 for entry in result['routes']['histogram'])
  lines += ['', f"average routed MACs: {macs['inference_relative']:.1%} of the full model "
            f"({macs['without_output_relative']:.1%} without the output layer), "
            f"{used} of {costs['num_routes']} routes used; router "
            f"{costs['router_relative']['without_output']:.2%} of the full model's MACs "
            f"without the output layer ({costs['router_relative']['inference']:.2%} with); "
            f"routed vs masked logits: max |difference| {result['max_abs_difference']:.2g}; "
            f"{result['programs_compiled']} (route, bucket) programs compiled"]
  return '\n'.join(lines)


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  if f.workdir:
    spec, params, inputs, routes = trained_case(f.workdir, f.batch_size)
    source = f'routes of {f.workdir} on its test sequences'
  else:
    config = canet_config(f.presets)
    config.data.max_len = f.max_len
    # Zipf training counts, for CpRec's cutoffs (cprec preset).
    counts = np.round(np.concatenate([[0.0], 1e12 * bench_cprec.zipf_weights(f.num_items)]))
    spec = ModelSpec.from_config(config.model, f.num_items, counts.astype(np.int64))
    mix = [int(r) for r in f.mix]
    params, inputs, routes = synthetic_case(spec, f.batch_size, mix)
    source = (f'synthetic: routes {mix or "all"} equally often, random parameters and '
              f'sequences, configs/canet.py:{f.presets}, V = {f.num_items:,}')
  result = measure(spec, params, inputs, routes, f.runs)
  print(f'{source}\n{format_table(result)}')
  if f.out:
    writers.write_json(f.out, {'source': source, 'spec': dataclasses.asdict(spec), **result})
  if result['max_abs_difference'] > TOLERANCE:
    raise AssertionError(f"routed logits differ from the masked path's by "
                         f"{result['max_abs_difference']:.3g} > {TOLERANCE}")


if __name__ == '__main__':  # Flags here, not at import: tests import this module.
  flags.DEFINE_string('workdir', '', 'A trained CANet run: its model and routes.')
  flags.DEFINE_string('presets', '', 'Without --workdir: configs/canet.py presets.')
  flags.DEFINE_integer('num_items', 1683, 'Without --workdir: V, PAD included (ML-100K).')
  flags.DEFINE_integer('max_len', 50, 'Without --workdir: positions per sequence.')
  flags.DEFINE_list('mix', [], 'Without --workdir: route indices used equally often; '
                    'empty: every route.')
  flags.DEFINE_integer('batch_size', 1024, 'Sequences per batch.')
  flags.DEFINE_integer('runs', 10, 'Timed calls per measurement.')
  flags.DEFINE_string('out', '', 'Write the results as JSON here.')
  app.run(main)
