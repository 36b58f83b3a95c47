"""Shared helpers of the training tests: a tiny synthetic config and its loader.

The same overrides are used in-process (`load_config`) and on the command line
of launch.py in subprocesses, so both paths train exactly the same run.
"""
import contextlib
import os
import subprocess
import sys
import tempfile
import time

from absl import flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)  # The checkout's package when it is not installed.

# 4 classes x 6 train / 3 test images of 32 px; a 1-layer, 32-wide CLIP.
# Batch 8 -> 3 steps per epoch, 2 epochs; eval every epoch.
TINY = {
    'model.random_clip.image_size': 32, 'model.random_clip.patch_size': 8,
    'model.random_clip.vision_width': 32, 'model.random_clip.vision_layers': 1,
    'model.random_clip.vision_heads': 2, 'model.random_clip.vision_mlp': 64,
    'model.random_clip.projection_dim': 16, 'model.random_clip.text_width': 16,
    'model.random_clip.text_layers': 1, 'model.random_clip.text_heads': 2,
    'model.random_clip.text_mlp': 32, 'model.random_clip.vocab_size': 300,
    'model.random_clip.max_text_len': 72,
    'model.adapter_dim': 8, 'model.generator_heads': 2, 'model.nbit': 8,
    'data.synthetic.num_classes': 4, 'data.synthetic.num_families': 2,
    'data.synthetic.train_per_class': 6, 'data.synthetic.test_per_class': 3,
    'data.synthetic.image_size': 32, 'data.image_size': 32,
    'data.resize_size': 32, 'data.batch_size': 8, 'data.eval_batch_size': 8,
    'data.num_workers': 0, 'optim.epochs': 2, 'optim.warmup_epochs': 1,
    'optim.lr': 0.05, 'eval.every_epochs': 1, 'train.log_every_steps': 1,
    'train.checkpoint_every_steps': 2,
}


def flag_args(overrides=None, config='configs/synthetic.py'):
  """Command-line config arguments for TINY plus `overrides`."""
  items = {**TINY, **(overrides or {})}
  return [f'--config={os.path.join(ROOT, config)}'] + [
      f'--config.{k}={v}' for k, v in items.items()]


def load_config(overrides=None, config='configs/synthetic.py'):
  """The locked config launch.py would build from `flag_args(...)`."""
  argv = ['prog', *flag_args(overrides, config)]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'cfg', flag_values=fv,
                                  lock_config=True, sys_argv=argv)
  fv(argv)
  return fv.config


def nan_loss(aux, labels, **kwargs):
  """The built-in loss times NaN: a run that diverges at its next step."""
  from concepthash_jax import losses  # pylint: disable=g-import-not-at-top
  loss, metrics = losses.total_loss(aux, labels, **kwargs)
  return loss * float('nan'), metrics


def read_jsonl(path):
  """Lines of a metrics.jsonl as dicts."""
  import json  # pylint: disable=g-import-not-at-top
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def final_params(workdir):
  """Flat {path: numpy} of the latest checkpoint's params and model state."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from concepthash_jax import inference  # pylint: disable=g-import-not-at-top
  variables = inference.ConceptHasher.load(workdir).variables
  return {'/'.join(k): np.asarray(v) for k, v in
          traverse_util.flatten_dict(jax.device_get(variables)).items()}


def files_under(root, skip=('tensorboard',)):
  """{path relative to root: bytes} of every file under `root` (`skip`: folder names)."""
  out = {}
  for folder, subfolders, files in os.walk(root):
    subfolders[:] = [d for d in subfolders if d not in skip]
    for name in files:
      path = os.path.join(folder, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


def trained_tiny_run(tmp_path_factory):
  """Workdir of one TINY run trained once per pytest session (shared by modules)."""
  import json  # pylint: disable=g-import-not-at-top
  from concepthash_jax import train  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.getbasetemp() / 'tiny_run'
  if not (workdir / 'results.json').exists():
    train.train_and_evaluate(load_config(), str(workdir))
  with open(workdir / 'results.json') as f:
    return str(workdir), json.load(f)


def _per_command(value, n):
  """`value` once per command: a list as given (one each), anything else n times."""
  if isinstance(value, list):
    assert len(value) == n, (len(value), n)
    return value
  return [value] * n


def _wait_until_done_or_failed(procs, deadline):
  """Index of the first process that exited non-zero, or None.

  Returns as soon as one fails (its peers may wait on it forever), when all
  have exited, or at `deadline` (time.monotonic()) with some still running.
  """
  while True:
    codes = [proc.poll() for proc in procs]
    failed = [i for i, code in enumerate(codes) if code not in (None, 0)]
    if failed or None not in codes or time.monotonic() > deadline:
      return failed[0] if failed else None
    time.sleep(0.1)


def run_together(commands, cwd=None, env=None, timeout=300, tail=1500):
  """Runs `commands` side by side; a subprocess.CompletedProcess each, in order.

  Independent runs are mostly imports and compiles on one core each, so they
  overlap; the processes of one jax.distributed run must run together. Output
  goes to temporary files, not pipes: a command that fills a pipe we do not
  read yet stops until we do, and the peers of a distributed run with it.

  Once one command exits non-zero, the others still running are killed (they
  could wait on it until the timeout) and each of their stderr ends with a
  note naming that command and its last `tail` characters of stderr: a test
  that asserts on a killed one first still shows what went wrong.

  Args:
    commands: argument lists, one per process.
    cwd: working directory of every command, or a list of one per command.
    env: environment of every command, or a list of one per command.
    timeout: seconds for all of them, from the start.
    tail: characters of a failed command's stderr in the notes and errors.

  Returns:
    A CompletedProcess (returncode, text stdout and stderr) per command: each
    caller asserts on them with its own messages.

  Raises:
    TimeoutError: some still ran after `timeout` seconds; all are killed first
      and the message holds each one's stderr tail.
  """
  n = len(commands)
  with contextlib.ExitStack() as files:
    outs = [files.enter_context(tempfile.TemporaryFile()) for _ in range(n)]
    errs = [files.enter_context(tempfile.TemporaryFile()) for _ in range(n)]
    procs, killed = [], []
    try:
      for args, where, environ, out, err in zip(
          commands, _per_command(cwd, n), _per_command(env, n), outs, errs):
        procs.append(subprocess.Popen(args, cwd=where, env=environ, stdout=out, stderr=err))
      failed = _wait_until_done_or_failed(procs, time.monotonic() + timeout)
    finally:  # Also on an error or Ctrl-C: no process outlives the test.
      for i, proc in enumerate(procs):
        if proc.poll() is None:
          proc.kill()
          proc.wait()
          killed.append(i)
    texts = []
    for f in outs + errs:
      f.seek(0)
      texts.append(f.read().decode('utf-8', 'replace'))
  stdouts, stderrs = texts[:n], texts[n:]
  if killed and failed is None:
    raise TimeoutError('\n'.join(
        f'commands[{i}] still ran after {timeout} s; its stderr ends:\n'
        f'{stderrs[i][-tail:]}' for i in killed))
  for i in killed:
    stderrs[i] += (f'\n[run_together: killed as commands[{failed}] exited with '
                   f'{procs[failed].returncode}; its stderr ends:\n'
                   f'{stderrs[failed][-tail:]}]')
  return [subprocess.CompletedProcess(args, proc.returncode, out, err)
          for args, proc, out, err in zip(commands, procs, stdouts, stderrs)]
