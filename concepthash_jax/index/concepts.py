"""Concept-level queries: which concepts' sub-codes count, and by how much.

Concept m of a K-bit code with M concepts is bits [m K/M, (m+1) K/M). A query
counts distance sum_m w_m * hamming(sub-code m): `concepts=[1, 3]` is w = 1 on
concepts 1 and 3, 0 elsewhere; `weights=[1, 0, 2, 1]` gives them directly. A
composite query takes each concept's sub-code from another code ("this head,
that wing"):

  query = compose([(code_a, [0, 1]), (code_b, [2])], num_concepts=4)
  ids, dist = index.search(query, k=10)
"""
from typing import NamedTuple, Optional, Sequence

import numpy as np

from concepthash_jax import knn


class ConceptQuery(NamedTuple):
  """Codes searched with per-concept weights (see `compose`)."""
  codes: np.ndarray  # (Q, K) or (K,) real codes, value > 0 is bit 1.
  weights: np.ndarray  # (M,) int, 0 = the concept is not counted.


def concept_weights(num_concepts: Optional[int], *, concepts=None,
                    weights=None) -> Optional[np.ndarray]:
  """`knn.concept_weights`, refusing concept queries when M is unknown.

  Returns:
    (M,) int64 weights, or None for the plain Hamming distance.

  Raises:
    ValueError: naming the bad value (see knn.concept_weights), or M unknown.
  """
  if (concepts is not None or weights is not None) and not num_concepts:
    raise ValueError('these codes have no known number of concepts; build the '
                     'index with num_concepts=M to query by concept')
  return knn.concept_weights(num_concepts, concepts=concepts, weights=weights)


def compose(parts: Sequence, num_concepts: int) -> ConceptQuery:
  """One query whose concept i comes from one code, concept j from another.

  Args:
    parts: [(code, concepts), ...]: a (K,) code and the concept indices it
      contributes. A concept given by no part is not counted (weight 0).
    num_concepts: M.

  Returns:
    ConceptQuery with a (K,) code and 0/1 weights.

  Raises:
    ValueError: a concept given twice, out of range, or codes of other lengths.
  """
  if not parts:
    raise ValueError('a composite query needs at least one (code, concepts) part')
  codes = [np.asarray(code).reshape(-1) for code, _ in parts]
  nbit = len(codes[0])
  if any(len(c) != nbit for c in codes) or nbit % num_concepts:
    raise ValueError(f'composite parts have {[len(c) for c in codes]} bits; '
                     f'all need the same K, divisible by {num_concepts} concepts')
  width = nbit // num_concepts
  out = codes[0].astype(np.result_type(*codes))
  owner = {}
  for part, (code, (_, concepts)) in enumerate(zip(codes, parts)):
    concept_weights(num_concepts, concepts=concepts)  # Checks the indices.
    for m in sorted({int(c) for c in np.atleast_1d(concepts)}):
      if m in owner:
        raise ValueError(f'concept {m} is given by parts {owner[m]} and {part}; '
                         'give each concept once')
      owner[m] = part
      out[m * width:(m + 1) * width] = code[m * width:(m + 1) * width]
  weights = np.zeros(num_concepts, np.int64)
  weights[list(owner)] = 1
  return ConceptQuery(out, weights)


def concept_distances(query_codes, db_codes, num_concepts: int):
  """Hamming distance of every concept's sub-code (K/M bits each).

  Args:
    query_codes: (Q, K) real codes (value > 0 is bit 1).
    db_codes: (N, K) real codes.
    num_concepts: M; K must be divisible by it.

  Returns:
    (Q, N, M) int32; summed over M it is the full Hamming distance.
  """
  query, db = np.asarray(query_codes) > 0, np.asarray(db_codes) > 0
  nbit = query.shape[1]
  if nbit % num_concepts or db.shape[1] != nbit:
    raise ValueError(f'codes of {nbit} and {db.shape[1]} bits cannot be split '
                     f'into {num_concepts} equal sub-codes')
  query = query.reshape(len(query), 1, num_concepts, -1)
  db = db.reshape(1, len(db), num_concepts, -1)
  return (query != db).sum(-1, dtype=np.int32)
