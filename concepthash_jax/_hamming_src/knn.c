/* Exact k nearest neighbours by a brute pass (knn.Searcher): queries go in
blocks that walk the database tile by tile, so a tile stays in cache across
the block, each query with a running threshold (its k-th best distance) so
that most items cost one comparison. The heaps and the tie rule: knn.h. */
#include "knn.h"

static inline __attribute__((always_inline)) uint64_t knn_distance(
    const uint64_t *q, const uint64_t *d, int64_t words, const uint64_t *masks,
    int64_t planes) {
  if (!planes) return distance(q, d, words);
  uint64_t total = 0;
  for (int64_t w = 0; w < words; ++w) {
    const uint64_t x = q[w] ^ d[w];
    for (int64_t p = 0; p < planes; ++p)
      total += (uint64_t)__builtin_popcountll(x & masks[p * words + w]) << p;
  }
  return total;
}

static inline __attribute__((always_inline)) void scalar_tile(
    const KnnJob *job, int64_t q, int64_t *size, int64_t t0, int64_t t1,
    int64_t words, int64_t planes) {
  uint64_t *heap = (uint64_t *)(job->pos + q * job->k);
  const uint64_t *qb = job->qbits + q * words;
  uint64_t limit = *size < job->k ? NO_LIMIT : heap[0] >> 32;
  for (int64_t j = t0; j < t1; ++j) {
    const uint64_t d =
        knn_distance(qb, job->dbits + j * words, words, job->masks, planes);
    if (d < limit)
      limit = heap_offer(heap, size, job->k, d << 32 | (uint64_t)j);
  }
}

/* A tile scan (a TileScan, common.h) per code width class, plain or
   weighted. */
#define SCALAR_TILE(name, attr)                                              \
  attr void name(const KnnJob *job, int64_t q, int64_t *size, int64_t t0,    \
                 int64_t t1, const uint64_t *cols) {                         \
    (void)cols;                                                              \
    const int64_t planes = job->planes;                                      \
    if (job->words == 1 && !planes)                                          \
      scalar_tile(job, q, size, t0, t1, 1, 0);                               \
    else if (job->words == 2 && !planes)                                     \
      scalar_tile(job, q, size, t0, t1, 2, 0);                               \
    else if (!planes)                                                        \
      scalar_tile(job, q, size, t0, t1, job->words, 0);                      \
    else                                                                     \
      scalar_tile(job, q, size, t0, t1, job->words, planes);                 \
  }

SCALAR_TILE(ch_tile_default, )

#ifdef CH_X86

SCALAR_TILE(ch_tile_popcnt, TARGET_POPCNT)

/* Offers the items of `hit` (lanes of `acc`, items first + lane) to a heap,
   in ascending lanes (ascending positions), and updates the limit. A hit
   lane may have lost its place to an earlier lane of the same test. */
TARGET_AVX512 static inline __attribute__((always_inline)) void take_hits(
    uint64_t *heap, int64_t *size, int64_t k, uint64_t *limit,
    __m512i *vlimit, __m512i acc, __mmask8 hit, int64_t first) {
  uint64_t lanes[8];
  _mm512_storeu_si512(lanes, acc);
  do {
    const int lane = __builtin_ctz(hit);
    if (lanes[lane] < *limit)
      *limit = heap_offer(heap, size, k,
                          lanes[lane] << 32 | (uint64_t)(first + lane));
    hit &= hit - 1;
  } while (hit);
  *vlimit = _mm512_set1_epi64((long long)*limit);
}

/* Distances of eight one-word items from their XOR with the query, over
   `planes` masks m (none: plain Hamming). */
#define MAX_UNROLLED_PLANES 3
TARGET_AVX512 static inline __attribute__((always_inline)) __m512i
one_word_distances(__m512i x, const __m512i *m, int64_t planes) {
  if (!planes) return _mm512_popcnt_epi64(x);
  __m512i acc = _mm512_popcnt_epi64(_mm512_and_si512(x, m[0]));
  for (int64_t p = 1; p < planes; ++p)
    acc = _mm512_add_epi64(
        acc, _mm512_slli_epi64(_mm512_popcnt_epi64(_mm512_and_si512(x, m[p])),
                               (unsigned)p));
  return acc;
}

