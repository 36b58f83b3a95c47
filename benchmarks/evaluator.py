r"""mAP@R evaluator speed and peak memory: ours vs the official algorithm in numpy.

  python -m benchmarks.evaluator                       # CUB, 16/32/64 bits
  python -m benchmarks.evaluator --sizes=cub,nabirds --repeats=3
  python -m benchmarks.evaluator --sizes=100k_1m --bits=64 --reference_queries=100
  python -m benchmarks.evaluator --kernel=xla           # the jitted path
  python -m benchmarks.evaluator --variant=popcnt       # as on AVX2-only CPUs

Reference: the official `calculate_mAP` algorithm (the batch path of
`utils/hashing.py`, which ConceptHash's experiments import; the file lives in
the authors' code base, e.g. CISiPLab/cisip-FIRe) written in numpy: Hamming
distances from +-1 inner products in query batches of <= 256 MB, a stable
argsort of each row, retrieved labels, cumulative matches, AP over the top R.
Ours: the shipped `evaluation.map_at_r` (ties="index" must equal the reference
to 1e-6; ties="average" is the tie-order expectation, a different value).
Each repeat runs the reference and every mode of ours back to back in this
process (interleaved rounds), so a ratio compares calls seconds apart. Peak
memory is the peak resident set above the level before the call (sampled
every 2 ms); CPU is process CPU seconds (ours uses every core); load is the
1-minute load average before the call (the box may be shared). "first"
includes jit compilation (XLA) and building the CSR label index; "warm" is the
best of `repeats` calls.
Data: class-structured synthetic codes (each class a random centre, 10% of
bits flipped per item), so relevant items rank early and distances tie
heavily, as with trained codes. For 100k x 1M the reference runs on
`reference_queries` queries and is extrapolated linearly (marked ~); ours
runs once per mode, its index-mode APs of those queries are checked against
the reference, and the "floor" rows time the pass alone on `floor_queries`
queries (XOR + popcount of every pair; then also counting each distance into
a histogram), extrapolated to all queries.
"""
import os
import threading
import time

from absl import app
from absl import flags
import numpy as np

from concepthash_jax import evaluation
from concepthash_jax.evaluation import native

FLAGS = flags.FLAGS
flags.DEFINE_list('sizes', ['cub'], 'Settings: cub, nabirds, 100k_1m.')
flags.DEFINE_list('bits', ['16', '32', '64'], 'Code lengths.')
flags.DEFINE_list('modes', ['index', 'average'], 'Tie modes of ours to time.')
flags.DEFINE_enum('kernel', 'auto', list(evaluation.KERNELS),
                  'Engine of ours (evaluation.retrieval_metrics `kernel`).')
flags.DEFINE_integer('repeats', 3, 'Interleaved rounds (not for 100k_1m).')
flags.DEFINE_integer('reference_queries', 100,
                     'Queries the reference runs on when it would take hours '
                     '(100k_1m); its time is scaled to all queries.')
flags.DEFINE_integer('floor_queries', 5000,
                     'Queries of the floor rows (100k_1m, native kernel).')
flags.DEFINE_bool('reference', True, 'Also run the numpy reference.')
flags.DEFINE_string('variant', None,
                    'Native instruction-set variant (e.g. popcnt: what an '
                    'AVX2-only CPU runs); default: the best this CPU runs.')

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


def reference_ap(query_codes, query_labels, db_codes, db_labels, R=None):
  """Official calculate_mAP (batch version), numpy: per-query AP@R."""
  num_db, nbit = db_codes.shape
  R = num_db if R is None else R
  # The official code bounds the distance block at 1-2 GB; a 256 MB block keeps
  # its sort indices and cumulative sums (several times its size) small enough
  # for a shared host.
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
  return np.concatenate(aps)


def timed(fn):
  """dict(out, seconds, peak extra RSS bytes, CPU seconds, load) of one call."""
  load = os.getloadavg()[0]
  with PeakRSS() as mem:
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
  return dict(out=out, seconds=seconds, peak=mem.peak, cpu=cpu, load=load)


def row(size, nbit, method, runs, *, scale=1.0, first=None, value=None,
        speedup=None):
  """A table row from timed runs (times scaled by `scale`, marked ~ if != 1)."""
  return dict(size=size, nbit=nbit, method=method, first=first,
              times=[r['seconds'] * scale for r in runs],
              cpu=min(r['cpu'] for r in runs) * scale,
              peak=max(r['peak'] for r in runs),
              load=[r['load'] for r in runs], value=value, scaled=scale != 1,
              speedup=speedup)


