"""Tests of concepthash_jax.index: exact (concept) search, the file, evaluate."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from concepthash_jax import errors
from concepthash_jax import evaluation
from concepthash_jax import index as index_lib
from concepthash_jax import safe_files
from concepthash_jax.index import storage


def _case(seed, num_q=12, num_db=300, nbit=9):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((num_q, nbit)), rng.integers(0, 4, num_q),
          rng.standard_normal((num_db, nbit)), rng.integers(0, 4, num_db))


def _brute_force(query_codes, db_codes, k, weights=None, num_concepts=1):
  """Stable argsort of (concept-weighted) Hamming distances, ties by position."""
  differ = (query_codes > 0)[:, None, :] != (db_codes > 0)[None, :, :]
  per_concept = differ.reshape(*differ.shape[:2], num_concepts, -1).sum(-1)
  weights = np.ones(num_concepts, int) if weights is None else np.asarray(weights)
  dist = (per_concept * weights).sum(-1)
  order = np.argsort(dist, axis=1, kind='stable')[:, :k]
  return order, np.take_along_axis(dist, order, 1)


@pytest.mark.parametrize('k', [1, 17, 300])
def test_search_is_exact_with_ties_by_position(k):
  qc, _, dc, dl = _case(0)  # 9 bits, 300 items: many equal distances
  ids, dist = index_lib.CodeIndex(dc, dl).search(qc, k)
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
  path = str(tmp_path / 'db.chindex')
  index.save(path)
  loaded = index_lib.CodeIndex.load(path)
  assert loaded.nbit == 70 and len(loaded) == len(dc)
  np.testing.assert_array_equal(loaded.packed.bits, index.packed.bits)
  np.testing.assert_array_equal(loaded.labels, dl)
  for a, b in zip(loaded.search(qc, 9), index.search(qc, 9)):
    np.testing.assert_array_equal(a, b)
  # 70 bits: two uint64 words per item, read in place from the file.
  assert loaded.words.shape == (len(dc), 2) and loaded.words.dtype == np.uint64
  assert isinstance(loaded.words, np.memmap) and isinstance(loaded.labels,
                                                            np.memmap)


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
  assert loaded.paths[7] == 'img_7.png' and loaded.paths[[2, 0]] == [
      'img_2.png', 'img_0.png']
  os.remove(path)
  with open(path, 'wb') as f:
    f.write(b'not an npz')
  with pytest.raises(index_lib.IndexFileError, match='db.npz is not a code index'):
    index_lib.CodeIndex.load(path)
  with pytest.raises(ValueError, match='another model'):
    loaded.search(np.ones((1, 16)), 1)


# ------------------------------------------------------------ concept queries


@pytest.mark.parametrize('concepts', [[1], [1, 3], [0, 1, 2, 3]])
def test_concept_subsets_equal_brute_force_with_ties(concepts):
  qc, _, dc, _ = _case(7, num_q=9, num_db=500, nbit=16)  # 4-bit sub-codes: ties
  index = index_lib.CodeIndex(dc, num_concepts=4)
  weights = np.isin(np.arange(4), concepts).astype(int)
  for k in (1, 25, 500):
    ids, dist = index.search(qc, k, concepts=concepts)
    want_ids, want_dist = _brute_force(qc, dc, k, weights, num_concepts=4)
    np.testing.assert_array_equal(dist, want_dist)
    np.testing.assert_array_equal(ids, want_ids)


def test_weights_equal_brute_force_and_bad_weights_are_named():
  qc, _, dc, _ = _case(8, num_q=7, num_db=400, nbit=24)
  index = index_lib.CodeIndex(dc, ids=np.arange(400) + 1000, num_concepts=4)
  for weights in ([1, 0, 2, 1], [3, 1, 1, 5], [0, 0, 7, 0]):
    ids, dist = index.search(qc, 30, weights=weights)
    want_ids, want_dist = _brute_force(qc, dc, 30, weights, num_concepts=4)
    np.testing.assert_array_equal(dist, want_dist)
    np.testing.assert_array_equal(ids, want_ids + 1000)
  for bad, message in (([1, -1, 0, 0], '>= 0'), ([0, 0, 0, 0], 'all concept '
                                                   'weights are zero'),
                       ([1, 1], 'must be 4 values'), ([1.5, 1, 1, 1], 'integers')):
    with pytest.raises(ValueError, match=message):
      index.search(qc, 3, weights=bad)
  with pytest.raises(ValueError, match='concept 4 is out of range'):
    index.search(qc, 3, concepts=[4])
  with pytest.raises(ValueError, match='number of concepts'):
    index_lib.CodeIndex(dc).search(qc, 3, concepts=[0])


def test_composite_query_takes_each_concept_from_its_part():
  qc, _, dc, _ = _case(9, num_q=2, num_db=600, nbit=16)
  head, wing = qc
  query = index_lib.compose([(head, [0, 1]), (wing, [3])], num_concepts=4)
  np.testing.assert_array_equal(query.weights, [1, 1, 0, 1])
  mixed = np.concatenate([head[:8], head[8:12], wing[12:]])
  np.testing.assert_array_equal(query.codes[:8], head[:8])
  np.testing.assert_array_equal(query.codes[12:], wing[12:])
  ids, dist = index_lib.CodeIndex(dc, num_concepts=4).search(query, 20)
  want_ids, want_dist = _brute_force(mixed[None], dc, 20, [1, 1, 0, 1], 4)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(dist, want_dist)
  with pytest.raises(ValueError, match='concept 1 is given by parts 0 and 1'):
    index_lib.compose([(head, [0, 1]), (wing, [1])], num_concepts=4)
  with pytest.raises(ValueError, match='carries its own weights'):
    index_lib.CodeIndex(dc, num_concepts=4).search(query, 3, concepts=[0])


def test_extend_then_search_equals_build_at_once(tmp_path):
  qc, _, dc, dl = _case(10, nbit=20)
  paths = [f'/db/{i}.png' for i in range(len(dc))]
  whole = index_lib.CodeIndex(dc, dl, paths=paths, num_concepts=4)
  path = str(tmp_path / 'db.chindex')
  index_lib.CodeIndex(dc[:100], dl[:100], paths=paths[:100], num_concepts=4,
                      fingerprint='f' * 64).save(path)
  in_memory = index_lib.CodeIndex.load(path).extend(dc[100:], dl[100:],
                                                    paths=paths[100:])
  count = index_lib.CodeIndex.load(path).append_to_file(
      path, dc[100:], dl[100:], paths=paths[100:])
  grown = index_lib.CodeIndex.load(path)
  assert count == len(dc) and isinstance(grown.words, np.memmap)
  np.testing.assert_array_equal(in_memory.words, grown.words)
  assert len(grown) == len(dc) and list(grown.paths) == paths
  assert grown.fingerprint == 'f' * 64 and grown.num_concepts == 4
  np.testing.assert_array_equal(grown.labels, dl)
  for kwargs in ({}, {'concepts': [2]}, {'weights': [2, 1, 0, 1]}):
    for a, b in zip(grown.search(qc, 40, **kwargs), whole.search(qc, 40, **kwargs)):
      np.testing.assert_array_equal(a, b)
  unlabelled = index_lib.CodeIndex(dc[:5]).extend(dc[5:9], dl[5:9])
  np.testing.assert_array_equal(unlabelled.labels, [-1] * 5 + list(dl[5:9]))


# ------------------------------------------------------------------ the file


def _legacy_npz(path, bits, nbit, **arrays):
  """A format-1 index as the first releases wrote it."""
  with open(path, 'wb') as f:
    np.savez(f, format=np.int32(1), bits=bits, nbit=np.int32(nbit), **arrays)


def test_legacy_npz_is_read_and_resaved_in_the_new_format(tmp_path):
  qc, _, dc, dl = _case(11, nbit=70)
  path = str(tmp_path / 'old.index.npz')
  _legacy_npz(path, evaluation.pack_codes(dc).bits, 70, labels=dl,
              paths=np.array([f'{i}.jpg' for i in range(len(dc))]),
              info=np.asarray('{"num_concepts": 7, "split": "train"}'))
  assert index_lib.is_index(path)
  old = index_lib.CodeIndex.load(path)
  assert old.fingerprint is None and old.num_concepts == 7
  assert old.paths[3] == '3.jpg' and old.info['split'] == 'train'
  want = _brute_force(qc, dc, 12)
  for a, b in zip(old.search(qc, 12), want):
    np.testing.assert_array_equal(a, b)
  old.save(path)  # over the old file: it is an index
  with open(path, 'rb') as f:
    assert f.read(len(storage.MAGIC)) == storage.MAGIC
  for a, b in zip(index_lib.CodeIndex.load(path).search(qc, 12), want):
    np.testing.assert_array_equal(a, b)


def test_bad_index_files_are_one_sentence_naming_path_and_fix(tmp_path):
  _, _, dc, _ = _case(12, nbit=16)
  good = str(tmp_path / 'good.chindex')
  index_lib.CodeIndex(dc).save(good)
  with open(good, 'rb') as f:
    payload = f.read()
  cases = {'folder': None, 'truncated': payload[:len(payload) // 2],
           'foreign': b'{"weights": [1, 2, 3]}' * 50, 'header': payload[:40]}
  for name, content in cases.items():
    path = tmp_path / name
    if content is None:
      path.mkdir()
    else:
      path.write_bytes(content)
    with pytest.raises(index_lib.IndexFileError) as info:
      index_lib.CodeIndex.load(str(path))
    message = str(info.value)
    assert str(path) in message and '\n' not in message
    assert 'rebuild' in message or 'give' in message
    assert isinstance(info.value, errors.UserError)
  floats = str(tmp_path / 'floats.npz')
  _legacy_npz(floats, np.random.default_rng(0).standard_normal((5, 1)), 16)
  with pytest.raises(index_lib.IndexFileError, match='floats.npz: its codes are '
                     'float64'):
    index_lib.CodeIndex.load(floats)


def test_save_refuses_a_file_that_is_not_an_index(tmp_path):
  model = tmp_path / 'model.safetensors'
  model.write_bytes(b'\x08\x00\x00\x00\x00\x00\x00\x00{}      ' * 1000)
  before = model.read_bytes()
  with pytest.raises(safe_files.OverwriteError, match='model.safetensors exists '
                     'and is not a code index'):
    index_lib.CodeIndex(np.ones((3, 8))).save(str(model))
  assert model.read_bytes() == before


class _FailingRows(np.ndarray):
  """An array whose rows past 64 cannot be read (a failure mid-write)."""

  def __getitem__(self, item):
    if isinstance(item, slice) and (item.start or 0) >= 64:
      raise OSError(28, 'No space left on device')
    return np.asarray(super().__getitem__(item))


def test_a_save_failing_mid_write_leaves_the_old_index_intact(tmp_path,
                                                              monkeypatch):
  _, _, dc, dl = _case(13, nbit=16)
  path = str(tmp_path / 'db.chindex')
  index_lib.CodeIndex(dc[:50], dl[:50]).save(path)
  with open(path, 'rb') as f:
    before = f.read()
  monkeypatch.setattr(storage, '_COPY_ROWS', 64)
  bigger = index_lib.CodeIndex(dc, dl)
  bigger.labels = bigger.labels.view(_FailingRows)
  with pytest.raises(safe_files.WriteError, match='db.chindex: No space left'):
    bigger.save(path)
  with open(path, 'rb') as f:
    assert f.read() == before
  assert os.listdir(tmp_path) == ['db.chindex']  # no temporary left behind
  assert len(index_lib.CodeIndex.load(path)) == 50


def test_store_search_equals_ours_on_100k_codes(tmp_path):
  from concepthash_jax.index import store  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(14)
  codes = rng.standard_normal((100_000, 32))
  queries = rng.standard_normal((6, 32))
  index = index_lib.CodeIndex(codes, rng.integers(0, 9, 100_000),
                              ids=np.arange(100_000) * 7, num_concepts=4,
                              fingerprint='a' * 64)
  uri = str(tmp_path / 'codes.lance')
  index.to_store(uri, table='codes')
  with pytest.raises(store.StoreError, match="already has a table 'codes'"):
    index.to_store(uri, table='codes')
  for kwargs in ({}, {'concepts': [0, 2]}):
    ids, dist = store.search(uri, queries, 10, **kwargs)
    want_ids, want_dist = index.search(queries, 10, **kwargs)
    np.testing.assert_array_equal(dist, want_dist)
    untied = dist < dist[:, -1:]
    np.testing.assert_array_equal(ids[untied], want_ids[untied])
  assert store.describe(uri).fingerprint == 'a' * 64
  rows, local = store.rows(uri, np.array([[5, 99_999], [5, 7]]))
  assert local.shape == (2, 2) and len(rows) == 3
  np.testing.assert_array_equal(rows.codes(local[0]), index.codes([5, 99_999]))


def test_a_save_killed_mid_write_leaves_the_old_index_intact(tmp_path):
  path = tmp_path / 'db.chindex'
  index_lib.CodeIndex(np.ones((10, 64))).save(str(path))
  before = path.read_bytes()
  # The child rewrites the index with 6M rows in 64k-row blocks,
  # sleeping between blocks so the kill lands inside the write.
  child = subprocess.Popen([sys.executable, '-c', f'''
import time, numpy as np
from concepthash_jax import index as index_lib
from concepthash_jax.index import storage
storage._COPY_ROWS = 1 << 16
real = np.ascontiguousarray
def slow(x, *a, **k):
  time.sleep(0.01)
  return real(x, *a, **k)
storage.np.ascontiguousarray = slow
words = np.zeros((6_000_000, 1), np.uint64)
index_lib.CodeIndex.from_words(words, 64, labels=np.arange(6_000_000)).save({str(path)!r})
'''], env=dict(os.environ, JAX_PLATFORMS='cpu'))
  deadline = time.time() + 60
  while time.time() < deadline and not any(
      p.name.startswith('.db.chindex.tmp') and p.stat().st_size > 1 << 20
      for p in tmp_path.iterdir()):
    time.sleep(0.05)
  child.send_signal(signal.SIGKILL)
  child.wait()
  assert child.returncode == -signal.SIGKILL
  assert path.read_bytes() == before
  assert len(index_lib.CodeIndex.load(str(path))) == 10


def test_store_ivf_index_is_built_and_its_distances_are_true(tmp_path):
  """IVF_FLAT is approximate: what it returns must be real rows at their true
  Hamming distances, never nearer than the exact k-th neighbour."""
  from concepthash_jax.index import store  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(21)
  codes, queries = rng.standard_normal((20_000, 32)), rng.standard_normal((5, 32))
  index = index_lib.CodeIndex(codes, num_concepts=4, fingerprint='b' * 64)
  uri = str(tmp_path / 'codes.lance')
  index.to_store(uri)
  store.create_ivf(uri, num_partitions=4)
  table, _ = store.open_table(uri, 'codes')
  assert [i.index_type for i in table.list_indices()] == ['IvfFlat']
  positions, distances = store.search(uri, queries, 10, ids=False)
  full = ((queries > 0)[:, None, :] != (codes > 0)[None]).sum(-1)
  np.testing.assert_array_equal(np.take_along_axis(full, positions, 1), distances)
  _, exact = index.search_positions(queries, 10)
  assert (distances >= exact).all()
