"""concepthash-explore in a real browser: headless Chromium driven by playwright, offline.

The app serves the tiny trained run's train split on a free localhost port;
the page uploads a test image, switches a concept off, weights another, clicks
a result, composes a query and opens a gallery, and each ranking it shows must
equal the one computed here from `index.concept_distances` (ties by position).

Needs the system's Chromium (Debian: `apt-get install chromium`; elsewhere set
CONCEPTHASH_CHROMIUM to a Chrome/Chromium binary) and playwright from the
[test] extra; `playwright install` is not needed. Without them the tests skip
and say so. CONCEPTHASH_EXPLORE_SCREENSHOTS=docs writes the docs' screenshots.
"""
import io
import os
import shutil
import threading
import time

import numpy as np
import pytest
from PIL import Image

import train_testlib as lib
from concepthash_jax import index as index_lib
from concepthash_jax import inference
from concepthash_jax.tools import explore as tool

_HOW = ('run them with Chromium installed (Debian/Ubuntu: apt-get install -y '
        'chromium; or CONCEPTHASH_CHROMIUM=/path/to/chrome) and pip install -e '
        '".[test]"; .ci/run does both')


def _chromium():
  found = os.environ.get('CONCEPTHASH_CHROMIUM') or next(
      (shutil.which(n) for n in ('chromium', 'chromium-browser', 'google-chrome')
       if shutil.which(n)), None)
  if not found:
    pytest.skip(f'browser tests: no Chromium found; {_HOW}')
  return found


@pytest.fixture(scope='module')
def browser():
  executable = _chromium()
  from playwright import sync_api  # pylint: disable=g-import-not-at-top
  with sync_api.sync_playwright() as playwright:
    chromium = playwright.chromium.launch(executable_path=executable)
    yield chromium
    chromium.close()


@pytest.fixture(scope='module')
def app_url(tmp_path_factory, browser):
  """(url, explorer, test image path): the app on a free port in a thread."""
  del browser  # Skip before training when there is no browser.
  from concepthash_jax.explore import app as app_lib  # pylint: disable=g-import-not-at-top
  from concepthash_jax.explore import engine  # pylint: disable=g-import-not-at-top
  workdir, _ = lib.trained_tiny_run(tmp_path_factory)
  hasher = inference.ConceptHasher.load(workdir)
  explorer = engine.Explorer(hasher, tool.load_index(hasher, db_split='train'),
                             default_k=24)
  image_path = tmp_path_factory.mktemp('explore_browser') / 'bird.png'
  Image.fromarray(np.asarray(hasher.dataset('test')[0]['image'])).save(image_path)
  sock = tool.bind('127.0.0.1', 0)
  server = tool.make_server(app_lib.create_app(explorer))
  thread = threading.Thread(target=server.run, kwargs={'sockets': [sock]},
                            daemon=True)
  thread.start()
  deadline = time.monotonic() + 30
  while not server.started and time.monotonic() < deadline:
    time.sleep(0.05)
  yield tool.url_of(sock), explorer, str(image_path)
  server.should_exit = True
  thread.join(10)
  sock.close()


def _reference(explorer, code, weights, k):
  codes = explorer.index.codes(np.arange(len(explorer.index)))
  distance = index_lib.concept_distances(
      np.asarray(code)[None], codes, explorer.num_concepts)[0] @ np.asarray(weights)
  return np.lexsort((np.arange(len(distance)), distance))[:k].tolist()


def _shown(page, weights, query=None):
  """Positions in the results grid once it shows the ranking for `weights`."""
  wanted = ','.join(map(str, weights))
  page.wait_for_function(
      '([w, q]) => { const g = document.getElementById("results");'
      ' return g.dataset.weights === w && (q === null || g.dataset.query !== q)'
      ' && g.querySelectorAll(".result").length > 0; }',
      arg=[wanted, query], timeout=60_000)
  return [int(p) for p in page.eval_on_selector_all(
      '#results .result', 'cards => cards.map(c => c.dataset.pos)')]


def _query_id(page):
  return page.eval_on_selector('#results', 'g => g.dataset.query')


def _screenshot(page, name):
  folder = os.environ.get('CONCEPTHASH_EXPLORE_SCREENSHOTS')
  if folder:
    page.wait_for_load_state('networkidle')
    page.screenshot(path=os.path.join(folder, name))


