"""The queries of concepthash-search: flag values turned into query rows.

Each --image, --folder, --text, --query_split and --compose value becomes one or
more `Query` rows (a code, what a see-why page draws, and a label when one is
known); --concepts / --weights become the per-concept weights of the search.
A value that cannot be searched ends in a `SearchError` naming the flag.
"""
import os

from concepthash_jax import errors
from concepthash_jax import index as index_lib
from concepthash_jax import inference

CLASS_FIELD = '{class}'  # In a --text prompt: one query per class name.


class SearchError(errors.UserError, ValueError):
  """A flag combination or value the search cannot run with."""


class Query:
  """A query row: its code, what to show, and a label when one is known."""

  def __init__(self, name, code, *, image=None, attn=None, text=None, label=-1,
               weights=None):
    self.name, self.code, self.image, self.attn = name, code, image, attn
    self.text, self.label, self.weights = text, label, weights


def image_queries(hasher, items, names, labels=None):
  """Encodes images (paths or arrays) as queries with their maps."""
  enc = hasher.encode(items, attention=True, display=True)
  labels = [-1] * len(enc['codes']) if labels is None else labels
  return [Query(names[i], enc['codes'][i], image=enc['images'][i],
                attn=enc['concept_attn'][i], label=int(labels[i]))
          for i in range(len(enc['codes']))]


def text_queries(hasher, prompts):
  """Prompts as queries; a prompt with {class} becomes one per class (labelled)."""
  expanded = []
  for prompt in prompts:
    if not prompt.strip():
      raise SearchError('--text got a blank prompt; give words to search for.')
    if CLASS_FIELD in prompt:
      expanded += [(prompt.replace(CLASS_FIELD, name.replace('_', ' ')), c)
                   for c, name in enumerate(hasher.class_names)]
    else:
      expanded.append((prompt, -1))
  enc = hasher.encode_text([p for p, _ in expanded])
  return [Query(p, enc['codes'][i], text=p, label=c)
          for i, (p, c) in enumerate(expanded)]


def parse_compose(values):
  """--compose IMAGE:CONCEPTS values -> [(image, [concept, ...]), ...]."""
  parts = []
  for value in values:
    image, sep, concepts = value.rpartition(':')
    try:
      chosen = [int(c) for c in concepts.split(',')]
    except ValueError:
      chosen = None
    if not sep or not image or not chosen:
      raise SearchError(f'--compose {value}: give IMAGE:CONCEPTS, e.g. '
                        'head.jpg:0,1 (concept indices, comma-separated).')
    if not os.path.isfile(image):
      raise SearchError(f'--compose {value}: {image} is not an image file.')
    parts.append((image, chosen))
  return parts


def composite_query(hasher, parts):
  """One query from [(image, concepts), ...] (see --compose)."""
  enc = hasher.encode([image for image, _ in parts], attention=True,
                      display=True)
  try:
    query = index_lib.compose(
        [(code, chosen) for code, (_, chosen) in zip(enc['codes'], parts)],
        hasher.num_concepts)
  except ValueError as e:
    raise SearchError(f'--compose: {e}') from e
  # The page shows the first part's image; its concept columns show the
  # sub-codes of the composite code.
  name = ' + '.join(f'{os.path.basename(image)}:{",".join(map(str, chosen))}'
                    for image, chosen in parts)
  return Query(name, query.codes, image=enc['images'][0],
               attn=enc['concept_attn'][0], weights=query.weights)


def _expand_images(images):
  """--image values with every folder replaced by its images."""
  out = []
  for image in images:
    out += inference.list_images(image) if os.path.isdir(image) else [image]
  return out


def collect_queries(hasher, *, images, folder, texts, split, data_root,
                    compose=()):
  """Every query the flags ask for, in flag order."""
  queries = []
  if images:
    images = _expand_images(images)
    queries += image_queries(hasher, images, images)
  if folder:
    paths = inference.list_images(folder)
    queries += image_queries(hasher, paths, paths)
  if texts:
    queries += text_queries(hasher, texts)
  if split:
    enc = hasher.encode_split(split, data_root=data_root)
    queries += [Query(f'{split}[{i}]', code, label=int(label))
                for i, (code, label) in enumerate(zip(enc['codes'],
                                                      enc['labels']))]
  if compose:
    queries.append(composite_query(hasher, parse_compose(compose)))
  if not queries:
    raise SearchError('No query: pass --image, --folder, --text, --compose or '
                      '--query_split.')
  return queries


def query_weights(num_concepts, concepts=None, weights=None):
  """--concepts / --weights as (M,) ints, or None (plain Hamming)."""
  try:
    return index_lib.concept_weights(
        num_concepts, concepts=None if concepts is None else [
            int(c) for c in concepts],
        weights=None if weights is None else [int(w) for w in weights])
  except ValueError as e:
    raise SearchError(f'--concepts/--weights: {e}') from e
