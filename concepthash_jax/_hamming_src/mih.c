/* Exact k nearest neighbours by multi-index hashing (knn.Searcher): the
codes split into m substrings, a hash table per substring (knn._Tables, built
here by a counting sort), and every query probes the buckets at growing
substring radius until no unseen item can enter its k best. The heaps and the
tie rule: knn.h. */
#include "knn.h"

static inline __attribute__((always_inline)) uint64_t substring(
    const uint64_t *code, int64_t start, int64_t width) {
  const int64_t word = start >> 6, shift = start & 63;
  uint64_t bits = code[word] >> shift;
  if (shift + width > 64) bits |= code[word + 1] << (64 - shift);
  return bits & (((uint64_t)1 << width) - 1);
}

/* Whether an item met in table t at radius s (its substring distance there)
   is met for the first time: tables before t are searched first at each
   radius, and every radius below s before s. */
static inline __attribute__((always_inline)) int first_meeting(
    const KnnJob *job, const uint64_t *qsub, const uint64_t *code, int64_t t,
    int64_t s) {
  for (int64_t u = 0; u < job->num_tables; ++u) {
    if (u == t) continue;
    const int64_t d = __builtin_popcountll(
        substring(code, job->starts[u], job->widths[u]) ^ qsub[u]);
    if (u < t ? d <= s : d < s) return 0;
  }
  return 1;
}

/* One query by multi-index hashing: radius s = 0, 1, ... in every table,
   until no unseen item can beat the k-th best. An unseen item after table t
   at radius s has substring distance > s in tables <= t and >= s in the
   others, so its distance is >= s * m + t + 1. Past the work budget the
   query goes by a brute pass instead. */
static inline __attribute__((always_inline)) void mih_query(
    const KnnJob *job, int64_t q, uint64_t *qsub, uint64_t *cols,
    TileScan scan, int transpose, int64_t words) {
  const int64_t k = job->k, m = job->num_tables, num_db = job->num_db;
  uint64_t *heap = (uint64_t *)(job->pos + q * k);
  const uint64_t *qb = job->qbits + q * words;
  int64_t size = 0, work = 0, widest = 0;
  for (int64_t t = 0; t < m; ++t) {
    qsub[t] = substring(qb, job->starts[t], job->widths[t]);
    if (job->widths[t] > widest) widest = job->widths[t];
  }
  for (int64_t s = 0; s <= widest; ++s) {
    for (int64_t t = 0; t < m; ++t) {
      const int64_t width = job->widths[t];
      const uint32_t *offsets = job->offsets + job->bases[t];
      const uint32_t *items = job->items + t * num_db;
      const uint64_t *codes = job->codes + t * num_db * words;
      const uint64_t end = (uint64_t)1 << width;
      /* Flips of exactly s of the width bits, in increasing order. */
      for (uint64_t flip = ((uint64_t)1 << s) - 1; s <= width && flip < end;) {
        const uint64_t key = qsub[t] ^ flip;
        const uint32_t lo = offsets[key], hi = offsets[key + 1];
        work += job->probe_cost + (hi - lo);
        for (uint32_t e = lo; e < hi; ++e) {
          const uint64_t *code = codes + (int64_t)e * words;
          const uint64_t cand =
              (uint64_t)distance(qb, code, words) << 32 | items[e];
          if (size == k && cand >= heap[0]) continue;
          if (first_meeting(job, qsub, code, t, s))
            heap_offer(heap, &size, k, cand);
        }
        if (work > job->budget) {
          job->fell_back[q] = 1;
          /* Its own heap size, not &size: `size` passed out of the unit
             would have to live in memory all through the loops above. */
          int64_t brute_size;
          ch_knn_block(job, q, 1, &brute_size, cols, scan, transpose);
          return;
        }
        if (!flip) break;
        const uint64_t low = flip & -flip, next = flip + low;
        flip = (((next ^ flip) >> 2) / low) | next;
      }
      if (size == k && (heap[0] >> 32) < (uint64_t)(s * m + t + 1)) {
        ch_heap_finish(heap, size, job->dist + q * k);
        return;
      }
    }
  }
  ch_heap_finish(heap, size, job->dist + q * k); /* every item was met */
}

