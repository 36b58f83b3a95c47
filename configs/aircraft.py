"""FGVC-Aircraft (variant level, 100 classes), released recipe (ViT-B/32, M=4, 64 bits).

  python launch.py --config=configs/aircraft.py --workdir=runs/aircraft \
    --config.data.root=/data/fgvc-aircraft-2013b
  python launch.py --config=configs/aircraft.py:nbit=16 ...

data.root is the extracted fgvc-aircraft-2013b/ (data/images, variants.txt,
images_variant_{trainval,test}.txt). Paper mAP@R (%): 82.76 / 83.54 / 84.05
at 16 / 32 / 64 bits (3,333 queries, 6,667-image database).
"""
from configs import base
from configs import common


def get_config(arg=None):
  """Aircraft config; `arg` may set nbit (e.g. 'nbit=32')."""
  args = common.parse_arg(arg, nbit=64)
  config = base.get_config()
  config.model.nbit = args.nbit
  config.data.name = 'aircraft'
  config.data.source = 'folders'  # No usable TFDS builder.
  config.data.tfds_name = ''
  return config
