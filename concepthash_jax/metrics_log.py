"""Training metrics out of the loop: metrics.jsonl, TensorBoard and the tqdm bar.

Process 0 writes; other processes keep the same object silent, so the loop
has no process branches. Step metrics stay on the device until `take_means`
fetches them all at once (one host sync per log interval).
"""
import json
import os
import time

from absl import logging
import jax
import numpy as np
import tqdm

from concepthash_jax import run_files
from concepthash_jax import safe_files


def _parse_line(line: str, path: str):
  """One metrics line as a dict; None for a blank or torn one (said once).

  A run killed while appending leaves a partial last line; the steps after
  its checkpoint are replayed, so dropping that line loses nothing.
  """
  if not line.strip():
    return None
  try:
    record = json.loads(line)
  except ValueError:
    logging.warning('Dropping an unreadable line of %s (a run killed while '
                    'writing it): %r', path, line[:80])
    return None
  return record if isinstance(record, dict) else None


class MetricsLogger:
  """Accumulates step metrics and writes their means, eval scalars, messages.

  Attributes:
    history: the metrics.jsonl lines kept from before `start_step` (resume).
  """

  def __init__(self, workdir: str, *, start_step: int, total_steps: int,
               batch_size: int):
    """Opens the files; a resumed run drops the lines after `start_step`.

    Args:
      workdir: run directory.
      start_step: the step training starts (or resumes) from.
      total_steps: the last step (the bar's total).
      batch_size: global batch size (images per step, for img/s).
    """
    self.active = jax.process_index() == 0
    self.batch_size = batch_size
    self.history = []
    self.last_loss = None  # The last step's loss once `take_means` ran.
    self._pending = []  # Device metric dicts not yet fetched.
    self._t_start, self._count = time.perf_counter(), 0
    self.bar = tqdm.tqdm(total=total_steps, initial=start_step, unit='step',
                         dynamic_ncols=True, disable=not self.active)
    if not self.active:
      return
    path = os.path.join(workdir, run_files.METRICS_FILE)
    # A resumed run replays the steps after its checkpoint: drop their lines.
    kept = []  # (line, its record)
    if os.path.exists(path):
      with open(path) as f:
        parsed = [(l, _parse_line(l, path)) for l in f]
      kept = [(l, r) for l, r in parsed
              if (r or {}).get('step', start_step + 1) <= start_step]
    # Replaced atomically: a crash here must not lose the kept history.
    safe_files.write_text(path, ''.join(
        l if l.endswith('\n') else l + '\n' for l, _ in kept))
    self.history = [r for _, r in kept]
    self.jsonl = open(path, 'a')
    import tensorboardX  # pylint: disable=g-import-not-at-top
    self.tb = tensorboardX.SummaryWriter(
        os.path.join(workdir, run_files.TENSORBOARD_DIR))

  def last_logged(self, key: str):
    """The last value of `key` in the kept history, or None."""
    values = [h[key] for h in self.history if key in h]
    return values[-1] if values else None

  def final_loss(self) -> float:
    """The last step's loss; from the kept history when nothing ran here."""
    if self.last_loss is not None:
      return self.last_loss
    logged = self.last_logged('train/loss')
    return float('nan') if logged is None else logged

  def best_logged(self, key: str):
    """The largest value of `key` in the kept history, or None."""
    return max((h[key] for h in self.history if key in h), default=None)

  def add_step(self, metrics: dict):
    """Records one step's (device) metrics and advances the bar."""
    self._pending.append(metrics)
    self._count += 1
    self.bar.update(1)

  def take_means(self):
    """Fetches the pending step metrics: {'train/<k>': mean}, or None if none.

    'train/lr' is the last step's; 'train/img_per_sec' covers the steps since
    the previous call; 'last_loss' (not logged) is the last step's loss.
    """
    if not self._pending:
      return None
    fetched = jax.device_get(self._pending)
    means = {f'train/{k}': float(np.mean([m[k] for m in fetched]))
             for k in fetched[0] if k != 'total'}  # 'total' == 'loss'.
    means['train/lr'] = float(fetched[-1]['lr'])
    seconds = time.perf_counter() - self._t_start
    means['train/img_per_sec'] = (self._count * self.batch_size
                                  / max(seconds, 1e-9))
    self.last_loss = float(fetched[-1]['loss'])
    self._pending, self._t_start, self._count = [], time.perf_counter(), 0
    return means

  def write(self, step: int, scalars: dict):
    """Writes scalars named 'train/...' / 'eval/...' at `step`."""
    if 'train/loss' in scalars:
      self.bar.set_postfix(loss=f'{scalars["train/loss"]:.4f}',
                           img_s=f'{scalars["train/img_per_sec"]:.1f}')
    if not self.active:
      return
    self.jsonl.write(json.dumps({'step': int(step), **{
        k: float(v) for k, v in scalars.items()}}) + '\n')
    self.jsonl.flush()
    for k, v in scalars.items():
      self.tb.add_scalar(k, float(v), int(step))
    self.tb.flush()

  def message(self, text: str):
    """A line above the bar (process 0) and in the log."""
    if self.active:
      self.bar.write(text)
    logging.info(text)

  def close(self):
    """Closes the bar and the files."""
    self.bar.close()
    if self.active:
      self.jsonl.close()
      self.tb.close()