static inline __attribute__((always_inline)) void mih_work(
    KnnJob *job, TileScan scan, int transpose) {
  uint64_t *qsub = malloc(job->num_tables * sizeof(uint64_t));
  uint64_t *cols = ch_knn_scratch(job, transpose);
  if (!qsub || (transpose && job->words > 1 && !cols)) {
    atomic_store(&job->failed, 1);
  } else {
    for (;;) {
      const int64_t q = atomic_fetch_add(&job->next_block, 1);
      if (q >= job->num_q || atomic_load(&job->failed)) break;
      if (job->words == 1)
        mih_query(job, q, qsub, cols, scan, transpose, 1);
      else if (job->words == 2)
        mih_query(job, q, qsub, cols, scan, transpose, 2);
      else
        mih_query(job, q, qsub, cols, scan, transpose, job->words);
    }
  }
  free(qsub), free(cols);
}

/* `tile`: the same variant's brute tile scan, for queries past the budget. */
#define MIH_VARIANT(name, attr, tile, transpose) \
  attr void name(KnnJob *job) { mih_work(job, tile, transpose); }

MIH_VARIANT(ch_mih_default, , ch_tile_default, 0)
#ifdef CH_X86
MIH_VARIANT(ch_mih_popcnt, TARGET_POPCNT, ch_tile_popcnt, 0)
MIH_VARIANT(ch_mih_avx512, TARGET_AVX512, ch_tile_avx512, 1)
#endif

static void multi_index_body(void *job) { ch_variant()->multi_index(job); }

/* The table arrays of knn._Tables: (starts, widths, bases, offsets, items,
   codes), checked against each other. */
static int table_buffers(KnnJob *job, Py_buffer *v, int *got, PyObject **o,
                         int writable) {
  Py_buffer probe;
  if (PyObject_GetBuffer(o[0], &probe, PyBUF_C_CONTIGUOUS)) return -1;
  job->num_tables = probe.len / 8;
  PyBuffer_Release(&probe);
  if (ch_get_buffer(o[0], &v[0], 0, 8, job->num_tables, "starts")) return -1;
  *got = 1;
  if (ch_get_buffer(o[1], &v[1], 0, 8, job->num_tables, "widths")) return -1;
  *got = 2;
  if (ch_get_buffer(o[2], &v[2], 0, 8, job->num_tables, "bases")) return -1;
  *got = 3;
  job->starts = v[0].buf, job->widths = v[1].buf, job->bases = v[2].buf;
  int64_t num_offsets = 0;
  for (int64_t t = 0; t < job->num_tables; ++t) {
    const int64_t start = job->starts[t], width = job->widths[t];
    if (width < 1 || width > 30 || start < 0 ||
        start + width > job->words * 64 || job->bases[t] != num_offsets) {
      PyErr_SetString(PyExc_ValueError, "inconsistent multi-index tables");
      return -1;
    }
    num_offsets += ((int64_t)1 << width) + 1;
  }
  const int64_t entries = job->num_tables * job->num_db;
  if (ch_get_buffer(o[3], &v[3], writable, 4, num_offsets, "offsets"))
    return -1;
  *got = 4;
  if (ch_get_buffer(o[4], &v[4], writable, 4, entries, "items")) return -1;
  *got = 5;
  if (ch_get_buffer(o[5], &v[5], writable, 8, entries * job->words, "codes"))
    return -1;
  *got = 6;
  job->offsets = v[3].buf, job->items = v[4].buf, job->codes = v[5].buf;
  return 0;
}

/* multi_index(qbits, dbits, nbit, k, starts, widths, bases, offsets, items,
   codes, budget, probe_cost, positions, distances, fell_back, threads) */
