/* Native CPU kernels of evaluation.retrieval_metrics and of knn.Searcher
(built by setup.py). The k-NN part (exact k nearest by a brute pass with a
running threshold, and by multi-index hashing) is described where it starts,
below; it shares the popcount, the variant dispatch and the threads.

One pass over the database per query, in database order, with no Q x N
intermediate: Hamming distances by popcount of XOR over uint64 words, counted
into per-query histograms of all items and of relevant items. With
ties="index" the pass also records, for every relevant item j, its distance d_j
and e_j = #{i <= j : d_i = d_j}; once the histogram is complete its rank is
#{i : d_i < d_j} + e_j, so no sort is needed.

AP is summed exactly as evaluation.py's XLA path does, so both give the same
bits: float32 terms cum_rel / rank, a pairwise tree of adjacent pairs over each
aligned SEGMENT-item piece of the database (absent items are 0, and x + 0 = x,
so the tree is evaluated on the relevant items only), segment sums added in
float64 in database order, divided by the number of hits.

Speed: queries go in blocks that walk the database tile by tile, so a tile
stays in cache across the block; threads take blocks from a shared counter
with the GIL released. The hot loop is compiled once per instruction set and
picked at import (AVX-512 VPOPCNTDQ: a tile's distances vectorised into a
buffer, then counted; POPCNT and portable: counted straight from the codes),
and the build uses no -march flag, so a build on any x86-64 runs on any other;
elsewhere the compiler's popcount builtin is used.
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define TARGET_AVX512 \
  __attribute__((target("popcnt,avx512f,avx512bw,avx512vl,avx512vpopcntdq")))
#endif

#define COPIES 4      /* histogram copies: breaks store-to-load chains */
#define SEGMENT 512   /* must equal evaluation._SPAN */
#define TILE 4096     /* database items per tile (32 KB of 64-bit codes) */
#define BLOCK 16      /* queries walking the database together */

typedef struct {
  uint32_t index, equal, dist;
} Record;

typedef struct {
  Record *data;
  int64_t size, capacity;
} Records;

typedef struct {
  const uint64_t *qbits, *dbits;
  int64_t num_q, num_db, words, nbit;
  int single; /* int labels: relevant lists from `order` (CSR) */
  const int64_t *order, *qstart, *qend;
  const uint32_t *qlab, *dlab; /* multi-hot label words */
  int64_t lwords;
  int ranked;
  int64_t R, num_topk;
  const int64_t *topk;
  int64_t *hist, *hist_rel, *hits;
  double *ap;
  int floor; /* benchmark: 1 distances only, 2 distances + all-item counts */
  atomic_long next_block;
  atomic_int failed;
} Job;

typedef struct { /* one query's state while its block walks the database */
  uint32_t *counts; /* (bins, COPIES) */
  int64_t next_rel; /* position in the CSR list (int labels) */
  Records records;
} Query;

static int push(Records *r, uint32_t index, uint32_t equal, uint32_t dist) {
  if (r->size == r->capacity) {
    int64_t cap = r->capacity ? 2 * r->capacity : 256;
    Record *data = realloc(r->data, cap * sizeof(Record));
    if (!data) return -1;
    r->data = data;
    r->capacity = cap;
  }
  r->data[r->size++] = (Record){index, equal, dist};
  return 0;
}

static inline __attribute__((always_inline)) uint32_t distance(
    const uint64_t *a, const uint64_t *b, int64_t words) {
  uint32_t d = 0;
  for (int64_t w = 0; w < words; ++w) d += __builtin_popcountll(a[w] ^ b[w]);
  return d;
}

static inline int relevant_multi(const Job *job, int64_t q, int64_t j) {
  const uint32_t *a = job->qlab + q * job->lwords;
  const uint32_t *b = job->dlab + j * job->lwords;
  for (int64_t w = 0; w < job->lwords; ++w)
    if (a[w] & b[w]) return 1;
  return 0;
}

/* Distances of items [a, b) to q into out[0 .. b - a). `words` is a constant
   after inlining into the specialised callers below, so the loop unrolls. */
static inline __attribute__((always_inline)) void distances(
    const uint64_t *q, const uint64_t *db, int64_t a, int64_t b, int64_t words,
    uint16_t *out) {
  if (words == 1) {
    const uint64_t q0 = q[0];
    for (int64_t j = a; j < b; ++j)
      out[j - a] = (uint16_t)__builtin_popcountll(db[j] ^ q0);
  } else if (words == 2) {
    const uint64_t q0 = q[0], q1 = q[1];
    for (int64_t j = a; j < b; ++j)
      out[j - a] = (uint16_t)(__builtin_popcountll(db[2 * j] ^ q0) +
                              __builtin_popcountll(db[2 * j + 1] ^ q1));
  } else {
    for (int64_t j = a; j < b; ++j)
      out[j - a] = (uint16_t)distance(q, db + j * words, words);
  }
}

static inline void count(uint32_t *counts, const uint16_t *d, int64_t n) {
  int64_t i = 0;
  for (; i + COPIES <= n; i += COPIES) {
    counts[d[i] * COPIES]++;
    counts[d[i + 1] * COPIES + 1]++;
    counts[d[i + 2] * COPIES + 2]++;
    counts[d[i + 3] * COPIES + 3]++;
  }
  for (; i < n; ++i) counts[d[i] * COPIES]++;
}

