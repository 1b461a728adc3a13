"""seqcompress_jax.report: finding runs, the table's computed columns, the CSV,
the plots (and their absence without matplotlib), on hand-made run folders and
on a real tiny training run."""

import csv
import importlib.util
import json
import os
import subprocess
import sys

import ml_collections
import pytest

from seqcompress_jax import config as config_lib
from seqcompress_jax import report, train
from seqcompress_jax.data import load_dataset
from test_train import tiny_config  # tests/ is on the path (pytest's rootdir-less import).

PNG = b'\x89PNG\r\n\x1a\n'
# The plots written where matplotlib is installed (the [plot] extra; .ci/run installs [test]).
PLOTS = report.PLOTS if importlib.util.find_spec('matplotlib') else ()


def config_json(**model) -> str:
  """config.json of a run whose model section differs from the base by `model`
  (and canet.cost_weight by the 'cost' key)."""
  config = config_lib.base_config()
  config.canet.cost_weight = model.pop('cost', 0.0)
  config.model.update(**model)
  return config.to_json_best_effort()


def results_json(params: int, macs: int, ndcg: float, routed: float | None = None,
                 ratio: dict | None = None) -> dict:
  """A results.json with hand-chosen numbers."""
  r = {'params': {'total': params}, 'macs_per_sequence': {'inference': macs},
       'throughput': {'sequences_per_s': 123.4}, 'train_s': 56.7,
       'valid': {'NDCG@10': ndcg + 0.01}, 'test': {'NDCG@10': ndcg, 'HR@10': 2 * ndcg}}
  if routed is not None:
    r['test']['routing'] = {'macs': {'inference': routed}}
  if ratio is not None:
    r['compression'] = {'ratio': ratio}
  return r


def make_run(folder, config: str | None, results: dict | None, metrics: list | None = None):
  folder.mkdir(parents=True)
  if config is not None:
    (folder / 'config.json').write_text(config)
  if results is not None:
    (folder / 'results.json').write_text(json.dumps(results))
  if metrics is not None:
    (folder / 'metrics.jsonl').write_text(''.join(json.dumps(m) + '\n' for m in metrics))
  return str(folder)


@pytest.fixture
def runs(tmp_path):
  """A sweep root of three finished runs (plain, CpRec with its compression
  report, CANet) and two unfinished ones."""
  root = tmp_path / 'sweep'
  make_run(root / 'a-plain', config_json(backbone='nextitnet'),
           results_json(1000, 200, 0.05),
           [{'step': 5, 'split': 'train', 'loss': 7.0},
            {'step': 10, 'split': 'train', 'loss': 6.0},
            {'step': 10, 'split': 'valid', 'NDCG@10': 0.04},
            # Resumed from step 5: steps 10 and 15 logged again, the last line wins.
            {'step': 10, 'split': 'train', 'loss': 5.5},
            {'step': 15, 'split': 'train', 'loss': 5.0},
            {'step': 10, 'split': 'valid', 'NDCG@10': 0.045},
            {'step': 10, 'split': 'test', 'NDCG@10': 0.05}])
  make_run(root / 'b-cprec',
           config_json(backbone='nextitnet', embedding='block', head='adaptive',
                       sharing='cross-block'),
           results_json(250, 190, 0.06,
                        ratio={'params_total': 1000 / 250, 'train_step_time': 1.5,
                               'full_ranking_time': 0.8}),
           [])
  make_run(root / 'c-canet',
           config_json(backbone='sasrec', route_embed_dims=(32, 64), route_hidden_dims=(32, 64),
                       route_depths=(1, 2), cost=0.3),
           results_json(1100, 600, 0.07, routed=150.0), [])
  make_run(root / 'd-training', config_json(backbone='sasrec'), None)
  (root / 'e-empty').mkdir()
  return root