/* Eight items at a time: their distances in one vector, compared with the
   broadcast limit; the common case (no item enters) is one mask test. */
TARGET_AVX512 static inline __attribute__((always_inline)) void avx512_tile(
    const KnnJob *job, int64_t q, int64_t *size, int64_t t0, int64_t t1,
    const uint64_t *cols, int64_t words, int64_t planes) {
  uint64_t *heap = (uint64_t *)(job->pos + q * job->k);
  const uint64_t *qb = job->qbits + q * words;
  const int64_t n = t1 - t0, k = job->k;
  uint64_t limit = *size < k ? NO_LIMIT : heap[0] >> 32;
  __m512i vlimit = _mm512_set1_epi64((long long)limit);
  int64_t j = 0;
  if (words == 1 && planes <= MAX_UNROLLED_PLANES) {
    /* Four vectors a test: a quarter of the branches and loop overhead. */
    const __m512i q0 = _mm512_set1_epi64((long long)qb[0]);
    __m512i m[MAX_UNROLLED_PLANES];
    for (int64_t p = 0; p < MAX_UNROLLED_PLANES; ++p)
      m[p] = p < planes ? _mm512_set1_epi64((long long)job->masks[p])
                        : _mm512_setzero_si512();
#define DISTANCES(at) \
  one_word_distances(_mm512_xor_si512(_mm512_loadu_si512(at), q0), m, planes)
    for (; j + 32 <= n; j += 32) {
      const __m512i a0 = DISTANCES(cols + j);
      const __m512i a1 = DISTANCES(cols + j + 8);
      const __m512i a2 = DISTANCES(cols + j + 16);
      const __m512i a3 = DISTANCES(cols + j + 24);
#undef DISTANCES
      const __mmask8 h0 = _mm512_cmplt_epu64_mask(a0, vlimit);
      const __mmask8 h1 = _mm512_cmplt_epu64_mask(a1, vlimit);
      const __mmask8 h2 = _mm512_cmplt_epu64_mask(a2, vlimit);
      const __mmask8 h3 = _mm512_cmplt_epu64_mask(a3, vlimit);
      if (!(h0 | h1 | h2 | h3)) continue;
      if (h0) take_hits(heap, size, k, &limit, &vlimit, a0, h0, t0 + j);
      if (h1) take_hits(heap, size, k, &limit, &vlimit, a1, h1, t0 + j + 8);
      if (h2) take_hits(heap, size, k, &limit, &vlimit, a2, h2, t0 + j + 16);
      if (h3) take_hits(heap, size, k, &limit, &vlimit, a3, h3, t0 + j + 24);
    }
  }
  for (; j + 8 <= n; j += 8) {
    __m512i acc = _mm512_setzero_si512();
    for (int64_t w = 0; w < words; ++w) {
      const __m512i x = _mm512_xor_si512(_mm512_loadu_si512(cols + w * n + j),
                                         _mm512_set1_epi64((long long)qb[w]));
      if (!planes) {
        acc = _mm512_add_epi64(acc, _mm512_popcnt_epi64(x));
      } else {
        for (int64_t p = 0; p < planes; ++p) {
          const __m512i m =
              _mm512_set1_epi64((long long)job->masks[p * words + w]);
          acc = _mm512_add_epi64(
              acc, _mm512_sll_epi64(_mm512_popcnt_epi64(_mm512_and_si512(x, m)),
                                    _mm_cvtsi64_si128(p)));
        }
      }
    }
    const __mmask8 hit = _mm512_cmplt_epu64_mask(acc, vlimit);
    if (hit) take_hits(heap, size, k, &limit, &vlimit, acc, hit, t0 + j);
  }
  for (; j < n; ++j) {
    const uint64_t d = knn_distance(qb, job->dbits + (t0 + j) * words, words,
                                    job->masks, planes);
    if (d < limit)
      limit = heap_offer(heap, size, k, d << 32 | (uint64_t)(t0 + j));
  }
}

