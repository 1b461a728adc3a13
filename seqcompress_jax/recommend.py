"""Top-k recommendations from an export (export.py), for histories of raw item ids.

  python -m seqcompress_jax.recommend --export=runs/cprec/export --history=50,172,133
  python -m seqcompress_jax.recommend --export=DIR --input=users.jsonl --output=recs.jsonl --k=20

Histories, oldest item first:
  --history=ID,ID,...   one history per flag (repeatable); its user is named
                        'history-1', 'history-2', ... in the output
  --input=FILE          many users, by extension:
    .csv    a header line 'user,items', then one user per line: the user id
            and the item ids separated by spaces, e.g.  u1,50 172 133
            (a field with commas or quotes in it is quoted as CSV does)
    .jsonl  one JSON object per line, {"user": "u1", "items": [50, 172, 133]};
            user and item ids are strings or integers; blank lines are skipped

Output (--output=FILE, written atomically, by extension; else JSONL on stdout):
  .jsonl  per user {"user": ..., "items": [raw ids, best first],
          "scores": [...], "unknown": [raw ids not in the catalogue]}
  .csv    a header 'user,rank,item,score', then one line per recommendation
          (rank 1 = best)
Scores are the model's: logits of a full softmax, log-probabilities of
CpRec's adaptive softmax (higher is better).

Unknown item ids (not in the training catalogue) are skipped with a warning
naming the user (and line) and the ids. A history longer than the model's
max_len keeps its latest max_len known items. A history with no known item
gets no recommendations (an empty list in JSONL, no lines in CSV) and a
warning: the model has nothing to condition on, and no popularity fallback
is made up. --exclude_history leaves the history's own items out of the
recommendations (default: as the run was evaluated, its eval.exclude_history).
Users are scored --batch_size at a time; the export pads each batch to the
next of its fixed batch sizes (the manifest's buckets).

A malformed input line, a missing or corrupted export stop with an error
naming the file, the line and the field.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import sys
from typing import Any, Iterable, Sequence

import numpy as np
from absl import app, flags, logging

from seqcompress_jax import export as export_lib
from seqcompress_jax.files import atomic_write

FORMATS = ('.csv', '.jsonl')


class InputError(ValueError):
  """A malformed history: names the file (or flag), the line and the field."""


@dataclasses.dataclass(frozen=True)
class Request:
  """One user's history of raw item ids (oldest first), and where it came from."""
  user: Any  # str, or int (a JSONL user id)
  items: tuple[Any, ...]
  source: str  # 'FILE:LINE' or '--history #N', for messages.


@dataclasses.dataclass(frozen=True)
class Recommendation:
  user: Any
  items: list  # Raw ids, best first.
  scores: list[float]
  unknown: list  # Raw ids of the history that the catalogue does not hold.


def _format(path: str, what: str) -> str:
  extension = os.path.splitext(path)[1].lower()
  if extension not in FORMATS:
    raise InputError(f'{path}: unknown {what} format {extension!r}; expected a file '
                     f'ending in {" or ".join(FORMATS)}')
  return extension


def parse_history(text: str, number: int) -> Request:
  """--history's comma-separated ids (the `number`th such flag, from 1)."""
  source = f'--history #{number}'
  items = [item.strip() for item in text.split(',')] if text.strip() else []
  if '' in items:
    raise InputError(f'{source}: empty item id at position {items.index("") + 1} '
                     f'of {text!r}')
  return Request(f'history-{number}', tuple(items), source)


def read_requests(path: str) -> list[Request]:
  """The users of a .csv or .jsonl file (formats in the module docstring)."""
  extension = _format(path, 'input')
  try:
    with open(path, newline='', encoding='utf-8') as f:
      return _read_csv(f, path) if extension == '.csv' else _read_jsonl(f, path)
  except UnicodeDecodeError as e:
    raise InputError(f'{path}: not UTF-8 text ({e})') from e


def _read_csv(f: io.TextIOBase, path: str) -> list[Request]:
  reader = csv.reader(f)
  header = next(reader, None)
  if header is None or [field.strip() for field in header] != ['user', 'items']:
    raise InputError(f"{path}:1: expected the header 'user,items', got "
                     f"{','.join(header) if header else 'an empty file'!r}")
  requests = []
  try:
    for row in reader:
      where = f'{path}:{reader.line_num}'
      if not row:
        continue
      if len(row) != 2:
        raise InputError(f'{where}: expected 2 fields (user,items), got {len(row)}: '
                         f'{",".join(row)!r}')
      if not row[0].strip():
        raise InputError(f"{where}: field 'user' is empty")
      requests.append(Request(row[0].strip(), tuple(row[1].split()), where))
  except csv.Error as e:
    raise InputError(f'{path}:{reader.line_num}: not valid CSV ({e})') from e
  return requests


