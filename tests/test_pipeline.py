"""Windows, evaluation sets and batch iterators."""

import numpy as np
import pytest

from seqcompress_jax.data import dataset, pipeline, preprocess, split
from seqcompress_jax.data.interactions import DataError


def make_dataset(lengths, protocol='loo', **split_options):
  """Every interaction is its own item, numbered 1, 2, ... in sequence order,
  so an item index tells exactly which (user, position) it came from."""
  lengths = np.asarray(lengths)
  seqs = preprocess.Sequences(
      items=np.arange(lengths.sum()), offsets=np.concatenate([[0], np.cumsum(lengths)]),
      raw_item=np.arange(lengths.sum()), raw_user=np.arange(len(lengths)))
  ds = dataset.index_by_frequency(seqs, split.make_split(lengths, protocol, **split_options), {})
  # Undo the frequency order so that items[k] == k + 1 (tests read positions off items).
  return dataset.Dataset(**{**ds.__dict__, 'items': np.arange(1, lengths.sum() + 1, dtype=np.int32)})


@pytest.mark.parametrize('stride, expected, first, targets', [
    (3, [[4, 5, 6, 7], [1, 2, 3, 4]], [0, 0], [[5, 6, 7], [2, 3, 4]]),
    # Overlapping windows: 3 and 5 are trained where they have most context.
    (2, [[4, 5, 6, 7], [2, 3, 4, 5], [0, 1, 2, 3]], [1, 1, 0],
     [[0, 6, 7], [0, 4, 5], [0, 2, 3]]),
    (1, [[4, 5, 6, 7], [3, 4, 5, 6], [2, 3, 4, 5], [1, 2, 3, 4]], [2, 2, 2, 0],
     [[0, 0, 7], [0, 0, 6], [0, 0, 5], [2, 3, 4]]),
    (0, [[4, 5, 6, 7], [1, 2, 3, 4]], [0, 0], [[5, 6, 7], [2, 3, 4]]),  # 0 = max_len
])
def test_train_windows_by_hand(stride, expected, first, targets):
  ds = make_dataset([9], 'loo')  # trains on the first 7 items
  windows = pipeline.train_windows(ds, max_len=3, stride=stride)
  assert windows.items.tolist() == expected
  assert windows.first.tolist() == first
  assert windows.batch(np.arange(len(windows)))['targets'].tolist() == targets


def test_short_history_is_left_padded_and_single_items_give_no_window():
  ds = make_dataset([4, 1, 2], 'random_seq', test_fraction=0.0, valid_fraction=0.0)
  assert pipeline.train_windows(ds, max_len=5).items.tolist() == [
      [0, 0, 1, 2, 3, 4], [0, 0, 0, 0, 6, 7]]


def test_split_window_never_targets_the_first_item():
  batch = pipeline.split_window(np.array([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]]))
  assert batch['inputs'].tolist() == [[0, 0, 5, 6], [1, 2, 3, 4]]
  assert batch['targets'].tolist() == [[0, 0, 6, 7], [2, 3, 4, 5]]


@pytest.mark.parametrize('stride', [0, 7, 3, 1])
def test_loo_training_targets_are_exactly_the_training_positions(stride):
  lengths = np.random.default_rng(0).integers(1, 60, size=40)
  ds = make_dataset(lengths, 'loo')
  windows = pipeline.train_windows(ds, max_len=10, stride=stride)
  batch = windows.batch(np.arange(len(windows)))
  targets = batch['targets'][batch['targets'] > 0]
  position = targets - 1 - np.repeat(ds.offsets[:-1], lengths)[targets - 1]
  user = np.repeat(np.arange(len(lengths)), lengths)[targets - 1]
  assert (position >= 1).all() and (position < ds.train_len[user]).all()
  held_out = {int(ds.items[ds.offsets[u] + p]) for part in ('valid', 'test')
              for u, p in zip(*ds.eval_examples(part))}
  assert held_out and not held_out & set(targets.tolist())
  expected = {int(ds.items[ds.offsets[u] + p]) for u in range(len(lengths))
              for p in range(1, ds.train_len[u])}
  assert set(targets.tolist()) == expected
  assert len(targets) == len(expected)  # each exactly once
  # Context: the non-PAD inputs up to a target's column, at least
  # max_len - stride + 1 items unless its history is shorter.
  rows, cols = np.nonzero(batch['targets'])
  context = (batch['inputs'] > 0).cumsum(axis=1)[rows, cols]
  assert (context >= np.minimum(position, 10 - (stride or 10) + 1)).all()


