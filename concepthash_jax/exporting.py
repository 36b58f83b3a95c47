"""The exported-model directory and the authors' PyTorch layout, as safetensors files.

An export is a directory a user can copy anywhere and load offline:
  config.json           {'format': 'concepthash_jax.export', 'version', 'config' (the
                        run config), 'clip_config', 'base_clip', 'trained_only', 'step'}
  model.safetensors     our variables, one tensor per leaf named by its path
                        ('params/code_head/kernel', 'batch_stats/code_norm/mean', ...),
                        plus the CLIP text tower under 'text_model/...' (for
                        `encode_text`). No optimizer state. With `trained_only` the
                        frozen CLIP weights are left out and come from `base_clip`.
  class_names.json      the C class names, in label order
  centers.safetensors   'class_centers' (C, K) o_c and 'class_codes' (C, K) int8 ±1
  results.json          the run's results, when it had them
  tokenizer files       when the run's CLIP has a Hugging Face tokenizer
The official layout (`write_official` / `read_official`) holds the names and PyTorch
layouts of the authors' `state_dict()`, mapped by `interop.official`'s one table.
"""
import json
import os

import numpy as np
from flax import traverse_util

from concepthash_jax.interop import official

FORMAT = 'concepthash_jax.export'
VERSION = 1
CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'
CLASS_NAMES_FILE = 'class_names.json'
CENTERS_FILE = 'centers.safetensors'
RESULTS_FILE = 'results.json'
OFFICIAL_FILE = 'official.safetensors'
TEXT_PREFIX = 'text_model'
_SEP = '/'


class ExportError(ValueError):
  """A missing, incomplete or corrupt export (the message names the file)."""


def is_export(path: str) -> bool:
  """Whether `path` looks like an export directory (has its weights file)."""
  return os.path.isfile(os.path.join(path, WEIGHTS_FILE))


def flatten(tree: dict) -> dict:
  """{'a/b/c': numpy array} of a nested dict (the safetensors naming)."""
  return {_SEP.join(k): np.ascontiguousarray(np.asarray(v))
          for k, v in traverse_util.flatten_dict(tree).items()}


def unflatten(flat: dict) -> dict:
  """Inverse of `flatten`."""
  return traverse_util.unflatten_dict({tuple(k.split(_SEP)): v
                                       for k, v in flat.items()})


def _publish(tmp_path: str, path: str):
  """Renames a finished .tmp file into place, readable as the umask allows.

  safetensors creates its files 0600; an export is meant to be shared.
  """
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp_path, 0o666 & ~umask)
  os.replace(tmp_path, path)


def _write_json(path: str, obj):
  with open(path, 'w') as f:
    json.dump(obj, f, indent=2)


def write_export(out_dir: str, *, meta: dict, variables: dict, text_params,
                 class_names, class_centers, results=None, tokenizer=None):
  """Writes an export directory (files first to .tmp names, then renamed).

  Args:
    out_dir: directory to create or fill.
    meta: the config.json dict without 'format'/'version'.
    variables: {'params', 'batch_stats', 'centers'} numpy trees (params already
      reduced to the trained leaves when meta['trained_only']).
    text_params: CLIP params['text_model'] or None (then `encode_text` loads
      the base CLIP).
    class_names: C names.
    class_centers: (C, K) float o_c.
    results: the run's results dict or None.
    tokenizer: an `interop.hf.HFTokenizer` whose files to save, or None.
  """
  from safetensors import numpy as st  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  tensors = flatten(variables)
  if text_params is not None:
    tensors.update(flatten({TEXT_PREFIX: text_params}))
  centers = np.asarray(class_centers, np.float32)
  files = {
      WEIGHTS_FILE: lambda p: st.save_file(tensors, p),
      CENTERS_FILE: lambda p: st.save_file({
          'class_centers': centers,
          'class_codes': np.where(centers >= 0, 1, -1).astype(np.int8)}, p),
      CLASS_NAMES_FILE: lambda p: _write_json(p, list(class_names)),
      CONFIG_FILE: lambda p: _write_json(p, {'format': FORMAT,
                                             'version': VERSION, **meta}),
  }
  if results is not None:
    files[RESULTS_FILE] = lambda p: _write_json(p, results)
  # A crash mid-way must not leave a half-new export that loads: write every
  # file beside its final name, then rename (config.json last).
  for name, write in files.items():
    write(os.path.join(out_dir, name + '.tmp'))
  for name in files:
    _publish(os.path.join(out_dir, name + '.tmp'), os.path.join(out_dir, name))
  if tokenizer is not None:
    tokenizer.tokenizer.save_pretrained(out_dir)


