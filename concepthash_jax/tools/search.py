r"""Searches a code index by image or by text, and shows why each result matched.

  # Build (and keep) an index of the run's database split, query with an image:
  concepthash-search --model exported/synthetic \
    --db_split train --index db.index.npz --image photo.jpg --why why/
  # Reuse the index; query with text (one query per class with {class}):
  concepthash-search --model exported/synthetic \
    --index db.index.npz --text "a photo of a {class}"
  # Every image of a split as a query: P@k beside the evaluator's.
  concepthash-search --model W --index db.index.npz --query_split test

--model is a training workdir or an export (tools/export.py). The database is a
split of the run's dataset (--db_split) or a folder of images (--db_folder; an
image's label is its first sub-folder); it is saved with paths and labels to
--index when given, and read from there otherwise. Queries: --image (repeatable),
--folder, --text (repeatable; "{class}" expands to every class of the run) or
--query_split. Results: rank, Hamming distance, per-concept sub-code distances,
label and path; ties broken by database position as map_at_r(ties="index").
--why DIR writes, per query, DIR/<query>.html (self-contained) and .png.
"""
import os
import re
import sys

from absl import flags
import numpy as np

from concepthash_jax import data as data_lib
from concepthash_jax import exporting
from concepthash_jax import index as index_lib
from concepthash_jax import inference
from concepthash_jax import retrieval_view
from concepthash_jax.tools import cli

FLAGS = flags.FLAGS
CLASS_FIELD = '{class}'


def define_flags():
  """Defines the CLI flags (only when run as a program)."""
  flags.DEFINE_string('model', None, 'Training workdir or export directory.')
  flags.DEFINE_string('index', None, 'Code index .npz: written when a database '
                      'flag is given, else read.')
  flags.DEFINE_enum('db_split', None, list(data_lib.SPLITS),
                    "Database: this split of the run's dataset.")
  flags.DEFINE_string('db_folder', None, 'Database: the images in this folder.')
  flags.DEFINE_string('data_root', None, 'Override config.data.root.')
  flags.DEFINE_multi_string('image', [], 'Query image file (repeatable).')
  flags.DEFINE_string('folder', None, 'Query with every image in this folder.')
  flags.DEFINE_multi_string('text', [], 'Query prompt (repeatable); {class} '
                            'expands to every class name of the run.')
  flags.DEFINE_enum('query_split', None, list(data_lib.SPLITS),
                    "Query with every image of this split of the run's dataset.")
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


def folder_labels(paths, folder):
  """Label of each image = its first sub-folder under `folder` (-1 if none).

  Returns:
    (labels (N,) int64, class names in label order).
  """
  tops = [os.path.relpath(p, folder).split(os.sep) for p in paths]
  names = sorted({t[0] for t in tops if len(t) > 1})
  lookup = {name: i for i, name in enumerate(names)}
  return np.array([lookup[t[0]] if len(t) > 1 else -1 for t in tops],
                  np.int64), names


def build_index(hasher, *, split=None, folder=None, data_root=None):
  """Encodes a database split or folder into a CodeIndex with paths and labels."""
  info = {'nbit': hasher.nbit, 'num_concepts': hasher.num_concepts,
          'model': os.path.abspath(hasher.source)}
  if split is not None:
    enc = hasher.encode_split(split, data_root=data_root)
    info.update(source='split', split=split, class_names=hasher.class_names,
                data_root=data_root)
    return index_lib.CodeIndex(enc['codes'], enc['labels'], ids=enc['index'],
                               paths=enc['paths'], info=info)
  paths = inference.list_images(folder)
  labels, names = folder_labels(paths, folder)
  enc = hasher.encode(paths)
  info.update(source='folder', folder=os.path.abspath(folder), class_names=names)
  return index_lib.CodeIndex(enc['codes'], labels, paths=paths, info=info)


def check_index(index, hasher, where):
  """One clear error when the index's codes are not this model's."""
  if index.nbit != hasher.nbit:
    raise ValueError(
        f'{where} holds {index.nbit}-bit codes but the model {hasher.source} '
        f'makes {hasher.nbit}-bit codes: the index was built with another '
        'model; rebuild it with --db_split or --db_folder.')


# ----------------------------------------------------------------- queries


class Query:
  """A query row: its code, what to show, and a label when one is known."""

  def __init__(self, name, code, *, image=None, attn=None, text=None, label=-1):
    self.name, self.code, self.image, self.attn = name, code, image, attn
    self.text, self.label = text, label


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
    if CLASS_FIELD in prompt:
      expanded += [(prompt.replace(CLASS_FIELD, name.replace('_', ' ')), c)
                   for c, name in enumerate(hasher.class_names)]
    else:
      expanded.append((prompt, -1))
  enc = hasher.encode_text([p for p, _ in expanded])
  return [Query(p, enc['codes'][i], text=p, label=c)
          for i, (p, c) in enumerate(expanded)]


def collect_queries(hasher, *, images, folder, texts, split, data_root):
  """Every query the flags ask for, in flag order."""
  queries = []
  if images:
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
  if not queries:
    raise ValueError('No query: pass --image, --folder, --text or --query_split.')
  return queries


# ------------------------------------------------------------------ search


def search(index, codes, k, faiss_kind=None):
  """(positions, distances) (Q, k): exact by default, or through FAISS."""
  if faiss_kind is None:
    return index.search(codes, k)
  return index_lib.faiss_search(index.to_faiss(faiss_kind), codes, k)


def precision_at_k(query_labels, neighbour_labels):
  """Per query: the share of its neighbours with its label."""
  return (np.asarray(neighbour_labels) == np.asarray(query_labels)[:, None]).mean(1)


