"""HF CLIP checkpoints (config.json + model.safetensors) -> our Flax CLIP parameters.

Torch-free: the config is read by transformers.CLIPConfig, the weights by
`safetensors.numpy`. Our parameter names are HF Flax CLIP's, so the conversion is one rule
per leaf kind (`_TORCH_LEAF`): Dense kernel = weight.T, conv kernel = OIHW -> HWIO,
LayerNorm scale = weight, embedding = weight. Loading starts from the tree our modules
would initialise and fails if a tensor is left over or a parameter finds none (the
big_vision `load` idea).
"""
import os
from typing import Callable, Optional, Sequence

import numpy as np
import jax
import jax.numpy as jnp
from flax import traverse_util
import transformers

from concepthash_jax import errors
from concepthash_jax.models import clip as clip_lib

CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'
_TOWERS = ('vision_model', 'text_model')
# Non-persistent arange buffers some older checkpoints carry; not parameters.
_BUFFER_SUFFIX = 'embeddings.position_ids'


# ----------------------------------------------------------------- modules from a config


def vision_module_from_config(vision_config, adapter_dim: Optional[int] = None,
                              dtype=jnp.float32, **kwargs) -> clip_lib.CLIPVisionTransformer:
  """CLIPVisionTransformer with a HF CLIPVisionConfig's sizes (kwargs: remat, dropouts)."""
  return clip_lib.CLIPVisionTransformer(
      hidden_size=vision_config.hidden_size, intermediate_size=vision_config.intermediate_size,
      num_layers=vision_config.num_hidden_layers, num_heads=vision_config.num_attention_heads,
      patch_size=vision_config.patch_size, image_size=vision_config.image_size,
      layer_norm_eps=vision_config.layer_norm_eps, adapter_dim=adapter_dim, dtype=dtype,
      hidden_act=vision_config.hidden_act, **kwargs)


def text_module_from_config(text_config, dtype=jnp.float32,
                            **kwargs) -> clip_lib.CLIPTextTransformer:
  """CLIPTextTransformer with a HF CLIPTextConfig's sizes."""
  return clip_lib.CLIPTextTransformer(
      hidden_size=text_config.hidden_size, intermediate_size=text_config.intermediate_size,
      num_layers=text_config.num_hidden_layers, num_heads=text_config.num_attention_heads,
      vocab_size=text_config.vocab_size,
      max_position_embeddings=text_config.max_position_embeddings,
      layer_norm_eps=text_config.layer_norm_eps, hidden_act=text_config.hidden_act,
      dtype=dtype, **kwargs)


def random_clip_config(random_clip_cfg) -> transformers.CLIPConfig:
  """CLIPConfig from configs/base.py's `model.random_clip` keys (for model.clip='random').

  The text tower uses the legacy eos_token_id=2 rule (pool at the highest id), which the
  built-in fallback tokenizer satisfies by giving EOS the highest id (vocab_size - 1).
  """
  c = random_clip_cfg
  return transformers.CLIPConfig(
      projection_dim=c.projection_dim,
      text_config=dict(
          hidden_size=c.text_width, intermediate_size=c.text_mlp,
          num_hidden_layers=c.text_layers, num_attention_heads=c.text_heads,
          vocab_size=c.vocab_size, max_position_embeddings=c.max_text_len,
          projection_dim=c.projection_dim, eos_token_id=2, bos_token_id=c.vocab_size - 2,
          pad_token_id=0),
      vision_config=dict(
          hidden_size=c.vision_width, intermediate_size=c.vision_mlp,
          num_hidden_layers=c.vision_layers, num_attention_heads=c.vision_heads,
          image_size=c.image_size, patch_size=c.patch_size, projection_dim=c.projection_dim))


def _shape_tree(clip_config) -> dict:
  """Shapes of the full CLIP parameter tree ({vision_model, text_model, projections, ...})."""
  return jax.eval_shape(lambda: init_clip_params(clip_config, jax.random.PRNGKey(0)))


