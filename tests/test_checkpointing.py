"""checkpointing.py: retention, restore into shardings, SIGTERM flag, resume order."""
import json
import os
import signal
import socket
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import train_testlib as lib
from concepthash_jax import checkpointing
from concepthash_jax import preemption
from concepthash_jax import sharding
from concepthash_jax import workdir as workdir_lib


@flax.struct.dataclass
class ToyState:
  step: jax.Array
  params: dict
  opt_state: tuple
  rng: jax.Array


def make_state(value: float, step: int = 0) -> ToyState:
  params = {'head': {'kernel': jnp.full((3, 2), value), 'bias': jnp.zeros(2)}}
  tx = optax.chain(optax.add_decayed_weights(1e-4), optax.trace(0.9))
  return ToyState(step=jnp.asarray(step, jnp.int32), params=params,
                  opt_state=tx.init(params), rng=jax.random.PRNGKey(step))


def abstract_of(state):
  mesh = sharding.create_mesh()
  rep = sharding.replicated(mesh)
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), state)


def test_restore_round_trips_values_and_structure(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'ck'), keep=2)
  state = make_state(1.5, step=7)
  ckpt.save(7, state)
  restored = ckpt.restore(abstract_of(state))
  ckpt.close()
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  jax.tree.map(np.testing.assert_array_equal, restored, state)


def test_keeps_latest_n_plus_best_by_map(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'ck'), keep=2)
  metrics = {2: 0.9, 4: 0.5}
  for step in range(1, 7):
    ckpt.save(step, make_state(step, step), map_at_r=metrics.get(step))
  assert ckpt.all_steps() == [2, 5, 6]
  assert ckpt.best_step() == 2
  best = ckpt.restore(abstract_of(make_state(0.0)), ckpt.best_step())
  assert float(best.params['head']['kernel'][0, 0]) == 2.0
  ckpt.close()


def test_saving_metrics_for_an_existing_step_replaces_it(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'ck'), keep=1)
  ckpt.save(3, make_state(1.0, 3))
  ckpt.save(3, make_state(1.0, 3))  # Periodic save twice: no error.
  ckpt.save(3, make_state(1.0, 3), map_at_r=0.4)
  ckpt.save(4, make_state(2.0, 4))
  assert ckpt.best_step() == 3 and ckpt.all_steps() == [3, 4]
  ckpt.close()


def test_sigterm_sets_the_flag_instead_of_killing():
  flag = preemption.PreemptionFlag().install()
  try:
    assert not flag.requested(0)
    os.kill(os.getpid(), signal.SIGTERM)
    assert flag.requested(1)
  finally:
    flag.uninstall()
  assert signal.getsignal(signal.SIGTERM) is not flag._handle


def test_resume_order_workdir_then_resume_then_init_then_scratch(tmp_path):
  abstract = abstract_of(make_state(0.0))
  fresh = lambda: make_state(-1.0)  # pylint: disable=unnecessary-lambda-assignment
  reset = lambda new, old: new.replace(params=old.params)  # pylint: disable=unnecessary-lambda-assignment
  other_run, init_run = tmp_path / 'other', tmp_path / 'init'
  for path, value in ((other_run, 5.0), (init_run, 9.0)):
    c = checkpointing.Checkpointer(checkpointing.checkpoint_dir(str(path)))
    c.save(11, make_state(value, 11))
    c.close()

  def restore(workdir, **kw):
    ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(workdir))
    try:
      state, source = checkpointing.restore_or_initialize(
          ckpt, abstract, init_fn=fresh, reset_fn=reset, **kw)
    finally:
      ckpt.close()
    return float(state.params['head']['kernel'][0, 0]), int(state.step), source

  new = str(tmp_path / 'new')
  assert restore(new) == (-1.0, 0, 'scratch')
  assert restore(new, init=str(init_run)) == (9.0, 0, 'init')
  assert restore(new, resume=str(other_run), init=str(init_run)) == (
      5.0, 11, 'resume')
  c = checkpointing.Checkpointer(checkpointing.checkpoint_dir(new))
  c.save(3, make_state(3.0, 3))
  c.close()
  assert restore(new, resume=str(other_run)) == (3.0, 3, 'workdir')
  with pytest.raises(FileNotFoundError, match='train.resume'):
    restore(str(tmp_path / 'x'), resume=str(tmp_path / 'missing'))


def _damage(path, how):
  """Truncates a file to half ('truncate') or overwrites it ('garbage')."""
  if how == 'truncate':
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)
  else:
    with open(path, 'wb') as f:
      f.write(b'\x00garbage{')