def ours(q_packed, q_labels, db_packed, d_labels, mode):
  """Per-query AP of ours: what map_at_r computes, keeping the per-query APs."""
  return evaluation.retrieval_metrics(
      q_packed, q_labels, db_packed, d_labels, ties=mode, topk=(), radius=0,
      per_query=True, curves=False, kernel=FLAGS.kernel)['ap']


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
  big = size == '100k_1m'
  sub = min(FLAGS.reference_queries, num_q) if big else num_q
  reference = lambda: reference_ap(q_codes[:sub], q_labels[:sub], db_codes,
                                   d_labels)
  call = {m: (lambda m=m: ours(q_packed, q_labels, db_packed, d_labels, m))
          for m in FLAGS.modes}
  first = {m: timed(call[m]) for m in FLAGS.modes} if not big else {}
  runs = {m: [] for m in ['reference'] * FLAGS.reference + FLAGS.modes}
  for _ in range(1 if big else FLAGS.repeats):  # interleaved rounds
    if FLAGS.reference:
      runs['reference'].append(timed(reference))
    for m in FLAGS.modes:
      runs[m].append(timed(call[m]))
  rows = []
  ref_time, ref_ap = None, None
  if FLAGS.reference:
    ref_ap = runs['reference'][0]['out']
    rows.append(row(size, nbit, 'numpy reference', runs['reference'],
                    scale=num_q / sub, value=float(ref_ap.mean())))
    ref_time = min(rows[-1]['times'])
  for m in FLAGS.modes:
    ap = runs[m][0]['out']
    if m == 'index' and ref_ap is not None:
      # Same values: every reference query's AP within 1e-6.
      assert np.abs(ap[:sub] - ref_ap).max() <= 1e-6, (ap[:sub], ref_ap)
    best = min(r['seconds'] for r in runs[m])
    rows.append(row(size, nbit, f'ours ties={m}', runs[m],
                    first=first[m]['seconds'] if m in first else None,
                    value=float(ap.mean()),
                    speedup=ref_time / best if ref_time else None))
  if big and native.kernel_module() is not None:
    rows.extend(floor_rows(size, nbit, q_packed, db_packed))
  return rows


def floor_rows(size, nbit, q_packed, db_packed):
  """The pass alone (no labels, ranks or AP), extrapolated to all queries."""
  num_q = len(q_packed.bits)
  sub = min(FLAGS.floor_queries, num_q)
  qbits = native.words64(q_packed.bits[:sub])
  dbits = native.words64(db_packed.bits)
  rows = []
  for counts, what in ((False, 'XOR + popcount'),
                       (True, 'XOR + popcount + count')):
    run = timed(lambda c=counts: native.kernel_module().floor(
        qbits, dbits, nbit, c, native.cpu_threads()))
    rows.append(row(size, nbit, f'floor: {what}', [run], scale=num_q / sub))
  return rows


def table(rows):
  """Markdown table of the rows."""
  lines = ['| setting | bits | method | first call (s) | warm (s) | speedup vs '
           'reference | CPU (s) | peak extra RSS (MB) | load | mAP@R |',
           '|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    num_q, num_db, _ = SIZES[r['size']]
    first = '' if r['first'] is None else f'{r["first"]:.3f}'
    warm = ('~' if r['scaled'] else '') + f'{min(r["times"]):.3f}'
    if len(r['times']) > 1:
      warm += ' (' + ', '.join(f'{t:.3f}' for t in r['times']) + ')'
    speed = '' if r['speedup'] is None else f'{r["speedup"]:.1f}x'
    value = '' if r['value'] is None else f'{r["value"]:.6f}'
    load = ', '.join(f'{x:.1f}' for x in r['load'])
    lines.append(f'| {r["size"]} ({num_q} x {num_db}) | {r["nbit"]} | '
                 f'{r["method"]} | {first} | {warm} | {speed} | '
                 f'{r["cpu"]:.3f} | {r["peak"] / 2**20:.0f} | {load} | '
                 f'{value} |')
  return '\n'.join(lines)


def machine():
  """CPU model, the popcount-relevant flags and the engine, one line."""
  model, flags_ = 'unknown CPU', set()
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          model = line.split(':', 1)[1].strip()
        elif line.startswith('flags'):
          flags_ = set(line.split(':', 1)[1].split())
  except OSError:
    pass
  wanted = ('popcnt', 'avx2', 'avx512f', 'avx512bw', 'avx512vl',
            'avx512_vpopcntdq')
  have = ' '.join(f for f in wanted if f in flags_)
  variant = (native.kernel_module().variant() if native.kernel_module() is not None
             else 'not built')
  return (f'{model}, {native.cpu_threads()} cores, flags: {have}; '
          f'kernel={FLAGS.kernel}, native variant: {variant}')


def main(argv):
  """Runs every requested setting and prints the table."""
  del argv
  if FLAGS.variant:
    native.kernel_module().set_variant(FLAGS.variant)
  print(machine(), flush=True)
  rows = []
  for size in FLAGS.sizes:
    for nbit in FLAGS.bits:
      new = bench(size, int(nbit))
      rows.extend(new)
      print(table(new), flush=True)
  print('\n' + table(rows))
  print(f'load average at the end: {os.getloadavg()}')


if __name__ == '__main__':
  app.run(main)
