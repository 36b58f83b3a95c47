"""concepthash-explore without a browser: the engine, and the app over HTTP (TestClient).

The ranking the app returns is checked against the concept distances of
`index.concept_distances`, ties by database position; bad uploads and path
traversal attempts against a live app on the tiny trained run.
"""
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from starlette import testclient as starlette_testclient

import train_testlib as lib
from concepthash_jax import index as index_lib
from concepthash_jax import inference
from concepthash_jax.explore import engine
from concepthash_jax.explore import app as app_lib
from concepthash_jax.tools import explore as tool


def reference_ranking(codes, query_code, num_concepts, k, weights=None):
  """Positions and distances by weighted concept distances, ties by position."""
  per = index_lib.concept_distances(np.asarray(query_code)[None], codes,
                                    num_concepts)[0]
  w = np.ones(num_concepts, np.int64) if weights is None else np.asarray(weights)
  distance = per @ w
  order = np.lexsort((np.arange(len(distance)), distance))[:k]
  return order.tolist(), distance[order].tolist()


def png(image, **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format=kwargs.pop('format', 'PNG'), **kwargs)
  return buffer.getvalue()


# ------------------------------------------------------------------ engine


@pytest.mark.parametrize('nbit,num_concepts', [(8, 4), (64, 4), (48, 3)])
def test_rank_equals_concept_distances(nbit, num_concepts):
  rng = np.random.default_rng(nbit)
  codes = np.where(rng.random((3000, nbit)) > 0.5, 1, -1).astype(np.int8)
  index = index_lib.CodeIndex(codes, num_concepts=num_concepts)
  for weights in (None, [0, 2] + [1] * (num_concepts - 2),
                  [3] + [0] * (num_concepts - 1)):
    query = codes[7] * np.where(rng.random(nbit) > 0.9, -1, 1)
    chosen = engine.concept_weights(num_concepts, weights=weights)
    positions, distances = engine.rank(index, query, 50, chosen)
    want_pos, want_dist = reference_ranking(codes, query, num_concepts, 50,
                                            weights)
    assert positions.tolist() == want_pos and distances.tolist() == want_dist


def test_concept_weights_checks_every_value():
  assert engine.concept_weights(4) is None
  assert engine.concept_weights(4, concepts=[0, 2]).tolist() == [1, 0, 1, 0]
  assert engine.concept_weights(4, weights=[2, 0, 1, 1]).tolist() == [2, 0, 1, 1]
  # Each message names the bad value (the wording past it is the index's).
  for kwargs, words in (({'concepts': [4]}, r'(?i)concept 4'),
                        ({'weights': [1, -1, 1, 1]}, '-1'),
                        ({'weights': [1, 1]}, r'(?i)weights.*\b4\b'),
                        ({'weights': [0, 0, 0, 0]}, 'switched off'),
                        ({'weights': [1, 'x', 1, 1]}, 'integer'),
                        ({'weights': [1, 0.5, 1, 1]}, 'integer'),
                        ({'weights': 3}, 'must be a list'),
                        ({'concepts': [1], 'weights': [1, 1, 1, 1]}, 'not both')):
    with pytest.raises(engine.RequestError, match=words):
      engine.concept_weights(4, **kwargs)


def test_composite_code_takes_each_concept_from_its_part():
  a = np.array([1, 1, -1, -1, 1, -1, 1, 1], np.int8)
  b = -a
  code, weights = engine.composite_code([(a, [0, 3]), (b, [1])], 4)
  assert code[[0, 1, 6, 7]].tolist() == a[[0, 1, 6, 7]].tolist()
  assert code[2:4].tolist() == b[2:4].tolist()
  assert weights.tolist() == [1, 1, 0, 1]
  with pytest.raises(engine.RequestError, match='given by parts'):
    engine.composite_code([(a, [0]), (b, [0])], 4)
  with pytest.raises(engine.RequestError, match='at least one concept'):
    engine.composite_code([(a, [])], 4)


def test_decode_upload_converts_or_refuses_with_a_sentence():
  rgb = Image.fromarray(np.arange(48 * 40 * 3, dtype=np.uint8).reshape(40, 48, 3))
  pixels, note = engine.decode_upload(png(rgb))
  assert pixels.shape == (40, 48, 3) and note == ''
  deep = Image.fromarray(np.full((20, 30), 65535, np.uint16))
  pixels, note = engine.decode_upload(png(deep))
  assert pixels.shape == (20, 30, 3) and (pixels == 255).all() and '16' in note
  cmyk = rgb.convert('CMYK')
  pixels, note = engine.decode_upload(png(cmyk, format='JPEG'))
  assert pixels.shape == (40, 48, 3) and 'CMYK' in note
  with pytest.raises(engine.RequestError, match='not an image file'):
    engine.decode_upload(b'%PDF-1.4 not a picture')
  with pytest.raises(engine.RequestError, match='empty'):
    engine.decode_upload(b'')
  with pytest.raises(engine.RequestError, match='not a readable image'):
    engine.decode_upload(png(rgb, format='JPEG')[:300])
  with pytest.raises(engine.RequestError, match='10000x5000 pixels'):
    engine.decode_upload(png(Image.new('1', (10000, 5000))))


