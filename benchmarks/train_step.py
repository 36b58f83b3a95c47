"""Train-step and eval-forward throughput of the shipped step, plus peak RSS.

  python -m benchmarks.train_step                  # ViT-B/32, batch 32, 224 px, fp32 + bf16
  python -m benchmarks.train_step --dtypes=float32 --steps=5

Each setting runs in its own process (so peak RSS is that setting's alone) and
uses the real path: configs/cub.py with random B/32 weights
(model.clip='random'), train.create_train_state and train.jit_train_step for
training, encoding.jitted_encode_step for the eval forward. Prints a markdown table.
"""
import os
import resource
import statistics
import time

from absl import app
from absl import flags

from benchmarks import child
from benchmarks import table
# Imports jax but starts no backend, so XLA_FLAGS set later still apply.
from concepthash_jax import xla_flags
from concepthash_jax.models import clip

FLAGS = flags.FLAGS
flags.DEFINE_list('dtypes', ['float32', 'bfloat16'], 'Compute dtypes to run.')
flags.DEFINE_integer('batch', 32, 'Global batch size.')
flags.DEFINE_integer('steps', 8, 'Timed train steps (after 2 warm-up steps).')
flags.DEFINE_integer('eval_steps', 8, 'Timed eval forwards (after 1 warm-up).')
flags.DEFINE_integer('num_classes', 200, 'Classes (CUB: 200).')
flags.DEFINE_enum('remat', 'dots', list(clip.REMAT_POLICIES),
                  'config.model.remat: activations kept for backward.')
flags.DEFINE_bool('cpu_concurrency_scheduler', False,
                  'config.train.cpu_concurrency_scheduler (XLA:CPU).')
flags.DEFINE_enum('cpu_matmul', 'auto', list(xla_flags.CPU_MATMUL),
                  'config.train.cpu_matmul (XLA:CPU matmul library).')
# On GPUs XLA's default precision lets float32 products use TF32; 'highest' keeps them
# float32 throughout (XLA:CPU computes float32 either way).
flags.DEFINE_enum('matmul_precision', 'default', ['default', 'high', 'highest'],
                  'jax_default_matmul_precision for float32 products.')
flags.DEFINE_string('child', None, 'Internal: run one dtype and print JSON.')


def cpu_line(prefixes=('avx', 'amx', 'fma')) -> str:
  """Model name and the flags starting with `prefixes`, from /proc/cpuinfo."""
  model, flags_ = '?', set()
  with open('/proc/cpuinfo') as f:
    for line in f:
      key, _, value = line.partition(':')
      if key.strip() == 'model name':
        model = value.strip()
      elif key.strip() == 'flags':
        flags_ = set(value.split())
  wanted = sorted(f for f in flags_ if f.startswith(tuple(prefixes)))
  return f'{model}, {os.cpu_count()} cores, {" ".join(wanted)}'


def interleave(fns: dict, rounds: int) -> dict:
  """{name: [seconds per round]}: every fn timed once per round; round 0 warms up.

  Interleaving puts measurements of different fns seconds apart, so a box whose speed
  drifts from minute to minute still gives fair ratios (side_by_side).
  """
  times = {k: [] for k in fns}
  for r in range(rounds + 1):
    for k, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      if r:
        times[k].append(time.perf_counter() - t0)
  return times


def speed_up(base: list, other: list) -> tuple:
  """('median', 'min-max') of the per-round ratios base / other: other's speed-up.

  Args:
    base, other: seconds per round from one `interleave`, so round i of each ran
      seconds apart.
  """
  ratios = [b / o for b, o in zip(base, other)]
  return f'{statistics.median(ratios):.3f}', f'{min(ratios):.2f}-{max(ratios):.2f}'


