r"""Searches a code index by image or by text, and shows why each result matched.

  # Build (and keep) an index of the run's database split, query with an image:
  concepthash-search --model exported/synthetic \
    --db_split train --index db.chindex --image photo.jpg --why why/
  # Reuse the index; query with text (one query per class with {class}):
  concepthash-search --model exported/synthetic \
    --index db.chindex --text "a photo of a {class}"
  # Every image of a split as a query: P@k beside the evaluator's.
  concepthash-search --model W --index db.chindex --query_split test
  # Count only concepts 1 and 3 (or weigh each concept's distance):
  concepthash-search --model W --index db.chindex --image bird.jpg --concepts 1,3
  concepthash-search --model W --index db.chindex --image bird.jpg --weights 1,0,2,1
  # One composite query: concepts 0 and 1 from head.jpg, concept 2 from wing.jpg
  # (the other concepts are not counted):
  concepthash-search --model W --index db.chindex \
    --compose head.jpg:0,1 --compose wing.jpg:2
  # Append new images to a kept index (the old codes are not re-encoded):
  concepthash-search --model W --index db.chindex --add new_photos/
  # Search a LanceDB table written by CodeIndex.to_store (extra [store]):
  concepthash-search --model W --store data/codes.lance --image bird.jpg

--model is a training workdir or an export (tools/export.py). The database is a
split of the run's dataset (--db_split) or a folder of images (--db_folder; an
image's label is its first sub-folder); it is saved with paths and labels to
--index when given, and read (memory-mapped) from there otherwise. --index
never replaces a file that is not a code index. --add FOLDER encodes the
folder's images and appends them to --index; images whose path the index
already holds are skipped (and counted), so rerunning --add on a growing
folder adds only the new ones. The index records the fingerprint of the model
that built it; a query from another model is refused.

Queries: --image (repeatable; a folder means its images), --folder, --text
(repeatable; "{class}" expands to every class of the run), --query_split, or
one composite query from --compose IMAGE:CONCEPTS (repeatable; IMAGE's
sub-codes of CONCEPTS, comma-separated; a concept given by no part is not
counted). --concepts / --weights apply to every other query.

Results: rank, distance (over the counted concepts, weighted), per-concept
sub-code distances, label and path; ties broken by database position as
map_at_r(ties="index"). --why DIR writes, per query, DIR/<query>.html
(self-contained) and .png; DIR is marked as a pages folder and a folder of
other files is refused.
"""
import os
import re
import sys

from absl import flags
import numpy as np

from concepthash_jax import data as data_lib
from concepthash_jax import errors
from concepthash_jax import exporting
from concepthash_jax import index as index_lib
from concepthash_jax import inference
from concepthash_jax import retrieval_view
from concepthash_jax import safe_files
from concepthash_jax.tools import cli
from concepthash_jax.tools import search_queries

FLAGS = flags.FLAGS
# Raised here and by search_queries; callers catch it under this name.
SearchError = search_queries.SearchError


