"""Encoding splits into codes: the eval-mode forward over a dataset.

`encode_split` is the one pass over a dataset with a trained model (the
training loop's evaluation, tools/encode.py, tools/explain.py); `encode_step`
is its array-level core. No file I/O: numpy dicts out (every process gets
every row).
"""
import functools
import itertools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from concepthash_jax import data as data_lib
from concepthash_jax import sharding
from concepthash_jax import xla_flags
from concepthash_jax.data import transforms


def encode_step(variables, images, *, model):
  """Eval-mode forward: binary codes and concept attention of a batch.

  Args:
    variables: {'params', 'batch_stats', 'centers'}.
    images: (B,S,S,3) uint8 pixels or normalised float32.
    model: the ConceptHash module (static).

  Returns:
    {'codes': (B,K) int8 in {-1,+1} (sign of b, 0 -> +1),
     'codes_cont': (B,K) float32 continuous b,
     'concept_attn': (B,M,HW) float32}.
  """
  images = transforms.to_model_input(images)
  _, aux = model.apply(variables, images, train=False)
  cont = aux['codes'].astype(jnp.float32)
  return {'codes': jnp.where(cont >= 0, 1, -1).astype(jnp.int8),
          'codes_cont': cont,
          'concept_attn': aux['concept_attn'].astype(jnp.float32)}


@functools.lru_cache(maxsize=8)
def jitted_encode_step(model, cpu_matmul: str = 'auto'):
  """One compiled encode step per (model, train.cpu_matmul); modules hash by value."""
  return jax.jit(functools.partial(encode_step, model=model),
                 compiler_options=xla_flags.compiler_options(cpu_matmul, model.dtype))


# What `encode_split` can keep besides 'labels' and 'index' (always kept):
#   codes      'codes' (N, K) int8 ±1 and 'codes_cont' (N, K) float32
#   attention  'concept_attn' (N, M, HW) float32
#   images     'images' uint8 (n, S, S, 3): the first `num_images` rows as the
#              model saw them, before normalisation (figures)
#   boxes      'box' (N, 4) x, y, w, h, when the dataset has boxes
#   keypoints  'keypoints' (N, P, 3), when the dataset has parts
KEEP = ('codes', 'attention', 'images', 'boxes', 'keypoints')
_OUTPUTS = {'codes': ('codes', 'codes_cont'), 'attention': ('concept_attn',)}
# Host-local batch entries gathered like the codes (batch key: result key).
_EXTRAS = {'label': 'labels', 'index': 'index', 'box': 'box',
           'keypoints': 'keypoints', 'display': 'images'}


def encode_split(model, variables, ds, data_cfg, *, keep=('codes',),
                 batch_size: Optional[int] = None, max_images: int = 0,
                 num_images: int = 0, mesh=None,
                 desc: Optional[str] = None, cpu_matmul: str = 'auto') -> dict:
  """Encodes a split with the test transform: the one pass over a dataset.

  Args:
    model: ConceptHash module.
    variables: {'params', 'batch_stats', 'centers'} (replicated or sharded).
    ds: a `data.build` split (its process_index / process_count say which
      rows this process reads).
    data_cfg: config `data` (transforms, workers).
    keep: names from `KEEP`.
    batch_size: per-process batch size (default data.eval_batch_size split
      over the processes).
    max_images: encode only the first rows (0 = all).
    num_images: display images kept with 'images'.
    mesh: device mesh; default all devices.
    desc: progress bar label (default 'encode <split>').
    cpu_matmul: the run's config train.cpu_matmul (XLA:CPU matmul library).

  Returns:
    Dict of numpy arrays over the split in index order (every process gets
    every row): 'labels' (N,) or (N, C), 'index' (N,), and what `keep` asks.
  """
  unknown = set(keep) - set(KEEP)
  if unknown:
    raise ValueError(f'Unknown encode_split keep {sorted(unknown)}; valid: '
                     f'{list(KEEP)}')
  mesh = sharding.create_mesh() if mesh is None else mesh
  pc = jax.process_count()
  batch_size = batch_size or data_cfg.eval_batch_size // pc
  total = len(ds) if not max_images else min(len(ds), max_images)
  num_batches = -(-total // (batch_size * pc))
  images_wanted = num_images if 'images' in keep else 0
  batches = data_lib.batches(ds, data_cfg, train=False, batch_size=batch_size,
                             seed=0, epoch=0, drop_remainder=False,
                             display=images_wanted > 0)
  outputs = [k for name in keep for k in _OUTPUTS.get(name, ())]
  extras = ['label', 'index'] + [k for k, name in (
      ('box', 'boxes'), ('keypoints', 'keypoints')) if name in keep]
  encode = jitted_encode_step(model, cpu_matmul)
  parts, num_display = [], 0
  bar = tqdm.tqdm(itertools.islice(batches, num_batches), total=num_batches,
                  desc=desc or f'encode {ds.split}', unit='batch', leave=False,
                  disable=jax.process_index() != 0)
  for batch in bar:
    inputs = sharding.global_batch(
        {'image': batch['image'], 'mask': batch['mask']}, mesh)
    host = {'mask': inputs['mask']}
    if outputs:
      out = encode(variables, inputs['image'])
      host.update({k: out[k] for k in outputs})
    # Labels and extras are host-local: gather them the same way.
    wanted = extras + (['display'] if num_display < images_wanted else [])
    host.update(sharding.global_batch(
        {k: batch[k] for k in wanted if k in batch}, mesh))
    host = sharding.to_host(host, mesh)
    keep_rows = host.pop('mask').astype(bool)
    part = {_EXTRAS.get(k, k): v[keep_rows] for k, v in host.items()}
    if 'images' in part:
      part['images'] = part['images'][:images_wanted - num_display]
      num_display += len(part['images'])
    parts.append(part)
  batches.close()  # Stops its workers now: max_images may stop it early.
  if not parts:
    raise ValueError(f'encode_split got no batches: the {ds.split} split is '
                     'empty')
  result = {k: np.concatenate([p[k] for p in parts if k in p])
            for k in parts[0]}
  result = {k: v[:total] for k, v in result.items()}
  if 'images' in keep and 'images' not in result:
    size = data_cfg.image_size
    result['images'] = np.zeros((0, size, size, 3), np.uint8)
  return result


def class_centers(model, variables, image_size: int) -> np.ndarray:
  """o_c (C, K) float32: a trained model's class centers, read off one forward.

  The centers do not depend on the image, so the forward runs on one blank one.

  Args:
    model: ConceptHash module.
    variables: {'params', 'batch_stats', 'centers'}.
    image_size: side of the square model input.
  """
  pixels = np.zeros((1, image_size, image_size, 3), np.float32)
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False)[1])
  return np.asarray(jax.device_get(forward(variables, pixels)['class_centers']),
                    np.float32)
