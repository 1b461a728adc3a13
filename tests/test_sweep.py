"""launch/sweep.py: runs a grid once, skips finished runs, tabulates."""

import importlib.util
import os

import pytest

from seqcompress_jax import report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_sweep():
  spec = importlib.util.spec_from_file_location('sweep', os.path.join(REPO, 'launch', 'sweep.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_grids_are_well_formed():
  sweep = load_sweep()
  cprec = sweep.load_grid('cprec')
  assert len(cprec) == 20 and len({name for name, _, _ in cprec}) == 20
  with pytest.raises(ValueError, match="no grid 'nope'"):
    sweep.load_grid('nope')


def test_smoke_grid_runs_resumes_and_tabulates(tmp_path, capsys, monkeypatch):
  monkeypatch.setenv('SEQCOMPRESS_DATA', str(tmp_path / 'cache'))
  sweep = load_sweep()
  grid = sweep.load_grid('smoke')
  root = str(tmp_path / 'grid')
  sweep.run_grid(grid, root, dry_run=True)
  assert capsys.readouterr().out.count('seqcompress_jax.main') == 2
  assert not os.path.exists(root)  # a dry run runs nothing
  rows = sweep.run_grid(grid, root)
  assert [row['run'] for row in rows] == ['smoke-full-none', 'smoke-both-cross-block']
  assert rows[0]['compression'] == 1.0 and rows[1]['compression'] > 1.5
  sweep.run_grid(grid, root)
  assert capsys.readouterr().out.count('finished, skipped') == 2
  markdown = report.markdown(rows)
  assert markdown.count('\n') == 4
  written = report.write_report(rows, root)
  assert written[:2] == [os.path.join(root, 'table.md'), os.path.join(root, 'table.csv')]
  with open(written[0]) as f:
    assert f.read() == markdown
  assert os.path.exists(written[1])
