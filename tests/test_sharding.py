"""sharding.py and multi-device training: 8 fake CPU devices, two processes."""
import json
import os
import socket
import sys
import textwrap
import types

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from concepthash_jax import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fsdp_spec_splits_the_largest_divisible_axis_of_big_leaves():
  assert sharding.fsdp_spec((768, 3072), 8) == P(None, 'data')
  assert sharding.fsdp_spec((3072, 770), 8) == P('data', None)
  assert sharding.fsdp_spec((7, 7, 7000), 8) == P(None, None, 'data')
  assert sharding.fsdp_spec((64,), 8) == P()  # Small: replicated.
  assert sharding.fsdp_spec((769, 771), 8) == P()  # Nothing divides.
  assert sharding.fsdp_spec((768, 3072), 1) == P()


def test_global_batch_and_back_on_one_process():
  mesh = sharding.create_mesh()
  batch = {'image': np.arange(24, dtype=np.float32).reshape(4, 2, 3),
           'label': np.arange(4, dtype=np.int32)}
  arrays = sharding.global_batch(batch, mesh)
  assert arrays['image'].sharding.spec == P('data')
  back = sharding.to_host(arrays, mesh)
  np.testing.assert_array_equal(back['image'], batch['image'])
  np.testing.assert_array_equal(back['label'], batch['label'])


def test_batch_size_must_split_over_devices():
  # A stand-in for a 4-device mesh: only its data axis's size is read.
  four_devices = types.SimpleNamespace(shape={sharding.DATA_AXIS: 4})
  sharding.check_batch_size(12, four_devices)
  with pytest.raises(ValueError, match=r'data\.batch_size=10 must be divisible by '
                     r'the number of devices \(4\) and processes \(1\)'):
    sharding.check_batch_size(10, four_devices)
  with pytest.raises(ValueError, match=r'^data\.eval_batch_size=6 '):
    sharding.check_batch_size(6, four_devices, what='data.eval_batch_size')


# ------------------------------------------------- multi-device training

import train_testlib as lib  # pylint: disable=g-import-not-at-top,wrong-import-position

# Params after 6 steps agree to float32 reduction-order noise.
RTOL, ATOL = 2e-4, 2e-5
_DRIVER = textwrap.dedent('''
    import sys
    sys.path[:0] = [{tests!r}, {root!r}]
    import jax
    import train_testlib as lib
    from concepthash_jax import sharding, train
    assert jax.device_count() == 8, jax.devices()
    config = lib.load_config({overrides!r})
    if config.train.fsdp:
      sharding.FSDP_MIN_SIZE = 0  # Shard every divisible leaf of the tiny model.
    train.train_and_evaluate(config, {workdir!r})
''')


@pytest.fixture(scope='module')
def one_device(tmp_path_factory):
  """The tiny run on this process's single CPU device (read only here).

  The session's shared run: the same config as the subprocess runs, already
  trained when other modules used it first.
  """
  return lib.trained_tiny_run(tmp_path_factory)[0]


def _losses(workdir):
  return [l['train/loss'] for l in lib.read_jsonl(
      os.path.join(workdir, 'metrics.jsonl')) if 'train/loss' in l]


def _assert_close_runs(workdir, reference):
  np.testing.assert_allclose(_losses(workdir), _losses(reference), rtol=RTOL)
  ours, ref = lib.final_params(workdir), lib.final_params(reference)
  assert ours.keys() == ref.keys()
  for key in ref:
    np.testing.assert_allclose(ours[key], ref[key], rtol=RTOL, atol=ATOL,
                               err_msg=key)


def test_eight_devices_match_one_device_replicated_and_fsdp(one_device,
                                                            tmp_path):
  replicated, fsdp = str(tmp_path / 'replicated'), str(tmp_path / 'fsdp')
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  # Independent runs, one process each, side by side: each is mostly compiles
  # on one core.
  results = lib.run_together(
      [[sys.executable, '-c', _DRIVER.format(
          tests=os.path.dirname(__file__), root=ROOT, overrides=overrides,
          workdir=workdir)]
       for workdir, overrides in ((replicated, {}), (fsdp, {'train.fsdp': True}))],
      cwd=ROOT, env=env, timeout=400)
  for result in results:
    assert result.returncode == 0, result.stderr[-4000:]
  assert len(_losses(replicated)) == 6
  _assert_close_runs(replicated, one_device)
  _assert_close_runs(fsdp, one_device)


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_train_together_like_one(one_device, tmp_path):
  """launch.py twice on localhost (CPU collectives): one run, split batches."""
  workdir = str(tmp_path / 'two_processes')
  port = _free_port()
  envs = []
  for process_id in range(2):
    env = dict(os.environ, JAX_PLATFORMS='cpu',
               JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
               JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(process_id))
    env.pop('XLA_FLAGS', None)  # One CPU device per process.
    envs.append(env)
  launch = [sys.executable, os.path.join(ROOT, 'launch.py'), f'--workdir={workdir}',
            *lib.flag_args()]
  runs = lib.run_together([launch, launch], cwd=ROOT, env=envs, timeout=400)
  for run in runs:
    assert run.returncode == 0, run.stderr[-4000:]
  assert 'process 1/2, 1 local / 2 global devices' in runs[1].stdout + runs[1].stderr
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  with open(os.path.join(one_device, 'results.json')) as f:
    expected = json.load(f)
  assert results['step'] == expected['step'] == 6
  assert results['loss'] == pytest.approx(expected['loss'], rel=RTOL)
  _assert_close_runs(workdir, one_device)
