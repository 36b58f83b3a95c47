"""Tests of concepthash_jax.index.CodeIndex: exact search, save/load, evaluate."""
import numpy as np
import pytest

from concepthash_jax import evaluation
from concepthash_jax import index as index_lib


def _case(seed, num_q=12, num_db=300, nbit=9):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((num_q, nbit)), rng.integers(0, 4, num_q),
          rng.standard_normal((num_db, nbit)), rng.integers(0, 4, num_db))


def _brute_force(query_codes, db_codes, k):
  """Stable argsort of Hamming distances: exact neighbours, ties by position."""
  dist = (query_codes > 0)[:, None, :] != (db_codes > 0)[None, :, :]
  dist = dist.sum(-1)
  order = np.argsort(dist, axis=1, kind='stable')[:, :k]
  return order, np.take_along_axis(dist, order, 1)


@pytest.mark.parametrize('k', [1, 17, 300])
def test_search_is_exact_with_ties_by_position(k):
  qc, _, dc, dl = _case(0)  # 9 bits, 300 items: many equal distances
  ids, dist = index_lib.CodeIndex(dc, dl).search(qc, k, chunk_size=5)
  want_ids, want_dist = _brute_force(qc, dc, k)
  np.testing.assert_array_equal(dist, want_dist)
  np.testing.assert_array_equal(ids, want_ids)
  assert ids.dtype == np.int64 and dist.dtype == np.int32


def test_search_returns_given_ids_and_rejects_bad_k():
  qc, _, dc, _ = _case(1, nbit=20)
  ids = np.arange(len(dc)) * 10 + 3
  index = index_lib.CodeIndex(dc, ids=ids)
  got, _ = index.search(qc, 5)
  np.testing.assert_array_equal(got, ids[_brute_force(qc, dc, 5)[0]])
  with pytest.raises(ValueError, match='k must be'):
    index.search(qc, len(dc) + 1)
  with pytest.raises(ValueError, match='bits'):
    index.search(qc[:, :8], 3)


def test_save_load_roundtrip_keeps_bits_labels_ids(tmp_path):
  qc, ql, dc, dl = _case(2, nbit=70)  # 70 bits: three words, last one partial
  index = index_lib.CodeIndex(dc, dl, ids=np.arange(len(dc))[::-1])
  path = str(tmp_path / 'db.index.npz')
  index.save(path)
  loaded = index_lib.CodeIndex.load(path)
  assert loaded.nbit == 70 and len(loaded) == len(dc)
  np.testing.assert_array_equal(loaded.packed.bits, index.packed.bits)
  np.testing.assert_array_equal(loaded.labels, dl)
  for a, b in zip(loaded.search(qc, 9), index.search(qc, 9)):
    np.testing.assert_array_equal(a, b)
  # 70 bits pack into 3 uint32 words per item on disk.
  assert loaded.packed.bits.shape == (len(dc), 3)
  assert loaded.packed.bits.dtype == np.uint32


def test_evaluate_matches_map_at_r():
  qc, ql, dc, dl = _case(3)
  index = index_lib.CodeIndex(dc, dl)
  for ties in ('index', 'average'):
    metrics = index.evaluate(qc, ql, ties=ties, R=50)
    assert metrics['map_at_r'] == pytest.approx(
        evaluation.map_at_r(qc, ql, dc, dl, ties=ties, R=50), abs=1e-12)
  with pytest.raises(ValueError, match='without labels'):
    index_lib.CodeIndex(dc).evaluate(qc, ql)


def test_concept_distances_sum_to_hamming_and_codes_unpack():
  qc, _, dc, _ = _case(4, nbit=12)
  sub = index_lib.concept_distances(qc, dc, 4)
  assert sub.shape == (len(qc), len(dc), 4)
  hamming = ((qc > 0)[:, None, :] != (dc > 0)[None, :, :]).sum(-1)
  np.testing.assert_array_equal(sub.sum(-1), hamming)
  index = index_lib.CodeIndex(dc)
  np.testing.assert_array_equal(index.codes([3, 0]), np.where(dc[[3, 0]] > 0, 1, -1))
  with pytest.raises(ValueError, match='sub-codes'):
    index_lib.concept_distances(qc, dc, 5)


@pytest.mark.parametrize('nbit', [16, 70])
def test_faiss_flat_distances_equal_ours_hnsw_searches(nbit):
  # faiss-cpu is in the test extra, so this always runs. Exact FAISS returns
  # the same distances; among equal distances its order may differ from ours
  # (ties by database position), so ids are compared as sets where untied.
  qc, _, dc, _ = _case(5, num_q=50, num_db=4000, nbit=nbit)
  index = index_lib.CodeIndex(dc)
  ids, dist = index.search(qc, 10)
  f_ids, f_dist = index_lib.faiss_search(index.to_faiss('flat'), qc, 10)
  np.testing.assert_array_equal(f_dist, dist)
  full = index_lib.concept_distances(qc, dc, 1)[..., 0]
  np.testing.assert_array_equal(np.take_along_axis(full, f_ids, 1), f_dist)
  h_ids, h_dist = index_lib.faiss_search(index.to_faiss('hnsw'), qc, 10)
  assert h_ids.shape == (50, 10) and (np.diff(h_dist, axis=1) >= 0).all()
  np.testing.assert_array_equal(np.take_along_axis(full, h_ids, 1), h_dist)
  with pytest.raises(ValueError, match="Unknown FAISS"):
    index.to_faiss('ivf')


def test_save_load_keeps_paths_and_info_and_names_a_corrupt_file(tmp_path):
  _, _, dc, dl = _case(6, nbit=8)
  paths = [f'img_{i}.png' for i in range(len(dc))]
  path = str(tmp_path / 'db.npz')
  index_lib.CodeIndex(dc, dl, paths=paths, info={'split': 'train'}).save(path)
  loaded = index_lib.CodeIndex.load(path)
  assert list(loaded.paths) == paths and loaded.info == {'split': 'train'}
  with open(path, 'wb') as f:
    f.write(b'not an npz')
  with pytest.raises(ValueError, match='db.npz is not a readable code index'):
    index_lib.CodeIndex.load(path)
  with pytest.raises(ValueError, match='another model'):
    loaded.search(np.ones((1, 16)), 1)