def _read_json(path: str, what: str):
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError as e:
    raise ExportError(f'{path} is missing: {what}. Re-export the run with '
                      'concepthash-export --workdir=W --out=DIR.') from e
  except (ValueError, UnicodeDecodeError) as e:
    raise ExportError(f'{path} is not valid JSON ({e}); the export is corrupt: '
                      're-export the run.') from e


def _read_safetensors(path: str, what: str) -> dict:
  from safetensors import numpy as st  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise ExportError(f'{path} is missing: {what}. Re-export the run with '
                      'concepthash-export --workdir=W --out=DIR.')
  try:
    return st.load_file(path)
  except Exception as e:  # pylint: disable=broad-except
    raise ExportError(f'{path} cannot be read as safetensors ({type(e).__name__}: '
                      f'{e}); the export is corrupt: re-export the run.') from e


def read_export(path: str) -> dict:
  """Reads an export directory.

  Returns:
    {'meta': config.json dict, 'variables': nested numpy dict, 'text_params':
     nested dict or None, 'class_names': list, 'class_centers': (C, K),
     'results': dict or None}.

  Raises:
    ExportError: a file is missing or unreadable, or the format is unknown.
  """
  if not os.path.isdir(path):
    raise ExportError(f'{path} is not a directory; pass a training workdir or a '
                      'directory written by concepthash-export.')
  meta = _read_json(os.path.join(path, CONFIG_FILE), 'the export config')
  if not isinstance(meta, dict) or meta.get('format') != FORMAT:
    raise ExportError(f'{os.path.join(path, CONFIG_FILE)} is not a concepthash_jax '
                      'export config (no "format": "concepthash_jax.export").')
  if meta.get('version') != VERSION:
    raise ExportError(f'{os.path.join(path, CONFIG_FILE)}: export version '
                      f'{meta.get("version")}, this code reads {VERSION}.')
  tensors = _read_safetensors(os.path.join(path, WEIGHTS_FILE), 'the model weights')
  text = {k[len(TEXT_PREFIX) + 1:]: v for k, v in tensors.items()
          if k.startswith(TEXT_PREFIX + _SEP)}
  variables = {k: v for k, v in tensors.items()
               if not k.startswith(TEXT_PREFIX + _SEP)}
  centers = _read_safetensors(os.path.join(path, CENTERS_FILE), 'the class centers')
  results_path = os.path.join(path, RESULTS_FILE)
  return {'meta': meta, 'variables': unflatten(variables),
          'text_params': unflatten(text) if text else None,
          'class_names': _read_json(os.path.join(path, CLASS_NAMES_FILE),
                                    'the class names'),
          'class_centers': centers.get('class_centers'),
          'results': (_read_json(results_path, 'the results')
                      if os.path.isfile(results_path) else None)}


# ------------------------------------------------------------ official layout


def official_state_dict(variables: dict, *, extras=None) -> dict:
  """Our variables -> the authors' state dict (names and PyTorch layouts).

  Args:
    variables: {'params' (full, CLIP included), 'batch_stats', 'centers'}.
    extras: official tensors our model does not use but the authors' module
      holds (`interop.official.IGNORED_OFFICIAL`), so that their
      `load_state_dict(strict=True)` accepts the file; optional.

  Returns:
    {official name: numpy array}.
  """
  out = {}
  for collection, tree in variables.items():
    out.update(official.export_official(tree, collection=collection,
                                        variables=variables))
  out.update(extras or {})
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def write_official(path: str, state_dict: dict):
  """Writes an official state dict as one .safetensors file."""
  from safetensors import numpy as st  # pylint: disable=g-import-not-at-top
  st.save_file(state_dict, path + '.tmp')
  _publish(path + '.tmp', path)


def read_official(path: str, template: dict) -> dict:
  """Our variables from an official-layout .safetensors file.

  Args:
    path: the file (e.g. written by `write_official` or saved from the authors'
      `model.state_dict()` with safetensors.torch.save_file).
    template: variables (arrays or ShapeDtypeStructs) of the model to fill.

  Raises:
    ExportError: unreadable file, or names/shapes that do not fit the model.
  """
  state = _read_safetensors(path, 'the official-layout weights')
  try:
    return official.import_official(state, template)
  except ValueError as e:
    raise ExportError(f'{path}: {e}') from e
