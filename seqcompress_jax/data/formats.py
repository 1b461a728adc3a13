"""Readers for the interaction-log file formats of the common public data sets.

Every reader returns `Interactions` with rows in file order. Files ending in
`.gz` are decompressed transparently. Numeric delimited files go through a
vectorised parser; when it fails, a line-by-line pass finds the first bad line
for the error message (or reads the file when ids are strings).
"""

from __future__ import annotations

import gzip
import io
import json
import os

import numpy as np

from seqcompress_jax.data.interactions import DataError
from seqcompress_jax.data.interactions import Interactions
from seqcompress_jax.data.interactions import raw_ids

FORMATS: tuple[str, ...] = ('inter', 'ml-dat', 'u.data', 'ml-csv', 'csv',
                            'amazon-csv', 'amazon-json', 'seq-csv')

# Fixed-layout formats: separator and layout shown in error messages. Their
# columns are user, item, rating, timestamp.
_FIXED = {
    'ml-dat': ('::', 'UserID::MovieID::Rating::Timestamp'),
    'u.data': ('\t', 'user item rating timestamp, tab-separated'),
    'amazon-csv': (',', 'user,item,rating,timestamp'),
}
_JSON_FIELDS = ('reviewerID', 'asin', 'unixReviewTime', 'overall')
# Column dtypes of the vectorised parser, in `_Columns` order.
_DTYPES = {'user': 'i8', 'item': 'i8', 'timestamp': 'f8', 'rating': 'f4'}

# (user, item, timestamp, rating) column indices; rating may be None.
_Columns = tuple[int, int, int, int | None]


def detect_format(path: str) -> str:
  """Format name implied by the file name (a `.gz` suffix is ignored)."""
  name = os.path.basename(os.fspath(path))
  name = name[:-3] if name.endswith('.gz') else name
  by_name = {'ratings.dat': 'ml-dat', 'u.data': 'u.data',
             'ratings.csv': 'ml-csv'}
  if name in by_name:
    return by_name[name]
  if name.endswith('.inter'):
    return 'inter'
  if name.endswith(('.json', '.jsonl')):
    return 'amazon-json'
  raise DataError(f'{path}: cannot tell the format from the file name; pass '
                  f'format= one of {", ".join(FORMATS)}')


def read_interactions(path: str, format: str = 'auto', *,
                      sep: str | None = None, header: bool | None = None,
                      user_field: str = 'user', item_field: str = 'item',
                      time_field: str = 'timestamp',
                      rating_field: str | None = None,
                      pad_token: str = '0') -> Interactions:
  """Reads an interaction log in one of `FORMATS` ('auto': `detect_format`).

  Args:
    path: the file; `.gz` files are decompressed.
    format: a name from `FORMATS`, or 'auto' to guess it from the file name.
    sep: field separator of 'csv' (default ',') and 'seq-csv' (default ',').
    header: whether the first line is a header: 'csv' (default True),
      'amazon-csv' and 'seq-csv' (default False; True skips it).
    user_field: 'csv' user column: a header name, or an index such as '0'
      when there is no header. Likewise `item_field` and `time_field`.
    item_field: 'csv' item column.
    time_field: 'csv' timestamp column.
    rating_field: 'csv' rating column; None reads no rating.
    pad_token: 'seq-csv' token that marks padding, dropped.

  Returns:
    The interactions in file order, `source` set to `path`.

  Raises:
    DataError: unknown format, unreadable or empty file, or malformed data;
      the message names the file and, where there is one, the line.
  """
  path = os.fspath(path)
  if format == 'auto':
    format = detect_format(path)
  if format not in FORMATS:
    raise DataError(f'{path}: unknown format {format!r}; expected \'auto\' or '
                    f'one of {", ".join(FORMATS)}')
  text = _read_text(path)
  if not text or text.isspace():
    raise DataError(f'{path}: file is empty, no data rows')
  if format == 'amazon-json':
    return _read_json(path, text)
  if format == 'seq-csv':
    return _read_seq(path, text, sep or ',', bool(header), pad_token)
  if format == 'inter':
    return _read_inter(path, text)
  if format == 'ml-csv':
    return _read_csv(path, text, ',', True,
                     ('userId', 'movieId', 'timestamp', 'rating'))
  if format == 'csv':
    return _read_csv(path, text, sep or ',', header is not False,
                     (user_field, item_field, time_field, rating_field))
  fixed_sep, layout = _FIXED[format]
  first_line = 1
  if format == 'amazon-csv' and header:
    text, first_line = text.partition('\n')[2], 2
  return _read_table(path, text, first_line, fixed_sep, 4, (0, 1, 3, 2),
                     layout)


