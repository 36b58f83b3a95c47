"""XLA:CPU matmul libraries (train.cpu_matmul) side by side, in one process.

  python benchmarks/cpu_matmul.py                 # the step's matmul shapes, GFLOP/s
  python benchmarks/cpu_matmul.py --step --dtypes=float32,bfloat16 --rounds=3   # whole step

XLA reads most flags once per process, but the YNN fusion switch behind
train.cpu_matmul is also honoured per compile (`compiler_options`), so every library
is compiled here and the timings interleave: each round times every library once, and
the medians compare measurements minutes, not hours, apart. With torch importable
(benchmarks only), the shapes table adds PyTorch's matmul on the same arrays.
"""
import os
import statistics
import sys

from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

import table  # pylint: disable=g-import-not-at-top,wrong-import-position
# train_step defines --batch, --num_classes, --remat and --dtypes (step mode's
# config.model.dtype values); it starts no backend on import.
import train_step as step_bench  # pylint: disable=g-import-not-at-top,wrong-import-position
from concepthash_jax import xla_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_bool('step', False, 'Time the whole train step and eval forward instead.')
flags.DEFINE_integer('rounds', 8, 'Timed rounds (after one warm-up round).')

# compiler_options per library. 'onednn' is XLA's oneDNN matmul path, measured for
# reference (not a train.cpu_matmul choice: it did not beat Eigen).
LIBRARIES = {
    **xla_flags.CPU_MATMUL_OPTIONS,
    'onednn': {'xla_cpu_experimental_ynn_fusion_type': '', 'xla_cpu_use_onednn': True},
}
# The ViT-B/32 step's weight matmuls at batch 32 (1728 = 32 x 54 tokens):
# (name, lhs shape, rhs shape, contracting dims (lhs, rhs)).
SHAPES = [
    ('x @ W, 768 -> 768', (1728, 768), (768, 768), (1, 0)),
    ('x @ W, 768 -> 3072', (1728, 768), (768, 3072), (1, 0)),
    ('x @ W, 3072 -> 768', (1728, 3072), (3072, 768), (1, 0)),
    ('g @ W^T, 768 <- 768', (1728, 768), (768, 768), (1, 1)),
    ('g @ W^T, 768 <- 3072', (1728, 3072), (768, 3072), (1, 1)),
    ('g @ W^T, 3072 <- 768', (1728, 768), (3072, 768), (1, 1)),
    ('x^T @ g, adapter 768 x 384', (1728, 768), (1728, 384), (0, 0)),
]


def medians(fns: dict, rounds: int) -> dict:
  """{name: median seconds} over interleaved rounds."""
  return {k: statistics.median(v) for k, v in step_bench.interleave(fns, rounds).items()}


def shapes_table():
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  try:
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(os.cpu_count())
  except ImportError:
    torch = None
  rng = np.random.default_rng(0)
  cols = list(LIBRARIES) + (['PyTorch'] if torch else [])
  # Each row prints as soon as its product is timed.
  table.print_header(['product'] + [f'{c} GFLOP/s' for c in cols])
  for name, ls, rs, (lc, rc) in SHAPES:
    a, b = rng.normal(size=ls).astype('f4'), rng.normal(size=rs).astype('f4')
    ja, jb = jax.numpy.asarray(a), jax.numpy.asarray(b)
    dot = jax.jit(lambda x, y, lc=lc, rc=rc: jax.lax.dot_general(
        x, y, (((lc,), (rc,)), ((), ()))))
    fns = {}
    for lib, opts in LIBRARIES.items():
      compiled = dot.lower(ja, jb).compile(compiler_options=opts)
      fns[lib] = lambda c=compiled: jax.block_until_ready(c(ja, jb))
    if torch:
      ta, tb = torch.from_numpy(a), torch.from_numpy(b)
      tl, tr = (ta if lc == 1 else ta.t()), (tb if rc == 0 else tb.t())
      fns['PyTorch'] = lambda: torch.matmul(tl, tr)
    median = medians(fns, FLAGS.rounds)
    flop = 2 * np.prod(ls) * rs[1 - rc]
    table.print_row([name] + [f'{flop / median[c] / 1e9:.0f}' for c in cols])


def step_table():
  from concepthash_jax.configs import cub  # pylint: disable=g-import-not-at-top
  xla_flags.configure_xla_flags(cub.get_config())
  fns = {}
  for dtype in FLAGS.dtypes:
    for lib in ('ynnpack', 'eigen'):
      train, encode, _ = step_bench.build_ours(dtype, FLAGS.batch, FLAGS.num_classes,
                                               FLAGS.remat, lib)
      fns[(dtype, lib, 'train')], fns[(dtype, lib, 'eval')] = train, encode
  median = medians(fns, FLAGS.rounds)
  base = {s: median[(FLAGS.dtypes[0], 'ynnpack', s)] for s in ('train', 'eval')}
  print(f'batch {FLAGS.batch}, {FLAGS.rounds} interleaved rounds; x = against '
        f'{FLAGS.dtypes[0]} ynnpack\n')
  rows = []
  for dtype in FLAGS.dtypes:
    for lib in ('ynnpack', 'eigen'):
      t, e = median[(dtype, lib, 'train')], median[(dtype, lib, 'eval')]
      rows.append((dtype, lib, f'{FLAGS.batch / t:.2f}', f'{base["train"] / t:.2f}',
                   f'{FLAGS.batch / e:.2f}', f'{base["eval"] / e:.2f}'))
  table.print_table(['model.dtype', 'library', 'train img/s', 'x', 'eval img/s', 'x'], rows)


def main(argv):
  del argv
  print(step_bench.cpu_line() + '\n')
  if FLAGS.step:
    step_table()
  else:
    shapes_table()


if __name__ == '__main__':
  app.run(main)
