"""Hamming-ranking metrics: mAP@R (docs/method.md §5, §6.1), P@k, radius precision, PR curve.

Pure metric math, arrays in: nothing here imports a model or a data module.
Codes are real arrays (a value > 0 is bit 1) or `PackedCodes`; labels are int
class ids (N,) or multi-hot (N, C), where relevant = sharing any label.
K is the code length (`nbit`), N the database size, Q the number of queries.

The package, one job per module:
  metrics       mAP@R, P@k, radius precision, the PR curve; scores of encoded splits
  average_ties  `ties="average"`: the expected AP over all orders of tied items
  native        the native kernel's binding (`_hamming_src/stats.c`, CPU threads)
  xla           the jitted stages, database split over a device mesh
  packing       codes and labels as packed bits; jittable distance and relevance

Both engines sum AP in one canonical order on any number of devices: float32
terms cum_rel / rank, a pairwise tree of adjacent pairs inside each aligned
512-item segment of the database, segment sums added in float64 in database
order. So the result has the same bits on 1 or 8 devices and from the native
kernel.
"""
# pylint: disable=g-importing-member
from concepthash_jax.evaluation.average_ties import expected_average_precision
from concepthash_jax.evaluation.metrics import KERNELS
from concepthash_jax.evaluation.metrics import TIES
from concepthash_jax.evaluation.metrics import chance_map_at_r
from concepthash_jax.evaluation.metrics import map_at_r
from concepthash_jax.evaluation.metrics import pick_kernel as _pick_kernel
from concepthash_jax.evaluation.metrics import precision_ks
from concepthash_jax.evaluation.metrics import retrieval_cutoff
from concepthash_jax.evaluation.metrics import retrieval_metrics
from concepthash_jax.evaluation.metrics import score
# The native kernel, for the tests that pick its instruction-set variant.
from concepthash_jax.evaluation.native import _hamming
from concepthash_jax.evaluation.packing import PackedCodes
from concepthash_jax.evaluation.packing import hamming_distance
from concepthash_jax.evaluation.packing import pack_codes
from concepthash_jax.evaluation.packing import pack_labels
from concepthash_jax.evaluation.packing import relevance
from concepthash_jax.evaluation.xla import average_precision

__all__ = [
    'KERNELS', 'TIES', 'PackedCodes', 'average_precision', 'chance_map_at_r',
    'expected_average_precision', 'hamming_distance', 'map_at_r', 'pack_codes',
    'pack_labels', 'precision_ks', 'relevance', 'retrieval_cutoff',
    'retrieval_metrics', 'score', '_hamming', '_pick_kernel',
]