TARGET_AVX512 void ch_tile_avx512(const KnnJob *job, int64_t q, int64_t *size,
                                  int64_t t0, int64_t t1,
                                  const uint64_t *cols) {
  const int64_t planes = job->planes;
  if (job->words == 1 && !planes)
    avx512_tile(job, q, size, t0, t1, cols, 1, 0);
  else if (job->words == 2 && !planes)
    avx512_tile(job, q, size, t0, t1, cols, 2, 0);
  else if (!planes)
    avx512_tile(job, q, size, t0, t1, cols, job->words, 0);
  else if (job->words == 1 && planes == 1)
    avx512_tile(job, q, size, t0, t1, cols, 1, 1);
  else if (job->words == 1 && planes == 2)
    avx512_tile(job, q, size, t0, t1, cols, 1, 2);
  else if (job->words == 1 && planes == 3)
    avx512_tile(job, q, size, t0, t1, cols, 1, 3);
  else if (job->words == 1)
    avx512_tile(job, q, size, t0, t1, cols, 1, planes);
  else
    avx512_tile(job, q, size, t0, t1, cols, job->words, planes);
}
#endif

/* Sorts a heap ascending in place, then splits keys into position (kept in
   place) and distance. */
void ch_heap_finish(uint64_t *h, int64_t size, int32_t *dist) {
  for (int64_t end = size - 1; end > 0; --end) {
    const uint64_t top = h[0];
    h[0] = h[end];
    h[end] = top;
    heap_sift_down(h, end, 0);
  }
  for (int64_t i = 0; i < size; ++i) {
    dist[i] = (int32_t)(h[i] >> 32);
    h[i] &= 0xffffffffu;
  }
}

static int64_t knn_tile_items(int64_t words) {
  const int64_t items = KNN_TILE_WORDS / words;
  return items < 64 ? 64 : items;
}

/* `cols`: knn_tile_items(words) * words scratch where `transpose`. */
void ch_knn_block(const KnnJob *job, int64_t q0, int64_t qn, int64_t *sizes,
                  uint64_t *cols, TileScan scan, int transpose) {
  const int64_t words = job->words, tile = knn_tile_items(words);
  for (int64_t i = 0; i < qn; ++i) sizes[i] = 0;
  for (int64_t t0 = 0; t0 < job->num_db; t0 += tile) {
    const int64_t t1 = t0 + tile < job->num_db ? t0 + tile : job->num_db;
    const uint64_t *tile_cols = job->dbits + t0; /* words == 1: as stored */
    if (transpose && words > 1) {
      const int64_t n = t1 - t0;
      for (int64_t j = 0; j < n; ++j)
        for (int64_t w = 0; w < words; ++w)
          cols[w * n + j] = job->dbits[(t0 + j) * words + w];
      tile_cols = cols;
    }
    for (int64_t i = 0; i < qn; ++i)
      scan(job, q0 + i, &sizes[i], t0, t1, tile_cols);
  }
  for (int64_t i = 0; i < qn; ++i)
    ch_heap_finish((uint64_t *)(job->pos + (q0 + i) * job->k), sizes[i],
                   job->dist + (q0 + i) * job->k);
}

uint64_t *ch_knn_scratch(const KnnJob *job, int transpose) {
  if (!transpose || job->words == 1) return NULL;
  return malloc(knn_tile_items(job->words) * job->words * sizeof(uint64_t));
}

