"""train.py end to end: outputs, datasets, bit-identical resume, NaN stop, encode tool."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from absl import flags
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import data_testlib
import train_testlib as lib
from concepthash_jax import checkpointing
from concepthash_jax import configuration
from concepthash_jax import encoding
from concepthash_jax import errors
from concepthash_jax import index as index_lib
from concepthash_jax import inference
from concepthash_jax import train
from concepthash_jax import workdir as workdir_lib

# Long enough (120 steps) for a SIGTERM to land mid-run; evals at epochs 20, 40.
LONG = {'optim.epochs': 40, 'eval.every_epochs': 20,
        'train.checkpoint_every_steps': 25}
SUBPROCESS_ENV = dict(os.environ, JAX_PLATFORMS='cpu')


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """An uninterrupted LONG run: (workdir, results)."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  return workdir, train.train_and_evaluate(lib.load_config(LONG), workdir)


def test_run_writes_results_metrics_tensorboard_and_run_files(reference):
  workdir, results = reference
  with open(os.path.join(workdir, 'results.json')) as f:
    assert json.load(f) == results
  assert results['step'] == 120 and results['nbit'] == 8
  assert results['dataset'] == 'synthetic' and np.isfinite(results['loss'])
  assert 0.0 <= results['map_at_r'] <= results['best_map_at_r'] <= 1.0
  # 4 classes with 6 database images each: exact expectation of random AP.
  n, size = 6, 24
  harmonic = sum(1 / k for k in range(1, size + 1))
  chance = (n - 1) / (size - 1) + harmonic / size * (size - n) / (size - 1)
  assert results['chance_map_at_r'] == pytest.approx(chance)
  assert results['num_queries'] == 12 and results['num_database'] == 24
  lines = lib.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  train_lines = [l for l in lines if 'train/loss' in l]
  assert [l['step'] for l in train_lines] == list(range(1, 121))
  for key in ('train/loss_cont', 'train/loss_bin', 'train/loss_concept',
              'train/loss_csd', 'train/quantization_gap', 'train/lr',
              'train/img_per_sec'):
    assert key in train_lines[-1]
  assert train_lines[-1]['train/loss'] == pytest.approx(results['loss'])
  evals = [l for l in lines if 'eval/map_at_r' in l]
  assert [l['step'] for l in evals] == [60, 120]
  assert 'eval/chance_map_at_r' in evals[0]
  assert os.listdir(os.path.join(workdir, 'tensorboard'))
  for name in ('config.json', 'clip_config.json', 'class_names.json'):
    assert os.path.exists(os.path.join(workdir, name))
  # Latest 2 checkpoints + the best eval.
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir,
                                                          'checkpoints')))
  assert steps[-1] == 120 and len(steps) <= 3


def test_training_reduces_the_loss(reference):
  lines = lib.read_jsonl(os.path.join(reference[0], 'metrics.jsonl'))
  losses = [l['train/loss'] for l in lines if 'train/loss' in l]
  assert np.mean(losses[-15:]) < np.mean(losses[:15])


def _assert_same_run(workdir, reference_dir):
  """Bit-identical final state, final results and per-step training loss."""
  ours, ref = lib.final_params(workdir), lib.final_params(reference_dir)
  assert ours.keys() == ref.keys()
  for key in ref:
    np.testing.assert_array_equal(ours[key], ref[key], err_msg=key)

  def losses(d):
    return {l['step']: l['train/loss'] for l in
            lib.read_jsonl(os.path.join(d, 'metrics.jsonl')) if 'train/loss' in l}
  assert losses(workdir) == losses(reference_dir)
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  with open(os.path.join(reference_dir, 'results.json')) as f:
    expected = json.load(f)
  for key in ('map_at_r', 'loss', 'step'):
    assert results[key] == expected[key], key


def test_max_steps_then_resume_is_bit_identical(reference, tmp_path):
  workdir = str(tmp_path / 'run')
  first = train.train_and_evaluate(
      lib.load_config({**LONG, 'train.max_steps': 50}), workdir)
  assert first['step'] == 50  # Stopped mid-epoch (3 steps per epoch).
  shutil.copytree(workdir, str(tmp_path / 'diverging'))
  train.train_and_evaluate(lib.load_config(LONG), workdir)
  _assert_same_run(workdir, reference[0])

  # The copy diverges (NaN loss) after step 50: clear error, step 50 kept.
  # (loss.fn is stored as if the run had used it from the start: a changed
  # loss on a workdir with checkpoints is refused.)
  nan_dir = str(tmp_path / 'diverging')
  config = lib.load_config({**LONG, 'loss.fn': 'train_testlib.nan_loss'})
  with open(os.path.join(nan_dir, 'config.json')) as f:
    stored = json.load(f)
  stored['loss']['fn'] = config.loss.fn
  with open(os.path.join(nan_dir, 'config.json'), 'w') as f:
    json.dump(stored, f)
  with pytest.raises(FloatingPointError,
                     match=r'Non-finite.*step 51.*checkpoint \(step 50\) is kept'):
    train.train_and_evaluate(config, nan_dir)
  assert max(int(s) for s in os.listdir(os.path.join(nan_dir, 'checkpoints'))
             ) == 50
  assert not any(l['step'] > 50 for l in lib.read_jsonl(
      os.path.join(nan_dir, 'metrics.jsonl')))


