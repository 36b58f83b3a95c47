"""Session-wide test settings."""
import os
import shutil
import tempfile

import jax
from jax.experimental.compilation_cache import compilation_cache
import pytest

from concepthash_jax import xla_flags
from concepthash_jax.configs import base
from concepthash_jax.data import cache

_XLA_CACHE_DIR = pytest.StashKey[str]()  # The session's compilation cache folder.


def pytest_configure(config):
  """XLA settings for this process and every subprocess, before any test module loads.

  Before collection: modules copy os.environ for their subprocesses at import, and
  XLA reads XLA_FLAGS once, when this process's backend starts.
  """
  # The XLA flags launch.py sets for the configs' defaults: in-process runs then
  # compile the very programs launch.py subprocesses compile. The flag turns off
  # XLA:CPU's concurrency scheduler, as every real run does: memory, not values
  # (configs/base.py, BENCHMARKS.md). User flags win.
  xla_flags.configure_xla_flags(base.get_config())
  # One persistent compilation cache for the session and its subprocesses: many
  # tests train the same tiny configs, here and in launch.py / tool subprocesses,
  # and compiling their steps is most of a tiny run's time. The key covers the
  # program, compile options, XLA flags, devices and jax version, so a hit is the
  # executable a fresh compile would give. A fresh folder per session (cold, as
  # CI is). The threshold is below JAX's default so that the small programs the
  # tools and restored runs compile again and again (text encoder, encode steps)
  # are cached too.
  # pytest-xdist's workers start after this hook ran in the controller, with its
  # environment: they share its folder, which the controller removes at the end.
  folder = (os.environ.get('JAX_COMPILATION_CACHE_DIR')
            if hasattr(config, 'workerinput') else None)
  if not folder:
    folder = config.stash[_XLA_CACHE_DIR] = tempfile.mkdtemp(prefix='concepthash-xla-cache-')
  for name, value in (('jax_compilation_cache_dir', folder),
                      ('jax_persistent_cache_min_compile_time_secs', 0.2)):
    os.environ[name.upper()] = str(value)
    jax.config.update(name, value)
  compilation_cache.reset_cache()  # Whatever ran before uses the cache from now on.


def pytest_unconfigure(config):
  if _XLA_CACHE_DIR in config.stash:
    shutil.rmtree(config.stash[_XLA_CACHE_DIR], ignore_errors=True)


@pytest.fixture(autouse=True, scope='session')
def _image_caches_in_tmp(tmp_path_factory):
  """Keeps data.cache's first-stage caches of test datasets out of ~/.cache."""
  patch = pytest.MonkeyPatch()
  folder = str(tmp_path_factory.mktemp('image_cache'))
  patch.setattr(cache, 'default_dir', lambda: folder)
  yield
  patch.undo()
