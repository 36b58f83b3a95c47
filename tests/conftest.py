"""Session-wide test settings."""
import pytest

from concepthash_jax.data import cache


@pytest.fixture(autouse=True, scope='session')
def _image_caches_in_tmp(tmp_path_factory):
  """Keeps data.cache's first-stage caches of test datasets out of ~/.cache."""
  patch = pytest.MonkeyPatch()
  folder = str(tmp_path_factory.mktemp('image_cache'))
  patch.setattr(cache, 'default_dir', lambda: folder)
  yield
  patch.undo()
