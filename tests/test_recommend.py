"""recommend.py: the same top-k as a numpy ranking of the in-process model's
full scores for the same raw-id histories (CpRec's export: the adaptive
softmax's fast top-k); unknown ids, empty and long histories; the input and
output formats and their errors; the command line."""

import csv
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from test_export import K, _rewrite, check_topk, cprec_config, full_scores, saved_run
from test_train import REPO

from seqcompress_jax import export
from seqcompress_jax import recommend as rec


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  """(spec, params, export directory) of a saved CpRec run, exported with k = K."""
  root = tmp_path_factory.mktemp('recommend')
  workdir = str(root / 'cprec')
  spec, params = saved_run(cprec_config(root), workdir)
  export.export_run(workdir, k=K, buckets=(1, 4, 16))
  return spec, params, os.path.join(workdir, 'export')


def reference(spec, params, raw_item, request):
  """The request's left-padded history [1, max_len] of item indices (unknown
  ids left out, the latest max_len kept) and the in-process model's full
  scores for it [1, V]."""
  index_of = {raw: i for i, raw in enumerate(raw_item.tolist()) if i}
  known = [index_of[int(raw)] for raw in request.items if int(raw) in index_of]
  items = np.zeros((1, spec.max_len), np.int32)
  history = known[-spec.max_len:]
  items[0, spec.max_len - len(history):] = history
  return items, full_scores(spec, params, items)


@pytest.mark.parametrize('exclude', [False, True])
def test_recommendations_are_the_full_ranking_top_k(exported, caplog, exclude):
  spec, params, directory = exported
  model = export.load(directory)
  rng = np.random.default_rng(1)
  requests = []
  for user in range(7):  # Lengths up to twice max_len: the latest max_len count.
    history = rng.integers(1, spec.num_items, rng.integers(1, 2 * spec.max_len)).tolist()
    raw = [str(model.raw_item[i]) for i in history]
    if user % 3 == 0:
      raw.insert(1, f'999{user}')  # Not in the catalogue (synthetic ids are < 60).
    requests.append(rec.Request(f'u{user}', tuple(raw), f'users.jsonl:{user + 1}'))
  with caplog.at_level(logging.WARNING):
    results = rec.recommend(model, requests, k=7, exclude_history=exclude, batch_size=3)
  for request, result in zip(requests, results):
    assert result.user == request.user
    assert result.unknown == [raw for raw in request.items if raw.startswith('999')]
    items, full = reference(spec, params, model.raw_item, request)
    index_of = {raw: i for i, raw in enumerate(model.raw_item.tolist())}
    ids = np.array([[index_of[raw] for raw in result.items]])
    check_topk(np.array([result.scores]), ids, full, items, exclude, 7)
  unknown = [r.getMessage() for r in caplog.records if 'unknown' in r.getMessage()]
  assert unknown == [f'users.jsonl:{n}: user u{n - 1}: 1 unknown item id(s) skipped: '
                     f'999{n - 1}' for n in (1, 4, 7)]


def test_empty_or_unknown_histories_get_no_recommendations_and_a_warning(exported, caplog):
  model = export.load(exported[2])
  requests = [rec.Request('a', (), 'f.csv:2'), rec.Request('b', ('x', '-1'), 'f.csv:3'),
              rec.Request('c', (str(model.raw_item[1]),), 'f.csv:4')]
  with caplog.at_level(logging.WARNING):
    results = rec.recommend(model, requests)
  assert [(r.items, r.scores) for r in results[:2]] == [([], []), ([], [])]
  assert results[1].unknown == ['x', '-1'] and len(results[2].items) == K
  messages = [r.getMessage() for r in caplog.records]
  assert 'f.csv:2: user a: empty history; no recommendations' in messages
  assert 'f.csv:3: user b: no known item in the history; no recommendations' in messages
  with pytest.raises(ValueError, match=rf'k: expected an integer in \[1, {K}\] .* re-export'):
    rec.recommend(model, requests, k=K + 1)


def test_raw_ids_map_to_indices_for_integer_and_string_catalogues(exported, tmp_path):
  model = export.load(exported[2])
  raw = model.raw_item[5]
  assert model.indices([int(raw), f'00{raw}', f' {raw} ', 'abc', True]) == (
      [5, 5, 5], ['abc', True])
  directory = str(tmp_path / 'strings')
  shutil.copytree(exported[2], directory)
  names = np.array([''] + [f'movie {i}' for i in range(1, len(model.raw_item))])
  with open(tmp_path / 'items.npz', 'wb') as f:
    np.savez(f, raw_item=names)
  _rewrite(directory, export.ITEMS, (tmp_path / 'items.npz').read_bytes())
  model = export.load(directory)
  assert model.indices(['movie 3', 'movie 03', '', 3]) == ([3], ['movie 03', '', 3])
  assert model.raw_ids(np.array([2, 1])) == ['movie 2', 'movie 1']


def write_lines(path, lines):
  path.write_text(''.join(line + '\n' for line in lines))
  return str(path)


