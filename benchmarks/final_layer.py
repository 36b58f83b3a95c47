"""The final ViT layer on the concept tokens alone against every token, in one process.

  python benchmarks/final_layer.py --rounds=3

Builds the shipped train step and eval forward twice (configs/cub.py, random ViT-B/32
weights, batch 32): once with ConceptHash's default (the final layer computes CLS and the
M concept tokens only) and once with full_final_layer=True (every token, as the authors'
model). The four run interleaved, so a box whose speed drifts still gives fair ratios;
prints per-round seconds and the median speed-up of the default.
"""
import statistics

from absl import app
from absl import flags

import table  # benchmarks/table.py: print_table
import train_step  # benchmarks/train_step.py

FLAGS = flags.FLAGS
# --batch comes from train_step's flags.
flags.DEFINE_integer('rounds', 3, 'Timed rounds (after one warm-up round).')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'config.model.dtype.')


def main(argv):
  del argv
  from concepthash_jax import xla_flags  # pylint: disable=g-import-not-at-top
  from concepthash_jax.configs import cub  # pylint: disable=g-import-not-at-top
  xla_flags.configure_xla_flags(cub.get_config())  # As launch.py: before the backend.
  fns = {}
  for full in (True, False):
    train, evaluate, _ = train_step.build_ours(FLAGS.dtype, FLAGS.batch, 200, 'dots',
                                               full_final_layer=full)
    fns[('train', full)], fns[('eval', full)] = train, evaluate
  times = train_step.interleave(fns, FLAGS.rounds)
  train_step.print_step_heading(f'{FLAGS.dtype}, model.remat=dots, '
                                f'{FLAGS.rounds} interleaved rounds')
  rows = []
  for kind in ('train', 'eval'):
    full, alone = times[(kind, True)], times[(kind, False)]
    rows.append((kind, f'{statistics.median(full):.2f}', f'{statistics.median(alone):.2f}',
                 *train_step.speed_up(full, alone)))
  table.print_table(['step', 'every token s', 'concept tokens s', 'speed-up (median)',
                     'range'], rows)


if __name__ == '__main__':
  app.run(main)
