r"""Exact Hamming k-NN: knn.Searcher against FAISS IndexBinaryFlat, side by side.

  python -m benchmarks.search                     # 1,000 x 1,000,000, k = 10
  python -m benchmarks.search --rounds=3 --num_db=100000

Workloads (codes as bytes, the same bits for both sides):
- random codes at 16, 32 and 64 bits (the worst case: no structure to prune);
- one query at a time against the same database (latency per query);
- clustered 64-bit codes: 1,000 random class codes, each item and query a
  random class code with every bit flipped with probability 0.05;
- a concept subset: 64-bit codes of 4 concepts, the distance over concepts 0
  and 2 only; FAISS searches an index of those 32 bits (built once, not
  timed: FAISS has no per-query concept choice).

Both sides run in this process on the same number of threads
(faiss.omp_set_num_threads), in interleaved rounds: every round runs each
workload on ours and then on FAISS, and the table shows the median round.
Ours must give FAISS's distances (FAISS orders equal distances by its heap,
ours by database position, so positions are not compared). Multi-index rows
say whether their results equal the brute pass, positions included; their
first search also builds the tables, timed apart.
"""
import os
import time

from absl import app
from absl import flags
import faiss
import numpy as np

from benchmarks import table
from benchmarks import train_step
from concepthash_jax.evaluation import native
from concepthash_jax import knn

_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Interleaved rounds (median).')
_NUM_DB = flags.DEFINE_integer('num_db', 1_000_000, 'Database codes.')
_NUM_QUERIES = flags.DEFINE_integer('num_queries', 1000, 'Queries.')
_K = flags.DEFINE_integer('k', 10, 'Neighbours per query.')
_SINGLE = flags.DEFINE_integer('single_queries', 100,
                               'Queries searched one per call (latency).')
