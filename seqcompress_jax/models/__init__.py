"""Models: item embedding -> backbone (NextItNet | SASRec) -> output head.

  spec = ModelSpec.from_config(config.model, num_items=ds.num_items)
  params = init(spec, jax.random.key(0))
  hidden = Recommender(spec).apply({'params': params}, inputs, train=False)
"""

from seqcompress_jax.models.model import Recommender, init
from seqcompress_jax.models.spec import ModelSpec

__all__ = ['ModelSpec', 'Recommender', 'init']
