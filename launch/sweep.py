"""Runs a grid of configs/ablations.py locally, one workdir per run, and tabulates it.

  python launch/sweep.py --grid=cprec --root=runs/cprec-grid
  python launch/sweep.py --grid=cprec --root=runs/cprec-grid --dry_run   # print the commands

A finished run (its workdir holds results.json) is skipped; an interrupted one
resumes from its checkpoints, so re-running the same command completes a
sweep. Writes the report of its finished runs (seqcompress_jax/report.py):
ROOT/table.md, ROOT/table.csv and, where matplotlib is installed,
ROOT/ndcg_vs_params.png, ROOT/ndcg_vs_macs.png (test NDCG@10 against the
average MACs per sequence: CANet's trade-off curve) and ROOT/training_curves.png.
"""

from __future__ import annotations

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


def command(config: str, overrides: dict, workdir: str) -> list[str]:
  return ([sys.executable, '-m', 'seqcompress_jax.main', f'--config={os.path.join(REPO, config)}',
           f'--workdir={workdir}']
          + [f'--config.{field}={value}' for field, value in overrides.items()])


def run_grid(grid: list[tuple[str, str, dict]], root: str, dry_run: bool = False) -> list[dict]:
  """Runs every unfinished run of `grid` in turn; returns the rows of the table."""
  for name, config, overrides in grid:
    workdir = os.path.join(root, name)
    cmd = command(config, overrides, workdir)
    if os.path.exists(os.path.join(workdir, 'results.json')):
      print(f'{name}: finished, skipped')
    elif dry_run:
      print(' '.join(cmd))
    else:
      print(f'{name}: running', flush=True)
      os.makedirs(workdir, exist_ok=True)
      with open(os.path.join(workdir, 'log.txt'), 'a') as log:
        if subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode:
          print(f'{name}: FAILED, see {workdir}/log.txt')
  return table_rows(grid, root)


def table_rows(grid: list[tuple[str, str, dict]], root: str) -> list[dict]:
  """The report's rows (seqcompress_jax.report.run_row) of the grid's finished
  runs, in grid order, named as in the grid."""
  return report.table_rows([os.path.join(root, name) for name, _, _ in grid
                            if os.path.exists(os.path.join(root, name, 'results.json'))])


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  rows = run_grid(load_grid(f.grid), f.root, f.dry_run)
  if not f.dry_run and rows:
    report.write_report(rows, f.root)
    print(report.markdown(rows))


if __name__ == '__main__':  # Flags here: tests import this file more than once.
  flags.DEFINE_string('grid', None, 'A grid name of configs/ablations.py.', required=True)
  flags.DEFINE_string('root', None, 'Folder holding one workdir per run.', required=True)
  flags.DEFINE_bool('dry_run', False, 'Print the commands, run nothing.')
  app.run(main)
