"""Orbax checkpoints of the TrainState: periodic, best-by-mAP@R, and on SIGTERM.

Kept under `workdir/checkpoints/<step>/`: the latest `keep` steps plus the one
with the best eval mAP@R (its metrics are stored beside it). A SIGTERM
(preemption, `kill`, Ctrl-\\) only sets a flag (preemption.py); the loop notices
it at the next check, saves the current step and returns normally, so no write is
torn.

Resume order (first that exists wins), as `restore_or_initialize` implements:
  1. workdir: the newest checkpoint in this run's own directory (a restarted
     or preempted run continues where it stopped, step, optimizer and rng
     included, so it ends bit-identical to an uninterrupted run);
  2. config.train.resume: the newest checkpoint of another run's workdir
     (full state: continue that run under a new workdir);
  3. config.train.init: params and model state of another run's checkpoint,
     with a fresh step, optimizer state and rng (fine-tune from it);
  4. scratch: `init_fn()` (pretrained CLIP + freshly initialised new parts).

A checkpoint that cannot be read (a torn or damaged file in its step
directory) is skipped with a warning naming its step and path, and the newest
readable one is used instead; it is never deleted. Before this run writes its
own checkpoints it moves such a step aside to `checkpoints_unreadable/` (the
same step number would otherwise collide with the one it saves next).
"""
import errno
import json
import os
import shutil
import sys
from typing import Any, Callable, Optional

from absl import logging
import jax
import orbax.checkpoint as ocp

from concepthash_jax import errors

METRIC = 'map_at_r'
_pp = ocp.checkpoint_managers.preservation_policy


def step_dirs(directory: str) -> list:
  """Steps with a finished checkpoint directory under `directory`, ascending.

  Orbax writes into '<step>.orbax-checkpoint-tmp-*' and renames it to '<step>'
  when complete, so only all-digit names count.
  """
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory)
                if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def _metrics_path(directory: str, step: int) -> str:
  return os.path.join(directory, str(step), 'metrics', 'metrics')


def _read_metrics(directory: str, step: int):
  """The metrics saved with `step` (None without any); raises when unparsable."""
  path = _metrics_path(directory, step)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _does_not_fit(error: Exception) -> bool:
  """Whether orbax refused a readable checkpoint for its shapes or tree."""
  text = str(error)
  return isinstance(error, ValueError) and (
      'not compatible with the stored shape' in text
      or 'tree structures do not match' in text)


def _disk_full(error: BaseException) -> bool:
  """Whether a save failed for want of space (orbax/tensorstore or the OS)."""
  for _ in range(8):  # The error, its cause, their causes (bounded).
    if error is None:
      return False
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC,
                                                      errno.EDQUOT):
      return True
    text = str(error)
    if 'RESOURCE_EXHAUSTED' in text or 'No space left on device' in text:
      return True
    error = error.__cause__ or error.__context__
  return False


def _without_closed_loop_noise(hook):
  """`hook` minus the 'Event loop is closed' that failed orbax writes leave.

  When one write of a save fails, orbax closes its event loop while the other
  writes still finish; each of their callbacks then reports the closed loop
  as an unraisable exception, a traceback apiece after the real error.
  """
  def filtered(unraisable):
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and 'Event loop is closed' in str(value):
      return
    hook(unraisable)
  return filtered


