"""launch/sweep.py: runs a grid once, skips finished runs, tabulates."""

import importlib.util
import os
import subprocess
import sys

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


def test_seeds_repeat_every_run():
  sweep = load_sweep()
  assert sweep.parse_seeds('0-2,7') == [0, 1, 2, 7] and sweep.parse_seeds('') == []
  for bad in ('2-1', 'a', '1-', '-3'):
    with pytest.raises(ValueError, match='--seeds'):
      sweep.parse_seeds(bad)
  grid = [('a', 'configs/nextitnet.py', {'train.patience': 3}), ('b', 'configs/sasrec.py', {})]
  assert sweep.with_seeds(grid, []) == grid
  seeded = sweep.with_seeds(grid, [0, 5])
  assert [name for name, _, _ in seeded] == ['a-s0', 'a-s5', 'b-s0', 'b-s5']
  assert seeded[1] == ('a-s5', 'configs/nextitnet.py',
                       {'train.patience': 3, 'seed': 5, 'data.shuffle_seed': 5})
  assert sweep.command(*seeded[3][1:], 'W')[-2:] == ['--config.seed=5',
                                                      '--config.data.shuffle_seed=5']


def test_seed_summary_means_and_standard_errors():
  sweep = load_sweep()
  grid = [('a', 'c', {}), ('b', 'c', {}), ('c', 'c', {})]
  values = {'a-s0': 0.04, 'a-s1': 0.06, 'a-s2': 0.08, 'b-s1': 0.05}
  rows = [{'run': name, 'test NDCG@10': v, 'test HR@10': 2 * v, 'valid NDCG@10': v + 0.01}
          for name, v in values.items()] + [{'run': 'a-s9', 'test NDCG@10': 1.0,
                                              'test HR@10': 1.0, 'valid NDCG@10': 1.0}]
  summary = sweep.seed_summary(grid, [0, 1, 2], rows)  # a-s9: not a seed asked for.
  assert [(e['run'], e['seeds']) for e in summary] == [('a', 3), ('b', 1)]
  mean, error = summary[0]['test NDCG@10']
  assert mean == pytest.approx(0.06) and error == pytest.approx(0.02 / 3 ** 0.5)
  assert summary[0]['test HR@10'][0] == pytest.approx(0.12)
  assert summary[1]['valid NDCG@10'] == (pytest.approx(0.06), 0.0)
  table = sweep.seed_markdown(summary)
  assert table.count('\n') == 4 and '| a | 3 | 0.0600 (0.0115) |' in table


def test_smoke_grid_runs_resumes_and_tabulates(tmp_path, capsys, monkeypatch):
  monkeypatch.setenv('SEQCOMPRESS_DATA', str(tmp_path / 'cache'))
  sweep = load_sweep()
  grid = sweep.load_grid('smoke')
  root = str(tmp_path / 'grid')
  sweep.run_grid(grid, root, dry_run=True)
  assert capsys.readouterr().out.count('seqcompress_jax.main') == 2
  assert not os.path.exists(root)  # a dry run runs nothing
  rows = sweep.run_grid(grid, root, parallel=2)  # Both at once; rows in grid order.
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


def test_command_line_repeats_the_grid_per_seed(tmp_path):
  out = subprocess.run([sys.executable, os.path.join(REPO, 'launch', 'sweep.py'), '--grid=smoke',
                        f'--root={tmp_path}', '--seeds=0,3', '--parallel=2', '--dry_run'],
                       capture_output=True, text=True, check=True).stdout
  commands = [line for line in out.splitlines() if 'seqcompress_jax.main' in line]
  assert len(commands) == 4
  assert sum('--config.seed=3 --config.data.shuffle_seed=3' in c for c in commands) == 2
  assert sum(f'--workdir={tmp_path}/smoke-full-none-s0' in c for c in commands) == 1
