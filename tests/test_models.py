"""Tests for the uncompressed models: spec, backbones, heads, Recommender."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from seqcompress_jax.models import ModelSpec, Recommender, init
from seqcompress_jax.models.heads import (PAD_LOGIT, popularity_log_probs,
                                          proposal_log_prob, sample_negatives,
                                          sampled_softmax_nll)

V, L = 50, 8
BACKBONES = ('nextitnet', 'sasrec')
SAMPLERS = ('log_uniform', 'uniform', 'popularity')
# Log popularity for the 'popularity' sampler: item i weighs V - i.
LOG_Q = np.log(np.arange(V, 0, -1)).astype(np.float32)


def make_spec(backbone: str = 'nextitnet', **overrides) -> ModelSpec:
  fields = dict(embed_dim=16, hidden_dim=16, max_len=L, dilations=(1, 2),
                num_layers=1, num_heads=2, ffn_dim=32, dropout=0.0, num_samples=64)
  return ModelSpec(num_items=V, backbone=backbone, **{**fields, **overrides})


def key(seed: int) -> jax.Array:
  """An rbg key: XLA compiles its sampling much faster than threefry's on CPU."""
  return jax.random.key(seed, impl='rbg')


def windows(seed: int, length: int = L) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded inputs and targets [4, length]: full, partial, one item, empty."""
  rng = np.random.default_rng(seed)
  items = rng.integers(1, V, (4, length + 1))
  lengths = np.array([length + 1, 5, 2, 0])
  items[np.arange(length + 1) < (length + 1 - lengths)[:, None]] = 0
  return items[:, :-1].astype(np.int32), items[:, 1:].astype(np.int32)


def mean_loss(spec: ModelSpec, params: dict, inputs: jax.Array, targets: jax.Array,
              rng: jax.Array, train: bool = False) -> tuple[jax.Array, dict]:
  """Mean NLL over targets, and the hidden states and per-position NLL."""
  model = Recommender(spec)
  dropout, sample = jax.random.split(rng)
  hidden = model.apply({'params': params}, inputs, train=train, rngs={'dropout': dropout})
  nll = model.apply({'params': params}, hidden, targets, log_q=LOG_Q, method='loss',
                    rngs={'sample': sample})
  return nll.sum() / jnp.maximum((targets > 0).sum(), 1), dict(hidden=hidden, nll=nll)


# XLA compilation dominates the run time of these tests on CPU: one compiled
# program per use, and no backend optimisation (it halves compile times).
jit = functools.partial(jax.jit, static_argnums=0,
                        compiler_options={'xla_backend_optimization_level': 0})


@functools.lru_cache
def params_for(spec: ModelSpec) -> dict:
  """init(spec, key(0)), shared by specs that differ only in how the parameters
  are used (loss, sampler, dtype, dropout)."""
  return jit(init)(dataclasses.replace(spec, head='full', sampler='log_uniform',
                                       dtype='float32', dropout=0.0), key(0))


@jit
def forward(spec: ModelSpec, params: dict, inputs: jax.Array, targets: jax.Array,
            rng: jax.Array) -> dict:
  """Loss, hidden states, per-position NLL, logits and scores at the last position."""
  loss, out = mean_loss(spec, params, inputs, targets, rng)
  apply = functools.partial(Recommender(spec).apply, {'params': params})
  last = out['hidden'][:, -1]
  return dict(out, loss=loss, logits=apply(out['hidden'], method='logits'),
              scores=apply(last, jnp.arange(V, dtype=jnp.int32), method='score'),
              target_scores=apply(last, targets[:, -1:], method='score'))


@jit
def loss_and_grad(spec: ModelSpec, params: dict, inputs: jax.Array,
                  targets: jax.Array, rng: jax.Array) -> dict:
  """Mean loss, its gradient, hidden states and per-position NLL."""
  (loss, out), grads = jax.value_and_grad(mean_loss, argnums=1, has_aux=True)(
      spec, params, inputs, targets, rng)
  return dict(out, loss=loss, grads=grads)


def log_softmax(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float64)
  shifted = x - x.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def all_finite(tree) -> bool:
  return all(np.all(np.isfinite(x)) for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------- spec


def test_spec_from_config_reads_fields_and_is_hashable():
  cfg = ml_collections.ConfigDict(dict(
      backbone='sasrec', embed_dim=32, hidden_dim=48, max_len=20, dilations=[1, 2],
      kernel_size=3, num_layers=1, num_heads=4, ffn_dim=64, dropout=0.1,
      head='sampled', tied=False, num_samples=8, sampler='uniform', dtype='bfloat16'))
  spec = ModelSpec.from_config(cfg, num_items=V)
  assert spec.dilations == (1, 2) and spec.hidden_dim == 48 and spec.head == 'sampled'
  assert spec.compute_dtype == jnp.bfloat16
  assert hash(spec) == hash(ModelSpec.from_config(cfg, num_items=V))
  defaults = ModelSpec.from_config(ml_collections.ConfigDict({'backbone': 'nextitnet'}), V)
  assert defaults.dilations == (1, 4, 1, 4) and defaults.embed_dim == 64


@pytest.mark.parametrize('overrides, field', [
    (dict(backbone='gru4rec'), 'model.backbone'),
    (dict(head='hierarchical'), 'model.head'),
    (dict(sampler='zipf'), 'model.sampler'),
    (dict(dtype='float16'), 'model.dtype'),
    (dict(embed_dim=0), 'model.embed_dim'),
    (dict(num_samples=-1), 'model.num_samples'),
    (dict(dilations=3), 'model.dilations'),
    (dict(dilations=(1, 0)), 'model.dilations'),
    (dict(dilations=()), 'model.dilations'),
    (dict(backbone='sasrec', hidden_dim=64, num_heads=3), 'model.num_heads'),
    (dict(tied=True, embed_dim=32, hidden_dim=64), 'model.tied'),
    (dict(dropout=1.0), 'model.dropout'),
    (dict(block_dropout=-0.1), 'model.block_dropout'),
    (dict(norm_chunk=0), 'model.norm_chunk'),
])
def test_spec_rejects_bad_values(overrides, field):
  cfg = ml_collections.ConfigDict({'backbone': 'nextitnet', **overrides})
  with pytest.raises(ValueError, match=field):
    ModelSpec.from_config(cfg, num_items=V)


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize('backbone', BACKBONES)
@pytest.mark.parametrize('head', ['full', 'sampled'])
def test_shapes_param_tree_and_scores(backbone, head):
  spec = make_spec(backbone, head=head)
  shapes = jax.eval_shape(functools.partial(init, spec), key(0))
  assert set(shapes) == {'embed', 'backbone', 'head'}
  assert set(shapes['head']) == {'kernel', 'bias'}
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))
  params = params_for(spec)
  inputs, targets = windows(0)
  out = forward(spec, params, inputs, targets, key(1))
  assert out['hidden'].shape == (4, L, 16)
  nll = np.asarray(out['nll'])
  assert nll.shape == (4, L) and nll.dtype == np.float32
  assert np.all(nll[targets == 0] == 0) and np.all(nll[targets > 0] > 0)
  logits = np.asarray(out['logits'])
  assert logits.shape == (4, L, V) and logits.dtype == np.float32
  # Scores of [C] items and of [B, C] items are the logits of those items.
  np.testing.assert_allclose(out['scores'], logits[:, -1], rtol=1e-5, atol=1e-5)
  assert out['target_scores'].shape == (4, 1)
  np.testing.assert_allclose(out['target_scores'],
                             np.take_along_axis(logits[:, -1], targets[:, -1:], 1),
                             rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- causality


@pytest.mark.parametrize('backbone', BACKBONES)
def test_backbones_are_causal(backbone):
  spec = make_spec(backbone)
  params = params_for(spec)
  inputs, targets = windows(2)
  hidden = np.asarray(forward(spec, params, inputs, targets, key(0))['hidden'])
  rng = np.random.default_rng(0)
  for t in (0, 2, 4, 6):
    changed = inputs.copy()
    changed[:, t + 1:] = rng.integers(1, V, changed[:, t + 1:].shape)
    other = np.asarray(forward(spec, params, changed, targets, key(0))['hidden'])
    np.testing.assert_allclose(other[:, :t + 1], hidden[:, :t + 1], atol=1e-6)
    assert not np.allclose(other[:, t + 1:], hidden[:, t + 1:], atol=1e-3)


def test_sasrec_padding_rows_are_finite():
  # Gradients through such rows: test_training_step_compiles_once_with_dropout.
  spec = make_spec('sasrec')
  inputs, targets = windows(3)  # Row 3 is all PAD; rows 1-2 start with PAD.
  assert all_finite(forward(spec, params_for(spec), inputs, targets, key(0)))


# ---------------------------------------------------------------- NextItNet


def param_sizes(spec: ModelSpec) -> dict[str, int]:
  shapes = jax.eval_shape(functools.partial(init, spec), key(0))
  return {name: sum(x.size for x in jax.tree.leaves(tree))
          for name, tree in shapes.items()}


def test_nextitnet_block_dropout_acts_on_the_branches_in_training_only():
  plain, dropped = make_spec('nextitnet'), make_spec('nextitnet', block_dropout=0.5)
  params = params_for(plain)  # Dropout has no parameters: the same tree serves both.
  inputs, targets = windows(4)
  run = lambda spec, train: np.asarray(jit(mean_loss, static_argnames='train')(
      spec, params, inputs, targets, key(5), train=train)[1]['hidden'])
  np.testing.assert_array_equal(run(dropped, False), run(plain, False))
  np.testing.assert_array_equal(run(plain, True), run(plain, False))  # Embedding dropout 0.
  trained = run(dropped, True)
  assert np.all(np.isfinite(trained)) and not np.allclose(trained, run(plain, False))


def test_nextitnet_params_count_and_names():
  spec = make_spec('nextitnet', embed_dim=12, dilations=(1, 4, 2))
  k, c, e = spec.kernel_size, spec.hidden_dim, spec.embed_dim
  conv = k * c * c + c
  block = 2 * conv + 2 * (2 * c)  # Two convs, two LayerNorms (scale, bias).
  # The projection from e to c channels has no bias.
  assert param_sizes(spec) == {'embed': V * e, 'backbone': e * c + 3 * block,
                               'head': c * V + V}
  # The CpRec spec's middle layers for d = 512 and four blocks.
  assert param_sizes(make_spec('nextitnet', embed_dim=512, hidden_dim=512,
                               dilations=(1, 4, 1, 4)))['backbone'] == 6_303_744
  # Unshared: one conv per slot (block i: conv_{2i}, conv_{2i+1}); norms per block.
  backbone = params_for(make_spec('nextitnet'))['backbone']
  assert set(backbone) == {'block_0', 'block_1', 'conv_0', 'conv_1', 'conv_2', 'conv_3'}
  assert set(backbone['block_0']) == {'norm_a', 'norm_b'}
  conv_a = backbone['conv_0']
  assert conv_a['kernel'].shape == (k, c, c)
  assert np.all(conv_a['bias'] == 0) and np.abs(conv_a['kernel']).max() <= 0.04


def test_sasrec_params_count():
  spec = make_spec('sasrec', embed_dim=12, num_layers=2)
  e, h, f = spec.embed_dim, spec.hidden_dim, spec.ffn_dim
  layer = 2 * (2 * h) + 4 * (h * h + h) + (h * f + f) + (f * h + h)
  assert param_sizes(spec) == {
      'embed': V * e, 'backbone': e * h + L * h + 2 * layer + 2 * h, 'head': h * V + V}


def test_nextitnet_receptive_field():
  # Block r: conv_a (dilation r) and conv_b (dilation 2r) reach back
  # (k - 1) * 3r positions: for dilations (1, 2) and k = 3, t-18 .. t.
  spec = make_spec('nextitnet')
  assert spec.dilations == (1, 2) and spec.kernel_size == 3
  length, reach = 24, 18
  params = params_for(spec)
  inputs = np.random.default_rng(0).integers(1, V, (1, length)).astype(np.int32)

  def hidden(x):
    return np.asarray(forward(spec, params, x, x, key(0))['hidden'])[0, -1]

  base = hidden(inputs)
  for position in range(length):
    changed = inputs.copy()
    changed[0, position] = changed[0, position] % (V - 1) + 1
    if position < length - 1 - reach:
      np.testing.assert_allclose(hidden(changed), base, atol=1e-6)
    else:
      assert np.abs(hidden(changed) - base).max() > 1e-4, position


# ---------------------------------------------------------------- heads


def test_full_softmax_loss_matches_numpy():
  spec = make_spec('sasrec')
  inputs, targets = windows(4)
  out = forward(spec, params_for(spec), inputs, targets, key(0))
  logits = np.asarray(out['logits'])
  assert np.all(logits[..., 0] == PAD_LOGIT)
  log_p = log_softmax(logits)
  np.testing.assert_allclose(np.exp(log_p[..., 1:]).sum(-1), 1.0, rtol=1e-6)
  assert np.all(np.exp(log_p[..., 0]) == 0)
  expected = -np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
  expected[targets == 0] = 0
  np.testing.assert_allclose(out['nll'], expected, rtol=1e-5, atol=1e-5)


def test_sampled_softmax_with_every_item_once_is_exact():
  # Uniform Q and S = V - 1: every S * Q(i) = 1, so with each item drawn once
  # (the target masked as an accidental hit) the loss is the full CE.
  logits = np.random.default_rng(0).normal(size=(5, V)).astype(np.float32) * 3
  logits[:, 0] = PAD_LOGIT
  targets = np.array([1, 7, 20, 49, 3])
  negatives = np.arange(1, V)
  nll = jax.jit(sampled_softmax_nll)(
      jnp.asarray(logits[np.arange(5), targets]), jnp.asarray(logits[:, 1:]),
      proposal_log_prob('uniform', targets, V),
      proposal_log_prob('uniform', negatives, V),
      hits=jnp.asarray(targets[:, None] == negatives))
  expected = -log_softmax(logits)[np.arange(5), targets]
  np.testing.assert_allclose(nll, expected, rtol=1e-5)


def test_sampled_softmax_masks_accidental_hits():
  target_logit = jnp.array(1.0)
  negative_logits = jnp.array([1.0, 2.0, -1.0, 1.0])  # Negatives 0 and 3 = target.
  hits = jnp.array([True, False, False, True])
  log_q = jnp.log(jnp.array([0.1, 0.2, 0.3, 0.1]))
  nll = jax.jit(sampled_softmax_nll)(target_logit, negative_logits, log_q[0], log_q,
                                     hits)
  corrected = np.array([1.0, 2.0, -1.0]) - np.log(4 * np.array([0.1, 0.2, 0.3]))
  expected = np.log(np.exp(corrected).sum()) - corrected[0]
  np.testing.assert_allclose(nll, expected, rtol=1e-6)


@pytest.mark.parametrize('sampler', SAMPLERS)
def test_proposals_are_distributions_and_sampling_follows_them(sampler):
  log_q = popularity_log_probs(LOG_Q) if sampler == 'popularity' else None
  items = np.arange(V)
  q = np.exp(np.asarray(proposal_log_prob(sampler, items, V, log_q), np.float64))
  assert q[0] == 0
  np.testing.assert_allclose(q[1:].sum(), 1.0, rtol=1e-5)
  if sampler == 'log_uniform':
    np.testing.assert_allclose(q[1:], np.log((items[1:] + 1) / items[1:]) / np.log(V),
                               rtol=1e-5)
  draws = np.asarray(sample_negatives(key(0), sampler, 200_000, V, log_q))
  assert draws.dtype == np.int32 and draws.min() >= 1 and draws.max() <= V - 1
  np.testing.assert_allclose(np.bincount(draws, minlength=V) / draws.size, q, atol=0.005)


def test_sampled_head_has_gradients_and_fresh_negatives():
  spec = make_spec('nextitnet', head='sampled')
  params, (inputs, targets) = params_for(spec), windows(5)
  out = loss_and_grad(spec, params, inputs, targets, key(0))
  assert all_finite(out) and out['loss'] > 0
  assert np.abs(out['grads']['head']['kernel']).max() > 0
  assert np.abs(out['grads']['backbone']['conv_0']['kernel']).max() > 0
  assert out['loss'] != loss_and_grad(spec, params, inputs, targets, key(1))['loss']


def test_popularity_sampler_takes_log_q_at_call_time():
  spec = make_spec('nextitnet', head='sampled', sampler='popularity')
  params, (inputs, targets) = params_for(spec), windows(5)
  assert all_finite(forward(spec, params, inputs, targets, key(0)))
  hidden = jnp.zeros((4, L, spec.hidden_dim))
  with pytest.raises(ValueError, match='log_q'):
    jax.eval_shape(functools.partial(
        Recommender(spec).apply, method='loss', rngs={'sample': key(0)}),
        {'params': params}, hidden, targets)


@pytest.mark.parametrize('head', ['full', 'sampled'])
def test_tied_head_shares_the_embedding_table(head):
  spec = make_spec('nextitnet', head=head, tied=True)
  params = params_for(spec)
  assert set(params['head']) == {'bias'}
  # The same function untied, with kernel = table^T: the tied gradient of the
  # table is the sum of its input-side and output-side gradients.
  untied = {**params, 'head': {**params['head'],
                               'kernel': params['embed']['embedding'].T}}
  inputs, targets = windows(6)
  tied_out = loss_and_grad(spec, params, inputs, targets, key(0))
  out = loss_and_grad(make_spec('nextitnet', head=head), untied, inputs, targets,
                      key(0))
  np.testing.assert_allclose(tied_out['loss'], out['loss'], rtol=1e-6)
  input_side = out['grads']['embed']['embedding']
  output_side = out['grads']['head']['kernel'].T
  assert np.abs(input_side).max() > 0 and np.abs(output_side).max() > 0
  np.testing.assert_allclose(tied_out['grads']['embed']['embedding'],
                             input_side + output_side, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- dtype, jit


@pytest.mark.parametrize('backbone', BACKBONES)
def test_bfloat16_runs_close_to_float32(backbone):
  params = params_for(make_spec(backbone))
  inputs, targets = windows(7)
  out = {dtype: forward(make_spec(backbone, dtype=dtype), params, inputs, targets, key(0))
         for dtype in ('float32', 'bfloat16')}
  assert out['bfloat16']['hidden'].dtype == jnp.bfloat16
  assert out['bfloat16']['nll'].dtype == jnp.float32 and all_finite(out['bfloat16'])
  assert math.isclose(out['bfloat16']['loss'], out['float32']['loss'], rel_tol=0.02)


def test_training_step_compiles_once_with_dropout():
  spec = make_spec('sasrec', head='sampled', dropout=0.3)
  params = params_for(spec)
  traces = []

  @jit
  def step(spec, params, inputs, targets, rng):
    traces.append(spec)
    grad_fn = jax.value_and_grad(mean_loss, argnums=1, has_aux=True)
    return grad_fn(spec, params, inputs, targets, rng, True)

  inputs, targets = windows(0)
  (_, first), grads = step(spec, params, inputs, targets, key(0))
  (_, resampled), _ = step(spec, params, inputs, targets, key(1))
  other = step(spec, params, *windows(1), key(0))
  assert len(traces) == 1  # Static shapes: traced and compiled once.
  assert all_finite((first, grads, other))
  assert not np.allclose(first['hidden'], resampled['hidden'])  # Dropout is on.
