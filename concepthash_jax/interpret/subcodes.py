"""Sub-codes: the K/M bits of a code that each concept owns (§4.2, Fig. 3).

A K-bit code is M sub-codes of K/M bits, sub-code m coming from concept m.
Here they become integer values and bit strings, Fig. 3's grid layout (cells
of neighbouring values differ in one bit) and galleries of images grouped by
one concept's value.

Pure functions: arrays in, arrays or dicts out. Names: M -> `num_concepts`,
K -> `nbit`; a code value > 0 is bit 1.
"""
import numpy as np


def subcode_values(codes, num_concepts: int):
  """Integer value of every concept's sub-code (first bit most significant).

  Args:
    codes: (N, K) codes; a value > 0 is bit 1.
    num_concepts: M (K must be divisible by M).

  Returns:
    (N, M) int64 in [0, 2^(K/M)).
  """
  codes = np.asarray(codes)
  n, nbit = codes.shape
  if nbit % num_concepts:
    raise ValueError(f'nbit {nbit} is not divisible by {num_concepts} concepts')
  bits = (codes > 0).reshape(n, num_concepts, nbit // num_concepts)
  weights = 2 ** np.arange(bits.shape[-1] - 1, -1, -1, dtype=np.int64)
  return (bits.astype(np.int64) * weights).sum(-1)


def subcode_string(value: int, bits: int) -> str:
  """'01'-style bit string of a sub-code value (first bit first)."""
  return format(int(value), f'0{bits}b')


def _gray_rank(bits: str) -> int:
  """Position of a Gray-code word in the Gray sequence."""
  rank, acc = 0, 0
  for ch in bits:
    acc ^= int(ch)
    rank = rank * 2 + acc
  return rank


def subcode_layout(bits: int):
  """Grid cell of every sub-code value, generalising Fig. 3's quadrants.

  Fig. 3 (2 bits): 00 bottom-left, 01 top-left, 11 top-right, 10
  bottom-right, i.e. the first bit picks the column and the second the row
  from the bottom, so neighbouring cells differ in one bit. With more bits the
  first ceil(b/2) bits pick the column and the rest the row, each in Gray
  order, keeping that property.

  Args:
    bits: bits per sub-code (K/M).

  Returns:
    (rows, cols, {value: (row from top, col)}).
  """
  col_bits = (bits + 1) // 2
  row_bits = bits - col_bits
  rows, cols = 2 ** row_bits, 2 ** col_bits
  cells = {}
  for value in range(2 ** bits):
    word = subcode_string(value, bits)
    col = _gray_rank(word[:col_bits])
    row = _gray_rank(word[col_bits:]) if row_bits else 0
    cells[value] = (rows - 1 - row, col)
  return rows, cols, cells


def gallery_groups(values, scores=None, *, per_group: int = 4,
                   max_groups: int = 16):
  """Images grouped by one concept's sub-code value, best-scored first.

  Args:
    values: (N,) sub-code value of each image for one concept.
    scores: (N,) ranking within a group (e.g. the concept's peak
      attention); default image order.
    per_group: images kept per value.
    max_groups: keep the most populous values only (long sub-codes have
      more values than a figure can hold).

  Returns:
    {value: (n,) int indices}, at most max_groups values, largest first.
  """
  values = np.asarray(values)
  scores = (-np.arange(len(values), dtype=np.float64) if scores is None
            else np.asarray(scores, np.float64))
  uniq, counts = np.unique(values, return_counts=True)
  keep = uniq[np.lexsort((uniq, -counts))][:max_groups]
  groups = {}
  for value in keep:
    idx = np.nonzero(values == value)[0]
    order = np.argsort(-scores[idx], kind='stable')
    groups[int(value)] = idx[order][:per_group]
  return groups