# -------------------------------------------------------------- the app


@pytest.fixture(scope='module')
def served(tmp_path_factory):
  """(explorer, TestClient, test images as PNG bytes) on the tiny run's train split."""
  workdir, _ = lib.trained_tiny_run(tmp_path_factory)
  hasher = inference.ConceptHasher.load(workdir)
  index = tool.load_index(hasher, db_split='train')
  explorer = engine.Explorer(hasher, index, default_k=10)
  client = starlette_testclient.TestClient(
      app_lib.create_app(explorer, max_upload_bytes=200_000))
  test_images = [np.asarray(hasher.dataset('test')[i]['image']) for i in (0, 5)]
  return explorer, client, test_images


def _all_codes(explorer):
  return explorer.index.codes(np.arange(len(explorer.index)))


def test_upload_search_and_weights_equal_the_reference(served):
  explorer, client, images = served
  query = client.post('/api/query/image?name=bird.png',
                      content=png(Image.fromarray(images[0]))).json()
  assert query['kind'] == 'image' and query['title'] == 'bird.png'
  assert query['has_image'] and len(query['subcodes']) == 4
  code = explorer.hasher.encode(images[0], batch_size=1)['codes'][0]
  assert ''.join(query['subcodes']) == ''.join('1' if b > 0 else '0' for b in code)
  for body, weights in (({}, None), ({'concepts': [0, 2]}, [1, 0, 1, 0]),
                        ({'weights': [2, 0, 1, 3]}, [2, 0, 1, 3])):
    found = client.post('/api/search', json={'query': query['id'], **body}).json()
    want_pos, want_dist = reference_ranking(_all_codes(explorer), code, 4, 10,
                                            weights)
    assert [r['position'] for r in found['results']] == want_pos
    assert [r['distance'] for r in found['results']] == want_dist
    assert found['weights'] == (weights or [1, 1, 1, 1])
    per = found['results'][0]['concept_distances']
    assert np.dot(per, found['weights']) == found['results'][0]['distance']
  assert client.get(f'/img/query/{query["id"]}/3.png').headers[
      'content-type'] == 'image/png'


def test_item_text_and_composite_queries(served):
  explorer, client, _ = served
  item = client.post('/api/query/item', json={'position': 5}).json()
  found = client.post('/api/search', json={'query': item['id'], 'k': 24}).json()
  assert found['results'][0]['distance'] == 0  # Itself (or an equal code).
  assert 5 in [r['position'] for r in found['results'] if r['distance'] == 0]
  text = client.post('/api/query/text', json={'text': 'a photo of a finch'}).json()
  assert text['kind'] == 'text' and text['encode_ms'] > 0
  composite = client.post('/api/query/composite', json={
      'parts': [[item['id'], [0, 1]], [text['id'], [3]]]}).json()
  assert composite['weights'] == [1, 1, 0, 1]
  found = client.post('/api/search', json={'query': composite['id']}).json()
  code = np.concatenate([explorer.index.codes([5])[0][:4], np.ones(2, np.int8),
                         explorer.hasher.encode_text(['a photo of a finch'])[
                             'codes'][0][6:]])
  want_pos, _ = reference_ranking(_all_codes(explorer), code, 4, 10, [1, 1, 0, 1])
  assert [r['position'] for r in found['results']] == want_pos
  for body in ({'text': '   '}, {'text': 'x' * 501}):
    answer = client.post('/api/query/text', json=body)
    assert answer.status_code == 400 and 'prompt' in answer.json()['error']


def test_gallery_groups_the_database_by_sub_code(served):
  explorer, client, _ = served
  gallery = client.get('/api/gallery/2').json()
  codes = _all_codes(explorer)
  values = (codes[:, 4] > 0) * 2 + (codes[:, 5] > 0)
  counts = np.bincount(values, minlength=4)
  assert sorted(g['count'] for g in gallery['groups']) == sorted(
      c for c in counts if c)
  for group in gallery['groups']:
    members = [m['position'] for m in group['members']]
    assert all(values[p] == group['value'] for p in members)
    assert sum(n for _, n in group['labels']) <= group['count']
  member = gallery['groups'][0]['members'][0]['position']
  picture = client.get(f'/img/db/{member}/2.png')
  assert picture.status_code == 200
  assert Image.open(io.BytesIO(picture.content)).size == (32, 32)
  assert client.get('/api/gallery/4').status_code == 400


