r"""CUB-200-2011 with the released recipe (ViT-B/32, M=4 concepts, 64 bits).

  concepthash-train --config=cub --workdir=runs/cub
  concepthash-train --config=cub:nbit=16 --workdir=runs/cub16
  # from the official folder instead of TFDS:
  concepthash-train --config=cub --workdir=runs/cub \
    --config.data.source=folders --config.data.root=/data/CUB_200_2011

Paper mAP@R (%): 83.45 / 85.27 / 85.50 at 16 / 32 / 64 bits (5,794 queries
against the 5,994-image train database).
"""
from concepthash_jax.configs import base


def get_config(arg=None):
  """CUB config; `arg` may set nbit (e.g. 'nbit=32')."""
  # TFDS caltech_birds2011 downloads itself.
  return base.dataset_config(arg, name='cub', source='tfds',
                             tfds_name='caltech_birds2011')
