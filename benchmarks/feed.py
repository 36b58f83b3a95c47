"""Does the input pipeline keep the accelerator busy? The training loop's feed, timed.

  python -m benchmarks.feed --batch=256 --workers=16,8 --dtype=bfloat16     # GPU host
  python -m benchmarks.feed --batch=8 --workers=2 --images=64 --epochs=1    # smoke run

Writes `--images` CUB-sized JPEGs (input_pipeline.write_cub), compiles the shipped train
step for the uint8 batches `data.batches` ships (configs/cub.py, random ViT-B/32
weights), builds the first-stage cache once (timed), then for every worker setting:
  step alone      the compiled step on one batch already on the device: the ceiling;
  pipeline alone  data.train_batches (train transform, released augmentation; one
                  iterator for all the epochs, as training) on the host, nothing else;
  fed             the training loop's own feed (train._train_batches:
                  data.train_batches -> sharding.global_batch) into the step, as
                  train_and_evaluate runs it.
busy = fed / step alone: the share of the step's rate that the pipeline lets through
(1.0: the accelerator never waits for data).
"""
import json
import os
import tempfile
import time

from absl import app
from absl import flags

from benchmarks import input_pipeline
from benchmarks import table
from benchmarks import train_step

FLAGS = flags.FLAGS
# --batch comes from train_step's flags.
flags.DEFINE_integer('images', 4096, 'JPEGs written (all in the train split).')
flags.DEFINE_integer('epochs', 3, 'Timed epochs per measurement.')
flags.DEFINE_list('workers', ['16'], 'data.num_workers settings.')
flags.DEFINE_list('worker_types', ['thread', 'process'], 'data.worker_type settings.')
flags.DEFINE_enum('dtype', 'bfloat16', ['float32', 'bfloat16'], 'config.model.dtype.')
flags.DEFINE_string('data', '', 'Folder for the JPEGs and the cache (default: temporary).')
flags.DEFINE_string('out', '', 'JSON-lines file the rows are appended to.')


def rate(fn, images: int) -> float:
  start = time.perf_counter()
  fn()
  return images / (time.perf_counter() - start)


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  from concepthash_jax import data, train, xla_flags  # pylint: disable=g-import-not-at-top
  from concepthash_jax.configs import cub  # pylint: disable=g-import-not-at-top
  xla_flags.configure_xla_flags(cub.get_config())  # As launch.py: before the backend.

  root = FLAGS.data or tempfile.mkdtemp(prefix='feed_')
  start = time.perf_counter()
  input_pipeline.write_cub(root, FLAGS.images)
  print(f'{FLAGS.images} JPEGs in {time.perf_counter() - start:.0f} s', flush=True)
  train_once, _, info = train_step.build_ours(FLAGS.dtype, FLAGS.batch, 200, 'dots',
                                              uint8_images=True)
  config, mesh, state, step_fn = (info[k] for k in ('config', 'mesh', 'state', 'step_fn'))
  config.data.update(dict(source='folders', name='cub', root=root, cache=True,
                          cache_dir=os.path.join(root, 'cache')))
  ds = data.build(config.data, 'train')
  per_epoch = len(ds) // FLAGS.batch
  timed = FLAGS.epochs * per_epoch * FLAGS.batch

  def pipeline_alone():
    for _ in data.train_batches(ds, config.data, batch_size=FLAGS.batch, seed=0,
                                start_step=0, stop_step=FLAGS.epochs * per_epoch):
      pass

  def step_alone():
    for _ in range(FLAGS.epochs * per_epoch):
      metrics = train_once()
    jax.block_until_ready(metrics)

  def fed():
    for batch in train._train_batches(ds, config, mesh, start_step=0,  # pylint: disable=protected-access
                                      stop_step=FLAGS.epochs * per_epoch):
      state[0], metrics = step_fn(state[0], batch)
    jax.block_until_ready(metrics)

  rows = []
  start = time.perf_counter()
  config.data.num_workers = int(FLAGS.workers[0])
  first = data.batches(ds, config.data, train=True, batch_size=FLAGS.batch, seed=0,
                       epoch=0, drop_remainder=True)  # Builds the cache.
  next(first)
  first.close()  # Its workers would otherwise prefetch on into the timed figures.
  print(f'cache build: {time.perf_counter() - start:.1f} s', flush=True)
  for worker_type in FLAGS.worker_types:
    for workers in (int(w) for w in FLAGS.workers):
      config.data.update(dict(num_workers=workers, worker_type=worker_type))
      # Warm-up: page cache, the step's first runs. Each timed figure still
      # includes one worker start-up, as a run does.
      fed()
      row = dict(worker_type=worker_type, workers=workers,
                 pipeline_img_s=rate(pipeline_alone, timed),
                 step_img_s=rate(step_alone, timed), fed_img_s=rate(fed, timed))
      row['busy'] = row['fed_img_s'] / row['step_img_s']
      rows.append(row)
      if FLAGS.out:
        with open(FLAGS.out, 'a') as f:
          f.write(json.dumps(dict(row, batch=FLAGS.batch, dtype=FLAGS.dtype)) + '\n')
      print(row, flush=True)

  print(f'\n{train_step.cpu_line()}; {jax.devices()[0].device_kind} x{jax.device_count()}; '
        f'{FLAGS.images} JPEGs 500x375, batch {FLAGS.batch}, model.dtype={FLAGS.dtype}, '
        f'{FLAGS.epochs} epochs ({timed} images) per figure, cache on\n')
  table.print_table(
      ['worker type', 'workers', 'pipeline alone img/s', 'step alone img/s', 'fed img/s',
       'busy'],
      [(r['worker_type'], r['workers'], f'{r["pipeline_img_s"]:.0f}',
        f'{r["step_img_s"]:.0f}', f'{r["fed_img_s"]:.0f}', f'{r["busy"]:.2f}')
       for r in rows])


if __name__ == '__main__':
  app.run(main)
