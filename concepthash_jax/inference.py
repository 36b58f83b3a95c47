"""Using a trained ConceptHash: load a run or an export offline, hash images and text.

  hasher = ConceptHasher.load('runs/synthetic')       # training workdir or export dir
  out = hasher.encode(['a.jpg', 'photos/'], attention=True)
  out['codes']         # (N, K) int8 ±1, the run's own eval-mode codes
  out['concept_attn']  # (N, M, HW) attention of each concept over the patches
  text = hasher.encode_text(['a photo of a Laysan Albatross'])
  text['codes']        # (P, K) int8 ±1: the hash center the model gives that prompt

Images go through the run's test transform (data/transforms.py) and one jitted
eval step (`encoding.jitted_encode_step`) at a fixed batch size, the last batch
padded, so one compiled shape serves every call and codes are bit-identical to
the run's own evaluation. Text goes through the CLIP text tower and the center
projection t exactly as training builds the class centers (docs/method.md §2.5).
"""
import copy
import functools
import hashlib
import json
import os
from typing import Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
from PIL import Image
import tqdm
from flax import traverse_util

from concepthash_jax import checkpointing
from concepthash_jax import data as data_lib
from concepthash_jax import encoding
from concepthash_jax import errors
from concepthash_jax import exporting
from concepthash_jax import models
from concepthash_jax import run_files
from concepthash_jax import safe_files
from concepthash_jax import sharding
from concepthash_jax import xla_flags
from concepthash_jax.data import folders
from concepthash_jax.data import pixels as pixels_lib
from concepthash_jax.data import transforms
from concepthash_jax.interop import hf
from concepthash_jax.models import concepthash

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif',
                    '.tiff')


def _restore_run(workdir: str, *, step: Optional[int] = None,
                 which: str = 'latest'):
  """A run's model and the variables of one checkpoint; no dataset or network.

  Only the model's variables are read from the checkpoint (an orbax partial
  restore of `params` and `model_state`), so neither the optimizer nor the
  TrainState of the code that trained the run has to be rebuilt. An
  unreadable latest or best checkpoint falls back to the newest readable one,
  so the step restored may be older than the one asked for.

  Args:
    workdir: a run directory written by `train.train_and_evaluate`.
    step: explicit checkpoint step; overrides `which`.
    which: 'latest' (the final model, as in results.json) or 'best'.

  Returns:
    (config, clip_config, model, variables, class_names, restored step):
    variables = {'params', 'batch_stats', 'centers'} ready for
    `model.apply(..., train=False)`, replicated over this process's devices.

  Raises:
    errors.CheckpointError: no checkpoint can be read ('No readable checkpoint
      in ...').
    errors.MissingFileError: the run never saved a checkpoint.
  """
  config = run_files.read_run_config(workdir)
  clip_config = run_files.read_clip_config(workdir)
  class_names = run_files.read_class_names(workdir)
  model = models.build_model(config.model, clip_config, len(class_names))
  replicated = NamedSharding(sharding.create_mesh(), PartitionSpec())
  place = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated)
  variables = jax.tree.map(place, abstract_variables(model, config.data.image_size))
  wanted = {'step': place(jax.ShapeDtypeStruct((), jnp.int32)),
            'params': variables.pop('params'), 'model_state': variables}
  ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(workdir))
  fallback = step is None  # An unreadable latest/best: the newest readable.
  try:
    if step is None:
      if which not in ('latest', 'best'):
        raise errors.ConfigError(f"which={which!r}; valid: ['latest', 'best']")
      step = ckpt.best_step() if which == 'best' else ckpt.latest_step()
      step = ckpt.latest_step() if step is None else step
    if step is None and not ckpt.unreadable:
      raise errors.MissingFileError(
          f'{checkpointing.checkpoint_dir(workdir)} holds no checkpoint; train '
          f'the run first (concepthash-train ... --workdir={workdir}).')
    # With only unreadable steps, restore names each and why.
    state = ckpt.restore(wanted, step, fallback=fallback, partial=True)
  finally:
    ckpt.close()
  return (config, clip_config, model,
          {'params': state['params'], **state['model_state']}, class_names,
          int(jax.device_get(state['step'])))


