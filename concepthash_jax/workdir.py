"""A run's workdir: one run at a time, a config its checkpoints can continue, a history.

`guarded` wraps `train_and_evaluate(config, workdir)`:
  0. folder: a workdir is a new or empty folder, or one that already is a
     workdir (marker `.concepthash_jax` of kind 'workdir', or a run's files:
     config.json with checkpoints/, config_history.jsonl, metrics.jsonl,
     run.lock); an
     export, a cache or a folder holding other files is refused untouched;
     the marker is written when the run starts;
  1. lock: `WorkdirLock` (process 0): a second run on a busy
     workdir stops at once, naming the process that holds it;
  2. config: when the workdir holds a checkpoint, the new config is compared
     with the stored config.json; a changed key that is not in `HARMLESS`
     is an error naming each key old -> new and the ways on; harmless changes
     are logged;
  3. history: every start appends {time, step, changed, config} to
     config_history.jsonl (the config.json found there first, when the history
     is new), so rewriting config.json loses no record of what a checkpoint
     was trained with;
  4. failure: a workdir that this call created and that holds nothing but the
     guard's own files is removed again (no empty run directories).
"""
import datetime
import functools
import json
import os
import shutil
import socket
from typing import Optional

from absl import logging
import jax

from concepthash_jax import checkpointing
from concepthash_jax import errors
from concepthash_jax import preemption
from concepthash_jax import run_files
from concepthash_jax import safe_files

CONFIG_FILE = run_files.CONFIG_FILE
HISTORY_FILE = 'config_history.jsonl'
WORKDIR_KIND = 'workdir'  # safe_files marker kind of a run directory.

# Keys whose change leaves the saved state valid and its meaning intact, with
# the reason: allowed when resuming, logged and recorded in the history. Every
# other key (model.*, loss.*, optim.*, seed, and the data keys that decide
# classes, images, augmentation and batches) changes the state's shapes or what
# continuing it means, so changing it on a workdir with checkpoints is an error.
HARMLESS = {
    'train.log_every_steps': 'logging frequency',
    'train.checkpoint_every_steps': 'saving frequency',
    'train.keep_checkpoints': 'retention',
    'train.max_steps': 'where this invocation stops',
    'train.fsdp': 'placement of the same arrays',
    'train.cpu_concurrency_scheduler': 'XLA scheduling, same values',
    'train.cpu_matmul': 'XLA:CPU matmul library, same values up to float rounding',
    'train.compilation_cache': 'where compiled programs are kept, same programs',
    'train.compilation_cache_dir': 'where compiled programs are kept, same programs',
    'train.resume': 'ignored once the workdir has a checkpoint',
    'train.init': 'ignored once the workdir has a checkpoint',
    'eval.every_epochs': 'evaluation frequency',
    'eval.ties': 'how mAP@R is reported, not what is trained',
    'eval.R': 'how mAP@R is reported, not what is trained',
    'data.eval_batch_size': 'encoding batch, same codes',
    'data.num_workers': 'input parallelism, same batches',
    'data.worker_type': 'input parallelism, same batches',
    'data.root': 'where the same dataset lives',
    'data.tfds_data_dir': 'where the same dataset lives',
    'data.on_corrupt': 'only matters when a file is damaged',
    'data.cache': 'where the same first-stage pixels are read from',
    'data.cache_dir': 'where the same first-stage pixels are read from',
    'model.remat': 'memory of the backward pass, same values',
}


