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

  'embedding' is the block embedding's tail projections (every tail for every
  position: the static-shape implementation computes them all; 0 for a plain
  table); 'middle' the backbone (input projection included); 'output' the
  head for one position (the adaptive head with every tail evaluated).
  'inference' = embedding + middle + output at the last position (next-item
  prediction); 'train_forward' puts the output at every position.
  """
  length, e, h, v = spec.max_len, spec.embed_dim, spec.hidden_dim, spec.num_items
  embedding = length * e * sum(spec.block_widths[1:]) if spec.embedding == 'block' else 0
  middle = length * e * h if e != h else 0
  if spec.backbone == 'nextitnet':
    middle += 2 * len(spec.dilations) * length * spec.kernel_size * h * h
  else:
    per_layer = 4 * length * h * h + 2 * length * length * h + 2 * length * h * spec.ffn_dim
    middle += spec.num_layers * per_layer
  if spec.head == 'adaptive':
    sizes = [b - a for a, b in zip(spec.cutoffs, spec.cutoffs[1:])]
    output = h * (spec.cutoffs[0] + len(sizes)) + sum(
        d * (h + size) for d, size in zip(spec.block_widths[1:], sizes))
  else:
    output = h * v
  return {'embedding': embedding, 'middle': middle, 'output': output,
          'inference': embedding + middle + output,
          'train_forward': embedding + middle + length * output}


def compiled_flops(compiled: Any) -> float:
  """FLOPs XLA counts for a compiled function (`jit(f).lower(...).compile()`)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis.get('flops', 0.0)) if analysis else 0.0
