"""concepthash-explore's answer time on a 1,000,000-item index, and the encode beside it.

  python -m benchmarks.explore                     # 1M random 64-bit codes, ViT-B/32
  python -m benchmarks.explore --items 100000 --repeats 5

The model is configs/cub.py's (CLIP ViT-B/32 at 224 px, K = 64 bits, M = 4
concepts) with random weights, offline; the database is random codes. Both
numbers go through the app as a browser calls it (Starlette's TestClient, in
process): `search` is POST /api/search (ranking, per-concept distances of the
shown results and the JSON), `encode` is POST /api/query/image of one JPEG
(decode, test transform, one forward at batch 1); `gallery` groups the
database by one concept's sub-code (the first call computes every item's). Prints a markdown table of
medians (ms) and the first call of each (compiles included).
"""
import argparse
import io
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image


def random_hasher():
  """A ConceptHasher of configs/cub.py's model with random weights (no download)."""
  from concepthash_jax import inference, models  # pylint: disable=g-import-not-at-top
  from concepthash_jax.configs import cub  # pylint: disable=g-import-not-at-top
  from concepthash_jax.interop import hf  # pylint: disable=g-import-not-at-top
  config = cub.get_config()
  config.model.clip = 'random'
  clip_config = hf.random_clip_config(config.model.random_clip)
  num_classes = 200
  model = models.build_model(config.model, clip_config, num_classes)
  size = config.data.image_size
  rngs = {'params': jax.random.PRNGKey(0), 'dropout': jax.random.PRNGKey(1)}
  variables = jax.jit(lambda x: model.init(rngs, x, train=False))(
      jnp.zeros((1, size, size, 3), jnp.float32))
  return inference.ConceptHasher(
      config=config, clip_config=clip_config, model=model, variables=variables,
      class_names=[f'class {c}' for c in range(num_classes)],
      source='random ViT-B/32 (configs/cub.py)', tokenizer_source='random')


def timed(call, repeats: int):
  """(first call's ms, median ms of the next `repeats`)."""
  times = []
  for _ in range(repeats + 1):
    start = time.perf_counter()
    call()
    times.append(1000 * (time.perf_counter() - start))
  return times[0], statistics.median(times[1:])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--items', type=int, default=1_000_000)
  parser.add_argument('--repeats', type=int, default=20)
  args = parser.parse_args()
  from starlette.testclient import TestClient  # pylint: disable=g-import-not-at-top
  from concepthash_jax import index as index_lib  # pylint: disable=g-import-not-at-top
  from concepthash_jax.explore import app as app_lib  # pylint: disable=g-import-not-at-top
  from concepthash_jax.explore import engine  # pylint: disable=g-import-not-at-top

  hasher = random_hasher()
  rng = np.random.default_rng(0)
  words = rng.integers(0, 2**63, (args.items, 1), dtype=np.uint64, endpoint=True)
  index = index_lib.CodeIndex.from_words(
      words, hasher.nbit, num_concepts=hasher.num_concepts,
      fingerprint=hasher.fingerprint)
  client = TestClient(app_lib.create_app(engine.Explorer(hasher, index)))
  photo = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(
      photo, format='JPEG', quality=90)

  def upload():
    answer = client.post('/api/query/image', content=photo.getvalue())
    assert answer.status_code == 200, answer.text
    return answer.json()['id']

  rows = [('encode one 500x375 JPEG (POST /api/query/image)',
           *timed(upload, max(3, args.repeats // 4)))]
  query = upload()
  for name, body in (('all concepts', {}),
                     ('concepts [0, 2]', {'concepts': [0, 2]}),
                     ('weights [1, 0, 2, 1]', {'weights': [1, 0, 2, 1]})):
    def search(body=body):
      answer = client.post('/api/search', json={'query': query, 'k': 24, **body})
      assert answer.status_code == 200, answer.text
    rows.append((f'search {name}, k=24 (POST /api/search)',
                 *timed(search, args.repeats)))
  def gallery():
    answer = client.get('/api/gallery/1')
    assert answer.status_code == 200, answer.text
  rows.append(('gallery of concept 1 (GET /api/gallery/1; first: every sub-code)',
               *timed(gallery, max(3, args.repeats // 4))))
  print(f'{args.items:,} items of {hasher.nbit} bits, {hasher.num_concepts} '
        f'concepts; {jax.devices()[0].device_kind}, jax {jax.__version__}\n')
  print('| step | first call ms | median ms |')
  print('|---|---:|---:|')
  for name, first, median in rows:
    print(f'| {name} | {first:.1f} | {median:.1f} |')


if __name__ == '__main__':
  main()
