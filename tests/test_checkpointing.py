"""checkpointing.py: retention, restore into shardings, SIGTERM flag, resume order."""
import os
import signal

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from concepthash_jax import checkpointing
from concepthash_jax import sharding


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
  flag = checkpointing.PreemptionFlag().install()
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