def define_flags():
  """Defines the CLI flags (only when run as a program)."""
  flags.DEFINE_string('model', None, 'Training workdir or export directory.')
  flags.DEFINE_string('index', None, 'Code index file: written when a database '
                      'flag or --add is given, else read.')
  flags.DEFINE_enum('db_split', None, list(data_lib.SPLITS),
                    "Database: this split of the run's dataset.")
  flags.DEFINE_string('db_folder', None, 'Database: the images in this folder.')
  flags.DEFINE_string('add', None, 'Append the images of this folder to --index.')
  flags.DEFINE_string('store', None, 'Search this LanceDB URI (extra [store]) '
                      'instead of --index.')
  flags.DEFINE_string('store_table', 'codes', 'Table of --store.')
  flags.DEFINE_string('data_root', None, 'Override config.data.root.')
  flags.DEFINE_multi_string('image', [], 'Query image file or folder (repeatable).')
  flags.DEFINE_string('folder', None, 'Query with every image in this folder.')
  flags.DEFINE_multi_string('text', [], 'Query prompt (repeatable); {class} '
                            'expands to every class name of the run.')
  flags.DEFINE_enum('query_split', None, list(data_lib.SPLITS),
                    "Query with every image of this split of the run's dataset.")
  flags.DEFINE_multi_string('compose', [], 'IMAGE:CONCEPTS, repeatable: one '
                            'composite query taking these concepts\' sub-codes '
                            'from IMAGE (e.g. head.jpg:0,1 --compose wing.jpg:2).')
  flags.DEFINE_list('concepts', None, 'Count only these concepts (e.g. 1,3).')
  flags.DEFINE_list('weights', None, 'Integer weight per concept (e.g. 1,0,2,1).')
  flags.DEFINE_integer('k', 10, 'Neighbours per query.')
  flags.DEFINE_enum('faiss', None, ['flat', 'hnsw'],
                    'Search through FAISS (extra [faiss]) instead of the exact '
                    'search.')
  flags.DEFINE_string('why', None, 'Write <query>.html and <query>.png here.')
  flags.DEFINE_integer('why_max', 8, 'At most this many queries get a page.')
  flags.DEFINE_integer('print_max', 5, 'Print the neighbour table of at most '
                       'this many queries (summaries cover all).')
  flags.mark_flag_as_required('model')


# ---------------------------------------------------------------- database


def folder_labels(paths, folder, class_names=()):
  """Label of each image = its first sub-folder under `folder` (-1 if none).

  Args:
    paths: image files under `folder`.
    folder: the database folder.
    class_names: names that keep their ids; new names get the next ids.

  Returns:
    (labels (N,) int64, class names in label order).
  """
  tops = [os.path.relpath(p, folder).split(os.sep) for p in paths]
  names = list(class_names)
  names += sorted({t[0] for t in tops if len(t) > 1} - set(names))
  lookup = {name: i for i, name in enumerate(names)}
  return np.array([lookup[t[0]] if len(t) > 1 else -1 for t in tops],
                  np.int64), names


def build_index(hasher, *, split=None, folder=None, data_root=None):
  """Encodes a database split or folder into a CodeIndex with paths and labels."""
  info = {'nbit': hasher.nbit, 'num_concepts': hasher.num_concepts,
          'model': os.path.abspath(hasher.source)}
  fields = {'num_concepts': hasher.num_concepts,
            'fingerprint': hasher.fingerprint}
  if split is not None:
    enc = hasher.encode_split(split, data_root=data_root)
    info.update(source='split', split=split, class_names=hasher.class_names,
                data_root=data_root)
    return index_lib.CodeIndex(enc['codes'], enc['labels'], ids=enc['index'],
                               paths=enc['paths'], info=info, **fields)
  paths = [os.path.abspath(p) for p in inference.list_images(folder)]
  labels, names = folder_labels(paths, folder)
  enc = hasher.encode(paths)
  info.update(source='folder', folder=os.path.abspath(folder), class_names=names)
  return index_lib.CodeIndex(enc['codes'], labels, paths=paths, info=info,
                             **fields)


def add_folder(index, hasher, folder, index_path, out=sys.stdout):
  """Appends the images of `folder` that `index` does not hold to `index_path`.

  Returns:
    (the index as now saved, number of images added).
  """
  if index.labels is not None and np.ndim(index.labels) != 1:
    raise SearchError('this index has multi-label rows; --add appends '
                      'single-label folder images only: rebuild it instead.')
  known = set() if index.paths is None else {
      os.path.abspath(p) for p in index.paths if p}
  found = [os.path.abspath(p) for p in inference.list_images(folder)]
  paths = [p for p in found if p not in known]
  if len(paths) < len(found):
    print(f'--add: {len(found) - len(paths)} of {len(found)} images of {folder} '
          'are already in the index; skipped.', file=out)
  if not paths:
    return index, 0
  labels, names = folder_labels(paths, folder,
                                index.info.get('class_names') or [])
  enc = hasher.encode(paths)
  index.append_to_file(index_path, enc['codes'], labels, paths=paths,
                       info=dict(index.info, class_names=names))
  return index_lib.CodeIndex.load(index_path), len(paths)


