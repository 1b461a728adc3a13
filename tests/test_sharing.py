"""Tests for layer-wise parameter sharing: schedules, parameter counts, and that
a shared model is its unshared twin with parameter sets copied per schedule."""

import dataclasses
import functools
import math

import jax
import ml_collections
import numpy as np
import pytest

from seqcompress_jax.models import ModelSpec, Recommender, init, sharing

V, L = 30, 8
SHARED = tuple(scheme for scheme in sharing.SCHEMES if scheme != 'none')
BACKBONES = ('nextitnet', 'sasrec')

SCHEDULES = {  # (scheme, R) -> the set of each slot (block i: slots 2i, 2i + 1).
    ('none', 1): (0, 1),
    ('none', 3): (0, 1, 2, 3, 4, 5),
    ('none', 4): (0, 1, 2, 3, 4, 5, 6, 7),
    ('cross-layer', 1): (0, 0),
    ('cross-layer', 3): (0, 0, 0, 0, 0, 0),
    ('cross-layer', 4): (0, 0, 0, 0, 0, 0, 0, 0),
    ('cross-block', 1): (0, 1),
    ('cross-block', 3): (0, 1, 0, 1, 0, 1),
    ('cross-block', 4): (0, 1, 0, 1, 0, 1, 0, 1),
    ('adjacent-layer', 1): (0, 0),
    ('adjacent-layer', 3): (0, 0, 1, 1, 2, 2),
    ('adjacent-layer', 4): (0, 0, 1, 1, 2, 2, 3, 3),
    ('adjacent-block', 1): (0, 1),
    ('adjacent-block', 3): (0, 1, 0, 1, 2, 3),
    ('adjacent-block', 4): (0, 1, 0, 1, 2, 3, 2, 3),
}

# The CpRec spec's figures for R = 4, d = 512, k = 3: the middle layers are the
# unique convs (786,944 = k d^2 + d each) and the 8 LayerNorms (2 d each).
CPREC_MIDDLE = {'none': 6_303_744, 'cross-layer': 795_136, 'cross-block': 1_582_080,
                'adjacent-layer': 3_155_968, 'adjacent-block': 3_155_968}


def make_spec(backbone: str, sharing_scheme: str = 'none', **overrides) -> ModelSpec:
  fields = dict(embed_dim=8, hidden_dim=8, max_len=L, dilations=(1, 2, 1),
                num_layers=4, num_heads=2, ffn_dim=16, dropout=0.0)
  return ModelSpec(num_items=V, backbone=backbone, sharing=sharing_scheme,
                   **{**fields, **overrides})


def key(seed: int) -> jax.Array:
  return jax.random.key(seed, impl='rbg')


def shapes(spec: ModelSpec) -> dict:
  return jax.eval_shape(functools.partial(init, spec), key(0))


def random_params(spec: ModelSpec) -> dict:
  """Normal(0, 0.3) values in the shapes of init(spec): no program to compile."""
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda x: (0.3 * rng.normal(size=x.shape)).astype(x.dtype),
                      shapes(spec))


def size(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


def slots_and_prefix(spec: ModelSpec) -> tuple[tuple[int, ...], str]:
  """The schedule of the backbone's layer slots and the name prefix of its sets."""
  if spec.backbone == 'nextitnet':
    return sharing.schedule(spec.sharing, len(spec.dilations)), 'conv'
  return sharing.layer_schedule(spec.sharing, spec.num_layers), 'layer'


def unshare(spec: ModelSpec, params: dict) -> dict:
  """Parameters of the unshared twin of `spec`: slot i gets a copy of its set."""
  slots, prefix = slots_and_prefix(spec)
  backbone = dict(params['backbone'])
  sets = [backbone.pop(f'{prefix}_{j}') for j in range(sharing.num_sets(slots))]
  backbone.update({f'{prefix}_{i}': sets[j] for i, j in enumerate(slots)})
  return {**params, 'backbone': backbone}


def without_sets(params: dict, prefix: str) -> dict:
  """`params` less the backbone's shared sets (or slots) `{prefix}_*`."""
  backbone = {name: tree for name, tree in params['backbone'].items()
              if not name.startswith(prefix + '_')}
  return {**params, 'backbone': backbone}


def assert_trees_close(actual, expected):
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7),
               actual, expected)


