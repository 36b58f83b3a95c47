"""Tests of concepthash_jax.evaluation against plain numpy references."""
import itertools
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import train_testlib as lib
from concepthash_jax import evaluation


def _relevance(query_labels, db_labels):
  """(Q, N) bool: same class, or any shared label for multi-hot."""
  if query_labels.ndim == 1:
    return query_labels[:, None] == db_labels[None, :]
  return (query_labels.astype(float) @ db_labels.T.astype(float)) > 0


def _distances(query_codes, db_codes):
  """Hamming distances the official way: from +-1 inner products."""
  q = np.where(query_codes > 0, 1.0, -1.0)
  d = np.where(db_codes > 0, 1.0, -1.0)
  return 0.5 * (q.shape[1] - q @ d.T)


def _reference_ap(query_codes, query_labels, db_codes, db_labels, R=None):
  """Per-query AP@R: stable argsort of Hamming distances (official algorithm)."""
  R = len(db_codes) if R is None else R
  dist = _distances(query_codes, db_codes)
  rel = _relevance(query_labels, db_labels)
  aps = []
  for i in range(len(query_codes)):
    order = np.argsort(dist[i], kind='stable')[:R]
    match = rel[i, order]
    if match.sum() == 0:
      aps.append(0.0)
      continue
    precision = np.cumsum(match) / np.arange(1, R + 1)
    aps.append((precision * match).sum() / match.sum())
  return np.array(aps)


def _random_case(rng, num_q, num_db, nbit, num_classes, multi_hot=False):
  """Random +-1 codes (few bits -> many ties) and labels."""
  qc = rng.standard_normal((num_q, nbit))
  dc = rng.standard_normal((num_db, nbit))
  if multi_hot:
    ql = (rng.random((num_q, num_classes)) < 0.15).astype(np.int32)
    dl = (rng.random((num_db, num_classes)) < 0.15).astype(np.int32)
  else:
    ql = rng.integers(0, num_classes, num_q)
    dl = rng.integers(0, num_classes, num_db)
  return qc, ql, dc, dl


@pytest.mark.parametrize('nbit,R', [(8, None), (8, 1), (8, 37), (13, 120),
                                    (1, None), (1, 90), (64, 200),
                                    (130, 300)])
def test_index_ties_match_stable_argsort_reference(nbit, R):
  qc, ql, dc, dl = _random_case(np.random.default_rng(nbit), 40, 700, nbit, 6)
  ours = evaluation.retrieval_metrics(qc, ql, dc, dl, R=R, per_query=True)
  ref = _reference_ap(qc, ql, dc, dl, R)
  np.testing.assert_allclose(ours['ap'], ref, atol=1e-6)
  assert abs(ours['map_at_r'] - ref.mean()) <= 1e-6
  assert abs(evaluation.map_at_r(qc, ql, dc, dl, R=R) - ref.mean()) <= 1e-6


def test_multi_hot_labels_match_reference():
  qc, ql, dc, dl = _random_case(np.random.default_rng(1), 30, 500, 10, 40,
                                multi_hot=True)
  ql[0] = 0  # a query with no label: nothing is relevant to it
  for R in (None, 50):
    ref = _reference_ap(qc, ql, dc, dl, R).mean()
    assert abs(evaluation.map_at_r(qc, ql, dc, dl, R=R) - ref) <= 1e-6


def test_hand_computed_ap_with_ties_and_cutoff():
  # Distances to the query: items 0..4 -> 1, 0, 1, 0, 2; relevant: 0, 2, 4.
  query = np.array([[1.0, 1.0]])
  db = np.array([[1, -1], [1, 1], [-1, 1], [1, 1], [-1, -1]], float)
  qlab, dlab = np.array([7]), np.array([7, 3, 7, 3, 7])
  # Index ties: order 1, 3, 0, 2, 4 -> relevant at ranks 3, 4, 5.
  full = (1 / 3 + 2 / 4 + 3 / 5) / 3
  assert evaluation.map_at_r(query, qlab, db, dlab) == pytest.approx(full, abs=1e-7)
  # R = 3 keeps one relevant item (rank 3): AP = (1/3) / 1.
  assert evaluation.map_at_r(query, qlab, db, dlab, R=3) == pytest.approx(
      1 / 3, abs=1e-7)
  # R = 2: no relevant item in reach scores 0.
  assert evaluation.map_at_r(query, qlab, db, dlab, R=2) == 0.0