static inline uint32_t total(const uint32_t *counts, uint32_t d) {
  const uint32_t *c = counts + d * COPIES;
  return c[0] + c[1] + c[2] + c[3];
}

/* The first relevant item in [from, t1), or t1; calls come in ascending
   order of `from` within a query. */
static inline int64_t next_relevant(const Job *job, int64_t q, Query *state,
                                    int64_t from, int64_t t1) {
  if (job->single) {
    if (state->next_rel < job->qend[q] && job->order[state->next_rel] < t1)
      return job->order[state->next_rel++];
    return t1;
  }
  while (from < t1 && !relevant_multi(job, q, from)) ++from;
  return from;
}

/* Counts items [a, b) straight from the codes, no distance buffer: faster
   where popcount is scalar (one fewer store and load per item). */
static inline __attribute__((always_inline)) void count_codes(
    uint32_t *counts, const uint64_t *q, const uint64_t *db, int64_t a,
    int64_t b, int64_t words) {
  int64_t j = a;
  for (; j + COPIES <= b; j += COPIES)
    for (int c = 0; c < COPIES; ++c)
      counts[distance(q, db + (j + c) * words, words) * COPIES + c]++;
  for (; j < b; ++j) counts[distance(q, db + j * words, words) * COPIES]++;
}

/* One query's pass over a tile [t0, t1). `fused` (a constant per variant):
   count from the codes; else from distances computed for the whole tile into
   `dist` first (a vectorised loop where the CPU has a vector popcount). */
typedef struct {
  const Job *job;
  const uint64_t *qb;
  const uint16_t *dist;
  int64_t t0, words;
  int fused;
} Tile;

static inline __attribute__((always_inline)) void count_span(
    const Tile *t, uint32_t *counts, int64_t a, int64_t b) {
  if (t->fused)
    count_codes(counts, t->qb, t->job->dbits, a, b, t->words);
  else
    count(counts, t->dist + (a - t->t0), b - a);
}

static inline __attribute__((always_inline)) uint32_t distance_at(
    const Tile *t, int64_t j) {
  return t->fused ? distance(t->qb, t->job->dbits + j * t->words, t->words)
                  : t->dist[j - t->t0];
}

/* Items [t0, t1) of the database for one query; `dist` is scratch of TILE. */
static inline __attribute__((always_inline)) int walk_tile(
    const Job *job, int64_t q, Query *state, int64_t t0, int64_t t1,
    int64_t words, uint16_t *dist, int fused) {
  const Tile t = {job, job->qbits + q * words, dist, t0, words, fused};
  if (!fused) distances(t.qb, job->dbits, t0, t1, words, dist);
  if (!job->ranked) {
    count_span(&t, state->counts, t0, t1);
    if (job->single) return 0; /* finish() counts the CSR list's items */
    for (int64_t j = next_relevant(job, q, state, t0, t1); j < t1;
         j = next_relevant(job, q, state, j + 1, t1))
      if (push(&state->records, (uint32_t)j, 0, distance_at(&t, j))) return -1;
    return 0;
  }
  int64_t pos = t0; /* items before pos are counted */
  for (int64_t j = next_relevant(job, q, state, t0, t1); j < t1;
       j = next_relevant(job, q, state, j + 1, t1)) {
    count_span(&t, state->counts, pos, j);
    const uint32_t d = distance_at(&t, j);
    state->counts[d * COPIES]++;
    if (push(&state->records, (uint32_t)j, total(state->counts, d), d))
      return -1;
    pos = j + 1;
  }
  count_span(&t, state->counts, pos, t1);
  return 0;
}

/* The floor of a pass: the two inner loops alone, no labels or ranks. */
static volatile uint16_t floor_sink; /* keeps the distances computed */

static inline __attribute__((always_inline)) void floor_tile(
    const Job *job, int64_t q, Query *state, int64_t t0, int64_t t1,
    int64_t words, uint16_t *dist, int fused) {
  const uint64_t *qb = job->qbits + q * words;
  if (fused) { /* as the pass does it: no distance buffer */
    if (job->floor == 2) {
      count_codes(state->counts, qb, job->dbits, t0, t1, words);
    } else {
      uint32_t sum = 0;
      for (int64_t j = t0; j < t1; ++j)
        sum += distance(qb, job->dbits + j * words, words);
      floor_sink = (uint16_t)sum;
    }
    return;
  }
  distances(qb, job->dbits, t0, t1, words, dist);
  if (job->floor == 2)
    count(state->counts, dist, t1 - t0);
  else
    floor_sink = dist[(q + t0) % (t1 - t0)];
}

/* Sum of the pairwise tree over one segment, from its nonzero leaves
   (offset, value) sorted by offset; overwrites the arrays. */
static float tree_sum(uint32_t *offset, float *value, int64_t n) {
  for (int level = 0; (SEGMENT >> level) > 1; ++level) {
    int64_t out = 0;
    for (int64_t i = 0; i < n; ++i) {
      uint32_t parent = offset[i] >> 1;
      if (i + 1 < n && (offset[i + 1] >> 1) == parent) {
        value[out] = value[i] + value[i + 1];
        ++i;
      } else {
        value[out] = value[i];
      }
      offset[out++] = parent;
    }
    n = out;
  }
  return n ? value[0] : 0.0f;
}