def init_clip_params(clip_config, rng) -> dict:
  """Random parameters of the whole CLIP (plain towers, no adapters).

  Args:
    clip_config: transformers CLIPConfig.
    rng: PRNGKey.

  Returns:
    {'vision_model', 'text_model', 'visual_projection': {'kernel': (Dv, P)},
     'text_projection': {'kernel': (T, P)}, 'logit_scale': ()} of float32
    numpy arrays.
  """
  # On the host, as numpy like weights read from a checkpoint: XLA:GPU compiles
  # this one-off init far more slowly than XLA:CPU; callers place the result on
  # their mesh.
  cpu = jax.local_devices(backend='cpu')[0]
  with jax.default_device(cpu):
    params = jax.jit(lambda key: _init_clip_params(clip_config, key))(
        jax.device_put(rng, cpu))
  return jax.device_get(params)


def _init_clip_params(clip_config, rng) -> dict:
  """Unjitted body of init_clip_params."""
  vc, tc = clip_config.vision_config, clip_config.text_config
  rv, rt, rp1, rp2 = jax.random.split(rng, 4)
  pixels = jnp.zeros((1, vc.image_size, vc.image_size, vc.num_channels), jnp.float32)
  ids = jnp.zeros((1, tc.max_position_embeddings), jnp.int32)
  vision = vision_module_from_config(vc).init(rv, pixels)['params']
  text = text_module_from_config(tc).init(rt, ids, eos_token_id=tc.eos_token_id)['params']
  dim = clip_config.projection_dim
  proj_init = jax.nn.initializers.lecun_normal()
  return {
      'vision_model': vision, 'text_model': text,
      'visual_projection': {'kernel': proj_init(rp1, (vc.hidden_size, dim))},
      'text_projection': {'kernel': proj_init(rp2, (tc.hidden_size, dim))},
      'logit_scale': jnp.asarray(clip_config.logit_scale_init_value, jnp.float32)}


# ------------------------------------------------------------------ checkpoint conversion


def torch_name(path: Sequence[str]) -> str:
  """HF PyTorch state-dict name of one of our parameter paths."""
  *scope, leaf = path
  if leaf == 'kernel' or leaf == 'scale' or leaf == 'embedding':
    leaf = 'weight'
  return '.'.join(list(scope) + [leaf])


def from_torch_layout(path: Sequence[str], tensor: np.ndarray) -> np.ndarray:
  """A torch tensor in our layout (Dense kernel = W.T, conv kernel OIHW -> HWIO)."""
  if path[-1] == 'kernel':
    if tensor.ndim == 2:
      return tensor.T
    if tensor.ndim == 4:
      return tensor.transpose(2, 3, 1, 0)
  return tensor


def to_torch_layout(path: Sequence[str], value: np.ndarray) -> np.ndarray:
  """Inverse of from_torch_layout."""
  if path[-1] == 'kernel' and value.ndim == 4:
    return value.transpose(3, 2, 0, 1)
  return from_torch_layout(path, value)  # 2-D transpose is its own inverse.


def state_dict_from_params(params: dict) -> dict:
  """HF PyTorch-named numpy state dict of our CLIP parameter tree (inverse of the load)."""
  return {torch_name(path): to_torch_layout(path, np.asarray(value, np.float32))
          for path, value in traverse_util.flatten_dict(params).items()}


def params_from_state_dict(clip_config, state_dict: dict) -> dict:
  """Our CLIP parameter tree from a HF PyTorch-named numpy state dict.

  Args:
    clip_config: transformers CLIPConfig the checkpoint belongs to.
    state_dict: torch name -> numpy array.

  Returns:
    init_clip_params-structured tree of float32 numpy arrays.

  Raises:
    ValueError: a tensor is left unused, a parameter has no tensor, or a shape mismatches.
  """
  unused = {k for k in state_dict if not k.endswith(_BUFFER_SUFFIX)}
  flat, missing, bad = {}, [], []
  for path, shape in traverse_util.flatten_dict(_shape_tree(clip_config)).items():
    name = torch_name(path)
    if name not in state_dict:
      missing.append(name)
      continue
    unused.discard(name)
    value = from_torch_layout(path, np.asarray(state_dict[name], np.float32))
    if value.shape != shape.shape:
      bad.append(f'{name}: checkpoint {value.shape} vs model {shape.shape}')
    flat[path] = value
  if missing or unused or bad:
    raise ValueError('CLIP checkpoint does not match the config:'
                     f'\n  parameters without a tensor: {sorted(missing)}'
                     f'\n  tensors left unused: {sorted(unused)}'
                     f'\n  shape mismatches: {bad}')
  return traverse_util.unflatten_dict(flat)


