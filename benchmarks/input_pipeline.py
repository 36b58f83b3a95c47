"""Input pipeline throughput: ours (`data.batches`) against torchvision's, same files.

  python -m benchmarks.input_pipeline                      # 2 rounds, 2 and 1 workers
  python -m benchmarks.input_pipeline --rounds=1 --workers=2 --images=320
  python -m benchmarks.input_pipeline --map_check     # mAP@R with / without the cache
  python -m benchmarks.input_pipeline --torchvision=false --uncached=false --transforms=train \
      --workers=2 --epochs=3 --worker_types=thread,process --iterators=run,epoch

Writes `--images` CUB-sized JPEGs (500 x 375, textured, quality 90) in the official
CUB_200_2011 layout, then times one epoch of batch 32 per row, after a warm-up epoch,
each row in its own process:
  torchvision  the released transforms on PIL in a torch DataLoader (persistent
               workers): train Resize(256) -> RandomHorizontalFlip ->
               TrivialAugmentWide(bicubic) -> CenterCrop(224) -> ToTensor ->
               Normalize(CLIP); test Resize(256, bicubic) -> CenterCrop(224) ->
               ToTensor -> Normalize. Runs under `--torch_python` (default: this
               interpreter), an environment with torch, torchvision, pillow and numpy;
               torch is not a dependency of this project.
  ours         data.batches on data.source=folders, uint8 batches (normalised inside
               the jitted step, not on the host), thread workers (`--worker_types`);
               with the first-stage cache (built before the warm-up, its build time
               reported) and without. `--epochs=N` times N epochs per row, including
               worker start-up: for the train transform through one
               data.train_batches iterator (`--iterators=run`, as train.py) or one
               data.batches iterator per epoch (`epoch`), so process workers
               start once or N times.
Rows of a round run interleaved (torchvision, ours, ...) so the box's load hits both
alike; `uptime`'s 1-minute load is recorded before each row. Per core = img/s / workers.
"""
import argparse
import concurrent.futures
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from benchmarks import child
from benchmarks import table

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _write_jpeg(path, seed, index):
  """One 500 x 375 JPEG: smooth colour regions plus sensor-like noise (photo-like size)."""
  rng = np.random.default_rng([seed, index])
  coarse = (rng.random((24, 32, 3)) * 255).astype(np.uint8)
  pixels = np.asarray(Image.fromarray(coarse).resize(
      (500, 375), Image.Resampling.BICUBIC)).astype(np.int16)
  pixels += rng.integers(-10, 11, pixels.shape, dtype=np.int16)
  Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)


def write_cub(root, num_images, seed=0, test_every=0):
  """CUB_200_2011 layout with `num_images` 500 x 375 JPEGs, written on every core.

  All are in the train split, except every `test_every`-th (when > 0).
  """
  cub = os.path.join(root, 'CUB_200_2011')
  if os.path.exists(os.path.join(cub, 'classes.txt')):
    return cub
  lines = {'images.txt': [], 'image_class_labels.txt': [],
           'train_test_split.txt': []}
  jobs = []
  for i in range(1, num_images + 1):
    label = 1 + i % 10
    path = f'{label:03d}.Bird_{label}/Bird_{i:04d}.jpg'
    os.makedirs(os.path.join(cub, 'images', os.path.dirname(path)),
                exist_ok=True)
    jobs.append((os.path.join(cub, 'images', path), seed, i))
    lines['images.txt'].append(f'{i} {path}')
    lines['image_class_labels.txt'].append(f'{i} {label}')
    is_test = test_every and i % test_every == 0
    lines['train_test_split.txt'].append(f'{i} {0 if is_test else 1}')
  with concurrent.futures.ProcessPoolExecutor() as pool:
    list(pool.map(_write_jpeg, *zip(*jobs), chunksize=64))
  lines['classes.txt'] = [f'{c} {c:03d}.Bird_{c}' for c in range(1, 11)]
  for name, rows in lines.items():
    with open(os.path.join(cub, name), 'w') as f:
      f.write(''.join(row + '\n' for row in rows))
  return cub


