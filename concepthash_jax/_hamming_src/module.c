/* The Python module concepthash_jax._hamming: its method table, the
instruction-set variants (one copy of every hot loop each, defined in the
unit of that loop) and their detection at import, the thread pool the passes
run on, and the checks of the arrays they are given. common.h lists the
units. */
#include "common.h"

#include <pthread.h>

/* Best first; `supported` is filled in at import. */
static Variant variants[] = {
#ifdef CH_X86
    {"avx512vpopcntdq", ch_stats_avx512, ch_tile_avx512, ch_mih_avx512, 1, 0},
    {"popcnt", ch_stats_popcnt, ch_tile_popcnt, ch_mih_popcnt, 0, 0},
#endif
    {"portable", ch_stats_default, ch_tile_default, ch_mih_default, 0, 1},
};
#define NUM_VARIANTS ((int)(sizeof(variants) / sizeof(variants[0])))
static int chosen = 0; /* index into variants */

const Variant *ch_variant(void) { return &variants[chosen]; }

static void detect(void) {
#ifdef CH_X86
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

int ch_run_threads(void (*body)(void *), void *job, atomic_long *next,
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

int ch_get_buffer(PyObject *obj, Py_buffer *view, int writable,
                  Py_ssize_t itemsize, Py_ssize_t count, const char *name) {
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

int64_t ch_count_codes_in(PyObject *obj, int64_t words) {
  Py_buffer probe;
  if (PyObject_GetBuffer(obj, &probe, PyBUF_C_CONTIGUOUS)) return -1;
  const int64_t count = probe.len / 8 / words;
  PyBuffer_Release(&probe);
  return count;
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
    {"stats", (PyCFunction)(void (*)(void))ch_stats,
     METH_VARARGS | METH_KEYWORDS,
     "Per-query Hamming histograms, AP@R and top-k hits (see evaluation.py)."},
    {"floor", ch_floor, METH_VARARGS,
     "floor(qbits, dbits, nbit, counts, threads): distances (and all-item "
     "counts) of every pair, nothing else (benchmarks)."},
    {"knn", ch_knn, METH_VARARGS,
     "knn(qbits, dbits, nbit, masks, k, positions, distances, threads): "
     "exact k nearest by a brute pass (see knn.py)."},
    {"multi_index", ch_multi_index, METH_VARARGS,
     "multi_index(qbits, dbits, nbit, k, starts, widths, bases, offsets, "
     "items, codes, budget, probe_cost, positions, distances, fell_back, "
     "threads): exact k nearest by multi-index hashing (see knn.py)."},
    {"build_tables", ch_build_tables, METH_VARARGS,
     "build_tables(dbits, nbit, starts, widths, bases, offsets, items, "
     "codes, threads): fills multi-index hash tables (see knn.py)."},
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
