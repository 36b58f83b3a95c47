"""The explain tool's per-concept table: mAP@R of each sub-code and leaving it out."""
import numpy as np
import pytest

from concepthash_jax import evaluation
from concepthash_jax.interpret import report
from concepthash_jax.tools import explain


def test_the_concept_that_carries_the_class_stands_out():
  rng = np.random.default_rng(0)
  num_classes, width = 6, 4
  centres = rng.choice([-1, 1], (num_classes, width))

  def split(num):
    labels = rng.integers(0, num_classes, num)
    codes = rng.choice([-1, 1], (num, 3 * width)).astype(np.int8)
    codes[:, width:2 * width] = centres[labels]  # concept 1 encodes the class
    return {'codes': codes, 'labels': labels}

  query, database = split(40), split(300)
  numbers = explain.concept_map_at_r(query, database, 3, R=50)
  for m in range(3):
    bits = slice(m * width, (m + 1) * width)
    assert numbers['alone'][m] == pytest.approx(evaluation.map_at_r(
        query['codes'][:, bits], query['labels'], database['codes'][:, bits],
        database['labels'], R=50), abs=1e-12)
    rest = np.delete(np.arange(3 * width), np.arange(3 * width)[bits])
    assert numbers['without'][m] == pytest.approx(evaluation.map_at_r(
        query['codes'][:, rest], query['labels'], database['codes'][:, rest],
        database['labels'], R=50), abs=1e-12)
  assert numbers['alone'][1] > 0.3 + max(numbers['alone'][0], numbers['alone'][2])
  assert numbers['without'][1] < min(numbers['without'][0], numbers['without'][2])
  lines = report.concept_table({'concept_retrieval': numbers})
  assert lines[0] == '## Which concepts carry the class'
  assert lines[-4].startswith('| 0 | ') and len(lines[-4].split('|')) == 6
  one = explain.concept_map_at_r(query, database, 1, R=50)
  assert one['without'] is None and '| 0 | ' in '\n'.join(
      report.concept_table({'concept_retrieval': one}))