def _read_text(path: str) -> str:
  """The whole file as text, gunzipped if the name ends with `.gz`."""
  opener = gzip.open if path.endswith('.gz') else open
  try:
    with opener(path, 'rt', encoding='utf-8') as f:
      return f.read()
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise DataError(f'{path}: cannot read the file ({e})') from e


def _interactions(path: str, user: np.ndarray | list,
                  item: np.ndarray | list, timestamp: np.ndarray | list,
                  rating: np.ndarray | list | None) -> Interactions:
  """Assembles the columns, normalising ids and dtypes."""
  if len(user) == 0:
    raise DataError(f'{path}: no data rows')
  return Interactions(
      user=raw_ids(user, 'user', path),
      item=raw_ids(item, 'item', path),
      timestamp=np.asarray(timestamp, dtype=np.float64),
      rating=None if rating is None else np.asarray(rating, dtype=np.float32),
      source=path)


def _number(value: object, path: str, line: int, field: str) -> float:
  """`value` as a float, else a DataError naming the line and field."""
  try:
    return float(value)
  except (TypeError, ValueError):
    raise DataError(f'{path} line {line}: field {field!r} should be a number, '
                    f'got {value!r}') from None


def _locate(path: str, names: list[str], wanted: tuple[str | None, ...],
            seen: str) -> _Columns:
  """Index in `names` of each wanted column name; None stays None."""
  for field in wanted:
    if field is not None and field not in names:
      raise DataError(f'{path}: no column {field!r} in {seen}')
  return tuple(None if field is None else names.index(field)
               for field in wanted)


def _read_inter(path: str, text: str) -> Interactions:
  """RecBole atomic file: typed tab-separated header such as 'user_id:token'."""
  header, _, body = text.partition('\n')
  names = [column.split(':')[0].strip() for column in header.split('\t')]
  wanted = ('user_id', 'item_id', 'timestamp',
            'rating' if 'rating' in names else None)
  columns = _locate(path, names, wanted, f'header {header!r}')
  return _read_table(path, body, 2, '\t', len(names), columns, header)


def _read_csv(path: str, text: str, sep: str, header: bool,
              wanted: tuple[str, str, str, str | None]) -> Interactions:
  """Delimited file whose columns are named by a header or by their index."""
  if header:
    line, _, body = text.partition('\n')
    names = [name.strip() for name in line.split(sep)]
    seen, layout, first_line = f'header {line!r}', line, 2
  else:
    first_row = next(line for line in io.StringIO(text) if line.strip())
    names = [str(k) for k in range(len(first_row.split(sep)))]
    seen, body, first_line = f'columns {names}', text, 1
    layout = f'{len(names)} columns like the first data line'
  columns = _locate(path, names, wanted, seen)
  return _read_table(path, body, first_line, sep, len(names), columns, layout)


def _read_table(path: str, body: str, first_line: int, sep: str, ncols: int,
                columns: _Columns, layout: str) -> Interactions:
  """Rows of `ncols` fields; `first_line` is the file line number of `body`."""
  table = _parse_fast(body, sep, ncols, columns)
  if table is None:
    return _interactions(path, *_parse_lines(path, body, first_line, sep,
                                             ncols, columns, layout))
  rating = None if columns[3] is None else table['rating']
  return _interactions(path, table['user'], table['item'], table['timestamp'],
                       rating)


