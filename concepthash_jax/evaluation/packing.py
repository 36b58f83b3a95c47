"""Binary codes and labels as packed bits, and the jittable distance and relevance.

Codes are real arrays (a value > 0 is bit 1) or `PackedCodes`; labels are int
class ids (N,) or multi-hot (N, C), where relevant = sharing any label.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class PackedCodes(NamedTuple):
  """Binary codes packed 32 bits a word: bit k -> word k // 32, bit k % 32."""
  bits: np.ndarray  # (N, ceil(K / 32)) uint32
  nbit: int


def pack_codes(codes) -> PackedCodes:
  """Packs real codes (value > 0 is bit 1) into uint32 words.

  Args:
    codes: (N, K) array, or a `PackedCodes` (returned unchanged).

  Returns:
    PackedCodes with bits (N, ceil(K / 32)) uint32; padding bits are 0, so
    they never add to a Hamming distance.
  """
  if isinstance(codes, PackedCodes):
    return codes
  bits = np.asarray(codes) > 0
  if bits.ndim != 2:
    raise ValueError(f'codes must be (N, K), got shape {bits.shape}')
  num, nbit = bits.shape
  words = -(-nbit // 32)
  bits = np.pad(bits, ((0, 0), (0, words * 32 - nbit))).reshape(num, words, 32)
  weights = np.left_shift(np.uint32(1), np.arange(32, dtype=np.uint32))
  return PackedCodes((bits * weights).sum(-1, dtype=np.uint32), nbit)


def pack_labels(labels) -> np.ndarray:
  """Int labels (N,) -> int32 (N,); multi-hot (N, C) -> uint32 words (N, ceil(C/32))."""
  labels = np.asarray(labels)
  if labels.ndim == 1:
    return labels.astype(np.int32)
  if labels.ndim == 2:
    return pack_codes(labels).bits
  raise ValueError(f'labels must be (N,) or (N, C), got shape {labels.shape}')


def hamming_distance(query_bits, db_bits):
  """Hamming distances by popcount of XOR (jittable).

  Args:
    query_bits: (Q, W) uint32 packed codes.
    db_bits: (N, W) uint32 packed codes.

  Returns:
    (Q, N) int32 distances in [0, K].
  """
  xor = query_bits[:, None, :] ^ db_bits[None, :, :]
  return jnp.sum(jax.lax.population_count(xor), axis=-1, dtype=jnp.int32)


def relevance(query_labels, db_labels):
  """Relevance mask from packed labels (jittable).

  Args:
    query_labels: (Q,) int32 class ids or (Q, L) uint32 multi-hot bit words.
    db_labels: (N,) or (N, L), same kind.

  Returns:
    (Q, N) bool: same class, or at least one shared label.
  """
  if query_labels.ndim == 1:
    return query_labels[:, None] == db_labels[None, :]
  shared = query_labels[:, None, :] & db_labels[None, :, :]
  return jnp.any(shared != 0, axis=-1)