def test_sigterm_saves_exits_cleanly_and_resume_is_bit_identical(reference,
                                                                  tmp_path):
  workdir = str(tmp_path / 'run')
  metrics = os.path.join(workdir, 'metrics.jsonl')
  proc = subprocess.Popen(
      [sys.executable, os.path.join(lib.ROOT, 'launch.py'),
       f'--workdir={workdir}', *lib.flag_args(LONG)],
      cwd=lib.ROOT, env=SUBPROCESS_ENV, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.time() + 240
    while not (os.path.exists(metrics) and os.path.getsize(metrics)):
      assert proc.poll() is None, proc.communicate()[0][-3000:]
      assert time.time() < deadline, 'training never started'
      time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == errors.EXIT_PREEMPTED, out[-3000:]
  assert 'SIGTERM: saved step' in out
  # tqdm bar: steps done of 120, elapsed<ETA, rate, and the logged postfix.
  assert re.search(r'\d+/120 \[\d+:\d+<\d+:\d+, +[\d.]+(step/s|s/step), '
                   r'img_s=[\d.]+, loss=[\d.]+\]', out), out[-3000:]
  stopped = max(int(s) for s in os.listdir(os.path.join(workdir,
                                                         'checkpoints')))
  assert stopped < 120 and not os.path.exists(
      os.path.join(workdir, 'results.json'))
  train.train_and_evaluate(lib.load_config(LONG), workdir)
  _assert_same_run(workdir, reference[0])


def _copy_of(reference, tmp_path):
  """A copy of the reference run's workdir, to change without touching the original."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference[0], workdir)
  return workdir


def _tear_newest_checkpoint(workdir):
  """Truncates the newest checkpoint's _METADATA; returns (its path, its torn bytes)."""
  ckpt_dir = checkpointing.checkpoint_dir(workdir)
  steps = checkpointing.step_dirs(ckpt_dir)
  assert steps[-1] == 120 and len(steps) >= 2
  metadata = os.path.join(ckpt_dir, '120', 'default', '_METADATA')
  with open(metadata, 'r+b') as f:
    f.truncate(os.path.getsize(metadata) // 2)
  with open(metadata, 'rb') as f:
    return metadata, f.read()


def test_state_changing_config_on_a_run_is_refused_naming_the_keys(reference, tmp_path):
  workdir = _copy_of(reference, tmp_path)
  before = lib.files_under(workdir)
  with pytest.raises(errors.WorkdirError,
                     match=r'holds checkpoints \(step 120\) of a run with a '
                     r'different config \(config\.model\.nbit: 8 -> 16, '
                     r'config\.optim\.lr: 0\.05 -> 0\.1; .*--config\.train\.'
                     r'resume='):
    train.train_and_evaluate(lib.load_config(
        {**LONG, 'model.nbit': 16, 'optim.lr': 0.1}), workdir)
  assert lib.files_under(workdir) == before


def test_inference_skips_a_torn_newest_checkpoint_and_leaves_it(reference, tmp_path,
                                                                 caplog):
  workdir = _copy_of(reference, tmp_path)
  metadata, torn = _tear_newest_checkpoint(workdir)
  older = checkpointing.step_dirs(checkpointing.checkpoint_dir(workdir))[-2]
  assert inference.ConceptHasher.load(workdir).step == older
  step_dir = os.path.join(checkpointing.checkpoint_dir(workdir), '120')
  assert f'Skipping checkpoint step 120: {step_dir}' in caplog.text
  with open(metadata, 'rb') as f:
    assert f.read() == torn


def test_resume_past_a_torn_checkpoint_records_a_harmless_config_change(reference,
                                                                         tmp_path):
  workdir = _copy_of(reference, tmp_path)
  _, torn = _tear_newest_checkpoint(workdir)
  train.train_and_evaluate(lib.load_config(
      {**LONG, 'train.keep_checkpoints': 3}), workdir)
  _assert_same_run(workdir, reference[0])
  with open(os.path.join(workdir, 'checkpoints_unreadable', '120', 'default',
                         '_METADATA'), 'rb') as f:
    assert f.read() == torn  # Moved aside, never deleted.
  history = lib.read_jsonl(os.path.join(workdir, workdir_lib.HISTORY_FILE))
  assert [h["step"] for h in history] == [None, 120]
  assert history[-1]['changed'] == {'train.keep_checkpoints': [2, 3]}
  with open(os.path.join(workdir, workdir_lib.CONFIG_FILE)) as f:
    assert json.load(f)['train']['keep_checkpoints'] == 3
  assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK_FILE))


