"""tools/parity.py against the reference goldens (docs/method.md §6.2). Never skipped.

Tolerances (docs/method.md §6.2): 1e-4 absolute on outputs, losses, buffers, text/vision features and
SGD results; 1e-3 relative on gradients, where for a tensor
  rel(ours, golden) = max|ours - golden| / max(max|golden|, 1e-2).
The 1e-2 floor makes a gradient that is zero in exact arithmetic (e.g. grad/hash_pe:
the code BatchNorm removes any per-concept constant shift, so both sides hold float32
noise ~1e-6) count as 1e-5 absolute rather than as a relative error of noise.
"""
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from concepthash_jax import losses
from concepthash_jax import models
from concepthash_jax import optim
from concepthash_jax.interop import hf
from concepthash_jax.interop import official
from concepthash_jax.models import concepthash
from concepthash_jax.tools import parity

DATA = os.path.join(os.path.dirname(__file__), 'data')
CLIP_DIR = os.path.join(DATA, 'tiny_clip')
OFFICIAL = os.path.join(DATA, 'official_tiny.npz')
HF_GOLDEN = os.path.join(DATA, 'hf_clip_tiny.npz')
ATOL = 1e-4
GRAD_RTOL = 1e-3
GRAD_FLOOR = 1e-2


def load(path):
  with np.load(path) as data:
    return {k: data[k] for k in data.files}


def grad_rel_error(ours, golden):
  """max|ours - golden| / max(max|golden|, GRAD_FLOOR) (see module docstring)."""
  diff = np.abs(ours.astype(np.float64) - golden.astype(np.float64)).max()
  return diff / max(np.abs(golden).max(), GRAD_FLOOR)


@pytest.fixture(scope='module')
def clip():
  return hf.load_clip(CLIP_DIR)


@pytest.fixture(scope='module')
def official_run(tmp_path_factory):
  out = tmp_path_factory.mktemp('parity') / 'official_out.npz'
  assert parity.main([OFFICIAL, '--clip', CLIP_DIR, '--out', str(out)]) == 0
  return load(OFFICIAL), load(str(out))


