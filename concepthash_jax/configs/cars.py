r"""Stanford Cars with the released recipe (ViT-B/32, M=4 concepts, 64 bits).

  concepthash-train --config=cars --workdir=runs/cars \
    --config.data.root=/data/stanford_cars
  concepthash-train --config=cars:nbit=16 ...

data.root holds cars_train/, cars_test/, devkit/cars_{train_annos,meta}.mat and
cars_test_annos_withlabels.mat (TFDS cars196 cannot download any more).
Paper mAP@R (%): 91.70 / 92.60 / 93.01 at 16 / 32 / 64 bits (8,041 queries,
8,144-image database).
"""
from concepthash_jax.configs import base


def get_config(arg=None):
  """Cars config; `arg` may set nbit (e.g. 'nbit=32')."""
  # A manual download (see above); cars196 is used only with data.source=tfds.
  return base.dataset_config(arg, name='cars', source='folders',
                             tfds_name='cars196')
