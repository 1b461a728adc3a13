"""CpRec speed on a synthetic Zipf catalogue (issue 4): adaptive vs full softmax
training, fast vs exact top-k inference.

Train: NextItNet (dilations (1, 4), embed = hidden = d) with (a) a full
embedding and softmax and (b) CpRec's block embedding and adaptive softmax, on
one batch, each in a fresh process (own peak RSS), timed by profiling.measure
(jitted, donated step_lib.train_step). Inference, in one process, from the
last hidden states of `eval_batch` sequences: the top k of the adaptive head's
log p over all V items, (c) exact (log_probs + top_k) and (d)
AdaptiveSoftmax.topk, whose items must agree; the full softmax's exact top k
is timed for reference.

Ids are frequency-sorted and drawn with P(i) ~ 1/i (Zipf, s = 1). Default
cutoffs (the CpRec way, blocks.cutoffs_from_mass on the expected counts): the
head holds the items covering 50% of the interactions, block 2 those up to
80%; widths d, d/4, d/16. At V = 1M, d = 256 the full variant holds 5.7 GiB
of parameters and Adam state, and its step needs 4.8 GiB more at B = 4 (peak
RSS 11.2 GiB) and 7.3 GiB at B = 8 (XLA's memory analysis; B * L * V logits
and their gradient): hence batch_size 4.

(d) skips a tail for the rows whose tail cluster token is below their k-th
best head item; the fraction of rows needing each tail and the mean
p(cluster) are reported. `cluster_shift` adds a logit to every cluster token
(as a bias: hidden[:, 0] = 1, head weight row 0 = the shift on cluster
tokens, 0 on items), to see (d) when more rows need tails.

  python -m seqcompress_jax.bench_cprec --num_items=1000000 --dim=256 --out=cprec.json
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from seqcompress_jax import profiling, rundir, writers
from seqcompress_jax.data import load_dataset, pipeline
from seqcompress_jax.models import blocks, heads
from seqcompress_jax.models import model as model_lib
from seqcompress_jax.models.spec import ModelSpec

FLAGS = flags.FLAGS

def zipf_weights(num_items: int) -> np.ndarray:
  """float64 [V - 1]: 1 / i for the ids i = 1..V-1."""
  return 1.0 / np.arange(1, num_items)


def zipf_cutoffs(num_items: int, mass: Sequence[float]) -> tuple[int, ...]:
  """Cutoffs covering `mass` shares of the expected Zipf interactions."""
  counts = np.round(np.concatenate([[0.0], 1e12 * zipf_weights(num_items)]))
  return blocks.cutoffs_from_mass(counts.astype(np.int64), mass)


def zipf_batch(rng: np.random.Generator, batch_size: int, max_len: int,
               num_items: int) -> dict[str, np.ndarray]:
  """{'inputs', 'targets'} int32 [B, L] of i.i.d. Zipf ids, no padding."""
  cdf = np.cumsum(zipf_weights(num_items))
  draws = rng.random((batch_size, max_len + 1)) * cdf[-1]
  return pipeline.split_window((1 + np.searchsorted(cdf, draws, side='right')).astype(np.int32))


def model_spec(variant: str, num_items: int, dim: int, max_len: int,
               cutoffs: tuple[int, ...], tail_capacity: tuple[float, ...] = (),
               norm_chunk: int = ModelSpec.norm_chunk) -> ModelSpec:
  """NextItNet, dilations (1, 4): 'full' (embedding, softmax) or 'adaptive' (CpRec,
  with the adaptive head's loss capacity per tail and tail pass chunk)."""
  adaptive = variant == 'adaptive'
  return ModelSpec(num_items=num_items, backbone='nextitnet', embed_dim=dim, hidden_dim=dim,
                   max_len=max_len, dilations=(1, 4), dropout=0.0,
                   embedding='block' if adaptive else 'full',
                   head='adaptive' if adaptive else 'full', cutoffs=cutoffs if adaptive else (),
                   tail_capacity=tail_capacity if adaptive else (), norm_chunk=norm_chunk)


def run_train(variant: str, num_items: int, dim: int, max_len: int, cutoffs: tuple[int, ...],
              tail_capacity: tuple[float, ...], batch_size: int, steps: int,
              norm_chunk: int = ModelSpec.norm_chunk) -> dict[str, Any]:
  """Compile time, median step time and peak memory of one variant's train step."""
  spec = model_spec(variant, num_items, dim, max_len, cutoffs, tail_capacity, norm_chunk)
  batch = zipf_batch(np.random.default_rng(0), batch_size, max_len, num_items)
  return {'variant': variant, **profiling.measure(spec, batch, batch, steps)}


def run_rank(num_items: int, dim: int, max_len: int, cutoffs: tuple[int, ...], k: int,
             eval_batch: int, capacity: int = 0, cluster_shift: float = 0.0,
             runs: int = 5, norm_chunk: int = ModelSpec.norm_chunk) -> dict[str, Any]:
  """Top-k times ('*_ms', medians of `runs` after one untimed), agreement of
  (c) and (d), and the rows needing each tail."""
  spec = model_spec('adaptive', num_items, dim, max_len, cutoffs, norm_chunk=norm_chunk)
  model = model_lib.Recommender(spec)
  params = model_lib.init(spec, jax.random.key(0))
  inputs = zipf_batch(np.random.default_rng(1), eval_batch, max_len, num_items)['inputs']
  encode = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False)[:, -1])
  encode_ms = 1e3 * profiling.median_seconds(lambda: encode(params, inputs), runs, 1)
  hidden = encode(params, inputs)
  c1 = spec.cutoffs[0]
  if cluster_shift:
    row = jnp.zeros(c1 + len(spec.cutoffs) - 1).at[c1:].set(cluster_shift)
    params['head']['head'] = params['head']['head'].at[0].set(row)
    hidden = hidden.at[:, 0].set(1.0)

  def on_head(fn):
    return jax.jit(lambda p, h: model.apply({'params': p}, h, method=lambda m, h: fn(m.head, h)))

  exact = on_head(lambda head, h: jax.lax.top_k(head.log_probs(h), k))
  fast = on_head(lambda head, h: head.topk(h, k, capacity or None))
  full_head = heads.FullSoftmax(num_items, dim)
  full_params = full_head.init(jax.random.key(1), hidden)
  full = jax.jit(lambda p, h: jax.lax.top_k(full_head.apply(p, h), k))
  times = {name: 1e3 * profiling.median_seconds(lambda: fn(p, hidden), runs, 1)
           for name, fn, p in [('full_softmax_ms', full, full_params),
                               ('exact_ms', exact, params), ('fast_ms', fast, params)]}

  needed, cluster_rule, in_topk, cluster_p = on_head(functools.partial(tail_stats, spec, k=k))(
      params, hidden)
  exact_items, fast_items = (np.sort(np.asarray(fn(params, hidden)[1]), axis=1)
                             for fn in (exact, fast))
  mismatched = (exact_items != fast_items).any(axis=1)
  return {**times, 'encode_ms': encode_ms, 'speedup': times['exact_ms'] / times['fast_ms'],
          'mismatched_rows': int(mismatched.sum()), 'rows_needing_tail': needed.tolist(),
          'rows_cluster_rule': cluster_rule.tolist(), 'rows_with_tail_in_topk': in_topk.tolist(),
          'mean_cluster_p': cluster_p.tolist(), 'capacity': capacity or max(8, eval_batch // 4),
          'cluster_shift': cluster_shift, 'eval_batch': eval_batch, 'k': k,
          'device': jax.devices()[0].device_kind, **profiling.peak_memory_mib()}


def tail_stats(spec: ModelSpec, head: blocks.AdaptiveSoftmax, hidden: jax.Array,
               k: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Per tail [n - 1], over the rows of hidden [B, H]: the share that
  AdaptiveSoftmax.topk opens for k; the share CpRec's rule would open (the
  tail's cluster beats the k-th best head item); the share whose exact top k
  holds an item of the tail (which any exact method must score, so must open:
  the floor of both); and the mean probability of the tail's cluster."""
  c1 = spec.cutoffs[0]
  log_p = head.log_probs(hidden)
  kth = jax.lax.top_k(log_p[:, :c1], min(k, c1))[0][:, -1:]
  bounds = list(zip(spec.cutoffs, spec.cutoffs[1:]))
  cluster = jnp.stack([jax.nn.logsumexp(log_p[:, lower:upper], axis=1)
                       for lower, upper in bounds], axis=1)
  top = jax.lax.top_k(log_p, k)[1][:, :, None]  # [B, k, 1]
  in_topk = jnp.stack([((top >= lower) & (top < upper)).any(axis=(1, 2))
                       for lower, upper in bounds], axis=1)
  return (head.tails_to_open(hidden, k).mean(axis=0), (cluster > kth).mean(axis=0),
          in_topk.mean(axis=0), jnp.exp(cluster).mean(axis=0))


def trained_tail_stats(workdir: str, ks: Sequence[int]) -> dict[str, Any]:
  """tail_stats on the test sequences of a trained run with an adaptive head."""
  config = rundir.read_config(workdir)
  ds = load_dataset(config.data)
  spec = ModelSpec.from_config(config.model, ds.num_items, ds.item_count)
  if spec.head != 'adaptive':
    raise ValueError(f'{workdir}: model.head is {spec.head!r}, not adaptive')
  params, which = rundir.restore_params(config, spec, workdir)
  model = model_lib.Recommender(spec)
  inputs = pipeline.eval_set(ds, 'test', config.data.max_len).inputs
  stats = jax.jit(lambda p, x, k: model.apply({'params': p}, x, method=lambda m, x: tail_stats(
      spec, m.head, m(x, train=False)[:, -1], k)), static_argnums=2)
  out = {'workdir': workdir, 'checkpoint': which, 'cutoffs': spec.cutoffs,
         'sequences': len(inputs)}
  for k in ks:
    needed, cluster_rule, in_topk, cluster_p = stats(params, inputs, k)
    out[f'k={k}'] = {'rows_needing_tail': needed.tolist(),
                     'rows_cluster_rule': cluster_rule.tolist(),
                     'rows_with_tail_in_topk': in_topk.tolist(),
                     'mean_cluster_p': cluster_p.tolist()}
  return out


def _peak(result: dict[str, Any]) -> str:
  """'RSS' or 'RSS host / DEVICE device' peak MiB of a measurement."""
  device = result['peak_device_mib']
  return f'{result["peak_rss_mib"]:,}' + ('' if device is None else f' host / {device:,} device')


def _in_subprocess(one: str) -> dict[str, Any]:
  """The JSON a fresh `--one` process prints, given this process's flags."""
  out = subprocess.run([sys.executable, '-m', 'seqcompress_jax.bench_cprec', *sys.argv[1:],
                        f'--one={one}'], capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
  del argv
  num_items = FLAGS.num_items
  cutoffs = blocks.check_cutoffs([int(c) for c in FLAGS.cutoffs] or zipf_cutoffs(
      num_items, [float(m) for m in FLAGS.cutoff_mass]), num_items)
  masses = np.add.reduceat(zipf_weights(num_items), np.array((1,) + cutoffs[:-1]) - 1)
  masses = masses / masses.sum()
  tail_capacity = tuple(min(1.0, FLAGS.capacity_factor * m) for m in masses[1:]
                        if FLAGS.capacity_factor)
  sizes = dict(num_items=num_items, dim=FLAGS.dim, max_len=FLAGS.max_len, cutoffs=cutoffs,
               norm_chunk=FLAGS.norm_chunk)
  if FLAGS.workdir:
    out = trained_tail_stats(FLAGS.workdir, (1, 10, 20, 50))
    print(f'{out["checkpoint"]} of {FLAGS.workdir}, cutoffs {out["cutoffs"]}, '
          f'{out["sequences"]} test sequences\n')
    print('| k | rows topk opens, tail 2..n | rows CpRec\'s rule opens | rows whose exact top k '
          'has one of its items | mean p(cluster 2..n) |\n|---|---|---|---|---|')
    for k in (1, 10, 20, 50):
      row = out[f'k={k}']
      print(f'| {k} | {np.round(row["rows_needing_tail"], 3).tolist()} | '
            f'{np.round(row["rows_cluster_rule"], 3).tolist()} | '
            f'{np.round(row["rows_with_tail_in_topk"], 3).tolist()} | '
            f'{np.round(row["mean_cluster_p"], 3).tolist()} |')
    if FLAGS.out:
      writers.write_json(FLAGS.out, out)
    return
  if FLAGS.one:
    print(json.dumps(run_rank(**sizes, k=FLAGS.k, eval_batch=FLAGS.eval_batch,
                              capacity=FLAGS.capacity, cluster_shift=FLAGS.cluster_shift)
                     if FLAGS.one == 'rank' else
                     run_train(FLAGS.one, **sizes, tail_capacity=tail_capacity,
                               batch_size=FLAGS.batch_size, steps=FLAGS.steps)))
    return
  full, adaptive, rank = map(_in_subprocess, ('full', 'adaptive', 'rank'))
  print(f'V = {num_items:,}, d = {FLAGS.dim}, cutoffs {cutoffs}, Zipf mass per block '
        f'{np.round(masses, 3).tolist()}; train batch {FLAGS.batch_size} x '
        f'{FLAGS.max_len}, top-{FLAGS.k} of {FLAGS.eval_batch} sequences; adaptive loss '
        f'capacity per tail {np.round(tail_capacity, 3).tolist() or "off"}; tail passes '
        f'{FLAGS.norm_chunk:,} items a step\n')
  print(f'{rank["device"]}\n\n| measurement | median ms | compile s | peak MiB |\n|---|---|---|---|')
  for name, r in [('train (a): full embedding + full softmax', full),
                  ('train (b): block embedding + adaptive softmax', adaptive)]:
    print(f'| {name} | {r["step_ms"]:,.1f} | {r["compile_s"]:.1f} | {_peak(r)} |')
  for name, key in [('top-k: full softmax, exact', 'full_softmax_ms'),
                    ('top-k (c): adaptive, exact (log_probs + top_k)', 'exact_ms'),
                    ('top-k (d): adaptive, AdaptiveSoftmax.topk', 'fast_ms')]:
    print(f'| {name} | {rank[key]:,.1f} | | {_peak(rank)} (all top-k) |')
  train_speedup = full['step_ms'] / adaptive['step_ms']
  print(f'\ntrain step (a)/(b): {train_speedup:.2f}x; top-k (c)/(d): {rank["speedup"]:.2f}x '
        f'(encoder {rank["encode_ms"]:.1f} ms extra for both); (d) vs (c): '
        f'{rank["mismatched_rows"]} rows with other items')
  print(f'rows needing tail 2..n: {rank["rows_needing_tail"]} (CpRec\'s rule: '
        f'{rank["rows_cluster_rule"]}; exact top k holds one of its items: '
        f'{rank["rows_with_tail_in_topk"]}), mean p(cluster): '
        f'{rank["mean_cluster_p"]}, topk capacity {rank["capacity"]} rows')
  if FLAGS.out:
    writers.write_json(FLAGS.out, {
        **sizes, 'tail_capacity': tail_capacity, 'batch_size': FLAGS.batch_size,
        'block_mass': masses.tolist(), 'train': [full, adaptive],
        'train_speedup': train_speedup, 'rank': rank})
  if rank['mismatched_rows']:
    raise AssertionError(f'topk differs from the exact top k in {rank["mismatched_rows"]} rows')


if __name__ == '__main__':  # Flags here, not at import: tests import this module.
  flags.DEFINE_integer('num_items', 1_000_000, 'Vocabulary size V, PAD included.')
  flags.DEFINE_integer('dim', 256, 'embed_dim = hidden_dim d.')
  flags.DEFINE_integer('batch_size', 4, 'Training sequences per step.')
  flags.DEFINE_integer('max_len', 50, 'Positions per sequence.')
  flags.DEFINE_list('cutoffs', [], 'Block cutoffs; empty: from --cutoff_mass.')
  flags.DEFINE_list('cutoff_mass', ['0.5', '0.8'], 'Zipf mass shares.')
  flags.DEFINE_integer('k', 10, 'Top k items.')
  flags.DEFINE_integer('eval_batch', 256, 'Sequences ranked at once.')
  flags.DEFINE_integer('capacity', 0, 'topk rows per tail; 0: its default.')
  flags.DEFINE_float('cluster_shift', 0.0, 'Logit added to cluster tokens.')
  flags.DEFINE_float('capacity_factor', 1.5, 'Adaptive loss capacity per tail, as a '
                     'multiple of its Zipf mass (model.capacity_factor); 0 = off.')
  flags.DEFINE_integer('steps', 5, 'Timed training steps.')
  flags.DEFINE_integer('norm_chunk', ModelSpec.norm_chunk, 'Adaptive head: tail items per step of its '
                       'chunked passes (model.norm_chunk).')
  flags.DEFINE_string('out', '', 'Write the results as JSON here.')
  flags.DEFINE_string('workdir', '', 'Instead: how many test rows of this trained run '
                      '(adaptive head) the fast top-k must open each tail for.')
  flags.DEFINE_enum('one', '', ['', 'full', 'adaptive', 'rank'],
                    'Internal: run one measurement in this process.')
  app.run(main)
