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
from concepthash_jax import errors
from concepthash_jax import evaluation
from concepthash_jax import index as index_lib
from concepthash_jax import inference
from concepthash_jax import safe_files
from concepthash_jax.tools import export
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
  assert last.startswith('FATAL: Cannot read image') and 'broken.jpg' in last


# ---------------------------------------------------- concepts, files, errors


@pytest.fixture(scope='module')
def image_files(split_run, tmp_path_factory):
  """8 train images in class folders named like the model's classes."""
  hasher = split_run[0]
  ds = data.build(lib.load_config().data, 'train')
  root = tmp_path_factory.mktemp('images')
  paths = []
  for i in range(8):
    folder = root / hasher.class_names[ds.labels[i]]
    folder.mkdir(exist_ok=True)
    paths.append(str(folder / f'{i}.png'))
    Image.fromarray(ds[i]['image']).save(paths[-1])
  return root, paths


def _brute(query_code, index, weights, num_concepts=4):
  """Reference: stable argsort of weighted per-concept distances."""
  db = index.codes(np.arange(len(index)))
  per = index_lib.concept_distances(np.asarray(query_code)[None], db,
                                    num_concepts)[0]
  dist = (per * np.asarray(weights)).sum(-1)
  order = np.argsort(dist, kind='stable')
  return order, dist[order]


def test_concept_query_and_its_page(split_run, image_files, tmp_path):
  hasher, _, tmp, _, _ = split_run
  index_path = str(tmp / 'db.index.npz')
  out = io.StringIO()
  found = search.search_and_explain(
      model=hasher, index_path=index_path, images=[image_files[1][3]], k=6,
      concepts=['1', '3'], why=str(tmp_path / 'why'), why_max=1, out=out)
  order, dist = _brute(found['queries'][0].code, found['index'], [0, 1, 0, 1])
  np.testing.assert_array_equal(found['positions'][0], order[:6])
  np.testing.assert_array_equal(found['distances'][0], dist[:6])
  assert 'dist = c1 + c3' in out.getvalue()
  page = _page(re.search(r'see why: (\S+\.html)', out.getvalue()).group(1))
  assert page.count('(not counted)</th>') == 2
  assert page.count('class="left-out"') == 2 * (1 + 1 + 6)  # header + rows
  assert safe_files.folder_kind(str(tmp_path / 'why')) == 'pages'
  weighted = search.search_and_explain(
      model=hasher, index_path=index_path, images=[image_files[1][3]], k=6,
      weights=['1', '0', '2', '1'], why=str(tmp_path / 'why'), why_max=1,
      out=io.StringIO())
  order, dist = _brute(weighted['queries'][0].code, weighted['index'],
                       [1, 0, 2, 1])
  np.testing.assert_array_equal(weighted['distances'][0], dist[:6])
  np.testing.assert_array_equal(weighted['positions'][0], order[:6])
  page = _page(str(tmp_path / 'why' / '000_3.html'))
  assert 'concept 2 (x2)' in page and 'concept 1 (not counted)' in page


def test_composite_query_from_two_images(split_run, image_files):
  hasher, _, tmp, _, _ = split_run
  head, wing = image_files[1][0], image_files[1][5]
  found = search.search_and_explain(
      model=hasher, index_path=str(tmp / 'db.index.npz'),
      compose=[f'{head}:0,1', f'{wing}:3'], k=5, out=io.StringIO())
  codes = hasher.encode([head, wing])['codes']
  # 8 bits, 2 a concept; concept 2 (not counted) keeps the first part's bits.
  mixed = np.concatenate([codes[0][:6], codes[1][6:]])
  query = found['queries'][0]
  np.testing.assert_array_equal(query.code, mixed)
  np.testing.assert_array_equal(query.weights, [1, 1, 0, 1])
  order, dist = _brute(mixed, found['index'], [1, 1, 0, 1])
  np.testing.assert_array_equal(found['positions'][0], order[:5])
  np.testing.assert_array_equal(found['distances'][0], dist[:5])
  for bad in ([f'{head}'], [f'{head}:x'], [f'{head}:0', f'{wing}:0'],
              [f'{tmp}/missing.png:1']):
    with pytest.raises(search.SearchError, match='--compose'):
      search.search_and_explain(model=hasher, index_path=str(
          tmp / 'db.index.npz'), compose=bad, out=io.StringIO())