def test_bad_requests_get_a_message_and_the_server_lives_on(served):
  _, client, images = served
  rgb = Image.fromarray(images[1])
  bad = {
      'not an image': b'GIF89a but not really' * 3,
      'truncated': png(rgb, format='JPEG')[:200],
      'huge': png(Image.new('1', (10000, 5000))),
      'over the cap': os.urandom(300_000),
      'empty': b'',
  }
  for what, data in bad.items():
    answer = client.post('/api/query/image', content=data)
    assert answer.status_code in (400, 413), what
    assert answer.json()['error'], what
    assert client.get('/api/facts').status_code == 200, what
  for good in (Image.fromarray(np.full((24, 24), 40000, np.uint16)),
               rgb.convert('CMYK')):
    answer = client.post('/api/query/image',
                         content=png(good, format='TIFF' if good.mode == 'CMYK'
                                     else 'PNG'))
    assert answer.status_code == 200 and 'converted' in answer.json()['note']
  for path, body in (('/api/search', {'query': 'q999999'}),
                     ('/api/search', {'query': 'q0', 'weights': [0, 0, 0, 0]}),
                     ('/api/search', {'query': 'q0', 'k': 0}),
                     ('/api/query/item', {'position': 24}),
                     ('/api/query/item', {'position': '../../etc/passwd'}),
                     ('/api/query/composite', {'parts': 'q0'})):
    answer = client.post(path, json=body)
    assert answer.status_code == 400 and answer.json()['error'], (path, body)
  answer = client.post('/api/search', content=b'{not json')
  assert answer.status_code == 400 and 'JSON' in answer.json()['error']


@pytest.mark.parametrize('path', [
    '/img/db/../../setup.cfg', '/img/db/%2e%2e%2f%2e%2e%2fsetup.cfg',
    '/img/db/..%2F..%2Fsetup.cfg.png', '/static/..%2Fapp.py',
    '/static/%2e%2e/app.py', '/static/index.html', '/static/engine.py',
    '/static/%2Fetc%2Fpasswd', '/img/query/..%2F..%2Fsetup.cfg.png',
    '/img/query/%2Fetc%2Fpasswd.png', '/img/db/-1.png', '/img/db/24.png',
    '/img/db/1e3.png', '/img/db/0x1.png', '/img/db/3/9.png', '//etc/passwd',
    '/img/db/%00.png', '/setup.cfg', '/concepthash_jax/explore/app.py'])
def test_nothing_but_the_index_images_is_served(served, path):
  _, client, _ = served
  answer = client.get(path)
  assert answer.status_code in (400, 404), (path, answer.status_code)
  for secret in (b'[metadata]', b'root:', b'import ', b'<!DOCTYPE'):
    assert secret not in answer.content, path


def test_the_page_and_its_files(served):
  _, client, _ = served
  page = client.get('/')
  assert page.status_code == 200 and 'id="upload"' in page.text
  assert 'http://' not in page.text and 'https://' not in page.text
  assert client.get('/static/app.js').headers['content-type'].startswith(
      'text/javascript')
  assert client.get('/static/style.css').status_code == 200
  assert client.get('/img/db/3.png').status_code == 200


def test_one_database_and_a_free_port_or_fatal(tmp_path):
  with pytest.raises(tool.errors.ConfigError, match='exactly one database'):
    tool.load_index(None)
  with pytest.raises(tool.errors.ConfigError, match='exactly one database'):
    tool.load_index(None, index_path='a', db_split='train')
  sock = tool.bind('127.0.0.1', 0)
  try:
    assert tool.url_of(sock).startswith('http://127.0.0.1:')
    with pytest.raises(tool.errors.ConfigError, match='--port'):
      tool.bind('127.0.0.1', sock.getsockname()[1])
  finally:
    sock.close()
  result = subprocess.run(
      [sys.executable, '-m', 'concepthash_jax.tools.explore',
       f'--model={tmp_path / "nothing"}', '--db_split=train', '--port=0'],
      capture_output=True, text=True, timeout=120, cwd=lib.ROOT,
      env={**os.environ, 'PYTHONPATH': lib.ROOT}, check=False)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1].startswith('FATAL: ')
  assert 'Traceback' not in result.stderr


def test_overlays_are_drawn_for_the_shown_results_only_and_cached(served,
                                                                  monkeypatch):
  explorer, client, _ = served
  calls = []
  real = engine.search_tool.neighbour_items
  monkeypatch.setattr(engine.search_tool, 'neighbour_items',
                      lambda h, i, positions, d: calls.append(list(positions))
                      or real(h, i, positions, d))
  item = client.post('/api/query/item', json={'position': 20}).json()
  shown = [r['position'] for r in client.post(
      '/api/search', json={'query': item['id'], 'k': 5}).json()['results']]
  explorer._drawn.clear()  # pylint: disable=protected-access
  for position in shown:
    for concept in range(4):
      assert client.get(f'/img/db/{position}/{concept}.png').status_code == 200
  assert len(calls) == 1 and sorted(calls[0]) == sorted(shown)
  assert sorted(explorer._drawn) == sorted(shown)  # pylint: disable=protected-access
