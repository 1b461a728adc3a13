"""Tests for the interaction-log readers in seqcompress_jax.data.formats."""

import gzip
import re

import numpy as np
import pytest

from seqcompress_jax.data import formats
from seqcompress_jax.data.formats import FORMATS
from seqcompress_jax.data.formats import detect_format
from seqcompress_jax.data.formats import read_interactions
from seqcompress_jax.data.interactions import DataError


def write(tmp_path, name, text):
  path = tmp_path / name
  if name.endswith('.gz'):
    with gzip.open(path, 'wt', encoding='utf-8') as f:
      f.write(text)
  else:
    path.write_text(text, encoding='utf-8')
  return str(path)


def check(data, user, item, timestamp, rating):
  """Asserts exact columns; ids must be int64 or str like the expected ones."""
  for column, expected in ((data.user, user), (data.item, item)):
    expected = np.asarray(expected)
    if expected.dtype.kind == 'i':
      assert column.dtype == np.int64
    else:
      assert column.dtype.kind == 'U'
    np.testing.assert_array_equal(column, expected)
  assert data.timestamp.dtype == np.float64
  np.testing.assert_array_equal(data.timestamp, timestamp)
  if rating is None:
    assert data.rating is None
  else:
    assert data.rating.dtype == np.float32
    np.testing.assert_array_equal(data.rating, np.float32(rating))


@pytest.mark.parametrize('name, expected', [
    ('ml-1m.inter', 'inter'), ('ml-1m.inter.gz', 'inter'),
    ('ratings.dat', 'ml-dat'), ('ratings.dat.gz', 'ml-dat'),
    ('u.data', 'u.data'), ('u.data.gz', 'u.data'),
    ('ratings.csv', 'ml-csv'), ('/some/dir/ratings.csv.gz', 'ml-csv'),
    ('Books.json', 'amazon-json'), ('Books_5.json.gz', 'amazon-json'),
    ('reviews.jsonl', 'amazon-json'), ('reviews.jsonl.gz', 'amazon-json'),
])
def test_detect_format(name, expected):
  assert detect_format(name) == expected


@pytest.mark.parametrize('name', ['data.csv', 'ratings.tsv', 'movies.dat',
                                  'seq.txt'])
def test_detect_format_unknown_asks_for_explicit_format(name):
  with pytest.raises(DataError, match=re.escape(name)) as error:
    detect_format(name)
  for format_name in FORMATS:
    assert format_name in str(error.value)


def test_inter(tmp_path):
  path = write(tmp_path, 'ml.inter',
               'user_id:token\titem_id:token\trating:float\ttimestamp:float\n'
               '3\t20\t4.5\t300\n'
               '1\t10\t3\t100\n'
               '3\t10\t1\t200\n')
  data = read_interactions(path)
  check(data, [3, 1, 3], [20, 10, 10], [300, 100, 200], [4.5, 3, 1])
  assert data.source == path


def test_inter_without_rating_and_with_string_ids(tmp_path):
  path = write(tmp_path, 'a.inter',
               'timestamp:float\tuser_id:token\titem_id:token\n'
               '5\tAU1\tB07\n'
               '2\tAU2\tB01\n')
  check(read_interactions(path), ['AU1', 'AU2'], ['B07', 'B01'], [5, 2],
        None)


def test_ml_dat(tmp_path):
  path = write(tmp_path, 'ratings.dat',
               '1::1193::5::978300760\n'
               '1::661::3::978302109\n'
               '\n'
               '2::1357::4::978298709\n')
  check(read_interactions(path), [1, 1, 2], [1193, 661, 1357],
        [978300760, 978302109, 978298709], [5, 3, 4])


def test_u_data_gzip(tmp_path):
  path = write(tmp_path, 'u.data.gz', '196\t242\t3\t881250949\n'
                                      '186\t302\t3\t891717742\n'
                                      '22\t377\t1\t878887116\n')
  check(read_interactions(path), [196, 186, 22], [242, 302, 377],
        [881250949, 891717742, 878887116], [3, 3, 1])


def test_ml_csv(tmp_path):
  path = write(tmp_path, 'ratings.csv', 'userId,movieId,rating,timestamp\n'
                                        '1,307,3.5,1256677221\n'
                                        '1,481,0.5,1256677456\n'
                                        '2,1091,1.5,1256677471\n')
  check(read_interactions(path), [1, 1, 2], [307, 481, 1091],
        [1256677221, 1256677456, 1256677471], [3.5, 0.5, 1.5])


