"""knn.Searcher against a brute-force numpy reference: ids and distances equal."""
import numpy as np
import pytest

from concepthash_jax import evaluation
from concepthash_jax import knn

_hamming = knn._hamming  # pylint: disable=protected-access
NATIVE_METHODS = ('brute', 'multi_index', 'auto')


def reference(query_codes, db_codes, k, weights=None, num_concepts=None):
  """k nearest by sorting (distance, position): the tie rule of the searcher."""
  differ = (query_codes > 0)[:, None, :] != (db_codes > 0)[None, :, :]
  if weights is None:
    dist = differ.sum(-1)
  else:
    per_concept = differ.reshape(*differ.shape[:2], num_concepts, -1).sum(-1)
    dist = (per_concept * np.asarray(weights)).sum(-1)
  positions = np.stack([np.lexsort((np.arange(len(row)), row))[:k]
                        for row in dist])
  return positions, np.take_along_axis(dist, positions, 1)


def check(searcher, query_codes, db_codes, k, method, **kwargs):
  """Searcher result == reference; returns the method that ran."""
  positions, distances = searcher.search(knn.words64(query_codes), k,
                                         method=method, **kwargs)
  want_pos, want_dist = reference(query_codes, db_codes, k, **{
      key: value for key, value in kwargs.items() if key == 'weights'},
                                  num_concepts=searcher.num_concepts)
  assert positions.dtype == np.int64 and distances.dtype == np.int32
  np.testing.assert_array_equal(distances, want_dist)
  np.testing.assert_array_equal(positions, want_pos)
  return searcher.last_method


def random_codes(rng, num, nbit):
  return rng.standard_normal((num, nbit)).astype(np.float32)


def clustered_codes(rng, num_db, num_q, nbit=64, classes=30, flip=0.05):
  """Class codes with every bit flipped with probability `flip`."""
  centers = rng.integers(0, 2, (classes, nbit))

  def draw(num):
    bits = centers[rng.integers(0, classes, num)] ^ (rng.random((num, nbit))
                                                     < flip)
    return bits.astype(np.float32) - 0.5

  return draw(num_db), draw(num_q)


@pytest.fixture(scope='module')
def rng():
  return np.random.default_rng(0)