@pytest.fixture(scope='module')
def hf_run(tmp_path_factory):
  out = tmp_path_factory.mktemp('parity') / 'hf_out.npz'
  # The CLI as users run it, in a fresh interpreter.
  result = subprocess.run(
      [sys.executable, '-m', 'concepthash_jax.tools.parity', HF_GOLDEN, '--clip', CLIP_DIR,
       '--out', str(out)], capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 0, result.stderr[-3000:]
  return load(HF_GOLDEN), load(str(out))


def expected_official_keys(golden):
  """Every key docs/method.md §6.2 lists for an official golden."""
  keys = {k for k in golden if k.startswith(('out/', 'loss/', 'grad/', 'sgd/'))}
  keys |= {f'buffer/{name}' for name in parity.BN_BUFFERS}
  return keys | {'text/pooler'}


def test_official_writes_exactly_the_golden_keys(official_run):
  golden, ours = official_run
  assert set(ours) == expected_official_keys(golden)
  for key in ours:
    golden_key = 'input/text_pooler' if key == 'text/pooler' else key
    assert ours[key].shape == golden[golden_key].shape, key


@pytest.mark.parametrize('group', ['out/', 'loss/', 'buffer/', 'sgd/'])
def test_official_values_within_1e4(official_run, group):
  golden, ours = official_run
  keys = sorted(k for k in ours if k.startswith(group))
  assert keys
  for key in keys:
    np.testing.assert_allclose(ours[key], golden[key], atol=ATOL, rtol=0, err_msg=key)


def test_official_gradients_within_relative_1e3(official_run):
  golden, ours = official_run
  keys = sorted(k for k in ours if k.startswith('grad/'))
  assert len(keys) == len([k for k in golden if k.startswith('grad/')])
  errors = {k: grad_rel_error(ours[k], golden[k]) for k in keys}
  worst = max(errors, key=errors.get)
  assert errors[worst] <= GRAD_RTOL, (worst, errors[worst])


def test_official_text_pooler_within_1e4(official_run):
  golden, ours = official_run
  np.testing.assert_allclose(ours['text/pooler'], golden['input/text_pooler'], atol=ATOL, rtol=0)


def test_hf_golden_every_key_within_1e4(hf_run):
  golden, ours = hf_run
  wanted = {k for k in golden if k.startswith(('vision/', 'text/'))}
  assert set(ours) == wanted
  for key in sorted(wanted):
    np.testing.assert_allclose(ours[key], golden[key], atol=ATOL, rtol=0, err_msg=key)


def test_official_import_export_round_trip_and_errors(clip):
  golden = load(OFFICIAL)
  state = parity.official_state_dict(golden)
  model, variables, _ = parity.build_official(golden, clip[0])
  exported = {}
  for collection, tree in variables.items():
    exported.update(official.export_official(tree, collection=collection))
  mapped = set(state) - set(official.IGNORED_OFFICIAL)
  assert set(exported) == mapped
  for name in mapped:
    np.testing.assert_array_equal(exported[name], state[name], err_msg=name)

  template = jax.eval_shape(lambda: variables)
  with pytest.raises(ValueError, match='missing.*hash_attention.sa.in_proj_weight'):
    official.import_official({k: v for k, v in state.items()
                              if k != 'hash_attention.sa.in_proj_weight'}, template)
  with pytest.raises(ValueError, match='unused.*surprise'):
    official.import_official(dict(state, surprise=np.zeros(3)), template)
  with pytest.raises(ValueError, match='shape'):
    official.import_official(dict(state, **{'hash_fc.weight': np.zeros((3, 3))}), template)
  assert model.num_concepts == golden['param/hash_pe'].shape[1]


def test_parity_rejects_unknown_golden(tmp_path):
  path = tmp_path / 'bogus.npz'
  np.savez(path, something=np.zeros(2))
  with pytest.raises(ValueError, match='neither an official golden'):
    parity.main([str(path), '--clip', CLIP_DIR, '--out', str(tmp_path / 'o.npz')])


# The real golden covers the released layout; these cover the other official layouts.
SYNTHETIC_VARIANTS = [
    dict(num_concepts=2, nbit=8, generator_heads=2, adapter_dim=8, concept_tokens='generated',
         code_norm='batchnorm', center_type='learnable', center_projection='mlp',
         concept_embedding='separate'),
    dict(num_concepts=3, nbit=12, generator_heads=8, adapter_dim=0, concept_tokens='learned',
         code_norm='none', center_type='language', center_projection='linear',
         concept_embedding='shared'),
]


@pytest.mark.parametrize('variant', SYNTHETIC_VARIANTS, ids=lambda v: v['concept_tokens'] + '-'
                         + v['center_type'] + '-' + v['center_projection'])
def test_official_golden_of_other_sizes_runs_consistently(variant, clip):
  """Sizes come from the arrays: a golden exported from our own random model round-trips."""
  config, clip_params = clip
  num_classes, batch = 3, 4
  cfg = ml_collections.ConfigDict(dict(variant, dropout=0.0, center_input='raw',
                                       dtype='float32'))
  model = models.build_model(cfg, config, num_classes)
  rng = np.random.default_rng(0)
  size = config.vision_config.image_size
  pixels = rng.normal(size=(batch, 3, size, size)).astype(np.float32)
  # Jitted: one compile, where eager init compiles each op of this variant's new shapes.
  variables = jax.jit(functools.partial(concepthash.init_variables, model))(
      clip_params, jax.random.PRNGKey(2),
      rng.normal(size=(num_classes, config.text_config.hidden_size)).astype(np.float32),
      jnp.asarray(pixels.transpose(0, 2, 3, 1)))
  # Break the zero-init symmetry of adapters so their gradients are non-trivial.
  variables = jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.normal(size=x.shape).astype(
      np.float32), variables)
  golden = {'input/pixels': pixels, 'input/labels': np.arange(batch) % num_classes,
            'case/upt_heads': np.int64(variant['generator_heads']), 'case/margin': 0.2,
            'case/scale': 8.0, 'case/weight_cont': 1.0, 'case/weight_bin': 1.0,
            'case/weight_concept': 1.0, 'case/weight_attn_div': 1.0, 'case/dropout': 0.0,
            'case/sgd_steps': np.int64(1), 'case/lr': 0.01, 'case/momentum': 0.9,
            'case/weight_decay': 5e-4}
  golden.update({f'param/{k}': v for k, v in
                 official.export_official(variables['params']).items()})
  for collection in ('batch_stats', 'centers'):
    if collection in variables:
      golden.update({f'buffer/{k}': v for k, v in official.export_official(
          variables[collection], collection=collection).items()})
  if variant['center_type'] == 'learnable':
    assert 'param/center' in golden
  ours = parity.run_official(golden, config, clip_params)

  params = variables['params']
  state = {k: v for k, v in variables.items() if k != 'params'}
  kw = dict(scale=8.0, margin=0.2, concept_margin='first', weight_cont=1.0, weight_bin=1.0,
            weight_concept=1.0, weight_csd=1.0)

  def loss_fn(params):
    (_, aux), _ = model.apply({'params': params, **state}, jnp.asarray(
        pixels.transpose(0, 2, 3, 1)), train=True, mutable=['batch_stats'])
    return losses.total_loss(aux, golden['input/labels'], **kw)[0], aux

  (loss, aux), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  np.testing.assert_allclose(ours['loss/total'], loss, rtol=1e-5)
  np.testing.assert_allclose(ours['out/codes_train'], aux['codes'], atol=ATOL)
  assert ours['out/logits_concept'].shape == (variant['num_concepts'], batch, num_classes)
  trainable, _ = optim.partition_params(grads, concepthash.trainable_mask(params))
  want = official.export_official(trainable)
  assert {k[len('grad/'):] for k in ours if k.startswith('grad/')} == set(want)
  for name, value in want.items():
    assert grad_rel_error(ours[f'grad/{name}'], value) < GRAD_RTOL, name
  assert {k[len('sgd/param/'):] for k in ours if k.startswith('sgd/param/')} == set(want)


def test_parity_never_writes_over_a_file_it_did_not_write(tmp_path, capsys):
  theirs = tmp_path / 'results.npz'
  np.savez(theirs, mine=np.arange(3))
  before = theirs.read_bytes()
  assert parity.main([OFFICIAL, '--clip', CLIP_DIR, '--out', str(theirs)]) == 2
  assert 'FATAL: ' in capsys.readouterr().err
  assert theirs.read_bytes() == before
