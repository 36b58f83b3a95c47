"""Tests for interop/hf.py: loading, strictness, offline errors, tokenizers, text features."""
import json
import os
import shutil

import numpy as np
import jax
import ml_collections
import pytest
from safetensors import numpy as safetensors_numpy

from concepthash_jax import errors
from concepthash_jax.interop import hf
from concepthash_jax.models import clip

TINY = os.path.join(os.path.dirname(__file__), 'data', 'tiny_clip')


@pytest.fixture(scope='module')
def tiny():
  """(config, params) of tests/data/tiny_clip."""
  return hf.load_clip(TINY)


def _state_dict():
  return safetensors_numpy.load_file(os.path.join(TINY, hf.WEIGHTS_FILE))


def _write_checkpoint(directory, state_dict):
  os.makedirs(directory, exist_ok=True)
  shutil.copy(os.path.join(TINY, hf.CONFIG_FILE), directory)
  safetensors_numpy.save_file(state_dict, os.path.join(directory, hf.WEIGHTS_FILE))
  return str(directory)


def test_load_clip_uses_transposes_only(tiny):
  config, params = tiny
  sd = _state_dict()
  v = params['vision_model']
  np.testing.assert_array_equal(v['encoder']['layers']['0']['self_attn']['q_proj']['kernel'],
                                sd['vision_model.encoder.layers.0.self_attn.q_proj.weight'].T)
  np.testing.assert_array_equal(v['embeddings']['patch_embedding']['kernel'],
                                sd['vision_model.embeddings.patch_embedding.weight']
                                .transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(v['pre_layrnorm']['scale'], sd['vision_model.pre_layrnorm.weight'])
  np.testing.assert_array_equal(params['text_projection']['kernel'], sd['text_projection.weight'].T)
  assert params['logit_scale'].shape == ()
  assert config.projection_dim == 24 and config.vision_config.hidden_size == 48


def test_state_dict_round_trip(tiny):
  _, params = tiny
  sd = _state_dict()
  back = hf.state_dict_from_params(params)
  assert set(back) == set(sd)
  for name in sd:
    np.testing.assert_array_equal(back[name], sd[name], err_msg=name)


def _load_changed(directory, changes):
  """hf.load_clip of tiny_clip with `changes`: name -> tensor, or None to drop."""
  sd = _state_dict()
  for name, tensor in changes.items():
    if tensor is None:
      del sd[name]
    else:
      sd[name] = tensor
  return hf.load_clip(_write_checkpoint(directory, sd))


@pytest.mark.parametrize('changes,error', [
    ({'vision_model.encoder.layers.2.mlp.fc1.weight':
          np.zeros((96, 48), np.float32)},
     r'left unused.*layers\.2\.mlp\.fc1\.weight'),
    ({'text_model.final_layer_norm.bias': None},
     r'without a tensor.*final_layer_norm\.bias'),
    ({'visual_projection.weight': np.zeros((24, 47), np.float32)},
     r'shape mismatches.*visual_projection'),
], ids=['unused', 'missing', 'bad_shape'])
def test_checkpoint_mismatch_fails_loudly(tmp_path, changes, error):
  with pytest.raises(ValueError, match=error):
    _load_changed(tmp_path / 'changed', changes)


def test_position_ids_buffer_is_accepted(tmp_path):
  _, params = _load_changed(
      tmp_path / 'buffers',
      {'vision_model.embeddings.position_ids': np.arange(17)[None]})
  assert 'position_ids' not in str(jax.tree_util.tree_structure(params))


def test_missing_local_directory_error_names_path_and_fix(tmp_path):
  missing = str(tmp_path / 'no_such_clip')
  with pytest.raises(FileNotFoundError) as err:
    hf.load_clip(missing)
  assert missing in str(err.value) and 'config.json' in str(err.value)
  assert 'local directory' in str(err.value)


def test_offline_hub_name_error_names_what_was_tried(tmp_path, monkeypatch):
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf_home'))
  monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'hf_home' / 'hub'))
  with pytest.raises(FileNotFoundError) as err:
    hf.load_clip('no-such-org/no-such-clip-model')
  message = str(err.value)
  assert 'no-such-org/no-such-clip-model' in message
  assert 'hub' in message and 'offline=True' in message
  assert 'local directory' in message and 'model.safetensors' in message


def _random_cfg(**overrides):
  cfg = dict(image_size=32, patch_size=8, vision_width=16, vision_layers=1, vision_heads=2,
             vision_mlp=32, projection_dim=8, text_width=16, text_layers=1, text_heads=2,
             text_mlp=32, vocab_size=300, max_text_len=12)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def test_random_clip_config_and_init_round_trip():
  config = hf.random_clip_config(_random_cfg())
  assert config.text_config.eos_token_id == 2
  assert config.vision_config.projection_dim == 8 and config.projection_dim == 8
  params = hf.init_clip_params(config, jax.random.PRNGKey(0))
  assert params['vision_model']['embeddings']['position_embedding']['embedding'].shape == (17, 16)
  assert params['text_model']['embeddings']['token_embedding']['embedding'].shape == (300, 16)
  again = hf.params_from_state_dict(config, hf.state_dict_from_params(params))
  jax.tree.map(np.testing.assert_array_equal, again, jax.tree.map(np.asarray, params))


