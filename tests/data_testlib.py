"""Shared helpers of the dataset tests: files in the real datasets' layouts.

test_data.py reads them back through the loaders and test_train.py trains a
step on them, so both exercise one description of each layout.
"""
import os

import numpy as np
import scipy.io

# Columns of the Stanford Cars devkit's `annotations` struct array.
_CARS_FIELDS = [(f, 'O') for f in ('bbox_x1', 'bbox_y1', 'bbox_x2', 'bbox_y2',
                                   'class', 'fname')]


def _cars_annotations(rows, box):
  """{'annotations': 1 x N struct array} as the devkit's .mat files hold it."""
  table = np.zeros(len(rows), dtype=_CARS_FIELDS)
  for k, (fname, label) in enumerate(rows):
    table[k] = (*box, label, fname)
  return {'annotations': table[None]}


def write_cars_mats(root, names, train_rows, test_rows, box=(1, 1, 30, 30)):
  """Writes the Stanford Cars .mat files (the images are the caller's).

  Args:
    root: the stanford_cars/ folder; created if missing.
    names: class names, in label order.
    train_rows: (fname, 1-based label) per cars_train/ image.
    test_rows: the same for cars_test/.
    box: (x1, y1, x2, y2) of every bounding box.
  """
  root = str(root)
  os.makedirs(os.path.join(root, 'devkit'), exist_ok=True)
  scipy.io.savemat(os.path.join(root, 'devkit', 'cars_meta.mat'),
                   {'class_names': np.array(names, dtype=object)[None]})
  scipy.io.savemat(os.path.join(root, 'devkit', 'cars_train_annos.mat'),
                   _cars_annotations(train_rows, box))
  scipy.io.savemat(os.path.join(root, 'cars_test_annos_withlabels.mat'),
                   _cars_annotations(test_rows, box))
