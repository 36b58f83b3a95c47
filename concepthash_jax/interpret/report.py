"""The explain report: report.md (numbers as tables, figures inline), explain.json, headline.

Reads the summary dict that tools/explain.py assembles; no analysis here.
"""
import json

import numpy as np

from concepthash_jax import safe_files


def _fmt(x, digits=2):
  return 'n/a' if x is None or not np.isfinite(x) else f'{x:.{digits}f}'


LOC_COLUMNS = ('regression/peak', 'regression/centroid', 'best_concept/peak')


def _localisation_table(subset, res, part_names):
  """Markdown rows of one Table 3 subset: methods, baselines, counts."""
  head = res[res['headline']]
  assignment = res['best_concept/peak']['assignment']
  lines = [f'### {subset} (headline: {res["headline"]}, normalised by '
           f'{res["normalised_by"]})', '',
           '| part | ' + ' | '.join(LOC_COLUMNS) + ' (concept) | '
           'centre baseline | mean baseline | n |', '|---' * 7 + '|']
  for p, name in enumerate(part_names):
    cells = [_fmt(res[k]['per_part'][p]) for k in LOC_COLUMNS]
    cells[-1] += f' ({assignment[p]})'
    cells += [_fmt(head['centre_baseline_per_part'][p]),
              _fmt(head['mean_baseline_per_part'][p]), str(head['count'][p])]
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  cells = [_fmt(res[k]['mean']) for k in LOC_COLUMNS]
  cells += [_fmt(head['centre_baseline']), _fmt(head['mean_baseline']),
            str(int(np.sum(head['count'])))]
  lines += ['| **mean** | ' + ' | '.join(cells) + ' |', '']
  return lines


def write_report(path, summary, figures):
  """report.md: the numbers as tables and the figures inline."""
  lines = [f'# ConceptHash explained: `{summary["workdir"]}`', '',
           f'{summary["dataset"]}, {summary["nbit"]} bits, '
           f'M = {summary["num_concepts"]} concepts of '
           f'{summary["nbit"] // summary["num_concepts"]} bits, checkpoint '
           f'step '
           f'{summary["step"]}; {summary["num_train"]} train (database) / '
           f'{summary["num_test"]} test (query) images.', '',
           '## Retrieval (Table 5: family level)', '',
           '| labels | mAP@R | chance |', '|---|---|---|']
  ret = summary['retrieval']
  lines.append(f'| class | {ret["class_map_at_r"]:.4f} | '
               f'{ret["class_chance"]:.4f} |')
  if 'family_map_at_r' in ret:
    lines.append(f'| family ({ret["num_families"]}) | '
                 f'{ret["family_map_at_r"]:.4f} | {ret["family_chance"]:.4f} |')
  at_k = ret.get('precision_at_k')
  if at_k:
    lines += ['', 'Precision at k (class labels): ' + ', '.join(
        f'P@{k} {p:.4f}' for k, p in zip(at_k['k'], at_k['precision']))
              + '.']
  lines += [''] + concept_table(summary)
  loc = summary.get('localisation')
  if loc:
    lines += ['', '## Part localisation (Table 3)', '',
              'Normalised L2 error in % (per axis by the object box, as [27], '
              'or by the model input when the data has no boxes; lower is '
              'better). '
              '*regression*: the protocol of Huang & Li 2020 ([27] of the '
              'paper): a linear map from all concept locations to each part, '
              'fit on the train split, scored on the test split. '
              '*best concept*: the part is predicted directly by the location '
              'of the single concept that localises it best on the train '
              'split. *peak*: arg-max patch; *centroid*: attention-weighted '
              'mean. Baselines: always the image centre; always the mean '
              'train location of the part.', '']
    for subset, res in loc.items():
      lines += _localisation_table(subset, res, summary['part_names'])
  hits = summary.get('part_hits')
  if hits:
    lines += ['## Which part each concept looks at', '',
              f'Each concept\'s attention peak on the {hits["count"]} test '
              f'images, assigned to the nearest visible part keypoint, or to '
              f'the background when outside the object box. All concepts on '
              f'different targets in {100 * hits["distinct_rate"]:.1f}% of '
              f'the images; {hits["mean_distinct_parts"]:.2f} different parts '
              f'per image on average. *same target*: share of images on the '
              f'concept\'s most common target; *within class*: the same per '
              f'class (much higher than *same target* means the part a '
              f'concept finds depends on the class, i.e. it follows an '
              f'appearance cue rather than a fixed part).', '',
              '| concept | ' + ' | '.join(hits['targets'])
              + ' | same target | within class |',
              '|---' * (len(hits['targets']) + 3) + '|']
    for c, row in enumerate(hits['fraction']):
      lines.append(f'| {c} | ' + ' | '.join(f'{100 * v:.0f}%' for v in row)
                   + f' | {100 * hits["consistency"][c]:.0f}% | '
                   f'{100 * hits["consistency_within_class"][c]:.0f}% |')
    lines.append('')
  corr = summary['correlation']
  lines += ['## Concept attention correlation (Fig. 7)', '',
            f'Cosine similarity of the concepts\' last-layer attention maps '
            f'(the quantity L_csd penalises), averaged over the '
            f'{summary["num_train"]} train images: mean off-diagonal '
            f'{_fmt(corr["mean_off_diagonal"], 3)} (1 = all concepts look at '
            f'the same patches); Pearson correlation of the centred maps, '
            f'mean off-diagonal {_fmt(corr.get("pearson_mean_off_diagonal"), 3)}'
            f' (near-uniform maps have a cosine near 1 even when their peaks '
            f'differ; centring removes that shared floor).', '']
  cen = summary.get('centers')
  if cen:
    lines += ['## Hash class centers (Fig. 5)', '',
              f'Mean cosine between class centers of the same family '
              f'{_fmt(cen["within"], 3)}, of different families '
              f'{_fmt(cen["between"], 3)} (center type '
              f'`{summary["center_type"]}`).', '']
  lines += ['## Figures', '']
  for title, name in figures:
    lines += [f'### {title}', '', f'![{title}]({name})', '']
  safe_files.write_text(path, '\n'.join(lines))