def test_fallback_tokenizer_is_deterministic_and_fits_eos_rule():
  tok = hf.get_tokenizer('random', hf.random_clip_config(_random_cfg()))
  assert isinstance(tok, hf.ByteTokenizer)
  texts = ['A photo of a Cardinal', 'a photo of a cardinal', 'x', 'a very long name ' * 3]
  ids, mask = tok(texts)
  ids2, mask2 = tok(texts)
  np.testing.assert_array_equal(ids, ids2)
  np.testing.assert_array_equal(mask, mask2)
  assert ids.shape == mask.shape == (4, 12) and ids.dtype == np.int32
  np.testing.assert_array_equal(ids[0], ids[1])  # Lower-cased.
  assert not np.array_equal(ids[0], ids[2])
  np.testing.assert_array_equal(mask[2], [1, 1, 1] + [0] * 9)
  assert ids[2, 0] == 298 and ids[2, 2] == 299 and ids.max() == 299
  assert ids[3, -1] == 299 and mask[3].all()  # Truncation keeps EOS.
  eos = np.asarray(clip.eos_positions(ids, 2))
  np.testing.assert_array_equal(eos, mask.sum(-1) - 1)
  np.testing.assert_array_equal(eos, np.asarray(clip.eos_positions(ids, 299)))


def test_tokenizer_for_directory_without_tokenizer_files_uses_its_config():
  tok = hf.get_tokenizer(TINY)
  assert isinstance(tok, hf.ByteTokenizer)
  assert (tok.vocab_size, tok.max_length) == (99, 16)


def test_text_features_match_tower_and_ignore_batching(tiny):
  config, params = tiny
  tok = hf.get_tokenizer(TINY, config)
  texts = [f'a photo of a bird {i}' for i in range(5)]
  feats = hf.text_features(config, params['text_model'], texts, tok, batch_size=2)
  assert feats.shape == (5, 32) and feats.dtype == np.float32
  np.testing.assert_allclose(
      feats, hf.text_features(config, params['text_model'], texts, tok), atol=1e-6)
  ids, mask = tok(texts)
  module = hf.text_module_from_config(config.text_config)
  last, _ = module.apply({'params': params['text_model']}, ids, mask, eos_token_id=2)
  np.testing.assert_allclose(feats, np.asarray(last)[np.arange(5), mask.sum(-1) - 1],
                             atol=1e-5)
  # Padding does not leak into the pooled state: the unpadded sequence pools the same.
  n = int(mask[0].sum())
  _, aux = module.apply({'params': params['text_model']}, ids[:1, :n], eos_token_id=2)
  np.testing.assert_allclose(aux['pooler_output'], feats[:1], atol=1e-5)


def test_hf_tokenizer_from_directory_pads_to_max_positions(tmp_path):
  # A minimal byte-level CLIP vocabulary (no merges) is enough to exercise the HF path.
  from transformers.convert_slow_tokenizer import bytes_to_unicode  # pylint: disable=g-import-not-at-top
  chars = list(bytes_to_unicode().values())
  vocab = {c: i for i, c in enumerate(chars + [c + '</w>' for c in chars])}
  vocab.update({'<|startoftext|>': len(vocab), '<|endoftext|>': len(vocab) + 1})
  (tmp_path / 'vocab.json').write_text(json.dumps(vocab))
  (tmp_path / 'merges.txt').write_text('#version: 0.2\n')
  shutil.copy(os.path.join(TINY, hf.CONFIG_FILE), tmp_path)
  tok = hf.get_tokenizer(str(tmp_path))
  assert isinstance(tok, hf.HFTokenizer)
  ids, mask = tok(['A photo', 'ab'])
  assert ids.shape == mask.shape == (2, 16) and ids.dtype == mask.dtype == np.int32
  eos = vocab['<|endoftext|>']
  assert ids[0, 0] == vocab['<|startoftext|>'] and ids[0, 1] == vocab['a</w>']
  np.testing.assert_array_equal(mask.sum(-1), [8, 4])
  # CLIP pads with EOS; both pooling rules find the first EOS.
  np.testing.assert_array_equal(clip.eos_positions(ids, 2), [7, 3])
  np.testing.assert_array_equal(clip.eos_positions(ids, eos), [7, 3])


def test_torn_or_mismatched_clip_files_name_the_file(tmp_path):
  directory = _write_checkpoint(tmp_path / 'clip', _state_dict())
  weights = os.path.join(directory, hf.WEIGHTS_FILE)
  with open(weights, 'r+b') as f:
    f.truncate(os.path.getsize(weights) // 2)
  with pytest.raises(errors.DataError,
                     match=f'{weights} is not a complete safetensors file'):
    hf.load_clip(directory)
  with open(weights, 'wb') as f:
    f.write(b'\x05')  # Shorter than the 8-byte header length.
  with pytest.raises(errors.DataError, match='not a complete safetensors'):
    hf.load_clip(directory)
  sd = _state_dict()
  sd.pop('vision_model.post_layernorm.bias')
  _write_checkpoint(tmp_path / 'clip', sd)
  with pytest.raises(errors.DataError, match=f'{weights} does not fit .*'
                     'config.json: CLIP checkpoint does not match'):
    hf.load_clip(directory)
  with open(os.path.join(directory, hf.CONFIG_FILE), 'w') as f:
    f.write('{"vision_config": ')
  with pytest.raises(errors.DataError, match='config.json is not a readable '
                     'CLIP config.json'):
    hf.load_clip(directory)
