"""Orbax checkpoints of the TrainState: periodic, best-by-mAP@R, and on SIGTERM.

Kept under `workdir/checkpoints/<step>/`: the latest `keep` steps plus the one
with the best eval mAP@R (its metrics are stored beside it). A SIGTERM
(preemption, `kill`, Ctrl-\\) only sets a flag; the loop notices it at the next
check, saves the current step and returns normally, so no write is torn.

Resume order (first that exists wins), as `restore_or_initialize` implements:
  1. workdir: the newest checkpoint in this run's own directory (a restarted
     or preempted run continues where it stopped, step, optimizer and rng
     included, so it ends bit-identical to an uninterrupted run);
  2. config.train.resume: the newest checkpoint of another run's workdir
     (full state: continue that run under a new workdir);
  3. config.train.init: params and model state of another run's checkpoint,
     with a fresh step, optimizer state and rng (fine-tune from it);
  4. scratch: `init_fn()` (pretrained CLIP + freshly initialised new parts).
"""
import functools
import os
import signal
import threading
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

METRIC = 'map_at_r'
_pp = ocp.checkpoint_managers.preservation_policy


class PreemptionFlag:
  """Set by SIGTERM (and by jax's preemption service on multi-host jobs)."""

  def __init__(self):
    self._event = threading.Event()
    self._previous = None

  def install(self):
    """Installs the SIGTERM handler (main thread only; a no-op elsewhere)."""
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def uninstall(self):
    """Restores the handler that was there before `install`."""
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    """Signal handler: only records the request, the loop does the work."""
    self._event.set()

  def set(self):
    """Requests a stop as SIGTERM would (tests, callers)."""
    self._event.set()

  def requested(self, step: int) -> bool:
    """True when this process got SIGTERM or the job reached a preemption point.

    Args:
      step: the current step (for jax's multi-host preemption sync point).

    Returns:
      Whether the loop should save and stop now. On multi-host jobs every
      process must call this at the same steps; the result is agreed by an
      all-reduce so all processes save the same step.
    """
    local = self._event.is_set()
    try:
      synced = bool(ocp.multihost.reached_preemption(step))
    except Exception:  # pylint: disable=broad-except
      synced = False  # No preemption service (single process).
    return _any_process(local) or synced


def _any_process(flag: bool) -> bool:
  """Logical OR of a host-local bool over all processes."""
  # One scalar per local device, reduced over every device of the job;
  # identical code on one process (it reduces over its own devices only).
  mesh, reduce_max = _flag_reducer()
  local = np.full((len(jax.local_devices()),), flag, np.int32)
  arr = jax.make_array_from_process_local_data(
      jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('p')), local)
  return bool(np.asarray(reduce_max(arr)))


@functools.lru_cache(maxsize=None)
def _flag_reducer():
  """(mesh over all devices, jitted replicated max), built once."""
  mesh = jax.make_mesh((jax.device_count(),), ('p',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  out = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return mesh, jax.jit(lambda x: x.max(), out_shardings=out)


class Checkpointer:
  """Thin wrapper over ocp.CheckpointManager with our retention rules."""

  def __init__(self, directory: str, *, keep: int = 2):
    """Opens (creating) `directory`; keeps the latest `keep` and the best."""
    policy = _pp.AnyPreservationPolicy([
        _pp.LatestN(n=max(1, keep)),
        _pp.BestN(get_metric_fn=lambda m: m[METRIC], n=1,
                  keep_checkpoints_without_metrics=False),
    ])
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            preservation_policy=policy, best_fn=lambda m: m[METRIC],
            best_mode='max', create=True,
            # Synchronous: a SIGTERM exit must not race a background write.
            enable_async_checkpointing=False))

  def latest_step(self) -> Optional[int]:
    """Newest saved step, or None."""
    return self.manager.latest_step()

  def best_step(self) -> Optional[int]:
    """Step with the highest saved mAP@R, or None."""
    return self.manager.best_step()

  def all_steps(self):
    """All retained steps, ascending."""
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, *, map_at_r: Optional[float] = None):
    """Saves `state` at `step` (metrics mark it as a best candidate).

    Re-saving an existing step is skipped (e.g. a periodic save followed by
    the eval save of the same step), except that metrics are added by
    replacing it.
    """
    step = int(step)
    if step in self.manager.all_steps():
      if map_at_r is None:
        return
      self.manager.delete(step)
    metrics = None if map_at_r is None else {METRIC: float(map_at_r)}
    self.manager.save(step, args=ocp.args.StandardSave(state),
                      metrics=metrics, force=True)
    self.manager.wait_until_finished()

  def restore(self, abstract_state, step: Optional[int] = None):
    """Restores `step` (default: latest) into the structure/shardings given.

    Args:
      abstract_state: pytree of jax.ShapeDtypeStruct with `.sharding`.
      step: which step; None = latest.

    Returns:
      The restored state (jax.Arrays placed per the shardings).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'No checkpoint in {self.directory}')
    return self.manager.restore(
        step, args=ocp.args.StandardRestore(abstract_state))

  def close(self):
    """Waits for pending writes and releases the manager."""
    self.manager.wait_until_finished()
    self.manager.close()


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
      raise FileNotFoundError(f'{name}={path!r}: no {checkpoint_dir(path)}')
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
