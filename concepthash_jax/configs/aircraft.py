r"""FGVC-Aircraft (variant level, 100 classes), released recipe (ViT-B/32, M=4, 64 bits).

  concepthash-train --config=aircraft --workdir=runs/aircraft \
    --config.data.root=/data/fgvc-aircraft-2013b
  concepthash-train --config=aircraft:nbit=16 ...

data.root is the extracted fgvc-aircraft-2013b/ (data/images, variants.txt,
images_variant_{trainval,test}.txt). Paper mAP@R (%): 82.76 / 83.54 / 84.05
at 16 / 32 / 64 bits (3,333 queries, 6,667-image database).
"""
from concepthash_jax.configs import base


def get_config(arg=None):
  """Aircraft config; `arg` may set nbit (e.g. 'nbit=32')."""
  # No usable TFDS builder.
  return base.dataset_config(arg, name='aircraft', source='folders',
                             tfds_name='')