def build_ours(dtype: str, batch: int, num_classes: int, remat: str,
               cpu_matmul: str = 'auto', uint8_images: bool = False):
  """The shipped train step and eval forward as closures: (train, eval, info).

  `train()` runs one step and returns its metrics, `eval()` one encode forward; both
  block until done. Call xla_flags.configure_xla_flags (or set XLA_FLAGS) before this.
  `cpu_matmul` (config train.cpu_matmul) goes with both compiles, so one process can
  hold both libraries side by side. `uint8_images` compiles the step for the uint8 batches
  that `data.batches` ships (normalised inside the step), as training does.
  `info['eval_at'](n)` compiles
  the eval forward for another batch size n and returns its closure.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from concepthash_jax.configs import cub  # pylint: disable=g-import-not-at-top
  from concepthash_jax import configuration, encoding, models, optim, sharding, train  # pylint: disable=g-import-not-at-top
  from concepthash_jax.interop import hf  # pylint: disable=g-import-not-at-top

  config = cub.get_config()
  config.model.clip = 'random'  # B/32 shapes from configs/base.py, no download.
  config.model.dtype = dtype
  config.data.batch_size = batch
  config.model.remat = remat
  clip_config = hf.random_clip_config(config.model.random_clip)
  t0 = time.perf_counter()
  clip_params = hf.init_clip_params(clip_config, jax.random.PRNGKey(0))
  timings = {'clip_init_s': time.perf_counter() - t0}
  clip_params = {k: v for k, v in clip_params.items() if k != 'text_model'}
  rng = np.random.default_rng(0)
  text = rng.normal(size=(num_classes,
                          clip_config.text_config.hidden_size)).astype('f4')
  model = models.build_model(config.model, clip_config, num_classes)
  mesh = sharding.create_mesh()
  steps_per_epoch = 5994 // batch
  tx = optim.make_optimizer(config.optim, steps_per_epoch)
  schedule = optim.make_schedule(config.optim, steps_per_epoch)
  init_fn, _, shardings, mask = train.create_train_state(
      config, model, tx, clip_params, text, mesh)
  del clip_params
  size = config.data.image_size

  def random_images(n):
    if uint8_images:
      return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return rng.normal(size=(n, size, size, 3)).astype('f4')

  images = random_images(batch)
  labels = rng.integers(0, num_classes, batch).astype('i4')
  inputs = sharding.global_batch({'image': images, 'label': labels}, mesh)
  t0 = time.perf_counter()
  state = [jax.block_until_ready(init_fn())]  # A box: the step donates and replaces it.
  timings['state_init_s'] = time.perf_counter() - t0
  step_fn = train.jit_train_step(configuration.make_loss_fn(config.loss),
                                 model, tx, mask, schedule, shardings, mesh, cpu_matmul)
  t0 = time.perf_counter()
  step_fn = step_fn.lower(state[0], inputs).compile()
  timings['train_compile_s'] = time.perf_counter() - t0
  # The eval forward gets its own copy: the train step donates state's buffers.
  variables = jax.tree.map(lambda x: x.copy(),
                           {'params': state[0].params, **state[0].model_state})

  def eval_at(eval_batch: int):
    """The eval forward (encode step) compiled for `eval_batch` images, as a closure."""
    eval_images = images if eval_batch == batch else random_images(eval_batch)
    eval_images = sharding.global_batch({'image': eval_images}, mesh)['image']
    encode = encoding.jitted_encode_step(model, cpu_matmul).lower(
        variables, eval_images).compile()

    def eval_step():
      return jax.block_until_ready(encode(variables, eval_images))

    eval_step.compiled = encode  # For HLO and cost analysis.
    return eval_step

  t0 = time.perf_counter()
  eval_step = eval_at(batch)
  timings['eval_compile_s'] = time.perf_counter() - t0

  def train_step():
    state[0], metrics = step_fn(state[0], inputs)
    return jax.block_until_ready(metrics)

  train_step.compiled = step_fn  # For HLO and cost analysis.
  return train_step, eval_step, {'devices': jax.device_count(),
                                 'backend': jax.default_backend(),
                                 'config': config, 'mesh': mesh, 'state': state,
                                 'step_fn': step_fn, 'eval_at': eval_at, **timings}


def run_one(dtype: str) -> dict:
  """Measures one setting in this process."""
  import jax  # pylint: disable=g-import-not-at-top
  from concepthash_jax.configs import cub  # pylint: disable=g-import-not-at-top

  config = cub.get_config()
  config.train.cpu_concurrency_scheduler = FLAGS.cpu_concurrency_scheduler
  xla_flags.configure_xla_flags(config)  # As launch.py: before the backend starts.
  jax.config.update('jax_default_matmul_precision', FLAGS.matmul_precision)
  t0 = time.perf_counter()
  train_step, eval_step, info = build_ours(dtype, FLAGS.batch, FLAGS.num_classes,
                                           FLAGS.remat, FLAGS.cpu_matmul)
  compile_s = time.perf_counter() - t0  # Setup + both compiles.
  for _ in range(2):  # Warm-up.
    metrics = train_step()
  t0 = time.perf_counter()
  for _ in range(FLAGS.steps):
    metrics = train_step()
  train_ips = FLAGS.steps * FLAGS.batch / (time.perf_counter() - t0)

  eval_step()
  t0 = time.perf_counter()
  for _ in range(FLAGS.eval_steps):
    eval_step()
  eval_ips = FLAGS.eval_steps * FLAGS.batch / (time.perf_counter() - t0)
  rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
  # Accelerators report their own high-water mark; host RSS says little there.
  stats = jax.local_devices()[0].memory_stats() or {}
  device_gb = stats.get('peak_bytes_in_use', 0) / 2 ** 30
  return dict(dtype=dtype, train_img_s=train_ips, eval_img_s=eval_ips,
              peak_rss_gb=rss_gb, peak_device_gb=device_gb, compile_s=compile_s,
              loss=float(metrics['loss']), xla_flags=os.environ.get('XLA_FLAGS', ''),
              matmul_precision=FLAGS.matmul_precision, jax=jax.__version__,
              devices=info['devices'], backend=info['backend'],
              **{k: v for k, v in info.items() if k.endswith('_s')})


def main(argv):
  """Runs every dtype in a subprocess and prints the table."""
  del argv
  if FLAGS.child:
    child.print_json(run_one(FLAGS.child))
    return
  rows = []
  for dtype in FLAGS.dtypes:
    cmd = child.module_command(__spec__.name, f'--child={dtype}',
           f'--batch={FLAGS.batch}', f'--steps={FLAGS.steps}',
           f'--eval_steps={FLAGS.eval_steps}',
           f'--num_classes={FLAGS.num_classes}', f'--remat={FLAGS.remat}',
           f'--cpu_concurrency_scheduler={FLAGS.cpu_concurrency_scheduler}',
           f'--cpu_matmul={FLAGS.cpu_matmul}',
           f'--matmul_precision={FLAGS.matmul_precision}')
    rows.append(child.run_json(cmd))
  print(cpu_line())
  print(f'ViT-B/32 ConceptHash (M=4, 64 bits, {FLAGS.num_classes} classes), '
        f'batch {FLAGS.batch}, 224 px, random weights, '
        f'{rows[0]["backend"]} x{rows[0]["devices"]}, {os.cpu_count()} cores, '
        f'model.remat={FLAGS.remat}, train.cpu_concurrency_scheduler='
        f'{FLAGS.cpu_concurrency_scheduler}, train.cpu_matmul={FLAGS.cpu_matmul}, '
        f'matmul precision {FLAGS.matmul_precision}, '
        f'XLA_FLAGS of the first row: {rows[0]["xla_flags"]!r}\n')
  table.print_table(
      ['dtype', 'train img/s', 'eval img/s', 'peak RSS GB', 'peak device GB',
       'setup + compile s'],
      [(r['dtype'], f'{r["train_img_s"]:.2f}', f'{r["eval_img_s"]:.2f}',
        f'{r["peak_rss_gb"]:.2f}',
        f'{r["peak_device_gb"]:.2f}' if r['peak_device_gb'] else '-',
        f'{r["compile_s"]:.1f}') for r in rows])


if __name__ == '__main__':
  app.run(main)
