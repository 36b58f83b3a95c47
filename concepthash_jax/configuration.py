"""Config checks in one place: valid choices, numeric ranges, the loss function.

`validate_config` runs at the command line (launch.py) and again at the start
of `train.train_and_evaluate`, so a bad value fails before anything slow, with
the key and the valid choices in the message. Configs stay plain data.
"""
import functools
import importlib
import inspect
from typing import Callable

import ml_collections

from concepthash_jax import data
from concepthash_jax import evaluation
from concepthash_jax import losses
from concepthash_jax import models
from concepthash_jax import optim
from concepthash_jax import xla_flags
from concepthash_jax.data import core as data_core
from concepthash_jax.data import pipeline
from concepthash_jax.data import transforms
from concepthash_jax.models import clip
from concepthash_jax.models import concepthash

# Valid values of every choice key, owned by the module that reads the key;
# `validate_config` names them in its errors.
CHOICES = {
    'model.concept_tokens': concepthash.CONCEPT_TOKENS,
    'model.code_norm': concepthash.CODE_NORMS,
    'model.center_type': concepthash.CENTER_TYPES,
    'model.center_input': concepthash.CENTER_INPUTS,
    'model.center_projection': concepthash.CENTER_PROJECTIONS,
    'model.concept_embedding': concepthash.CONCEPT_EMBEDDINGS,
    'model.dtype': tuple(models.DTYPES),
    'model.remat': tuple(clip.REMAT_POLICIES),
    'loss.concept_margin': losses.CONCEPT_MARGINS,
    'data.name': data.DATASETS,
    'data.source': tuple(data.SOURCES),
    'data.train_augment': transforms.TRAIN_AUGMENTS,
    'data.on_corrupt': data_core.ON_CORRUPT,
    'data.worker_type': pipeline.WORKER_TYPES,
    'optim.schedule': tuple(optim.SCHEDULES),
    'eval.ties': evaluation.TIES,
    'train.cpu_matmul': xla_flags.CPU_MATMUL,
}


def validate_config(config: ml_collections.ConfigDict):
  """Raises ValueError naming the key and the valid choices for a bad value."""
  for key, valid in CHOICES.items():
    section, name = key.split('.')
    value = config[section][name]
    if value not in valid:
      raise ValueError(f'Invalid config.{key}={value!r}; valid: {list(valid)}')
  model, optim_cfg = config.model, config.optim
  if model.nbit <= 0 or model.num_concepts <= 0:
    raise ValueError('config.model.nbit and config.model.num_concepts must be '
                     f'> 0, got {model.nbit}, {model.num_concepts}')
  if model.nbit % model.num_concepts:
    raise ValueError(f'config.model.nbit={model.nbit} must be divisible by '
                     f'config.model.num_concepts={model.num_concepts} '
                     '(one sub-code of nbit/num_concepts bits per concept)')
  checks = [
      ('optim.lr', optim_cfg.lr > 0, '> 0'),
      ('optim.momentum', 0 <= optim_cfg.momentum < 1, 'in [0, 1)'),
      ('optim.weight_decay', optim_cfg.weight_decay >= 0, '>= 0'),
      ('optim.epochs', optim_cfg.epochs > 0, '> 0'),
      ('optim.warmup_epochs', 0 <= optim_cfg.warmup_epochs <= optim_cfg.epochs,
       'in [0, optim.epochs]'),
      ('data.batch_size', config.data.batch_size > 0, '> 0'),
      ('data.eval_batch_size', config.data.eval_batch_size > 0, '> 0'),
      ('eval.every_epochs', config.eval.every_epochs > 0, '> 0'),
      ('train.keep_checkpoints', config.train.keep_checkpoints > 0, '> 0'),
      ('train.checkpoint_every_steps',
       config.train.checkpoint_every_steps > 0, '> 0'),
      ('train.log_every_steps', config.train.log_every_steps > 0, '> 0'),
  ]
  for key, ok, rule in checks:
    if not ok:
      section, name = key.split('.')
      raise ValueError(f'Invalid config.{key}={config[section][name]!r}; '
                       f'must be {rule}')
  optim.parse_lr_multipliers(optim_cfg.get('lr_multipliers', ''))
  make_loss_fn(config.loss)  # Fails now, not after the data loads.


def resolve_loss_fn(name: str) -> Callable:
  """'' -> losses.total_loss; 'pkg.module.fn' -> that function."""
  if not name:
    return losses.total_loss
  module_name, _, fn_name = name.rpartition('.')
  if not module_name:
    raise ValueError(f'config.loss.fn={name!r} must be an import path '
                     "'package.module.function' or '' (built-in total_loss)")
  try:
    fn = getattr(importlib.import_module(module_name), fn_name)
  except (ImportError, AttributeError) as e:
    raise ValueError(f'config.loss.fn={name!r} cannot be imported: {e}') from e
  if not callable(fn):
    raise ValueError(f'config.loss.fn={name!r} is not callable')
  return fn


def loss_keywords(fn: Callable, loss_cfg) -> dict:
  """The config.loss values that `fn` takes, by the keyword names it declares.

  A loss declares what it needs: a `loss.*` key it does not name is not
  passed, so adding a key to the config does not break custom losses. A
  function with **kwargs gets every key (except 'fn').

  Raises:
    ValueError: `fn` requires a keyword that config.loss does not have.
  """
  values = {k: v for k, v in loss_cfg.to_dict().items() if k != 'fn'}
  params = list(inspect.signature(fn).parameters.values())[2:]  # aux, labels
  if any(p.kind == p.VAR_KEYWORD for p in params):
    return values
  named = [p for p in params if p.kind in (p.KEYWORD_ONLY,
                                           p.POSITIONAL_OR_KEYWORD)]
  missing = [p.name for p in named
             if p.name not in values and p.default is p.empty]
  if missing:
    raise ValueError(f'config.loss.fn={loss_cfg.fn!r} ({fn.__name__}) needs '
                     f'keyword(s) {missing} that config.loss does not have; '
                     'add them to config.loss or give them defaults')
  return {p.name: values[p.name] for p in named if p.name in values}


def make_loss_fn(loss_cfg) -> Callable:
  """(aux, labels) -> (loss, metrics): config.loss.fn with its keywords bound."""
  fn = resolve_loss_fn(loss_cfg.fn)
  return functools.partial(fn, **loss_keywords(fn, loss_cfg))
