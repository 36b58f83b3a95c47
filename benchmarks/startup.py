"""Time to the first train step, with the persistent compilation cache cold and warm.

  python -m benchmarks.startup                 # ViT-B/32, batch 32, float32, 2 warm runs
  python -m benchmarks.startup --dtype=bfloat16 --warm_runs=1

Every row is a fresh process on the shipped path (configs/cub.py, random ViT-B/32
weights, train.create_train_state, train.jit_train_step, encoding.jitted_encode_step),
as a resumed run or a second run of the same config starts. The first row finds an
empty cache folder (a new machine, or a config never run before); the next ones find
what it wrote. The folder is set the way `concepthash-train` sets it
(xla_flags.configure_compilation_cache with config.train.compilation_cache_dir), a new
temporary one per invocation, removed at the end. Prints a markdown table in seconds.
"""
import os
import shutil
import tempfile
import time

from absl import app
from absl import flags

from benchmarks import child
from benchmarks import table
from benchmarks import train_step  # Defines --batch.

FLAGS = flags.FLAGS
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'config.model.dtype.')
flags.DEFINE_integer('warm_runs', 2, 'Processes started after the cold one.')
flags.DEFINE_string('child_cache', None, 'Internal: cache folder of one child run.')

# The parts of a start, in order, as build_ours reports them (seconds).
PARTS = ('clip_init_s', 'state_init_s', 'train_compile_s', 'eval_compile_s')


def run_child(cache_dir: str) -> dict:
  """One start in this process: each part's seconds and the first step's."""
  import jax  # pylint: disable=g-import-not-at-top
  from concepthash_jax import xla_flags  # pylint: disable=g-import-not-at-top
  from concepthash_jax.configs import cub  # pylint: disable=g-import-not-at-top

  config = cub.get_config()
  config.train.compilation_cache_dir = cache_dir
  xla_flags.configure_xla_flags(config)  # As concepthash-train: before the backend.
  xla_flags.configure_compilation_cache(config)
  train, _, info = train_step.build_ours(FLAGS.dtype, FLAGS.batch, 200, 'dots')
  t0 = time.perf_counter()
  train()
  first_step_s = time.perf_counter() - t0
  return dict(first_step_s=first_step_s, backend=jax.default_backend(),
              **{k: info[k] for k in PARTS})


def main(argv):
  del argv
  if FLAGS.child_cache:
    child.print_json(run_child(FLAGS.child_cache))
    return
  cache_dir = tempfile.mkdtemp(prefix='concepthash-startup-')
  try:
    rows = []
    for run in range(1 + FLAGS.warm_runs):
      t0 = time.perf_counter()
      rows.append(child.run_json(child.module_command(
          __spec__.name, f'--child_cache={cache_dir}', f'--dtype={FLAGS.dtype}',
          f'--batch={FLAGS.batch}')))
      # Interpreter start, imports, every part, the first step and the exit.
      rows[-1]['process_s'] = time.perf_counter() - t0
      rows[-1]['run'] = 'cold' if not run else f'warm {run}'
    # The programs sit in the machine's subfolder (xla_flags.host_key).
    cache_mb = sum(os.path.getsize(os.path.join(where, n))
                   for where, _, names in os.walk(cache_dir) for n in names) / 2**20
  finally:
    shutil.rmtree(cache_dir, ignore_errors=True)
  print(train_step.cpu_line())
  print(f'ViT-B/32 ConceptHash, batch {FLAGS.batch}, {FLAGS.dtype}, random weights, '
        f'{rows[0]["backend"]}; cache folder at the end: {cache_mb:.1f} MB\n')
  table.print_table(
      ['run', 'CLIP init s', 'state init s', 'train compile s', 'eval compile s',
       'first step s', 'whole process s'],
      [[r['run']] + [f'{r[k]:.1f}' for k in PARTS]
       + [f'{r["first_step_s"]:.1f}', f'{r["process_s"]:.1f}'] for r in rows])


if __name__ == '__main__':
  app.run(main)
