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
  results.json          the run's results, when they belong to the exported step
  tokenizer files       when the run's CLIP has a Hugging Face tokenizer
  official.safetensors  with --official: the authors' layout (see below)
  manifest.json         every file above with its size and sha256; `read_export`
                        refuses a folder whose files differ (a mixed export)
  .concepthash_jax      the marker of an export folder (safe_files)
An export is written into a sibling folder and swapped in whole, so a crash leaves
the old export or the new one.
The official layout (`write_official` / `read_official`) holds the names and PyTorch
layouts of the authors' `state_dict()`, mapped by `interop.official`'s one table.
"""
import json
import os

import numpy as np
from flax import traverse_util

from concepthash_jax import errors
from concepthash_jax import safe_files
from concepthash_jax.interop import official

FORMAT = 'concepthash_jax.export'
VERSION = 1
CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'
CLASS_NAMES_FILE = 'class_names.json'
CENTERS_FILE = 'centers.safetensors'
RESULTS_FILE = 'results.json'
OFFICIAL_FILE = 'official.safetensors'
MANIFEST_FILE = 'manifest.json'  # Each file's size and sha256, checked on load.
EXPORT_KIND = 'export'  # safe_files marker kind of an export folder.
TEXT_PREFIX = 'text_model'
_SEP = '/'


class ExportError(errors.UserError, ValueError):
  """A missing, incomplete or corrupt export (the message names the file)."""


def is_export(path: str) -> bool:
  """Whether `path` looks like an export directory (marker or weights file)."""
  return (safe_files.folder_kind(path) == EXPORT_KIND or
          os.path.isfile(os.path.join(path, WEIGHTS_FILE)))


def flatten(tree: dict) -> dict:
  """{'a/b/c': numpy array} of a nested dict (the safetensors naming)."""
  return {_SEP.join(k): np.ascontiguousarray(np.asarray(v))
          for k, v in traverse_util.flatten_dict(tree).items()}


def unflatten(flat: dict) -> dict:
  """Inverse of `flatten`."""
  return traverse_util.unflatten_dict({tuple(k.split(_SEP)): v
                                       for k, v in flat.items()})


def _write_json(path: str, obj):
  with open(path, 'w') as f:
    json.dump(obj, f, indent=2)


def _files_of(folder: str) -> list:
  """Relative paths of the files under `folder`, except the manifest and marker."""
  found = []
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    for name in sorted(files):
      rel = os.path.relpath(os.path.join(root, name), folder)
      if rel not in (MANIFEST_FILE, safe_files.MARKER):
        found.append(rel)
  return found


def write_manifest(folder: str):
  """Writes folder/manifest.json: every file's size and sha256 (then the marker)."""
  files = {rel: {'bytes': os.path.getsize(os.path.join(folder, rel)),
                 'sha256': safe_files.sha256_file(os.path.join(folder, rel))}
           for rel in _files_of(folder)}
  safe_files.write_json(os.path.join(folder, MANIFEST_FILE),
                        {'format': FORMAT, 'version': VERSION, 'files': files})
  safe_files.write_marker(folder, EXPORT_KIND)


def check_manifest(path: str):
  """Refuses (ExportError) an export whose files are not the ones it was written with.

  A folder with the export marker but no manifest is a partial export; one
  with neither has nothing to check against and is read as it is.
  """
  manifest_path = os.path.join(path, MANIFEST_FILE)
  if not os.path.isfile(manifest_path):
    if safe_files.folder_kind(path) == EXPORT_KIND:
      raise ExportError(f'{path} is a partial export ({MANIFEST_FILE} is '
                        f'missing); re-export the run into it.')
    return
  files = _read_json(manifest_path, 'the list of the export\'s files')
  files = files.get('files') if isinstance(files, dict) else None
  if not isinstance(files, dict):
    raise ExportError(f'{manifest_path} lists no files; the export is corrupt: '
                      're-export the run.')
  for rel, want in sorted(files.items()):
    file_path = os.path.join(path, rel)
    if not os.path.isfile(file_path):
      problem = 'is missing'
    elif os.path.getsize(file_path) != want.get('bytes'):
      problem = (f'has {os.path.getsize(file_path)} bytes, the manifest '
                 f'{want.get("bytes")}')
    elif safe_files.sha256_file(file_path) != want.get('sha256'):
      problem = 'differs from the file the export was written with'
    else:
      continue
    raise ExportError(f'{file_path} {problem}: {path} is a mixed or partial '
                      'export (an interrupted copy or re-export); re-export '
                      'the run with concepthash-export --workdir=W --out=DIR.')