PyObject *ch_multi_index(PyObject *self, PyObject *args) {
  PyObject *qobj, *dobj, *t[6], *pobj, *distobj, *fobj;
  Py_ssize_t nbit, k, budget, probe_cost, threads;
  if (!PyArg_ParseTuple(args, "OOnnOOOOOOnnOOOn", &qobj, &dobj, &nbit, &k,
                        &t[0], &t[1], &t[2], &t[3], &t[4], &t[5], &budget,
                        &probe_cost, &pobj, &distobj, &fobj, &threads))
    return NULL;
  KnnJob job;
  memset(&job, 0, sizeof(job));
  Py_buffer v[4], tv[6], fv;
  int got = 0, tgot = 0, fgot = 0;
  PyObject *result = NULL;
  if (ch_knn_buffers(&job, v, &got, qobj, dobj, nbit, k, pobj, distobj))
    goto out;
  if (table_buffers(&job, tv, &tgot, t, 0)) goto out;
  if (ch_get_buffer(fobj, &fv, 1, 1, job.num_q, "fell_back")) goto out;
  fgot = 1;
  job.fell_back = fv.buf, job.budget = budget, job.probe_cost = probe_cost;
  if (ch_run_threads(multi_index_body, &job, &job.next_block, &job.failed,
                  threads)) goto out;
  result = Py_NewRef(Py_None);
out:
  for (int i = 0; i < got; ++i) PyBuffer_Release(&v[i]);
  for (int i = 0; i < tgot; ++i) PyBuffer_Release(&tv[i]);
  if (fgot) PyBuffer_Release(&fv);
  return result;
}

/* Table u of the multi-index: a counting sort of the items by the key of
   substring u (a bucket's items in ascending position). */
static void build_table(const KnnJob *job, int64_t u) {
  const int64_t words = job->words, num_db = job->num_db;
  const uint64_t *db = job->dbits;
  uint32_t *offsets = (uint32_t *)job->offsets + job->bases[u];
  uint32_t *items = (uint32_t *)job->items + u * num_db;
  uint64_t *codes = (uint64_t *)job->codes + u * num_db * words;
  const int64_t start = job->starts[u], width = job->widths[u];
  const int64_t buckets = (int64_t)1 << width;
  memset(offsets, 0, (buckets + 1) * sizeof(uint32_t));
  for (int64_t j = 0; j < num_db; ++j)
    offsets[substring(db + j * words, start, width) + 1]++;
  for (int64_t b = 0; b < buckets; ++b) offsets[b + 1] += offsets[b];
  /* offsets[b] is now bucket b's start; used as its fill cursor, it ends at
     bucket b + 1's start, and a shift restores it. */
  for (int64_t j = 0; j < num_db; ++j) {
    const uint32_t e = offsets[substring(db + j * words, start, width)]++;
    items[e] = (uint32_t)j;
    memcpy(codes + (int64_t)e * words, db + j * words, words * 8);
  }
  memmove(offsets + 1, offsets, buckets * sizeof(uint32_t));
  offsets[0] = 0;
}

static void build_body(void *arg) {
  KnnJob *job = arg;
  for (;;) {
    const int64_t u = atomic_fetch_add(&job->next_block, 1);
    if (u >= job->num_tables) break;
    build_table(job, u);
  }
}

/* build_tables(dbits, nbit, starts, widths, bases, offsets, items, codes,
   threads): fills the multi-index tables (see knn.py), a table a thread. */
PyObject *ch_build_tables(PyObject *self, PyObject *args) {
  PyObject *dobj, *t[6];
  Py_ssize_t nbit, threads;
  if (!PyArg_ParseTuple(args, "OnOOOOOOn", &dobj, &nbit, &t[0], &t[1], &t[2],
                        &t[3], &t[4], &t[5], &threads))
    return NULL;
  KnnJob job;
  memset(&job, 0, sizeof(job));
  job.words = (nbit + 63) / 64;
  job.num_db = ch_count_codes_in(dobj, job.words);
  if (job.num_db < 0) return NULL;
  Py_buffer d, tv[6];
  int tgot = 0;
  PyObject *result = NULL;
  if (ch_get_buffer(dobj, &d, 0, 8, job.num_db * job.words, "dbits"))
    return NULL;
  if (table_buffers(&job, tv, &tgot, t, 1)) goto out;
  job.dbits = d.buf;
  if (ch_run_threads(build_body, &job, &job.next_block, &job.failed, threads))
    goto out;
  result = Py_NewRef(Py_None);
out:
  PyBuffer_Release(&d);
  for (int i = 0; i < tgot; ++i) PyBuffer_Release(&tv[i]);
  return result;
}
