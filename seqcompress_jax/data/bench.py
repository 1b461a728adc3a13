"""Benchmark of data preparation on synthetic logs: time per stage, peak memory.

  python -m seqcompress_jax.data.bench --sizes=1000000,10000000 --out=data_bench.json

Each size runs in a fresh process so that its peak RSS is its own.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from seqcompress_jax.data import dataset, pipeline, preprocess, split, synthetic


def run_one(interactions: int, core: int) -> dict:
  """Prepares ~`interactions` synthetic rows (mean length 20, items = rows / 10)."""
  times = {}
  start = time.perf_counter()

  def lap(name):
    nonlocal start
    now = time.perf_counter()
    times[name] = round(now - start, 3)
    start = now

  inter = synthetic.generate(num_users=interactions // 20, num_items=interactions // 10,
                             mean_len=20.0, seed=0)
  lap('generate')
  inter = preprocess.filter_interactions(inter, user_core=core, item_core=core)
  lap('filter_kcore')
  seqs = preprocess.to_sequences(inter)
  ds = dataset.index_by_frequency(seqs, split.leave_one_out(seqs.lengths), {})
  lap('sequences_split_index')
  with tempfile.TemporaryDirectory() as tmp:
    dataset.save(ds, f'{tmp}/ds')
    lap('save')
    ds = dataset.load(f'{tmp}/ds')
    lap('load')
  windows = pipeline.train_windows(ds, max_len=50)
  pipeline.eval_set(ds, 'test', max_len=50)
  lap('windows_eval_set')
  return {'interactions': ds.stats['interactions'], 'users': ds.stats['users'],
          'items': ds.stats['items'], 'windows': int(len(windows)),
          'seconds': times, 'total_s': round(sum(times.values()), 2),
          'peak_rss_mib': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main(argv: list[str]) -> None:
  del argv
  if flags.FLAGS.one:
    print(json.dumps(run_one(flags.FLAGS.one, flags.FLAGS.core)))
    return
  rows = []
  for size in map(int, flags.FLAGS.sizes):
    out = subprocess.run([sys.executable, '-m', 'seqcompress_jax.data.bench',
                          f'--one={size}', f'--core={flags.FLAGS.core}'],
                         capture_output=True, text=True, check=True)
    rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
  stages = list(rows[0]['seconds'])
  print('| interactions (after k-core) | users | items | ' + ' | '.join(stages)
        + ' | total s | peak RSS MiB |')
  print('|' + '---|' * (len(stages) + 5))
  for r in rows:
    print(f"| {r['interactions']:,} | {r['users']:,} | {r['items']:,} | "
          + ' | '.join(f"{r['seconds'][s]:.2f}" for s in stages)
          + f" | {r['total_s']:.1f} | {r['peak_rss_mib']:,} |")
  if flags.FLAGS.out:
    with open(flags.FLAGS.out, 'w') as f:
      json.dump({'core': flags.FLAGS.core, 'runs': rows}, f, indent=2)


if __name__ == '__main__':  # Flags here, not at import: tests import this module.
  flags.DEFINE_list('sizes', ['1000000', '10000000'], 'Interactions per run.')
  flags.DEFINE_integer('core', 5, 'user_core = item_core for the k-core.')
  flags.DEFINE_string('out', '', 'Write the results as JSON here.')
  flags.DEFINE_integer('one', 0, 'Internal: run one size in this process.')
  app.run(main)