def run_torchvision(args):
  """One torchvision row: img/s of the epoch after a warm-up epoch."""
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  from torchvision import transforms as T  # pylint: disable=g-import-not-at-top

  root = os.path.join(args.data, 'CUB_200_2011')
  with open(os.path.join(root, 'images.txt')) as f:
    paths = [os.path.join(root, 'images', line.split()[1]) for line in f]

  if args.transform == 'train':
    transform = T.Compose([
        T.Resize(256), T.RandomHorizontalFlip(),
        T.TrivialAugmentWide(interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(224), T.ToTensor(), T.Normalize(_CLIP_MEAN, _CLIP_STD)])
  else:
    transform = T.Compose([
        T.Resize(256, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(224), T.ToTensor(), T.Normalize(_CLIP_MEAN, _CLIP_STD)])

  class Files(torch.utils.data.Dataset):
    """The authors' style of dataset: PIL open + convert('RGB') per item."""

    def __len__(self):
      return len(paths)

    def __getitem__(self, index):
      with open(paths[index], 'rb') as f:
        image = Image.open(f).convert('RGB')
      return transform(image), index % 10

  loader = torch.utils.data.DataLoader(
      Files(), batch_size=args.batch, shuffle=args.transform == 'train',
      num_workers=args.workers, persistent_workers=args.workers > 0,
      drop_last=args.transform == 'train')
  for _ in loader:  # Warm-up epoch: worker start-up, page cache.
    pass
  start, count = time.perf_counter(), 0
  for images, _ in loader:
    count += len(images)
  return dict(img_s=count / (time.perf_counter() - start),
              version=f'torch {torch.__version__}, torchvision '
              f'{torchvision.__version__}, Pillow {Image.__version__}')


def run_ours(args):
  """One row of ours: img/s of the epoch after a warm-up epoch."""
  from concepthash_jax import data  # pylint: disable=g-import-not-at-top
  from concepthash_jax.configs import base  # pylint: disable=g-import-not-at-top

  cfg = base.get_config().data
  cfg.update(dict(source='folders', name='cub', root=args.data,
                  num_workers=args.workers, worker_type=args.worker_type,
                  cache=args.cache, cache_dir=os.path.join(args.data, 'cache')))
  ds = data.build(cfg, 'train')
  train = args.transform == 'train'

  def count(stream):
    return sum(int(batch['mask'].sum()) for batch in stream)

  def epoch(number):
    return count(data.batches(ds, cfg, train=train, batch_size=args.batch,
                              seed=0, epoch=number, drop_remainder=train))

  start = time.perf_counter()
  epoch(0)  # Warm-up; builds the cache when it does not exist yet.
  warmup_s = time.perf_counter() - start
  start = time.perf_counter()
  if train and args.iterators == 'run':  # Epochs 1..N from one iterator.
    per_epoch = data.num_batches(len(ds), batch_size=args.batch,
                                 process_count=1, drop_remainder=True)
    images = count(data.train_batches(
        ds, cfg, batch_size=args.batch, seed=0, start_step=per_epoch,
        stop_step=(1 + args.epochs) * per_epoch))
  else:
    images = sum(epoch(number) for number in range(1, 1 + args.epochs))
  return dict(img_s=images / (time.perf_counter() - start), warmup_s=warmup_s)


def map_check(args):
  """mAP@R of one tiny training run on a generated CUB folder, cache on and off.

  A 1-layer random CLIP at 32 px, released augmentation, 2 epochs; the two
  runs differ only in data.cache, so equal mAP@R (and loss) means the cached
  pipeline fed the same pixels.
  """
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from concepthash_jax import train  # pylint: disable=g-import-not-at-top
  from concepthash_jax.configs import cub  # pylint: disable=g-import-not-at-top

  root = os.path.join(args.data, 'map_check')
  write_cub(root, 80, seed=1, test_every=4)
  tiny = ['model.clip=random', 'model.random_clip.image_size=32',
          'model.random_clip.patch_size=8', 'model.random_clip.vision_width=32',
          'model.random_clip.vision_layers=1', 'model.random_clip.vision_heads=2',
          'model.random_clip.vision_mlp=64', 'model.random_clip.projection_dim=16',
          'model.random_clip.text_width=16', 'model.random_clip.text_layers=1',
          'model.random_clip.text_heads=2', 'model.random_clip.text_mlp=32',
          'model.random_clip.vocab_size=300', 'model.adapter_dim=8',
          'model.generator_heads=2', 'model.nbit=8', 'data.source=folders',
          f'data.root={root}', 'data.image_size=32', 'data.resize_size=36',
          'data.batch_size=8', 'data.eval_batch_size=20', 'optim.epochs=2',
          'optim.warmup_epochs=1', 'optim.lr=0.05', 'eval.every_epochs=2']
  results = {}
  for cache in (True, False):
    argv = ['prog', '--config=' + cub.__file__] + [
        f'--config.{kv}' for kv in tiny + [f'data.cache={cache}',
                                           f'data.cache_dir={root}/cache']]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file('config', None, '', flag_values=fv,
                                    lock_config=True, sys_argv=argv)
    fv(argv)
    out = train.train_and_evaluate(
        fv.config, os.path.join(root, f'run_cache_{cache}'))
    results[cache] = out
    print(f'data.cache={cache}: mAP@R {out["map_at_r"]!r}, final loss '
          f'{out["loss"]!r}', flush=True)
  same = results[True]['map_at_r'] == results[False]['map_at_r']
  print(f'same mAP@R with and without the cache: {same}')


def load():
  """1-minute load average."""
  return os.getloadavg()[0]


def cpu():
  """CPU model and its SIMD flags from /proc/cpuinfo."""
  model, flags = '?', []
  with open('/proc/cpuinfo') as f:
    for line in f:
      if line.startswith('model name') and model == '?':
        model = line.split(':', 1)[1].strip()
      if line.startswith('flags') and not flags:
        flags = line.split(':', 1)[1].split()
  simd = [f for f in flags if f.startswith(('avx', 'fma', 'sse4', 'amx'))]
  return model, ' '.join(simd)


def run_row(args, which, **overrides):
  """Runs one row in its own process; returns its result dict."""
  python = args.torch_python if which == 'torchvision' else sys.executable
  options = dict(data=args.data, batch=args.batch, **overrides)
  return child.run_json(child.module_command(
      __spec__.name, f'--child={which}', *[f'--{k}={v}' for k, v in options.items()],
      python=python))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--images', type=int, default=640)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--workers', default='2,1')
  parser.add_argument('--transforms', default='train,test')
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--uncached', default='true',
                      help='also time ours without the cache')
  parser.add_argument('--torchvision', default='true',
                      help='also time torchvision (the ratio column needs it)')
  parser.add_argument('--epochs', type=int, default=1,
                      help='timed epochs per row (worker start-up included)')
  parser.add_argument('--worker_types', default='thread',
                      help='data.worker_type settings of the ours rows')
  parser.add_argument('--iterators', default='run',
                      help="ours' train iterators: 'run' (one for all the timed "
                      "epochs, as train.py), 'epoch' (one per epoch)")
  parser.add_argument('--data', default='', help='folder for the JPEGs '
                      '(default: a temporary folder)')
  parser.add_argument('--torch_python', default=sys.executable,
                      help='a Python with torch and torchvision, for the torchvision rows')
  parser.add_argument('--map_check', action='store_true',
                      help='instead: mAP@R of a tiny CUB-folder training run '
                      'with and without the cache')
  # Child-process options.
  parser.add_argument('--child', default='')
  parser.add_argument('--transform', default='train')
  parser.add_argument('--worker_type', default='thread')
  parser.add_argument('--cache', default='true')
  args = parser.parse_args()
  if args.child:
    args.workers = int(args.workers)
    args.cache = args.cache == 'true'
    run = run_torchvision if args.child == 'torchvision' else run_ours
    child.print_json(run(args))
    return

  args.data = args.data or tempfile.mkdtemp(prefix='input_pipeline_')
  if args.map_check:
    map_check(args)
    return
  write_cub(args.data, args.images)
  model, simd = cpu()
  print(f'{args.images} JPEGs 500x375 in {args.data}; batch {args.batch}; '
        f'{args.epochs} timed epoch(s) per row; {os.cpu_count()} cores: '
        f'{model}; SIMD flags: {simd}\n')
  # The cache is built once per transform, outside the timed rows.
  for transform in args.transforms.split(','):
    info = run_row(args, 'ours', transform=transform, workers=2, cache='true')
    print(f'cache build + warm-up epoch, {transform}: {info["warmup_s"]:.1f} s '
          f'(2 workers)')
  # Each row prints as soon as it is timed.
  print()
  table.print_header(['round', 'transform', 'workers', 'pipeline', 'img/s', 'img/s per core',
                      'ours / torchvision', 'load (1 min)'])
  for round_ in range(1, args.rounds + 1):
    for transform in args.transforms.split(','):
      for workers in (int(w) for w in args.workers.split(',')):
        rows = ([('torchvision', dict())] if args.torchvision == 'true'
                else [])
        for worker_type in args.worker_types.split(','):
          # One iterator per epoch is the only way for the test transform.
          for iterators in (args.iterators.split(',') if transform == 'train'
                            and args.epochs > 1 else ['epoch']):
            ours = dict(worker_type=worker_type, iterators=iterators,
                        epochs=args.epochs)
            name = ', '.join(['ours', worker_type] + (
                [f'{iterators} iterators'] if args.epochs > 1 else []))
            rows.append((f'{name}, cache', dict(ours, cache='true')))
            if args.uncached == 'true':
              rows.append((f'{name}, no cache', dict(ours, cache='false')))
        results = {}
        for name, extra in rows:
          before = load()
          which = 'torchvision' if name == 'torchvision' else 'ours'
          results[name] = run_row(args, which, transform=transform,
                                  workers=workers, **extra)
          ratio = (f'{results[name]["img_s"] / results["torchvision"]["img_s"]:.2f}x'
                   if name != 'torchvision' and 'torchvision' in results else '')
          table.print_row([round_, transform, workers, name,
                           f'{results[name]["img_s"]:.1f}',
                           f'{results[name]["img_s"] / workers:.1f}', ratio,
                           f'{before:.2f}'])
  if 'torchvision' in results:
    print(f'\ntorchvision side: {results["torchvision"]["version"]}')


if __name__ == '__main__':
  main()
