"""Parameter counts and analytic MACs against hand counts and XLA's cost
analysis; the benchmark's single-configuration run on tiny sizes."""

import jax
import jax.numpy as jnp
import pytest

from seqcompress_jax import bench, profiling
from seqcompress_jax.models import model as model_lib
from seqcompress_jax.models.spec import ModelSpec

# XLA also counts elementwise work (LayerNorm, softmax, exact GELU, masks): at
# these sizes it adds at most ~8.3% (NextItNet d=32) and ~4.7% (SASRec d=256).
XLA_TOLERANCE = 0.10


def _spec(backbone: str, embed_dim: int, hidden_dim: int) -> ModelSpec:
  return ModelSpec(num_items=101, backbone=backbone, embed_dim=embed_dim,
                   hidden_dim=hidden_dim, max_len=16, ffn_dim=4 * hidden_dim)


def _xla_macs(fn, *args) -> float:
  return profiling.compiled_flops(jax.jit(fn).lower(*args).compile()) / 2


def _padding_macs(spec: ModelSpec) -> int:
  """MACs of NextItNet's conv taps on the causal left padding: XLA folds the pad
  into the convolution and does not count them; `macs` does."""
  if spec.backbone != 'nextitnet':
    return 0
  taps = sum(min(j * d, spec.max_len) for r in spec.dilations for d in (r, 2 * r)
             for j in range(1, spec.kernel_size))
  return taps * spec.hidden_dim ** 2


@pytest.mark.parametrize('backbone,embed_dim,hidden_dim', [
    ('nextitnet', 32, 32), ('nextitnet', 16, 32), ('sasrec', 256, 256), ('sasrec', 128, 256)])
def test_macs_match_xla(backbone, embed_dim, hidden_dim):
  spec = _spec(backbone, embed_dim, hidden_dim)
  model = model_lib.Recommender(spec)
  params = model_lib.init(spec, jax.random.key(0))
  macs = profiling.macs(spec)

  inputs = jnp.ones((1, spec.max_len), jnp.int32)
  xla = _xla_macs(lambda p, x: model.apply({'params': p}, x, train=False), params, inputs)
  expected = macs['middle'] - _padding_macs(spec)
  assert expected * 0.99 <= xla <= expected * (1 + XLA_TOLERANCE)

  hidden = jnp.ones((hidden_dim,), jnp.float32)
  xla = _xla_macs(lambda p, h: model.apply({'params': p}, h, method='logits'),
                  params, hidden)
  assert macs['output'] == hidden_dim * spec.num_items
  assert macs['output'] * 0.99 <= xla <= (
      macs['output'] * (1 + XLA_TOLERANCE))


@pytest.mark.parametrize('embed_dim,hidden_dim', [(16, 16), (8, 16)])
def test_count_params_nextitnet(embed_dim, hidden_dim):
  spec = ModelSpec(num_items=101, backbone='nextitnet', embed_dim=embed_dim,
                   hidden_dim=hidden_dim, dilations=(1, 2, 4))
  params = model_lib.init(spec, jax.random.key(0))
  v, e, h, k = spec.num_items, embed_dim, hidden_dim, spec.kernel_size
  per_block = 2 * (k * h * h + h) + 2 * (2 * h)  # conv_a, conv_b; norm_a, norm_b.
  middle = len(spec.dilations) * per_block + (e * h if e != h else 0)
  counts = profiling.count_params(params)
  assert counts == {'embedding': v * e, 'middle': middle, 'output': h * v + v,
                    'total': v * e + middle + h * v + v}
  assert profiling.param_bytes(params) == 4 * counts['total']


def test_count_params_sasrec():
  spec = ModelSpec(num_items=101, backbone='sasrec', embed_dim=16, hidden_dim=16,
                   max_len=10, num_layers=2, ffn_dim=64)
  params = model_lib.init(spec, jax.random.key(0))
  h, f = spec.hidden_dim, spec.ffn_dim
  per_layer = 4 * (h * h + h) + (h * f + f) + (f * h + h) + 2 * (2 * h)
  middle = spec.max_len * h + spec.num_layers * per_layer + 2 * h  # Positions, final norm.
  counts = profiling.count_params(params)
  assert counts['middle'] == middle
  assert counts['total'] == counts['embedding'] + middle + counts['output']


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_bench_run_one(dtype):
  result = bench.run_one('nextitnet', 8, num_items=50, batch_size=8, max_len=8, steps=2,
                         dtype=dtype, eval_sequences=16)
  positive = {'params', 'macs_inference', 'compile_s', 'step_ms', 'sequences_per_s',
              'positions_per_s', 'gflop_per_step', 'gflops_per_s', 'eval_ms',
              'eval_sequences_per_s', 'peak_rss_mib'}
  assert set(result) == positive | {'device', 'backbone', 'width', 'dtype', 'peak_device_mib'}
  assert all(result[key] > 0 for key in positive), result
  assert result['dtype'] == dtype
  # CPU devices report no memory statistics; accelerators report a positive peak.
  assert (result['peak_device_mib'] is None) == (jax.default_backend() == 'cpu')
