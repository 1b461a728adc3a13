"""The CpRec benchmark's pieces on tiny sizes: Zipf batches and cutoffs, the
two model specs, a train measurement, and the top-k comparison with its
agreement check."""

import numpy as np

from seqcompress_jax import bench_cprec

SIZES = dict(num_items=200, dim=16, max_len=8)


def test_zipf_cutoffs_and_batch():
  # 199 items: the top 11 hold 51.4% of the 1 / i mass, the top 62 hold 80.2%.
  assert bench_cprec.zipf_cutoffs(200, (0.5, 0.8)) == (12, 63, 200)
  batch = bench_cprec.zipf_batch(np.random.default_rng(0), 64, 8, 200)
  assert batch['inputs'].shape == batch['targets'].shape == (64, 8)
  assert batch['inputs'].min() >= 1 and batch['targets'].max() <= 199
  assert (batch['inputs'] == 1).mean() > (batch['inputs'] == 2).mean() > 0.05


def test_model_spec():
  cutoffs = bench_cprec.zipf_cutoffs(200, (0.5, 0.8))
  full = bench_cprec.model_spec('full', **SIZES, cutoffs=cutoffs)
  adaptive = bench_cprec.model_spec('adaptive', **SIZES, cutoffs=cutoffs)
  assert (full.embedding, full.head, full.dilations) == ('full', 'full', (1, 4))
  assert (adaptive.embedding, adaptive.head) == ('block', 'adaptive')
  assert adaptive.cutoffs == cutoffs and adaptive.block_widths == (16, 4, 1)


def test_run_train():  # The full variant: the adaptive one only differs in its spec.
  result = bench_cprec.run_train('full', **SIZES, cutoffs=(), tail_capacity=(), batch_size=2,
                                  steps=1)
  assert result['variant'] == 'full'
  for key in ('compile_s', 'step_ms', 'peak_rss_mib', 'params'):
    assert result[key] > 0


def test_run_rank_agrees_with_exact_top_k():
  cutoffs = bench_cprec.zipf_cutoffs(200, (0.5, 0.8))
  result = bench_cprec.run_rank(**SIZES, cutoffs=cutoffs, k=5, eval_batch=16, capacity=5,
                                cluster_shift=4.0, runs=1)
  for key in ('full_softmax_ms', 'exact_ms', 'fast_ms', 'encode_ms', 'speedup'):
    assert result[key] > 0
  assert result['capacity'] == 5 and len(result['mean_cluster_p']) == 2
  # One tail's rows fit the capacity (gathered), the other's do not (whole batch).
  rows = sorted(16 * f for f in result['rows_needing_tail'])
  assert 0 < rows[0] <= 5 < rows[1]
  assert result['mismatched_rows'] == 0
  assert all(0 <= f <= g <= h for f, g, h in zip(
      result['rows_with_tail_in_topk'], result['rows_needing_tail'], result['rows_cluster_rule']))
