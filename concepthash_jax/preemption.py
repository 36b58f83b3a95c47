"""A stop request by SIGTERM or by JAX's preemption service, agreed by all processes.

The signal handler only records the request; the training loop asks
`PreemptionFlag.requested` at its checks, saves the current step and returns
normally, so no write is torn. On a multi-host job every process asks at the
same steps and the answer is an all-reduce, so all of them save the same step.
"""
import functools
import signal
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp


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
    return any_process(local) or synced


def any_process(flag: bool) -> bool:
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
