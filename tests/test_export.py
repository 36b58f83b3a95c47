"""Export / import of a tiny trained run: ours, trained-only, the authors' layout, errors."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors import numpy as st

import train_testlib as lib
from concepthash_jax import exporting
from concepthash_jax import inference
from concepthash_jax.interop import official
from concepthash_jax.tools import export

OFFLINE_ENV = dict(os.environ, JAX_PLATFORMS='cpu', HF_HUB_OFFLINE='1',
                   TRANSFORMERS_OFFLINE='1')

# A fresh process: load the export with the network off, encode the test
# split's images with `encode`, score them against the database.
FRESH = """
import json, sys
import numpy as np
from concepthash_jax import evaluation, inference
h = inference.ConceptHasher.load(sys.argv[1])
codes = {}
for split in ('train', 'test'):
  ds = h.dataset(split)
  codes[split] = h.encode([ds[i]['image'] for i in range(len(ds))])['codes']
np.save(sys.argv[2], codes['test'])
print(json.dumps({'map_at_r': evaluation.map_at_r(
    codes['test'], h.dataset('test').labels, codes['train'],
    h.dataset('train').labels, ties='index')}))
"""


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  workdir, results = lib.trained_tiny_run(tmp_path_factory)
  hasher = inference.ConceptHasher.load(workdir)
  return hasher, results, hasher.encode_split('test')['codes']


@pytest.fixture(scope='module')
def exported(run, tmp_path_factory):
  """The export CLI's output (with the official-layout file), network off."""
  out = tmp_path_factory.mktemp('export') / 'full'
  cli = subprocess.run(
      [sys.executable, '-m', 'concepthash_jax.tools.export',
       f'--workdir={run[0].source}', f'--out={out}', '--official'],
      cwd=lib.ROOT, env=OFFLINE_ENV, capture_output=True, text=True,
      timeout=300, check=False)
  assert cli.returncode == 0, cli.stderr[-3000:]
  return str(out)


def test_cli_export_then_fresh_offline_process_gives_run_codes_and_map(
    run, exported, tmp_path):
  hasher, results, own_codes = run
  out = pathlib.Path(exported)
  assert sorted(os.listdir(out)) == sorted([
      '.concepthash_jax', 'centers.safetensors', 'class_names.json',
      'config.json', 'manifest.json', 'model.safetensors',
      'official.safetensors', 'results.json'])
  weights = st.load_file(str(out / 'model.safetensors'))
  assert not any('opt_state' in k or k.startswith('step') for k in weights)
  assert any(k.startswith('text_model/') for k in weights)
  centers = st.load_file(str(out / 'centers.safetensors'))
  np.testing.assert_array_equal(centers['class_centers'], hasher.class_centers)
  codes_path = str(tmp_path / 'codes.npy')
  fresh = subprocess.run([sys.executable, '-c', FRESH, str(out), codes_path],
                         cwd=lib.ROOT, env=OFFLINE_ENV, capture_output=True,
                         text=True, timeout=300, check=False)
  assert fresh.returncode == 0, fresh.stderr[-3000:]
  np.testing.assert_array_equal(np.load(codes_path), own_codes)
  assert json.loads(fresh.stdout.splitlines()[-1])['map_at_r'] == results['map_at_r']


def test_official_layout_round_trip_gives_identical_codes(run, exported, tmp_path):
  hasher, _, own_codes = run
  path = os.path.join(exported, exporting.OFFICIAL_FILE)
  state = st.load_file(path)
  template = inference.abstract_variables(hasher.model, hasher.image_size)
  mapped = {row.official for row in official.official_table(template)}
  # Every name the authors' module holds: what we map plus what it ignores.
  assert set(state) == mapped | set(official.IGNORED_OFFICIAL)
  assert state['hash_bn.running_mean'].shape == (hasher.nbit,)
  out = str(tmp_path / 'from_official')
  export.import_official(path, exported, out)
  back = inference.ConceptHasher.load(out)
  np.testing.assert_array_equal(back.encode_split('test')['codes'], own_codes)
  np.testing.assert_array_equal(
      back.encode_text(['a photo of a bird'])['codes'],
      hasher.encode_text(['a photo of a bird'])['codes'])
  del state['hash_fc.weight']
  st.save_file(state, str(tmp_path / 'partial.safetensors'))
  with pytest.raises(exporting.ExportError, match='partial.safetensors.*hash_fc'):
    export.import_official(str(tmp_path / 'partial.safetensors'), exported,
                           str(tmp_path / 'never'))
  assert not os.path.exists(tmp_path / 'never')


def test_trained_only_export_names_the_base_clip(run, exported, tmp_path):
  hasher, _, own_codes = run
  out = str(tmp_path / 'trained')
  meta = export.export_hasher(hasher, out, trained_only=True)
  assert meta['trained_only'] and meta['base_clip'] == 'random'
  weights = st.load_file(os.path.join(out, exporting.WEIGHTS_FILE))
  full = st.load_file(os.path.join(exported, exporting.WEIGHTS_FILE))
  frozen = 'params/vision_model/encoder/layers/0/self_attn/q_proj/kernel'
  assert frozen in full and frozen not in weights
  assert not any(k.startswith('text_model/') for k in weights)
  assert len(weights) < len(full)
  # The frozen tower comes back from the base CLIP ('random': regenerated by seed).
  np.testing.assert_array_equal(
      inference.ConceptHasher.load(out).encode_split('test')['codes'], own_codes)


def test_missing_or_corrupt_export_is_one_clear_error(exported, tmp_path):
  broken = tmp_path / 'broken'
  shutil.copytree(exported, broken)
  (broken / 'model.safetensors').write_bytes(b'\x00' * 20)  # Truncated copy.
  with pytest.raises(exporting.ExportError,
                     match='model.safetensors has 20 bytes.*re-export'):
    inference.ConceptHasher.load(str(broken))
  # An export from before manifests: each reader names its file.
  os.remove(broken / exporting.MANIFEST_FILE)
  os.remove(broken / '.concepthash_jax')
  with pytest.raises(exporting.ExportError,
                     match='model.safetensors cannot be read.*re-export'):
    inference.ConceptHasher.load(str(broken))
  shutil.copy(os.path.join(exported, 'model.safetensors'), broken)
  os.remove(broken / 'class_names.json')
  with pytest.raises(exporting.ExportError, match='class_names.json is missing'):
    inference.ConceptHasher.load(str(broken))
  (broken / 'class_names.json').write_text('[]')
  (broken / 'config.json').write_text('{"format": "something else"}')
  with pytest.raises(exporting.ExportError, match='not a concepthash_jax export'):
    inference.ConceptHasher.load(str(broken))
  cli = subprocess.run(
      [sys.executable, '-m', 'concepthash_jax.tools.export',
       f'--workdir={tmp_path / "nowhere"}', f'--out={tmp_path / "out"}'],
      cwd=lib.ROOT, env=OFFLINE_ENV, capture_output=True, text=True,
      timeout=120, check=False)
  assert cli.returncode == 2
  assert cli.stderr.strip().splitlines()[-1].startswith('FATAL: ')
  assert 'neither a training workdir' in cli.stderr