@pytest.fixture(scope='module')
def encoded_test_split(reference):
  """(config, ds, codes): the reference run restored, its test split encoded in
  batches of 5 with attention and keypoints."""
  hasher = inference.ConceptHasher.load(reference[0])
  config, model, variables = hasher.config, hasher.model, hasher.variables
  assert len(hasher.class_names) == 4 and config.model.nbit == 8
  from concepthash_jax import data  # pylint: disable=g-import-not-at-top
  ds = data.build(config.data, 'test')
  codes = encoding.encode_split(
      model, variables, ds, config.data, batch_size=5,
      keep=('codes', 'attention', 'keypoints'))  # 12 images in batches of 5.
  return config, model, variables, ds, codes


def test_encode_split_drops_the_last_batch_padding(encoded_test_split):
  _, _, _, ds, codes = encoded_test_split
  assert codes['codes'].shape == (12, 8) and codes['codes'].dtype == np.int8
  assert set(np.unique(codes['codes'])) <= {-1, 1}
  assert codes['concept_attn'].shape == (12, 4, 16)
  assert codes['keypoints'].shape[:2] == (12, len(ds.part_names))
  np.testing.assert_array_equal(codes['labels'], ds.labels)
  np.testing.assert_array_equal(codes['index'], np.arange(12))


def test_encode_split_of_display_images_alone_runs_no_model(encoded_test_split):
  config, model, variables, ds, _ = encoded_test_split
  size = config.data.image_size
  shown = encoding.encode_split(model, variables, ds, config.data,
                                keep=('images',), num_images=3, max_images=7)
  assert set(shown) == {'labels', 'index', 'images'}
  assert shown['images'].shape == (3, size, size, 3) and len(shown['index']) == 7
  with pytest.raises(ValueError, match=r"keep \['pixels'\]; valid"):
    encoding.encode_split(model, variables, ds, config.data, keep=('pixels',))