def test_add_appends_only_new_images_equal_to_building_at_once(
    split_run, image_files, tmp_path):
  hasher = split_run[0]
  root, paths = image_files
  folder = tmp_path / 'grow'
  for p in paths[:4]:
    target = folder / os.path.relpath(p, root)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(open(p, 'rb').read())
  index_path = str(tmp_path / 'grow.chindex')
  search.search_and_explain(model=hasher, db_folder=str(folder),
                            index_path=index_path, out=io.StringIO())
  for p in paths[4:]:
    target = folder / os.path.relpath(p, root)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(open(p, 'rb').read())
  out = io.StringIO()
  search.search_and_explain(model=hasher, index_path=index_path,
                            add=str(folder), out=out)
  assert '4 of 8 images' in out.getvalue() and '4 images appended' in out.getvalue()
  grown = index_lib.CodeIndex.load(index_path)
  whole = search.build_index(hasher, folder=str(folder))
  order = [list(whole.paths).index(p) for p in grown.paths]
  np.testing.assert_array_equal(grown.codes(np.arange(8)), whole.codes(order))
  names = lambda index, rows: [index.info['class_names'][l]
                               for l in np.asarray(index.labels)[rows]]
  assert names(grown, np.arange(8)) == names(whole, order)
  codes = whole.codes(np.arange(8))
  np.testing.assert_array_equal(grown.search(codes, 8)[1], whole.search(codes, 8)[1])


def test_class_prompts_match_the_index_classes_by_name(split_run, image_files,
                                                       tmp_path):
  hasher = split_run[0]
  root, _ = image_files
  by_name = search.search_and_explain(
      model=hasher, db_folder=str(root), texts=['a photo of a {class}'], k=3,
      out=io.StringIO())
  index = by_name['index']
  labels = [index.info['class_names'].index(name) if name in
            index.info['class_names'] else -1 for name in hasher.class_names]
  want = [np.mean(np.asarray(index.labels)[pos] == label) if label >= 0
          else np.nan for pos, label in zip(by_name['positions'], labels)]
  np.testing.assert_array_equal(by_name['precision'], want)
  renamed = tmp_path / 'renamed'
  for p in root.rglob('*.png'):
    target = renamed / f'other_{p.parent.name}' / p.name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(p.read_bytes())
  out = io.StringIO()
  foreign = search.search_and_explain(
      model=hasher, db_folder=str(renamed), texts=['a photo of a {class}'], k=3,
      out=out)
  assert np.isnan(foreign['precision']).all()
  assert 'no P@3' in out.getvalue()


def test_fingerprint_refuses_another_model_and_survives_export(split_run,
                                                               tmp_path, capsys):
  hasher, _, tmp, _, _ = split_run
  assert len(hasher.fingerprint) == 64
  export.export_hasher(hasher, str(tmp_path / 'exported'))
  assert inference.ConceptHasher.load(str(tmp_path / 'exported')).fingerprint \
      == hasher.fingerprint
  saved = index_lib.CodeIndex.load(str(tmp / 'db.index.npz'))
  assert saved.fingerprint == hasher.fingerprint
  other = str(tmp_path / 'other.chindex')
  index_lib.CodeIndex(np.ones((4, 8)), fingerprint='0' * 64).save(other)
  with pytest.raises(search.SearchError, match='other.chindex was built by '
                     'another model'):
    search.search_and_explain(model=hasher, index_path=other, texts=['a bird'],
                              out=io.StringIO())
  legacy = str(tmp_path / 'legacy.npz')
  with open(legacy, 'wb') as f:
    np.savez(f, format=np.int32(1), nbit=np.int32(8),
             bits=evaluation.pack_codes(np.ones((4, 8))).bits)
  search.search_and_explain(model=hasher, index_path=legacy, texts=['a bird'],
                            k=2, out=io.StringIO())
  assert 'legacy.npz records no model fingerprint' in capsys.readouterr().err


def test_store_search_equals_the_index(split_run, image_files, tmp_path):
  hasher, _, tmp, _, _ = split_run
  index = index_lib.CodeIndex.load(str(tmp / 'db.index.npz'))
  uri = str(tmp_path / 'codes.lance')
  index.to_store(uri)
  image = image_files[1][2]
  for kwargs in ({}, {'concepts': ['0', '2']}):
    via_store = search.search_and_explain(model=hasher, store=uri,
                                          images=[image], k=4,
                                          out=io.StringIO(), **kwargs)
    via_index = search.search_and_explain(model=hasher, index_path=str(
        tmp / 'db.index.npz'), images=[image], k=4, out=io.StringIO(), **kwargs)
    np.testing.assert_array_equal(via_store['distances'],
                                  via_index['distances'])
    rows, dist = via_store['index'], via_index['distances'][0]
    untied = dist < dist[-1]
    np.testing.assert_array_equal(
        np.asarray(rows.ids)[via_store['positions'][0]][untied],
        np.asarray(index.ids)[via_index['positions'][0]][untied])


