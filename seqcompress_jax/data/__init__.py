"""Interaction logs -> cached, frequency-indexed, split, windowed batches.

  ds = load_dataset(data_config())          # MovieLens-100K, leave-one-out
  windows = pipeline.train_windows(ds, max_len=50)
  batches = pipeline.TrainBatches(windows, batch_size=256, seed=0)
"""

from seqcompress_jax.data.config import data_config
from seqcompress_jax.data.dataset import PAD, Dataset
from seqcompress_jax.data.interactions import DataError, Interactions
from seqcompress_jax.data.load import load_dataset

__all__ = ['PAD', 'DataError', 'Dataset', 'Interactions', 'data_config', 'load_dataset']