def test_queries_without_relevant_items_count_as_zero():
  qc, _, dc, dl = _random_case(np.random.default_rng(2), 10, 100, 8, 4)
  ql = np.array([0, 1, 99, 2, 99, 3, 99, 0, 1, 2])  # class 99 is not in the db
  ours = evaluation.retrieval_metrics(qc, ql, dc, dl, per_query=True)
  assert np.all(ours['ap'][ql == 99] == 0.0)
  assert ours['map_at_r'] == pytest.approx(
      _reference_ap(qc, ql, dc, dl).mean(), abs=1e-6)
  assert evaluation.map_at_r(qc, np.full(10, 99), dc, dl) == 0.0


def test_result_does_not_depend_on_chunking():
  qc, ql, dc, dl = _random_case(np.random.default_rng(3), 23, 300, 9, 5)
  default = evaluation.map_at_r(qc, ql, dc, dl, R=77)
  for chunk in (1, 7, 64):
    assert evaluation.map_at_r(qc, ql, dc, dl, R=77, chunk_size=chunk) == (
        pytest.approx(default, abs=1e-7))


def test_database_beyond_packed_range_matches_reference():
  # N > 2^15 takes the supergroup path (starts do not fit 16-bit halves).
  qc, ql, dc, dl = _random_case(np.random.default_rng(4), 6, (1 << 15) + 700,
                                12, 3)
  for R in (None, 20000):
    ours = evaluation.retrieval_metrics(qc, ql, dc, dl, R=R, per_query=True,
                                        topk=(1, 5000))
    np.testing.assert_allclose(ours['ap'], _reference_ap(qc, ql, dc, dl, R),
                               atol=2e-6)


def _mean_over_orders(qc, ql, dc, dl, R, orders):
  """Mean index-tie AP over database permutations (each permutes tie order)."""
  return np.mean([_reference_ap(qc, ql, dc[p], dl[p], R) for p in orders], 0)


@pytest.mark.parametrize('R', [None, 3, 5])
def test_average_ties_equal_mean_over_all_tie_orders(R):
  rng = np.random.default_rng(5)
  qc, ql, dc, dl = _random_case(rng, 4, 7, 2, 2)  # 2 bits: big tie blocks
  exact = _mean_over_orders(qc, ql, dc, dl, R,
                            [list(p) for p in itertools.permutations(range(7))])
  ours = evaluation.retrieval_metrics(qc, ql, dc, dl, R=R, ties='average',
                                      per_query=True)
  np.testing.assert_allclose(ours['ap'], exact, atol=1e-9)


def test_average_ties_agree_with_monte_carlo():
  rng = np.random.default_rng(6)
  qc, ql, dc, dl = _random_case(rng, 5, 150, 4, 3)
  R = 40  # cuts inside a tie block for these queries
  samples = np.stack([_reference_ap(qc, ql, dc[p], dl[p], R)
                      for p in (rng.permutation(150) for _ in range(1500))])
  ours = evaluation.retrieval_metrics(qc, ql, dc, dl, R=R, ties='average',
                                      per_query=True)
  stderr = samples.std(0) / np.sqrt(len(samples))
  assert np.all(np.abs(ours['ap'] - samples.mean(0)) <= 4 * stderr + 1e-9)