def concept_table(summary) -> list:
  """Markdown lines: mAP@R of each concept alone and of all but it (none: [])."""
  numbers = summary.get('concept_retrieval')
  if not numbers:
    return []
  without = numbers['without'] or [None] * len(numbers['alone'])
  lines = ['## Which concepts carry the class', '',
           f'Class mAP@R of the test split against the train split on one '
           f'concept\'s sub-code alone, and on every sub-code but that one '
           f'(all {len(numbers["alone"])}: {numbers["all"]:.4f}). A concept '
           f'whose removal costs the most carries the class.', '',
           '| concept | alone | all but it | change |', '|---|---|---|---|']
  for m, (alone, rest) in enumerate(zip(numbers['alone'], without)):
    change = 'n/a' if rest is None else f'{rest - numbers["all"]:+.4f}'
    lines.append(f'| {m} | {alone:.4f} | {_fmt(rest, 4)} | {change} |')
  return lines + ['']


def jsonable(obj):
  """numpy -> lists/floats for explain.json."""
  if isinstance(obj, dict):
    return {str(k): jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [jsonable(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return jsonable(obj.tolist())
  if isinstance(obj, (np.floating, float)):
    return None if not np.isfinite(obj) else float(obj)
  if isinstance(obj, np.integer):
    return int(obj)
  return obj


def headline(summary) -> str:
  """The few numbers the issue asks to see, one line each."""
  ret = summary['retrieval']
  lines = [f'class  mAP@R {ret["class_map_at_r"]:.4f} (chance '
           f'{ret["class_chance"]:.4f})']
  if 'family_map_at_r' in ret:
    lines.append(f'family mAP@R {ret["family_map_at_r"]:.4f} (chance '
                 f'{ret["family_chance"]:.4f})')
  for subset, res in summary.get('localisation', {}).items():
    head = res[res['headline']]
    lines.append(f'localisation [{subset}, {res["headline"]}] '
                 f'{head["mean"]:.2f}% (image centre '
                 f'{head["centre_baseline"]:.2f}%'
                 f', mean location {head["mean_baseline"]:.2f}%)')
  hits = summary.get('part_hits')
  if hits:
    lines.append(f'concepts on different parts/background in '
                 f'{100 * hits["distinct_rate"]:.1f}% of test images '
                 f'({hits["mean_distinct_parts"]:.2f} parts per image)')
  corr = summary['correlation']
  lines.append('attention correlation, mean off-diagonal: cosine '
               f'{_fmt(corr["mean_off_diagonal"], 3)}, Pearson '
               f'{_fmt(corr.get("pearson_mean_off_diagonal"), 3)}')
  return '\n'.join(lines)


def write_json(path, summary):
  """explain.json: the summary with numpy values as lists and floats (NaN -> null)."""
  safe_files.write_text(path, json.dumps(jsonable(summary), indent=1))
