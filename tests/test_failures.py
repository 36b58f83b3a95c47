"""Faults and bad input end to end: launch.py's exit codes and one-line
errors, the workdir lock, cleanup of a failed run. (Resuming past an unreadable
checkpoint and the workdir config check reuse test_train.py's reference run.)"""
import json
import os
import subprocess
import sys

import pytest

import train_testlib as lib
from concepthash_jax import errors
from concepthash_jax import workdir as workdir_lib
from concepthash_jax import train

SUBPROCESS_ENV = dict(os.environ, JAX_PLATFORMS='cpu')


def _launch(workdir, overrides):
  """launch.py on the tiny config, started (not waited for)."""
  return subprocess.Popen(
      [sys.executable, os.path.join(lib.ROOT, 'launch.py'),
       f'--workdir={workdir}', *lib.flag_args(overrides)],
      cwd=lib.ROOT, env=SUBPROCESS_ENV, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)


def test_launch_user_errors_print_one_line_and_exit_2(tmp_path):
  busy = str(tmp_path / 'busy')
  os.makedirs(busy)
  lock = workdir_lib.WorkdirLock(busy).acquire()
  try:
    procs = {'config': _launch(tmp_path / 'new', {'model.nbit': 6}),
             'busy': _launch(busy, {})}
    outs = {k: p.communicate(timeout=240)[0] for k, p in procs.items()}
  finally:
    lock.release()
  for name, proc in procs.items():
    out = outs[name]
    assert proc.returncode == errors.EXIT_USER_ERROR, out[-2000:]
    assert 'Traceback' not in out, out[-2000:]
    assert out.strip().splitlines()[-1].startswith('FATAL: '), out[-2000:]
  assert 'config.model.nbit=6 must be divisible by' in outs['config']
  assert not os.path.exists(tmp_path / 'new')
  assert f'{busy} is in use by pid {os.getpid()}' in outs['busy']


def test_failed_run_removes_the_workdir_it_created_and_keeps_others(tmp_path):
  missing = {'data.source': 'folders', 'data.name': 'cub',
             'data.root': str(tmp_path / 'no_data')}
  new = str(tmp_path / 'new')
  with pytest.raises(errors.MissingFileError, match='no_data'):
    train.train_and_evaluate(lib.load_config(missing), new)
  assert not os.path.exists(new)
  with pytest.raises(ValueError, match='optim.lr'):
    train.train_and_evaluate(lib.load_config({'optim.lr': -1.0}), new)
  assert not os.path.exists(new)
  mine = tmp_path / 'mine'
  mine.mkdir()
  (mine / 'notes.txt').write_text('kept')
  with pytest.raises(errors.WorkdirError, match='folder holding other files'):
    train.train_and_evaluate(lib.load_config(missing), str(mine))
  assert os.listdir(mine) == ['notes.txt']
  assert (mine / 'notes.txt').read_text() == 'kept'
  assert not (mine / workdir_lib.LOCK_FILE).exists()


def test_config_history_drops_a_torn_last_line_and_stays_whole(tmp_path):
  path = tmp_path / workdir_lib.HISTORY_FILE
  path.write_text('{"step": 0, "changed": {}}\n{"step": 40, "chan')  # killed mid-line
  workdir_lib._append_history(str(tmp_path), None, {'step': 80, 'changed': {}})  # pylint: disable=protected-access
  lines = path.read_text().splitlines()
  assert [json.loads(l)['step'] for l in lines] == [0, 80]
  assert os.listdir(tmp_path) == [workdir_lib.HISTORY_FILE]  # no temporary left
