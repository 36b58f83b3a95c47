r"""Trains and evaluates ConceptHash from a checkout: `concepthash-train` by path.

  python launch.py --config=configs/synthetic.py --workdir=runs/synthetic

The same program as the `concepthash-train` console script
(concepthash_jax/tools/train.py); `python launch.py --help` lists the configs.
"""
from concepthash_jax.tools import train

if __name__ == '__main__':
  train.run()