def test_bad_paths_and_values_are_one_clear_error(split_run, image_files,
                                                  tmp_path, monkeypatch):
  hasher, _, tmp, _, _ = split_run
  good = str(tmp / 'db.index.npz')
  image = image_files[1][0]

  def refused(error, match, **kwargs):
    kwargs.setdefault('index_path', good)
    kwargs.setdefault('images', [image])
    with pytest.raises(error, match=match) as info:
      search.search_and_explain(model=hasher, out=io.StringIO(), **kwargs)
    assert isinstance(info.value, errors.UserError)
    assert '\n' not in str(info.value)

  (tmp_path / 'a_folder').mkdir()
  refused(index_lib.IndexFileError, 'a_folder is a folder, not a code index',
          index_path=str(tmp_path / 'a_folder'))
  truncated = tmp_path / 'cut.chindex'
  truncated.write_bytes(open(good, 'rb').read()[:300])
  refused(index_lib.IndexFileError, 'cut.chindex is truncated',
          index_path=str(truncated))
  floats = str(tmp_path / 'floats.npz')
  with open(floats, 'wb') as f:
    np.savez(f, format=np.int32(1), nbit=np.int32(8), bits=np.ones((3, 1)))
  refused(index_lib.IndexFileError, 'floats.npz: its codes are float64',
          index_path=floats)
  model = tmp_path / 'model.safetensors'
  model.write_bytes(b'weights' * 3000)
  refused(safe_files.OverwriteError, 'model.safetensors exists and is not a '
          'code index', index_path=str(model), db_folder=str(image_files[0]))
  assert model.read_bytes() == b'weights' * 3000
  refused(search.SearchError, 'blank prompt', texts=['  '], images=[])
  refused(search.SearchError, '--why_max >= 0', why_max=-1)
  refused(search.SearchError, r'--why \S+model.safetensors is a file, not a folder', why=str(model))
  refused(search.SearchError, 'model.safetensors is a file',
          why=str(model / 'pages'))
  (tmp_path / 'mine' / 'notes.txt').parent.mkdir()
  (tmp_path / 'mine' / 'notes.txt').write_text('keep me')
  refused(search.SearchError, 'mine is a folder of other files',
          why=str(tmp_path / 'mine'))

  def read_only(*args, **kwargs):
    raise OSError(30, 'Read-only file system')

  monkeypatch.setattr(safe_files.os, 'makedirs', read_only)
  refused(safe_files.WriteError, 'ro_pages: Read-only file system; the disk is '
          'read-only', why=str(tmp_path / 'ro_pages'))
  monkeypatch.undo()
  many = search.search_and_explain(model=hasher, index_path=good,
                                   images=[str(image_files[0])], k=2,
                                   out=io.StringIO())
  assert len(many['queries']) == 8  # --image FOLDER: its images


def test_dollar_prompt_draws_literally(split_run, tmp_path):
  hasher, _, tmp, _, _ = split_run
  out = io.StringIO()
  search.search_and_explain(model=hasher, index_path=str(tmp / 'db.index.npz'),
                            texts=['a $5 bird $x^2$', 'a $ \\frac{ bird'], k=2,
                            why=str(tmp_path / 'why'), out=out)
  pngs = re.findall(r'see why: \S+ (\S+\.png)', out.getvalue())
  assert len(pngs) == 2 and all(Image.open(p).size[0] > 100 for p in pngs)


def test_cli_bad_index_is_one_fatal_line(split_run, tmp_path):
  hasher = split_run[0]
  cli = subprocess.run(
      [sys.executable, '-m', 'concepthash_jax.tools.search',
       f'--model={hasher.source}', f'--index={tmp_path}', '--text=a bird'],
      cwd=lib.ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu',
                             HF_HUB_OFFLINE='1'),
      capture_output=True, text=True, timeout=300, check=False)
  assert cli.returncode == 2
  assert cli.stderr.strip().splitlines()[-1] == (
      f'FATAL: {tmp_path} is a folder, not a code index; give the index file '
      '(written by concepthash-search --index).')
  assert 'Traceback' not in cli.stderr
