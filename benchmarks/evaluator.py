r"""mAP@R evaluator speed and peak memory: ours vs the official algorithm in numpy.

  python benchmarks/evaluator.py               # CUB + NABirds, 16/32/64 bits
  python benchmarks/evaluator.py --sizes=cub --bits=64 --repeats=3
  python benchmarks/evaluator.py --sizes=100k_1m --bits=64 --modes=index \
      --reference_queries=50

Reference: the official `calculate_mAP` algorithm (the batch path of
`utils/hashing.py`, which ConceptHash's experiments import; the file lives in
the authors' code base, e.g. CISiPLab/cisip-FIRe) written in numpy: Hamming
distances from +-1 inner products in query batches of <= 256 MB, a stable
argsort of each row, retrieved labels, cumulative matches, AP over the top R.
Ours: the shipped `evaluation.map_at_r` (ties="index" must equal the reference
to 1e-6; ties="average" is the tie-order expectation, a different value).
All measurements of a setting run in this process, one after the other. Peak
memory is the peak resident set above the level before the call (sampled
every 2 ms); CPU is process CPU seconds (ours uses every core). "first"
includes jit compilation; "warm" is the best of `repeats` calls once compiled.
Data: class-structured synthetic codes (each class a random centre, 10% of
bits flipped per item), so relevant items rank early and distances tie
heavily, as with trained codes. For 100k x 1M the reference runs on
`reference_queries` queries and is extrapolated linearly (marked ~).
"""
import os
import sys
import threading
import time

from absl import app
from absl import flags
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from concepthash_jax import evaluation  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_list('sizes', ['cub', 'nabirds'], 'Settings: cub, nabirds, 100k_1m.')
flags.DEFINE_list('bits', ['16', '32', '64'], 'Code lengths.')
flags.DEFINE_list('modes', ['index', 'average'], 'Tie modes of ours to time.')
flags.DEFINE_integer('repeats', 1, 'Timed repeats (reference and warm ours).')
flags.DEFINE_integer('reference_queries', 100,
                     'Queries the reference runs on when it would take hours '
                     '(100k_1m); its time is scaled to all queries.')
flags.DEFINE_bool('reference', True, 'Also run the numpy reference.')

SIZES = {  # name: (queries, database items, classes)
    'cub': (5794, 5994, 200),
    'nabirds': (24633, 23929, 555),
    '100k_1m': (100_000, 1_000_000, 1000),
}


class PeakRSS:
  """Samples this process's resident set; .peak = bytes above the start level."""

  def __init__(self, interval=0.002):
    self.interval = interval
    self.page = os.sysconf('SC_PAGE_SIZE')

  def _rss(self):
    """Current resident set in bytes."""
    with open('/proc/self/statm') as f:
      return int(f.read().split()[1]) * self.page

  def _run(self):
    """Sampling loop of the background thread."""
    while not self._stop.is_set():
      self._max = max(self._max, self._rss())
      time.sleep(self.interval)

  def __enter__(self):
    """Starts sampling."""
    self._start = self._max = self._rss()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    """Stops sampling and records the peak."""
    self._stop.set()
    self._thread.join()
    self.peak = max(self._max, self._rss()) - self._start


def make_codes(centres, labels, rng):
  """Class-structured +-1 float32 codes: class centre, 10% of bits flipped."""
  flips = rng.random((len(labels), centres.shape[1]), np.float32) < 0.1
  return np.where(flips, -centres[labels], centres[labels]).astype(np.float32)


