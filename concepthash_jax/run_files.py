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

from concepthash_jax.interop import hf

CONFIG_FILE = 'config.json'  # The run's config, as JSON.
CLIP_CONFIG_FILE = 'clip_config.json'  # transformers.CLIPConfig.to_dict().
CLASS_NAMES_FILE = 'class_names.json'  # Class names in label order.
RESULTS_FILE = 'results.json'  # Final numbers (docs/method.md §6.3).
METRICS_FILE = 'metrics.jsonl'  # One line of scalars per logged step.
TENSORBOARD_DIR = 'tensorboard'


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with (workdir/config.json)."""
  with open(os.path.join(workdir, CONFIG_FILE)) as f:
    return ml_collections.ConfigDict(json.load(f))


def read_clip_config(workdir: str):
  """The CLIPConfig a run was built with (saved so inference is offline)."""
  import transformers  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, CLIP_CONFIG_FILE)) as f:
    return transformers.CLIPConfig.from_dict(json.load(f))


def read_class_names(workdir: str) -> list:
  """The class names of a run, in label order."""
  with open(os.path.join(workdir, CLASS_NAMES_FILE)) as f:
    return json.load(f)


def abstract_vision_params(clip_config):
  """{'vision_model': ShapeDtypeStructs} of a CLIP config (no text tower traced)."""
  vision_config = clip_config.vision_config
  pixels = jax.ShapeDtypeStruct(
      (1, vision_config.image_size, vision_config.image_size, 3), jnp.float32)
  module = hf.vision_module_from_config(vision_config)
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), pixels)
  return {'vision_model': shapes['params']}