/* Histograms, AP and top-k hits of one query from its completed state. */
static int finish(const Job *job, int64_t q, Query *state) {
  const int64_t bins = job->nbit + 1;
  int64_t *hist = job->hist + q * bins, *hist_rel = job->hist_rel + q * bins;
  for (int64_t d = 0; d < bins; ++d) hist[d] = total(state->counts, d);
  if (!job->ranked) {
    if (job->single) {
      const uint64_t *qb = job->qbits + q * job->words;
      for (int64_t p = job->qstart[q]; p < job->qend[q]; ++p)
        hist_rel[distance(qb, job->dbits + job->order[p] * job->words,
                          job->words)]++;
    } else {
      for (int64_t i = 0; i < state->records.size; ++i)
        hist_rel[state->records.data[i].dist]++;
    }
    return 0;
  }
  const Record *rec = state->records.data;
  const int64_t n = state->records.size;
  for (int64_t i = 0; i < n; ++i) hist_rel[rec[i].dist]++;
  int64_t *start = calloc(4 * bins, sizeof(int64_t));
  uint32_t *offset = malloc((n + 1) * sizeof(uint32_t));
  float *value = malloc((n + 1) * sizeof(float));
  if (!start || !offset || !value) {
    free(start), free(offset), free(value);
    return -1;
  }
  int64_t *rel_start = start + bins, *seen = start + 2 * bins;
  for (int64_t d = 1; d < bins; ++d) {
    start[d] = start[d - 1] + hist[d - 1];
    rel_start[d] = rel_start[d - 1] + hist_rel[d - 1];
  }
  int64_t num_hit = 0, *hits = job->hits + q * job->num_topk;
  double sum = 0.0;
  int64_t leaves = 0, segment = -1;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t d = rec[i].dist;
    const int64_t rank = start[d] + rec[i].equal;
    const int64_t cum_rel = rel_start[d] + (++seen[d]);
    for (int64_t k = 0; k < job->num_topk; ++k) hits[k] += rank <= job->topk[k];
    if (rank > job->R) continue;
    ++num_hit;
    const int64_t seg = rec[i].index / SEGMENT;
    if (seg != segment) {
      sum += tree_sum(offset, value, leaves);
      leaves = 0;
      segment = seg;
    }
    offset[leaves] = rec[i].index % SEGMENT;
    value[leaves++] = (float)cum_rel / (float)rank;
  }
  sum += tree_sum(offset, value, leaves);
  job->ap[q] = num_hit ? sum / (double)num_hit : 0.0;
  free(start), free(offset), free(value);
  return 0;
}

static inline __attribute__((always_inline)) void work(Job *job, int64_t words,
                                                       int fused) {
  const int64_t bins = job->nbit + 1;
  uint16_t *dist = malloc(TILE * sizeof(uint16_t));
  uint32_t *counts = malloc(BLOCK * bins * COPIES * sizeof(uint32_t));
  Query state[BLOCK];
  memset(state, 0, sizeof(state));
  if (!dist || !counts) goto fail;
  for (;;) {
    const int64_t q0 = atomic_fetch_add(&job->next_block, 1) * BLOCK;
    if (q0 >= job->num_q || atomic_load(&job->failed)) break;
    const int64_t qn = q0 + BLOCK < job->num_q ? BLOCK : job->num_q - q0;
    memset(counts, 0, BLOCK * bins * COPIES * sizeof(uint32_t));
    for (int64_t i = 0; i < qn; ++i) {
      state[i].counts = counts + i * bins * COPIES;
      state[i].next_rel = job->single ? job->qstart[q0 + i] : 0;
      state[i].records.size = 0;
    }
    for (int64_t t0 = 0; t0 < job->num_db; t0 += TILE) {
      const int64_t t1 = t0 + TILE < job->num_db ? t0 + TILE : job->num_db;
      for (int64_t i = 0; i < qn; ++i) {
        if (job->floor)
          floor_tile(job, q0 + i, &state[i], t0, t1, words, dist, fused);
        else if (walk_tile(job, q0 + i, &state[i], t0, t1, words, dist,
                           fused))
          goto fail;
      }
    }
    for (int64_t i = 0; i < qn && !job->floor; ++i)
      if (finish(job, q0 + i, &state[i])) goto fail;
  }
  goto done;
fail:
  atomic_store(&job->failed, 1);
done:
  for (int i = 0; i < BLOCK; ++i) free(state[i].records.data);
  free(dist), free(counts);
}

/* One copy of the hot loop per code width class and instruction set; only
   AVX-512 VPOPCNTDQ has a vector popcount, so the others count fused. */
#define VARIANT(name, attr, fused)   \
  attr static void name(Job *job) {  \
    if (job->words == 1)             \
      work(job, 1, fused);           \
    else if (job->words == 2)        \
      work(job, 2, fused);           \
    else                             \
      work(job, job->words, fused);  \
  }

VARIANT(work_default, , 1)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
VARIANT(work_popcnt, __attribute__((target("popcnt"))), 1)
VARIANT(work_avx512, TARGET_AVX512, 0)
#endif

/* ---------------------------------------------------------------------------
   Exact k nearest neighbours (knn.py).

   Every query keeps its k best as a max-heap of keys distance << 32 |
   position, in its own row of the positions output (no other memory,
   whatever k): the order of keys is the order by (distance, position), the
   tie rule. The brute pass meets items in position order, so an item enters
   only if its distance is strictly below the k-th best (an equal one came
   later, and loses); the multi-index search meets them out of order and
   compares whole keys. A weighted distance is sum_p 2^p popcount((q ^ d) &
   mask_p) over `planes` masks; 0 planes is plain Hamming. */

