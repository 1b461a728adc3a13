"""Ranking metrics from 0-based ranks (the number of items scored above the target)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def metrics_from_ranks(ranks: np.ndarray, weights: np.ndarray | None,
                       ks: Sequence[int]) -> dict[str, float]:
  """Weighted means of HR@k, NDCG@k and MRR@k for each k, and MRR (no cut-off).

  A target of rank r is a hit at k when r < k; it then scores 1 / log2(r + 2)
  for NDCG and 1 / (r + 1) for MRR. Examples with weight 0 (padding) are left
  out; `weights=None` weighs every example 1.
  """
  ranks = np.asarray(ranks, np.float64)
  weights = np.ones_like(ranks) if weights is None else np.asarray(weights, np.float64)
  if ranks.shape != weights.shape or ranks.ndim != 1:
    raise ValueError(f'ranks {ranks.shape} and weights {weights.shape} must be '
                     'equal 1-D shapes')
  if any(k < 1 for k in ks):
    raise ValueError(f'cut-offs must be >= 1, got {list(ks)}')
  keep = weights > 0
  ranks, weights = ranks[keep], weights[keep]
  if not ranks.size:
    raise ValueError('no examples with weight > 0')
  if (ranks < 0).any():
    raise ValueError(f'ranks must be >= 0, got {ranks.min():g}')

  def mean(values: np.ndarray) -> float:
    return float(np.average(values, weights=weights))

  result = {}
  for k in ks:
    hit = ranks < k
    result[f'HR@{k}'] = mean(hit)
    result[f'NDCG@{k}'] = mean(np.where(hit, 1 / np.log2(ranks + 2), 0.0))
    result[f'MRR@{k}'] = mean(np.where(hit, 1 / (ranks + 1), 0.0))
  result['MRR'] = mean(1 / (ranks + 1))
  return result