def _is_local(name_or_path: str) -> bool:
  """Whether to treat the name as a directory (exists, or looks like a path)."""
  return (os.path.isdir(name_or_path) or name_or_path.startswith(('/', '.', '~'))
          or name_or_path.count('/') != 1)


def _hub_offline() -> bool:
  """HF_HUB_OFFLINE as huggingface_hub reads it, but at call time."""
  return os.environ.get('HF_HUB_OFFLINE', '0').upper() in ('1', 'ON', 'YES', 'TRUE')


def resolve_clip_files(name_or_path: str) -> tuple:
  """(config.json path, model.safetensors path) for a local directory or a hub name."""
  how_to = (f'Pass a local directory holding {CONFIG_FILE} + {WEIGHTS_FILE} '
            "(e.g. --config.model.clip=/path/to/clip), or model.clip='random' to run offline.")
  if _is_local(name_or_path):
    directory = os.path.expanduser(name_or_path)
    files = [os.path.join(directory, f) for f in (CONFIG_FILE, WEIGHTS_FILE)]
    absent = [f for f in files if not os.path.isfile(f)]
    if absent:
      raise errors.MissingFileError(f'CLIP {name_or_path!r}: tried local directory {directory!r}, '
                              f'missing {absent}. {how_to}')
    return tuple(files)
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  try:
    return tuple(huggingface_hub.hf_hub_download(name_or_path, f,
                                                 local_files_only=_hub_offline())
                 for f in (CONFIG_FILE, WEIGHTS_FILE))
  except Exception as e:  # pylint: disable=broad-except
    raise errors.MissingFileError(
        f'CLIP {name_or_path!r}: no local directory of that name, and downloading '
        f'{CONFIG_FILE} + {WEIGHTS_FILE} from the Hugging Face hub failed '
        f'(offline={_hub_offline()}): {type(e).__name__}: {e}. {how_to}') from e


def load_clip(name_or_path: str) -> tuple:
  """Loads a HF CLIP checkpoint without torch.

  Args:
    name_or_path: local directory with config.json + model.safetensors, or a hub name
      (e.g. 'openai/clip-vit-base-patch32'; uses the HF cache, HF_HUB_OFFLINE honoured).

  Returns:
    (transformers.CLIPConfig, params) with params as init_clip_params, numpy float32.

  Raises:
    FileNotFoundError: files unavailable (message names what was tried and the fix).
    ValueError: checkpoint and config disagree.
  """
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  config_path, weights_path = resolve_clip_files(name_or_path)
  try:
    clip_config = transformers.CLIPConfig.from_json_file(config_path)
  except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError.
    raise errors.DataError(f'{config_path} is not a readable CLIP config.json '
                           f'({type(e).__name__}: {e}); {_REFETCH}') from e
  try:
    state_dict = safetensors_numpy.load_file(weights_path)
  except Exception as e:  # pylint: disable=broad-except
    # safetensors raises its own SafetensorError (or OSError) on a torn file.
    raise errors.DataError(
        f'{weights_path} is not a complete safetensors file ({type(e).__name__}: '
        f'{e}; size {os.path.getsize(weights_path)} bytes); {_REFETCH}') from e
  try:
    return clip_config, params_from_state_dict(clip_config, state_dict)
  except ValueError as e:
    raise errors.DataError(f'{weights_path} does not fit {config_path}: {e}') from e


_REFETCH = ('copy or download it again (a hub download: delete it from the '
            'Hugging Face cache, ~/.cache/huggingface/hub, and rerun)')


# ------------------------------------------------------------------------------ tokenizer