def test_method_names_come_from_the_config():
  def name(**model):
    return report.method_name(ml_collections.ConfigDict(json.loads(config_json(**model))))

  assert name(backbone='sasrec') == 'SASRec'
  assert name(backbone='nextitnet', head='sampled') == 'NextItNet, sampled softmax'
  assert name(backbone='nextitnet', embedding='block') == 'CpRec block-input/none (NextItNet)'
  assert (name(backbone='sasrec', head='adaptive', sharing='adjacent-layer')
          == 'CpRec block-softmax/adjacent-layer (SASRec)')
  assert name(backbone='nextitnet', sharing='cross-layer') == 'CpRec full/cross-layer (NextItNet)'
  routes = dict(route_embed_dims=(32, 64), route_hidden_dims=(32, 64), route_depths=(1, 2))
  assert name(backbone='sasrec', cost=0.1, **routes) == 'CANet cost 0.1 (SASRec)'
  assert (name(backbone='sasrec', cost=0.25, embedding='block', head='adaptive',
               sharing='cross-block', **routes)
          == 'CANet cost 0.25 (CpRec both/cross-block, SASRec)')


def test_rows_markdown_and_csv(runs, tmp_path, capsys):
  found = report.find_runs([str(runs)])
  assert [os.path.basename(d) for d in found] == ['a-plain', 'b-cprec', 'c-canet']
  warnings = capsys.readouterr().err
  assert 'd-training: no results.json (unfinished' in warnings
  assert 'e-empty: no results.json or config.json' in warnings
  rows = report.table_rows(found)
  expected = [  # (run, method, compression, routed MACs, routed %, step, ranking speed-up)
      ('a-plain', 'NextItNet', 1.0, 200, 100.0, '', ''),
      ('b-cprec', 'CpRec both/cross-block (NextItNet)', 4.0, 190, 100.0, 1.5, 0.8),
      ('c-canet', 'CANet cost 0.3 (SASRec)', 1.0, 150.0, 25.0, '', '')]
  assert [(r['run'], r['method'], r['compression'], r['routed MACs/seq'], r['routed MACs %'],
           r['step speed-up'], r['ranking speed-up']) for r in rows] == expected
  assert [(r['params'], r['MACs/seq'], r['test NDCG@10'], r['test HR@10']) for r in rows] == [
      (1000, 200, 0.05, 0.1), (250, 190, 0.06, 0.12), (1100, 600, 0.07, 0.14)]
  lines = report.markdown(rows).splitlines()
  assert len(lines) == 5 and lines[0].startswith('| run | method | params | compression |')
  assert lines[3] == ('| b-cprec | CpRec both/cross-block (NextItNet) | 250 | 4.00x | 190 | 190 | '
                      '100.0 | 123 | 0.0700 | 0.0600 | 0.1200 | 57 | 1.50x | 0.80x |')
  assert lines[4] == ('| c-canet | CANet cost 0.3 (SASRec) | 1,100 | 1.00x | 600 | 150 | 25.0 | '
                      '123 | 0.0800 | 0.0700 | 0.1400 | 57 |  |  |')
  out = str(tmp_path / 'out')
  written = report.write_report(rows, out)
  with open(os.path.join(out, 'table.md')) as f:
    assert f.read() == report.markdown(rows)
  with open(os.path.join(out, 'table.csv')) as f:
    table = list(csv.DictReader(f))
  assert [list(row) for row in table] == [list(report.COLUMNS)] * 3  # No 'workdir'.
  assert [(r['compression'], r['routed MACs %'], r['test NDCG@10'], r['step speed-up'])
          for r in table] == [('1.0', '100.0', '0.05', ''), ('4.0', '100.0', '0.06', '1.5'),
                              ('1.0', '25.0', '0.07', '')]
  assert written == [os.path.join(out, name) for name in ('table.md', 'table.csv') + PLOTS]
  for name in PLOTS:
    with open(os.path.join(out, name), 'rb') as f:
      assert f.read(8) == PNG
  assert not [f for f in os.listdir(out) if f.startswith('.tmp-')]


