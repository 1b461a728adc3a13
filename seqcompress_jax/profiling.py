"""Model size and cost: parameters by component, bytes, analytic MACs, and the
FLOP count of compiled XLA programs (to cross-check the analytic MACs)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from seqcompress_jax.models.spec import ModelSpec

# Top-level parameter collections of Recommender -> reported component.
COMPONENTS = {'embed': 'embedding', 'backbone': 'middle', 'head': 'output'}


def count_params(params: Any) -> dict[str, int]:
  """Parameter counts of the embedding, middle layers, output head and total."""
  counts = {name: 0 for name in COMPONENTS.values()}
  for key, subtree in params.items():
    counts[COMPONENTS.get(key, key)] = sum(
        int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(subtree))
  counts['total'] = sum(counts.values())
  return counts


def param_bytes(params: Any) -> int:
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(params))


def macs(spec: ModelSpec) -> dict[str, int]:
  """Multiply-accumulates for one sequence of spec.max_len positions.

  'middle' is the backbone (input projection included); 'inference' adds the
  output layer at the last position only (next-item prediction), and
  'train_forward' at every position (all-position training).
  """
  length, e, h, v = spec.max_len, spec.embed_dim, spec.hidden_dim, spec.num_items
  middle = length * e * h if e != h else 0
  if spec.backbone == 'nextitnet':
    middle += 2 * len(spec.dilations) * length * spec.kernel_size * h * h
  else:
    per_layer = 4 * length * h * h + 2 * length * length * h + 2 * length * h * spec.ffn_dim
    middle += spec.num_layers * per_layer
  return {'middle': middle, 'output_last_position': h * v,
          'inference': middle + h * v, 'train_forward': middle + length * h * v}


def compiled_flops(compiled: Any) -> float:
  """FLOPs XLA counts for a compiled function (`jit(f).lower(...).compile()`)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis.get('flops', 0.0)) if analysis else 0.0
