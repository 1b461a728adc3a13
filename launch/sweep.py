"""Runs a grid of configs/ablations.py locally, one workdir per run, and tabulates it.

  python launch/sweep.py --grid=cprec --root=runs/cprec-grid
  python launch/sweep.py --grid=cprec --root=runs/cprec-grid --dry_run   # print the commands
  python launch/sweep.py --grid=cprec-headline --root=runs/seeds --seeds=0-7 --parallel=6

--seeds repeats every run of the grid once per seed (NAME-sS, with
config.seed = config.data.shuffle_seed = S) and adds ROOT/seeds.md: per run of
the grid, the mean and standard error over its finished seeds. --parallel runs
that many at a time (for an accelerator that small runs leave idle).

A finished run (its workdir holds results.json) is skipped; an interrupted one
resumes from its checkpoints, so re-running the same command completes a
sweep. Writes the report of its finished runs (seqcompress_jax/report.py):
ROOT/table.md, ROOT/table.csv and, where matplotlib is installed,
ROOT/ndcg_vs_params.png, ROOT/ndcg_vs_macs.png (test NDCG@10 against the
average MACs per sequence: CANet's trade-off curve) and ROOT/training_curves.png.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import subprocess
import sys
from typing import Any

import numpy as np
from absl import app, flags

from seqcompress_jax import report
from seqcompress_jax.files import atomic_write

SUMMARISED = ('test NDCG@10', 'test HR@10', 'valid NDCG@10')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_grid(name: str) -> list[tuple[str, str, dict]]:
  """The runs of grid `name` in configs/ablations.py."""
  path = os.path.join(REPO, 'configs', 'ablations.py')
  spec = importlib.util.spec_from_file_location('ablations', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if name not in module.GRIDS:
    raise ValueError(f'--grid: no grid {name!r} in {path}; expected one of {sorted(module.GRIDS)}')
  return module.GRIDS[name]


def parse_seeds(text: str) -> list[int]:
  """'0-3,7' -> [0, 1, 2, 3, 7]; '' -> []."""
  seeds = []
  for part in filter(None, text.split(',')):
    first, dash, last = part.partition('-')
    last = last if dash else first
    if not (first.isdigit() and last.isdigit()) or int(last) < int(first):
      raise ValueError(f'--seeds: expected integers or ranges A-B (A <= B), comma-separated, '
                       f'got {part!r}')
    seeds += range(int(first), int(last) + 1)
  return seeds


def with_seeds(grid: list[tuple[str, str, dict]], seeds: list[int]) -> list[tuple[str, str, dict]]:
  """Every run of `grid` once per seed (none: the grid as it is)."""
  if not seeds:
    return grid
  return [(f'{name}-s{seed}', config, {**overrides, 'seed': seed, 'data.shuffle_seed': seed})
          for name, config, overrides in grid for seed in seeds]


def command(config: str, overrides: dict, workdir: str) -> list[str]:
  return ([sys.executable, '-m', 'seqcompress_jax.main', f'--config={os.path.join(REPO, config)}',
           f'--workdir={workdir}']
          + [f'--config.{field}={value}' for field, value in overrides.items()])


def run_grid(grid: list[tuple[str, str, dict]], root: str, dry_run: bool = False,
             parallel: int = 1) -> list[dict]:
  """Runs every unfinished run of `grid`, `parallel` at a time; returns the
  rows of the table."""
  pending = []
  for name, config, overrides in grid:
    workdir = os.path.join(root, name)
    cmd = command(config, overrides, workdir)
    if os.path.exists(os.path.join(workdir, 'results.json')):
      print(f'{name}: finished, skipped')
    elif dry_run:
      print(' '.join(cmd))
    else:
      pending.append((name, workdir, cmd))

  def run(name: str, workdir: str, cmd: list[str]) -> None:
    print(f'{name}: running', flush=True)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'log.txt'), 'a') as log:
      if subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode:
        print(f'{name}: FAILED, see {workdir}/log.txt', flush=True)

  with concurrent.futures.ThreadPoolExecutor(max(1, parallel)) as pool:
    for done in [pool.submit(run, *job) for job in pending]:
      done.result()
  return table_rows(grid, root)


def table_rows(grid: list[tuple[str, str, dict]], root: str) -> list[dict]:
  """The report's rows (seqcompress_jax.report.run_row) of the grid's finished
  runs, in grid order, named as in the grid."""
  return report.table_rows([os.path.join(root, name) for name, _, _ in grid
                            if os.path.exists(os.path.join(root, name, 'results.json'))])


def seed_summary(grid: list[tuple[str, str, dict]], seeds: list[int],
                 rows: list[dict]) -> list[dict[str, Any]]:
  """Per run of `grid` with a finished seed: 'run', 'seeds' (how many), and
  the mean and standard error (0 for one seed) of each SUMMARISED column over
  the rows named NAME-sS."""
  by_name = {row['run']: row for row in rows}
  summary = []
  for name, _, _ in grid:
    found = [by_name[f'{name}-s{seed}'] for seed in seeds if f'{name}-s{seed}' in by_name]
    if not found:
      continue
    entry = {'run': name, 'seeds': len(found)}
    for column in SUMMARISED:
      values = np.array([row[column] for row in found], np.float64)
      error = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else 0.0
      entry[column] = (float(values.mean()), float(error))
    summary.append(entry)
  return summary


def seed_markdown(summary: list[dict[str, Any]]) -> str:
  """seed_summary as a Markdown table of 'mean (s.e.)' cells."""
  lines = ['| run | seeds | ' + ' | '.join(f'{c} mean (s.e.)' for c in SUMMARISED) + ' |',
           '|' + '---|' * (2 + len(SUMMARISED))]
  lines += [f'| {e["run"]} | {e["seeds"]} | ' + ' | '.join(
      f'{e[c][0]:.4f} ({e[c][1]:.4f})' for c in SUMMARISED) + ' |' for e in summary]
  return '\n'.join(lines) + '\n'


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  base, seeds = load_grid(f.grid), parse_seeds(f.seeds)
  rows = run_grid(with_seeds(base, seeds), f.root, f.dry_run, f.parallel)
  if not f.dry_run and rows:
    report.write_report(rows, f.root)
    print(report.markdown(rows))
    if seeds:
      text = seed_markdown(seed_summary(base, seeds, rows))
      atomic_write(os.path.join(f.root, 'seeds.md'), text.encode())
      print(text)


if __name__ == '__main__':  # Flags here: tests import this file more than once.
  flags.DEFINE_string('grid', None, 'A grid name of configs/ablations.py.', required=True)
  flags.DEFINE_string('root', None, 'Folder holding one workdir per run.', required=True)
  flags.DEFINE_bool('dry_run', False, 'Print the commands, run nothing.')
  flags.DEFINE_string('seeds', '', 'Run the grid once per seed, e.g. 0-7 or 0,2,5.')
  flags.DEFINE_integer('parallel', 1, 'Runs at a time.', lower_bound=1)
  app.run(main)