def test_words64_layout(rng):
  codes = random_codes(rng, 5, 100)
  words = knn.words64(codes)
  assert words.shape == (5, 2) and words.dtype == np.uint64
  assert words.flags.c_contiguous
  bits = (words[:, :, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)
  np.testing.assert_array_equal(bits.reshape(5, 128)[:, :100], codes > 0)
  assert not bits.reshape(5, 128)[:, 100:].any()
  np.testing.assert_array_equal(knn.words64(evaluation.pack_codes(codes)),
                                words)


@pytest.mark.parametrize('nbit', [8, 16, 32, 48, 64, 128])
def test_random_codes(rng, nbit):
  db, queries = random_codes(rng, 300, nbit), random_codes(rng, 9, nbit)
  searcher = knn.Searcher(knn.words64(db), nbit)
  for k in (1, 10):
    for method in NATIVE_METHODS:
      check(searcher, queries, db, k, method)


def test_xla_path(rng):
  db, queries = random_codes(rng, 200, 48), random_codes(rng, 7, 48)
  searcher = knn.Searcher(knn.words64(db), 48, num_concepts=4)
  for k in (1, 13, 200):
    assert check(searcher, queries, db, k, 'xla') == 'xla'
  check(searcher, queries, db, 9, 'xla', weights=[0, 2, 3, 1])


def test_multi_index_substrings_across_words(rng):
  db, queries = random_codes(rng, 2000, 100), random_codes(rng, 5, 100)
  starts, widths = knn._table_split(100, 2000)  # pylint: disable=protected-access
  assert any(s // 64 != (s + w - 1) // 64 for s, w in zip(starts, widths))
  searcher = knn.Searcher(knn.words64(db), 100)
  for k in (1, 10, 2000):
    check(searcher, queries, db, k, 'multi_index')


def test_every_k(rng):
  db = random_codes(rng, 40, 16)[rng.integers(0, 12, 40)]  # duplicates too
  queries = random_codes(rng, 5, 16)
  searcher = knn.Searcher(knn.words64(db), 16)
  for k in range(1, 41):
    for method in ('brute', 'multi_index'):
      check(searcher, queries, db, k, method)


@pytest.mark.parametrize('nbit', [16, 64, 130])
def test_heavy_ties(rng, nbit):
  distinct = random_codes(rng, 4, nbit)
  db = distinct[rng.integers(0, 4, 500)]
  queries = np.concatenate([distinct[:2], random_codes(rng, 3, nbit)])
  searcher = knn.Searcher(knn.words64(db), nbit)
  for k in (1, 7, 150, 500):
    for method in NATIVE_METHODS:
      check(searcher, queries, db, k, method)


def test_clustered_multi_index_and_auto(rng):
  db, queries = clustered_codes(rng, 50000, 20)
  searcher = knn.Searcher(knn.words64(db), 64)
  assert check(searcher, queries, db, 10, 'multi_index') == 'multi_index'
  assert check(searcher, queries, db, 10, 'auto') == 'multi_index'
  check(searcher, queries, db, 1, 'multi_index')
  check(searcher, queries, db, 300, 'multi_index')


def test_multi_index_queries_past_the_budget_go_by_brute_force(rng):
  db, queries = clustered_codes(rng, 3000, 6)
  searcher = knn.Searcher(knn.words64(db), 64)
  for budget, ran in ((0, 'brute'), (10**9, 'multi_index')):
    positions = np.zeros((6, 10), np.int64)
    distances = np.zeros((6, 10), np.int32)
    assert searcher._multi_index(  # pylint: disable=protected-access
        knn.words64(queries), 10, positions, distances, 2, False,
        budget=budget) == ran
    want_pos, want_dist = reference(queries, db, 10)
    np.testing.assert_array_equal(positions, want_pos)
    np.testing.assert_array_equal(distances, want_dist)


def test_auto_without_the_native_kernel_is_xla(rng, monkeypatch):
  monkeypatch.setattr(knn, '_NATIVE', False)
  db, queries = random_codes(rng, 100, 32), random_codes(rng, 3, 32)
  searcher = knn.Searcher(knn.words64(db), 32)
  assert check(searcher, queries, db, 4, 'auto') == 'xla'
  with pytest.raises(ValueError, match='needs the native kernel'):
    searcher.search(knn.words64(queries), 4, method='brute')


def test_auto_takes_brute_on_random_codes(rng):
  db, queries = random_codes(rng, 20000, 64), random_codes(rng, 20, 64)
  searcher = knn.Searcher(knn.words64(db), 64)
  assert check(searcher, queries, db, 10, 'auto') == 'brute'
  assert searcher._tables is None  # pylint: disable=protected-access


@pytest.mark.parametrize('nbit,num_concepts', [(64, 4), (48, 3), (128, 8)])
def test_concepts_and_weights(rng, nbit, num_concepts):
  db, queries = random_codes(rng, 400, nbit), random_codes(rng, 6, nbit)
  searcher = knn.Searcher(knn.words64(db), nbit, num_concepts=num_concepts)
  for concepts in ([0], [1, 2], list(range(num_concepts - 1))):
    weights = knn.concept_weights(num_concepts, concepts=concepts)
    assert check(searcher, queries, db, 10, 'auto', weights=weights) == 'brute'
  for top in (2, 3, 7):
    weights = rng.integers(0, top + 1, num_concepts)
    weights[0] = top
    check(searcher, queries, db, 10, 'brute', weights=weights)
    check(searcher, queries, db, 400, 'brute', weights=weights)
  # All ones is the plain distance.
  check(searcher, queries, db, 10, 'brute', weights=[1] * num_concepts)


def test_every_variant(rng):
  db, queries = random_codes(rng, 333, 128), random_codes(rng, 5, 128)
  db[100:130] = db[0]  # ties
  cdb, cq = clustered_codes(rng, 3000, 5)
  searcher = knn.Searcher(knn.words64(db), 128, num_concepts=4)
  clustered = knn.Searcher(knn.words64(cdb), 64)
  before = _hamming.variant()
  try:
    for variant in _hamming.variants():
      _hamming.set_variant(variant)
      for k in (1, 10, 333):
        check(searcher, queries, db, k, 'brute')
        check(searcher, queries, db, k, 'brute', weights=[3, 0, 1, 2])
      for k in (1, 10):
        check(clustered, cq, cdb, k, 'multi_index')
  finally:
    _hamming.set_variant(before)


def test_memmapped_words(rng, tmp_path):
  db, queries = random_codes(rng, 1000, 64), random_codes(rng, 4, 64)
  path = tmp_path / 'words.u64'
  knn.words64(db).tofile(path)
  words = np.memmap(path, np.uint64, 'r', shape=(1000, 1))
  searcher = knn.Searcher(words, 64)
  assert searcher.words is words
  for method in NATIVE_METHODS:
    check(searcher, queries, db, 5, method)


def test_concept_weights():
  assert knn.concept_weights(4) is None
  assert knn.concept_weights(4, weights=[1, 1, 1, 1]) is None
  np.testing.assert_array_equal(knn.concept_weights(4, concepts=[3, 1]),
                                [0, 1, 0, 1])
  np.testing.assert_array_equal(knn.concept_weights(3, weights=[0, 2, 1]),
                                [0, 2, 1])
  for kwargs, message in [
      ({'concepts': [4]}, 'concept 4 is out of range'),
      ({'concepts': [-1]}, 'concept -1 is out of range'),
      ({'concepts': []}, 'all concept weights are zero'),
      ({'weights': [1, -2, 0, 0]}, 'weight -2 of concept 1 is negative'),
      ({'weights': [1, 2]}, 'must be 4 values'),
      ({'weights': [0, 0, 0, 0]}, 'all concept weights are zero'),
      ({'weights': [0.5, 1, 1, 1]}, 'must be integers'),
      ({'concepts': [0], 'weights': [1, 1, 1, 1]}, 'not both')]:
    with pytest.raises(ValueError, match=message):
      knn.concept_weights(4, **kwargs)


def test_errors(rng):
  words = knn.words64(random_codes(rng, 10, 64))
  searcher = knn.Searcher(words, 64, num_concepts=4)
  for k in (0, 11, 2.0, True):
    with pytest.raises(ValueError, match='k must be an integer in'):
      searcher.search(words[:2], k)
  with pytest.raises(ValueError, match='threads must be a positive integer'):
    searcher.search(words[:2], 1, threads=0)
  positions, distances = searcher.search(words[:0], 3)
  assert positions.shape == distances.shape == (0, 3)
  with pytest.raises(ValueError, match='unknown method'):
    searcher.search(words[:2], 1, method='fast')
  with pytest.raises(ValueError, match='must be 4 values'):
    searcher.search(words[:2], 1, weights=[1, 2])
  with pytest.raises(ValueError, match='query words must be'):
    searcher.search(words[:2].view(np.int64), 1)
  with pytest.raises(ValueError, match='num_concepts'):
    knn.Searcher(words, 64).search(words[:2], 1, weights=[1, 2, 0, 0])
  with pytest.raises(ValueError, match='cannot be split'):
    knn.Searcher(words, 64, num_concepts=3)
  with pytest.raises(ValueError, match=r'must be \(N, 2\) uint64'):
    knn.Searcher(words, 128)
  with pytest.raises(ValueError, match='C-contiguous'):
    knn.Searcher(knn.words64(random_codes(rng, 10, 128))[:, :1], 64)
  if knn._NATIVE:  # pylint: disable=protected-access
    with pytest.raises(ValueError, match='weighted queries go by'):
      searcher.search(words[:2], 1, weights=[1, 2, 0, 0],
                      method='multi_index')
