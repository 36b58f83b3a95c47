"""One CPU as one JAX device or as several, the shipped step on each, in one process.

  python benchmarks/host_devices.py --devices=1,2 --rounds=16

XLA:CPU runs a batched product (the attention's q k^T and p v, 384 small products per
layer at batch 32), a reduce-window and every fusion it does not split on one core; only
the weight products and the large elementwise fusions use every core. With
`--xla_force_host_platform_device_count=N` the CPU becomes N devices, and a mesh over
them runs N copies of the program, each on its share of the batch, side by side: those
single-core ops then run N at a time. The price is a copy of every replicated buffer
(the frozen CLIP, the trainable params and their momentum) per device. This script
builds the shipped train step and eval forward (configs/cub.py, random ViT-B/32, float32)
on a mesh of each size in `--devices`, alternates them, and prints per-round medians,
the speed-up over the first size and XLA's planned memory (arguments + temporaries, all
devices together). A user chooses the split with XLA_FLAGS; nothing in the package sets it.
"""
import os
import statistics

from absl import app
from absl import flags

import table  # benchmarks/table.py: print_table
import train_step  # benchmarks/train_step.py: build_ours, interleave, cpu_line; --batch

FLAGS = flags.FLAGS
flags.DEFINE_list('devices', ['1', '2'], 'Mesh sizes to compare; the first is the base.')
flags.DEFINE_integer('rounds', 8, 'Timed rounds (after one warm-up round).')

_GB = 2 ** 30


def planned_gb(compiled, devices: int) -> float:
  """XLA's planned arguments + temporaries of `compiled`, summed over its devices."""
  analysis = compiled.memory_analysis()
  return devices * (analysis.argument_size_in_bytes + analysis.temp_size_in_bytes) / _GB


def main(argv):
  del argv
  sizes = [int(n) for n in FLAGS.devices]
  # Before the backend starts: XLA reads the device count once.
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={max(sizes)}')
  import jax  # pylint: disable=g-import-not-at-top
  from concepthash_jax import xla_flags  # pylint: disable=g-import-not-at-top
  from concepthash_jax.configs import cub  # pylint: disable=g-import-not-at-top
  xla_flags.configure_xla_flags(cub.get_config())  # As launch.py.
  fns, memory = {}, {}
  for n in sizes:
    train, evaluate, _ = train_step.build_ours('float32', FLAGS.batch, 200, 'dots',
                                               devices=jax.devices()[:n])
    fns[('train', n)], fns[('eval', n)] = train, evaluate
    memory[('train', n)] = planned_gb(train.compiled, n)
    memory[('eval', n)] = planned_gb(evaluate.compiled, n)
  times = train_step.interleave(fns, FLAGS.rounds)
  train_step.print_step_heading(f'float32, model.remat=dots, train.cpu_matmul=auto, '
                                f'{FLAGS.rounds} interleaved rounds')
  rows = []
  for kind in ('train', 'eval'):
    for n in sizes:
      rows.append((kind, n, f'{FLAGS.batch / statistics.median(times[(kind, n)]):.2f}',
                   *train_step.speed_up(times[(kind, sizes[0])], times[(kind, n)]),
                   f'{memory[(kind, n)]:.2f}'))
  table.print_table(['step', 'devices', 'img/s (median)', f'speed-up over {sizes[0]}',
                     'range', 'XLA planned GB'], rows)


if __name__ == '__main__':
  app.run(main)
