"""What the explorer answers, without the web: queries, concept-weighted ranking, galleries.

An `Explorer` holds a loaded model (`inference.ConceptHasher`) and a code index
(`index.CodeIndex`). Queries are kept by id (an uploaded image, a prompt, a
database item or a composite of concepts), each with its code and, for images,
what to draw. Database images are decoded and encoded again only when shown,
and their attention maps are cached by index position.

The web layer (`explore.app`) only parses requests and calls these methods;
every check of a request's values (weights, concepts, positions) is here.
"""
import collections
import dataclasses
import io
import os
import threading
import time
from typing import Optional
import warnings

import numpy as np
from PIL import Image

from concepthash_jax import errors
from concepthash_jax import index as index_lib
from concepthash_jax import interpret
from concepthash_jax import retrieval_view
from concepthash_jax.data import pixels as pixels_lib
from concepthash_jax.tools import search as search_tool

MAX_PIXELS = 40_000_000  # Larger images are refused before they are decoded.
MAX_K = 200  # Results one search returns.
_QUERIES_KEPT = 256  # Oldest queries are forgotten beyond this.
_DRAWINGS_KEPT = 512  # Database images (and maps) kept: bounds their memory.
_SUBCODE_CHUNK = 1 << 16  # Database rows unpacked at a time.


class RequestError(errors.UserError, ValueError):
  """A request the explorer refuses; the message is shown in the page."""


@dataclasses.dataclass
class Query:
  """A query of the session: its code, its weights and what to draw."""
  code: np.ndarray  # (K,) int8 ±1.
  kind: str  # 'image', 'text', 'item' or 'composite'.
  title: str
  image: Optional[np.ndarray] = None  # (S, S, 3) uint8 model input.
  attn: Optional[np.ndarray] = None  # (M, HW).
  weights: Optional[list] = None  # A composite's own concept weights.
  note: str = ''  # Shown beside the query (e.g. how an upload was converted).
  position: Optional[int] = None  # A database item's position.
  encode_ms: Optional[float] = None  # Time the model took to encode it.


# ------------------------------------------------------------------ uploads


def decode_upload(data: bytes, *, max_pixels: int = MAX_PIXELS):
  """An uploaded file as an RGB uint8 array, or a RequestError saying why not.

  Decodes in full here (truncated files fail now, not in the model), refuses
  images above `max_pixels` from their header alone, and converts what PIL
  reads but the model does not take: 16-bit, CMYK, palette, alpha, greyscale.

  Args:
    data: the file's bytes.
    max_pixels: largest width * height accepted.

  Returns:
    (image (H, W, 3) uint8, note): note says what was converted ('' if nothing).
  """
  if not data:
    raise RequestError('The upload is empty; choose an image file.')
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('error', Image.DecompressionBombWarning)
      image = Image.open(io.BytesIO(data))
      width, height = image.size
      if width * height > max_pixels:
        raise RequestError(
            f'The image is {width}x{height} pixels, more than the '
            f'{max_pixels:,} this explorer decodes; shrink it first.')
      image.load()
  except RequestError:
    raise
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise RequestError(f'The image is too large to decode ({e}).') from e
  except Image.UnidentifiedImageError as e:
    raise RequestError('The upload is not an image file this explorer reads '
                       '(JPEG, PNG, WebP, BMP, GIF, TIFF, ...).') from e
  except Exception as e:  # pylint: disable=broad-except
    # PIL raises many types for foreign or damaged files (OSError,
    # SyntaxError, ValueError, struct.error, ...): all are a bad upload.
    raise RequestError(f'The upload is not a readable image '
                       f'({type(e).__name__}: {e}).') from e
  mode = image.mode
  try:  # The same pixels as every other decoding path (data/pixels.py).
    pixels = pixels_lib.pil_to_rgb(image, 'the upload')
  except pixels_lib.ImageFormatError as e:
    raise RequestError(str(e)) from e
  if mode in ('RGB', 'L', 'P'):
    note = ''
  elif mode.startswith('I') or mode == 'F':
    note = f'converted from {mode} (high bit depth) to 8-bit RGB'
  else:
    note = f'converted from {mode} to RGB'
  return pixels, note


# ------------------------------------------------------------------ ranking


def concept_weights(num_concepts: int, *, concepts=None, weights=None):
  """(M,) int64 weights from a request's concepts or weights; None = plain Hamming.

  The values come from JSON: each must be an integer (a bool or a string is
  refused); `index.concept_weights` checks the rest.

  Raises:
    RequestError: a concept out of range, a weight negative or not an integer,
      the wrong number of weights, every weight zero, or both given.
  """
  concepts = None if concepts is None else [
      _as_int(c, 'concept') for c in _as_list(concepts, 'concept')]
  weights = None if weights is None else [
      _as_int(w, 'weight') for w in _as_list(weights, 'weight')]
  if concepts is None and weights is not None and not any(weights):
    raise RequestError('Every concept is switched off; switch one on.')
  try:
    return index_lib.concept_weights(num_concepts, concepts=concepts,
                                     weights=weights)
  except ValueError as e:
    raise RequestError(_sentence(e)) from e