def windows(seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded inputs and targets [3, L]: full, partial, one item."""
  rng = np.random.default_rng(seed)
  items = rng.integers(1, V, (3, L + 1))
  items[np.arange(L + 1) < (L + 1 - np.array([L + 1, 5, 2]))[:, None]] = 0
  return items[:, :-1].astype(np.int32), items[:, 1:].astype(np.int32)


# As in test_models: compilation dominates on CPU, so skip backend optimisation.
jit = functools.partial(jax.jit, static_argnums=0,
                        compiler_options={'xla_backend_optimization_level': 0})


@jit
def loss_and_grad(spec: ModelSpec, params: dict, inputs: jax.Array,
                  targets: jax.Array) -> dict:
  """Mean NLL, its gradient and the hidden states."""
  model = Recommender(spec)

  def loss(params):
    hidden = model.apply({'params': params}, inputs, train=False)
    nll = model.apply({'params': params}, hidden, targets, method='loss')
    return nll.sum() / (targets > 0).sum(), hidden

  (value, hidden), grads = jax.value_and_grad(loss, has_aux=True)(params)
  return dict(loss=value, hidden=hidden, grads=grads)


# ---------------------------------------------------------------- schedules


@pytest.mark.parametrize('scheme, num_blocks', list(SCHEDULES))
def test_schedule(scheme, num_blocks):
  slots = sharing.schedule(scheme, num_blocks)
  assert slots == SCHEDULES[scheme, num_blocks]
  expected_sets = {'none': 2 * num_blocks, 'cross-layer': 1, 'cross-block': 2,
                   'adjacent-layer': num_blocks,
                   'adjacent-block': 2 * math.ceil(num_blocks / 2)}[scheme]
  assert sharing.num_sets(slots) == expected_sets


def test_layer_schedule_pairs_layers_into_blocks():
  assert sharing.layer_schedule('adjacent-block', 6) == SCHEDULES['adjacent-block', 3]
  assert sharing.layer_schedule('none', 3) == (0, 1, 2)
  assert sharing.layer_schedule('cross-layer', 3) == (0, 0, 0)
  for scheme in ('cross-block', 'adjacent-layer', 'adjacent-block'):
    with pytest.raises(ValueError, match='model.num_layers'):
      sharing.layer_schedule(scheme, 3)


def test_unknown_scheme_is_rejected():
  with pytest.raises(ValueError, match='model.sharing'):
    sharing.schedule('albert', 2)
  with pytest.raises(ValueError, match='model.sharing'):
    ModelSpec.from_config(ml_collections.ConfigDict(
        {'backbone': 'nextitnet', 'sharing': 'albert'}), num_items=V)
  default = ModelSpec.from_config(ml_collections.ConfigDict({'backbone': 'sasrec'}), V)
  assert default.sharing == 'none'


@pytest.mark.parametrize('scheme', ['cross-block', 'adjacent-layer', 'adjacent-block'])
def test_sasrec_block_schemes_need_an_even_number_of_layers(scheme):
  with pytest.raises(ValueError, match='model.num_layers'):
    shapes(make_spec('sasrec', scheme, num_layers=3))
  # NextItNet has no layer count; cross-layer shares any number of layers.
  shapes(make_spec('nextitnet', scheme, num_layers=3))
  assert set(shapes(make_spec('sasrec', 'cross-layer', num_layers=3))['backbone']) == {
      'pos_embed', 'layer_0', 'final_norm',
      *(f'norm_{i}_{part}' for i in range(3) for part in ('attn', 'ffn'))}


# ---------------------------------------------------------------- parameter counts


@pytest.mark.parametrize('scheme', sharing.SCHEMES)
def test_nextitnet_middle_counts_match_the_cprec_spec(scheme):
  d, k, blocks = 512, 3, 4
  spec = make_spec('nextitnet', scheme, embed_dim=d, hidden_dim=d,
                   dilations=(1, 4, 1, 4), kernel_size=k)
  backbone = shapes(spec)['backbone']
  unique = sharing.num_sets(sharing.schedule(scheme, blocks))
  assert set(backbone) == ({f'conv_{j}' for j in range(unique)}
                           | {f'block_{i}' for i in range(blocks)})
  assert size(backbone['conv_0']) == k * d * d + d == 786_944
  assert all(set(backbone[f'block_{i}']) == {'norm_a', 'norm_b'} for i in range(blocks))
  assert size(backbone) == unique * 786_944 + 2 * blocks * 2 * d == CPREC_MIDDLE[scheme]


@pytest.mark.parametrize('scheme', sharing.SCHEMES)
def test_sasrec_counts(scheme):
  spec = make_spec('sasrec', scheme, num_layers=4)
  h, f = spec.hidden_dim, spec.ffn_dim
  layer = 4 * (h * h + h) + (h * f + f) + (f * h + h)  # Attention, FFN.
  unique = sharing.num_sets(sharing.layer_schedule(scheme, 4))
  norms = (2 * 4 + 1) * 2 * h  # Two per layer, and the final one.
  assert size(shapes(spec)['backbone']) == L * h + unique * layer + norms


# ---------------------------------------------------------------- function, gradients


@pytest.mark.parametrize('backbone', BACKBONES)
@pytest.mark.parametrize('scheme', SHARED)
def test_shared_model_is_the_unshared_model_with_copied_sets(backbone, scheme):
  spec = make_spec(backbone, scheme)
  params = random_params(spec)
  inputs, targets = windows(0)
  shared = loss_and_grad(spec, params, inputs, targets)
  unshared = loss_and_grad(dataclasses.replace(spec, sharing='none'),
                           unshare(spec, params), inputs, targets)
  np.testing.assert_allclose(shared['hidden'], unshared['hidden'], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(shared['loss'], unshared['loss'], rtol=1e-6)
  # The gradient of a set is the sum of the gradients of the slots using it;
  # every other parameter (embedding, LayerNorms, head) gets the same gradient.
  slots, prefix = slots_and_prefix(spec)
  grads, slot_grads = shared['grads'], unshared['grads']['backbone']
  for j in range(sharing.num_sets(slots)):
    uses = [slot_grads[f'{prefix}_{i}'] for i, s in enumerate(slots) if s == j]
    assert_trees_close(grads['backbone'][f'{prefix}_{j}'],
                       jax.tree.map(lambda *g: sum(g), *uses))
  assert_trees_close(without_sets(grads, prefix),
                     without_sets(unshared['grads'], prefix))


@pytest.mark.parametrize('backbone', BACKBONES)
@pytest.mark.parametrize('scheme', SHARED)
def test_shared_models_are_causal(backbone, scheme):
  spec = make_spec(backbone, scheme)
  params = random_params(spec)
  inputs, targets = windows(1)
  hidden = np.asarray(loss_and_grad(spec, params, inputs, targets)['hidden'])
  rng = np.random.default_rng(0)
  for t in (0, 3, 6):
    changed = inputs.copy()
    changed[:, t + 1:] = rng.integers(1, V, changed[:, t + 1:].shape)
    other = np.asarray(loss_and_grad(spec, params, changed, targets)['hidden'])
    np.testing.assert_allclose(other[:, :t + 1], hidden[:, :t + 1], atol=1e-6)
    assert not np.allclose(other[:, t + 1:], hidden[:, t + 1:], atol=1e-3)
