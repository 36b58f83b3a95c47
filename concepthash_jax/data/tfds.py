"""TFDS datasets read through `tfds.data_source` (array_record; no TensorFlow needed to read).

Splits: 'train' -> TFDS 'train' (the retrieval database), 'test' -> TFDS
'test' (the queries). caltech_birds2011 (5,994 / 5,794) downloads and prepares
itself, but its preparation code calls tf.io.gfile, so preparing (once) needs
TensorFlow installed; reading afterwards does not. cars196 cannot be prepared
any more (its download URL is gone upstream): use data.source=folders.

Class names come from the dataset itself: the ClassLabel names when it has
them (cars196), else the records' `label_name` field (caltech_birds2011, whose
ClassLabel is unnamed; there the names are lower case, e.g.
'black_footed_albatross'). Reading every label once at build also gives
`labels`, decoding no image.

Testing without TensorFlow: `tfds.testing.mock_data(policy=MockPolicy.USE_CODE)`
feeds fake records through `data_source` (AUTO also works when no metadata is
on disk); a builder whose examples carry encoded image bytes can even be
prepared to array_record without TensorFlow (tests/test_data.py does both).
"""
import os

import numpy as np
import tensorflow_datasets as tfds

from concepthash_jax.data import core

_SPLITS = {'train': 'train', 'test': 'test'}
_GONE_UPSTREAM = {
    'cars196': ('TFDS cars196 cannot be prepared: its download URL is gone '
                'upstream. Download Stanford Cars by hand (cars_train/, '
                'cars_test/, devkit/, cars_test_annos_withlabels.mat) and use '
                'data.source=folders data.root=<that folder> data.name=cars.'),
}
# Family = one word of the class name, per dataset.
_NAME = {'caltech_birds2011': 'cub', 'cars196': 'cars'}


class TfdsDataset(core.Dataset):
  """A TFDS split as an array_record data source (picklable for workers)."""

  def __init__(self, source, *, source_files=(), **metadata):
    super().__init__(**metadata)
    self.source = source
    # The split's array_record shards: data/cache.py keys its cache on them.
    self.source_files = list(source_files)

  def _load(self, index):
    example = self.source[index]
    image = np.asarray(example['image'])
    if image.ndim == 2 or image.shape[-1] == 1:  # Grayscale stored as such.
      image = np.repeat(image.reshape(image.shape[0], image.shape[1], 1), 3, -1)
    return {'image': image.astype(np.uint8), 'label': int(example['label'])}


def _prepared_builder(name, data_dir):
  """The dataset's builder, downloading and preparing it if needed."""
  builder = tfds.builder(name, data_dir=data_dir,
                         file_format='array_record')
  if builder.is_prepared():
    return builder
  if name in _GONE_UPSTREAM:
    raise FileNotFoundError(f'{_GONE_UPSTREAM[name]} (looked in '
                            f'{builder.data_dir})')
  try:
    builder.download_and_prepare()
  except ModuleNotFoundError as e:
    raise RuntimeError(
        f'Preparing TFDS {name} in {builder.data_dir} failed ({e}). Its '
        'preparation code needs TensorFlow once: `pip install tensorflow && '
        f'tfds build {name} --file_format=array_record` (reading afterwards '
        'needs no TensorFlow), or use data.source=folders.') from e
  return builder


def _labels_and_names(builder, split, features):
  """Reads every label (and label_name) of a split without decoding images."""
  skip = {key: tfds.decode.SkipDecoding() for key, feature in features.items()
          if key not in ('label', 'label_name') and isinstance(
              feature, (tfds.features.Image, tfds.features.Tensor))}
  source = builder.as_data_source(split=split, decoders=skip)
  if isinstance(getattr(source, 'data_source', None),
                tfds.testing.PickableDataSourceMock):
    # Under tfds.testing.mock_data, skipped features are re-encoded from fake
    # values (with TensorFlow); decoded fake records give the labels. Real
    # array_record files need no TensorFlow here.
    source = builder.as_data_source(split=split)
  return _read_labels(source)


def _read_labels(source):
  """(int64 (N,) labels, {label: name}) of every record of `source`."""
  labels, names = [], {}
  for index in range(len(source)):
    example = source[index]
    label = int(example['label'])
    labels.append(label)
    if 'label_name' in example and label not in names:
      name = example['label_name']
      names[label] = name.decode() if isinstance(name, bytes) else str(name)
  return np.asarray(labels, np.int64), names


def _split_files(builder, split):
  """The split's shard paths ([] when none are on disk, e.g. mock data)."""
  try:
    return [os.fspath(f) for f in builder.info.splits[split].filepaths]
  except KeyError:
    return []


def build(data_cfg, split, *, process_index=0, process_count=1):
  """Builds the TFDS split `split` of `data_cfg.tfds_name`."""
  core.check_split(split)
  name = data_cfg.tfds_name
  if not name:
    raise ValueError('data.source=tfds needs data.tfds_name')
  builder = _prepared_builder(name, data_cfg.tfds_data_dir or None)
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise ValueError(
        f'TFDS {name} in {builder.data_dir} is stored as '
        f'{builder.info.file_format}; tfds.data_source needs array_record: '
        f'tfds build {name} --file_format=array_record')
  features = builder.info.features
  label_feature = features['label']
  labels, label_names = _labels_and_names(builder, _SPLITS[split], features)
  class_names = list(label_feature.names)
  if all(n == str(i) for i, n in enumerate(class_names)) and label_names:
    # Unnamed ClassLabel: take names from the records; the train split has
    # every class, so both splits share it.
    if split != 'train':
      _, label_names = _labels_and_names(builder, _SPLITS['train'], features)
    class_names = [label_names.get(i, str(i)) for i in range(len(class_names))]
  family_of, family_names = core.families_by_name(_NAME.get(name, name),
                                                  class_names)
  return TfdsDataset(
      builder.as_data_source(split=_SPLITS[split]),
      source_files=_split_files(builder, _SPLITS[split]),
      name=_NAME.get(name, name), split=split, labels=labels,
      class_names=class_names, family_of=family_of, family_names=family_names,
      process_index=process_index, process_count=process_count)