def flatten(tree: dict, prefix: str = '') -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1}."""
  flat = {}
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, dict):
      flat.update(flatten(value, name + '.'))
    else:
      flat[name] = value
  return flat


def config_changes(old: dict, new: dict) -> tuple:
  """Splits the differences between two configs (nested dicts, as in config.json).

  Keys present on one side only (a config written by another code version)
  are not compared.

  Returns:
    (breaking, harmless): each {key: (old value, new value)}.
  """
  old, new = flatten(old), flatten(new)
  changed = {k: (old[k], new[k]) for k in sorted(old.keys() & new.keys())
             if old[k] != new[k]}
  breaking = {k: v for k, v in changed.items() if k not in HARMLESS}
  harmless = {k: v for k, v in changed.items() if k in HARMLESS}
  return breaking, harmless


def mismatch_message(workdir: str, step: int, breaking: dict) -> str:
  """One sentence: which keys changed, and how to proceed."""
  listed = ', '.join(f'config.{k}: {old!r} -> {new!r}'
                     for k, (old, new) in breaking.items())
  return (f'{workdir} holds checkpoints (step {step}) of a run with a different '
          f'config ({listed}; stored in {os.path.join(workdir, CONFIG_FILE)}); '
          'drop these overrides to continue that run, or start a new --workdir '
          f'(from scratch, or with --config.train.resume={workdir} for its full '
          f'state or --config.train.init={workdir} for its weights, when the '
          'parameter shapes are unchanged)')


def _read_json(path: str):
  """Parsed JSON file, or None when absent; DataError naming it when unparsable."""
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:
    raise errors.DataError(f'{path} is not valid JSON ({e}); restore it from '
                           f'{HISTORY_FILE} or use a new --workdir') from e


def _append_history(workdir: str, stored, record: dict):
  """Appends `record` to the history (seeded with the previously stored config)."""
  path = os.path.join(workdir, HISTORY_FILE)
  lines = []
  if stored is not None and not os.path.exists(path):
    mtime = os.path.getmtime(os.path.join(workdir, CONFIG_FILE))
    lines.append({'time': _iso(datetime.datetime.fromtimestamp(mtime)),
                  'step': None, 'note': f'{CONFIG_FILE} found before the '
                  'history began', 'changed': {}, 'config': stored})
  lines.append(record)
  kept = ''
  if os.path.exists(path):
    with open(path) as f:
      kept = f.read()
    # A run killed while writing could leave a partial last line: drop it.
    kept = kept[:kept.rfind('\n') + 1]
  # Rewritten whole by temporary name and rename: the history is never torn.
  safe_files.write_text(path, kept + ''.join(json.dumps(l) + '\n' for l in lines))


def _iso(moment) -> str:
  return moment.isoformat(timespec='seconds')


def check_and_record(workdir: str, config_dict: dict):
  """Step 2 + 3 of the module docstring for one run start.

  Args:
    workdir: the run directory (exists).
    config_dict: the new config as nested dicts (json of the ConfigDict).

  Raises:
    WorkdirError: a key outside HARMLESS differs from the stored config while
      the workdir holds a checkpoint.
  """
  stored = _read_json(os.path.join(workdir, CONFIG_FILE))
  steps = checkpointing.step_dirs(checkpointing.checkpoint_dir(workdir))
  step = steps[-1] if steps else None
  breaking, harmless = ({}, {}) if stored is None else config_changes(
      stored, config_dict)
  if breaking and step is not None:
    raise errors.WorkdirError(mismatch_message(workdir, step, breaking))
  changed = {**breaking, **harmless}
  if changed:
    logging.warning('Config of %s changed since its last run (%s); recorded '
                    'in %s.', workdir, ', '.join(
                        f'{k}: {o!r} -> {n!r}' for k, (o, n) in
                        changed.items()), HISTORY_FILE)
  if jax.process_index() == 0:
    _append_history(workdir, stored, {
        'time': _iso(datetime.datetime.now()), 'step': step,
        'changed': {k: list(v) for k, v in changed.items()},
        'config': config_dict})


def _is_run_config(path: str) -> bool:
  """Whether `path` is a run's config.json (not an export's, not a stranger's)."""
  try:
    with open(path) as f:
      stored = json.load(f)
  except (OSError, ValueError):
    return False
  return (isinstance(stored, dict) and 'format' not in stored and
          {'model', 'data'} <= stored.keys())


def is_workdir(folder: str) -> bool:
  """Whether `folder` is a run directory: its marker, or the files a run writes."""
  kind = safe_files.folder_kind(folder)
  if kind is not None:
    return kind == WORKDIR_KIND
  has = lambda name: os.path.exists(os.path.join(folder, name))
  if (has(HISTORY_FILE) or has(run_files.METRICS_FILE) or
      has(LOCK_FILE)):  # A run starting there holds the lock first.
    return True
  config = os.path.join(folder, CONFIG_FILE)
  return _is_run_config(config) or (
      has(CONFIG_FILE) and os.path.isdir(checkpointing.checkpoint_dir(folder)))


def check_folder(workdir: str):
  """Refuses a --workdir that is not new, empty or already a workdir.

  Raises:
    WorkdirError: one sentence naming the folder, what it holds and the fix.
  """
  if not os.path.lexists(workdir):
    blocker = safe_files.file_on_path(workdir)
    if blocker:
      raise errors.WorkdirError(
          f'--workdir={workdir}: {blocker} is a file, and a folder is needed '
          'there; choose another --workdir')
    return
  if not os.path.isdir(workdir):
    raise errors.WorkdirError(f'--workdir={workdir} is a file, not a folder; '
                              'give a new or empty folder for the run')
  kind = safe_files.folder_kind(workdir)
  entries = sorted(os.listdir(workdir))
  if not entries or is_workdir(workdir):
    return
  if kind is None and os.path.isfile(os.path.join(workdir,
                                                  'model.safetensors')):
    kind = 'export'
  what = (f'a concepthash_jax {kind} folder' if kind else
          'a folder holding other files (' + ', '.join(entries[:3]) +
          (', ...' if len(entries) > 3 else '') + ')')
  raise errors.WorkdirError(
      f'--workdir={workdir} is {what}, not a training workdir; a run would '
      'overwrite its files: give a new or empty folder, or the workdir of an '
      'earlier run to continue it')