def test_average_ties_of_identical_codes_equal_random_ranking():
  # All distances tie: E[AP] = (n-1)/(N-1) + (H_N / N)(N-n)/(N-1).
  num_db, n = 50, 9
  dc = np.ones((num_db, 16))
  dl = np.r_[np.zeros(n, int), np.ones(num_db - n, int)]
  harmonic = np.sum(1.0 / np.arange(1, num_db + 1))
  expected = ((n - 1) / (num_db - 1)
              + harmonic / num_db * (num_db - n) / (num_db - 1))
  got = evaluation.map_at_r(np.ones((1, 16)), np.array([0]), dc, dl,
                            ties='average')
  assert got == pytest.approx(expected, abs=1e-12)


def test_other_metrics_match_reference():
  qc, ql, dc, dl = _random_case(np.random.default_rng(7), 30, 400, 10, 5)
  dist = _distances(qc, dc)
  rel = _relevance(ql, dl)
  order = np.argsort(dist, axis=1, kind='stable')
  ranked_rel = np.take_along_axis(rel, order, 1)
  ours = evaluation.retrieval_metrics(qc, ql, dc, dl, topk=(1, 10, 400, 1000),
                                      radius=2)
  for k in (1, 10, 400, 1000):
    ref = ranked_rel[:, :k].sum(1).mean() / k
    assert ours[f'precision_at_{k}'] == pytest.approx(ref, abs=1e-7)
  precision, recall = [], []
  for r in range(11):
    inside = dist <= r
    got = (inside & rel).sum(1)
    retrieved, relevant = inside.sum(1), rel.sum(1)
    precision.append(np.where(retrieved > 0, got / np.maximum(retrieved, 1), 0).mean())
    recall.append(np.where(relevant > 0, got / np.maximum(relevant, 1), 0).mean())
  np.testing.assert_allclose(ours['pr_precision'], precision, atol=1e-12)
  np.testing.assert_allclose(ours['pr_recall'], recall, atol=1e-12)
  assert ours['precision_at_radius_2'] == pytest.approx(precision[2])
  assert ours['recall_at_radius_2'] == pytest.approx(recall[2])


def test_average_precision_at_k_is_expected_hits():
  qc, ql, dc, dl = _random_case(np.random.default_rng(8), 3, 6, 2, 2)
  orders = [list(p) for p in itertools.permutations(range(6))]
  ours = evaluation.retrieval_metrics(qc, ql, dc, dl, ties='average',
                                      topk=(2, 4))
  for k in (2, 4):
    hits = [np.take_along_axis(_relevance(ql, dl[p]), np.argsort(
        _distances(qc, dc[p]), 1, kind='stable'), 1)[:, :k].sum(1) for p in orders]
    assert ours[f'precision_at_{k}'] == pytest.approx(np.mean(hits) / k, abs=1e-12)


def test_jittable_core_matches_reference():
  qc, ql, dc, dl = _random_case(np.random.default_rng(9), 8, 90, 11, 3)
  fn = jax.jit(evaluation.average_precision, static_argnames='R')
  np.testing.assert_allclose(fn(qc, ql, dc, dl, R=30),
                             _reference_ap(qc, ql, dc, dl, 30), atol=1e-6)


def test_pack_codes_layout_and_distance():
  codes = np.random.default_rng(10).standard_normal((5, 40))
  packed = evaluation.pack_codes(codes)
  assert packed.nbit == 40 and packed.bits.shape == (5, 2)
  assert packed.bits.dtype == np.uint32
  bit = (packed.bits[:, 1] >> np.uint32(3)) & np.uint32(1)  # code bit 35
  np.testing.assert_array_equal(bit, codes[:, 35] > 0)
  dist = np.asarray(evaluation.hamming_distance(packed.bits, packed.bits))
  np.testing.assert_array_equal(dist, _distances(codes, codes))


def test_invalid_arguments_raise():
  qc, ql, dc, dl = _random_case(np.random.default_rng(11), 3, 20, 8, 2)
  result = evaluation.map_at_r(qc, ql, dc, dl)
  assert isinstance(result, float)
  with pytest.raises(ValueError, match='ties'):
    evaluation.map_at_r(qc, ql, dc, dl, ties='random')
  with pytest.raises(ValueError, match='R must be'):
    evaluation.map_at_r(qc, ql, dc, dl, R=21)
  with pytest.raises(ValueError, match='bits'):
    evaluation.map_at_r(qc[:, :4], ql, dc, dl)
  assert evaluation.map_at_r(qc, ql, dc, dl, R=-1) == result