def looks_like_workdir(folder: str) -> bool:
  """Whether `folder` is a training workdir (marker, or config.json + checkpoints/)."""
  if safe_files.folder_kind(folder) == 'workdir':
    return True
  return (os.path.isfile(os.path.join(folder, CONFIG_FILE)) and
          os.path.isdir(os.path.join(folder, 'checkpoints')))


def _is_legacy_export(folder: str) -> bool:
  """An unmarked export of ours: weights + an export config.json."""
  try:
    with open(os.path.join(folder, CONFIG_FILE)) as f:
      meta = json.load(f)
  except (OSError, ValueError):
    return False
  return (is_export(folder) and isinstance(meta, dict) and
          meta.get('format') == FORMAT)


def check_destination(out: str):
  """Refuses an --out that an export must not replace (one sentence each).

  An export goes into a new folder, an empty one, or one that already holds
  an export (which it then replaces whole); never into a workdir or a folder
  holding anything else.

  Raises:
    safe_files.OverwriteError: `out` is a file, a workdir or someone's folder.
  """
  if not os.path.lexists(out):
    return
  if not os.path.isdir(out):
    raise safe_files.OverwriteError(
        f'{out} is a file, not a folder; give --out a new or empty folder for '
        'the export.')
  if safe_files.folder_kind(out) == EXPORT_KIND or _is_legacy_export(out):
    return
  if looks_like_workdir(out):
    raise safe_files.OverwriteError(
        f'{out} is a training workdir; exporting there would replace its '
        f'{CONFIG_FILE}: give --out a new or empty folder.')
  entries = sorted(os.listdir(out))
  if entries:
    shown = ', '.join(entries[:3]) + (', ...' if len(entries) > 3 else '')
    raise safe_files.OverwriteError(
        f'{out} holds other files ({shown}) and is not an export; give --out '
        'a new or empty folder (an existing export is replaced whole).')


def write_export(out_dir: str, *, meta: dict, variables: dict, text_params,
                 class_names, class_centers, results=None, tokenizer=None,
                 official_state=None):
  """Writes an export directory as one unit: a sibling folder, then swapped in.

  Every file, the manifest (sizes and sha256 that `read_export` checks) and
  the marker are written into a temporary sibling folder, which then replaces
  `out_dir` whole (`safe_files.replace_folder`): a crash leaves the old export
  or the new one, never a mix, and no file of the old one stays behind.

  Args:
    out_dir: directory to create or replace (see `check_destination`).
    meta: the config.json dict without 'format'/'version'.
    variables: {'params', 'batch_stats', 'centers'} numpy trees (params already
      reduced to the trained leaves when meta['trained_only']).
    text_params: CLIP params['text_model'] or None (then `encode_text` loads
      the base CLIP).
    class_names: C names.
    class_centers: (C, K) float o_c.
    results: the run's results dict or None.
    tokenizer: an `interop.hf.HFTokenizer` whose files to save, or None.
    official_state: an `official_state_dict` to save as OFFICIAL_FILE, or None.

  Raises:
    safe_files.OverwriteError / WriteError: `out_dir` may not be replaced, or
      cannot be written (one sentence naming it).
  """
  from safetensors import numpy as st  # pylint: disable=g-import-not-at-top
  check_destination(out_dir)
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
  if official_state is not None:
    files[OFFICIAL_FILE] = lambda p: st.save_file(official_state, p)
  with safe_files.staged_folder(out_dir) as staged:
    for name, write in files.items():
      write(os.path.join(staged, name))
      safe_files.publish_mode(os.path.join(staged, name))
    if tokenizer is not None:
      tokenizer.tokenizer.save_pretrained(staged)
    write_manifest(staged)
  safe_files.remove_stale_siblings(out_dir)


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
    aside = safe_files.set_aside_folders(path)
    if aside:
      raise ExportError(f'{path} is missing: a re-export was killed while it '
                        f'swapped folders and left the previous export at '
                        f'{aside[0]}; rename that folder to {path}, or export '
                        'again.')
    raise ExportError(f'{path} is not a directory; pass a training workdir or a '
                      'directory written by concepthash-export.')
  check_manifest(path)
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
  """Writes an official state dict as one .safetensors file (atomically)."""
  from safetensors import numpy as st  # pylint: disable=g-import-not-at-top
  with safe_files.atomic_write(path) as f:
    f.write(st.save(state_dict))


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