class ByteTokenizer:
  """Deterministic built-in tokenizer, meaningful only for randomly initialised CLIPs.

  Lower-cases, maps UTF-8 bytes to ids 1..vocab-3 (modulo), wraps in BOS = vocab-2 and
  EOS = vocab-1, pads with 0 to max_length. EOS is the highest id, so the legacy
  (eos_token_id == 2, argmax) pooling rule finds it, as does first-occurrence of vocab-1.
  """

  def __init__(self, vocab_size: int = 49408, max_length: int = 77):
    if vocab_size < 4 or max_length < 2:
      raise ValueError(f'ByteTokenizer needs vocab_size >= 4, max_length >= 2; '
                       f'got {vocab_size}, {max_length}')
    self.vocab_size, self.max_length = vocab_size, max_length
    self.bos_token_id, self.eos_token_id, self.pad_token_id = vocab_size - 2, vocab_size - 1, 0

  def __call__(self, texts: Sequence[str]) -> tuple:
    """texts -> (input_ids, attention_mask), both (N, max_length) int32."""
    ids = np.full((len(texts), self.max_length), self.pad_token_id, np.int32)
    mask = np.zeros_like(ids)
    for i, text in enumerate(texts):
      body = [1 + b % (self.vocab_size - 3) for b in text.lower().encode('utf-8')]
      row = [self.bos_token_id] + body[:self.max_length - 2] + [self.eos_token_id]
      ids[i, :len(row)], mask[i, :len(row)] = row, 1
    return ids, mask


class HFTokenizer:
  """transformers CLIP tokenizer padded to a fixed length (one compiled text shape)."""

  def __init__(self, tokenizer, max_length: int):
    self.tokenizer, self.max_length = tokenizer, max_length

  def __call__(self, texts: Sequence[str]) -> tuple:
    """texts -> (input_ids, attention_mask), both (N, max_length) int32."""
    out = self.tokenizer(list(texts), padding='max_length', truncation=True,
                         max_length=self.max_length, return_tensors='np')
    return (np.asarray(out['input_ids'], np.int32), np.asarray(out['attention_mask'], np.int32))


_TOKENIZER_FILES = ('tokenizer.json', 'vocab.json')


def get_tokenizer(name_or_path: str, clip_config=None) -> Callable:
  """Tokenizer callable: list[str] -> (input_ids, attention_mask) int32 numpy (N, L).

  Args:
    name_or_path: hub name, local directory, or 'random'.
    clip_config: optional CLIPConfig; gives L (max_position_embeddings) and, for the
      fallback, the vocabulary size. Read from the directory's config.json if omitted.

  Returns:
    The HF CLIP tokenizer when the directory / hub has tokenizer files; ByteTokenizer for
    'random' and for directories without tokenizer files (only meaningful for random or
    test CLIPs). A hub name whose tokenizer cannot be loaded raises.
  """
  if clip_config is None and name_or_path != 'random' and _is_local(name_or_path):
    config_path = os.path.join(os.path.expanduser(name_or_path), CONFIG_FILE)
    if os.path.isfile(config_path):
      clip_config = transformers.CLIPConfig.from_json_file(config_path)
  text_config = clip_config.text_config if clip_config is not None else None
  max_length = text_config.max_position_embeddings if text_config is not None else 77
  if name_or_path == 'random' or (_is_local(name_or_path) and not any(
      os.path.isfile(os.path.join(os.path.expanduser(name_or_path), f))
      for f in _TOKENIZER_FILES)):
    vocab = text_config.vocab_size if text_config is not None else 49408
    return ByteTokenizer(vocab, max_length)
  try:
    tokenizer = transformers.CLIPTokenizerFast.from_pretrained(
        os.path.expanduser(name_or_path), local_files_only=_hub_offline())
  except Exception as e:  # pylint: disable=broad-except
    raise FileNotFoundError(f'CLIP tokenizer {name_or_path!r} could not be loaded '
                            f'({type(e).__name__}: {e}). Pass a local directory holding '
                            f'tokenizer.json or vocab.json + merges.txt.') from e
  return HFTokenizer(tokenizer, max_length)


