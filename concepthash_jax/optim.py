"""SGD with PyTorch semantics, the learning-rate schedules and the trainable split.

The released recipe (docs/method.md §4) trains with `torch.optim.SGD(momentum=0.9,
weight_decay=5e-4)` and a warm-up + cosine factor stepped once per epoch. We
reproduce both exactly so that a run here follows the same trajectory:

* `sgd`: coupled L2 (decay added to the gradient *before* the momentum buffer),
  dampening 0, no Nesterov, decay on every leaf it sees (biases and norm
  parameters too, as one torch param group does).
* `epoch_schedule` / `step_schedule`: the released per-epoch factor and a smooth
  per-step version that agrees with it at every epoch start.
* `make_optimizer`: the above from `config.optim`, applied to the trainable
  parameters only; frozen CLIP weights get no optimizer state at all.
"""
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

Schedule = Callable[[Any], Any]


def sgd(learning_rate, *, momentum: float, weight_decay: float
        ) -> optax.GradientTransformation:
  """torch.optim.SGD as an optax chain.

  torch: `g += wd * p; buf = momentum * buf + g; p -= lr * buf` (the first
  step sets buf = g, which equals momentum * 0 + g from a zero buffer).

  Args:
    learning_rate: float or schedule `step -> lr`.
    momentum: momentum factor (0 disables the buffer).
    weight_decay: coupled L2 coefficient.

  Returns:
    An optax GradientTransformation whose updates are added to the params.
  """
  parts = []
  if weight_decay:
    # Coupled L2: the decay joins the gradient before momentum (not AdamW-style).
    parts.append(optax.add_decayed_weights(weight_decay))
  if momentum:
    parts.append(optax.trace(decay=momentum, nesterov=False))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)


def epoch_factor(epoch, *, warmup_epochs: int, epochs: int):
  """Released lr factor for a (0-based, possibly fractional) epoch.

  e' = epoch + 1; factor = e'/W while e' <= W, else
  0.5 * (1 + cos(pi * (e' - W) / (E - W + 1))).

  Args:
    epoch: scalar (python or traced) 0-based epoch.
    warmup_epochs: W; 0 disables warm-up.
    epochs: E, total epochs.

  Returns:
    The multiplicative lr factor, same kind as `epoch`.
  """
  e1 = epoch + 1.0
  w = float(warmup_epochs)
  # 0.5 * (1 + cos(x)) written as cos(x/2)^2: no cancellation near the end
  # of training, where float32 1 + cos(x) loses most digits.
  cosine = jnp.cos(0.5 * jnp.pi * (e1 - w) / (epochs - w + 1.0)) ** 2
  if warmup_epochs <= 0:
    return cosine
  return jnp.where(e1 <= w, e1 / w, cosine)


def epoch_schedule(base_lr: float, *, warmup_epochs: int, epochs: int,
                   steps_per_epoch: int) -> Schedule:
  """Released schedule: constant within an epoch, stepped at epoch ends.

  Args:
    base_lr: peak learning rate.
    warmup_epochs: W.
    epochs: E.
    steps_per_epoch: optimizer steps in one epoch (> 0).

  Returns:
    `step -> lr` (jittable).
  """
  return _factor_schedule(base_lr, warmup_epochs=warmup_epochs, epochs=epochs,
                          steps_per_epoch=steps_per_epoch, fractional=False)


def step_schedule(base_lr: float, *, warmup_epochs: int, epochs: int,
                  steps_per_epoch: int) -> Schedule:
  """Smooth version: the same curve evaluated at fractional epochs.

  At the first step of every epoch it equals `epoch_schedule`, whose
  arguments it takes.

  Returns:
    `step -> lr` (jittable).
  """
  return _factor_schedule(base_lr, warmup_epochs=warmup_epochs, epochs=epochs,
                          steps_per_epoch=steps_per_epoch, fractional=True)