#define KNN_TILE_WORDS 4096 /* code words of a database tile (32 KB) */
#define KNN_BLOCK 32        /* queries walking the database together */
#define NO_LIMIT ((uint64_t)1 << 32) /* above every distance */

typedef struct {
  const uint64_t *qbits, *dbits, *masks;
  int64_t num_q, num_db, words, planes, k, block;
  int64_t *pos; /* (Q, k); the heaps while searching */
  int32_t *dist;
  /* multi-index tables, concatenated (knn._Tables) */
  int64_t num_tables;
  const int64_t *starts, *widths, *bases;
  const uint32_t *offsets, *items;
  const uint64_t *codes;
  int64_t budget, probe_cost;
  uint8_t *fell_back;
  atomic_long next_block;
  atomic_int failed;
} KnnJob;

static inline void heap_sift_down(uint64_t *h, int64_t size, int64_t i) {
  const uint64_t key = h[i];
  for (;;) {
    int64_t c = 2 * i + 1;
    if (c >= size) break;
    if (c + 1 < size && h[c + 1] > h[c]) ++c;
    if (h[c] <= key) break;
    h[i] = h[c];
    i = c;
  }
  h[i] = key;
}

/* Offers `key` to a max-heap of at most k keys; returns the distance an
   item must now be below to enter (NO_LIMIT until the heap is full). */
static inline uint64_t heap_offer(uint64_t *h, int64_t *size, int64_t k,
                                  uint64_t key) {
  if (*size < k) {
    int64_t i = (*size)++;
    while (i > 0 && h[(i - 1) / 2] < key) {
      h[i] = h[(i - 1) / 2];
      i = (i - 1) / 2;
    }
    h[i] = key;
  } else if (key < h[0]) {
    h[0] = key;
    heap_sift_down(h, *size, 0);
  }
  return *size < k ? NO_LIMIT : h[0] >> 32;
}

/* Sorts a heap ascending in place, then splits keys into position (kept in
   place) and distance. */
static void heap_finish(uint64_t *h, int64_t size, int32_t *dist) {
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

/* One query over database items [t0, t1). `cols` is the tile word-major
   (word w of item j at cols[w * (t1 - t0) + j - t0]) where the variant
   transposes tiles, else unused. */
typedef void (*TileScan)(const KnnJob *job, int64_t q, int64_t *size,
                         int64_t t0, int64_t t1, const uint64_t *cols);

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

/* A tile scan per code width class, plain or weighted. */
#define SCALAR_TILE(name, attr)                                              \
  attr static void name(const KnnJob *job, int64_t q, int64_t *size,         \
                        int64_t t0, int64_t t1, const uint64_t *cols) {      \
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

SCALAR_TILE(tile_default, )

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

SCALAR_TILE(tile_popcnt, __attribute__((target("popcnt"))))

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
  if (words == 1 && !planes) {
    /* Four vectors a test: a quarter of the branches and loop overhead. */
    const __m512i q0 = _mm512_set1_epi64((long long)qb[0]);
    for (; j + 32 <= n; j += 32) {
      const __m512i a0 = _mm512_popcnt_epi64(
          _mm512_xor_si512(_mm512_loadu_si512(cols + j), q0));
      const __m512i a1 = _mm512_popcnt_epi64(
          _mm512_xor_si512(_mm512_loadu_si512(cols + j + 8), q0));
      const __m512i a2 = _mm512_popcnt_epi64(
          _mm512_xor_si512(_mm512_loadu_si512(cols + j + 16), q0));
      const __m512i a3 = _mm512_popcnt_epi64(
          _mm512_xor_si512(_mm512_loadu_si512(cols + j + 24), q0));
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

TARGET_AVX512 static void tile_avx512(const KnnJob *job, int64_t q,
                                      int64_t *size, int64_t t0, int64_t t1,
                                      const uint64_t *cols) {
  const int64_t planes = job->planes;
  if (job->words == 1 && !planes)
    avx512_tile(job, q, size, t0, t1, cols, 1, 0);
  else if (job->words == 2 && !planes)
    avx512_tile(job, q, size, t0, t1, cols, 2, 0);
  else if (!planes)
    avx512_tile(job, q, size, t0, t1, cols, job->words, 0);
  else if (job->words == 1)
    avx512_tile(job, q, size, t0, t1, cols, 1, planes);
  else
    avx512_tile(job, q, size, t0, t1, cols, job->words, planes);
}
#endif

static int64_t knn_tile_items(int64_t words) {
  const int64_t items = KNN_TILE_WORDS / words;
  return items < 64 ? 64 : items;
}

/* Queries [q0, q0 + qn) over the whole database, tile by tile (the tile
   stays in cache across the block); leaves their results in the outputs.
   `cols`: knn_tile_items(words) * words scratch where `transpose`. */
static void knn_block(const KnnJob *job, int64_t q0, int64_t qn,
                      int64_t *sizes, uint64_t *cols, TileScan scan,
                      int transpose) {
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
    heap_finish((uint64_t *)(job->pos + (q0 + i) * job->k), sizes[i],
                job->dist + (q0 + i) * job->k);
}

static uint64_t *knn_scratch(const KnnJob *job, int transpose) {
  if (!transpose || job->words == 1) return NULL;
  return malloc(knn_tile_items(job->words) * job->words * sizeof(uint64_t));
}

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
          knn_block(job, q, 1, &size, cols, scan, transpose);
          return;
        }
        if (!flip) break;
        const uint64_t low = flip & -flip, next = flip + low;
        flip = (((next ^ flip) >> 2) / low) | next;
      }
      if (size == k && (heap[0] >> 32) < (uint64_t)(s * m + t + 1)) {
        heap_finish(heap, size, job->dist + q * k);
        return;
      }
    }
  }
  heap_finish(heap, size, job->dist + q * k); /* every item was met */
}

