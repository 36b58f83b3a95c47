"""tools/explain.py and tools/ablate.py on one tiny synthetic run."""
import json
import os
import shutil
import sys

import numpy as np
from PIL import Image
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # The checkout's package when it is not installed.

from concepthash_jax import configuration  # pylint: disable=g-import-not-at-top
from concepthash_jax import run_files  # pylint: disable=g-import-not-at-top
from concepthash_jax import train  # pylint: disable=g-import-not-at-top
from concepthash_jax.interpret import report  # pylint: disable=g-import-not-at-top
from concepthash_jax.tools import ablate  # pylint: disable=g-import-not-at-top
from concepthash_jax.tools import explain  # pylint: disable=g-import-not-at-top
from concepthash_jax.configs import synthetic  # pylint: disable=g-import-not-at-top

NBIT, M = 8, 2


def tiny_config():
  """The synthetic default shrunk to the least a CPU test needs.

  Only the sizes change (configs/synthetic.py's training recipe stays), so
  this run exercises the same settings as the default.
  """
  config = synthetic.get_config(f'nbit={NBIT}')
  config.model.num_concepts = M
  # A one-layer CLIP at 32 px; patch size and text context stay synthetic's.
  config.model.random_clip.update(
      image_size=32, vision_width=32, vision_layers=1, vision_heads=2,
      vision_mlp=64, projection_dim=16, text_width=16, text_layers=1,
      text_heads=2, text_mlp=32)
  config.model.update(adapter_dim=8, generator_heads=2)
  config.data.update(image_size=32, resize_size=36, batch_size=8,
                     eval_batch_size=16)
  config.data.synthetic.update(num_classes=4, num_families=2,
                               train_per_class=8, test_per_class=4,
                               image_size=32)
  config.optim.update(epochs=1, warmup_epochs=1)
  config.train.update(max_steps=2, log_every_steps=1)
  return config


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """(config, workdir) of one tiny trained run."""
  workdir = str(tmp_path_factory.mktemp('tiny_run'))
  config = tiny_config()
  train.train_and_evaluate(config, workdir)
  return config, workdir


@pytest.fixture(scope='module')
def explained(run):
  """explain() on the tiny run: (summary, out_dir)."""
  _, workdir = run
  out = os.path.join(workdir, 'explain')
  summary = explain.explain(workdir, out, num_images=3, per_group=2,
                            loc_classes=(0,))
  return summary, out


def _png_is_a_picture(path):
  img = np.asarray(Image.open(path).convert('RGB'))
  assert img.shape[0] > 100 and img.shape[1] > 100
  assert img.std() > 5  # Not a blank canvas.


def test_explain_writes_every_figure_and_the_report(explained):
  summary, out = explained
  names = (['attention_maps.png', 'correlation.png', 'localisation.png',
            'part_hits.png', 'tsne_centers.png', 'pr_curve.png',
            'precision_at_k.png']
           + [f'gallery_concept{m}.png' for m in range(M)])
  for name in names:
    _png_is_a_picture(os.path.join(out, name))
  with open(os.path.join(out, 'report.md')) as f:
    report = f.read()
  for name in names:
    assert f']({name})' in report
  for heading in ('Table 5', 'Table 3', 'Fig. 7', 'Fig. 5', 'centre baseline',
                  'Which part each concept looks at'):
    assert heading in report
  with open(os.path.join(out, 'explain.json')) as f:
    saved = json.load(f)
  hits = saved['part_hits']
  assert hits['targets'][-1] == 'background'
  assert np.asarray(hits['fraction']).shape == (M, len(hits['targets']))
  # Every scored image puts each concept on exactly one target.
  np.testing.assert_allclose(np.sum(hits['fraction'], axis=1), 1.0, atol=1e-9)
  assert 0 < hits['count'] <= summary['num_test']
  assert saved['retrieval']['class_map_at_r'] == pytest.approx(
      summary['retrieval']['class_map_at_r'])


def test_explain_class_map_matches_the_training_evaluation(run, explained):
  _, workdir = run
  summary, _ = explained
  with open(os.path.join(workdir, run_files.RESULTS_FILE)) as f:
    results = json.load(f)
  # Same checkpoint, data and metric: the encode path must agree exactly.
  assert summary['retrieval']['class_map_at_r'] == pytest.approx(
      results['map_at_r'], abs=1e-6)
  assert summary['num_test'] == results['num_queries']
  assert summary['num_train'] == results['num_database']


