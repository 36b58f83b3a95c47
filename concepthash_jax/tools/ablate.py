r"""Trains the paper's ablation grids and writes paper-style tables and a plot.

  concepthash-ablate --config=synthetic --workdir=runs/ablate \
    --grid=centers,losses,concepts
  # Quicker: 5 epochs for every cell (and fewer grids / bit widths):
  concepthash-ablate --config=synthetic --workdir=runs/ablate_quick \
    --grid=centers --nbits=16 --config.optim.epochs=5
  # The same on CUB (the released recipe's 100 epochs per cell):
  concepthash-ablate --config=cub --workdir=runs/ablate_cub \
    --grid=centers --nbits=16,32,64

Grids (each cell is one `train.train_and_evaluate` run in its own sub-workdir):
  centers   Table 2: hash centers random orthogonal | learnable | language.
  losses    Table 4: L_clf, then + L_quan, + L_csd, + L_cd (weights 0 or on).
  concepts  Fig. 9: number of concepts M at a fixed code length.
Every other setting comes from --config (a built-in name or a file path, as in
concepthash-train) and its --config.a.b=v overrides. A cell whose results.json
exists is skipped, a half-trained cell resumes from its checkpoint, and cells
that the grids share (same settings) are trained once. Writes
WORKDIR/ablation.md, ablation.json and fig9_num_concepts.png.
"""
import copy
import json
import os
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
import matplotlib
matplotlib.use('Agg')  # Files only; no display on servers.
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags
import numpy as np

from concepthash_jax import run_files
from concepthash_jax import safe_files
from concepthash_jax import train
from concepthash_jax import xla_flags
from concepthash_jax.tools import cli

FLAGS = flags.FLAGS

DEFAULT_NBITS = {'centers': (16, 32, 64), 'losses': (16, 64),
                 'concepts': (64,)}
CENTER_ROWS = (('random_orthogonal', 'Random vectors'),
               ('learnable', 'Learnable vectors'),
               ('language', 'Language (Ours)'))
# Table 4 rows: (L_quan, L_csd, L_cd) on/off; L_clf is always on.
LOSS_ROWS = ((False, False, False), (True, False, False), (True, True, False),
             (True, False, True), (True, True, True))
# Published mAP@R (%) for orientation beside our numbers (Tables 2 and 4).
PAPER = {
    'centers': {
        'cub': {'random_orthogonal': {16: 77.00, 32: 79.61, 64: 82.12},
                'learnable': {16: 81.55, 32: 82.39, 64: 83.86},
                'language': {16: 83.45, 32: 85.27, 64: 85.50}},
        'cars': {'random_orthogonal': {16: 88.57, 32: 87.17, 64: 88.46},
                 'learnable': {16: 91.03, 32: 91.92, 64: 92.84},
                 'language': {16: 91.70, 32: 92.60, 64: 93.01}},
    },
    'losses': {
        'cub': {LOSS_ROWS[0]: {16: 68.65, 64: 82.00},
                LOSS_ROWS[1]: {16: 81.12, 64: 84.14},
                LOSS_ROWS[2]: {16: 81.63, 64: 84.79},
                LOSS_ROWS[3]: {16: 83.02, 64: 85.10},
                LOSS_ROWS[4]: {16: 83.45, 64: 85.50}},
        'cars': {LOSS_ROWS[0]: {16: 81.85, 64: 91.20},
                 LOSS_ROWS[1]: {16: 90.03, 64: 92.72},
                 LOSS_ROWS[2]: {16: 90.63, 64: 92.82},
                 LOSS_ROWS[3]: {16: 91.57, 64: 92.75},
                 LOSS_ROWS[4]: {16: 91.70, 64: 93.01}},
    },
}