@pytest.mark.parametrize('damaged,how', [
    ('default/_METADATA', 'truncate'),  # orbax's JSONDecodeError on a torn _METADATA.
    ('metrics/metrics', 'garbage'),  # Orbax's manager fails to open on it.
    ('default/d', 'truncate'),  # Array bytes.
])
def test_unreadable_newest_checkpoint_falls_back_and_is_kept(tmp_path, caplog,
                                                             damaged, how):
  directory = str(tmp_path / 'checkpoints')
  ckpt = checkpointing.Checkpointer(directory, keep=3)
  ckpt.save(1, make_state(1.0, 1), map_at_r=0.2)
  ckpt.save(2, make_state(2.0, 2), map_at_r=0.5)
  ckpt.close()
  target = os.path.join(directory, '2', damaged)
  for path in ([os.path.join(target, f) for f in os.listdir(target)]
               if os.path.isdir(target) else [target]):
    _damage(path, how)
  before = lib.files_under(os.path.join(directory, '2'))

  ckpt = checkpointing.Checkpointer(directory, keep=3)
  restored = ckpt.restore(abstract_of(make_state(0.0)))
  assert float(restored.params['head']['kernel'][0, 0]) == 1.0
  assert ckpt.latest_step() == 1 and ckpt.best_step() == 1
  assert f'Skipping checkpoint step 2: {os.path.join(directory, "2")}' in (
      caplog.text)
  # A reader (encode, explain) leaves it where it is.
  assert lib.files_under(os.path.join(directory, '2')) == before
  # A run that trains on moves it aside, byte for byte, before saving step 2.
  ckpt.save(2, make_state(20.0, 2))
  ckpt.close()
  aside = os.path.join(str(tmp_path), 'checkpoints_unreadable', '2')
  assert lib.files_under(aside) == before
  assert 'Moved unreadable checkpoint step 2' in caplog.text
  reopened = checkpointing.Checkpointer(directory)
  assert reopened.all_steps() == [1, 2]
  restored = reopened.restore(abstract_of(make_state(0.0)))
  assert float(restored.params['head']['kernel'][0, 0]) == 20.0


def test_no_readable_checkpoint_names_the_directory_and_each_step(tmp_path):
  directory = str(tmp_path / 'checkpoints')
  ckpt = checkpointing.Checkpointer(directory)
  ckpt.save(4, make_state(1.0, 4))
  ckpt.close()
  _damage(os.path.join(directory, '4', 'default', '_METADATA'), 'garbage')
  ckpt = checkpointing.Checkpointer(directory)
  with pytest.raises(checkpointing.errors.CheckpointError,
                     match=f'No readable checkpoint in {directory} '
                     r'\(step 4: JSONDecodeError'):
    ckpt.restore(abstract_of(make_state(0.0)))
  with pytest.raises(checkpointing.errors.CheckpointError,
                     match=r'Checkpoint step 4 at .*/4 cannot be read'):
    ckpt.restore(abstract_of(make_state(0.0)), step=4)


_HOLD_LOCK = '''
import sys, time
from concepthash_jax import workdir
workdir.WorkdirLock(sys.argv[1]).acquire()
print('locked', flush=True)
time.sleep(120)
'''


def test_workdir_lock_refuses_a_live_holder_and_replaces_a_killed_one(
    tmp_path, caplog):
  workdir = str(tmp_path)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
       os.environ.get('PYTHONPATH', '')]), JAX_PLATFORMS='cpu')
  holder = subprocess.Popen([sys.executable, '-c', _HOLD_LOCK, workdir],
                            stdout=subprocess.PIPE, env=env, text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(checkpointing.errors.WorkdirError,
                       match=f'{workdir} is in use by pid {holder.pid} on '
                       f'host {socket.gethostname()}'):
      workdir_lib.WorkdirLock(workdir).acquire()
  finally:
    holder.kill()  # SIGKILL: the lock file stays behind.
    holder.wait()
  assert os.path.exists(os.path.join(workdir, workdir_lib.LOCK_FILE))
  lock = workdir_lib.WorkdirLock(workdir).acquire()
  assert f'stale lock {os.path.join(workdir, "run.lock")} of pid ' \
         f'{holder.pid}' in caplog.text
  with pytest.raises(checkpointing.errors.WorkdirError,
                     match=f'in use by pid {os.getpid()}'):
    workdir_lib.WorkdirLock(workdir).acquire()
  lock.release()
  assert not os.path.exists(lock.path)
  # Another host's lock cannot be checked: refused, with how to clear it.
  with open(lock.path, 'w') as f:
    json.dump({'pid': 1, 'host': 'other-host', 'since': 'then'}, f)
  with pytest.raises(checkpointing.errors.WorkdirError,
                     match=r'pid 1 on host other-host .*delete .*run\.lock'):
    workdir_lib.WorkdirLock(workdir).acquire()


def test_a_checkpoint_of_another_model_is_not_taken_for_a_damaged_one(
    tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'checkpoints'))
  ckpt.save(1, make_state(1.0, 1))
  ckpt.save(2, make_state(2.0, 2))
  wider = abstract_of(make_state(0.0)).replace(
      params={'head': {'kernel': jax.ShapeDtypeStruct((3, 4), jnp.float32),
                       'bias': jax.ShapeDtypeStruct((4,), jnp.float32)}})
  with pytest.raises(checkpointing.errors.CheckpointError,
                     match=r'step 2 at .*/2 does not fit the model of this '
                     r'config'):
    ckpt.restore(wider)
  assert not ckpt.unreadable