def as_words(code_bytes) -> np.ndarray:
  """(N, B) uint8 codes (FAISS's layout) -> (N, ceil(B / 8)) uint64 words."""
  num, width = code_bytes.shape
  padded = np.zeros((num, -(-width // 8) * 8), np.uint8)
  padded[:, :width] = code_bytes
  return padded.view(np.uint64)


def random_bytes(rng, num, nbit):
  return rng.integers(0, 256, (num, nbit // 8), dtype=np.uint8)


def clustered_bytes(rng, num_db, num_q, nbit=64, classes=1000, flip=0.05):
  """Class codes, every bit of every draw flipped with probability `flip`."""
  centers = rng.integers(0, 2, (classes, nbit), dtype=np.uint8)

  def draw(num):
    bits = centers[rng.integers(0, classes, num)] ^ (
        rng.random((num, nbit)) < flip)
    return np.packbits(bits, axis=1, bitorder='little')

  return draw(num_db), draw(num_q)


def faiss_index(code_bytes):
  index = faiss.IndexBinaryFlat(code_bytes.shape[1] * 8)
  index.add(code_bytes)
  return index


def timed(fn):
  """(seconds, result) of one call."""
  start = time.perf_counter()
  result = fn()
  return time.perf_counter() - start, result


class Workload:
  """One table row: a search of ours and FAISS's, and their agreement."""

  def __init__(self, name, asked, ours, theirs, reference=None, per_call=1):
    self.name, self.asked, self.ours, self.theirs = name, asked, ours, theirs
    self.reference, self.per_call = reference, per_call
    self.seconds_ours, self.seconds_theirs, self.agree = [], [], True
    self.method = None

  def run_round(self):
    seconds, (method, (positions, distances)) = timed(self.ours)
    self.seconds_ours.append(seconds / self.per_call)
    self.method = method
    seconds, (faiss_dist, _) = timed(self.theirs)
    self.seconds_theirs.append(seconds / self.per_call)
    self.agree &= bool(np.array_equal(faiss_dist, distances))
    if self.reference is not None:
      ref_positions, ref_distances = self.reference
      self.agree &= bool(np.array_equal(ref_positions, positions) and
                         np.array_equal(ref_distances, distances))

  def row(self):
    ours, theirs = np.median(self.seconds_ours), np.median(self.seconds_theirs)
    unit, scale = ('ms', 1e3) if self.per_call > 1 else ('s', 1.0)
    return [self.name, self.asked, self.method, f'{ours * scale:.3f} {unit}',
            f'{theirs * scale:.3f} {unit}', f'{theirs / ours:.1f}x',
            'yes' if self.agree else 'NO']


def build_workloads(rng, threads):
  """The workloads and the notes printed under the table."""
  num_db, num_q, k = _NUM_DB.value, _NUM_QUERIES.value, _K.value
  workloads, notes = [], []

  def ours(searcher, query_words, **kwargs):
    def run():
      result = searcher.search(query_words, k, threads=threads, **kwargs)
      return searcher.last_method, result
    return run

  for nbit in (16, 32, 64):
    db, queries = random_bytes(rng, num_db, nbit), random_bytes(rng, num_q, nbit)
    searcher = knn.Searcher(as_words(db), nbit)
    index = faiss_index(db)
    query_words = as_words(queries)
    for method in ('brute', 'auto'):
      workloads.append(Workload(
          f'random {nbit}-bit, {num_q} queries', method,
          ours(searcher, query_words, method=method),
          lambda index=index, queries=queries: index.search(queries, k)))
    if nbit == 64:
      single = query_words[:_SINGLE.value]
      single_bytes = queries[:_SINGLE.value]

      def one_by_one_ours(searcher=searcher, single=single):
        results = [searcher.search(single[i:i + 1], k, method='brute',
                                   threads=threads)
                   for i in range(len(single))]
        return searcher.last_method, tuple(
            np.concatenate(parts) for parts in zip(*results))

      def one_by_one_faiss(index=index, single_bytes=single_bytes):
        results = [index.search(single_bytes[i:i + 1], k)
                   for i in range(len(single_bytes))]
        return tuple(np.concatenate(parts) for parts in zip(*results))

      workloads.append(Workload(
          f'random 64-bit, 1 query a call ({len(single)} calls)', 'brute',
          one_by_one_ours, one_by_one_faiss, per_call=len(single)))

  db, queries = clustered_bytes(rng, num_db, num_q)
  searcher = knn.Searcher(as_words(db), 64)
  query_words = as_words(queries)
  index = faiss_index(db)
  brute = searcher.search(query_words, k, method='brute', threads=threads)
  build, _ = timed(lambda: searcher.search(
      query_words[:1], k, method='multi_index', threads=threads))
  notes.append(f'multi-index tables of the clustered database: built in '
               f'{build:.3f} s on the first multi-index search (then kept)')
  for method in ('auto', 'multi_index'):
    workloads.append(Workload(
        f'clustered 64-bit, {num_q} queries', method,
        ours(searcher, query_words, method=method),
        lambda index=index, queries=queries: index.search(queries, k),
        reference=brute))

  db, queries = random_bytes(rng, num_db, 64), random_bytes(rng, num_q, 64)
  searcher = knn.Searcher(as_words(db), 64, num_concepts=4)
  weights = knn.concept_weights(4, concepts=[0, 2])
  chosen = np.r_[0:2, 4:6]  # the bytes of concepts 0 and 2 (16 bits each)
  index = faiss_index(np.ascontiguousarray(db[:, chosen]))
  sub_queries = np.ascontiguousarray(queries[:, chosen])
  workloads.append(Workload(
      f'concepts 0 and 2 of 4, 64-bit, {num_q} queries', 'auto',
      ours(searcher, as_words(queries), weights=weights),
      lambda index=index, sub_queries=sub_queries: index.search(sub_queries,
                                                                k)))
  return workloads, notes


def main(argv):
  del argv
  threads = native.cpu_threads()
  faiss.omp_set_num_threads(threads)
  print(f'CPU: {train_step.cpu_line(("popcnt", "avx2", "avx512"))}')
  print(f'threads: {threads} (ours and FAISS); native variant: '
        f'{knn._hamming.variant() if knn._NATIVE else "not built"}; '  # pylint: disable=protected-access
        f'faiss {faiss.__version__}; database {_NUM_DB.value:,} codes, '
        f'k = {_K.value}, median of {_ROUNDS.value} interleaved rounds')
  print(f'load average before: {" ".join(f"{x:.2f}" for x in os.getloadavg())}')
  rng = np.random.default_rng(0)
  workloads, notes = build_workloads(rng, threads)
  for _ in range(_ROUNDS.value):
    for workload in workloads:
      workload.run_round()
  table.print_table(
      ['workload', 'ours asked', 'ours ran', 'ours', 'FAISS flat',
       'FAISS / ours',
       'same distances'], (w.row() for w in workloads))
  for note in notes:
    print(f'- {note}')
  print(f'load average after: {" ".join(f"{x:.2f}" for x in os.getloadavg())}')


if __name__ == '__main__':
  app.run(main)
