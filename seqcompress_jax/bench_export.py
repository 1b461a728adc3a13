"""Serving speed from exports (issue 7): latency of a single-user request and
throughput at batch 1,024, for trained runs (e.g. an uncompressed, a CpRec and
a CANet model), measured side by side in one process.

  python -m seqcompress_jax.bench_export --workdirs=runs/nextitnet,runs/cprec,runs/canet \\
      --out=export_bench.json

Each workdir is exported (export.export_run with --k, into --export_root or a
temporary folder; a run with CpRec's adaptive softmax once per
--adaptive_topk method, by default both its fast top-k and the top k of all
its log-probabilities) and loaded back (export.load). Requests are the run's test
histories (its dataset's last max_len items before each test target), and
every request goes through Export.topk: host arrays in, the top k indices
and scores back on the host; for CANet the router, the grouping by route on
the host and the sliced sub-models. The models take turns call by call, so
that they share whatever load the machine has. Untimed warm-up passes over
the same requests first compile every program they use.

  latency     batch 1, one test user per call: median and 90th percentile
              over --requests calls
  throughput  --batch_size test users per call (cycled): the median over
              --runs calls, in sequences per second
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from absl import app, flags, logging

from seqcompress_jax import export, rundir
from seqcompress_jax.data import load_dataset, pipeline
from seqcompress_jax.files import atomic_write


def request_histories(workdir: str) -> np.ndarray:
  """int32 [N, max_len]: the run's test inputs (left-padded item indices)."""
  config = rundir.read_config(workdir)
  return pipeline.eval_set(load_dataset(config.data), 'test', config.data.max_len).inputs


def take_turns(calls: dict[str, Callable[[int], Any]], repeats: int) -> dict[str, np.ndarray]:
  """Seconds of calls[name](i) for i in range(repeats), every name's i-th
  call made before anyone's (i+1)-th."""
  seconds = {name: np.empty(repeats) for name in calls}
  for i in range(repeats):
    for name, call in calls.items():
      start = time.perf_counter()
      call(i)
      seconds[name][i] = time.perf_counter() - start
  return seconds


def measure(models: dict[str, export.Export], histories: dict[str, np.ndarray],
            requests: int, batch_size: int, runs: int) -> dict[str, dict[str, Any]]:
  """Latency at batch 1 and throughput at `batch_size` of every model on its
  histories [N, max_len] (Export.topk, history items not excluded)."""
  def single(name: str) -> Callable[[int], Any]:
    rows = histories[name]
    return lambda i: models[name].topk(rows[i % len(rows)][None])

  def batch(name: str) -> Callable[[int], Any]:
    rows = histories[name][np.arange(batch_size) % len(histories[name])]
    return lambda i: models[name].topk(rows)

  singles = {name: single(name) for name in models}
  batches = {name: batch(name) for name in models}
  take_turns(singles, requests)  # Warm-up: compiles every program the requests use.
  take_turns(batches, 1)
  latency, throughput = take_turns(singles, requests), take_turns(batches, runs)
  return {name: {
      'latency_ms': {'median': 1e3 * float(np.median(latency[name])),
                     'p90': 1e3 * float(np.percentile(latency[name], 90)),
                     'requests': requests},
      'throughput': {'batch_size': batch_size, 'runs': runs,
                     'ms_per_batch': 1e3 * float(np.median(throughput[name])),
                     'sequences_per_s': batch_size / float(np.median(throughput[name]))}}
      for name in models}


def describe(model: export.Export) -> dict[str, Any]:
  """What the table shows of an export besides its timings."""
  manifest = model.manifest
  test = (manifest.get('metrics') or {}).get('test') or {}
  return {'kind': manifest['kind'], 'workdir': manifest['source']['workdir'],
          'checkpoint': manifest['source']['checkpoint'], 'params': manifest['sizes']['params'],
          'export_bytes': sum(manifest['sizes']['file_bytes'].values()),
          'programs': sum(len(f['files']) for f in manifest['functions'].values()),
          'test_ndcg10': test.get('NDCG@10'), 'test_routed_cost': test.get('routed_cost')}


