"""Datasets and input pipeline: `build` picks a source, `batches` feeds the model.

  train = data.build(config.data, 'train')   # the retrieval database too
  test = data.build(config.data, 'test')     # the queries
  for batch in data.batches(train, config.data, train=True, batch_size=32,
                            seed=0, epoch=0, drop_remainder=True): ...

Sources (config `data.source`): 'synthetic' (built in, offline), 'tfds'
(`data.tfds_name` through tfds.data_source) and 'folders' (`data.name`'s
official layout under `data.root`). Every source returns the record and
attributes described in `core.Dataset`.
"""
from concepthash_jax.data import core
from concepthash_jax.data import pipeline
from concepthash_jax.data import transforms
from concepthash_jax.data.core import CorruptImageError
from concepthash_jax.data.core import Dataset
from concepthash_jax.data.pipeline import batches
from concepthash_jax.data.pipeline import num_batches

SPLITS = ('train', 'test')


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
  process = dict(process_index=process_index, process_count=process_count)
  if data_cfg.source == 'synthetic':
    from concepthash_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    return synthetic.SyntheticDataset(data_cfg.synthetic, split, **process)
  if data_cfg.source == 'tfds':
    from concepthash_jax.data import tfds  # pylint: disable=g-import-not-at-top
    return tfds.build(data_cfg, split, **process)
  if data_cfg.source == 'folders':
    from concepthash_jax.data import folders  # pylint: disable=g-import-not-at-top
    return folders.build(data_cfg, split, **process)
  raise ValueError(f"Unknown data.source {data_cfg.source!r}; valid: "
                   "'synthetic', 'tfds', 'folders'")