def _results_of_step(workdir: str, step: int):
  """The run's results.json when it describes `step`, else None (with a warning)."""
  results_path = os.path.join(workdir, run_files.RESULTS_FILE)
  if not os.path.isfile(results_path):
    return None
  with open(results_path) as f:
    results = json.load(f)
  if results.get('step') != step:
    logging.warning('%s describes step %s, not the restored step %d; they are '
                    'left out.', results_path, results.get('step'), step)
    return None
  return results


def abstract_variables(model, image_size: int) -> dict:
  """ShapeDtypeStructs of a ConceptHash's variables (no weights computed)."""
  pixels = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  rngs = {'params': jax.random.PRNGKey(0), 'dropout': jax.random.PRNGKey(1)}
  return jax.eval_shape(lambda x: model.init(rngs, x, train=False), pixels)


def base_clip(config, base: Optional[str] = None):
  """(CLIPConfig, params) of the run's CLIP, or of `base` (hub name/local dir).

  The last one is cached: exporting, loading a trained-only export and
  `encode_text` each need it, and a 'random' CLIP is rebuilt by compiling its
  init (seconds) while a hub one is read from disk.
  """
  name = base or config.model.clip
  random_cfg = (json.dumps(config.model.random_clip.to_dict(), sort_keys=True)
                if name == 'random' else '')
  return _load_clip_cached(name, random_cfg, int(config.seed))