def cell_settings(grid: str, row, nbit: int, seed: int,
                  csd_weight: float) -> dict:
  """The settings one cell changes, as {config path: value}."""
  settings = {'model.nbit': nbit, 'seed': seed}
  if grid == 'centers':
    settings['model.center_type'] = row
  elif grid == 'losses':
    quan, csd, cd = row
    settings.update({'loss.weight_bin': 1.0 if quan else 0.0,
                     'loss.weight_csd': csd_weight if csd else 0.0,
                     'loss.weight_concept': 1.0 if cd else 0.0})
  elif grid == 'concepts':
    settings['model.num_concepts'] = row
  else:
    raise ValueError(f"Unknown grid {grid!r}; valid: "
                     "['centers', 'losses', 'concepts']")
  return settings


def apply_settings(config, settings: dict):
  """A copy of the config with the settings applied (keys must exist)."""
  config = copy.deepcopy(config)
  for path, value in settings.items():
    *parents, key = path.split('.')
    node = config
    for name in parents:
      node = node[name]
    if key not in node:
      raise KeyError(f'Config has no key {path!r}')
    node[key] = type(node[key])(value)
  return config


def cell_name(config) -> str:
  """Folder name from every setting a grid varies, so shared cells coincide."""
  m, l = config.model, config.loss
  return (f'{m.center_type}_K{m.nbit}_M{m.num_concepts}_quan{l.weight_bin:g}'
          f'_csd{l.weight_csd:g}_cd{l.weight_concept:g}_seed{config.seed}')


def plan(config, grids: Sequence[str], *, nbits=None, concepts=(1, 2, 4, 8, 16),
         seeds=(0,), csd_weight=1.0):
  """Every (grid, row, nbit, seed) cell with its config and folder name.

  Returns:
    list of dicts {'grid', 'row', 'nbit', 'seed', 'name', 'config'}; cells
    of the concepts grid whose M does not divide nbit are left out.
  """
  cells = []
  for grid in grids:
    if grid == 'centers':
      rows = [r for r, _ in CENTER_ROWS]
    elif grid == 'losses':
      rows = list(LOSS_ROWS)
    elif grid == 'concepts':
      rows = list(concepts)
    else:
      raise ValueError(f"Unknown grid {grid!r}; valid: "
                       "['centers', 'losses', 'concepts']")
    for nbit in (nbits or DEFAULT_NBITS[grid]):
      for row in rows:
        if grid == 'concepts' and nbit % row:
          continue
        for seed in seeds:
          cfg = apply_settings(config, cell_settings(grid, row, nbit, seed,
                                                     csd_weight))
          cells.append({'grid': grid, 'row': row, 'nbit': nbit, 'seed': seed,
                        'name': cell_name(cfg), 'config': cfg})
  return cells