def test_csv_with_header_and_named_columns(tmp_path):
  path = write(tmp_path, 'log.tsv', 'when\tscore\titem\twho\textra\n'
                                    '10.5\t2\t7\t9\tx y\n'
                                    '3\t4\t8\t9\tz\n')
  data = read_interactions(path, 'csv', sep='\t', user_field='who',
                           time_field='when', rating_field='score')
  check(data, [9, 9], [7, 8], [10.5, 3], [2, 4])


def test_csv_without_header_uses_column_indices(tmp_path):
  path = write(tmp_path, 'log.csv', 'u1,i9,17\n'
                                    'u2,i3,12\n')
  data = read_interactions(path, 'csv', header=False, user_field='0',
                           item_field='1', time_field='2')
  check(data, ['u1', 'u2'], ['i9', 'i3'], [17, 12], None)


def test_csv_keeps_zero_padded_and_signed_ids_as_strings(tmp_path):
  path = write(tmp_path, 'log.csv', 'user,item,timestamp\n'
                                    '007,12,1\n'
                                    '8,13,2\n')
  check(read_interactions(path, 'csv'), ['007', '8'], [12, 13], [1, 2], None)
  path = write(tmp_path, 'signed.csv', 'user,item,timestamp\n'
                                       '-1,12,1\n')
  check(read_interactions(path, 'csv'), ['-1'], [12], [1], None)


def test_amazon_csv_string_ids_and_header(tmp_path):
  text = ('A2IBPI20UZIR0U,0000000116,5.0,1393545600\n'
          'A14VAT5EAX3D9S,1384719342,4.0,1363392000\n')
  expected = (['A2IBPI20UZIR0U', 'A14VAT5EAX3D9S'],
              ['0000000116', '1384719342'], [1393545600, 1363392000], [5, 4])
  path = write(tmp_path, 'Musical.csv', text)
  check(read_interactions(path, 'amazon-csv'), *expected)
  path = write(tmp_path, 'Musical_header.csv.gz',
               'user,item,rating,timestamp\n' + text)
  check(read_interactions(path, 'amazon-csv', header=True), *expected)


def test_amazon_json_gzip(tmp_path):
  path = write(tmp_path, 'Books_5.json.gz',
               '{"reviewerID": "A1", "asin": "0001", "overall": 5.0, '
               '"unixReviewTime": 300, "reviewText": "ok"}\n'
               '\n'
               '{"overall": 2.0, "asin": "B0X", "reviewerID": "A2", '
               '"unixReviewTime": 100}\n')
  check(read_interactions(path), ['A1', 'A2'], ['0001', 'B0X'], [300, 100],
        [5, 2])


def test_seq_csv(tmp_path):
  path = write(tmp_path, 'train.csv', '0,0,5,3,9\n'
                                      '\n'
                                      '7,2\n'
                                      '0,0,4\n')
  data = read_interactions(path, 'seq-csv')
  check(data, [0, 0, 0, 1, 1, 2], [5, 3, 9, 7, 2, 4], [2, 3, 4, 0, 1, 2],
        None)


def test_seq_csv_header_separator_and_pad_token(tmp_path):
  path = write(tmp_path, 'seq.txt', 'items\n'
                                    'a b PAD\n'
                                    'c\n')
  data = read_interactions(path, 'seq-csv', sep=' ', header=True,
                           pad_token='PAD')
  check(data, [0, 0, 1], ['a', 'b', 'c'], [0, 1, 0], None)


def u_data_text(n, sep='\t'):
  """A random n-line file laid out like u.data, and its columns."""
  rng = np.random.default_rng(0)
  columns = [rng.integers(1, high, n) for high in (5000, 2000, 6, 10**9)]
  text = '\n'.join(sep.join(map(str, row))
                   for row in zip(*(c.tolist() for c in columns)))
  return text + '\n', columns


@pytest.mark.parametrize('name, sep', [('u.data', '\t'),
                                       ('ratings.dat', '::')])
def test_large_numeric_file_takes_the_fast_path(tmp_path, monkeypatch, name,
                                                sep):
  text, (user, item, rating, timestamp) = u_data_text(200_000, sep)
  path = write(tmp_path, name, text)

  def slow_path(*args):
    raise AssertionError('the vectorised parser was not used')

  monkeypatch.setattr(formats, '_parse_lines', slow_path)
  check(read_interactions(path), user, item, timestamp, rating)