def check_index(index, hasher, where, out=None):
  """One clear error when the index's codes are not this model's (a warning to
  `out`, default stderr, when the index records no model fingerprint)."""
  if index.nbit != hasher.nbit:
    raise SearchError(
        f'{where} holds {index.nbit}-bit codes but the model {hasher.source} '
        f'makes {hasher.nbit}-bit codes: the index was built with another '
        'model; rebuild it with --db_split or --db_folder.')
  if index.fingerprint is None:
    print(f'warning: {where} records no model fingerprint (built by an older '
          'version); results are only right if it was built with this model.',
          file=out or sys.stderr)
  elif index.fingerprint != hasher.fingerprint:
    raise SearchError(
        f'{where} was built by another model (fingerprint '
        f'{index.fingerprint[:12]}, {hasher.source} has '
        f'{hasher.fingerprint[:12]}); rebuild it with this model (--db_split '
        'or --db_folder), or query with the model that built it.')


# ------------------------------------------------------------------ search


def search(index, queries, k, weights=None, faiss_kind=None):
  """(positions, distances) (Q, k): exact by default, or through FAISS.

  A query with its own weights (a composite) is searched with those; the
  others with `weights`.
  """
  codes = np.stack([q.code for q in queries])
  if faiss_kind is not None:
    if weights is not None or any(q.weights is not None for q in queries):
      raise SearchError('--faiss searches full codes; drop --faiss to query by '
                        'concept.')
    return index_lib.faiss_search(index.to_faiss(faiss_kind), codes, k)
  return _search_by_weights(
      lambda rows, own: index.search_positions(codes[rows], k, weights=own),
      queries, k, weights)


def _search_by_weights(search_rows, queries, k, weights):
  """(positions, distances) (Q, k), one `search_rows(rows, weights)` call per
  distinct weights: a query with its own weights (a composite) uses those,
  the others `weights`."""
  positions = np.zeros((len(queries), k), np.int64)
  distances = np.zeros((len(queries), k), np.int32)
  groups = {}
  for i, query in enumerate(queries):
    own = weights if query.weights is None else query.weights
    groups.setdefault(None if own is None else tuple(own), []).append(i)
  for own, rows in groups.items():
    positions[rows], distances[rows] = search_rows(
        rows, None if own is None else np.array(own))
  return positions, distances


def precision_at_k(query_labels, neighbour_labels):
  """Per query: the share of its neighbours with its label."""
  return (np.asarray(neighbour_labels) == np.asarray(query_labels)[:, None]).mean(1)


def index_labels_of(queries, hasher, index):
  """Query labels (the model's class ids) as the index's label ids, by name.

  Returns:
    (Q,) int: the index's id of each query's class name; -1 where the query
    has no label or the index has no class of that name.
  """
  names = index.info.get('class_names') or []
  lookup = {name: i for i, name in enumerate(names)}
  model_names = hasher.class_names
  return np.array([
      lookup.get(model_names[q.label], -1) if 0 <= q.label < len(model_names)
      else -1 for q in queries], np.int64)


def _label_name(index, label):
  names = index.info.get('class_names') or []
  return names[label] if 0 <= label < len(names) else str(label)


def _where(index, pos):
  path = index.paths[pos] if index.paths is not None else ''
  return path or f'#{index.ids[pos] if index.ids is not None else pos}'