def _label_name(index, label):
  names = index.info.get('class_names') or []
  return names[label] if 0 <= label < len(names) else str(label)


def format_results(query, index, positions, distances, num_concepts):
  """The neighbour table of one query, as text."""
  sub = index_lib.concept_distances(
      np.asarray(query.code)[None], index.codes(positions), num_concepts)[0]
  lines = [f'query {query.name}', '  rank  dist  per-concept  label / path']
  for rank, (pos, dist) in enumerate(zip(positions, distances), 1):
    label = ('' if index.labels is None
             else _label_name(index, int(index.labels[pos])))
    where = index.paths[pos] if index.paths is not None and index.paths[pos] else (
        f'#{index.ids[pos] if index.ids is not None else pos}')
    lines.append(f'  {rank:4d}  {int(dist):4d}  {"/".join(map(str, sub[rank - 1])):11s}'
                 f'  {label} {where}')
  return '\n'.join(lines)


# -------------------------------------------------------------------- why


def neighbour_items(hasher, index, positions, distances):
  """retrieval_view.Items of database rows: images re-read and re-encoded."""
  sources = []
  dataset = None
  for pos in positions:
    path = index.paths[pos] if index.paths is not None else ''
    if path:
      sources.append(str(path))
      continue
    if index.info.get('source') != 'split':
      raise ValueError('The index stores neither paths nor a dataset split; '
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
              data_root=None):
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
      hasher.num_concepts, heading=f'query: {query.name}')


def _split_query_item(hasher, query, data_root):
  split, i = re.match(r'(\w+)\[(\d+)\]', query.name).groups()
  image = hasher.dataset(split, data_root=data_root)[int(i)]['image']
  enc = hasher.encode(image, attention=True, display=True, progress=False)
  return retrieval_view.Item(code=query.code, title=query.name,
                             image=enc['images'][0], attn=enc['concept_attn'][0])


# -------------------------------------------------------------------- main


def search_and_explain(*, model, index_path=None, db_split=None,
                       db_folder=None, data_root=None, images=(), folder=None,
                       texts=(), query_split=None, k=10, faiss_kind=None,
                       why=None, why_max=8, print_max=5,
                       out=sys.stdout) -> dict:
  """The CLI as a function (`model`: a path or a loaded ConceptHasher).

  Returns:
    {'queries', 'positions', 'distances', 'precision', 'index'}; precision is
    P@k per labelled query, NaN for the others.
  """
  if db_split and db_folder:
    raise ValueError('Pass one of --db_split and --db_folder.')
  hasher = (model if isinstance(model, inference.ConceptHasher)
            else inference.ConceptHasher.load(model))
  if db_split or db_folder:
    index = build_index(hasher, split=db_split, folder=db_folder,
                        data_root=data_root)
    if index_path:
      index.save(index_path)
      print(f'index of {len(index)} codes -> {index_path}', file=out)
  elif index_path:
    index = index_lib.CodeIndex.load(index_path)
  else:
    raise ValueError('No database: pass --db_split or --db_folder (and --index '
                     'to keep it), or --index of a saved one.')
  check_index(index, hasher, index_path or 'the index')
  queries = collect_queries(hasher, images=list(images), folder=folder,
                            texts=list(texts), split=query_split,
                            data_root=data_root)
  k = min(int(k), len(index))
  codes = np.stack([q.code for q in queries])
  positions, distances = search(index, codes, k, faiss_kind)
  for i, query in enumerate(queries[:print_max]):
    print(format_results(query, index, positions[i], distances[i],
                         hasher.num_concepts), file=out)
  labels = np.array([q.label for q in queries])
  precision = np.full(len(queries), np.nan)
  labelled = labels >= 0
  if labelled.any() and index.labels is not None:
    precision[labelled] = precision_at_k(
        labels[labelled], index.labels[positions[labelled]])
    _print_summary(queries, labels, precision, labelled, index, codes, k,
                   query_split, out)
  if why:
    for i, query in enumerate(queries[:why_max]):
      html_path, png_path = write_why(why, hasher, index, query, positions[i],
                                      distances[i], i, data_root=data_root)
      print(f'see why: {html_path} {png_path}', file=out)
  return {'queries': queries, 'positions': positions, 'distances': distances,
          'precision': precision, 'index': index}


def _print_summary(queries, labels, precision, labelled, index, codes, k,
                   query_split, out):
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
    metrics = index.evaluate(codes[split_rows], labels[split_rows], topk=(k,))
    print(f'\n{query_split} split, {int(split_rows.sum())} queries: search P@{k} '
          f'{ours:.4f}, evaluator P@{k} {metrics[f"precision_at_{k}"]:.4f}, '
          f'mAP@R {metrics["map_at_r"]:.4f}', file=out)


def main(argv):
  """Entry point; user mistakes end in one sentence on stderr, exit code 2."""
  del argv
  try:
    search_and_explain(
        model=FLAGS.model, index_path=FLAGS.index, db_split=FLAGS.db_split,
        db_folder=FLAGS.db_folder, data_root=FLAGS.data_root,
        images=FLAGS.image, folder=FLAGS.folder, texts=FLAGS.text,
        query_split=FLAGS.query_split, k=FLAGS.k, faiss_kind=FLAGS.faiss,
        why=FLAGS.why, why_max=FLAGS.why_max, print_max=FLAGS.print_max)
  except (exporting.ExportError, data_lib.CorruptImageError, FileNotFoundError,
          ValueError, ImportError) as e:
    print(f'search: {e}', file=sys.stderr)
    sys.exit(2)


def run():
  """Console script `concepthash-search`."""
  cli.run(main, __doc__, define_flags)


if __name__ == '__main__':
  run()
