"""Model size and cost: parameters by component, bytes, analytic MACs, the
FLOP count of compiled XLA programs (to cross-check the analytic MACs), and
measured compile, train-step and full-ranking times."""

from __future__ import annotations

import functools
import resource
import time
from typing import Any, Callable

import jax
import numpy as np

from seqcompress_jax import config as config_lib
from seqcompress_jax import evaluate
from seqcompress_jax import step as step_lib
from seqcompress_jax.models import model as model_lib
from seqcompress_jax.models import routing
from seqcompress_jax.models.spec import ModelSpec

_WARMUP_STEPS, _EVAL_RUNS = 3, 3  # Untimed train steps; timed full-ranking runs.

# Top-level parameter collections of Recommender -> reported component.
COMPONENTS = {'embed': 'embedding', 'backbone': 'middle', 'head': 'output'}


def count_params(params: Any) -> dict[str, int]:
  """Parameter counts of the embedding, middle layers, output head and total."""
  counts = {name: 0 for name in COMPONENTS.values()}
  for key, subtree in params.items():
    counts[COMPONENTS.get(key, key)] = sum(
        int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(subtree))
  counts['total'] = sum(counts.values())
  return counts


def param_bytes(params: Any) -> int:
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(params))


def macs(spec: ModelSpec) -> dict[str, int]:
  """Multiply-accumulates of the full model for one sequence of spec.max_len
  positions: routing.route_macs of its largest route (keys explained there)."""
  return routing.route_macs(spec, routing.Route(spec.embed_dim, spec.hidden_dim, spec.depth))


def compiled_flops(compiled: Any) -> float:
  """FLOPs XLA counts for a compiled function (`jit(f).lower(...).compile()`)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis.get('flops', 0.0)) if analysis else 0.0


def peak_memory_mib() -> dict[str, int | None]:
  """This process's peak RSS and, on accelerators that report it, the first
  device's peak bytes in use (None on CPU), in MiB."""
  stats = jax.devices()[0].memory_stats() or {}
  device = stats.get('peak_bytes_in_use')
  return {'peak_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
          'peak_device_mib': None if device is None else device // 2**20}


def median_seconds(fn: Callable[[], Any], runs: int, warmup: int) -> float:
  """Median wall time of `fn()` (blocked until ready) over `runs` after `warmup` calls."""
  times = []
  for i in range(warmup + runs):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    if i >= warmup:
      times.append(time.perf_counter() - start)
  return float(np.median(times))


def measure(spec: ModelSpec, batch: dict[str, np.ndarray], eval_batch: dict[str, np.ndarray],
            steps: int, seed: int = 0) -> dict[str, Any]:
  """Compile time, train-step time and full-ranking time of `spec` on the given
  batches ({'inputs', 'targets'} [B, L]; eval ranks each row's last target)."""
  model = model_lib.Recommender(spec)
  tx = step_lib.make_optimizer(config_lib.base_config().optim, steps)
  state = step_lib.init_state(spec, tx, seed)
  batch = jax.device_put(batch)
  start = time.perf_counter()
  step_fn = jax.jit(functools.partial(step_lib.train_step, model, tx, None),
                    donate_argnums=0).lower(state, batch).compile()
  compile_s = time.perf_counter() - start

  def train_step():
    nonlocal state
    state, _ = step_fn(state, batch)
    return state

  step_s = median_seconds(train_step, steps, _WARMUP_STEPS)

  def encode(p, inputs):
    return model.apply({'params': p}, inputs, method=lambda m, x: m.rank_context(
        m(x, train=False)[:, -1, :]))

  def score(p, context, items):
    return model.apply({'params': p}, context, items, method='score')

  rank_fn = evaluate.make_rank_fn(encode, score, spec.num_items, chunk_size=4096)
  ranked = jax.device_put({'inputs': eval_batch['inputs'],
                           'targets': eval_batch['targets'][:, -1]})
  eval_s = median_seconds(lambda: rank_fn(state['params'], ranked), _EVAL_RUNS, 1)
  flops = compiled_flops(step_fn)
  positions = int((batch['targets'] != 0).sum())
  sequences = len(batch['inputs'])
  return {
      'params': count_params(state['params'])['total'],
      'macs_inference': macs(spec)['inference'], 'compile_s': compile_s,
      'step_ms': 1e3 * step_s, 'sequences_per_s': sequences / step_s,
      'positions_per_s': positions / step_s, 'gflop_per_step': flops / 1e9,
      'gflops_per_s': flops / step_s / 1e9, 'eval_ms': 1e3 * eval_s,
      'eval_sequences_per_s': len(eval_batch['inputs']) / eval_s, **peak_memory_mib()}