def format_results(query, index, positions, distances, num_concepts,
                   weights=None):
  """The neighbour table of one query, as text."""
  sub = index_lib.concept_distances(
      np.asarray(query.code)[None], index.codes(positions), num_concepts)[0]
  counted = ''
  if weights is not None:
    counted = ' (dist = ' + ' + '.join(
        f'{w}*c{m}' if w != 1 else f'c{m}'
        for m, w in enumerate(weights) if w) + ')'
  lines = [f'query {query.name}{counted}',
           '  rank  dist  per-concept  label / path']
  for rank, (pos, dist) in enumerate(zip(positions, distances), 1):
    label = ('' if index.labels is None
             else _label_name(index, int(index.labels[pos])))
    lines.append(f'  {rank:4d}  {int(dist):4d}  {"/".join(map(str, sub[rank - 1])):11s}'
                 f'  {label} {_where(index, pos)}')
  return '\n'.join(lines)


# -------------------------------------------------------------------- why


def prepare_pages(folder):
  """Creates (or reuses) the --why folder; one error naming it and the fix.

  A folder of ours carries safe_files' marker of kind 'pages'; an existing
  folder without it is used only while empty, so pages never land among a
  user's files.
  """
  if not os.path.isdir(folder):
    parent = os.path.dirname(os.path.abspath(folder))
    while parent and not os.path.exists(parent):
      parent = os.path.dirname(parent)
    if os.path.exists(folder) or not os.path.isdir(parent):
      where = folder if os.path.exists(folder) else f'{folder}: {parent}'
      raise SearchError(f'--why {where} is a file, not a folder; give a folder '
                        'path for the pages.')
  try:
    safe_files.claim_folder(folder, 'pages', 'see-why pages')
  except safe_files.OverwriteError as e:
    raise SearchError(f'--why {folder} is a folder of other files; give a new '
                      'or empty folder for the pages.') from e


def neighbour_items(hasher, index, positions, distances):
  """retrieval_view.Items of database rows: images re-read and re-encoded."""
  sources = []
  dataset = None
  for pos in positions:
    path = index.paths[pos] if index.paths is not None else ''
    if path:
      sources.append(str(path))
      continue
    if index.info.get('source') != 'split' or index.ids is None:
      raise SearchError('The index stores neither paths nor a dataset split; '
                        'rebuild it to draw its images.')
    if dataset is None:
      dataset = hasher.dataset(index.info['split'],
                               data_root=index.info.get('data_root'))
    sources.append(dataset[int(index.ids[pos])]['image'])
  enc = hasher.encode(sources, attention=True, display=True, progress=False)
  items = []
  for i, (pos, dist) in enumerate(zip(positions, distances)):
    label = ('' if index.labels is None
             else _label_name(index, int(index.labels[pos])))
    path = index.paths[pos] if index.paths is not None else ''
    title = f'{label} {os.path.basename(str(path))}'.strip() or f'#{pos}'
    items.append(retrieval_view.Item(
        code=index.codes([pos])[0], title=title, image=enc['images'][i],
        attn=enc['concept_attn'][i], distance=int(dist)))
  return items


def write_why(out_dir, hasher, index, query, positions, distances, number, *,
              data_root=None, weights=None):
  """Writes the query's HTML page and PNG; returns their paths."""
  title = query.name if query.text is not None else os.path.basename(query.name)
  item = retrieval_view.Item(code=query.code, title=title,
                             image=query.image, attn=query.attn, text=query.text)
  if query.image is None and query.text is None:  # A split query: draw it.
    item = _split_query_item(hasher, query, data_root)
  stem = query.name if query.text is not None else os.path.splitext(
      os.path.basename(query.name))[0]
  name = f'{number:03d}_' + re.sub(r'[^A-Za-z0-9._-]+', '_', stem)[:60]
  return retrieval_view.write(
      out_dir, name, item, neighbour_items(hasher, index, positions, distances),
      hasher.num_concepts, heading=f'query: {query.name}',
      weights=query.weights if query.weights is not None else weights)


def _split_query_item(hasher, query, data_root):
  split, i = re.match(r'(\w+)\[(\d+)\]', query.name).groups()
  image = hasher.dataset(split, data_root=data_root)[int(i)]['image']
  enc = hasher.encode(image, attention=True, display=True, progress=False)
  return retrieval_view.Item(code=query.code, title=query.name,
                             image=enc['images'][0], attn=enc['concept_attn'][0])