def test_upload_toggle_weight_and_click_rank_as_the_index(browser, app_url):
  url, explorer, image_path = app_url
  page = browser.new_page(viewport={'width': 1280, 'height': 900})
  page.goto(url)
  page.wait_for_selector('body[data-ready="true"]')
  assert '8 bits = 4 concepts x 2' in page.inner_text('#facts')
  page.set_input_files('#upload', image_path)
  code = explorer.hasher.encode(image_path, batch_size=1)['codes'][0]
  assert _shown(page, [1, 1, 1, 1]) == _reference(explorer, code, [1] * 4, 24)
  _screenshot(page, 'explore_results.png')
  first = _query_id(page)

  # A switch and a weight that change the ranking, so the page must follow them.
  off = next(m for m in range(4) if _reference(explorer, code, [int(i != m) for i in range(4)], 24)
             != _reference(explorer, code, [1] * 4, 24))
  weights = [int(m != off) for m in range(4)]
  page.uncheck(f'#concept-on-{off}')
  shown = _shown(page, weights)
  assert shown == _reference(explorer, code, weights, 24)
  by_index, _ = explorer.index.search_positions(
      code[None], 24, concepts=[m for m in range(4) if m != off])
  assert shown == by_index[0].tolist()
  heavy, weight = next(
      (m, w) for m in range(4) for w in (3, 2, 5) if m != off and _reference(
          explorer, code, [w if i == m else weights[i] for i in range(4)], 24)
      != _reference(explorer, code, weights, 24))
  page.fill(f'#concept-weight-{heavy}', str(weight))
  page.dispatch_event(f'#concept-weight-{heavy}', 'change')
  weights[heavy] = weight
  assert _shown(page, weights) == _reference(explorer, code, weights, 24)

  clicked = int(page.get_attribute('#results .result >> nth=2', 'data-pos'))
  page.click('#results .result >> nth=2')
  shown = _shown(page, weights, query=first)
  item_code = explorer.index.codes([clicked])[0]
  assert shown == _reference(explorer, item_code, weights, 24)
  assert 'item:' in page.inner_text('#query')
  page.close()


def test_compose_gallery_and_a_bad_upload_in_the_page(browser, app_url, tmp_path):
  url, explorer, image_path = app_url
  page = browser.new_page(viewport={'width': 1280, 'height': 900})
  page.goto(url)
  page.wait_for_selector('body[data-ready="true"]')
  page.set_input_files('#upload', image_path)
  _shown(page, [1, 1, 1, 1])
  image_query = _query_id(page)
  for m in (2, 3):
    page.uncheck(f'#concept-on-{m}')
  _shown(page, [1, 1, 0, 0])
  page.click('#compose-add')  # Concepts 0 and 1 of the image.
  page.click('#results .result >> nth=4')
  _shown(page, [1, 1, 0, 0], query=image_query)
  item = explorer.query(_query_id(page))
  for m in (0, 1, 2, 3):
    page.set_checked(f'#concept-on-{m}', m == 3)
  item_query = _query_id(page)
  _shown(page, [0, 0, 0, 1], query=None)
  page.click('#compose-add')  # Concept 3 of the clicked item.
  assert page.locator('#compose-parts li').count() == 2
  page.click('#compose-go')
  shown = _shown(page, [1, 1, 0, 1], query=item_query)
  image_code = explorer.hasher.encode(image_path, batch_size=1)['codes'][0]
  code = np.concatenate([image_code[:4], np.ones(2, np.int8), item.code[6:]])
  assert shown == _reference(explorer, code, [1, 1, 0, 1], 24)
  assert page.is_checked('#concept-on-3') and not page.is_checked('#concept-on-2')
  _screenshot(page, 'explore_composite.png')

  page.click('#gallery-1')
  page.wait_for_selector('#gallery[data-concept="1"] .group')
  codes = explorer.index.codes(np.arange(len(explorer.index)))
  values = (codes[:, 2] > 0) * 2 + (codes[:, 3] > 0)
  subcodes = page.eval_on_selector_all('#gallery .group',
                                       'gs => gs.map(g => g.dataset.subcode)')
  assert sorted(subcodes) == sorted(f'{v:02b}' for v in np.unique(values))
  for member in page.eval_on_selector_all(
      '#gallery .group', 'gs => gs.map(g => [g.dataset.subcode, '
      '[...g.querySelectorAll(".member")].map(m => Number(m.dataset.pos))])'):
    assert all(f'{values[p]:02b}' == member[0] for p in member[1])
  _screenshot(page, 'explore_gallery.png')

  bad = tmp_path / 'notes.png'
  bad.write_bytes(b'these are notes, not a picture')
  page.set_input_files('#upload', str(bad))
  page.wait_for_function(
      'document.getElementById("message").textContent.includes("not an image")')
  truncated = tmp_path / 'cut.jpg'
  buffer = io.BytesIO()
  Image.open(image_path).convert('RGB').save(buffer, format='JPEG')
  truncated.write_bytes(buffer.getvalue()[:150])
  page.set_input_files('#upload', str(truncated))
  page.wait_for_function(
      'document.getElementById("message").textContent.includes("not a readable")')
  composite_query = _query_id(page)
  page.set_input_files('#upload', image_path)  # The server is still there.
  assert _shown(page, [1, 1, 0, 1], query=composite_query) == _reference(
      explorer, image_code, [1, 1, 0, 1], 24)
  assert page.inner_text('#message') == ''
  page.close()