def _parse_fast(body: str, sep: str, ncols: int,
                columns: _Columns) -> np.ndarray | None:
  """Vectorised parse of all-numeric rows; None when it cannot be used."""
  data = body.encode()
  if len(sep) > 1:  # np.loadtxt needs a one-character delimiter.
    data, sep = data.replace(sep.encode(), b'\x1f'), '\x1f'
  if (not data or data.isspace() or not sep.isascii() or
      _signed_or_padded(data, sep)):
    return None
  used = [(name, k) for name, k in zip(_DTYPES, columns) if k is not None]
  try:
    table = np.loadtxt(io.BytesIO(data), delimiter=sep, comments=None,
                       usecols=[k for _, k in used], ndmin=1,
                       dtype=[(name, _DTYPES[name]) for name, _ in used])
  except (ValueError, OverflowError):
    return None
  # usecols lets rows with extra fields through: count the separators.
  return table if data.count(sep.encode()) == (ncols - 1) * len(table) else None


def _signed_or_padded(data: bytes, sep: str) -> bool:
  """Whether a field may start with a sign or with a zero before a digit.

  Such ids ('-1', '007') stay strings in `raw_ids`; integer parsing loses them.
  """
  if b'-' in data or b'+' in data:
    return True
  b = np.frombuffer(b'\n' + data + b'\n', dtype=np.uint8)
  zero = np.flatnonzero(b[1:-1] == ord('0')) + 1
  before, after = b[zero - 1], b[zero + 1]
  return bool(np.any(((before == ord('\n')) | (before == ord(sep))) &
                     (after >= ord('0')) & (after <= ord('9'))))


def _parse_lines(
    path: str, body: str, first_line: int, sep: str, ncols: int,
    columns: _Columns, layout: str
) -> tuple[list[str], list[str], list[float], list[float] | None]:
  """Line-by-line parse that raises a DataError at the first bad line.

  Returns:
    user and item ids as strings, timestamps, and ratings (or None).
  """
  u, i, t, r = columns
  user, item, timestamp, rating = [], [], [], []
  for number, line in enumerate(body.splitlines(), first_line):
    if not line.strip():
      continue
    fields = line.split(sep)
    if len(fields) != ncols:
      raise DataError(f'{path} line {number}: expected {ncols} fields '
                      f'separated by {sep!r} ({layout}), got {line!r}')
    user.append(fields[u])
    item.append(fields[i])
    timestamp.append(_number(fields[t], path, number, 'timestamp'))
    if r is not None:
      rating.append(_number(fields[r], path, number, 'rating'))
  return user, item, timestamp, None if r is None else rating


def _read_json(path: str, text: str) -> Interactions:
  """Amazon review JSON lines: reviewerID, asin, unixReviewTime, overall."""
  user, item, timestamp, rating = [], [], [], []
  for number, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f'{path} line {number}: invalid JSON at column '
                      f'{e.colno}: {e.msg}') from None
    if not isinstance(record, dict):
      raise DataError(f'{path} line {number}: expected a JSON object, got '
                      f'{line[:80]!r}')
    for field in _JSON_FIELDS:
      if field not in record:
        raise DataError(f'{path} line {number}: JSON object has no field '
                        f'{field!r}')
    user.append(record['reviewerID'])
    item.append(record['asin'])
    timestamp.append(_number(record['unixReviewTime'], path, number,
                             'unixReviewTime'))
    rating.append(_number(record['overall'], path, number, 'overall'))
  return _interactions(path, user, item, timestamp, rating)


def _read_seq(path: str, text: str, sep: str, header: bool,
              pad_token: str) -> Interactions:
  """One user per line, items oldest first; timestamp = position in line."""
  lines = text.splitlines()[1 if header else 0:]
  user, item, timestamp = [], [], []
  row = 0
  for line in lines:
    if not line.strip():
      continue
    for position, token in enumerate(line.split(sep)):
      token = token.strip()
      if token and token != pad_token:
        user.append(row)
        item.append(token)
        timestamp.append(position)
    row += 1
  return _interactions(path, user, item, timestamp, None)