@functools.lru_cache(maxsize=1)
def _load_clip_cached(name: str, random_cfg: str, seed: int):
  """hf.load_backbone keyed by hashable values (see base_clip)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  model_cfg = ml_collections.ConfigDict({'clip': name})
  if random_cfg:
    model_cfg.random_clip = ml_collections.ConfigDict(json.loads(random_cfg))
  return hf.load_backbone(model_cfg, seed)


def _assemble(abstract: dict, stored: dict, frozen_vision, where: str) -> dict:
  """Export variables checked against the model's; frozen CLIP leaves filled in.

  Args:
    abstract: `abstract_variables` of the model.
    stored: the export's nested variables.
    frozen_vision: CLIP params['vision_model'] for a trained-only export, else None.
    where: the export's weights file (for messages).
  """
  want = traverse_util.flatten_dict(abstract)
  have = traverse_util.flatten_dict(stored)
  if frozen_vision is not None:
    for key, value in traverse_util.flatten_dict(frozen_vision).items():
      have.setdefault(('params', 'vision_model') + key, value)
  missing = sorted('/'.join(k) for k in want if k not in have)
  unknown = sorted('/'.join(k) for k in have if k not in want)
  bad = [f'{"/".join(k)}: {tuple(np.shape(have[k]))} vs model {tuple(v.shape)}'
         for k, v in want.items() if k in have and tuple(np.shape(have[k])) != v.shape]
  if missing or unknown or bad:
    raise exporting.ExportError(
        f'{where} does not match its config: missing {missing[:5]}, unknown '
        f'{unknown[:5]}, shape mismatches {bad[:5]}; the export is corrupt or '
        'from another model: re-export the run.')
  return traverse_util.unflatten_dict(
      {k: np.asarray(have[k], v.dtype) for k, v in want.items()})


def list_images(folder: str) -> list:
  """Image files under `folder` (recursive), sorted by path."""
  found = []
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    found.extend(os.path.join(root, f) for f in sorted(files)
                 if f.lower().endswith(IMAGE_EXTENSIONS))
  if not found:
    raise FileNotFoundError(f'No images ({", ".join(IMAGE_EXTENSIONS)}) under '
                            f'{folder}.')
  return found


def _as_items(images) -> list:
  """PIL images, image arrays, file paths or folders -> a flat list of items.

  An array of 4 dimensions is a batch (N, H, W, C); of 2 or 3, one image
  (data/pixels.py says which shapes and dtypes are accepted).
  """
  if isinstance(images, (str, os.PathLike, Image.Image)):
    images = [images]
  elif isinstance(images, np.ndarray):
    images = list(images) if images.ndim == 4 else [images]
  items = []
  for item in images:
    if isinstance(item, (str, os.PathLike)):
      path = os.fspath(item)
      items.extend(list_images(path) if os.path.isdir(path) else [path])
    elif isinstance(item, (Image.Image, np.ndarray)):
      items.append(item)
    else:
      raise TypeError(f'Cannot encode a {type(item).__name__}; pass PIL images, '
                      f'image arrays ({pixels_lib.ACCEPTED}), image paths or '
                      'folders.')
  if not items:
    raise ValueError('encode got no images.')
  return items


def _pixels(item, position: int):
  """An item as uint8 (H, W, 3) RGB for the test transform (file read here).

  Raises:
    data.CorruptImageError: a file cannot be read (names it).
    pixels.ImageFormatError: an array or PIL image of a shape, dtype or range
      that is not a picture (names its position and shape).
  """
  if isinstance(item, str):
    return folders.load_image(item)
  return pixels_lib.to_rgb(item, f'image {position} ({type(item).__name__})')


class ConceptHasher:
  """A trained ConceptHash ready to hash images and prompts (see module doc)."""

  def __init__(self, *, config, clip_config, model, variables, class_names,
               source: str, tokenizer_source: str, text_params=None,
               base_clip_name=None, results=None, step=None):
    self.config = config
    self.clip_config = clip_config
    self.model = model
    self.variables = variables
    self.class_names = list(class_names)
    self.source = source
    self.results = results
    self.step = step
    self._tokenizer_source = tokenizer_source
    self._text_params = text_params
    self.base_clip_name = base_clip_name  # None: the run's model.clip.
    self._tokenizer = None
    self._class_centers = None
    self._datasets = {}  # (split, data_root) -> data.build's dataset.
    self.transform = transforms.test_transform(
        image_size=config.data.image_size, resize_size=config.data.resize_size)

  # ------------------------------------------------------------- loading

  @classmethod
  def load(cls, path: str, *, which: str = 'latest',
           step: Optional[int] = None) -> 'ConceptHasher':
    """From a training workdir or an export directory; reads no network.

    Args:
      path: run directory (concepthash-train --workdir) or the output of
        concepthash-export.
      which: for a workdir, 'latest' or 'best' checkpoint.
      step: for a workdir, an explicit checkpoint step.

    Raises:
      exporting.ExportError / FileNotFoundError: with the file and the fix.
    """
    if exporting.is_export(path) or (not os.path.exists(path) and
                                     safe_files.set_aside_folders(path)):
      return cls._from_export(path)
    is_run = (os.path.isfile(os.path.join(path, run_files.CONFIG_FILE)) and
              os.path.isdir(checkpointing.checkpoint_dir(path)))
    if is_run:
      config, clip_config, model, variables, class_names, restored = (
          _restore_run(path, which=which, step=step))
      return cls(config=config, clip_config=clip_config,
                 model=model, variables=variables, class_names=class_names,
                 source=path, tokenizer_source=config.model.clip,
                 results=_results_of_step(path, restored), step=restored)
    raise exporting.ExportError(
        f'{path} is neither a training workdir ({run_files.CONFIG_FILE} + '
        f'checkpoints/) nor an export ({exporting.WEIGHTS_FILE}); pass one, or '
        'export a run with concepthash-export --workdir=W --out=DIR.')

  @classmethod
  def _from_export(cls, path: str) -> 'ConceptHasher':
    """Builds the hasher from an export directory."""
    import ml_collections  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    stored = exporting.read_export(path)
    meta = stored['meta']
    try:
      config = ml_collections.ConfigDict(meta['config'])
      clip_config = transformers.CLIPConfig.from_dict(meta['clip_config'])
    except (KeyError, TypeError, ValueError) as e:
      raise exporting.ExportError(
          f'{os.path.join(path, exporting.CONFIG_FILE)} lacks a valid '
          f'{e} entry; re-export the run.') from e
    class_names = stored['class_names']
    model = models.build_model(config.model, clip_config, len(class_names))
    frozen, text = None, stored['text_params']
    if meta.get('trained_only'):
      _, clip_params = base_clip(config, meta.get('base_clip'))
      frozen, text = clip_params['vision_model'], clip_params['text_model']
    variables = _assemble(abstract_variables(model, config.data.image_size),
                          stored['variables'], frozen,
                          os.path.join(path, exporting.WEIGHTS_FILE))
    return cls(config=config, clip_config=clip_config, model=model,
               variables=jax.device_put(variables), class_names=class_names,
               source=path, tokenizer_source=path, text_params=text,
               base_clip_name=meta.get('base_clip'), results=stored['results'],
               step=meta.get('step'))

  # ------------------------------------------------------------ properties

  @functools.cached_property
  def fingerprint(self) -> str:
    """sha256 of the variables' names, dtypes, shapes and values (a run = its export)."""
    digest = hashlib.sha256()
    for path, value in sorted(traverse_util.flatten_dict(
        jax.device_get(self.variables), sep='/').items()):
      value = np.ascontiguousarray(value)
      digest.update(f'{path}:{value.dtype.str}:{value.shape};'.encode())
      digest.update(value.tobytes())
    return digest.hexdigest()

  @property
  def cpu_matmul(self) -> str:
    """The run's train.cpu_matmul, so encodes here match the run's own ('auto' before it)."""
    return xla_flags.cpu_matmul_of(self.config)

  @property
  def nbit(self) -> int:
    """K, bits per code."""
    return int(self.model.nbit)

  @property
  def num_concepts(self) -> int:
    """M, concepts (sub-codes of K/M bits)."""
    return int(self.model.num_concepts)

  @property
  def image_size(self) -> int:
    """Side of the square model input."""
    return int(self.config.data.image_size)

  @property
  def class_centers(self) -> np.ndarray:
    """o_c (C, K) float32: the trained class centers, from one forward."""
    if self._class_centers is None:
      self._class_centers = encoding.class_centers(self.model, self.variables,
                                                   self.image_size)
    return self._class_centers

  # --------------------------------------------------------------- images

  def encode(self, images, *, attention: bool = False, display: bool = False,
             batch_size: Optional[int] = None,
             progress: Optional[bool] = None) -> dict:
    """Binary codes of images.

    Args:
      images: a PIL image (any mode), an image array (H, W), (H, W, 1),
        (H, W, 3), (H, W, 4) or a batch (N, H, W, C) of uint8, uint16 or float
        in [0, 1] (data/pixels.py), a file path, a folder (its images,
        recursively, sorted by path), or a list of these.
      attention: also return the concept attention maps.
      display: also return the model inputs as uint8 images (what the
        attention maps are drawn on).
      batch_size: images per compiled call (default data.eval_batch_size).
      progress: tqdm bar; None = when there is more than one batch.

    Returns:
      {'codes': (N, K) int8 ±1, 'codes_cont': (N, K) float32,
       'concept_attn': (N, M, HW) float32 when `attention`,
       'images': (N, S, S, 3) uint8 when `display`,
       'paths': N str ('' for in-memory images)}.

    Raises:
      data.CorruptImageError: an image file cannot be read (names it).
      pixels.ImageFormatError: an array or image that is not a picture of an
        accepted shape, dtype or range (one sentence naming it).
    """
    items = _as_items(images)
    batch_size = int(batch_size or self.config.data.eval_batch_size)
    step = encoding.jitted_encode_step(self.model, self.cpu_matmul)
    size = self.image_size
    starts = range(0, len(items), batch_size)
    if progress is None:
      progress = len(starts) > 1
    keys = ('codes', 'codes_cont') + (('concept_attn',) if attention else ())
    parts = {k: [] for k in keys + (('images',) if display else ())}
    for start in tqdm.tqdm(starts, desc='encode', unit='batch',
                           disable=not progress, leave=False):
      chunk = items[start:start + batch_size]
      shown = np.zeros((batch_size, size, size, 3), np.uint8)
      for i, item in enumerate(chunk):
        shown[i] = np.asarray(self.transform.apply(_pixels(item, start + i))[0])
      out = jax.device_get(step(self.variables, shown))  # uint8: normalised in the step.
      for k in keys:
        parts[k].append(np.asarray(out[k])[:len(chunk)])
      if display:
        parts['images'].append(shown[:len(chunk)])
    result = {k: np.concatenate(v) for k, v in parts.items()}
    result['paths'] = [item if isinstance(item, str) else '' for item in items]
    return result

  def dataset(self, split: str, *, data_root: Optional[str] = None):
    """A split of the run's dataset (`data.build`), root optionally moved.

    Built once per (split, root): building scans every image of the split,
    and the search tool asks again for each query it draws.
    """
    key = (split, data_root)
    if key not in self._datasets:
      data_cfg = copy.deepcopy(self.config.data)
      if data_root is not None:
        data_cfg.unlock().root = data_root
      self._datasets[key] = data_lib.build(data_cfg, split)
    return self._datasets[key]

  def encode_split(self, split: str, *, data_root: Optional[str] = None,
                   attention: bool = False) -> dict:
    """Codes of a split of the run's dataset, exactly as its evaluation made them.

    Returns:
      `encoding.encode_split`'s dict (codes, codes_cont, labels, index, and
      concept_attn when `attention`) plus 'paths' (N str, '' for sources
      without files).
    """
    ds = self.dataset(split, data_root=data_root)
    out = encoding.encode_split(
        self.model, self.variables, ds, self.config.data,
        keep=('codes', 'attention') if attention else ('codes',),
        cpu_matmul=self.cpu_matmul)
    paths = getattr(ds, 'paths', None)
    out['paths'] = ([paths[i] for i in out['index']] if paths is not None
                    else [''] * len(out['index']))
    return out

  # ----------------------------------------------------------------- text

  def clip_params(self) -> dict:
    """The base CLIP's params (read or regenerated), text tower as stored."""
    _, params = base_clip(self.config, self.base_clip_name)
    if self._text_params is not None:
      params = dict(params, text_model=self._text_params)
    self._text_params = params['text_model']
    return params

  def text_params(self):
    """CLIP params['text_model']: from the export, else from the base CLIP."""
    if self._text_params is None:
      self.clip_params()
    return self._text_params

  def encode_text(self, prompts) -> dict:
    """Hash-center codes of prompts, as training builds the class centers.

    e = CLIP text features (EOS state after the final LN), sign(e) for the
    released `center_input='sign'`, then the trained center projection t.

    Args:
      prompts: a string or a non-empty list of strings.

    Returns:
      {'codes': (P, K) int8 ±1, 'centers': (P, K) float32 continuous o}.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
      raise ValueError('encode_text got an empty prompt list; pass at least '
                       "one prompt, e.g. ['a photo of a Laysan Albatross'].")
    if self.model.center_type != 'language':
      raise ValueError(f'encode_text needs a run trained with language centers; '
                       f'this one has model.center_type='
                       f'{self.model.center_type!r}.')
    embeds = hf.text_features(self.clip_config, self.text_params(), prompts,
                              self.tokenizer())
    centers = np.asarray(_project_centers(
        self.model.center_input, self.model.center_projection, self.nbit,
        self.variables['params']['center_projection'], embeds), np.float32)
    return {'codes': np.where(centers >= 0, 1, -1).astype(np.int8),
            'centers': centers}

  def tokenizer(self):
    """The run's tokenizer callable (for saving it beside an export)."""
    if self._tokenizer is None:
      self._tokenizer = hf.get_tokenizer(self._tokenizer_source,
                                         self.clip_config)
    return self._tokenizer


def _project_centers(center_input, kind, nbit, params, text_embeds):
  """o = t(e) or t(sign e): the model's own `CenterProjection` on its params."""
  module = concepthash.CenterProjection(nbit, kind, center_input)
  return jax.jit(module.apply)({'params': params},
                               jnp.asarray(text_embeds, jnp.float32))