static inline __attribute__((always_inline)) void mih_work(
    KnnJob *job, TileScan scan, int transpose) {
  uint64_t *qsub = malloc(job->num_tables * sizeof(uint64_t));
  uint64_t *cols = knn_scratch(job, transpose);
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

#define MIH_VARIANT(name, attr, tile, transpose) \
  attr static void name(KnnJob *job) { mih_work(job, tile, transpose); }

MIH_VARIANT(mih_default, , tile_default, 0)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
MIH_VARIANT(mih_popcnt, __attribute__((target("popcnt"))), tile_popcnt, 0)
MIH_VARIANT(mih_avx512, TARGET_AVX512, tile_avx512, 1)
#endif

typedef void (*Kernel)(Job *);

typedef struct {
  const char *name;
  Kernel stats;
  TileScan knn_tile;
  void (*multi_index)(KnnJob *);
  int transpose; /* knn tiles go word-major (vector loads of one word) */
  int supported;
} Variant;

/* Best first; `supported` is filled in at import. */
static Variant variants[] = {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    {"avx512vpopcntdq", work_avx512, tile_avx512, mih_avx512, 1, 0},
    {"popcnt", work_popcnt, tile_popcnt, mih_popcnt, 0, 0},
#endif
    {"portable", work_default, tile_default, mih_default, 0, 1},
};
#define NUM_VARIANTS ((int)(sizeof(variants) / sizeof(variants[0])))
static int chosen = 0; /* index into variants */

static void detect(void) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  variants[0].supported = __builtin_cpu_supports("avx512vpopcntdq") &&
                          __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  variants[1].supported = __builtin_cpu_supports("popcnt");
#endif
  while (!variants[chosen].supported) ++chosen;
}

typedef struct { /* what a thread runs */
  void (*body)(void *);
  void *job;
} Task;

static void *thread_main(void *arg) {
  const Task *task = arg;
  task->body(task->job);
  return NULL;
}

/* Runs body(job) on `threads` threads (this one included) with the GIL
   released; `next` and `failed` are the job's shared counter and flag.
   Nonzero, with MemoryError set, when out of memory. */
static int run_threads(void (*body)(void *), void *job, atomic_long *next,
                       atomic_int *failed, Py_ssize_t threads) {
  atomic_init(next, 0);
  atomic_init(failed, 0);
  if (threads < 1) threads = 1;
  pthread_t *pool = calloc(threads, sizeof(pthread_t));
  if (!pool) {
    PyErr_NoMemory();
    return -1;
  }
  Task task = {body, job};
  Py_ssize_t started = 0;
  Py_BEGIN_ALLOW_THREADS;
  for (; started < threads - 1; ++started)
    if (pthread_create(&pool[started], NULL, thread_main, &task)) break;
  thread_main(&task);
  for (Py_ssize_t t = 0; t < started; ++t) pthread_join(pool[t], NULL);
  Py_END_ALLOW_THREADS;
  free(pool);
  if (!atomic_load(failed)) return 0;
  PyErr_NoMemory();
  return -1;
}

static void stats_body(void *job) { variants[chosen].stats(job); }

static int get_buffer(PyObject *obj, Py_buffer *view, int writable,
                      Py_ssize_t itemsize, Py_ssize_t count,
                      const char *name) {
  int flags = PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
  if (PyObject_GetBuffer(obj, view, flags)) return -1;
  if (view->itemsize != itemsize || view->len != itemsize * count) {
    PyErr_Format(PyExc_ValueError, "%s: expected %zd items of %zd bytes", name,
                 count, itemsize);
    PyBuffer_Release(view);
    return -1;
  }
  return 0;
}

static PyObject *stats(PyObject *self, PyObject *args, PyObject *kwargs) {
  static char *names[] = {"qbits", "dbits", "nbit", "qlabels", "dlabels",
                          "order", "qstart", "qend", "ranked", "R", "topk",
                          "hist", "hist_rel", "ap", "hits", "threads", NULL};
  PyObject *o[15];
  Py_ssize_t nbit, R, threads;
  int ranked;
  if (!PyArg_ParseTupleAndKeywords(
          args, kwargs, "OOnOOOOOpnOOOOOn", names, &o[0], &o[1], &nbit, &o[2],
          &o[3], &o[4], &o[5], &o[6], &ranked, &R, &o[7], &o[8], &o[9],
          &o[10], &o[11], &threads))
    return NULL;
  Py_buffer v[11];
  int got = 0;
  Job job;
  memset(&job, 0, sizeof(job));
  const int64_t words = (nbit + 63) / 64, bins = nbit + 1;
  PyObject *result = NULL;
  /* Sizes come from the arrays: Q and N from the code buffers. */
  Py_buffer probe;
  if (PyObject_GetBuffer(o[0], &probe, PyBUF_C_CONTIGUOUS)) return NULL;
  const int64_t num_q = probe.len / 8 / words;
  PyBuffer_Release(&probe);
  if (PyObject_GetBuffer(o[1], &probe, PyBUF_C_CONTIGUOUS)) return NULL;
  const int64_t num_db = probe.len / 8 / words;
  PyBuffer_Release(&probe);
  job.single = o[4] != Py_None;
  int64_t lwords = 0;
  if (!job.single) {
    if (PyObject_GetBuffer(o[2], &probe, PyBUF_C_CONTIGUOUS)) return NULL;
    lwords = num_q ? probe.len / 4 / num_q : 0;
    PyBuffer_Release(&probe);
  }
  Py_ssize_t num_topk = PyObject_Length(o[7]);
  if (num_topk < 0) return NULL;
#define GET(i, obj, w, size, count, name)                              \
  if (get_buffer(obj, &v[i], w, size, count, name)) goto out;          \
  got = i + 1;
  GET(0, o[0], 0, 8, num_q * words, "qbits")
  GET(1, o[1], 0, 8, num_db * words, "dbits")
  GET(2, o[7], 0, 8, num_topk, "topk")
  GET(3, o[8], 1, 8, num_q * bins, "hist")
  GET(4, o[9], 1, 8, num_q * bins, "hist_rel")
  GET(5, o[10], 1, 8, num_q, "ap")
  GET(6, o[11], 1, 8, num_q * num_topk, "hits")
  if (job.single) {
    GET(7, o[4], 0, 8, num_db, "order")
    GET(8, o[5], 0, 8, num_q, "qstart")
    GET(9, o[6], 0, 8, num_q, "qend")
  } else {
    GET(7, o[2], 0, 4, num_q * lwords, "qlabels")
    GET(8, o[3], 0, 4, num_db * lwords, "dlabels")
  }
#undef GET
  job.qbits = v[0].buf, job.dbits = v[1].buf;
  job.num_q = num_q, job.num_db = num_db, job.words = words, job.nbit = nbit;
  if (job.single) {
    job.order = v[7].buf, job.qstart = v[8].buf, job.qend = v[9].buf;
  } else {
    job.qlab = v[7].buf, job.dlab = v[8].buf, job.lwords = lwords;
  }
  job.ranked = ranked, job.R = R, job.topk = v[2].buf;
  job.num_topk = num_topk;
  job.hist = v[3].buf, job.hist_rel = v[4].buf, job.ap = v[5].buf;
  job.hits = v[6].buf;
  if (run_threads(stats_body, &job, &job.next_block, &job.failed, threads))
    goto out;
  result = Py_NewRef(Py_None);
out:
  for (int i = 0; i < got; ++i) PyBuffer_Release(&v[i]);
  return result;
}

/* floor(qbits, dbits, nbit, counts, threads): the pass without labels. */
static PyObject *pass_floor(PyObject *self, PyObject *args) {
  PyObject *qobj, *dobj;
  Py_ssize_t nbit, threads;
  int counts;
  if (!PyArg_ParseTuple(args, "OOnpn", &qobj, &dobj, &nbit, &counts,
                        &threads))
    return NULL;
  Job job;
  memset(&job, 0, sizeof(job));
  job.words = (nbit + 63) / 64, job.nbit = nbit, job.floor = 1 + counts;
  Py_buffer q, d;
  if (PyObject_GetBuffer(qobj, &q, PyBUF_C_CONTIGUOUS)) return NULL;
  if (PyObject_GetBuffer(dobj, &d, PyBUF_C_CONTIGUOUS)) {
    PyBuffer_Release(&q);
    return NULL;
  }
  job.qbits = q.buf, job.dbits = d.buf;
  job.num_q = q.len / 8 / job.words, job.num_db = d.len / 8 / job.words;
  int failed = run_threads(stats_body, &job, &job.next_block, &job.failed,
                           threads);
  PyBuffer_Release(&q);
  PyBuffer_Release(&d);
  if (failed) return NULL;
  Py_RETURN_NONE;
}

static void knn_body(void *arg) {
  KnnJob *job = arg;
  const Variant *variant = &variants[chosen];
  int64_t sizes[KNN_BLOCK];
  uint64_t *cols = knn_scratch(job, variant->transpose);
  if (variant->transpose && job->words > 1 && !cols) {
    atomic_store(&job->failed, 1);
    return;
  }
  for (;;) {
    const int64_t q0 = atomic_fetch_add(&job->next_block, 1) * job->block;
    if (q0 >= job->num_q || atomic_load(&job->failed)) break;
    const int64_t qn =
        q0 + job->block < job->num_q ? job->block : job->num_q - q0;
    knn_block(job, q0, qn, sizes, cols, variant->knn_tile,
              variant->transpose);
  }
  free(cols);
}

static void multi_index_body(void *job) { variants[chosen].multi_index(job); }

/* The count of `words`-word codes in a C-contiguous uint64 buffer. */
static int64_t count_codes_in(PyObject *obj, int64_t words) {
  Py_buffer probe;
  if (PyObject_GetBuffer(obj, &probe, PyBUF_C_CONTIGUOUS)) return -1;
  const int64_t count = probe.len / 8 / words;
  PyBuffer_Release(&probe);
  return count;
}

/* Shared by knn and multi_index: queries, database and outputs. */
static int knn_buffers(KnnJob *job, Py_buffer *v, int *got, PyObject *qobj,
                       PyObject *dobj, Py_ssize_t nbit, Py_ssize_t k,
                       PyObject *pobj, PyObject *distobj) {
  job->words = (nbit + 63) / 64;
  job->num_q = count_codes_in(qobj, job->words);
  job->num_db = count_codes_in(dobj, job->words);
  if (job->num_q < 0 || job->num_db < 0) return -1;
  if (k < 1 || k > job->num_db || job->num_db >= ((int64_t)1 << 32)) {
    PyErr_Format(PyExc_ValueError,
                 "k = %zd must be in [1, N] and N < 2^32 (N = %lld)", k,
                 (long long)job->num_db);
    return -1;
  }
  job->k = k;
  if (get_buffer(qobj, &v[0], 0, 8, job->num_q * job->words, "qbits"))
    return -1;
  *got = 1;
  if (get_buffer(dobj, &v[1], 0, 8, job->num_db * job->words, "dbits"))
    return -1;
  *got = 2;
  if (get_buffer(pobj, &v[2], 1, 8, job->num_q * k, "positions")) return -1;
  *got = 3;
  if (get_buffer(distobj, &v[3], 1, 4, job->num_q * k, "distances"))
    return -1;
  *got = 4;
  job->qbits = v[0].buf, job->dbits = v[1].buf;
  job->pos = v[2].buf, job->dist = v[3].buf;
  return 0;
}

/* knn(qbits, dbits, nbit, masks, k, positions, distances, threads) */
static PyObject *knn(PyObject *self, PyObject *args) {
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
  if (knn_buffers(&job, v, &got, qobj, dobj, nbit, k, pobj, distobj)) goto out;
  if (mobj != Py_None) {
    const int64_t planes = count_codes_in(mobj, job.words);
    if (planes < 0) goto out;
    if (planes < 1 || planes > 31) {
      PyErr_SetString(PyExc_ValueError, "masks: 1 to 31 planes");
      goto out;
    }
    if (get_buffer(mobj, &v[4], 0, 8, planes * job.words, "masks")) goto out;
    got = 5;
    job.masks = v[4].buf, job.planes = planes;
  }
  /* Enough blocks for every thread, at most KNN_BLOCK queries each. */
  if (threads < 1) threads = 1;
  const int64_t per_thread = (job.num_q + threads - 1) / threads;
  job.block = per_thread < 1            ? 1
              : per_thread > KNN_BLOCK ? KNN_BLOCK
                                       : per_thread;
  if (run_threads(knn_body, &job, &job.next_block, &job.failed, threads))
    goto out;
  result = Py_NewRef(Py_None);
out:
  for (int i = 0; i < got; ++i) PyBuffer_Release(&v[i]);
  return result;
}

/* The table arrays of knn._Tables: (starts, widths, bases, offsets, items,
   codes), checked against each other. */
static int table_buffers(KnnJob *job, Py_buffer *v, int *got, PyObject **o,
                         int writable) {
  Py_buffer probe;
  if (PyObject_GetBuffer(o[0], &probe, PyBUF_C_CONTIGUOUS)) return -1;
  job->num_tables = probe.len / 8;
  PyBuffer_Release(&probe);
  if (get_buffer(o[0], &v[0], 0, 8, job->num_tables, "starts")) return -1;
  *got = 1;
  if (get_buffer(o[1], &v[1], 0, 8, job->num_tables, "widths")) return -1;
  *got = 2;
  if (get_buffer(o[2], &v[2], 0, 8, job->num_tables, "bases")) return -1;
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
  if (get_buffer(o[3], &v[3], writable, 4, num_offsets, "offsets")) return -1;
  *got = 4;
  if (get_buffer(o[4], &v[4], writable, 4, entries, "items")) return -1;
  *got = 5;
  if (get_buffer(o[5], &v[5], writable, 8, entries * job->words, "codes"))
    return -1;
  *got = 6;
  job->offsets = v[3].buf, job->items = v[4].buf, job->codes = v[5].buf;
  return 0;
}

/* multi_index(qbits, dbits, nbit, k, starts, widths, bases, offsets, items,
   codes, budget, probe_cost, positions, distances, fell_back, threads) */
static PyObject *multi_index(PyObject *self, PyObject *args) {
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
  if (knn_buffers(&job, v, &got, qobj, dobj, nbit, k, pobj, distobj)) goto out;
  if (table_buffers(&job, tv, &tgot, t, 0)) goto out;
  if (get_buffer(fobj, &fv, 1, 1, job.num_q, "fell_back")) goto out;
  fgot = 1;
  job.fell_back = fv.buf, job.budget = budget, job.probe_cost = probe_cost;
  if (run_threads(multi_index_body, &job, &job.next_block, &job.failed,
                  threads)) goto out;
  result = Py_NewRef(Py_None);
out:
  for (int i = 0; i < got; ++i) PyBuffer_Release(&v[i]);
  for (int i = 0; i < tgot; ++i) PyBuffer_Release(&tv[i]);
  if (fgot) PyBuffer_Release(&fv);
  return result;
}

/* build_tables(dbits, nbit, starts, widths, bases, offsets, items, codes):
   fills the multi-index tables by a counting sort per table (items of a
   bucket in ascending position). */