def format_table(results: dict[str, dict[str, Any]], batch_size: int) -> str:
  lines = [f'| model | kind | params | export MB | programs | test NDCG@10 | '
           f'latency ms (median / p90), batch 1 | sequences/s, batch {batch_size:,} |',
           '|---|---|---|---|---|---|---|---|']
  for name, r in results.items():
    ndcg = '' if r['test_ndcg10'] is None else f"{r['test_ndcg10']:.4f}"
    if r['test_routed_cost'] is not None:
      ndcg += f" (routed MACs {r['test_routed_cost']:.0%})"
    lines.append(f"| {name} | {r['kind']} | {r['params']:,} | {r['export_bytes'] / 2**20:.2f} | "
                 f"{r['programs']} | {ndcg} | {r['latency_ms']['median']:.2f} / "
                 f"{r['latency_ms']['p90']:.2f} | {r['throughput']['sequences_per_s']:,.0f} |")
  return '\n'.join(lines)


def exports(workdirs: Sequence[str], topk_methods: Sequence[str]
            ) -> dict[str, tuple[str, str]]:
  """name -> (workdir, export_run's topk): a run with the adaptive softmax
  once per method in `topk_methods` ('NAME (fast top-k)'), others once."""
  out = {}
  for workdir in workdirs:
    name = os.path.basename(os.path.normpath(workdir))
    adaptive = rundir.read_config(workdir).model.get('head') == 'adaptive'
    for method in topk_methods if adaptive else topk_methods[:1]:
      label = f'{name} ({method} top-k)' if adaptive else name
      if label in out:
        raise ValueError(f'workdirs: expected distinct folder names, got {name} twice')
      out[label] = (workdir, method)
  return out


def run(workdirs: Sequence[str], export_root: str, k: int, requests: int, batch_size: int,
        runs: int, topk_methods: Sequence[str] = ('fast',)) -> dict[str, Any]:
  """Exports every workdir under `export_root`, loads and measures them."""
  models, histories, export_s = {}, {}, {}
  for index, (name, (workdir, method)) in enumerate(exports(workdirs, topk_methods).items()):
    directory = os.path.join(export_root, str(index))
    start = time.perf_counter()
    export.export_run(workdir, directory, k=k, topk=method)
    export_s[name] = time.perf_counter() - start
    models[name] = export.load(directory)
    histories[name] = request_histories(workdir)
  timings = measure(models, histories, requests, batch_size, runs)
  return {
      'device': jax.devices()[0].device_kind, 'cpu_count': os.cpu_count(),
      'machine': platform.machine(), 'jax': jax.__version__, 'k': k,
      'models': {name: {**describe(models[name]), **timings[name],
                        'export_s': export_s[name]} for name in models}}


def main(argv: list[str]) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # Not orbax's every restore.
  f = flags.FLAGS
  with tempfile.TemporaryDirectory() as tmp:
    result = run(f.workdirs, f.export_root or tmp, f.k, f.requests, f.batch_size, f.runs,
                 f.adaptive_topk)
  print(f"{result['device']} ({result['cpu_count']} CPUs), k = {result['k']}\n"
        f"{format_table(result['models'], f.batch_size)}")
  if f.out:
    atomic_write(f.out, json.dumps(result, indent=2).encode())


if __name__ == '__main__':  # Flags here, not at import: tests import this module.
  flags.DEFINE_list('workdirs', None, 'Trained runs to export and compare.')
  flags.DEFINE_string('export_root', '', 'Keep the exports here (default: a temp folder).')
  flags.DEFINE_integer('k', 10, 'Items per recommendation.')
  flags.DEFINE_multi_enum('adaptive_topk', ['fast', 'full'], export.TOPK_METHODS,
                          'Export a run with the adaptive softmax once per method given.')
  flags.DEFINE_integer('requests', 200, 'Timed single-user requests per model.')
  flags.DEFINE_integer('batch_size', 1024, 'Users per call for the throughput.')
  flags.DEFINE_integer('runs', 10, 'Timed batches per model.')
  flags.DEFINE_string('out', '', 'Write the results as JSON here.')
  flags.mark_flag_as_required('workdirs')
  app.run(main)