def test_large_file_reports_the_bad_line(tmp_path):
  text, _ = u_data_text(200_000)
  lines = text.splitlines()
  lines[149_999] = '1\t2\t3'
  path = write(tmp_path, 'u.data', '\n'.join(lines) + '\n')
  with pytest.raises(DataError, match=r"u\.data line 150000: expected 4 "
                                      r"fields separated by '\\t'"):
    read_interactions(path)


@pytest.mark.parametrize('name, text, fmt, pattern', [
    ('ratings.dat', '1::2::3::4\n5::6::7::8\ngarbage\n', 'auto',
     r"ratings\.dat line 3: expected 4 fields separated by '::' "
     r"\(UserID::MovieID::Rating::Timestamp\), got 'garbage'"),
    ('ratings.csv', 'userId,movieId,rating,timestamp\n1,2,3,4\n\n1,2,3,4,5\n',
     'auto', r'ratings\.csv line 4: expected 4 fields'),
    ('u.data', '1\t2\t3\t4\n1\t2\t3\tyesterday\n', 'auto',
     r"u\.data line 2: field 'timestamp' should be a number, got "
     r"'yesterday'"),
    ('ratings.csv', 'userId,movieId,rating,timestamp\n1,2,good,4\n', 'auto',
     r"ratings\.csv line 2: field 'rating' should be a number"),
    ('Musical.csv', 'A1,B1,5.0,1\nA2,B2,5.0\n', 'amazon-csv',
     r'Musical\.csv line 2: expected 4 fields'),
    ('x.inter', 'user_id:token\ttimestamp:float\n1\tmonday\n', 'auto',
     r"x\.inter: no column 'item_id' in header "
     r"'user_id:token\\ttimestamp:float'"),
    ('x.inter', '1\t2\t3\n', 'auto', r"x\.inter: no column 'user_id'"),
    ('log.csv', 'who,item,timestamp\n1,2,3\n', 'csv',
     r"log\.csv: no column 'user' in header 'who,item,timestamp'"),
    ('ratings.csv', 'user,movie,rating,timestamp\n1,2,3,4\n', 'auto',
     r"ratings\.csv: no column 'userId' in header "
     r"'user,movie,rating,timestamp'"),
    ('r.json', '{"reviewerID": "A", "asin": "B", "overall": 1, '
     '"unixReviewTime": 1}\n{"reviewerID": "A",\n', 'auto',
     r'r\.json line 2: invalid JSON'),
    ('r.json', '\n{"reviewerID": "A", "asin": "B", "overall": 1}\n', 'auto',
     r"r\.json line 2: JSON object has no field 'unixReviewTime'"),
    ('r.json', '["A", "B"]\n', 'auto',
     r'r\.json line 1: expected a JSON object'),
    ('r.json', '{"reviewerID": "A", "asin": "B", "overall": "five", '
     '"unixReviewTime": 1}\n', 'auto',
     r"r\.json line 1: field 'overall' should be a number"),
    ('u.data', '', 'auto', r'u\.data: file is empty'),
    ('ratings.csv', ' \n\n', 'auto', r'ratings\.csv: file is empty'),
    ('ratings.csv', 'userId,movieId,rating,timestamp\n', 'auto',
     r'ratings\.csv: no data rows'),
    ('seq.csv', '0,0\n0\n', 'seq-csv', r'seq\.csv: no data rows'),
    ('u.data', '1\t2\t3\t4\n', 'movielens', r"u\.data: unknown format "
     r"'movielens'; expected 'auto' or one of inter, ml-dat"),
])
def test_bad_input(tmp_path, name, text, fmt, pattern):
  path = write(tmp_path, name, text)
  with pytest.raises(DataError, match=pattern):
    read_interactions(path, fmt)


def test_headerless_csv_bad_column_lists_columns(tmp_path):
  path = write(tmp_path, 'log.csv', '1,2,3\n')
  with pytest.raises(DataError, match=r"log\.csv: no column '3' in columns "
                                      r"\['0', '1', '2'\]"):
    read_interactions(path, 'csv', header=False, user_field='0',
                      item_field='1', time_field='3')


def test_unreadable_files(tmp_path):
  missing = str(tmp_path / 'nowhere' / 'ratings.dat')
  with pytest.raises(DataError, match=re.escape(missing)):
    read_interactions(missing)
  not_gzip = tmp_path / 'u.data.gz'
  not_gzip.write_text('1\t2\t3\t4\n')
  with pytest.raises(DataError, match=r'u\.data\.gz: cannot read'):
    read_interactions(str(not_gzip))
  with pytest.raises(DataError, match=re.escape(str(tmp_path))):
    read_interactions(str(tmp_path), 'u.data')