def _is_id(value: Any) -> bool:
  return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _read_jsonl(f: io.TextIOBase, path: str) -> list[Request]:
  requests = []
  for number, line in enumerate(f, start=1):
    where = f'{path}:{number}'
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise InputError(f'{where}: not valid JSON ({e.msg} at column {e.colno})') from e
    if not isinstance(record, dict):
      raise InputError(f'{where}: expected an object {{"user": ..., "items": [...]}}, '
                       f'got {type(record).__name__}')
    for field in ('user', 'items'):
      if field not in record:
        raise InputError(f'{where}: field {field!r} is missing')
    if not _is_id(record['user']):
      raise InputError(f"{where}: field 'user': expected a string or an integer, got "
                       f"{record['user']!r}")
    items = record['items']
    if not isinstance(items, list):
      raise InputError(f"{where}: field 'items': expected a list of item ids, got "
                       f'{items!r}')
    bad = next((i for i, item in enumerate(items) if not _is_id(item)), None)
    if bad is not None:
      raise InputError(f"{where}: field 'items': entry {bad + 1} is {items[bad]!r}; "
                       'expected a string or an integer')
    requests.append(Request(record['user'], tuple(items), where))
  return requests


def recommend(model: export_lib.Export, requests: Sequence[Request], k: int | None = None,
              exclude_history: bool = False, batch_size: int = 256
              ) -> list[Recommendation]:
  """The top k (default: the export's k) raw item ids and scores per request,
  scored `batch_size` users at a time; unknown ids and empty histories are
  warned about (see the module docstring)."""
  k = model.k if k is None else k
  if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= model.k:
    raise ValueError(f'k: expected an integer in [1, {model.k}] (the export was written '
                     f'with k = {model.k}; re-export with a larger --export_k), got {k!r}')
  if batch_size < 1:
    raise ValueError(f'batch_size: expected a positive integer, got {batch_size!r}')
  histories, unknowns = [], []
  for request in requests:
    known, unknown = model.indices(request.items)
    if unknown:
      logging.warning('%s: user %s: %d unknown item id(s) skipped: %s', request.source,
                      request.user, len(unknown), ', '.join(map(str, unknown)))
    if not known:
      logging.warning('%s: user %s: %s; no recommendations', request.source, request.user,
                      'no known item in the history' if request.items else 'empty history')
    histories.append(known[-model.max_len:])
    unknowns.append(unknown)
  scored = [i for i, history in enumerate(histories) if history]
  results = {}
  for start in range(0, len(scored), batch_size):
    rows = scored[start:start + batch_size]
    items = np.zeros((len(rows), model.max_len), np.int32)  # Left-padded with PAD.
    for row, index in enumerate(rows):
      items[row, model.max_len - len(histories[index]):] = histories[index]
    scores, ids = model.topk(items, exclude_history)
    for row, index in enumerate(rows):
      keep = np.isfinite(scores[row, :k])  # -inf: nothing left to recommend there.
      results[index] = (model.raw_ids(ids[row, :k][keep]), scores[row, :k][keep].tolist())
  return [Recommendation(request.user, *results.get(i, ([], [])), unknowns[i])
          for i, request in enumerate(requests)]


def format_jsonl(recommendations: Iterable[Recommendation]) -> str:
  return ''.join(json.dumps(dataclasses.asdict(r)) + '\n' for r in recommendations)


def format_csv(recommendations: Iterable[Recommendation]) -> str:
  out = io.StringIO()
  writer = csv.writer(out, lineterminator='\n')
  writer.writerow(['user', 'rank', 'item', 'score'])
  for r in recommendations:
    for rank, (item, score) in enumerate(zip(r.items, r.scores), start=1):
      writer.writerow([r.user, rank, item, repr(score)])
  return out.getvalue()


def write(recommendations: Sequence[Recommendation], path: str | None) -> None:
  """To `path` (.jsonl or .csv, atomically), or JSONL on stdout."""
  if not path:
    sys.stdout.write(format_jsonl(recommendations))
    return
  text = (format_csv if _format(path, 'output') == '.csv' else format_jsonl)(recommendations)
  atomic_write(path, text.encode())


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  try:
    if bool(f.history) == bool(f.input):
      raise InputError('give histories with --history (repeatable) or --input=FILE, '
                       'not both and not neither')
    if f.output:
      _format(f.output, 'output')  # Before any work.
    requests = ([parse_history(text, i) for i, text in enumerate(f.history, start=1)]
                if f.history else read_requests(f.input))
    model = export_lib.load(f.export)
    exclude = f.exclude_history
    if exclude is None:
      exclude = bool(model.manifest.get('config', {}).get('eval', {}).get('exclude_history'))
    write(recommend(model, requests, f.k, exclude, f.batch_size), f.output)
  except (InputError, export_lib.ExportError, ValueError, OSError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':  # Flags here, not at import: tests import this module.
  flags.DEFINE_string('export', None, 'The export directory (--mode=export of main).')
  flags.DEFINE_multi_string('history', [], 'Comma-separated raw item ids, oldest first.')
  flags.DEFINE_string('input', None, 'A .csv or .jsonl file of users and their histories.')
  flags.DEFINE_string('output', None, 'Write a .jsonl or .csv file here (default: JSONL '
                      'on stdout).')
  flags.DEFINE_integer('k', None, "Recommendations per user (default: the export's k).")
  flags.DEFINE_bool('exclude_history', None, "Leave out the history's own items (default: "
                    "the run's eval.exclude_history).")
  flags.DEFINE_integer('batch_size', 256, 'Users scored per batch.')
  flags.mark_flag_as_required('export')
  app.run(main)
