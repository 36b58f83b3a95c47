"""The shared write rules: temporary name then rename, no stranger overwritten."""
import os

import pytest

from concepthash_jax import errors
from concepthash_jax import safe_files


def test_atomic_write_replaces_only_on_success(tmp_path):
  path = tmp_path / 'kept.txt'
  safe_files.write_text(str(path), 'old')
  with pytest.raises(RuntimeError):
    with safe_files.atomic_write(str(path), 'w') as f:
      f.write('half of the new')
      raise RuntimeError('killed mid-write')
  assert path.read_text() == 'old'
  assert os.listdir(tmp_path) == ['kept.txt']  # no temporary left behind
  safe_files.write_text(str(path), 'new')
  assert path.read_text() == 'new'


def test_atomic_write_refuses_a_folder(tmp_path):
  with pytest.raises(safe_files.OverwriteError, match='is a folder'):
    safe_files.write_text(str(tmp_path), 'x')


def test_write_below_a_file_is_one_user_error_naming_the_path(tmp_path):
  blocker = tmp_path / 'afile'
  blocker.write_text('mine')
  target = blocker / 'out.json'
  with pytest.raises(safe_files.WriteError) as info:
    safe_files.write_json(str(target), {'a': 1})
  assert isinstance(info.value, errors.UserError)
  assert str(target) in str(info.value)
  assert '.tmp-' not in str(info.value)
  assert blocker.read_text() == 'mine'


def test_check_replaceable_keeps_a_strangers_file(tmp_path):
  theirs = tmp_path / 'model.safetensors'
  theirs.write_bytes(b'weights')
  with pytest.raises(safe_files.OverwriteError, match='not a code index'):
    safe_files.check_replaceable(str(theirs), 'code index',
                                 is_ours=lambda p: False)
  safe_files.check_replaceable(str(theirs), 'code index', is_ours=lambda p: True)
  safe_files.check_replaceable(str(tmp_path / 'new'), 'code index',
                               is_ours=lambda p: False)
  assert theirs.read_bytes() == b'weights'


def test_folder_marker_round_trip(tmp_path):
  assert safe_files.folder_kind(str(tmp_path)) is None
  safe_files.write_marker(str(tmp_path), 'export', version=1)
  assert safe_files.folder_kind(str(tmp_path)) == 'export'


def test_ensure_folder_over_a_file_is_one_sentence(tmp_path):
  blocker = tmp_path / 'cache'
  blocker.write_text('x')
  with pytest.raises(safe_files.WriteError, match='is a file, not a folder'):
    safe_files.ensure_folder(str(blocker), 'image cache')


def test_claim_folder_reuses_ours_and_empty_refuses_a_users(tmp_path):
  mine = tmp_path / 'mine'
  mine.mkdir()
  (mine / 'notes.txt').write_text('keep me')
  with pytest.raises(safe_files.OverwriteError, match='folder of other files'):
    safe_files.claim_folder(str(mine), 'explain', 'explain output')
  assert sorted(os.listdir(mine)) == ['notes.txt']
  legacy = tmp_path / 'legacy'
  legacy.mkdir()
  (legacy / 'report.md').write_text('old report')
  safe_files.claim_folder(str(legacy), 'explain', 'explain output',
                          is_legacy=lambda f: os.path.exists(
                              os.path.join(f, 'report.md')))
  assert safe_files.folder_kind(str(legacy)) == 'explain'
  fresh = tmp_path / 'a' / 'b'
  safe_files.claim_folder(str(fresh), 'explain', 'explain output')
  safe_files.claim_folder(str(fresh), 'explain', 'explain output')  # ours now
  assert safe_files.folder_kind(str(fresh)) == 'explain'


def test_save_figure_is_atomic_and_keeps_its_format(tmp_path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig = plt.figure(figsize=(1, 1))
  path = tmp_path / 'plot.png'
  safe_files.save_figure(fig, str(path), dpi=20)
  assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  safe_files.save_figure(fig, str(tmp_path / 'plot.svg'))
  assert b'<svg' in (tmp_path / 'plot.svg').read_bytes()[:400]
  plt.close(fig)
  assert sorted(os.listdir(tmp_path)) == ['plot.png', 'plot.svg']
