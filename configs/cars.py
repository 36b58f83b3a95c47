"""Stanford Cars with the released recipe (ViT-B/32, M=4 concepts, 64 bits).

  python launch.py --config=configs/cars.py --workdir=runs/cars \
    --config.data.root=/data/stanford_cars
  python launch.py --config=configs/cars.py:nbit=16 ...

data.root holds cars_train/, cars_test/, devkit/cars_{train_annos,meta}.mat and
cars_test_annos_withlabels.mat (TFDS cars196 cannot download any more).
Paper mAP@R (%): 91.70 / 92.60 / 93.01 at 16 / 32 / 64 bits (8,041 queries,
8,144-image database).
"""
from configs import base
from configs import common


def get_config(arg=None):
  """Cars config; `arg` may set nbit (e.g. 'nbit=32')."""
  args = common.parse_arg(arg, nbit=64)
  config = base.get_config()
  config.model.nbit = args.nbit
  config.data.name = 'cars'
  config.data.source = 'folders'  # Manual download; see the docstring.
  config.data.tfds_name = 'cars196'  # Used only with data.source=tfds.
  return config
