"""Runs a grid of configs/ablations.py locally, one workdir per run, and tabulates it.

  python launch/sweep.py --grid=cprec --root=runs/cprec-grid
  python launch/sweep.py --grid=cprec --root=runs/cprec-grid --dry_run   # print the commands
  python launch/sweep.py --grid=cprec-headline --root=runs/seeds --seeds=0-7 --parallel=6

--seeds repeats every run of the grid once per seed (NAME-sS, with
config.seed = config.data.shuffle_seed = S); --parallel runs that many at a
time (for an accelerator that small runs leave idle).

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

from absl import app, flags

from seqcompress_jax import report

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


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  grid = with_seeds(load_grid(f.grid), parse_seeds(f.seeds))
  rows = run_grid(grid, f.root, f.dry_run, f.parallel)
  if not f.dry_run and rows:
    report.write_report(rows, f.root)
    print(report.markdown(rows))


if __name__ == '__main__':  # Flags here: tests import this file more than once.
  flags.DEFINE_string('grid', None, 'A grid name of configs/ablations.py.', required=True)
  flags.DEFINE_string('root', None, 'Folder holding one workdir per run.', required=True)
  flags.DEFINE_bool('dry_run', False, 'Print the commands, run nothing.')
  flags.DEFINE_string('seeds', '', 'Run the grid once per seed, e.g. 0-7 or 0,2,5.')
  flags.DEFINE_integer('parallel', 1, 'Runs at a time.', lower_bound=1)
  app.run(main)
