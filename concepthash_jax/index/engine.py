"""Exact weighted Hamming k-NN over uint64 code words, in numpy blocks.

The same contract as `knn.Searcher`: distance sum_m w_m * hamming(sub-code m),
ascending, ties by ascending database position; the database (may be an
np.memmap) is read in row blocks, never copied whole.
"""
from typing import Optional

import numpy as np

_PAIR_WORDS = 1 << 22  # Query x database words compared per block.


def concept_masks(nbit: int, num_concepts: int, num_words: int) -> np.ndarray:
  """(M, W) uint64: the bits of each concept's sub-code."""
  width = nbit // num_concepts
  bits = np.zeros((num_concepts, num_words * 64), bool)
  for m in range(num_concepts):
    bits[m, m * width:(m + 1) * width] = True
  packed = np.packbits(bits.reshape(num_concepts, num_words, 64), axis=-1,
                       bitorder='little')
  return np.ascontiguousarray(packed).view('<u8')[..., 0]


def smallest_k(dist, positions, k):
  """k smallest per row of `dist`, ties by the order of its columns.

  Args:
    dist: (Q, N) int distances; columns in ascending position order among
      equal distances.
    positions: (Q, N) int64 database position of each column.
    k: 1 <= k <= N.

  Returns:
    (positions (Q, k), distances (Q, k)), ascending distance.
  """
  rows = dist.shape[0]
  kth = np.partition(dist, k - 1, axis=1)[:, k - 1:k]
  below = dist < kth
  tied = dist == kth
  need = k - below.sum(1, keepdims=True)
  take = below | (tied & (np.cumsum(tied, axis=1, dtype=np.int32) <= need))
  columns = np.nonzero(take)[1].reshape(rows, k)  # ascending within each row
  picked = np.take_along_axis(dist, columns, 1)
  order = np.argsort(picked, axis=1, kind='stable')
  columns = np.take_along_axis(columns, order, 1)
  return (np.take_along_axis(positions, columns, 1),
          np.take_along_axis(picked, order, 1))


class Searcher:
  """Exact k-NN over (N, W) uint64 words with optional per-concept weights."""

  def __init__(self, words, nbit: int, *, num_concepts: Optional[int] = None):
    self.words, self.nbit, self.num_concepts = words, int(nbit), num_concepts
    self.last_method = None

  def search(self, query_words, k: int, *, weights=None, method: str = 'auto',
             progress=None):
    """(positions int64 (Q, k), distances int32 (Q, k)); see the module doc."""
    del method, progress  # One method here.
    query = np.ascontiguousarray(query_words, np.uint64)
    num_db, num_words = self.words.shape
    if not 1 <= k <= num_db:
      raise ValueError(f'k must be in [1, {num_db}], got {k}')
    if weights is not None:
      masks = concept_masks(self.nbit, self.num_concepts, num_words)
      masks, weights = masks[weights > 0], np.asarray(weights)[weights > 0]
    block = max(k, _PAIR_WORDS // max(1, len(query) * num_words))
    best_pos = np.zeros((len(query), 0), np.int64)
    best_dist = np.zeros((len(query), 0), np.int64)
    for start in range(0, num_db, block):
      rows = np.asarray(self.words[start:start + block])
      diff = query[:, None, :] ^ rows[None]
      if weights is None:
        dist = np.bitwise_count(diff).sum(-1, dtype=np.int64)
      else:
        dist = sum(int(w) * np.bitwise_count(diff & mask).sum(-1, dtype=np.int64)
                   for mask, w in zip(masks, weights))
      pos = np.broadcast_to(np.arange(start, start + len(rows)), dist.shape)
      dist = np.concatenate([best_dist, dist], 1)
      pos = np.concatenate([best_pos, pos], 1)
      best_pos, best_dist = smallest_k(dist, pos, min(k, dist.shape[1]))
    self.last_method = 'numpy'
    return best_pos.astype(np.int64), best_dist.astype(np.int32)
