"""Replaying selection rules on traced runs (seqcompress_jax.selection)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from seqcompress_jax import selection

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('patience, expected', [(1, 1), (3, 1), (4, 5), (10, 5)])
def test_patience_pick_stops_as_train_py_does(patience, expected):
  # Improvements must be strict, as in train.py: 0.3 at index 1 is the best
  # until 0.4 at index 5, four evaluations later.
  assert selection.patience_pick([0.1, 0.3, 0.2, 0.3, 0.29, 0.4], patience) == expected


def test_smoothed_pick_ends_the_best_window():
  valid = [0.1, 0.5, 0.1, 0.3, 0.35, 0.3]  # Means of 3: 0.233, 0.3, 0.25, 0.317.
  assert selection.smoothed_pick(valid, 3) == 5
  assert selection.smoothed_pick([0.2, 0.4], 3) == 1  # Shorter than the window: the best.


def write_run(path, valid, ndcg, hr=None, trace=True):
  """A finished run folder whose metrics.jsonl holds the given curves."""
  os.makedirs(path)
  for name in ('config.json', 'results.json'):
    with open(os.path.join(path, name), 'w') as f:
      f.write('{}')
  hr = hr or [2 * x for x in ndcg]
  with open(os.path.join(path, 'metrics.jsonl'), 'w') as f:
    for i, (v, n, h) in enumerate(zip(valid, ndcg, hr)):
      step = 10 * (i + 1)
      f.write(json.dumps({'step': step, 'split': 'train', 'loss': 1.0}) + '\n')
      f.write(json.dumps({'step': step, 'split': 'valid', 'NDCG@10': v}) + '\n')
      if trace:
        f.write(json.dumps({'step': step, 'split': 'test_trace', 'NDCG@10': n,
                            'HR@10': h}) + '\n')


def test_replay_against_a_hand_computed_table(tmp_path):
  write_run(tmp_path / 'a', valid=[0.1, 0.3, 0.2], ndcg=[0.10, 0.20, 0.30])
  write_run(tmp_path / 'b', valid=[0.3, 0.2, 0.1], ndcg=[0.05, 0.06, 0.07])
  traces = [selection.read_trace(str(tmp_path / r), 'NDCG@10') for r in 'ab']
  table = selection.replay(traces, fixed=[2, 9], tail=2)
  patience = table['best validation, patience 10']
  assert patience['picks'] == [2, 1]
  assert patience['NDCG@10'] == pytest.approx((0.20 + 0.05) / 2)
  assert patience['HR@10'] == pytest.approx(0.20 + 0.05)
  assert patience['NDCG@10 se'] == pytest.approx(np.std([0.20, 0.05], ddof=1) / np.sqrt(2))
  assert table['evaluation 2, no selection']['NDCG@10'] == pytest.approx((0.20 + 0.06) / 2)
  assert table['evaluation 9, no selection']['picks'] == [3, 3]  # Past the end: the last.
  assert table["oracle: each run's best test"]['NDCG@10'] == pytest.approx((0.30 + 0.07) / 2)
  assert table['mean test of the last 2 evaluations']['NDCG@10'] == pytest.approx(
      (0.25 + 0.065) / 2)


def test_command_line_table_json_and_untraced_runs(tmp_path):
  write_run(tmp_path / 'runs' / 'a', valid=[0.1, 0.3], ndcg=[0.1, 0.2])
  write_run(tmp_path / 'runs' / 'b', valid=[0.3, 0.1], ndcg=[0.3, 0.1])
  out = tmp_path / 'rules.json'
  cmd = [sys.executable, '-m', 'seqcompress_jax.selection', str(tmp_path / 'runs'),
         f'--out={out}', '--fixed=2']
  done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=True)
  assert '| best validation, patience 10 | 1-2 | 0.2500 (0.0500) | 0.5000 |' in done.stdout
  assert json.loads(out.read_text())['evaluation 2, no selection']['picks'] == [2, 2]
  write_run(tmp_path / 'plain', valid=[0.1, 0.3], ndcg=[0.1, 0.2], trace=False)
  done = subprocess.run(cmd[:3] + [str(tmp_path / 'plain')], capture_output=True,
                        text=True, cwd=REPO)
  assert done.returncode != 0 and 'plain: no test trace' in done.stderr
