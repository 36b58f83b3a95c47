"""Class families: family-level retrieval and the family structure of centers.

Fine-grained classes group into families (CUB's albatrosses, a car make:
`data.core.families`). Table 5 scores retrieval with the family as relevance
beside the class-level score; Fig. 5 asks whether language-guided hash class
centers sit closer within a family than across families, as a number
(`family_similarity`) and as a 2-D t-SNE of the centers coloured by family.

Pure functions: arrays in, arrays or dicts out. Names: K -> `nbit`, C -> the
number of classes.
"""
from typing import Optional

import numpy as np

from concepthash_jax import evaluation


def to_family_labels(labels, family_of):
  """Maps class labels to family labels.

  Args:
    labels: (N,) int class ids or (N, C) multi-hot.
    family_of: (C,) family id of each class.

  Returns:
    (N,) int64 family ids, or (N, F) multi-hot for multi-hot input.
  """
  labels, family_of = np.asarray(labels), np.asarray(family_of, np.int64)
  if labels.ndim == 1:
    return family_of[labels]
  onehot = np.eye(family_of.max() + 1, dtype=np.int64)[family_of]  # (C, F)
  return ((labels.astype(np.int64) @ onehot) > 0).astype(np.int64)


def family_map_at_r(query_codes, query_labels, db_codes, db_labels, family_of,
                    *, R: Optional[int] = None, ties: str = 'index') -> float:
  """Family-level retrieval (Table 5): mAP@R with family labels as relevance.

  Args:
    query_codes: (Q, K) codes (value > 0 is bit 1).
    query_labels: (Q,) class ids or (Q, C) multi-hot.
    db_codes: (N, K).
    db_labels: (N,) or (N, C).
    family_of: (C,) family of each class.
    R: cut-off (None = whole database, as the paper).
    ties: Hamming tie rule of `evaluation.map_at_r`.

  Returns:
    mAP@R in [0, 1].
  """
  return float(evaluation.map_at_r(
      query_codes, to_family_labels(query_labels, family_of), db_codes,
      to_family_labels(db_labels, family_of), R=R, ties=ties))


def retrieval_by_level(query, database, family_of, *, R: Optional[int] = None,
                       ties: str = 'index') -> dict:
  """Table 5: class-level and family-level mAP@R, each beside its chance level.

  Args:
    query, database: `encoding.encode_split` results ('codes', 'labels').
    family_of: (C,) family of each class.
    R, ties: as `evaluation.map_at_r`.

  Returns:
    {'class_map_at_r', 'class_chance'} and, when families group classes,
    'num_families', 'family_map_at_r', 'family_chance'.
  """
  out = {'class_map_at_r': float(evaluation.map_at_r(
      query['codes'], query['labels'], database['codes'], database['labels'],
      R=R, ties=ties)),
         'class_chance': evaluation.chance_map_at_r(query['labels'],
                                                  database['labels'])}
  family_of = np.asarray(family_of, np.int64)
  num_families = len(np.unique(family_of))
  if num_families < len(family_of):
    out['num_families'] = num_families
    out['family_map_at_r'] = family_map_at_r(
        query['codes'], query['labels'], database['codes'],
        database['labels'], family_of, R=R, ties=ties)
    out['family_chance'] = evaluation.chance_map_at_r(
        to_family_labels(query['labels'], family_of),
        to_family_labels(database['labels'], family_of))
  return out


def top_families(family_of, k: int = 10):
  """The k families with the most classes (Fig. 5 plots CUB's top 10).

  Args:
    family_of: (C,) family ids.
    k: how many.

  Returns:
    (k',) family ids, most classes first (ties: lower id first), k' <= k.
  """
  counts = np.bincount(np.asarray(family_of, np.int64))
  order = np.lexsort((np.arange(len(counts)), -counts))
  return order[counts[order] > 0][:k]


def family_similarity(centers, family_of) -> dict:
  """Mean cosine between class centers of the same vs different families.

  A number to go with Fig. 5's picture: language-guided centers should be
  closer within a family than across families.

  Args:
    centers: (C, K) hash class centers.
    family_of: (C,) family ids.

  Returns:
    {'within': float, 'between': float} (NaN when no such pair exists).
  """
  centers = np.asarray(centers, np.float64)
  unit = centers / np.maximum(np.linalg.norm(centers, axis=1, keepdims=True),
                              1e-12)
  sim = unit @ unit.T
  fam = np.asarray(family_of)
  same = fam[:, None] == fam[None, :]
  off = ~np.eye(len(fam), dtype=bool)

  def mean(mask):
    return float(sim[mask].mean()) if mask.any() else float('nan')
  return {'within': mean(same & off), 'between': mean(~same)}


def tsne_embed(points, *, seed: int = 0, perplexity: Optional[float] = None):
  """2-D t-SNE (scikit-learn) of L2-normalised points (cosine geometry).

  Args:
    points: (C, K), e.g. hash class centers o_c.
    seed: random state.
    perplexity: default min(30, (C - 1) / 3), valid for small C.

  Returns:
    (C, 2) float64.
  """
  from sklearn import manifold  # pylint: disable=g-import-not-at-top
  points = np.asarray(points, np.float64)
  if len(points) < 3:
    raise ValueError(f't-SNE needs at least 3 points, got {len(points)}')
  unit = points / np.maximum(np.linalg.norm(points, axis=1, keepdims=True),
                             1e-12)
  if perplexity is None:
    perplexity = max(1.0, min(30.0, (len(points) - 1) / 3.0))
  return manifold.TSNE(n_components=2, perplexity=perplexity, init='pca',
                       random_state=seed).fit_transform(unit)