class Checkpointer:
  """Thin wrapper over ocp.CheckpointManager with our retention rules.

  Reading (steps, best, restore) looks at the directory itself, so an
  unreadable step is skipped instead of failing the whole directory; the
  orbax manager (which parses every step's metrics when it opens) is created
  only for the first write.
  """

  def __init__(self, directory: str, *, keep: int = 2):
    """Opens `directory` (created at the first save); keeps the latest `keep` and the best."""
    self.directory = os.path.abspath(directory)
    self._keep = keep
    self._manager = None
    self.unreadable = {}  # step -> why it cannot be read.
    for step in step_dirs(self.directory):
      try:
        _read_metrics(self.directory, step)
      except (OSError, ValueError) as e:
        self._mark_unreadable(step, e)

  def _mark_unreadable(self, step: int, error: Exception):
    """Records `step` as unreadable and says so (once per step)."""
    if step in self.unreadable:
      return
    self.unreadable[step] = f'{type(error).__name__}: {error}'
    logging.warning(
        'Skipping checkpoint step %d: %s cannot be read (%s); using the newest '
        'readable checkpoint instead. The unreadable one is left on disk.',
        step, os.path.join(self.directory, str(step)),
        str(self.unreadable[step])[:300])

  @property
  def manager(self) -> ocp.CheckpointManager:
    """The orbax manager, opened on first use (after moving unreadable steps aside)."""
    if self._manager is None:
      self._set_aside_unreadable()
      policy = _pp.AnyPreservationPolicy([
          _pp.LatestN(n=max(1, self._keep)),
          _pp.BestN(get_metric_fn=lambda m: m[METRIC], n=1,
                    keep_checkpoints_without_metrics=False),
      ])
      self._manager = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(
              preservation_policy=policy, best_fn=lambda m: m[METRIC],
              best_mode='max', create=True,
              # Synchronous: a SIGTERM exit must not race a background write.
              enable_async_checkpointing=False))
    return self._manager

  def _set_aside_unreadable(self):
    """Moves unreadable steps to a sibling folder before this run writes.

    Kept, not deleted: it may be inspected or repaired. In place, the step
    number would clash with the step this run saves next, and orbax's
    manager fails to open over a step whose metrics do not parse.
    """
    if jax.process_index() != 0:
      return
    aside = self.directory.rstrip(os.sep) + '_unreadable'
    for step in sorted(self.unreadable):
      source = os.path.join(self.directory, str(step))
      if not os.path.isdir(source):
        continue
      target, n = os.path.join(aside, str(step)), 1
      while os.path.exists(target):
        target, n = os.path.join(aside, f'{step}-{n}'), n + 1
      os.makedirs(aside, exist_ok=True)
      shutil.move(source, target)
      logging.warning('Moved unreadable checkpoint step %d from %s to %s '
                      '(kept; this run saves new checkpoints in its place).',
                      step, source, target)

  def latest_step(self) -> Optional[int]:
    """Newest saved step that is not known to be unreadable, or None."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def best_step(self) -> Optional[int]:
    """Step with the highest saved mAP@R (the later one on a tie), or None."""
    scores = {}
    for step in self.all_steps():
      try:
        metrics = _read_metrics(self.directory, step)
      except (OSError, ValueError) as e:
        self._mark_unreadable(step, e)
        continue
      if metrics and METRIC in metrics:
        scores[step] = float(metrics[METRIC])
    return max(scores, key=lambda s: (scores[s], s)) if scores else None

  def all_steps(self):
    """All retained readable steps, ascending."""
    return [s for s in step_dirs(self.directory) if s not in self.unreadable]

  def save(self, step: int, state, *, map_at_r: Optional[float] = None):
    """Saves `state` at `step` (metrics mark it as a best candidate).

    Re-saving an existing step is skipped (e.g. a periodic save followed by
    the eval save of the same step), except that metrics are added by
    replacing it.
    """
    step = int(step)
    manager = self.manager
    if step in manager.all_steps():
      if map_at_r is None:
        return
      manager.delete(step)
    metrics = None if map_at_r is None else {METRIC: float(map_at_r)}
    hook = sys.unraisablehook
    sys.unraisablehook = _without_closed_loop_noise(hook)
    disk_full = False
    try:
      manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics,
                   force=True)
      manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      if not _disk_full(e):
        raise
      # The filter stays: the failed writes' callbacks keep firing after this
      # returns.
      disk_full = True
      self._remove_partial(step)
      kept = [s for s in self.all_steps() if s != step]
      resume = (f'a rerun resumes from step {kept[-1]}' if kept else
                'no earlier checkpoint is kept: a rerun starts from step 0')
      raise errors.CheckpointError(
          f'Cannot save checkpoint step {step} in {self.directory}: the disk '
          f'is full; free space there and rerun the same command ({resume})'
      ) from e
    finally:
      if not disk_full:
        sys.unraisablehook = hook

  def _remove_partial(self, step: int):
    """Deletes the temporary folder of a save of `step` that failed (frees its space)."""
    if jax.process_index() != 0 or not os.path.isdir(self.directory):
      return
    for name in os.listdir(self.directory):
      if name.startswith(f'{step}.orbax-checkpoint-tmp'):
        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

  def restore(self, abstract_state, step: Optional[int] = None, *,
              fallback: bool = False, partial: bool = False):
    """Restores a step into the structure/shardings given.

    Args:
      abstract_state: pytree of jax.ShapeDtypeStruct with `.sharding`.
      step: which step; None = the newest one that can be read (unreadable
        newer ones are skipped with a warning naming them).
      fallback: when `step` cannot be read, warn and use the newest readable
        step instead of failing (for a step picked as latest/best, not one
        the user asked for).
      partial: `abstract_state` names only some of the saved entries (a dict
        of top-level TrainState fields); only those are read, so a reader
        needs no optimizer to rebuild the rest.

    Returns:
      The restored state (jax.Arrays placed per the shardings).

    Raises:
      CheckpointError: naming the directory (and each step's problem) when
        no checkpoint (or the requested `step`) can be read.
    """
    if step is not None and not fallback:
      try:
        return self._restore_step(abstract_state, step, partial)
      except Exception as e:  # pylint: disable=broad-except
        raise errors.CheckpointError(
            f'Checkpoint step {step} at {self._step_path(step)} cannot be '
            f'read ({type(e).__name__}: {str(e)[:300]}); pick another step '
            f'of {self.all_steps()}') from e
    candidates = [] if step is None else [step]
    candidates += [s for s in reversed(self.all_steps()) if s != step]
    for candidate in candidates:
      try:
        return self._restore_step(abstract_state, candidate, partial)
      except Exception as e:  # pylint: disable=broad-except
        if _does_not_fit(e):  # Intact, but another model: older ones too.
          raise errors.CheckpointError(
              f'Checkpoint step {candidate} at {self._step_path(candidate)} '
              'does not fit the model of this config (another nbit, '
              'num_concepts, CLIP or class count: compare the config.json '
              f'beside it): {str(e)[:200]}') from e
        # Orbax reports damage as JSON, tensorstore, OS or value errors.
        self._mark_unreadable(candidate, e)
    if not self.unreadable:
      raise errors.CheckpointError(f'No checkpoint in {self.directory}')
    problems = '; '.join(f'step {s}: {why[:200]}'
                         for s, why in sorted(self.unreadable.items()))
    raise errors.CheckpointError(
        f'No readable checkpoint in {self.directory} ({problems}); move the '
        'unreadable step folders out of it, or use another run directory')

  def _step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _restore_step(self, abstract_state, step: int, partial: bool = False):
    """Reads one step's state with a plain orbax checkpointer (no manager)."""
    if step not in step_dirs(self.directory):
      raise FileNotFoundError(f'no directory {self._step_path(step)}')
    path = os.path.join(self._step_path(step), 'default')
    if partial:
      with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as reader:
        return reader.restore(path, args=ocp.args.PyTreeRestore(
            item=abstract_state, partial_restore=True,
            restore_args=ocp.checkpoint_utils.construct_restore_args(
                abstract_state)))
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as reader:
      return reader.restore(path, args=ocp.args.StandardRestore(abstract_state))

  def close(self):
    """Waits for pending writes and releases the manager."""
    if self._manager is not None:
      self._manager.wait_until_finished()
      self._manager.close()


def checkpoint_dir(workdir: str) -> str:
  """Where a run keeps its checkpoints."""
  return os.path.join(workdir, 'checkpoints')


def restore_or_initialize(checkpointer: Checkpointer, abstract_state, *,
                          init_fn: Callable[[], Any], resume: str = '',
                          init: str = '',
                          reset_fn: Optional[Callable[[Any, Any], Any]] = None):
  """Returns (state, source) following the resume order in the module docstring.

  Args:
    checkpointer: this run's checkpointer (workdir/checkpoints).
    abstract_state: ShapeDtypeStruct tree (with shardings) of the TrainState.
    init_fn: () -> fresh TrainState (scratch).
    resume: another run's workdir to continue from (full state), or ''.
    init: another run's workdir whose params seed this run, or ''.
    reset_fn: (fresh_state, restored_state) -> state taking params and model
      state from `restored_state`; required when `init` is given.

  Returns:
    (state, source) with source one of 'workdir', 'resume', 'init', 'scratch'.
  """
  if checkpointer.latest_step() is not None:
    return checkpointer.restore(abstract_state), 'workdir'
  for name, path in (('train.resume', resume), ('train.init', init)):
    if path and not os.path.isdir(checkpoint_dir(path)):
      raise errors.MissingFileError(
          f'config.{name}={path!r} is not a run directory: no '
          f'{checkpoint_dir(path)}')
  if resume:
    other = Checkpointer(checkpoint_dir(resume))
    try:
      return other.restore(abstract_state), 'resume'
    finally:
      other.close()
  if init:
    other = Checkpointer(checkpoint_dir(init))
    try:
      restored = other.restore(abstract_state)
    finally:
      other.close()
    return reset_fn(init_fn(), restored), 'init'
  return init_fn(), 'scratch'