static void knn_body(void *arg) {
  KnnJob *job = arg;
  const Variant *variant = ch_variant();
  int64_t sizes[KNN_BLOCK];
  uint64_t *cols = ch_knn_scratch(job, variant->transpose);
  if (variant->transpose && job->words > 1 && !cols) {
    atomic_store(&job->failed, 1);
    return;
  }
  for (;;) {
    const int64_t q0 = atomic_fetch_add(&job->next_block, 1) * job->block;
    if (q0 >= job->num_q || atomic_load(&job->failed)) break;
    const int64_t qn =
        q0 + job->block < job->num_q ? job->block : job->num_q - q0;
    ch_knn_block(job, q0, qn, sizes, cols, variant->knn_tile,
                 variant->transpose);
  }
  free(cols);
}

int ch_knn_buffers(KnnJob *job, Py_buffer *v, int *got, PyObject *qobj,
                   PyObject *dobj, Py_ssize_t nbit, Py_ssize_t k,
                   PyObject *pobj, PyObject *distobj) {
  job->words = (nbit + 63) / 64;
  job->num_q = ch_count_codes_in(qobj, job->words);
  job->num_db = ch_count_codes_in(dobj, job->words);
  if (job->num_q < 0 || job->num_db < 0) return -1;
  if (k < 1 || k > job->num_db || job->num_db >= ((int64_t)1 << 32)) {
    PyErr_Format(PyExc_ValueError,
                 "k = %zd must be in [1, N] and N < 2^32 (N = %lld)", k,
                 (long long)job->num_db);
    return -1;
  }
  job->k = k;
  if (ch_get_buffer(qobj, &v[0], 0, 8, job->num_q * job->words, "qbits"))
    return -1;
  *got = 1;
  if (ch_get_buffer(dobj, &v[1], 0, 8, job->num_db * job->words, "dbits"))
    return -1;
  *got = 2;
  if (ch_get_buffer(pobj, &v[2], 1, 8, job->num_q * k, "positions")) return -1;
  *got = 3;
  if (ch_get_buffer(distobj, &v[3], 1, 4, job->num_q * k, "distances"))
    return -1;
  *got = 4;
  job->qbits = v[0].buf, job->dbits = v[1].buf;
  job->pos = v[2].buf, job->dist = v[3].buf;
  return 0;
}

/* knn(qbits, dbits, nbit, masks, k, positions, distances, threads) */
PyObject *ch_knn(PyObject *self, PyObject *args) {
  PyObject *qobj, *dobj, *mobj, *pobj, *distobj;
  Py_ssize_t nbit, k, threads;
  if (!PyArg_ParseTuple(args, "OOnOnOOn", &qobj, &dobj, &nbit, &mobj, &k,
                        &pobj, &distobj, &threads))
    return NULL;
  KnnJob job;
  memset(&job, 0, sizeof(job));
  Py_buffer v[5];
  int got = 0;
  PyObject *result = NULL;
  if (ch_knn_buffers(&job, v, &got, qobj, dobj, nbit, k, pobj, distobj))
    goto out;
  if (mobj != Py_None) {
    const int64_t planes = ch_count_codes_in(mobj, job.words);
    if (planes < 0) goto out;
    if (planes < 1 || planes > 31) {
      PyErr_SetString(PyExc_ValueError, "masks: 1 to 31 planes");
      goto out;
    }
    if (ch_get_buffer(mobj, &v[4], 0, 8, planes * job.words, "masks")) goto out;
    got = 5;
    job.masks = v[4].buf, job.planes = planes;
  }
  /* Enough blocks for every thread, at most KNN_BLOCK queries each. */
  if (threads < 1) threads = 1;
  const int64_t per_thread = (job.num_q + threads - 1) / threads;
  job.block = per_thread < 1            ? 1
              : per_thread > KNN_BLOCK ? KNN_BLOCK
                                       : per_thread;
  if (ch_run_threads(knn_body, &job, &job.next_block, &job.failed, threads))
    goto out;
  result = Py_NewRef(Py_None);
out:
  for (int i = 0; i < got; ++i) PyBuffer_Release(&v[i]);
  return result;
}