def test_eval_set_inputs_are_the_items_right_before_the_target():
  ds = make_dataset([6, 3], 'loo')
  test = pipeline.eval_set(ds, 'test', max_len=3, history_len=4)
  assert test.targets.tolist() == [6, 9]
  assert test.inputs.tolist() == [[3, 4, 5], [0, 7, 8]]
  assert test.history.tolist() == [[2, 3, 4, 5], [0, 0, 7, 8]]
  valid = pipeline.eval_set(ds, 'valid', max_len=3)
  assert valid.targets.tolist() == [5, 8] and valid.inputs.tolist() == [[2, 3, 4], [0, 0, 7]]
  assert valid.history is None


def whole_windows(items: np.ndarray) -> pipeline.Windows:
  """Windows that train all their targets."""
  return pipeline.Windows(items, np.zeros(len(items), np.int32))


def test_train_batches_are_deterministic_and_visit_each_window_once_per_epoch():
  windows = whole_windows(np.arange(50 * 4, dtype=np.int32).reshape(50, 4))
  it = pipeline.TrainBatches(windows, batch_size=8, seed=1)
  first = [next(it) for _ in range(12)]
  again = [next(pipeline.TrainBatches(windows, batch_size=8, seed=1)) for _ in range(1)]
  assert np.array_equal(first[0]['inputs'], again[0]['inputs'])
  assert first[0]['inputs'].shape == (8, 3) and first[0]['targets'].shape == (8, 3)
  epoch0 = np.concatenate([b['inputs'][:, 0] for b in first[:6]])
  assert len(set(epoch0.tolist())) == 48  # 6 full batches of distinct rows
  epoch1 = np.concatenate([b['inputs'][:, 0] for b in first[6:]])
  assert not np.array_equal(epoch0, epoch1)  # reshuffled
  other = next(pipeline.TrainBatches(windows, batch_size=8, seed=2))
  assert not np.array_equal(first[0]['inputs'], other['inputs'])


def test_train_batches_resume_exactly():
  windows = whole_windows(np.arange(30 * 3, dtype=np.int32).reshape(30, 3))
  straight = pipeline.TrainBatches(windows, batch_size=4, seed=0)
  expected = [next(straight)['targets'] for _ in range(17)]
  first = pipeline.TrainBatches(windows, batch_size=4, seed=0)
  got = [next(first)['targets'] for _ in range(9)]
  resumed = pipeline.TrainBatches(windows, batch_size=4, seed=0)
  resumed.restore(dict(first.state()))
  got += [next(resumed)['targets'] for _ in range(8)]
  assert all(np.array_equal(a, b) for a, b in zip(expected, got))
  with pytest.raises(DataError, match='seed'):
    pipeline.TrainBatches(windows, batch_size=4, seed=5).restore(first.state())


def test_hosts_split_each_global_batch():
  windows = whole_windows(np.arange(40 * 2, dtype=np.int32).reshape(40, 2))
  whole = pipeline.TrainBatches(windows, batch_size=8, seed=0)
  hosts = [pipeline.TrainBatches(windows, batch_size=8, seed=0, process_index=i,
                                 process_count=4) for i in range(4)]
  for _ in range(7):
    parts = [next(h)['inputs'] for h in hosts]
    assert all(p.shape == (2, 1) for p in parts)
    assert np.array_equal(np.concatenate(parts), next(whole)['inputs'])
  with pytest.raises(DataError, match='not divisible by the 3 processes'):
    pipeline.TrainBatches(windows, batch_size=8, seed=0, process_count=3)
  with pytest.raises(DataError, match='fewer than the batch size'):
    pipeline.TrainBatches(whole_windows(windows.items[:5]), batch_size=8, seed=0)


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_batches_pad_and_drop_nothing(process_count):
  ds = make_dataset([4, 5, 3, 6, 3, 7, 4], 'loo')
  examples = pipeline.eval_set(ds, 'test', max_len=3, history_len=2)
  per_host = [list(pipeline.eval_batches(examples, 4, i, process_count))
              for i in range(process_count)]
  assert len({len(batches) for batches in per_host}) == 1  # same count on every host
  batches = [b for step in zip(*per_host) for b in step]
  assert all(b['inputs'].shape == (4 // process_count, 3) for b in batches)
  index = np.concatenate([b['index'] for b in batches])
  weights = np.concatenate([b['weights'] for b in batches])
  assert index.tolist() == list(range(7)) + [-1]
  assert weights.tolist() == [1.0] * 7 + [0.0]
  kept = weights > 0
  assert np.array_equal(np.concatenate([b['targets'] for b in batches])[kept], examples.targets)
  assert np.array_equal(np.concatenate([b['history'] for b in batches])[kept], examples.history)