def test_map_at_r_rejects_non_finite_codes_counting_the_rows():
  rng = np.random.default_rng(0)
  query, db = rng.normal(size=(5, 16)), rng.normal(size=(9, 16))
  labels_q, labels_db = np.arange(5) % 3, np.arange(9) % 3
  query[[1, 3], 2] = np.nan
  db[4] = np.inf
  with pytest.raises(ValueError, match=r'non-finite \(NaN/inf\) codes in 2 of '
                     r'5 query rows and 1 of 9 database rows'):
    evaluation.map_at_r(query, labels_q, db, labels_db)
  query[[1, 3], 2] = 0.5
  with pytest.raises(ValueError, match=r'codes in 1 of 9 database rows;'):
    evaluation.map_at_r(query, labels_q, db, labels_db)
  db[4] = 1.0
  assert 0.0 <= evaluation.map_at_r(query, labels_q, db, labels_db) <= 1.0


# ------------------------------------------- native kernel, XLA, device mesh

_ENGINE_CASES = [  # (queries, database, bits, classes, R, multi_hot)
    (40, 700, 8, 6, None, False),      # many ties
    (40, 700, 8, 6, 37, False),        # R < N cuts inside tie blocks
    (12, 3000, 1, 3, None, False),     # two distances only
    (30, 1500, 64, 5, 200, False),     # one uint64 word
    (20, 600, 130, 4, None, False),    # three words, padding bits
    (30, 500, 10, 40, 50, True),       # multi-hot, some queries unlabelled
    (4, (1 << 15) + 700, 12, 3, 20000, False),  # XLA's supergroup path
]


def _engine_case(case, seed):
  num_q, num_db, nbit, classes, R, multi_hot = case
  qc, ql, dc, dl = _random_case(np.random.default_rng(seed), num_q, num_db,
                                nbit, classes, multi_hot)
  if multi_hot:
    ql[0] = 0  # nothing is relevant to this query
  else:
    ql[0] = classes + 1  # a class with no database items
  return qc, ql, dc, dl, R


def _assert_same_bits(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key, strict=True)


@pytest.mark.parametrize('case', _ENGINE_CASES)
def test_native_kernel_and_xla_give_the_same_bits(case):
  qc, ql, dc, dl, R = _engine_case(case, seed=case[2])
  for ties in evaluation.TIES:
    native, xla = [evaluation.retrieval_metrics(
        qc, ql, dc, dl, R=R, ties=ties, topk=(1, 5, 100), per_query=True,
        kernel=kernel) for kernel in ('native', 'xla')]
    _assert_same_bits(native, xla)
    if ties == 'index':  # and both are the official stable-argsort value
      np.testing.assert_allclose(native['ap'], _reference_ap(qc, ql, dc, dl, R),
                                 atol=2e-6)


def test_every_instruction_set_variant_gives_the_same_bits():
  # The portable variant is what an AVX2-only (or non-x86) build runs.
  variants = evaluation._hamming.variants()
  assert variants[-1] == 'portable'
  best = evaluation._hamming.variant()
  qc, ql, dc, dl, R = _engine_case((20, 2000, 70, 4, 900, False), seed=1)
  try:
    results = []
    for variant in variants:
      evaluation._hamming.set_variant(variant)
      results.append([evaluation.retrieval_metrics(
          qc, ql, dc, dl, R=R, ties=ties, topk=(3,), per_query=True,
          kernel='native') for ties in evaluation.TIES])
  finally:
    evaluation._hamming.set_variant(best)
  for other in results[1:]:
    for a, b in zip(results[0], other):
      _assert_same_bits(a, b)
  with pytest.raises(ValueError, match='unknown variant'):
    evaluation._hamming.set_variant('sse9')


