"""SASRec-style causal Transformer on MovieLens-100K, leave-one-out, full ranking.

  python -m seqcompress_jax.main --config=configs/sasrec.py --workdir=runs/sasrec

Presets as in configs/nextitnet.py: smoke, synthetic, bf16, sampled.
"""

from seqcompress_jax.config import apply_presets, base_config


def get_config(arg: str | None = None):
  config = base_config()
  config.model.backbone = 'sasrec'
  config.model.num_layers = 2
  config.model.num_heads = 2
  config.model.dropout = 0.2
  return apply_presets(config, arg)
