r"""NABirds (555 classes), released recipe (ViT-B/32, M=4 concepts, 64 bits).

  concepthash-train --config=nabirds --workdir=runs/nabirds \
    --config.data.root=/data/nabirds
  concepthash-train --config=nabirds:nbit=16 ...

data.root holds images/ and the CUB-like text files plus hierarchy.txt.
Paper mAP@R (%): 76.41 / 81.28 / 82.16 at 16 / 32 / 64 bits (24,633 queries,
23,929-image database).
"""
from concepthash_jax.configs import base


def get_config(arg=None):
  """NABirds config; `arg` may set nbit (e.g. 'nbit=32')."""
  # A manual download; no TFDS builder.
  return base.dataset_config(arg, name='nabirds', source='folders',
                             tfds_name='')
