"""Datasets and input pipeline: `build` picks a source, `batches` feeds the model.

  train = data.build(config.data, 'train')   # the retrieval database too
  test = data.build(config.data, 'test')     # the queries
  for batch in data.batches(test, config.data, train=False, batch_size=32,
                            seed=0, epoch=0, drop_remainder=False): ...
  # Training: steps 1..1000 across epochs, workers started once.
  for batch in data.train_batches(train, config.data, batch_size=32, seed=0,
                                  start_step=0, stop_step=1000): ...

Sources (config `data.source`, the `SOURCES` registry): 'synthetic' (built
in, offline), 'tfds' (`data.tfds_name` through tfds.data_source) and 'folders'
(`data.name`'s official layout under `data.root`, `folders.LOADERS`). Every
source returns the record and attributes described in `core.Dataset`.
"""
import importlib

from concepthash_jax.data import core
from concepthash_jax.data import folders
from concepthash_jax.data import pipeline
from concepthash_jax.data import transforms
from concepthash_jax.data.core import CorruptImageError
from concepthash_jax.data.core import Dataset
from concepthash_jax.data.pipeline import batches
from concepthash_jax.data.pipeline import num_batches
from concepthash_jax.data.pipeline import train_batches

SPLITS = core.SPLITS
# data.source -> the module whose `build(data_cfg, split, *, process_index,
# process_count)` reads it; imported on first use (tfds is slow to import).
SOURCES = {'synthetic': 'synthetic', 'tfds': 'tfds', 'folders': 'folders'}
# data.name values: the built-in synthetic set and every official layout.
DATASETS = ('synthetic',) + tuple(folders.LOADERS)


def build(data_cfg, split, *, process_index=0, process_count=1):
  """Builds one split of the configured dataset.

  Args:
    data_cfg: config `data` (source, name, root, tfds_name, tfds_data_dir,
      on_corrupt, synthetic).
    split: 'train' (training set = retrieval database, as the official code)
      or 'test' (queries).
    process_index: this process's index (jax.process_index()).
    process_count: number of processes (jax.process_count()).

  Returns:
    A core.Dataset: len() is the whole split; ds[i] -> {'image': uint8
    (H, W, 3), 'label': int, ['keypoints': float32 (P, 3)]}; attributes
    class_names, family_of, family_names, part_names, labels, skipped.
  """
  if split not in SPLITS:
    raise ValueError(f'Unknown split {split!r}; valid: {SPLITS}')
  if data_cfg.source not in SOURCES:
    raise ValueError(f'Unknown data.source {data_cfg.source!r}; valid: '
                     f'{list(SOURCES)}')
  source = importlib.import_module(
      f'concepthash_jax.data.{SOURCES[data_cfg.source]}')
  return source.build(data_cfg, split, process_index=process_index,
                      process_count=process_count)