def _holds_only(workdir: str, own_files) -> bool:
  """Whether `workdir` has no file except `own_files` (empty folders allowed)."""
  for folder, _, files in os.walk(workdir):
    if any(os.path.join(folder, f) not in own_files for f in files):
      return False
  return True


def guarded(train_fn):
  """Decorates `train_fn(config, workdir, ...)` with the steps of the module docstring."""

  @functools.wraps(train_fn)
  def wrapper(config, workdir, *args, **kwargs):
    workdir = os.path.abspath(workdir)
    check_folder(workdir)
    created = not os.path.exists(workdir)
    lock = WorkdirLock(workdir)
    busy = None
    if jax.process_index() == 0:
      safe_files.ensure_folder(workdir, 'run')
      try:
        lock.acquire()
      except errors.WorkdirError as e:
        busy = e
    if preemption.any_process(busy is not None):
      raise busy or errors.WorkdirError(
          f'{workdir} is in use by another run (see the log of process 0)')
    try:
      if jax.process_index() == 0 and safe_files.folder_kind(workdir) is None:
        safe_files.write_marker(workdir, WORKDIR_KIND)
      check_and_record(workdir, json.loads(config.to_json()))
      return train_fn(config, workdir, *args, **kwargs)
    except BaseException:
      own = {lock.path, os.path.join(workdir, HISTORY_FILE),
             os.path.join(workdir, safe_files.MARKER)}
      if created and jax.process_index() == 0 and _holds_only(workdir, own):
        lock.release()
        shutil.rmtree(workdir, ignore_errors=True)
      raise
    finally:
      lock.release()

  return wrapper


# ------------------------------------------------------------ workdir lock

LOCK_FILE = 'run.lock'


def _process_start(pid: int) -> Optional[str]:
  """Start time of `pid` in clock ticks since boot (Linux), to tell reused pids apart."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      fields = f.read().rsplit(')', 1)[1].split()
  except (OSError, IndexError):
    return None
  # fields[0] is the state (field 3 of stat); 'Z' = exited, not yet reaped.
  return None if fields[0] == 'Z' else fields[19]


def _alive(pid: int, start: Optional[str]) -> bool:
  """Whether process `pid` (started at `start`, if known) still runs on this host."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # Another user's process.
  now = _process_start(pid)
  if os.path.isdir('/proc') and now is None:
    return False  # Zombie, or gone since os.kill.
  return start is None or now is None or now == start


class WorkdirLock:
  """One run per workdir: `workdir/run.lock` names the process that holds it.

  Taken with O_EXCL, so two runs starting together cannot both win. A lock
  whose process is gone (same host, pid not running or reused) is stale: a
  SIGKILLed run must not block its own resume, so it is replaced with a
  warning. A lock from another host cannot be checked and is refused; the
  message says how to clear it. On a multi-host job only process 0 takes it
  (one job = one lock).
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    self.held = False

  def _holder(self) -> dict:
    """The lock file's record ({} when it cannot be parsed)."""
    try:
      with open(self.path) as f:
        return json.load(f)
    except (OSError, ValueError):
      return {}

  def acquire(self) -> 'WorkdirLock':
    """Takes the lock or raises WorkdirError naming the process that holds it."""
    me = {'pid': os.getpid(), 'host': socket.gethostname(),
          'start': _process_start(os.getpid()),
          'since': datetime.datetime.now().isoformat(timespec='seconds')}
    for _ in range(3):  # Retry after removing a stale lock (racing runs).
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = self._holder()
        if not self._is_stale(holder, me['host']):
          raise errors.WorkdirError(self._busy_message(holder)) from None
        logging.warning('Removing the stale lock %s of pid %s on %s (that '
                        'process is no longer running).', self.path,
                        holder.get('pid'), holder.get('host'))
        try:
          os.remove(self.path)
        except FileNotFoundError:
          pass  # Another starting run removed it first.
        continue
      with os.fdopen(fd, 'w') as f:
        json.dump(me, f)
      self.held = True
      return self
    raise errors.WorkdirError(self._busy_message(self._holder()))

  @staticmethod
  def _is_stale(holder: dict, host: str) -> bool:
    """A same-host lock whose process is gone."""
    if not holder or holder.get('host') != host:
      return False
    return not _alive(int(holder['pid']), holder.get('start'))

  def _busy_message(self, holder: dict) -> str:
    workdir = os.path.dirname(self.path)
    if not holder:
      return (f'{self.path} exists but cannot be read; if no run is using '
              f'{workdir}, delete that file and start again')
    return (f"{workdir} is in use by pid {holder.get('pid')} on host "
            f"{holder.get('host')} (since {holder.get('since')}); wait for "
            'that run to finish or use another --workdir (if that process is '
            f'gone, delete {self.path})')

  def release(self):
    """Removes the lock file (if this object took it)."""
    if self.held:
      self.held = False
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass
