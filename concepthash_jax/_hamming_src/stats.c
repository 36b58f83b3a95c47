/* The retrieval-metric pass of evaluation.retrieval_metrics: per-query
Hamming histograms, AP@R and top-k hits, and its floor (benchmarks).

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
with the GIL released. The hot loop is compiled once per instruction set
(AVX-512 VPOPCNTDQ: a tile's distances vectorised into a buffer, then counted;
POPCNT and portable: counted straight from the codes); elsewhere than x86-64
the compiler's popcount builtin is used.
*/
#include "common.h"

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

struct Job {
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
};

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

/* count() once per tile (a whole tile, or its rest after the last relevant
   item), kept out of line: a call per tile costs nothing, and inlined there
   it slows the label loops of the vectorised walk. Left to the compiler, the
   choice changes with whatever else the unit holds. */
static __attribute__((noinline)) void count_tile(uint32_t *counts,
                                                 const uint16_t *d, int64_t n) {
  count(counts, d, n);
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

/* `per_tile` (a constant per call site): the span comes once per tile, not
   once per relevant item (see count_tile). */
static inline __attribute__((always_inline)) void count_span(
    const Tile *t, uint32_t *counts, int64_t a, int64_t b, int per_tile) {
  if (t->fused)
    count_codes(counts, t->qb, t->job->dbits, a, b, t->words);
  else if (per_tile)
    count_tile(counts, t->dist + (a - t->t0), b - a);
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
    count_span(&t, state->counts, t0, t1, 1);
    if (job->single) return 0; /* finish() counts the CSR list's items */
    for (int64_t j = next_relevant(job, q, state, t0, t1); j < t1;
         j = next_relevant(job, q, state, j + 1, t1))
      if (push(&state->records, (uint32_t)j, 0, distance_at(&t, j))) return -1;
    return 0;
  }
  int64_t pos = t0; /* items before pos are counted */
  for (int64_t j = next_relevant(job, q, state, t0, t1); j < t1;
       j = next_relevant(job, q, state, j + 1, t1)) {
    count_span(&t, state->counts, pos, j, 0);
    const uint32_t d = distance_at(&t, j);
    state->counts[d * COPIES]++;
    if (push(&state->records, (uint32_t)j, total(state->counts, d), d))
      return -1;
    pos = j + 1;
  }
  count_span(&t, state->counts, pos, t1, 1);
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
    count_tile(state->counts, dist, t1 - t0);
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
  attr void name(Job *job) {         \
    if (job->words == 1)             \
      work(job, 1, fused);           \
    else if (job->words == 2)        \
      work(job, 2, fused);           \
    else                             \
      work(job, job->words, fused);  \
  }

VARIANT(ch_stats_default, , 1)
#ifdef CH_X86
VARIANT(ch_stats_popcnt, TARGET_POPCNT, 1)
VARIANT(ch_stats_avx512, TARGET_AVX512, 0)
#endif

static void stats_body(void *job) { ch_variant()->stats(job); }

PyObject *ch_stats(PyObject *self, PyObject *args, PyObject *kwargs) {
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
  const int64_t num_q = ch_count_codes_in(o[0], words);
  if (num_q < 0) return NULL;
  const int64_t num_db = ch_count_codes_in(o[1], words);
  if (num_db < 0) return NULL;
  job.single = o[4] != Py_None;
  int64_t lwords = 0;
  if (!job.single) {
    Py_buffer probe;
    if (PyObject_GetBuffer(o[2], &probe, PyBUF_C_CONTIGUOUS)) return NULL;
    lwords = num_q ? probe.len / 4 / num_q : 0;
    PyBuffer_Release(&probe);
  }
  Py_ssize_t num_topk = PyObject_Length(o[7]);
  if (num_topk < 0) return NULL;
#define GET(i, obj, w, size, count, name)                              \
  if (ch_get_buffer(obj, &v[i], w, size, count, name)) goto out;       \
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
  if (ch_run_threads(stats_body, &job, &job.next_block, &job.failed, threads))
    goto out;
  result = Py_NewRef(Py_None);
out:
  for (int i = 0; i < got; ++i) PyBuffer_Release(&v[i]);
  return result;
}

/* floor(qbits, dbits, nbit, counts, threads): the pass without labels. */
PyObject *ch_floor(PyObject *self, PyObject *args) {
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
  int failed = ch_run_threads(stats_body, &job, &job.next_block,
                              &job.failed, threads);
  PyBuffer_Release(&q);
  PyBuffer_Release(&d);
  if (failed) return NULL;
  Py_RETURN_NONE;
}