def test_input_files_are_read(tmp_path):
  csv_path = write_lines(tmp_path / 'users.csv', [
      'user,items', 'u1,5 7 9', '', '"u,2",', 'u3,"11  12"'])
  assert rec.read_requests(csv_path) == [
      rec.Request('u1', ('5', '7', '9'), f'{csv_path}:2'),
      rec.Request('u,2', (), f'{csv_path}:4'),
      rec.Request('u3', ('11', '12'), f'{csv_path}:5')]
  jsonl_path = write_lines(tmp_path / 'users.jsonl', [
      '{"user": "u1", "items": [5, "7"]}', '  ', '{"user": 2, "items": []}'])
  assert rec.read_requests(jsonl_path) == [
      rec.Request('u1', (5, '7'), f'{jsonl_path}:1'), rec.Request(2, (), f'{jsonl_path}:3')]
  assert rec.parse_history(' 5, 7 ', 2) == rec.Request('history-2', ('5', '7'), '--history #2')
  assert rec.parse_history('', 1).items == ()


@pytest.mark.parametrize('name, lines, message', [
    ('a.csv', ['user,item', 'u1,5'], r"a.csv:1: expected the header 'user,items', got "
                                     r"'user,item'"),
    ('b.csv', ['user,items', 'u1,5', 'u2,5,6'], r'b.csv:3: expected 2 fields \(user,items\), '
                                               r'got 3'),
    ('c.csv', ['user,items', ',5'], r"c.csv:2: field 'user' is empty"),
    ('d.jsonl', ['{"user": "u", "items": [1]}', '{"user": "u", "items": [1'],
     r'd.jsonl:2: not valid JSON'),
    ('e.jsonl', ['[1, 2]'], r'e.jsonl:1: expected an object'),
    ('f.jsonl', ['{"user": "u"}'], r"f.jsonl:1: field 'items' is missing"),
    ('g.jsonl', ['{"user": null, "items": []}'], r"g.jsonl:1: field 'user': expected a "
                                                  r'string or an integer, got None'),
    ('h.jsonl', ['{"user": "u", "items": "1 2"}'], r"h.jsonl:1: field 'items': expected a "
                                                    r'list of item ids'),
    ('i.jsonl', ['{"user": "u", "items": [1, 2.5]}'], r"i.jsonl:1: field 'items': entry 2 "
                                                       r'is 2.5'),
    ('j.txt', ['u1,5'], r"j.txt: unknown input format '.txt'; expected a file ending in "
                        r'.csv or .jsonl'),
])
def test_malformed_input_lines_name_the_file_line_and_field(tmp_path, name, lines, message):
  path = write_lines(tmp_path / name, lines)
  with pytest.raises(rec.InputError, match=message):
    rec.read_requests(path)


def test_malformed_history_flag_is_named():
  with pytest.raises(rec.InputError, match=r"--history #3: empty item id at position 2 of "
                     r"'5,,7'"):
    rec.parse_history('5,,7', 3)


def test_outputs_are_written_whole(tmp_path):
  results = [rec.Recommendation('u1', [7, 3], [-1.5, -2.25], []),
             rec.Recommendation(2, [], [], ['x'])]
  rec.write(results, str(tmp_path / 'out.jsonl'))
  assert [json.loads(line) for line in open(tmp_path / 'out.jsonl')] == [
      {'user': 'u1', 'items': [7, 3], 'scores': [-1.5, -2.25], 'unknown': []},
      {'user': 2, 'items': [], 'scores': [], 'unknown': ['x']}]
  rec.write(results, str(tmp_path / 'out.csv'))
  with open(tmp_path / 'out.csv', newline='') as f:
    assert list(csv.reader(f)) == [['user', 'rank', 'item', 'score'], ['u1', '1', '7', '-1.5'],
                                   ['u1', '2', '3', '-2.25']]
  assert sorted(os.listdir(tmp_path)) == ['out.csv', 'out.jsonl']
  with pytest.raises(rec.InputError, match=r"out.parquet: unknown output format"):
    rec.write(results, str(tmp_path / 'out.parquet'))


def test_command_line(exported, tmp_path):
  spec, params, directory = exported
  model = export.load(directory)
  history = ','.join(str(raw) for raw in model.raw_item[[3, 1, 2]])
  cmd = [sys.executable, '-m', 'seqcompress_jax.recommend', f'--export={directory}']
  out = subprocess.run(cmd + [f'--history={history},12345', '--history=', '--k=3',
                              '--exclude_history'],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = [json.loads(line) for line in out.stdout.splitlines()]
  [expected] = rec.recommend(model, [rec.parse_history(history, 1)], 3, exclude_history=True)
  assert lines[0] == {'user': 'history-1', 'items': expected.items, 'scores': expected.scores,
                      'unknown': ['12345']}
  assert lines[1] == {'user': 'history-2', 'items': [], 'scores': [], 'unknown': []}
  assert '--history #1: user history-1: 1 unknown item id(s) skipped: 12345' in out.stderr
  assert '--history #2: user history-2: empty history; no recommendations' in out.stderr
  users = write_lines(tmp_path / 'users.jsonl', ['{"user": "u", "items": [1, 2]}', '{"user"'])
  out = subprocess.run(cmd + [f'--input={users}', f'--output={tmp_path / "out.csv"}'],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1 and f'error: {users}:2: not valid JSON' in out.stderr
  assert not os.path.exists(tmp_path / 'out.csv')
  out = subprocess.run(cmd[:-1] + [f'--export={tmp_path / "none"}', '--history=1'],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1 and f'error: {tmp_path / "none"}: no such export' in out.stderr