def _sentence(error) -> str:
  text = str(error)
  return f'{text[:1].upper()}{text[1:]}.'


def _as_list(values, what: str) -> list:
  if not isinstance(values, (list, tuple, np.ndarray)):
    raise RequestError(f'The {what}s must be a list; got {values!r}.')
  return list(values)


def _as_int(value, what: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    if isinstance(value, float) and value.is_integer():
      return int(value)
    raise RequestError(f'A {what} must be an integer; got {value!r}.')
  return int(value)


def rank(index, code, k: int, weights=None):
  """(positions (k,), distances (k,)) of one code: `index.search` by position."""
  positions, distances = index.search_positions(np.asarray(code)[None], int(k),
                                                weights=weights)
  return positions[0], distances[0]


def composite_code(parts, num_concepts: int):
  """(code, weights) of a query composed from concepts of several codes.

  Args:
    parts: [(code (K,), [concepts])]: each concept's sub-code is taken from the
      part that names it.
    num_concepts: M.

  Returns:
    `index.compose`'s (code (K,), weights (M,): 1 for named concepts, 0 else).
  """
  if not parts:
    raise RequestError('A composite query needs at least one part.')
  parts = [(code, [_as_int(m, 'concept') for m in _as_list(concepts, 'concept')])
           for code, concepts in parts]
  if not any(concepts for _, concepts in parts):
    raise RequestError('A composite query takes at least one concept.')
  try:
    return index_lib.compose([(c, m) for c, m in parts if m], num_concepts)
  except ValueError as e:
    raise RequestError(_sentence(e)) from e


# ----------------------------------------------------------------- explorer


class Explorer:
  """A model and an index, with the session's queries and drawn images."""

  def __init__(self, hasher, index, *, default_k: int = 24):
    """Checks the index against the model; nothing is encoded yet.

    Args:
      hasher: an `inference.ConceptHasher`.
      index: an `index.CodeIndex` of codes this model made.
      default_k: results per search when a request names no k.
    """
    search_tool.check_index(index, hasher, 'the index')
    if index.num_concepts is None:  # The index file records no M: the model's.
      index.num_concepts = hasher.num_concepts
    self.hasher = hasher
    self.index = index
    self.num_concepts = hasher.num_concepts
    self.default_k = int(default_k)
    self._queries = collections.OrderedDict()  # id -> Query
    self._next_id = 0
    self._drawn = collections.OrderedDict()  # position -> (image, attn)
    self._wanted = []  # Positions last shown, drawn together on a miss.
    self._subcodes = None  # (N, M) sub-code values, built on first gallery.
    self._model_lock = threading.Lock()  # One encode at a time.
    self._state_lock = threading.Lock()
    self._subcodes_lock = threading.Lock()  # Galleries run in a thread pool.

  # ---------------------------------------------------------------- facts

  def facts(self) -> dict:
    """The run's facts: model, bits, concepts, mAP@R, classes, database."""
    results = self.hasher.results or {}
    metrics = {k: v for k, v in results.items()
               if k.startswith(('map', 'precision')) and isinstance(v, (int, float))}
    names = list(self.index.info.get('class_names') or self.hasher.class_names)
    info = self.index.info
    if info.get('source') == 'split':
      database = f"split '{info.get('split')}' of the run's dataset"
    elif info.get('source') == 'folder':
      database = f"folder {info.get('folder')}"
    else:
      database = 'a saved index'
    return {
        'model': str(self.hasher.source),
        'nbit': self.hasher.nbit,
        'num_concepts': self.num_concepts,
        'bits_per_concept': self.hasher.nbit // self.num_concepts,
        'metrics': metrics,
        'step': self.hasher.step,
        'class_names': names,
        'database': database,
        'database_size': len(self.index),
        'text_queries': self.hasher.model.center_type == 'language',
        'default_k': self.default_k,
    }

  # -------------------------------------------------------------- queries

  def _keep(self, query: Query) -> str:
    with self._state_lock:
      query_id = f'q{self._next_id}'
      self._next_id += 1
      self._queries[query_id] = query
      while len(self._queries) > _QUERIES_KEPT:
        self._queries.popitem(last=False)
    return query_id

  def query(self, query_id: str) -> Query:
    """The kept query of that id (RequestError when unknown or forgotten)."""
    with self._state_lock:
      found = self._queries.get(str(query_id))
    if found is None:
      raise RequestError(f'Query {query_id!r} is unknown (the server restarted '
                         'or forgot it); make the query again.')
    return found

  def add_image_query(self, data: bytes, title: str = 'upload') -> str:
    """Decodes and encodes an uploaded image; returns its query id."""
    pixels, note = decode_upload(data)
    start = time.perf_counter()
    with self._model_lock:
      # Alone (batch 1): the run's eval batch would pad one image to it.
      enc = self.hasher.encode(pixels, attention=True, display=True,
                               batch_size=1, progress=False)
    return self._keep(Query(code=enc['codes'][0], kind='image',
                            title=title or 'upload', image=enc['images'][0],
                            attn=enc['concept_attn'][0], note=note,
                            encode_ms=1000 * (time.perf_counter() - start)))

  def add_text_query(self, text: str) -> str:
    """Encodes a prompt to its hash-center code; returns its query id."""
    text = str(text or '').strip()
    if not text:
      raise RequestError('The prompt is empty; type a few words.')
    if len(text) > 500:
      raise RequestError('The prompt is longer than 500 characters; shorten it.')
    start = time.perf_counter()
    with self._model_lock:
      try:
        code = self.hasher.encode_text([text])['codes'][0]
      except ValueError as e:  # A run without language centers.
        raise RequestError(str(e)) from e
    return self._keep(Query(code=code, kind='text', title=text,
                            encode_ms=1000 * (time.perf_counter() - start)))

  def add_item_query(self, position) -> str:
    """A database item as a query (its stored code); returns its query id."""
    position = self.check_position(position)
    return self._keep(Query(code=self.index.codes([position])[0], kind='item',
                            title=self.title(position), position=position))

  def add_composite_query(self, parts) -> str:
    """A query from concepts of kept queries: parts = [(query id, [concepts])]."""
    codes = [(self.query(query_id).code, concepts) for query_id, concepts in parts]
    code, weights = composite_code(codes, self.num_concepts)
    title = ' + '.join(f'{self.query(q).title} [{",".join(map(str, c))}]'
                       for q, c in parts)
    return self._keep(Query(code=np.asarray(code), kind='composite',
                            title=title, weights=weights.tolist()))

  # --------------------------------------------------------------- search

  def search(self, query_id: str, *, k=None, weights=None, concepts=None) -> dict:
    """Ranks the database for a kept query under concept weights.

    Args:
      query_id: from one of the add_*_query methods.
      k: results (default `default_k`, at most MAX_K and the database size).
      weights: (M,) non-negative ints; concepts: indices counted with weight 1.
        Neither: a composite's own weights, else plain Hamming.

    Returns:
      {'query', 'weights', 'results': [{position, distance, concept_distances,
       title, label}], 'search_ms'}.
    """
    query = self.query(query_id)
    k = self.default_k if k is None else _as_int(k, 'k')
    if k < 1:
      raise RequestError(f'k must be at least 1; got {k}.')
    k = min(k, MAX_K, len(self.index))
    if weights is None and concepts is None and query.weights is not None:
      weights = query.weights
    chosen = concept_weights(self.num_concepts, concepts=concepts,
                             weights=weights)
    start = time.perf_counter()
    positions, distances = rank(self.index, query.code, k, chosen)
    search_ms = 1000 * (time.perf_counter() - start)
    per_concept = index_lib.concept_distances(
        query.code[None], self.index.codes(positions), self.num_concepts)[0]
    with self._state_lock:
      self._wanted = [int(p) for p in positions]
    return {
        'query': self.describe(query_id),
        'weights': (np.ones(self.num_concepts, np.int64) if chosen is None
                    else chosen).tolist(),
        'results': [{'position': int(p), 'distance': int(d),
                     'concept_distances': c.tolist(), 'title': self.title(p),
                     'label': self.label_name(p)}
                    for p, d, c in zip(positions, distances, per_concept)],
        'search_ms': search_ms,
    }

  def describe(self, query_id: str) -> dict:
    """A kept query as the page shows it."""
    query = self.query(query_id)
    return {'id': query_id, 'kind': query.kind, 'title': query.title,
            'subcodes': retrieval_view.subcodes(np.asarray(query.code),
                                                self.num_concepts),
            'has_image': query.image is not None, 'note': query.note,
            'weights': query.weights, 'position': query.position,
            'encode_ms': query.encode_ms}

  # -------------------------------------------------------------- gallery

  def gallery(self, concept, *, per_group: int = 8, max_groups: int = 16) -> dict:
    """The database grouped by one concept's sub-code, most populous first."""
    concept = _as_int(concept, 'concept')
    if not 0 <= concept < self.num_concepts:
      raise RequestError(f'Concept {concept} does not exist; concepts are 0 '
                         f'to {self.num_concepts - 1}.')
    values = self.all_subcodes()[:, concept]
    groups = interpret.subcodes.gallery_groups(values, per_group=per_group,
                                               max_groups=max_groups)
    counts = np.bincount(values, minlength=2 ** (self.hasher.nbit //
                                                 self.num_concepts))
    bits = self.hasher.nbit // self.num_concepts
    shown = []
    out = []
    for value, members in groups.items():
      shown += [int(p) for p in members]
      out.append({'value': value, 'subcode': interpret.subcode_string(value, bits),
                  'count': int(counts[value]),
                  'labels': self._label_counts(values == value),
                  'members': [{'position': int(p), 'title': self.title(p)}
                              for p in members]})
    with self._state_lock:
      self._wanted = shown
    return {'concept': concept, 'groups': out,
            'num_values': int((counts > 0).sum())}

  def all_subcodes(self) -> np.ndarray:
    """(N, M) int32 sub-code values of the whole database (computed once)."""
    with self._subcodes_lock:  # Two first galleries compute it once.
      if self._subcodes is None:
        n = len(self.index)
        out = np.empty((n, self.num_concepts), np.int32)
        for start in range(0, n, _SUBCODE_CHUNK):
          rows = np.arange(start, min(n, start + _SUBCODE_CHUNK))
          out[rows] = interpret.subcode_values(self.index.codes(rows),
                                               self.num_concepts)
        self._subcodes = out
    return self._subcodes

  def _label_counts(self, members, top: int = 3) -> list:
    """The commonest class names among `members` (bool mask), with counts."""
    if self.index.labels is None or self.index.labels.ndim != 1:
      return []
    labels, counts = np.unique(self.index.labels[members], return_counts=True)
    order = np.argsort(-counts, kind='stable')[:top]
    return [[self._class_name(int(labels[i])), int(counts[i])] for i in order]

  # ------------------------------------------------------------- database

  def check_position(self, position) -> int:
    """A database position as an int in range (RequestError otherwise)."""
    position = _as_int(position, 'database position')
    if not 0 <= position < len(self.index):
      raise RequestError(f'No database item {position}; the index holds '
                         f'{len(self.index)}.')
    return position

  def _class_name(self, label: int) -> str:
    names = self.index.info.get('class_names') or self.hasher.class_names or []
    return names[label] if 0 <= label < len(names) else str(label)

  def label_name(self, position) -> str:
    """Class name of a database item ('' without labels)."""
    labels = self.index.labels
    if labels is None or labels.ndim != 1:
      return ''
    return self._class_name(int(labels[int(position)]))

  def title(self, position) -> str:
    """A database item's caption: its file name, else its id."""
    position = int(position)
    paths = self.index.paths
    if paths is not None and paths[position]:
      return os.path.basename(str(paths[position]))
    ids = self.index.ids
    return f'#{ids[position] if ids is not None else position}'

  def drawing(self, position):
    """(image, attention) of a database item, encoded on first request.

    A miss encodes the item together with the other items shown last (the
    current results or gallery) that are not drawn yet, in one batch.
    """
    position = self.check_position(position)
    with self._state_lock:
      if position in self._drawn:
        self._drawn.move_to_end(position)
        return self._drawn[position]
      batch = [position] + [p for p in self._wanted
                            if p != position and p not in self._drawn]
    batch = batch[:int(self.hasher.config.data.eval_batch_size)]
    with self._model_lock:
      items = search_tool.neighbour_items(self.hasher, self.index, batch,
                                          [0] * len(batch))
    with self._state_lock:
      for pos, item in zip(batch, items):
        self._drawn[pos] = (item.image, item.attn)
      while len(self._drawn) > _DRAWINGS_KEPT:
        self._drawn.popitem(last=False)
      return self._drawn[position]

  def query_drawing(self, query_id: str):
    """(image, attention) of an image query (RequestError for others)."""
    query = self.query(query_id)
    if query.image is None:
      raise RequestError(f'Query {query_id} has no image.')
    return query.image, query.attn

  def concept_overlay(self, image, attn, concept) -> np.ndarray:
    """One concept's attention blended onto the image, (S, S, 3) uint8."""
    concept = _as_int(concept, 'concept')
    if not 0 <= concept < self.num_concepts:
      raise RequestError(f'Concept {concept} does not exist.')
    return retrieval_view.overlays(image, attn[concept:concept + 1])[0]


def png_bytes(image: np.ndarray) -> bytes:
  """A uint8 image as PNG file bytes."""
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='PNG')
  return buffer.getvalue()