static PyObject *build_tables(PyObject *self, PyObject *args) {
  PyObject *dobj, *t[6];
  Py_ssize_t nbit;
  if (!PyArg_ParseTuple(args, "OnOOOOOO", &dobj, &nbit, &t[0], &t[1], &t[2],
                        &t[3], &t[4], &t[5]))
    return NULL;
  KnnJob job;
  memset(&job, 0, sizeof(job));
  job.words = (nbit + 63) / 64;
  job.num_db = count_codes_in(dobj, job.words);
  if (job.num_db < 0) return NULL;
  Py_buffer d, tv[6];
  int tgot = 0;
  PyObject *result = NULL;
  if (get_buffer(dobj, &d, 0, 8, job.num_db * job.words, "dbits")) return NULL;
  if (table_buffers(&job, tv, &tgot, t, 1)) goto out;
  const int64_t words = job.words, num_db = job.num_db;
  const uint64_t *db = d.buf;
  Py_BEGIN_ALLOW_THREADS;
  for (int64_t u = 0; u < job.num_tables; ++u) {
    uint32_t *offsets = (uint32_t *)job.offsets + job.bases[u];
    uint32_t *items = (uint32_t *)job.items + u * num_db;
    uint64_t *codes = (uint64_t *)job.codes + u * num_db * words;
    const int64_t start = job.starts[u], width = job.widths[u];
    const int64_t buckets = (int64_t)1 << width;
    memset(offsets, 0, (buckets + 1) * sizeof(uint32_t));
    for (int64_t j = 0; j < num_db; ++j)
      offsets[substring(db + j * words, start, width) + 1]++;
    for (int64_t b = 0; b < buckets; ++b) offsets[b + 1] += offsets[b];
    /* offsets[b] is now bucket b's start; used as its fill cursor, it ends
       at bucket b + 1's start, and a shift restores it. */
    for (int64_t j = 0; j < num_db; ++j) {
      const uint32_t e = offsets[substring(db + j * words, start, width)]++;
      items[e] = (uint32_t)j;
      memcpy(codes + (int64_t)e * words, db + j * words, words * 8);
    }
    memmove(offsets + 1, offsets, buckets * sizeof(uint32_t));
    offsets[0] = 0;
  }
  Py_END_ALLOW_THREADS;
  result = Py_NewRef(Py_None);
out:
  PyBuffer_Release(&d);
  for (int i = 0; i < tgot; ++i) PyBuffer_Release(&tv[i]);
  return result;
}

static PyObject *get_variant(PyObject *self, PyObject *args) {
  return PyUnicode_FromString(variants[chosen].name);
}

static PyObject *set_variant(PyObject *self, PyObject *arg) {
  const char *name = PyUnicode_AsUTF8(arg);
  if (!name) return NULL;
  for (int i = 0; i < NUM_VARIANTS; ++i) {
    if (strcmp(variants[i].name, name)) continue;
    if (!variants[i].supported) {
      PyErr_Format(PyExc_ValueError, "this CPU cannot run the %s variant",
                   name);
      return NULL;
    }
    chosen = i;
    Py_RETURN_NONE;
  }
  PyErr_Format(PyExc_ValueError, "unknown variant %s", name);
  return NULL;
}

static PyObject *supported_variants(PyObject *self, PyObject *args) {
  PyObject *out = PyList_New(0);
  for (int i = 0; out && i < NUM_VARIANTS; ++i) {
    if (!variants[i].supported) continue;
    PyObject *name = PyUnicode_FromString(variants[i].name);
    if (!name || PyList_Append(out, name)) Py_CLEAR(out);
    Py_XDECREF(name);
  }
  return out;
}

static PyMethodDef methods[] = {
    {"stats", (PyCFunction)(void (*)(void))stats, METH_VARARGS | METH_KEYWORDS,
     "Per-query Hamming histograms, AP@R and top-k hits (see evaluation.py)."},
    {"floor", pass_floor, METH_VARARGS,
     "floor(qbits, dbits, nbit, counts, threads): distances (and all-item "
     "counts) of every pair, nothing else (benchmarks)."},
    {"knn", knn, METH_VARARGS,
     "knn(qbits, dbits, nbit, masks, k, positions, distances, threads): "
     "exact k nearest by a brute pass (see knn.py)."},
    {"multi_index", multi_index, METH_VARARGS,
     "multi_index(qbits, dbits, nbit, k, starts, widths, bases, offsets, "
     "items, codes, budget, probe_cost, positions, distances, fell_back, "
     "threads): exact k nearest by multi-index hashing (see knn.py)."},
    {"build_tables", build_tables, METH_VARARGS,
     "build_tables(dbits, nbit, starts, widths, bases, offsets, items, "
     "codes): fills multi-index hash tables (see knn.py)."},
    {"variant", get_variant, METH_NOARGS,
     "Instruction-set variant in use (the best this CPU runs, by default)."},
    {"set_variant", set_variant, METH_O,
     "Use another supported variant (tests and benchmarks)."},
    {"variants", supported_variants, METH_NOARGS,
     "Variants this CPU can run, best first."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_hamming",
                                    "Native retrieval-metric and k-NN kernels.",
                                    -1,
                                    methods};

PyMODINIT_FUNC PyInit__hamming(void) {
  detect();
  return PyModule_Create(&module);
}