def reference_map(query_codes, query_labels, db_codes, db_labels, R=None):
  """Official calculate_mAP (batch version), numpy: stable argsort per query."""
  num_db, nbit = db_codes.shape
  R = num_db if R is None else R
  # The official code bounds the distance block at 1-2 GB; 256 MB keeps the
  # sort indices and cumulative sums of a block ~1.5 GB on a shared host.
  batch = max(1, min(len(query_codes), (256 << 20) // (num_db * 4)))
  aps = []
  for s in range(0, len(query_codes), batch):
    dist = 0.5 * (nbit - query_codes[s:s + batch] @ db_codes.T)
    order = np.argsort(dist, axis=1, kind='stable')[:, :R]
    match = db_labels[order] == query_labels[s:s + batch, None]
    del dist, order
    num_rel = match.sum(1)
    precision = np.cumsum(match, 1) / np.arange(1, R + 1)
    ap = (precision * match).sum(1) / np.maximum(num_rel, 1)
    aps.append(np.where(num_rel > 0, ap, 0.0))
  return float(np.concatenate(aps).mean())


def timed(fn):
  """(result, wall seconds, peak extra RSS bytes, CPU seconds) of one call."""
  with PeakRSS() as mem:
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
  return out, seconds, mem.peak, cpu


def bench(size, nbit):
  """Rows of the table for one (size, bits) setting."""
  num_q, num_db, classes = SIZES[size]
  rng = np.random.default_rng(nbit)
  q_labels = rng.integers(0, classes, num_q)
  d_labels = rng.integers(0, classes, num_db)
  centres = rng.choice(np.array([-1.0, 1.0], np.float32), (classes, nbit))
  db_codes = make_codes(centres, d_labels, rng)
  q_codes = make_codes(centres, q_labels, rng)
  db_packed = evaluation.pack_codes(db_codes)
  q_packed = evaluation.pack_codes(q_codes)
  rows = []

  ref_value, ref_times, ref_mem, scaled = None, [], 0, False
  if FLAGS.reference:
    sub = num_q
    if size == '100k_1m':
      sub, scaled = min(FLAGS.reference_queries, num_q), True
    ref_cpu = []
    for _ in range(FLAGS.repeats):
      ref_value, seconds, peak, cpu = timed(lambda: reference_map(
          q_codes[:sub], q_labels[:sub], db_codes, d_labels))
      ref_times.append(seconds * num_q / sub)
      ref_cpu.append(cpu * num_q / sub)
      ref_mem = max(ref_mem, peak)
    rows.append(dict(size=size, nbit=nbit, method='numpy reference',
                     first=None, warm=min(ref_times), peak=ref_mem,
                     value=ref_value, scaled=scaled, speedup=None,
                     all_times=ref_times, cpu=min(ref_cpu)))
  del db_codes
  for mode in FLAGS.modes:
    call = lambda: evaluation.map_at_r(q_packed, q_labels, db_packed, d_labels,
                                       ties=mode)
    value, first, peak, cpu = timed(call)
    warm, cpus = [], [cpu]
    if size != '100k_1m':  # one run per mode at 100k x 1M
      cpus = []
      for _ in range(FLAGS.repeats):
        value, seconds, p, cpu = timed(call)
        warm.append(seconds)
        cpus.append(cpu)
        peak = max(peak, p)
    best = min(warm) if warm else first
    if mode == 'index' and ref_value is not None and not scaled:
      assert abs(value - ref_value) <= 1e-6, (value, ref_value)
    rows.append(dict(size=size, nbit=nbit, method=f'ours ties={mode}',
                     first=first, warm=best, peak=peak, value=value,
                     scaled=False, all_times=warm, cpu=min(cpus),
                     speedup=min(ref_times) / best if ref_times else None))
  return rows


def table(rows):
  """Markdown table of the rows."""
  lines = ['| setting | bits | method | first call (s) | warm (s) | speedup vs '
           'reference | CPU (s) | peak extra RSS (MB) | mAP@R |',
           '|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    num_q, num_db, _ = SIZES[r['size']]
    first = '' if r['first'] is None else f'{r["first"]:.3f}'
    warm = ('~' if r['scaled'] else '') + f'{r["warm"]:.3f}'
    if len(r['all_times']) > 1:
      warm += ' (' + ', '.join(f'{t:.3f}' for t in r['all_times']) + ')'
    speed = '' if r['speedup'] is None else f'{r["speedup"]:.1f}x'
    lines.append(f'| {r["size"]} ({num_q} x {num_db}) | {r["nbit"]} | '
                 f'{r["method"]} | {first} | {warm} | {speed} | '
                 f'{r["cpu"]:.3f} | {r["peak"] / 2**20:.0f} | {r["value"]:.6f} |')
  return '\n'.join(lines)


def main(argv):
  """Runs every requested setting and prints the table."""
  del argv
  rows = []
  for size in FLAGS.sizes:
    for nbit in FLAGS.bits:
      rows.extend(bench(size, int(nbit)))
      print(table(rows[-1 - len(FLAGS.modes):]), flush=True)
  print('\n' + table(rows))
  print(f'load average at the end: {os.getloadavg()}')


if __name__ == '__main__':
  app.run(main)