def test_explain_numbers_are_well_formed(explained):
  summary, _ = explained
  ret = summary['retrieval']
  assert ret['num_families'] == 2
  assert 0 <= ret['family_map_at_r'] <= 1 and 0 < ret['family_chance'] < 1
  # With 2 families of 2 classes, a family holds twice a class's relevant set.
  assert ret['family_chance'] > ret['class_chance']
  corr = np.asarray(summary['correlation']['matrix'])
  assert corr.shape == (M, M)
  np.testing.assert_allclose(np.diag(corr), 1.0, atol=1e-6)
  pearson = np.asarray(summary['correlation']['pearson'])
  assert pearson.shape == (M, M) and np.all(np.abs(pearson) <= 1 + 1e-6)
  assert set(summary['localisation']) == {'all', 'SYNTHETIC-001'}
  loc = summary['localisation']['all']
  head = loc[loc['headline']]
  num_parts = len(summary['part_names'])
  assert head['per_part'].shape == (num_parts,)
  assert np.isfinite(head['mean']) and np.isfinite(head['centre_baseline'])
  assert set(loc['best_concept/peak']['assignment']) <= set(range(M))
  assert set(summary['subcode_counts']) == set(range(M))
  for counts in summary['subcode_counts'].values():
    assert all(len(bits) == NBIT // M for bits in counts)
  assert 'localisation' in report.headline(summary)


def test_ablate_trains_missing_cells_only_and_writes_tables(run, tmp_path):
  config, workdir = run
  root = str(tmp_path / 'ablate')
  # The fixture's run is the M=2 cell: placed there, it must not retrain.
  os.makedirs(root)
  shutil.copytree(workdir, os.path.join(root, ablate.cell_name(config)))
  calls = []

  def record(cfg, cell_dir):
    # Training itself is the fixture's (real) run; this checks what the grid
    # asks for and writes what train_and_evaluate would.
    configuration.validate_config(cfg)
    calls.append(cfg.model.num_concepts)
    os.makedirs(cell_dir)
    result = {'map_at_r': 0.1 * cfg.model.num_concepts, 'step': 1}
    with open(os.path.join(cell_dir, run_files.RESULTS_FILE), 'w') as f:
      json.dump(result, f)
    return result
  table = ablate.ablate(config, root, ['concepts'], nbits=[NBIT],
                        concepts=[1, 2, 3], seeds=[config.seed],
                        train_fn=record)
  assert calls == [1]  # M=3 does not divide 8 bits; M=2 was done.
  with open(os.path.join(workdir, run_files.RESULTS_FILE)) as f:
    trained = json.load(f)['map_at_r']
  assert table == {'concepts': {1: {NBIT: [0.1]}, 2: {NBIT: [trained]}}}
  with open(os.path.join(root, 'ablation.md')) as f:
    text = f.read()
  assert 'Fig. 9' in text and '| 1 | 10.00 |' in text
  assert f'| 2 | {100 * trained:.2f} |' in text
  _png_is_a_picture(os.path.join(root, 'fig9_num_concepts.png'))

  def must_not_train(cfg, cell_dir):
    raise AssertionError(f'retrained {cell_dir}')
  again = ablate.ablate(config, root, ['concepts'], nbits=[NBIT],
                        concepts=[1, 2], seeds=[config.seed],
                        train_fn=must_not_train)
  assert again == table


def test_ablation_plan_and_tables():
  config = tiny_config()
  cells = ablate.plan(config, ['centers', 'losses'], nbits=[16])
  assert len(cells) == 3 + 5
  losses = [c['config'].loss for c in cells if c['grid'] == 'losses']
  assert [(l.weight_bin, l.weight_csd, l.weight_concept) for l in losses] == [
      (0, 0, 0), (1, 0, 0), (1, 1, 0), (1, 0, 1), (1, 1, 1)]
  for cell in cells:
    configuration.validate_config(cell['config'])
  # Table 2's language row trains the config's own loss terms, so it is the
  # Table 4 row with the same terms (full with L_csd on, as the synthetic
  # default; full minus csd for the released recipe): one run serves both.
  names = [c['name'] for c in cells]
  assert len(set(names)) == len(cells) - 1
  assert names[2] == names[3 + (4 if config.loss.weight_csd else 3)]
  released = tiny_config()
  released.loss.weight_csd = 0.0
  released_names = [c['name'] for c in ablate.plan(released, ['centers', 'losses'],
                                                   nbits=[16])]
  assert released_names[2] == released_names[3 + 3]
  with pytest.raises(ValueError, match='grid'):
    ablate.plan(config, ['margins'])
  table = {'centers': {'language': {16: [0.8, 0.9]},
                       'learnable': {16: [0.5]}}}
  text = ablate.tables_markdown(table, 'cub', {'centers': (16,)})
  assert '| Language (Ours) | 85.00 ± 7.07 | 83.45 |' in text
  assert '| Learnable vectors | 50.00 | 81.55 |' in text
  assert '| Random vectors | – | 77.00 |' in text
