"""The files a run keeps in its workdir, and their readers.

`train.train_and_evaluate` writes them; inference (restore, encode, explain)
reads them back without the dataset or the network. Importing this module
does not import the trainer.
"""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections

from concepthash_jax import errors
from concepthash_jax.interop import hf

CONFIG_FILE = 'config.json'  # The run's config, as JSON.
CLIP_CONFIG_FILE = 'clip_config.json'  # transformers.CLIPConfig.to_dict().
CLASS_NAMES_FILE = 'class_names.json'  # Class names in label order.
RESULTS_FILE = 'results.json'  # Final numbers (docs/method.md §6.3).
METRICS_FILE = 'metrics.jsonl'  # One line of scalars per logged step.
TENSORBOARD_DIR = 'tensorboard'


def read_json(workdir: str, name: str):
  """workdir/name parsed; one sentence naming the file when missing or torn.

  Raises:
    errors.MissingFileError: the file is not there (not a workdir, or a run
      that has not started).
    errors.DataError: the file is not valid JSON.
  """
  path = os.path.join(workdir, name)
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError as e:
    raise errors.MissingFileError(
        f'{path} is missing: {workdir} is not the workdir of a run that '
        'started (concepthash-train --workdir=...); pass that folder') from e
  except (ValueError, UnicodeDecodeError) as e:
    raise errors.DataError(f'{path} is not valid JSON ({e}); restore it, or '
                           'use another run') from e


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with (workdir/config.json)."""
  return ml_collections.ConfigDict(read_json(workdir, CONFIG_FILE))


def read_clip_config(workdir: str):
  """The CLIPConfig a run was built with (saved so inference is offline)."""
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.CLIPConfig.from_dict(read_json(workdir, CLIP_CONFIG_FILE))


def read_class_names(workdir: str) -> list:
  """The class names of a run, in label order."""
  return read_json(workdir, CLASS_NAMES_FILE)


def abstract_vision_params(clip_config):
  """{'vision_model': ShapeDtypeStructs} of a CLIP config (no text tower traced)."""
  vision_config = clip_config.vision_config
  pixels = jax.ShapeDtypeStruct(
      (1, vision_config.image_size, vision_config.image_size, 3), jnp.float32)
  module = hf.vision_module_from_config(vision_config)
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), pixels)
  return {'vision_model': shapes['params']}
