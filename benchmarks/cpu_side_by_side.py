"""Ours against the authors' PyTorch step, interleaved in one process on one CPU.

  pip install -e . torch transformers    # one environment with both (benchmarks only)
  python benchmarks/cpu_side_by_side.py --rounds=6
  python benchmarks/cpu_side_by_side.py --isa=AVX2   # emulate an AVX2-only CPU, both sides

Timing the two frameworks in separate processes minutes apart mixes the speed of the code
with the speed of the box at that moment (a shared VM drifts by 20-40 % from minute to
minute). Here both steps live in one process and alternate step by step: round r times
ours train, theirs train, ours eval, theirs eval. Each round gives a ratio from adjacent
measurements; the table reports medians, and the ratio's range over rounds.

`--isa=AVX2` caps both sides before either starts: XLA with --xla_cpu_max_isa=AVX2, PyTorch
with ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2 and MKL_ENABLE_INSTRUCTIONS=AVX2
(MKL runs PyTorch's fp32 matmuls and ignores the oneDNN cap). Label such figures emulated.
Peak memory is not reported (one process holds both); train_step.py and
pytorch_reference_step.py measure it alone.

The train step runs at --batch. The eval forward runs at every batch in --eval_batches,
on both sides. Two of them are the batches each code base ships for encoding a dataset:
the authors' test and database loaders take their config.batch_size (32), ours
data.eval_batch_size (128). When both are listed, a last row compares each side at its
own batch, in images per second: what a user of either code base gets.
"""
import os
import statistics
import sys

from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

# train_step defines --batch, --num_classes and --remat (used here for both sides); it
# imports jax without starting a backend, so the XLA_FLAGS set in main() still apply.
import train_step as ours_bench  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytorch_reference_step as ref_bench  # pylint: disable=g-import-not-at-top,wrong-import-position
import table  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_integer('rounds', 6, 'Timed rounds (after one warm-up round).')
flags.DEFINE_enum('isa', 'native', ['native', 'AVX2'], 'Instruction-set cap, both sides.')
flags.DEFINE_enum('ours_dtype', 'float32', ['float32', 'bfloat16'],
                  'Ours: config.model.dtype (the authors\' step stays float32).')
flags.DEFINE_list('eval_batches', ['32', '128'],
                  'Batch sizes of the eval forward, each timed on both sides.')

# Environment each side reads once, when its library initialises.
ISA_ENV = {'AVX2': {'ATEN_CPU_CAPABILITY': 'avx2', 'ONEDNN_MAX_CPU_ISA': 'AVX2',
                    'MKL_ENABLE_INSTRUCTIONS': 'AVX2'}}
ISA_XLA_FLAG = {'AVX2': '--xla_cpu_max_isa=AVX2'}


def main(argv):
  del argv
  os.environ.update(ISA_ENV.get(FLAGS.isa, {}))
  if FLAGS.isa in ISA_XLA_FLAG:
    os.environ['XLA_FLAGS'] = ' '.join(
        [os.environ.get('XLA_FLAGS', ''), ISA_XLA_FLAG[FLAGS.isa]]).strip()
  from concepthash_jax import xla_flags  # pylint: disable=g-import-not-at-top
  from concepthash_jax.configs import cub  # pylint: disable=g-import-not-at-top
  xla_flags.configure_xla_flags(cub.get_config())

  eval_batches = [int(b) for b in FLAGS.eval_batches]
  steps, batches = {}, {}
  steps['ours train'], _, ours_info = ours_bench.build_ours(
      FLAGS.ours_dtype, FLAGS.batch, FLAGS.num_classes, FLAGS.remat)
  steps['theirs train'], _, info = ref_bench.build_reference(
      FLAGS.batch, FLAGS.num_classes, threads=os.cpu_count())
  batches['ours train'] = batches['theirs train'] = FLAGS.batch
  for b in eval_batches:
    steps[f'ours eval {b}'] = ours_info['eval_at'](b)
    steps[f'theirs eval {b}'] = info['eval_at'](b)
    batches[f'ours eval {b}'] = batches[f'theirs eval {b}'] = b
  times = ours_bench.interleave(steps, FLAGS.rounds)
  # Seconds per image, per round: sides at different batches compare per image.
  per_image = {k: [t / batches[k] for t in v] for k, v in times.items()}
  for r in range(FLAGS.rounds):
    print(f'round {r + 1}: ' + ', '.join(f'{k} {1 / per_image[k][r]:.2f}' for k in steps))

  print(f'\n{ours_bench.cpu_line()}\nISA: {FLAGS.isa}{" (emulated)" if FLAGS.isa != "native" else ""}, '
        f'ours {FLAGS.ours_dtype} / theirs float32, {FLAGS.rounds} interleaved rounds, '
        f'torch {info["torch"]} ({info["threads"]} threads), model.remat={FLAGS.remat}, '
        f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}\n')
  pairs = [('train', FLAGS.batch, 'ours train', 'theirs train')]
  pairs += [('eval', b, f'ours eval {b}', f'theirs eval {b}') for b in eval_batches]
  shipped = (cub.get_config().data.eval_batch_size, ref_bench.RELEASED_EVAL_BATCH)
  if shipped[0] != shipped[1] and set(shipped) <= set(eval_batches):
    pairs.append(('eval, each at its shipped batch', f'{shipped[0]} / {shipped[1]}',
                  f'ours eval {shipped[0]}', f'theirs eval {shipped[1]}'))
  rows = []
  for step, batch, ours, theirs in pairs:
    rows.append((step, batch, f'{statistics.median(1 / t for t in per_image[ours]):.2f}',
                 f'{statistics.median(1 / t for t in per_image[theirs]):.2f}',
                 *ours_bench.speed_up(per_image[theirs], per_image[ours])))
  table.print_table(['step', 'batch (ours / theirs)', 'ours img/s', "authors' PyTorch img/s",
                     'ratio (median)', 'ratio range'], rows)


if __name__ == '__main__':
  app.run(main)
