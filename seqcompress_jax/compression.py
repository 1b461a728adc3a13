"""CpRec's compression report: a model against the uncompressed model of the
same widths (full embedding and softmax, no sharing), sizes counted and speeds
measured side by side in one process."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from seqcompress_jax import profiling
from seqcompress_jax.models import model as model_lib
from seqcompress_jax.models.spec import ModelSpec


def uncompressed(spec: ModelSpec) -> ModelSpec:
  """The same widths and backbone without blocks or sharing."""
  return dataclasses.replace(
      spec, embedding='full', head='full' if spec.head == 'adaptive' else spec.head,
      sharing='none', cutoffs=(), block_widths=(), tail_capacity=())


def sizes(spec: ModelSpec) -> dict[str, Any]:
  """Parameters by component, float32 bytes and MACs, without materialising."""
  shapes = jax.eval_shape(lambda: model_lib.init(spec, jax.random.key(0)))
  return {'params': profiling.count_params(shapes), 'bytes': profiling.param_bytes(shapes),
          'macs': profiling.macs(spec)}


def report(spec: ModelSpec, batch: dict[str, np.ndarray], eval_batch: dict[str, np.ndarray],
           steps: int = 10) -> dict[str, Any]:
  """Sizes and measured times of `spec` and its uncompressed twin, and ratios
  (uncompressed / compressed: > 1 means smaller or faster)."""
  models = {'compressed': spec, 'uncompressed': uncompressed(spec)}
  out = {name: {**profiling.measure(s, batch, eval_batch, steps), **sizes(s)}
         for name, s in models.items()}
  small, big = out['compressed'], out['uncompressed']
  out['ratio'] = {
      **{f'params_{k}': big['params'][k] / max(1, small['params'][k]) for k in big['params']},
      'macs_inference': big['macs']['inference'] / small['macs']['inference'],
      'train_step_time': big['step_ms'] / small['step_ms'],
      'full_ranking_time': big['eval_ms'] / small['eval_ms']}
  return out


def format_report(rep: dict[str, Any]) -> str:
  """A small Markdown table of `report`."""
  rows = [('parameters', lambda r: f"{r['params']['total']:,}"),
          ('  embedding / middle / output', lambda r: ' / '.join(
              f"{r['params'][k]:,}" for k in ('embedding', 'middle', 'output'))),
          ('bytes (float32)', lambda r: f"{r['bytes']:,}"),
          ('MACs per sequence (inference)', lambda r: f"{r['macs']['inference']:,}"),
          ('train step ms', lambda r: f"{r['step_ms']:.1f}"),
          ('full ranking ms', lambda r: f"{r['eval_ms']:.1f}")]
  lines = ['| | compressed | uncompressed |', '|---|---|---|']
  lines += [f'| {name} | {get(rep["compressed"])} | {get(rep["uncompressed"])} |'
            for name, get in rows]
  ratio = rep['ratio']
  lines.append(f"compression {ratio['params_total']:.2f}x params, "
               f"{ratio['macs_inference']:.2f}x MACs; train step "
               f"{ratio['train_step_time']:.2f}x, full ranking {ratio['full_ranking_time']:.2f}x "
               'faster')
  return '\n'.join(lines)
