"""Runs a grid of configs/ablations.py locally, one workdir per run, and tabulates it.

  python launch/sweep.py --grid=cprec --root=runs/cprec-grid
  python launch/sweep.py --grid=cprec --root=runs/cprec-grid --dry_run   # print the commands

A finished run (its workdir holds results.json) is skipped; an interrupted one
resumes from its checkpoints, so re-running the same command completes a
sweep. Writes ROOT/table.md, ROOT/table.csv and, where matplotlib is
installed, ROOT/ndcg_vs_params.png and ROOT/ndcg_vs_macs.png (test NDCG@10
against the average MACs per sequence: CANet's trade-off curve).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import subprocess
import sys

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = ('run', 'params', 'compression', 'MACs/seq', 'routed MACs/seq', 'routed MACs %',
           'valid NDCG@10', 'test NDCG@10', 'test HR@10', 'train s', 'step speed-up',
           'ranking speed-up')

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
  """One row per finished run, compression against the grid's first run when
  the run has no compression report of its own. 'MACs/seq' is the model's
  (a routed model's: its full route); 'routed MACs/seq' the average over the
  test set of the routes chosen (= 'MACs/seq' without routing), and 'routed
  MACs %' that average as a share of 'MACs/seq'. The speed-ups (uncompressed
  time / the run's, for a train step and a full ranking) come from the run's
  compression report, empty without one."""
  results = {}
  for name, _, _ in grid:
    path = os.path.join(root, name, 'results.json')
    if os.path.exists(path):
      with open(path) as f:
        results[name] = json.load(f)
  reference = next(iter(results.values()), None)
  rows = []
  for name, r in results.items():
    ratio = (r['compression']['ratio']['params_total'] if 'compression' in r
             else reference['params']['total'] / r['params']['total'])
    macs = r['macs_per_sequence']['inference']
    routed = r['test']['routing']['macs']['inference'] if 'routing' in r['test'] else macs
    rows.append({'run': name, 'params': r['params']['total'], 'compression': round(ratio, 2),
                 'MACs/seq': macs, 'routed MACs/seq': round(routed),
                 'routed MACs %': round(100 * routed / macs, 1),
                 'valid NDCG@10': round(r['valid']['NDCG@10'], 4),
                 'test NDCG@10': round(r['test']['NDCG@10'], 4),
                 'test HR@10': round(r['test']['HR@10'], 4), 'train s': round(r['train_s']),
                 **{column: round(r['compression']['ratio'][key], 2) if 'compression' in r else ''
                    for column, key in (('step speed-up', 'train_step_time'),
                                        ('ranking speed-up', 'full_ranking_time'))}})
  return rows


def write_table(rows: list[dict], root: str) -> str:
  """Writes table.md, table.csv (and the plot where possible); returns the Markdown."""
  lines = ['| ' + ' | '.join(COLUMNS) + ' |', '|' + '---|' * len(COLUMNS)]
  lines += ['| ' + ' | '.join(str(row[c]) for c in COLUMNS) + ' |' for row in rows]
  markdown = '\n'.join(lines) + '\n'
  out = io.StringIO()
  writer = csv.DictWriter(out, fieldnames=COLUMNS)
  writer.writeheader()
  writer.writerows(rows)
  os.makedirs(root, exist_ok=True)
  for name, text in (('table.md', markdown), ('table.csv', out.getvalue())):
    with open(os.path.join(root, name), 'w') as f:
      f.write(text)
  plot(rows, os.path.join(root, 'ndcg_vs_params.png'), 'params', 'parameters', log=True)
  plot(rows, os.path.join(root, 'ndcg_vs_macs.png'), 'routed MACs/seq',
       'average MACs per sequence (inference)', log=False)
  return markdown


def plot(rows: list[dict], path: str, column: str, label: str, log: bool) -> bool:
  """Test NDCG@10 against a column of the rows, one labelled point per run;
  False without matplotlib."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  fig, ax = plt.subplots(figsize=(7, 5))
  for row in rows:
    ax.scatter(row[column], row['test NDCG@10'])
    ax.annotate(row['run'], (row[column], row['test NDCG@10']), fontsize=7)
  if log:
    ax.set_xscale('log')
  ax.set_xlabel(label)
  ax.set_ylabel('test NDCG@10')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  rows = run_grid(load_grid(f.grid), f.root, f.dry_run)
  if not f.dry_run:
    print(write_table(rows, f.root))


if __name__ == '__main__':  # Flags here: tests import this file more than once.
  flags.DEFINE_string('grid', None, 'A grid name of configs/ablations.py.', required=True)
  flags.DEFINE_string('root', None, 'Folder holding one workdir per run.', required=True)
  flags.DEFINE_bool('dry_run', False, 'Print the commands, run nothing.')
  app.run(main)