# ---------------------------------------------------------------------- forward helpers


def text_features(clip_config, text_params, texts: Sequence[str], tokenizer: Callable,
                  batch_size: int = 256) -> np.ndarray:
  """Pooled text features (after final LN, before text_projection) of `texts`.

  Args:
    clip_config: transformers CLIPConfig (eos_token_id read from its text_config).
    text_params: params['text_model'].
    texts: N strings.
    tokenizer: get_tokenizer(...) callable.
    batch_size: texts per compiled call (the last batch is padded to it).

  Returns:
    (N, T) float32 numpy array.
  """
  text_config = clip_config.text_config
  module = text_module_from_config(text_config)

  @jax.jit
  def encode(params, ids, mask):
    return module.apply({'params': params}, ids, mask,
                        eos_token_id=text_config.eos_token_id)[1]['pooler_output']

  ids, mask = tokenizer(list(texts))
  n = len(ids)
  batch_size = max(1, min(batch_size, n))
  chunks = []
  for start in range(0, n, batch_size):
    b_ids, b_mask = ids[start:start + batch_size], mask[start:start + batch_size]
    pad = batch_size - len(b_ids)
    b_ids = np.pad(b_ids, ((0, pad), (0, 0)))
    b_mask = np.pad(b_mask, ((0, pad), (0, 0)))
    chunks.append(np.asarray(encode(text_params, b_ids, b_mask))[:batch_size - pad])
  if not chunks:
    return np.zeros((0, text_config.hidden_size), np.float32)
  return np.concatenate(chunks).astype(np.float32)


def hf_golden_outputs(clip_config, params, pixel_values_nchw, input_ids,
                      attention_mask) -> dict:
  """Our towers' outputs under the key names of transformers' CLIP golden files.

  Args:
    clip_config: transformers CLIPConfig.
    params: load_clip params.
    pixel_values_nchw: (B, 3, H, W) pixels (PyTorch layout, as in the golden).
    input_ids: (N, L) token ids.
    attention_mask: (N, L) 1/0 mask.

  Returns:
    {'vision/last_hidden_state', 'vision/pooler_output', 'vision/image_embeds',
     'vision/hidden_states/<i>', 'vision/attentions/<i>', 'text/last_hidden_state',
     'text/pooler_output', 'text/text_embeds'} -> float32 numpy.
  """
  vc, tc = clip_config.vision_config, clip_config.text_config
  pixels = jnp.asarray(np.asarray(pixel_values_nchw, np.float32).transpose(0, 2, 3, 1))
  last, aux = jax.jit(vision_module_from_config(vc).apply)({'params': params['vision_model']},
                                                           pixels)
  out = {'vision/last_hidden_state': last, 'vision/pooler_output': aux['pooler_output'],
         'vision/image_embeds': aux['pooler_output'] @ params['visual_projection']['kernel']}
  out.update({f'vision/hidden_states/{i}': h for i, h in enumerate(aux['hidden_states'])})
  out.update({f'vision/attentions/{i}': a for i, a in enumerate(aux['attentions'])})
  text = text_module_from_config(tc)
  last, aux = jax.jit(lambda p, i, m: text.apply(p, i, m, eos_token_id=tc.eos_token_id))(
      {'params': params['text_model']}, jnp.asarray(input_ids, jnp.int32),
      jnp.asarray(attention_mask, jnp.int32))
  out.update({'text/last_hidden_state': last, 'text/pooler_output': aux['pooler_output'],
              'text/text_embeds': aux['pooler_output'] @ params['text_projection']['kernel']})
  return {k: np.asarray(v, np.float32) for k, v in out.items()}


def load_backbone(model_cfg, seed: int):
  """(CLIPConfig, params) of config model.clip: hub name, local dir or 'random' (seeded)."""
  if model_cfg.clip == 'random':
    clip_config = random_clip_config(model_cfg.random_clip)
    return clip_config, init_clip_params(clip_config,
                                            jax.random.PRNGKey(seed))
  return load_clip(model_cfg.clip)
