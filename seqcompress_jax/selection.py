"""Replays model-selection rules on runs traced with `train.trace_test=True`:
the test score each rule would have kept, read from metrics.jsonl alone.

  python -m seqcompress_jax.selection runs/trace --fixed=40,50 --tail=20 --out=rules.json

A rule sees only a run's validation curve (one value per evaluation) and picks
an evaluation; the table gives the mean test metrics at the picks over the
runs (standard error across runs). Two rows read test, for scale only: the mean
over the last `--tail` evaluations, and an oracle taking each run's best.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, Sequence

import numpy as np
from absl import app, flags

from seqcompress_jax import report
from seqcompress_jax.writers import write_json

METRICS = ('NDCG@10', 'HR@10')


def patience_pick(valid: Sequence[float], patience: int) -> int:
  """The evaluation train.py keeps: the best so far once `patience`
  evaluations in a row have not improved on it, or at the end."""
  best, bad = 0, 0
  for i in range(1, len(valid)):
    if valid[i] > valid[best]:
      best, bad = i, 0
    else:
      bad += 1
      if bad >= patience:
        break
  return best


def smoothed_pick(valid: Sequence[float], window: int) -> int:
  """The last of the `window` consecutive evaluations with the best mean."""
  if len(valid) < window:
    return int(np.argmax(valid))
  means = np.convolve(valid, np.ones(window) / window, mode='valid')
  return int(np.argmax(means)) + window - 1


def rules(fixed: Sequence[int]) -> dict[str, Callable[[np.ndarray], int]]:
  """Rule name -> pick (validation curve -> evaluation index, 0-based);
  `fixed` adds 'evaluation N' (1-based; the last one where a run is shorter)."""
  out: dict[str, Callable[[np.ndarray], int]] = {
      'best validation, patience 10': functools.partial(patience_pick, patience=10),
      'best validation, patience 20': functools.partial(patience_pick, patience=20),
      'best validation': lambda v: int(np.argmax(v)),
      'best 5-evaluation mean of validation': functools.partial(smoothed_pick, window=5),
  }
  for n in fixed:
    out[f'evaluation {n}, no selection'] = lambda v, n=n: min(n, len(v)) - 1
  return out


def read_trace(workdir: str, metric: str) -> dict[str, np.ndarray]:
  """The curves of a traced run at the evaluations with both validation and
  test: 'valid' (`metric`) and each of METRICS on test. ValueError naming the
  run when it has no test trace."""
  series = {'valid': ('valid', metric)}
  series.update({m: ('test_trace', m) for m in METRICS})
  curves = {k: dict(v) for k, v in report.read_curves(workdir, series).items()}
  steps = sorted(set.intersection(*(set(c) for c in curves.values())))
  if not steps:
    raise ValueError(f'{workdir}: no test trace in metrics.jsonl (train with '
                     '--config.train.trace_test=True)')
  return {k: np.array([c[s] for s in steps]) for k, c in curves.items()}


def replay(traces: Sequence[dict[str, np.ndarray]], fixed: Sequence[int] = (),
           tail: int = 20) -> dict[str, dict]:
  """Rule -> {'picks': 1-based evaluation per run, metric: mean, metric + ' se'}."""
  picks = {name: [pick(t['valid']) for t in traces] for name, pick in rules(fixed).items()}
  picks['oracle: each run\'s best test'] = [int(np.argmax(t[METRICS[0]])) for t in traces]
  out = {name: _summary([{m: t[m][i] for m in METRICS} for t, i in zip(traces, p)],
                        [i + 1 for i in p]) for name, p in picks.items()}
  out[f'mean test of the last {tail} evaluations'] = _summary(
      [{m: t[m][-tail:].mean() for m in METRICS} for t in traces], [])
  return out


def _summary(values: list[dict[str, float]], picks: list[int]) -> dict:
  out: dict = {'picks': picks}
  for m in METRICS:
    x = np.array([v[m] for v in values])
    out[m] = float(x.mean())
    out[m + ' se'] = float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0
  return out


def markdown(table: dict[str, dict], runs: int) -> str:
  lines = [f'| rule ({runs} runs) | evaluations picked | mean test {METRICS[0]} (s.e.) '
           f'| mean test {METRICS[1]} |', '|---|---|---|---|']
  for name, row in table.items():
    picked = f'{min(row["picks"])}-{max(row["picks"])}' if row['picks'] else ''
    lines.append(f'| {name} | {picked} | {row[METRICS[0]]:.4f} ({row[METRICS[0] + " se"]:.4f})'
                 f' | {row[METRICS[1]]:.4f} |')
  return '\n'.join(lines) + '\n'


def main(argv: list[str]) -> None:
  if len(argv) < 2:
    raise app.UsageError('give one or more traced runs, folders of runs or globs')
  f = flags.FLAGS
  try:
    traces = [read_trace(run, f.metric) for run in report.find_runs(argv[1:])]
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'error: {e}')
  table = replay(traces, [int(n) for n in f.fixed], f.tail)
  print(markdown(table, len(traces)), end='')
  if f.out:
    write_json(f.out, table)


if __name__ == '__main__':
  flags.DEFINE_string('metric', 'NDCG@10', 'Validation metric the rules read.')
  flags.DEFINE_list('fixed', [], 'Also keep these evaluations (1-based), no selection.')
  flags.DEFINE_integer('tail', 20, 'Evaluations in the "mean test" row.')
  flags.DEFINE_string('out', None, 'Write the table as JSON here.')
  app.run(main)
