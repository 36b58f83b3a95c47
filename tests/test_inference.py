"""inference.ConceptHasher on a tiny trained run: images in every form, text, errors."""
import ast
import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

import train_testlib as lib
from concepthash_jax import data
from concepthash_jax import exporting
from concepthash_jax import inference
from concepthash_jax import optim


@pytest.fixture(scope='module')
def hasher(tmp_path_factory):
  workdir, _ = lib.trained_tiny_run(tmp_path_factory)
  return inference.ConceptHasher.load(workdir)


@pytest.fixture(scope='module')
def own_test_codes(hasher):
  """The run's evaluation path: encoding.encode_split."""
  return hasher.encode_split('test', attention=True)


def test_encode_arrays_pil_paths_and_folder_equal_run_evaluation(
    hasher, own_test_codes, tmp_path):
  ds = hasher.dataset('test')
  images = [ds[i]['image'] for i in range(len(ds))]  # 12: batches of 8, padded.
  out = hasher.encode(images, attention=True, display=True)
  np.testing.assert_array_equal(out['codes'], own_test_codes['codes'])
  np.testing.assert_array_equal(out['concept_attn'], own_test_codes['concept_attn'])
  assert out['codes'].dtype == np.int8 and out['codes'].shape == (12, 8)
  assert out['images'].shape == (12, 32, 32, 3) and out['images'].dtype == np.uint8
  assert out['paths'] == [''] * 12
  # PNG files (lossless), in class sub-folders: a folder is read recursively, sorted.
  paths = []
  for i, image in enumerate(images):
    sub = tmp_path / f'c{ds.labels[i]}'
    sub.mkdir(exist_ok=True)
    paths.append(str(sub / f'{i:02d}.png'))
    Image.fromarray(image).save(paths[-1])
  by_path = hasher.encode(paths)
  np.testing.assert_array_equal(by_path['codes'], own_test_codes['codes'])
  assert by_path['paths'] == paths
  by_folder = hasher.encode(str(tmp_path))
  order = [paths.index(p) for p in by_folder['paths']]
  assert sorted(order) == list(range(12))
  np.testing.assert_array_equal(by_folder['codes'], own_test_codes['codes'][order])
  single = hasher.encode(Image.fromarray(images[3]))
  np.testing.assert_array_equal(single['codes'], own_test_codes['codes'][3:4])
  assert 'concept_attn' not in single


def test_encode_text_of_class_prompts_gives_the_trained_class_centers(hasher):
  prompts = [f'a photo of a {name}' for name in hasher.class_names]
  text = hasher.encode_text(prompts)
  centers = hasher.class_centers  # From the model's forward (training's path).
  np.testing.assert_allclose(text['centers'], centers, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(text['codes'], np.where(centers >= 0, 1, -1))
  one = hasher.encode_text(prompts[1])
  np.testing.assert_array_equal(one['codes'], text['codes'][1:2])
  with pytest.raises(ValueError, match='empty prompt list'):
    hasher.encode_text([])


def test_unreadable_image_and_bad_inputs_are_named(hasher, tmp_path):
  bad = tmp_path / 'broken.jpg'
  bad.write_bytes(b'not a jpeg')
  with pytest.raises(data.CorruptImageError, match='broken.jpg'):
    hasher.encode([str(bad)])
  with pytest.raises(data.CorruptImageError, match='missing.png'):
    hasher.encode(str(tmp_path / 'missing.png'))
  with pytest.raises(ValueError, match=r'values in \[255, 255\].*uint8'):
    hasher.encode(np.full((8, 8, 3), 255, np.float32))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match='No images'):
    hasher.encode(str(tmp_path / 'empty'))


def test_load_rejects_what_is_neither_run_nor_export(hasher, tmp_path):
  with pytest.raises(exporting.ExportError, match='neither a training workdir'):
    inference.ConceptHasher.load(str(tmp_path))
  for name in ('config.json', 'clip_config.json', 'class_names.json'):
    shutil.copy(os.path.join(hasher.source, name), tmp_path)
  (tmp_path / 'checkpoints').mkdir()  # A run that never saved a step.
  with pytest.raises(FileNotFoundError, match='holds no checkpoint'):
    inference.ConceptHasher.load(str(tmp_path))


def test_load_restores_the_model_variables_without_the_optimizer(hasher, tmp_path,
                                                                 monkeypatch):
  # A run keeps loading after its optimizer config, or the optimizer code, changed.
  workdir = str(tmp_path / 'run')
  shutil.copytree(hasher.source, workdir)
  with open(os.path.join(workdir, 'config.json')) as f:
    config = json.load(f)
  config['optim']['momentum'] = 0.0
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(config, f)

  def no_optimizer(*args, **kwargs):
    raise AssertionError('inference built an optimizer')

  monkeypatch.setattr(optim, 'make_optimizer', no_optimizer)
  loaded = inference.ConceptHasher.load(workdir)
  assert loaded.step == hasher.step
  ours, theirs = jax.tree.leaves(loaded.variables), jax.tree.leaves(hasher.variables)
  assert jax.tree.structure(loaded.variables) == jax.tree.structure(hasher.variables)
  for a, b in zip(ours, theirs):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_inference_imports_no_training_code():
  with open(inference.__file__) as f:
    tree = ast.parse(f.read())
  imported = {alias.name for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom) and node.module == 'concepthash_jax'
              for alias in node.names}
  assert not imported & {'train', 'optim'}, imported