def test_encode_tool_writes_the_codes_index_and_curves(reference, encoded_test_split,
                                                       tmp_path):
  workdir, results = reference
  out = str(tmp_path / 'codes.npz')
  run = subprocess.run(
      [sys.executable, '-m', 'concepthash_jax.tools.encode',
       f'--workdir={workdir}', '--split=test', f'--out={out}'],
      cwd=lib.ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True,
      timeout=240, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  assert f'mAP@R {results["map_at_r"]:.4f}' in run.stdout
  saved = np.load(out)
  np.testing.assert_array_equal(saved['codes'], encoded_test_split[-1]['codes'])
  index = index_lib.CodeIndex.load(str(tmp_path / 'codes.chindex'))
  hasher = inference.ConceptHasher.load(workdir)
  assert (index.nbit, index.num_concepts) == (hasher.nbit, hasher.num_concepts)
  assert index.fingerprint == hasher.fingerprint
  with open(str(tmp_path / 'codes.retrieval.json')) as f:
    curves = json.load(f)
  assert curves['map_at_r'] == pytest.approx(results['map_at_r'], abs=1e-6)
  assert curves['precision_at_k']['k'] == [1, 2, 5, 10, 20]  # 24 in the database.
  assert len(curves['pr_recall']) == 8 + 1 and curves['pr_recall'][-1] == 1.0
  for name in ('codes.pr_curve.png', 'codes.precision_at_k.png'):
    assert os.path.getsize(str(tmp_path / name)) > 1000


def test_custom_loss_example_plugs_in_through_its_import_path(monkeypatch):
  monkeypatch.syspath_prepend(os.path.join(lib.ROOT, 'examples'))
  fn = configuration.resolve_loss_fn('custom_loss.hinge_csd_total_loss')
  # The script runs as __main__ and the trainer imports it again by path:
  # an import must define no flags, or the second one clashes.
  assert 'epochs' not in flags.FLAGS
  rng = np.random.default_rng(0)
  labels = np.array([0, 2])
  aux = {'logits_cont': rng.uniform(-1, 1, (2, 3)),
         'logits_bin': rng.uniform(-1, 1, (2, 3)),
         'logits_concept': rng.uniform(-1, 1, (4, 2, 3)),
         'codes': rng.normal(size=(2, 8))}
  kwargs = configuration.loss_keywords(fn, lib.load_config().loss)
  # Four concepts on disjoint patches: no pair is similar, the hinge is 0.
  apart = dict(aux, concept_attn=np.tile(np.eye(4)[None], (2, 1, 1)))
  # All four on the same patch: every pair has cosine 1 -> 1 - HINGE each.
  same = dict(aux, concept_attn=np.ones((2, 4, 4)))
  kwargs['weight_csd'] = 1.0
  loss_apart, metrics = fn(apart, labels, **kwargs)
  loss_same, metrics_same = fn(same, labels, **kwargs)
  assert float(metrics['loss_csd']) == 0.0
  np.testing.assert_allclose(metrics_same['loss_csd'], 0.7, rtol=1e-6)
  np.testing.assert_allclose(loss_same - loss_apart, 0.7, rtol=1e-5)


# ------------------------------------------------------- real dataset layouts


def _one_step(config_file, overrides, workdir):
  """A one-step train_and_evaluate with the tiny model on another dataset."""
  # The real configs name a hub checkpoint; tests stay offline with the tiny
  # random CLIP of `lib.TINY` (hub loading is covered in test_hf_interop).
  config = lib.load_config({'train.max_steps': 1, 'model.clip': 'random',
                            **overrides}, config=config_file)
  return train.train_and_evaluate(config, workdir)


def test_one_step_on_cub_through_tfds_mock_data(tmp_path):
  with tfds.testing.mock_data(num_examples=8,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    results = _one_step('configs/cub.py', {}, str(tmp_path))
  assert results['dataset'] == 'cub' and results['step'] == 1
  assert results['num_classes'] == 200 and results['num_queries'] == 8
  assert np.isfinite(results['loss']) and 0 <= results['map_at_r'] <= 1


def _image(path, seed):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pixels = np.random.default_rng(seed).integers(0, 255, (40, 48, 3), np.uint8)
  Image.fromarray(pixels).save(path)


def test_one_step_on_a_generated_cub_folder(tmp_path):
  root = tmp_path / 'CUB_200_2011'
  classes = ['001.Black_footed_Albatross', '002.Laysan_Albatross',
             '003.Sooty_Albatross']
  rows = []
  for i in range(13):  # 4 per class: 3 train, 1 test; + 1 truncated (train).
    path = f'{classes[i % 3]}/img_{i}.jpg'
    _image(str(root / 'images' / path), i)
    rows.append((i + 1, path, i % 3 + 1, int(i < 9 or i == 12)))
  truncated = str(root / 'images' / rows[12][1])
  with open(truncated, 'r+b') as f:
    f.truncate(os.path.getsize(truncated) // 2)
  for name, lines in (
      ('images.txt', [f'{i} {p}' for i, p, _, _ in rows]),
      ('image_class_labels.txt', [f'{i} {c}' for i, _, c, _ in rows]),
      ('train_test_split.txt', [f'{i} {t}' for i, _, _, t in rows]),
      ('classes.txt', [f'{k + 1} {c}' for k, c in enumerate(classes)])):
    (root / name).write_text('\n'.join(lines) + '\n')
  results = _one_step('configs/cub.py', {'data.source': 'folders',
                                         'data.root': str(root),
                                         'data.on_corrupt': 'skip'},
                      str(tmp_path / 'run'))
  assert results['skipped_images'] == {'train': [truncated], 'test': []}
  assert results['num_classes'] == 3 and results['num_database'] == 9
  assert results['num_queries'] == 3 and np.isfinite(results['loss'])


def test_one_step_on_a_generated_cars_folder(tmp_path):
  root = tmp_path / 'stanford_cars'
  # 3 classes, 9 train images: the CUB folder run's shapes and steps per epoch,
  # so this run's train step is that one's compiled program (cached).
  names = ['AM General Hummer SUV 2000', 'Acura RL Sedan 2012',
           'Acura TL Sedan 2012']
  train_rows = [(f'{i:05d}.jpg', i % 3 + 1) for i in range(9)]
  test_rows = [(f'{i:05d}.jpg', i % 3 + 1) for i in range(3)]
  data_testlib.write_cars_mats(root, names, train_rows, test_rows)
  for folder, rows in (('cars_train', train_rows), ('cars_test', test_rows)):
    for k, (fname, _) in enumerate(rows):
      _image(str(root / folder / fname), 100 + k)
  results = _one_step('configs/cars.py', {'data.root': str(root)},
                      str(tmp_path / 'run'))
  assert results['dataset'] == 'cars' and results['num_classes'] == 3
  assert results['num_database'] == 9 and np.isfinite(results['loss'])
