"""Encoding splits into codes and scoring them: eval-mode forward, mAP@R, chance.

Used by the training loop's evaluation, tools/encode.py and tools/explain.py.
No file I/O: arrays in, numpy dicts out (every process gets every row).
"""
import functools
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from concepthash_jax import evaluation
from concepthash_jax import sharding
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
def jitted_encode_step(model):
  """One compiled encode step per model (flax modules hash by value)."""
  return jax.jit(functools.partial(encode_step, model=model))


def encode_dataset(model, variables, batches: Iterable[dict], *,
                   mesh=None) -> dict:
  """Encodes every batch of a (test-transform) iterator.

  Args:
    model: ConceptHash module.
    variables: {'params', 'batch_stats', 'centers'} (replicated or sharded).
    batches: iterator of host-local numpy dicts from `data.batches(...,
      train=False)`; padding rows (mask False) are dropped.
    mesh: device mesh; default all devices.

  Returns:
    Dict of numpy arrays over the whole split (every process gets all rows):
    'codes' (N,K) int8 ±1, 'codes_cont' (N,K), 'labels' (N,) or (N,C),
    'index' (N,), 'concept_attn' (N,M,HW), and 'keypoints' when the batches
    carry them.
  """
  mesh = sharding.create_mesh() if mesh is None else mesh
  encode = jitted_encode_step(model)
  parts = []
  for batch in batches:
    inputs = sharding.global_batch(
        {'image': batch['image'], 'mask': batch['mask']}, mesh)
    out = encode(variables, inputs['image'])
    host = sharding.to_host(dict(out, mask=inputs['mask']), mesh)
    # Labels and extras are host-local; gather them the same way.
    extra = {k: batch[k] for k in ('label', 'index', 'keypoints') if k in batch}
    host.update(sharding.to_host(sharding.global_batch(extra, mesh), mesh))
    keep = host.pop('mask').astype(bool)
    parts.append({k: v[keep] for k, v in host.items()})
  if not parts:
    raise ValueError('encode_dataset got no batches (empty split?)')
  result = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  result['labels'] = result.pop('label')
  return result


def chance_map_at_r(query_labels, db_labels) -> float:
  """Expected mAP@R (R = whole database) of a uniformly random ranking.

  For a query with n relevant items among N, E[AP] =
  (n-1)/(N-1) + (H_N/N) (N-n)/(N-1) (H_N the harmonic number): about the
  fraction of relevant items, slightly above it for small N. Queries with
  n = 0 score 0.

  Args:
    query_labels: (Q,) int or (Q, C) multi-hot.
    db_labels: (N,) int or (N, C) multi-hot.

  Returns:
    The expectation, averaged over queries.
  """
  q, d = np.asarray(query_labels), np.asarray(db_labels)
  if q.ndim == 1:
    classes, counts = np.unique(d, return_counts=True)
    lookup = dict(zip(classes.tolist(), counts.tolist()))
    n = np.array([lookup.get(c, 0) for c in q.tolist()], np.float64)
  else:
    n = ((q.astype(np.float32) @ d.T.astype(np.float32)) > 0).sum(1)
    n = n.astype(np.float64)
  size = float(len(d))
  if size <= 1:
    return float(np.mean(n > 0))
  harmonic = np.sum(1.0 / np.arange(1, len(d) + 1))
  expected = (n - 1) / (size - 1) + harmonic / size * (size - n) / (size - 1)
  return float(np.mean(np.where(n > 0, expected, 0.0)))


def evaluate(model, variables, query_batches, db_batches, *, eval_cfg, mesh):
  """mAP@R of the query split against the database split, and its chance level."""
  query = encode_dataset(model, variables, query_batches, mesh=mesh)
  db = encode_dataset(model, variables, db_batches, mesh=mesh)
  r = None if eval_cfg.R is None or eval_cfg.R < 0 else int(eval_cfg.R)
  score = evaluation.map_at_r(query['codes'], query['labels'], db['codes'],
                              db['labels'], R=r, ties=eval_cfg.ties)
  return {'map_at_r': float(score),
          'chance_map_at_r': chance_map_at_r(query['labels'], db['labels']),
          'num_queries': len(query['labels']),
          'num_database': len(db['labels'])}
