/* What every unit of the native kernel `concepthash_jax._hamming` shares
(built by setup.py from the .c files beside this one):

  module.c  the Python module: method table, the instruction-set variants and
            their run-time detection, the thread pool, buffer checks;
  stats.c   the retrieval-metric pass (evaluation.retrieval_metrics);
  knn.c     exact k nearest neighbours by a brute pass (knn.Searcher);
  mih.c     exact k nearest neighbours by multi-index hashing.

Each hot loop is compiled once per instruction set, with the variant's target
attribute on the function that holds it, and picked at import; the build
uses no -march flag, so a build on any x86-64 runs on any other. The popcount
below is the one copy all units inline: inside a variant's function it
compiles to that variant's instruction.

The source folder is not named `_hamming`: a folder of that name would
import as an empty namespace package where the extension is not built,
instead of the ImportError that selects the XLA path.
*/
#ifndef CONCEPTHASH_HAMMING_COMMON_H
#define CONCEPTHASH_HAMMING_COMMON_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CH_X86 1
#include <immintrin.h>
#define TARGET_POPCNT __attribute__((target("popcnt")))
#define TARGET_AVX512 \
  __attribute__((target("popcnt,avx512f,avx512bw,avx512vl,avx512vpopcntdq")))
#endif

/* Symbols shared between the units, kept out of the extension's exports
   (only PyInit__hamming is exported). */
#if defined(__GNUC__) || defined(__clang__)
#define CH_INTERNAL __attribute__((visibility("hidden")))
#else
#define CH_INTERNAL
#endif

typedef struct Job Job;       /* a retrieval-metric pass (stats.c) */
typedef struct KnnJob KnnJob; /* a k-NN search (knn.h) */

/* Hamming distance of two `words`-word codes. */
static inline __attribute__((always_inline)) uint32_t distance(
    const uint64_t *a, const uint64_t *b, int64_t words) {
  uint32_t d = 0;
  for (int64_t w = 0; w < words; ++w) d += __builtin_popcountll(a[w] ^ b[w]);
  return d;
}

/* One query over database items [t0, t1) of a k-NN search. `cols` is the
   tile word-major (word w of item j at cols[w * (t1 - t0) + j - t0]) where
   the variant transposes tiles, else unused. */
typedef void (*TileScan)(const KnnJob *job, int64_t q, int64_t *size,
                         int64_t t0, int64_t t1, const uint64_t *cols);

/* One instruction set's copy of every hot loop. */
typedef struct {
  const char *name;
  void (*stats)(Job *);
  TileScan knn_tile;
  void (*multi_index)(KnnJob *);
  int transpose; /* knn tiles go word-major (vector loads of one word) */
  int supported;
} Variant;

/* A variant's functions, defined where their loops are, each with the
   variant's target attribute `attr`. */
#define CH_VARIANT_FUNCTIONS(suffix, attr)                                  \
  attr CH_INTERNAL void ch_stats_##suffix(Job *job);                        \
  attr CH_INTERNAL void ch_tile_##suffix(const KnnJob *job, int64_t q,      \
                                         int64_t *size, int64_t t0,         \
                                         int64_t t1, const uint64_t *cols); \
  attr CH_INTERNAL void ch_mih_##suffix(KnnJob *job);

CH_VARIANT_FUNCTIONS(default, )
#ifdef CH_X86
CH_VARIANT_FUNCTIONS(popcnt, TARGET_POPCNT)
CH_VARIANT_FUNCTIONS(avx512, TARGET_AVX512)
#endif

/* The variant in use (module.c: the best this CPU runs, or set_variant's). */
CH_INTERNAL const Variant *ch_variant(void);

/* Runs body(job) on `threads` threads (this one included) with the GIL
   released; `next` and `failed` are the job's shared counter and flag.
   Nonzero, with MemoryError set, when out of memory. */
CH_INTERNAL int ch_run_threads(void (*body)(void *), void *job,
                               atomic_long *next, atomic_int *failed,
                               Py_ssize_t threads);

/* A C-contiguous view of `count` items of `itemsize` bytes (writable if
   asked); nonzero with ValueError naming `name` otherwise. */
CH_INTERNAL int ch_get_buffer(PyObject *obj, Py_buffer *view, int writable,
                              Py_ssize_t itemsize, Py_ssize_t count,
                              const char *name);

/* The count of `words`-word codes in a C-contiguous uint64 buffer; -1 with
   an exception set where `obj` has no C-contiguous buffer. */
CH_INTERNAL int64_t ch_count_codes_in(PyObject *obj, int64_t words);

/* The Python functions (module.c's method table). */
CH_INTERNAL PyObject *ch_stats(PyObject *self, PyObject *args,
                               PyObject *kwargs);
CH_INTERNAL PyObject *ch_floor(PyObject *self, PyObject *args);
CH_INTERNAL PyObject *ch_knn(PyObject *self, PyObject *args);
CH_INTERNAL PyObject *ch_multi_index(PyObject *self, PyObject *args);
CH_INTERNAL PyObject *ch_build_tables(PyObject *self, PyObject *args);

#endif
