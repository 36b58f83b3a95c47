"""The wheel: builds, installs into a fresh venv, its console scripts run offline.

Everything runs outside the checkout (a copy of the sources is built, the
commands run in another directory with no PYTHONPATH), so a file the package
needs but does not install, or a path that only resolves in a checkout, fails
here. No network: the build uses the installed setuptools (no isolation), the
wheel goes in with --no-deps, and the venv sees this interpreter's packages
through a .pth path entry, which also keeps any editable install of the
checkout out of it.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import numpy as np
import pytest

import train_testlib as lib

ROOT = lib.ROOT
DATA = os.path.join(ROOT, 'tests', 'data')
SCRIPTS = ('train', 'encode', 'explain', 'ablate', 'parity', 'export', 'search',
           'explore')
TORCH_NOTICE = 'PyTorch was not found'
# Shell continuations that a non-raw docstring glues into one line.
GLUED = re.compile(r'\S {2,}--\w')
# A section sign that is not a docs/method.md or paper reference (e.g. a removed document's).
UNRESOLVED_SECTION = re.compile(r'(?<!docs/method\.md )(?<!paper )(?<!, )§')
METHOD_REF = re.compile(r'docs/method\.md((?:,? §\d+(?:\.\d+)?)+)')
# lib.TINY (a 1-layer CLIP, 4 classes x 6 images of 32 px) for two steps and one evaluation.
TINY_RUN = ['--config.train.max_steps=2'] + [f'--config.{k}={v}' for k, v in lib.TINY.items()]


def _run_together(commands, cwd, env, timeout=300):
  """lib.run_together (env: one, or a list of one per command), checking that none
  printed PyTorch's notice.

  Each is mostly imports and compiles on one core, so two or more overlap.
  """
  results = lib.run_together(commands, cwd=cwd, env=env, timeout=timeout)
  for result in results:
    assert TORCH_NOTICE not in result.stdout + result.stderr, result.args
  return results


def _run(args, cwd, env, timeout=300):
  return _run_together([args], cwd, env, timeout)[0]


@pytest.fixture(scope='module')
def venv(tmp_path_factory):
  """(bin directory, env, work directory) of a venv holding only the built wheel."""
  tmp = tmp_path_factory.mktemp('packaging')
  # No PYTHONPATH anywhere: a checkout on it (with its *.egg-info) would make
  # pip think the package is installed already and skip the wheel.
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  env.update(JAX_PLATFORMS='cpu', HF_HUB_OFFLINE='1')
  src = tmp / 'src'
  shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
      '.git', '.ci-venv', '.venv', 'runs', 'build', 'dist', '*.egg-info', '__pycache__',
      '.pytest_cache', 'tests'))
  dist = tmp / 'dist'
  build = subprocess.run(
      [sys.executable, '-m', 'pip', 'wheel', str(src), '--no-deps', '--no-build-isolation',
       '--no-index', '-q', '-w', str(dist)], capture_output=True, text=True, timeout=300,
      env=env, check=False)
  assert build.returncode == 0, build.stderr[-3000:]
  wheels = os.listdir(dist)
  # A platform wheel: it carries the compiled evaluation kernel.
  assert len(wheels) == 1 and wheels[0].endswith('.whl'), wheels
  with zipfile.ZipFile(dist / wheels[0]) as wheel:
    assert any(n.startswith('concepthash_jax/_hamming.') for n in wheel.namelist())

  env_dir = tmp / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(env_dir)], check=True,
                 timeout=120)
  python = str(env_dir / 'bin' / 'python')
  install = subprocess.run(
      [sys.executable, '-m', 'pip', '--python', python, 'install', '--no-deps',
       '--no-index', '-q', str(dist / wheels[0])], capture_output=True, text=True,
      env=env, timeout=300, check=False)
  assert install.returncode == 0, install.stderr[-3000:]
  purelib = subprocess.run(
      [python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
      capture_output=True, text=True, env=env, check=True, timeout=60).stdout.strip()
  # The dependencies: this interpreter's site-packages, as plain path entries.
  with open(os.path.join(purelib, 'dependencies.pth'), 'w') as f:
    f.write('\n'.join(sorted({sysconfig.get_paths()['purelib'],
                              sysconfig.get_paths()['platlib']})) + '\n')
  work = tmp / 'elsewhere'
  work.mkdir()
  where = _run([python, '-c', 'import concepthash_jax; print(concepthash_jax.__file__)'],
               work, env)
  assert where.stdout.strip().startswith(purelib), where.stdout + where.stderr
  return env_dir / 'bin', env, work


def test_every_console_script_helps_and_exits_0(venv):
  bin_dir, env, work = venv
  results = _run_together([[str(bin_dir / f'concepthash-{name}'), '--help']
                           for name in SCRIPTS], work, env)
  for name, result in zip(SCRIPTS, results):
    out = result.stdout
    assert result.returncode == 0, (name, result.stderr[-2000:])
    assert not GLUED.search(out) and not UNRESOLVED_SECTION.search(out), (name, out)


@pytest.fixture(scope='module')
def first_commands(venv):
  """A tiny training run by config name and the parity command, run side by side
  outside the checkout, as a user's first: (train result, parity result, workdir,
  the train's cache folder, parity's output, train's env).

  Each is mostly imports and compiles on one core, so they overlap.
  """
  bin_dir, env, work = venv
  workdir = work / 'runs' / 'tiny'
  out = work / 'hf_ours.npz'
  # No JAX cache of their own (not the session's), the default folder under
  # XDG_CACHE_HOME; every program cached, however quick its compile.
  user_cache = work / 'user_cache'
  train_env = {k: v for k, v in env.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  train_env.update(XDG_CACHE_HOME=str(user_cache),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  train, parity = _run_together([
      [str(bin_dir / 'concepthash-train'), '--config=synthetic:nbit=8',
       f'--workdir={workdir}', *TINY_RUN],
      [str(bin_dir / 'concepthash-parity'), os.path.join(DATA, 'hf_clip_tiny.npz'),
       '--clip', os.path.join(DATA, 'tiny_clip'), '--out', str(out)]], work,
      [train_env, env])
  return train, parity, workdir, user_cache / 'concepthash_jax' / 'xla', out, train_env


def _results(workdir):
  with open(workdir / 'results.json') as f:
    return json.load(f)


def test_train_by_config_name_outside_the_checkout(first_commands):
  train, _, workdir, _, _, _ = first_commands
  assert train.returncode == 0, train.stderr[-3000:]
  results = _results(workdir)
  assert results['step'] == 2 and results['nbit'] == 8
  assert results['dataset'] == 'synthetic' and 0.0 <= results['map_at_r'] <= 1.0


def test_train_caches_its_programs_and_survives_torn_entries(venv, first_commands):
  bin_dir, _, work = venv
  train, _, workdir, cache, _, train_env = first_commands
  assert train.returncode == 0, train.stderr[-3000:]
  hosts = os.listdir(cache)  # This machine's kind alone.
  assert len(hosts) == 1, hosts
  folder = cache / hosts[0]
  cached = os.listdir(folder)
  for program in ('jit_train_step-', 'jit__init_state-', 'jit_encode_step-'):
    assert any(n.startswith(program) and n.endswith('-cache') for n in cached), cached
  # Torn entries (a process killed while writing one) cost a compile, not the run, and
  # the same run gives the same numbers.
  for name in cached:
    if name.endswith('-cache'):
      with open(folder / name, 'r+b') as f:
        f.truncate(100)
  again = _run([str(bin_dir / 'concepthash-train'), '--config=synthetic:nbit=8',
                f'--workdir={work / "runs" / "again"}', *TINY_RUN], work, train_env)
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'Error reading persistent compilation cache entry' in again.stderr
  assert _results(work / 'runs' / 'again')['map_at_r'] == _results(workdir)['map_at_r']


def test_parity_outside_the_checkout_matches_the_goldens(first_commands):
  _, parity, _, _, out, _ = first_commands
  assert parity.returncode == 0, parity.stderr[-3000:]
  with np.load(os.path.join(DATA, 'hf_clip_tiny.npz')) as golden, np.load(out) as ours:
    assert set(ours.files) == {k for k in golden.files if k.startswith(('vision/', 'text/'))}
    for key in ours.files:
      np.testing.assert_allclose(ours[key], golden[key], atol=1e-4, rtol=0, err_msg=key)


def test_docs_method_references_name_existing_sections():
  """Every `docs/method.md §N[.M]` in the sources names a numbered heading there."""
  with open(os.path.join(ROOT, 'docs', 'method.md'), encoding='utf-8') as f:
    headings = set(re.findall(r'^#{2,3} (\d+(?:\.\d+)?)\.? ', f.read(), re.M))
  assert {'1', '2', '2.5', '3', '4', '5', '5.2', '6.1', '6.2', '6.3'} <= headings
  cited = {}
  for top in ('concepthash_jax', 'tests', 'benchmarks', 'examples', 'README.md', 'launch.py'):
    paths = [os.path.join(ROOT, top)] if top.endswith(('.md', '.py')) else [
        os.path.join(d, n) for d, _, names in os.walk(os.path.join(ROOT, top))
        for n in names if n.endswith(('.py', '.md'))]
    for path in paths:
      with open(path, encoding='utf-8') as f:
        for refs in METHOD_REF.findall(f.read()):
          for section in re.findall(r'§(\d+(?:\.\d+)?)', refs):
            cited.setdefault(section, []).append(os.path.relpath(path, ROOT))
  assert len(cited) >= 8
  missing = {s: where for s, where in cited.items() if s not in headings}
  assert not missing, missing