# -------------------------------------------------------------------- main


def open_database(hasher, *, index_path, db_split, db_folder, add, data_root,
                  out, saved=None):
  """The index the flags name: built (and saved), extended, or read.

  `saved` is the index at `index_path` when the caller has opened it already.
  """
  if sum(map(bool, (db_split, db_folder, add))) > 1:
    raise SearchError('Pass one of --db_split, --db_folder and --add.')
  if add and not index_path:
    raise SearchError('--add appends to an index: give its file with --index.')
  if index_path and (db_split or db_folder):
    # Before encoding: a mistyped --index must not cost an encode, nor a file.
    safe_files.check_replaceable(index_path, 'code index',
                                 is_ours=index_lib.is_index)
  if db_split or db_folder:
    index = build_index(hasher, split=db_split, folder=db_folder,
                        data_root=data_root)
    if index_path:
      index.save(index_path)
      print(f'index of {len(index)} codes -> {index_path}', file=out)
    return index
  if not index_path:
    raise SearchError('No database: pass --db_split or --db_folder (and --index '
                      'to keep it), --index of a saved one, or --store.')
  index = saved if saved is not None else index_lib.CodeIndex.load(index_path)
  if add:
    check_index(index, hasher, index_path)  # Before encoding the new images.
    index, added = add_folder(index, hasher, add, index_path, out=out)
    print(f'--add: {added} images appended, {len(index)} codes -> {index_path}',
          file=out)
  return index


def open_store(hasher, uri, table, queries, k, weights):
  """(an index of the found rows, positions in it, distances) from a store."""
  from concepthash_jax.index import store  # pylint: disable=g-import-not-at-top
  view = store.describe(uri, table)
  check_index(view, hasher, f'{uri} table {table!r}')
  codes = np.stack([q.code for q in queries])
  positions, distances = _search_by_weights(
      lambda rows, own: store.search(uri, codes[rows], k, table=table,
                                     weights=own, ids=False),
      queries, k, weights)
  rows, local = store.rows(uri, positions, table=table)
  return rows, local, distances


def search_and_explain(*, model, index_path=None, db_split=None,
                       db_folder=None, add=None, store=None,
                       store_table='codes', data_root=None, images=(),
                       folder=None, texts=(), query_split=None, compose=(),
                       concepts=None, weights=None, k=10, faiss_kind=None,
                       why=None, why_max=8, print_max=5,
                       out=sys.stdout) -> dict:
  """The CLI as a function (`model`: a path or a loaded ConceptHasher).

  Returns:
    {'queries', 'positions', 'distances', 'precision', 'index'}; precision is
    P@k per labelled query, NaN for the others (and for all when the index's
    class names are not the model's).
  """
  if why_max < 0 or print_max < 0 or k < 1:
    raise SearchError(f'--why_max={why_max}, --print_max={print_max}, --k={k}: '
                      'give --why_max >= 0, --print_max >= 0 and --k >= 1.')
  if why:
    prepare_pages(why)
  saved = None
  if index_path and not (db_split or db_folder or store):
    saved = index_lib.CodeIndex.load(index_path)  # A bad file fails fast.
  hasher = (model if isinstance(model, inference.ConceptHasher)
            else inference.ConceptHasher.load(model))
  weights = search_queries.query_weights(hasher.num_concepts, concepts, weights)
  if store:
    if index_path or db_split or db_folder or add:
      raise SearchError('--store replaces --index/--db_split/--db_folder/--add; '
                        'give one database.')
    index = None
  else:
    index = open_database(hasher, index_path=index_path, db_split=db_split,
                          db_folder=db_folder, add=add, data_root=data_root,
                          out=out, saved=saved)
    if not add:  # open_database checked it before appending.
      check_index(index, hasher, index_path or 'the index')
  asked = (images, folder, texts, query_split, compose)
  if not any(asked) and (add or (index_path and (db_split or db_folder))):
    return {'queries': [], 'index': index}  # Building the index was the job.
  queries = search_queries.collect_queries(
      hasher, images=list(images), folder=folder, texts=list(texts),
      split=query_split, data_root=data_root, compose=list(compose))
  if store:
    index, positions, distances = open_store(
        hasher, store, store_table, queries, k, weights)
  else:
    k = min(int(k), len(index))
    positions, distances = search(index, queries, k, weights, faiss_kind)
  for i, query in enumerate(queries[:print_max]):
    print(format_results(query, index, positions[i], distances[i],
                         hasher.num_concepts,
                         weights if query.weights is None else query.weights),
          file=out)
  precision = _precision(queries, hasher, index, positions, k, query_split,
                         out)
  if why:
    for i, query in enumerate(queries[:why_max]):
      html_path, png_path = write_why(why, hasher, index, query, positions[i],
                                      distances[i], i, data_root=data_root,
                                      weights=weights)
      print(f'see why: {html_path} {png_path}', file=out)
  return {'queries': queries, 'positions': positions, 'distances': distances,
          'precision': precision, 'index': index}