def read_result(workdir: str, name: str):
  """A cell's results.json, or None while it is not done."""
  path = os.path.join(workdir, name, run_files.RESULTS_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def run_cells(workdir: str, cells, *, train_fn=None):
  """Trains every cell not done yet (each distinct folder once)."""
  train_fn = train_fn or train.train_and_evaluate
  done = set()
  for k, cell in enumerate(cells):
    if cell['name'] in done or read_result(workdir, cell['name']) is not None:
      done.add(cell['name'])
      continue
    logging.info('Cell %d/%d: %s', k + 1, len(cells), cell['name'])
    print(f'[{k + 1}/{len(cells)}] training {cell["name"]}', flush=True)
    result = train_fn(cell['config'], os.path.join(workdir, cell['name']))
    if result.get('preempted'):
      raise SystemExit(f'Preempted in cell {cell["name"]}; rerun to resume.')
    done.add(cell['name'])


def collect(workdir: str, cells) -> dict:
  """{grid: {row: {nbit: [mAP@R per seed]}}} over the cells that are done."""
  table = {}
  for cell in cells:
    result = read_result(workdir, cell['name'])
    if result is None:
      continue
    row = table.setdefault(cell['grid'], {}).setdefault(cell['row'], {})
    row.setdefault(cell['nbit'], []).append(float(result['map_at_r']))
  return table


def _cell(values):
  """'mean' or 'mean ± std' in %, '–' when missing."""
  if not values:
    return '–'
  values = 100 * np.asarray(values)
  if len(values) == 1:
    return f'{values[0]:.2f}'
  return f'{values.mean():.2f} ± {values.std(ddof=1):.2f}'


def _mark(on):
  return '✓' if on else '✗'


def _paper_table(title, header, rows, grid, table, dataset, nbits):
  """One results table of a grid that the paper published, as markdown lines.

  Args:
    title: the markdown heading.
    header: names of the leading (row label) columns.
    rows: (key, label cells) per row, in order; key indexes `table[grid]`
      and `PAPER[grid][dataset]`.
    grid: 'centers' | 'losses'.
    table: the `collect` result.
    dataset: config.data.name; adds a column of the paper's numbers when
      PAPER has this dataset.
    nbits: code lengths, one column each.

  Returns:
    The lines, ending with a blank one.
  """
  paper = PAPER[grid].get(dataset)
  out = [title, '',
         '| ' + ' | '.join(header) + ' | ' + ' | '.join(map(str, nbits))
         + ' |' + (' paper ' + dataset + ' |' if paper else ''),
         '|' + '---|' * (len(header) + len(nbits)) + ('---|' if paper else '')]
  for key, labels in rows:
    row = table.get(grid, {}).get(key, {})
    line = ('| ' + ' | '.join(labels) + ' | '
            + ' | '.join(_cell(row.get(b)) for b in nbits) + ' |')
    if paper:
      line += ' ' + ' / '.join(f'{paper[key].get(b, float("nan")):.2f}'
                               for b in nbits) + ' |'
    out.append(line)
  out.append('')
  return out


def tables_markdown(table: dict, dataset: str, nbits_of: dict) -> str:
  """Paper-style markdown tables (mAP@R %), paper numbers where published."""
  out = []
  if 'centers' in nbits_of:
    out += _paper_table(
        '## Table 2: effect of language guidance on the hash centers',
        ['hash centers'], [(key, [label]) for key, label in CENTER_ROWS],
        'centers', table, dataset, nbits_of['centers'])
  if 'losses' in nbits_of:
    out += _paper_table(
        '## Table 4: loss ablation (L_clf always on)',
        ['L_quan', 'L_csd', 'L_cd'],
        [(key, [_mark(on) for on in key]) for key in LOSS_ROWS],
        'losses', table, dataset, nbits_of['losses'])
  if 'concepts' in nbits_of:
    nbits = nbits_of['concepts']
    rows = table.get('concepts', {})
    out += ['## Fig. 9: effect of the number of concepts M', '',
            '| M | ' + ' | '.join(f'{b} bits' for b in nbits) + ' |',
            '|---|' + '---|' * len(nbits)]
    for m in sorted(rows):
      out.append(f'| {m} | ' + ' | '.join(
          _cell(rows[m].get(b)) for b in nbits) + ' |')
    if rows:
      out += ['', '![Fig. 9](fig9_num_concepts.png)']
    out.append('')
  return '\n'.join(out)


def plot_concepts(path: str, rows: dict, nbits):
  """Fig. 9: mAP@R against M (log2 axis), one line per code length."""
  fig, ax = plt.subplots(figsize=(4, 3))
  for nbit in nbits:
    ms = [m for m in sorted(rows) if rows[m].get(nbit)]
    if not ms:
      continue
    mean = [100 * np.mean(rows[m][nbit]) for m in ms]
    std = [100 * np.std(rows[m][nbit]) for m in ms]
    ax.errorbar(ms, mean, yerr=std, marker='o', capsize=3, label=f'{nbit} bits')
  ax.set_xscale('log', base=2)
  ax.set_xticks(sorted(rows))  # M itself (1, 2, 4, ...), not 2^k.
  ax.set_xticklabels([str(m) for m in sorted(rows)])
  ax.minorticks_off()
  ax.set_xlabel('number of concepts M')
  ax.set_ylabel('mAP@R (%)')
  ax.legend(fontsize=8)
  fig.tight_layout()
  safe_files.save_figure(fig, path, dpi=100)
  plt.close(fig)


def ablate(config, workdir: str, grids: Sequence[str], *, nbits=None,
           concepts=(1, 2, 4, 8, 16), seeds=(0,), csd_weight=1.0,
           tables_only=False, train_fn=None) -> dict:
  """Runs (or resumes) the grids and writes ablation.md/json and the plot.

  Args:
    config: base config (every cell changes only its grid's keys).
    workdir: root folder, one sub-folder per cell.
    grids: subset of ('centers', 'losses', 'concepts').
    nbits: code lengths for every grid (default: the paper's per grid).
    concepts: M values of the concepts grid.
    seeds: seeds per cell.
    csd_weight: weight of L_csd in rows that turn it on.
    tables_only: write tables from finished cells without training.
    train_fn: trainer (default `train.train_and_evaluate`).

  Returns:
    {grid: {row: {nbit: [mAP@R per seed]}}} as collected.
  """
  os.makedirs(workdir, exist_ok=True)
  cells = plan(config, grids, nbits=nbits, concepts=concepts, seeds=seeds,
               csd_weight=csd_weight)
  if not tables_only:
    run_cells(workdir, cells, train_fn=train_fn)
  table = collect(workdir, cells)
  nbits_of = {g: tuple(nbits or DEFAULT_NBITS[g]) for g in grids}
  text = (f'# Ablations on {config.data.name}\n\nmAP@R (%) on the test '
          f'queries against the train database; {len(seeds)} seed(s) per '
          f'cell (mean ± std over seeds). Cells: {workdir}/<name>.\n\n'
          + tables_markdown(table, config.data.name, nbits_of))
  safe_files.write_text(os.path.join(workdir, 'ablation.md'), text)
  if 'concepts' in table:
    plot_concepts(os.path.join(workdir, 'fig9_num_concepts.png'),
                  table['concepts'], nbits_of['concepts'])
  safe_files.write_json(os.path.join(workdir, 'ablation.json'),
                        {g: {str(r): v for r, v in rows.items()}
                         for g, rows in table.items()})
  return table


def define_flags():
  """Command-line flags, defined only when run as a program."""
  config_flags.DEFINE_config_file('config', None,
                                  'Base config: a built-in name or a file '
                                  'path, with an optional :arg (cub:nbit=32).',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Root folder: one sub-folder per cell.')
  flags.DEFINE_list('grid', ['centers', 'losses', 'concepts'],
                    'Grids to run: centers (Table 2), losses (Table 4), '
                    'concepts (Fig. 9).')
  flags.DEFINE_list('nbits', None, 'Code lengths (default per grid: centers '
                    '16,32,64; losses 16,64; concepts 64, as the paper).')
  flags.DEFINE_list('concepts', ['1', '2', '4', '8', '16'],
                    'Values of M for the concepts grid (those dividing nbit).')
  flags.DEFINE_list('seeds', ['0'], 'Seeds; tables show the mean (and std).')
  flags.DEFINE_float('csd_weight', 1.0,
                     'Weight of L_csd when it is on (paper 1).')
  flags.DEFINE_bool('tables_only', False,
                    'Do not train: write tables from the cells already done.')
  flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  """Entry point."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  xla_flags.configure_xla_flags(FLAGS.config)  # Before the first JAX computation.
  nbits = [int(b) for b in FLAGS.nbits] if FLAGS.nbits else None
  ablate(FLAGS.config, FLAGS.workdir, FLAGS.grid, nbits=nbits,
         concepts=[int(m) for m in FLAGS.concepts],
         seeds=[int(s) for s in FLAGS.seeds], csd_weight=FLAGS.csd_weight,
         tables_only=FLAGS.tables_only)
  with open(os.path.join(FLAGS.workdir, 'ablation.md')) as f:
    print(f.read())


def run():
  """Console script `concepthash-ablate`."""
  cli.run(main, __doc__, define_flags)


if __name__ == '__main__':
  run()
