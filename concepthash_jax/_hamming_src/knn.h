/* Exact k nearest neighbours (knn.py): what the brute pass (knn.c) and
   the multi-index search (mih.c) share.

   Every query keeps its k best as a max-heap of keys distance << 32 |
   position, in its own row of the positions output (no other memory,
   whatever k): the order of keys is the order by (distance, position), the
   tie rule. The brute pass meets items in position order, so an item enters
   only if its distance is strictly below the k-th best (an equal one came
   later, and loses); the multi-index search meets them out of order and
   compares whole keys. A weighted distance is sum_p 2^p popcount((q ^ d) &
   mask_p) over `planes` masks; 0 planes is plain Hamming. */
#ifndef CONCEPTHASH_HAMMING_KNN_H
#define CONCEPTHASH_HAMMING_KNN_H

#include "common.h"

#define KNN_TILE_WORDS 4096 /* code words of a database tile (32 KB) */
#define KNN_BLOCK 32        /* queries walking the database together */
#define NO_LIMIT ((uint64_t)1 << 32) /* above every distance */

struct KnnJob {
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
};

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
CH_INTERNAL void ch_heap_finish(uint64_t *h, int64_t size, int32_t *dist);

/* Queries [q0, q0 + qn) over the whole database by a brute pass with `scan`,
   tile by tile (the tile stays in cache across the block); leaves their
   results in the outputs. `sizes`: qn heap sizes (scratch); `cols`:
   ch_knn_scratch's where `transpose`. */
CH_INTERNAL void ch_knn_block(const KnnJob *job, int64_t q0, int64_t qn,
                              int64_t *sizes, uint64_t *cols, TileScan scan,
                              int transpose);

/* A thread's scratch for transposed tiles, or NULL where none is needed
   (or on failure: where `transpose` and words > 1, NULL is out of memory). */
CH_INTERNAL uint64_t *ch_knn_scratch(const KnnJob *job, int transpose);

/* Shared by knn and multi_index: queries, database and outputs into v[0..3],
   *got of them taken; nonzero with an exception set on a bad argument. */
CH_INTERNAL int ch_knn_buffers(KnnJob *job, Py_buffer *v, int *got,
                               PyObject *qobj, PyObject *dobj,
                               Py_ssize_t nbit, Py_ssize_t k, PyObject *pobj,
                               PyObject *distobj);

#endif