def _precision(queries, hasher, index, positions, k, query_split, out):
  """P@k of labelled queries (NaN elsewhere), printed as a summary."""
  precision = np.full(len(queries), np.nan)
  if index.labels is None:
    return precision
  model_labels = np.array([q.label for q in queries])
  labels = index_labels_of(queries, hasher, index)
  if (model_labels >= 0).any() and not (labels >= 0).any():
    print(f'no P@{k}: the index\'s class names are not the model\'s.', file=out)
  labelled = labels >= 0
  if labelled.any():
    precision[labelled] = precision_at_k(
        labels[labelled], np.asarray(index.labels)[positions[labelled]])
    _print_summary(queries, labels, precision, labelled, index, k, query_split,
                   out)
  return precision


def _print_summary(queries, labels, precision, labelled, index, k, query_split,
                   out):
  """P@k of labelled queries; per class for text, beside the evaluator for splits."""
  texts = [i for i, q in enumerate(queries) if q.text is not None and labelled[i]]
  if texts:
    print(f'\n{"prompt":60s}  P@{k}', file=out)
    for i in texts:
      print(f'{queries[i].text[:60]:60s}  {precision[i]:.2f}', file=out)
    print(f'{"mean":60s}  {np.mean(precision[texts]):.4f}', file=out)
  if query_split:
    split_rows = np.array([q.text is None and q.image is None for q in queries])
    ours = float(np.mean(precision[split_rows]))
    codes = np.stack([q.code for q in queries])
    metrics = index.evaluate(codes[split_rows], labels[split_rows], topk=(k,))
    print(f'\n{query_split} split, {int(split_rows.sum())} queries: search P@{k} '
          f'{ours:.4f}, evaluator P@{k} {metrics[f"precision_at_{k}"]:.4f}, '
          f'mAP@R {metrics["map_at_r"]:.4f}', file=out)


def main(argv):
  """Entry point; user mistakes end in one FATAL line on stderr, exit code 2."""
  del argv
  try:
    search_and_explain(
        model=FLAGS.model, index_path=FLAGS.index, db_split=FLAGS.db_split,
        db_folder=FLAGS.db_folder, add=FLAGS.add, store=FLAGS.store,
        store_table=FLAGS.store_table, data_root=FLAGS.data_root,
        images=FLAGS.image, folder=FLAGS.folder, texts=FLAGS.text,
        query_split=FLAGS.query_split, compose=FLAGS.compose,
        concepts=FLAGS.concepts, weights=FLAGS.weights, k=FLAGS.k,
        faiss_kind=FLAGS.faiss, why=FLAGS.why, why_max=FLAGS.why_max,
        print_max=FLAGS.print_max)
  except (errors.UserError, exporting.ExportError, FileNotFoundError,
          ValueError, ImportError) as e:
    cli.exit_user_error(e)


def run():
  """Console script `concepthash-search`."""
  cli.run(main, __doc__, define_flags)


if __name__ == '__main__':
  run()