def test_unknown_kernel_raises():
  qc, ql, dc, dl = _random_case(np.random.default_rng(12), 3, 20, 8, 2)
  with pytest.raises(ValueError, match='kernel'):
    evaluation.map_at_r(qc, ql, dc, dl, kernel='gpu')


_MESH_DRIVER = textwrap.dedent('''
    import os, sys
    os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
    sys.path[:0] = [{tests!r}, {root!r}]
    import jax
    import numpy as np
    import test_evaluation as t
    from concepthash_jax import evaluation
    assert jax.device_count() == 8, jax.devices()
    devices = np.array(jax.devices())
    meshes = [jax.sharding.Mesh(devices[:1], ('data',)),
              jax.sharding.Mesh(devices, ('data',)),
              jax.sharding.Mesh(devices.reshape(2, 4), ('x', 'y'))]
    for i in {cases}:
      case = t._ENGINE_CASES[i]
      qc, ql, dc, dl, R = t._engine_case(case, seed=i)
      for ties in evaluation.TIES:
        run = lambda **kw: evaluation.retrieval_metrics(
            qc, ql, dc, dl, R=R, ties=ties, topk=(1, 50), per_query=True, **kw)
        native = run(kernel='native')
        for mesh in meshes:
          t._assert_same_bits(run(kernel='xla', mesh=mesh), native)
        # On host devices "auto" takes the native kernel, mesh or not.
        t._assert_same_bits(run(mesh=meshes[1]), native)
    print('OK')
''')


def test_database_split_over_eight_devices_gives_the_same_bits():
  # 8 host-platform devices need their own process (XLA reads the flag once).
  tests = os.path.dirname(os.path.abspath(__file__))
  script = _MESH_DRIVER.format(tests=tests, root=os.path.dirname(tests),
                               cases=[1, 5])  # ties + R < N, multi-hot
  run = subprocess.run([sys.executable, '-c', script], capture_output=True,
                       text=True, timeout=600, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  assert run.stdout.strip().endswith('OK')


_PROCESS_DRIVER = textwrap.dedent('''
    import os, sys
    os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
    sys.path[:0] = [{tests!r}, {root!r}]
    import jax
    jax.distributed.initialize('127.0.0.1:{port}', num_processes=2,
                               process_id={process_id})
    import numpy as np
    import test_evaluation as t
    from concepthash_jax import evaluation
    assert jax.device_count() == 4 and jax.local_device_count() == 2
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
    qc, ql, dc, dl, R = t._engine_case(t._ENGINE_CASES[1], seed=0)
    # Several processes: "auto" takes the XLA path over all hosts' devices.
    assert evaluation._pick_kernel('auto', mesh, 8, len(dc)) == 'xla'
    for ties in evaluation.TIES:
      run = lambda **kw: evaluation.retrieval_metrics(
          qc, ql, dc, dl, R=R, ties=ties, topk=(1, 50), per_query=True, **kw)
      t._assert_same_bits(run(mesh=mesh), run(kernel='native'))
    print('OK')
''')


def test_database_split_over_two_processes_gives_the_same_bits():
  tests = os.path.dirname(os.path.abspath(__file__))
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  results = lib.run_together(
      [[sys.executable, '-c', _PROCESS_DRIVER.format(
          tests=tests, root=os.path.dirname(tests), port=port, process_id=i)]
       for i in range(2)], env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=300)
  for result in results:
    assert result.returncode == 0 and result.stdout.strip().endswith('OK'), (
        result.stdout[-500:], result.stderr[-3000:])


def test_curves_false_skips_only_the_radius_metrics():
  qc, ql, dc, dl = _random_case(np.random.default_rng(13), 6, 80, 8, 3)
  full = evaluation.retrieval_metrics(qc, ql, dc, dl, topk=(5,))
  lean = evaluation.retrieval_metrics(qc, ql, dc, dl, topk=(5,), curves=False)
  assert lean == {k: full[k] for k in ('map_at_r', 'precision_at_5')}