def test_curves_keep_the_last_line_of_a_step(runs):
  curves = report.read_curves(str(runs / 'a-plain'))
  assert curves == {'loss': [(5, 7.0), (10, 5.5), (15, 5.0)], 'NDCG@10': [(10, 0.045)]}


def test_without_matplotlib_the_table_is_still_written(runs, tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, 'matplotlib', None)  # `import matplotlib` fails.
  rows = report.table_rows(report.find_runs([str(runs / 'a-plain')]))
  out = tmp_path / 'out'
  assert report.write_report(rows, str(out)) == [str(out / 'table.md'), str(out / 'table.csv')]
  assert sorted(os.listdir(out)) == ['table.csv', 'table.md']
  assert 'matplotlib is not installed: no plots written' in capsys.readouterr().err


def test_globs_duplicate_names_and_nothing_usable(runs, tmp_path, capsys):
  other = make_run(tmp_path / 'other' / 'a-plain', config_json(backbone='sasrec'),
                   results_json(10, 20, 0.1))
  found = report.find_runs([str(runs / '[ab]-*'), other, str(tmp_path / 'missing'),
                            str(runs / 'a-plain' / 'metrics.jsonl')])
  assert found == [str(runs / 'a-plain'), str(runs / 'b-cprec'), other]
  err = capsys.readouterr().err
  assert 'missing: does not exist, skipped' in err and 'metrics.jsonl: not a folder' in err
  # Two runs named a-plain: the table names them by path.
  assert [r['run'] for r in report.table_rows([found[0], other])] == [
      os.path.normpath(found[0]), os.path.normpath(other)]
  with pytest.raises(FileNotFoundError, match='no finished run in .*e-empty'):
    report.find_runs([str(runs / 'd-training'), str(runs / 'e-empty'), str(runs / 'z*')])
  assert 'z*: matches nothing' in capsys.readouterr().err


def test_report_of_a_real_tiny_run(tmp_path, capsys):
  """A CpRec run trained for 12 steps without compression report: its
  compression is sized from its dataset, against the parameters of the
  uncompressed NextItNet of the same widths counted by hand."""
  config = tiny_config(tmp_path)
  config.model.update(embedding='block', head='adaptive', sharing='cross-block')
  workdir = str(tmp_path / 'runs' / 'cprec')
  results = train.train_and_evaluate(config, workdir)
  (row,) = report.table_rows(report.find_runs([str(tmp_path / 'runs')]))
  assert (row['run'], row['method']) == ('cprec', 'CpRec both/cross-block (NextItNet)')
  # Width 16, blocks (1, 2), kernel 3: embedding V x 16, per block two convs
  # (3 x 16 x 16 + 16) and two LayerNorms (2 x 16), softmax V x (16 + 1).
  v = load_dataset(config.data).num_items
  uncompressed = v * 16 + 2 * (2 * (3 * 16 * 16 + 16) + 2 * 2 * 16) + v * 17
  assert row['compression'] == uncompressed / results['params']['total'] > 1.5
  assert row['test NDCG@10'] == results['test']['NDCG@10']
  curves = report.read_curves(workdir)  # log_every_steps 3, eval_every_steps 6.
  assert [s for s, _ in curves['loss']] == [3, 6, 9, 12]
  assert [s for s, _ in curves['NDCG@10']] == [6, 12]
  # The command line: the table printed, the files written; an error when nothing is usable.
  out = tmp_path / 'report'
  done = subprocess.run([sys.executable, '-m', 'seqcompress_jax.report', str(tmp_path / 'runs'),
                         f'--out={out}'], capture_output=True, text=True, check=True)
  assert done.stdout.startswith(report.markdown([row]))
  assert sorted(os.listdir(out)) == sorted(('table.csv', 'table.md') + PLOTS)
  with pytest.raises(SystemExit, match='error: no finished run in .*nothing'):
    report.main(['report', str(tmp_path / 'nothing')])
  assert 'nothing: does not exist, skipped' in capsys.readouterr().err
