"""tools/search.py and the see-why pages on a tiny trained run (network-free)."""
import io
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import train_testlib as lib
from concepthash_jax import data
from concepthash_jax import index as index_lib
from concepthash_jax import inference
from concepthash_jax.tools import search


@pytest.fixture(scope='module')
def split_run(tmp_path_factory):
  """Database = train split (saved index), queries = the test split, with pages."""
  workdir, results = lib.trained_tiny_run(tmp_path_factory)
  hasher = inference.ConceptHasher.load(workdir)
  tmp = tmp_path_factory.mktemp('search')
  out = io.StringIO()
  found = search.search_and_explain(
      model=hasher, db_split='train', index_path=str(tmp / 'db.index.npz'),
      query_split='test', k=5, why=str(tmp / 'why'), why_max=1, out=out)
  return hasher, results, tmp, found, out.getvalue()


def _page(path):
  with open(path, encoding='utf-8') as f:
    return f.read()


def test_split_queries_precision_equals_evaluator(split_run):
  _, results, tmp, found, text = split_run
  index = index_lib.CodeIndex.load(str(tmp / 'db.index.npz'))
  assert len(index) == 24 and index.info['split'] == 'train'
  codes = np.stack([q.code for q in found['queries']])
  labels = np.array([q.label for q in found['queries']])
  metrics = index.evaluate(codes, labels, topk=(5,))
  assert np.mean(found['precision']) == pytest.approx(metrics['precision_at_5'],
                                                      abs=1e-12)
  assert metrics['map_at_r'] == pytest.approx(results['map_at_r'], abs=1e-12)
  assert re.search(r'search P@5 (\S+), evaluator P@5 \1', text)
  # Ties by database position, as map_at_r(ties="index"): stable order.
  dist = index.search(codes, 24)[1]
  for row, (pos, d) in enumerate(zip(found['positions'], found['distances'])):
    np.testing.assert_array_equal(d, dist[row, :5])
    assert all(p0 < p1 for p0, p1, d0, d1 in zip(pos, pos[1:], d, d[1:])
               if d0 == d1)
  assert 'per-concept' in text


def test_why_page_is_self_contained_with_one_map_per_concept(split_run):
  *_, tmp, found, text = split_run
  html_path, png_path = re.search(r'see why: (\S+\.html) (\S+\.png)',
                                  text).groups()
  page = _page(html_path)
  assert 'http://' not in page and 'https://' not in page and '<link' not in page
  images = re.findall(r'src="data:image/png;base64,[A-Za-z0-9+/=]+"', page)
  # Query + 5 neighbours, each: the image and 4 concept maps.
  assert len(images) == 6 * (1 + 4)
  assert page.count('class="agree"') + page.count('class="differ"') == 5 * 4
  assert Image.open(png_path).size[0] > 300


def test_text_queries_on_the_saved_index(split_run):
  hasher, _, tmp, _, _ = split_run
  out = io.StringIO()
  found = search.search_and_explain(
      model=hasher, index_path=str(tmp / 'db.index.npz'),
      texts=['a photo of a {class}', 'a small bird'], k=3,
      why=str(tmp / 'why_text'), why_max=5, out=out)
  queries = found['queries']
  assert len(queries) == 5 and [q.label for q in queries] == [0, 1, 2, 3, -1]
  assert np.isnan(found['precision'][4]) and np.isfinite(found['precision'][:4]).all()
  assert 'prompt' in out.getvalue() and 'mean' in out.getvalue()
  page = _page(re.findall(r'see why: (\S+\.html)', out.getvalue())[-1])
  assert '&ldquo;a small bird&rdquo;' in page
  # A text query has no image: only its 3 neighbours' images and maps.
  assert len(re.findall(r'src="data:image/png', page)) == 3 * (1 + 4)


def test_folder_database_and_image_query_and_faiss(split_run, tmp_path):
  hasher = split_run[0]
  ds = data.build(lib.load_config().data, 'train')
  paths = []
  for i in range(8):
    folder = tmp_path / 'db' / f'class_{ds.labels[i]}'
    folder.mkdir(parents=True, exist_ok=True)
    paths.append(str(folder / f'{i}.png'))
    Image.fromarray(ds[i]['image']).save(paths[-1])
  out = io.StringIO()
  found = search.search_and_explain(
      model=hasher, db_folder=str(tmp_path / 'db'), images=[paths[5]], k=3,
      out=out)
  index = found['index']
  assert sorted(index.paths) == sorted(paths)
  names = index.info['class_names']
  assert [names[l] for l in index.labels] == [
      os.path.basename(os.path.dirname(p)) for p in index.paths]
  top = index.paths[found['positions'][0, 0]]
  assert found['distances'][0, 0] == 0
  assert index.codes([found['positions'][0, 0]])[0].tolist() == \
      found['queries'][0].code.tolist()
  assert '0/0/0/0' in out.getvalue() and top in out.getvalue()
  via_faiss = search.search_and_explain(
      model=hasher, db_folder=str(tmp_path / 'db'), images=[paths[5]], k=3,
      faiss_kind='flat', out=io.StringIO())
  np.testing.assert_array_equal(via_faiss['distances'], found['distances'])


def test_user_mistakes_are_one_clear_error(split_run, tmp_path):
  hasher = split_run[0]
  other = str(tmp_path / 'other.index.npz')
  index_lib.CodeIndex(np.ones((4, 16))).save(other)
  with pytest.raises(ValueError, match='16-bit codes.*8-bit.*another model'):
    search.search_and_explain(model=hasher, index_path=other,
                              texts=['a bird'], out=io.StringIO())
  with pytest.raises(ValueError, match='No query'):
    search.search_and_explain(
        model=hasher, index_path=str(split_run[2] / 'db.index.npz'),
        out=io.StringIO())
  bad = tmp_path / 'broken.jpg'
  bad.write_bytes(b'not a jpeg')
  cli = subprocess.run(
      [sys.executable, '-m', 'concepthash_jax.tools.search',
       f'--model={hasher.source}', f'--index={split_run[2] / "db.index.npz"}',
       f'--image={bad}'],
      cwd=lib.ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu',
                             HF_HUB_OFFLINE='1'),
      capture_output=True, text=True, timeout=300, check=False)
  assert cli.returncode == 2
  last = cli.stderr.strip().splitlines()[-1]
  assert last.startswith('search: Cannot read image') and 'broken.jpg' in last