def _factor_schedule(base_lr, *, warmup_epochs, epochs, steps_per_epoch,
                     fractional: bool) -> Schedule:
  """`step -> base_lr * epoch_factor(epoch of step)`, for both schedules.

  Args:
    base_lr, warmup_epochs, epochs, steps_per_epoch: as `epoch_schedule`.
    fractional: True -> epoch = step / steps_per_epoch (smooth); False -> the
      whole epochs done (integer division), so the lr only changes when an
      epoch ends, as the released per-epoch scheduler does.

  Returns:
    `step -> lr` (jittable).
  """
  _check_steps(steps_per_epoch)

  def schedule(step):
    if fractional:
      epoch = jnp.asarray(step, jnp.float32) / steps_per_epoch
    else:
      epoch = (jnp.asarray(step) // steps_per_epoch).astype(jnp.float32)
    return base_lr * epoch_factor(epoch, warmup_epochs=warmup_epochs,
                                  epochs=epochs)
  return schedule


SCHEDULES = {'epoch': epoch_schedule, 'step': step_schedule}


def make_schedule(optim_cfg, steps_per_epoch: int) -> Schedule:
  """Builds the lr schedule named by `optim_cfg.schedule` ('epoch' | 'step')."""
  if optim_cfg.schedule not in SCHEDULES:
    raise ValueError(f'Unknown optim.schedule {optim_cfg.schedule!r}; '
                     f'valid: {sorted(SCHEDULES)}')
  return SCHEDULES[optim_cfg.schedule](
      optim_cfg.lr, warmup_epochs=optim_cfg.warmup_epochs,
      epochs=optim_cfg.epochs, steps_per_epoch=steps_per_epoch)


def make_optimizer(optim_cfg, steps_per_epoch: int, trainable_mask=None
                   ) -> optax.GradientTransformation:
  """SGD + schedule from `config.optim`.

  Args:
    optim_cfg: `config.optim` (lr, momentum, weight_decay, epochs,
      warmup_epochs, schedule).
    steps_per_epoch: optimizer steps per epoch (for the schedule).
    trainable_mask: None -> the transformation trains every leaf it is given
      (train.py hands it the trainable sub-tree from `partition_params`).
      A bool pytree matching the full params -> frozen leaves get zero updates
      and, because optax.multi_transform masks the inner state, no state.

  Returns:
    An optax GradientTransformation.
  """
  tx = sgd(make_schedule(optim_cfg, steps_per_epoch),
           momentum=optim_cfg.momentum, weight_decay=optim_cfg.weight_decay)
  multipliers = parse_lr_multipliers(optim_cfg.get('lr_multipliers', ''))
  if multipliers:
    tx = optax.chain(tx, scale_by_path(multipliers))
  if trainable_mask is None:
    return tx
  labels = jax.tree.map(lambda t: 'train' if t else 'frozen', trainable_mask)
  return optax.multi_transform(
      {'train': tx, 'frozen': optax.set_to_zero()}, labels)


def parse_lr_multipliers(spec: str) -> dict:
  """'concept_generator=0.01,code_head=2' -> {'concept_generator': 0.01, ...}.

  Raises:
    ValueError: an entry is not `name=positive number`.
  """
  out = {}
  for entry in filter(None, (e.strip() for e in spec.split(','))):
    name, sep, value = entry.partition('=')
    try:
      factor = float(value)
    except ValueError:
      factor = float('nan')
    if not sep or not name.strip() or not factor > 0:
      raise ValueError(
          f'optim.lr_multipliers entry {entry!r}: expected '
          f'module_name=positive_number, e.g. "concept_generator=0.01"')
    out[name.strip()] = factor
  return out


def scale_by_path(multipliers: dict) -> optax.GradientTransformation:
  """Multiplies the updates of leaves whose path has a named module.

  After SGD's momentum and lr this is exactly a per-module learning rate
  (the update is linear in lr). A leaf under several names gets the product.

  Args:
    multipliers: {module name (one path component): factor}.

  Returns:
    A stateless optax GradientTransformation.
  """
  def names(path):
    return {getattr(k, 'key', getattr(k, 'name', None)) for k in path}

  def factor(path):
    found = names(path)
    return float(np.prod([f for n, f in multipliers.items() if n in found]))

  def scale(path, update):
    f = factor(path)  # Python float at trace time: no op where it is 1.
    return update * f if f != 1.0 else update

  def update_fn(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(scale, updates), state

  def init_fn(params):
    # A misspelt module name would silently train at the base lr.
    seen = set()
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
      seen |= names(path)
    unknown = sorted(set(multipliers) - seen)
    if unknown:
      raise ValueError(f'optim.lr_multipliers names {unknown}, which no '
                       f'trained parameter path contains; modules: '
                       f'{sorted(n for n in seen if isinstance(n, str))}')
    return optax.EmptyState()

  return optax.GradientTransformation(init_fn, update_fn)


def partition_params(params, trainable_mask):
  """Splits a nested params dict into (trainable, frozen) nested dicts.

  Differentiating only w.r.t. `trainable` spares the backward pass the weight
  gradients of the frozen CLIP matrices, and the optimizer then keeps state
  for the trainable leaves alone.

  Args:
    params: nested dict of arrays.
    trainable_mask: same structure, bool leaves.

  Returns:
    (trainable, frozen): two nested dicts whose union is `params`.
  """
  flat = traverse_util.flatten_dict(params)
  flat_mask = traverse_util.flatten_dict(trainable_mask)
  if set(flat) != set(flat_mask):
    missing = sorted('/'.join(k) for k in set(flat) ^ set(flat_mask))[:5]
    raise ValueError(f'trainable_mask does not match params, e.g. {missing}')
  trainable = {k: v for k, v in flat.items() if flat_mask[k]}
  frozen = {k: v for k, v in flat.items() if not flat_mask[k]}
  return (traverse_util.unflatten_dict(trainable),
          traverse_util.unflatten_dict(frozen))


def merge_params(trainable, frozen):
  """Inverse of `partition_params`: one nested dict with every leaf."""
  flat = dict(traverse_util.flatten_dict(frozen))
  flat.update(traverse_util.flatten_dict(trainable))
  return traverse_util.unflatten_dict(flat)


def _check_steps(steps_per_epoch):
  """Raises a clear error for a schedule without steps."""
  if int(np.asarray(steps_per_epoch)) <= 0:
    raise ValueError(f'steps_per_epoch must be > 0, got {steps_per_epoch} '
                     '(is the train split smaller than one batch?)')
