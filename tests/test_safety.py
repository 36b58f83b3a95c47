"""Nothing a user keeps is lost: refusals, whole-folder swaps, clear one-line errors.

Most cases run on hand-made folders and numpy arrays (no model compiled); the
command-line cases start the tool in a subprocess and stop before any model
is built.
"""
import errno
import hashlib
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import train_testlib as lib
from concepthash_jax import exporting
from concepthash_jax import inference
from concepthash_jax import safe_files

OFFLINE_ENV = dict(os.environ, JAX_PLATFORMS='cpu', HF_HUB_OFFLINE='1',
                   TRANSFORMERS_OFFLINE='1', PYTHONPATH=lib.ROOT)


def digest_tree(folder) -> dict:
  """{relative path: sha256} of every file under `folder`."""
  out = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
  return out


def write_tiny_export(out, tag: str, *, official: bool = False):
  """An export of a made-up two-class model; `tag` tells exports apart."""
  exporting.write_export(
      str(out), meta={'config': {'tag': tag}, 'step': len(tag)},
      variables={'params': {'w': np.full((2, 3), len(tag), np.float32)}},
      text_params=None, class_names=[f'{tag}-a', f'{tag}-b'],
      class_centers=np.ones((2, 4), np.float32), results={'tag': tag},
      official_state={'w': np.zeros(2, np.float32)} if official else None)


def fake_workdir(folder: pathlib.Path) -> pathlib.Path:
  """A folder with a run's files (config.json + checkpoints/)."""
  (folder / 'checkpoints' / '4').mkdir(parents=True)
  (folder / 'config.json').write_text('{"seed": 0, "model": {}}\n')
  (folder / 'results.json').write_text('{"step": 4}\n')
  return folder


def run_tool(tool: str, *args, timeout=180):
  return subprocess.run(
      [sys.executable, '-m', f'concepthash_jax.tools.{tool}', *args],
      cwd=lib.ROOT, env=OFFLINE_ENV, capture_output=True, text=True,
      timeout=timeout, check=False)


def assert_one_fatal_line(proc, *needles):
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('FATAL: '), proc.stderr[-3000:]
  for needle in needles:
    assert needle in last, last


# ----------------------------------------------------------------- exports


def test_export_refuses_a_workdir_a_file_and_a_strangers_folder(tmp_path):
  workdir = fake_workdir(tmp_path / 'run')
  before = digest_tree(workdir)
  with pytest.raises(safe_files.OverwriteError, match='is a training workdir'):
    write_tiny_export(workdir, 'new')
  stranger = tmp_path / 'photos'
  stranger.mkdir()
  (stranger / 'holiday.jpg').write_bytes(b'not yours')
  with pytest.raises(safe_files.OverwriteError, match='holds other files'):
    write_tiny_export(stranger, 'new')
  a_file = tmp_path / 'notes.txt'
  a_file.write_text('keep me')
  with pytest.raises(safe_files.OverwriteError, match='is a file'):
    write_tiny_export(a_file, 'new')
  with pytest.raises(safe_files.WriteError, match='notes.txt is a file, and a folder is needed'):
    write_tiny_export(a_file / 'below', 'new')
  assert digest_tree(workdir) == before
  assert (stranger / 'holiday.jpg').read_bytes() == b'not yours'
  assert a_file.read_text() == 'keep me'
  assert sorted(os.listdir(tmp_path)) == ['notes.txt', 'photos', 'run']


def test_export_on_a_read_only_disk_is_one_sentence(tmp_path, monkeypatch):
  def read_only(path, *args, **kwargs):
    raise OSError(errno.EROFS, 'Read-only file system', path)
  monkeypatch.setattr(os, 'mkdir', read_only)
  with pytest.raises(safe_files.WriteError,
                     match=r'exported: Read-only file system; the disk is read-only'):
    write_tiny_export(tmp_path / 'exported', 'new')


def test_cli_export_into_its_own_workdir_is_refused_untouched(tmp_path):
  workdir = fake_workdir(tmp_path / 'run')
  before = digest_tree(workdir)
  proc = run_tool('export', f'--workdir={workdir}', f'--out={workdir}')
  assert_one_fatal_line(proc, str(workdir), 'training workdir', 'new or empty')
  assert digest_tree(workdir) == before
  below = run_tool('export', f'--workdir={workdir}',
                   f'--out={workdir / "config.json" / "x"}')
  assert_one_fatal_line(below, 'config.json')
  assert digest_tree(workdir) == before


def test_reexport_replaces_the_whole_folder_and_load_checks_it(tmp_path):
  out = tmp_path / 'exported'
  write_tiny_export(out, 'old', official=True)
  assert safe_files.folder_kind(str(out)) == exporting.EXPORT_KIND
  write_tiny_export(out, 'newer')
  stored = exporting.read_export(str(out))
  assert stored['class_names'] == ['newer-a', 'newer-b']
  # The other model's official-layout file went with its export.
  assert exporting.OFFICIAL_FILE not in os.listdir(out)
  assert [n for n in os.listdir(tmp_path)] == ['exported']
  # A file of another export copied in: refused, naming the file, in one line.
  other = tmp_path / 'other'
  write_tiny_export(other, 'x')
  (out / exporting.RESULTS_FILE).write_bytes(
      (other / exporting.RESULTS_FILE).read_bytes())
  with pytest.raises(exporting.ExportError,
                     match='results.json has .* mixed or partial export') as e:
    inference.ConceptHasher.load(str(out))
  assert '\n' not in str(e.value)
  os.remove(out / exporting.MANIFEST_FILE)
  with pytest.raises(exporting.ExportError, match='partial export'):
    exporting.read_export(str(out))


# A writer killed (SIGKILL, no clean-up) at one step of a re-export.
KILLED_EXPORT = """
import os, shutil, signal, sys
sys.path.insert(0, {tests!r})
from concepthash_jax import exporting, safe_files
import test_safety
stage, out = sys.argv[1:3]
def die(*args, **kwargs):
  os.kill(os.getpid(), signal.SIGKILL)
if stage == 'staged':  # Every new file written, nothing swapped yet.
  exporting.write_manifest = die
elif stage == 'swapped':  # New export in place, old one not yet removed.
  safe_files.shutil.rmtree = die
elif stage == 'between_renames':  # No atomic exchange: old aside, new not in.
  safe_files._exchange = lambda first, second: False
  renames = []
  real_rename = os.rename
  def rename(source, target):
    renames.append(source)
    if len(renames) == 2:
      die()
    real_rename(source, target)
  safe_files.os.rename = rename
test_safety.write_tiny_export(out, 'new', official=True)
"""


@pytest.mark.parametrize('stage', ['staged', 'swapped', 'between_renames'])
def test_reexport_killed_mid_way_leaves_old_or_new_never_a_mix(tmp_path, stage):
  out = tmp_path / 'exported'
  write_tiny_export(out, 'old')
  script = KILLED_EXPORT.format(tests=os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, '-c', script, stage, str(out)],
                        cwd=lib.ROOT, env=OFFLINE_ENV, capture_output=True,
                        text=True, timeout=120, check=False)
  assert proc.returncode == -9, proc.stderr[-2000:]
  if stage == 'between_renames':
    with pytest.raises(exporting.ExportError,
                       match='left the previous export at .*rename that folder'):
      inference.ConceptHasher.load(str(out))
    aside = safe_files.set_aside_folders(str(out))[0]
    assert exporting.read_export(aside)['class_names'] == ['old-a', 'old-b']
  else:
    stored = exporting.read_export(str(out))  # Whole, manifest checked.
    tag = stored['meta']['config']['tag']
    assert tag == {'staged': 'old', 'swapped': 'new'}[stage]
    assert stored['class_names'] == [f'{tag}-a', f'{tag}-b']
    assert stored['results'] == {'tag': tag}
  # The next export cleans up what the killed one left beside it.
  write_tiny_export(out, 'next')
  assert os.listdir(tmp_path) == ['exported']
  assert exporting.read_export(str(out))['class_names'] == ['next-a', 'next-b']


# ---------------------------------------------------------------- workdirs


def test_cli_train_refuses_an_export_and_a_strangers_folder(tmp_path):
  out = tmp_path / 'exported'
  write_tiny_export(out, 'kept', official=True)
  before = digest_tree(out)
  proc = run_tool('train', *lib.flag_args(), f'--workdir={out}')
  assert_one_fatal_line(proc, str(out), 'export folder', 'new or empty')
  assert digest_tree(out) == before
  assert exporting.read_export(str(out))['class_names'] == ['kept-a', 'kept-b']


def test_workdir_kinds(tmp_path):
  from concepthash_jax import errors  # pylint: disable=g-import-not-at-top
  from concepthash_jax import workdir  # pylint: disable=g-import-not-at-top
  workdir.check_folder(str(tmp_path / 'new'))
  (tmp_path / 'empty').mkdir()
  workdir.check_folder(str(tmp_path / 'empty'))
  # A run from before markers, recognised by its files.
  workdir.check_folder(str(fake_workdir(tmp_path / 'old_run')))
  assert workdir.is_workdir(str(tmp_path / 'old_run'))
  cache = tmp_path / 'cache'
  cache.mkdir()
  safe_files.write_marker(str(cache), 'cache')
  with pytest.raises(errors.WorkdirError, match='cache folder'):
    workdir.check_folder(str(cache))
  (tmp_path / 'a_file').write_text('x')
  with pytest.raises(errors.WorkdirError, match='a_file is a file'):
    workdir.check_folder(str(tmp_path / 'a_file'))
  with pytest.raises(errors.WorkdirError, match='a_file is a file, and a folder'):
    workdir.check_folder(str(tmp_path / 'a_file' / 'run'))


# ------------------------------------------------------------- checkpoints

# What orbax raises when the disk fills during a save (tensorstore's message).
ORBAX_DISK_FULL = ('RESOURCE_EXHAUSTED: Error writing "params/0" in OCDBT '
                   'database at local file "{}": Failed to write 983789 bytes '
                   "to file 7: No space left on device [os_error_code='28']")


def test_full_disk_during_a_save_names_folder_and_resume_step(tmp_path,
                                                              monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from concepthash_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from concepthash_jax import errors  # pylint: disable=g-import-not-at-top
  directory = str(tmp_path / 'checkpoints')
  ckpt = checkpointing.Checkpointer(directory)
  kept = {'w': np.arange(6, dtype=np.float32)}
  ckpt.save(4, kept)
  real_save = ocp.CheckpointManager.save

  def full_disk(self, step, *args, **kwargs):
    os.makedirs(os.path.join(directory, f'{step}.orbax-checkpoint-tmp'))
    raise ValueError(ORBAX_DISK_FULL.format(directory))
  monkeypatch.setattr(ocp.CheckpointManager, 'save', full_disk)
  with pytest.raises(errors.CheckpointError) as e:
    ckpt.save(6, {'w': np.zeros(6, np.float32)})
  assert str(e.value) == (
      f'Cannot save checkpoint step 6 in {directory}: the disk is full; free '
      'space there and rerun the same command (a rerun resumes from step 4)')
  assert os.listdir(directory) == ['4']  # The partial save is gone.
  monkeypatch.setattr(ocp.CheckpointManager, 'save', real_save)
  ckpt.close()
  again = checkpointing.Checkpointer(directory)
  abstract = {'w': jax.ShapeDtypeStruct(
      (6,), np.float32, sharding=jax.sharding.SingleDeviceSharding(
          jax.devices()[0]))}
  assert again.latest_step() == 4
  np.testing.assert_array_equal(np.asarray(again.restore(abstract)['w']),
                                kept['w'])
  again.close()


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  return lib.trained_tiny_run(tmp_path_factory)


def copy_run(workdir, target, keep_steps):
  """A copy of a run with only `keep_steps` checkpoints."""
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(workdir, target)
  for name in os.listdir(target / 'checkpoints'):
    if name.isdigit() and int(name) not in keep_steps:
      shutil.rmtree(target / 'checkpoints' / name)
  return target


def damage(workdir, step):
  """Makes checkpoint `step` unreadable (its saved metrics no longer parse)."""
  path = workdir / 'checkpoints' / str(step) / 'metrics' / 'metrics'
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text('{torn')


def test_tiny_run_is_a_marked_workdir(tiny_run):
  workdir, _ = tiny_run
  assert safe_files.folder_kind(workdir) == 'workdir'


def test_only_checkpoint_unreadable_is_one_fatal_line(tiny_run, tmp_path):
  workdir = copy_run(tiny_run[0], tmp_path / 'run', keep_steps={6})
  damage(workdir, 6)
  wanted = f'No readable checkpoint in {workdir / "checkpoints"} (step 6: '
  encode = run_tool('encode', f'--workdir={workdir}')
  assert_one_fatal_line(encode, wanted)
  export = run_tool('export', f'--workdir={workdir}', f'--out={tmp_path / "e"}')
  assert_one_fatal_line(export, wanted)
  assert sorted(os.listdir(tmp_path)) == ['run']


def test_export_after_fallback_writes_the_step_it_exported(tiny_run, tmp_path):
  from concepthash_jax.tools import export  # pylint: disable=g-import-not-at-top
  workdir = copy_run(tiny_run[0], tmp_path / 'run', keep_steps={4, 6})
  damage(workdir, 6)  # results.json describes step 6.
  hasher = inference.ConceptHasher.load(str(workdir))
  assert (hasher.step, hasher.results) == (4, None)
  out = tmp_path / 'exported'
  export.export_hasher(hasher, str(out))
  stored = exporting.read_export(str(out))
  assert stored['meta']['step'] == 4
  assert stored['results'] is None
  assert exporting.RESULTS_FILE not in os.listdir(out)
  # The run's own final step: its results go with it.
  final = inference.ConceptHasher.load(tiny_run[0])
  assert final.step == 6 and final.results == tiny_run[1]


# ------------------------------------------------------------------ images


def gradient(height=6, width=5):
  """uint8 (H, W, 3) with distinct values in every channel."""
  values = np.arange(height * width * 3).reshape(height, width, 3) * 5 % 256
  return values.astype(np.uint8)


def test_16_bit_and_float_images_scale_like_image_tools(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from concepthash_jax.data import folders  # pylint: disable=g-import-not-at-top
  from concepthash_jax.data import pixels  # pylint: disable=g-import-not-at-top
  grey8 = gradient()[..., 0]
  want = np.repeat(grey8[..., None], 3, axis=-1)
  grey16 = grey8.astype(np.uint16) * 257
  Image.fromarray(grey16).save(tmp_path / 'grey16.png')
  with Image.open(tmp_path / 'grey16.png') as image:
    assert image.mode in ('I;16', 'I')
    np.testing.assert_array_equal(pixels.to_rgb(image), want)
  np.testing.assert_array_equal(folders.load_image(str(tmp_path / 'grey16.png')),
                                want)
  np.testing.assert_array_equal(pixels.to_rgb(grey16), want)
  np.testing.assert_array_equal(pixels.to_rgb(Image.fromarray(grey16)), want)
  np.testing.assert_array_equal(
      pixels.to_rgb(gradient().astype(np.uint16) * 257), gradient())
  as_float = grey8.astype(np.float32) / 255
  Image.fromarray(as_float).save(tmp_path / 'grey.tiff')
  np.testing.assert_array_equal(folders.load_image(str(tmp_path / 'grey.tiff')),
                                want)
  np.testing.assert_array_equal(pixels.to_rgb(gradient() / 255.0), gradient())
  Image.fromarray(as_float * 300).save(tmp_path / 'hdr.tiff')
  with pytest.raises(folders.core.CorruptImageError,
                     match=r'hdr.tiff is a float image with values in \[0, 300\]'):
    folders.load_image(str(tmp_path / 'hdr.tiff'))
  # Shapes: grey, grey with one channel, RGBA accepted; the rest refused.
  np.testing.assert_array_equal(pixels.to_rgb(grey8[..., None]), want)
  rgba = np.concatenate([gradient(), np.full((6, 5, 1), 7, np.uint8)], -1)
  np.testing.assert_array_equal(pixels.to_rgb(rgba), gradient())
  refused = {(3, 6, 5): r'channels first.*np.transpose\(image, \(1, 2, 0\)\)',
             (6, 5, 5): r'shape \(6, 5, 5\); accepted: uint8',
             (0, 0, 3): r'shape \(0, 0, 3\), no pixels'}
  for shape, message in refused.items():
    with pytest.raises(pixels.ImageFormatError, match=message) as e:
      pixels.to_rgb(np.zeros(shape, np.uint8))
    assert '\n' not in str(e.value)
  with pytest.raises(pixels.ImageFormatError, match='dtype int64'):
    pixels.to_rgb(np.zeros((4, 4, 3), np.int64))


def test_encode_takes_grey_rgba_and_16_bit_like_their_rgb(tiny_run, tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from concepthash_jax.data import pixels  # pylint: disable=g-import-not-at-top
  hasher = inference.ConceptHasher.load(tiny_run[0])
  rng = np.random.default_rng(0)
  grey = rng.integers(0, 256, (40, 36), dtype=np.uint8)
  rgb = rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)
  Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / 'grey16.png')
  rgba = np.concatenate([rgb, np.full((40, 36, 1), 9, np.uint8)], -1)
  out = hasher.encode([np.repeat(grey[..., None], 3, -1), grey, grey[..., None],
                       str(tmp_path / 'grey16.png'), rgb, rgba,
                       rgb.astype(np.float32) / 255])['codes_cont']
  for i in (1, 2, 3):
    np.testing.assert_array_equal(out[i], out[0])
  for i in (5, 6):
    np.testing.assert_array_equal(out[i], out[4])
  with pytest.raises(pixels.ImageFormatError, match=r'image 1 .*\(3, 40, 36\)'):
    hasher.encode([rgb, rgb.transpose(2, 0, 1)])


# ------------------------------------------------------------- image cache


@pytest.fixture()
def cub(tmp_path):
  import test_cache  # pylint: disable=g-import-not-at-top
  test_cache._make_cub(str(tmp_path / 'data'), num_images=8)  # pylint: disable=protected-access
  return test_cache


def cache_epoch(cub, tmp_path, **overrides):
  """Test-split batches of the tiny CUB through the cache (and the folder used)."""
  from concepthash_jax import data  # pylint: disable=g-import-not-at-top
  cfg = cub._cfg(tmp_path / 'data', cache_dir=str(tmp_path / 'cache'),  # pylint: disable=protected-access
                 **overrides)
  return cub._epoch(data.build(cfg, 'test'), cfg, train=False)  # pylint: disable=protected-access


def warnings_of(monkeypatch):
  from concepthash_jax.data import cache  # pylint: disable=g-import-not-at-top
  said = []
  monkeypatch.setattr(cache.logging, 'warning',
                      lambda fmt, *args: said.append(fmt % args))
  return said


def test_cache_dir_that_is_a_file_is_one_config_error(cub, tmp_path):
  from concepthash_jax import errors  # pylint: disable=g-import-not-at-top
  (tmp_path / 'cache').write_text('my notes')
  with pytest.raises(errors.ConfigError,
                     match=r"data.cache_dir='.*cache' is a file, not a folder"):
    cache_epoch(cub, tmp_path)
  assert (tmp_path / 'cache').read_text() == 'my notes'
  with pytest.raises(errors.ConfigError, match=r"data.cache='yes'; valid: True"):
    cache_epoch(cub, tmp_path, cache='yes')


def test_truncated_cache_is_rebuilt_with_a_warning(cub, tmp_path, monkeypatch):
  uncached = cache_epoch(cub, tmp_path, cache=False)
  cub._assert_same(cache_epoch(cub, tmp_path), uncached)  # pylint: disable=protected-access
  [folder] = os.listdir(tmp_path / 'cache')
  folder = tmp_path / 'cache' / folder
  assert safe_files.folder_kind(str(folder)) == 'cache'
  pixels_file = folder / 'pixels.npy'
  os.truncate(pixels_file, os.path.getsize(pixels_file) // 2)
  said = warnings_of(monkeypatch)
  cub._assert_same(cache_epoch(cub, tmp_path), uncached)  # pylint: disable=protected-access
  assert said == [f'The image cache {folder} is damaged (ValueError: mmap '
                  'length is greater than file size); rebuilding it.']
  assert os.listdir(tmp_path / 'cache') == [folder.name]


def test_same_size_same_mtime_rewrite_needs_verify(cub, tmp_path, monkeypatch):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from concepthash_jax import data  # pylint: disable=g-import-not-at-top
  from concepthash_jax.data import cache  # pylint: disable=g-import-not-at-top
  first = cache_epoch(cub, tmp_path)
  cfg = cub._cfg(tmp_path / 'data')  # pylint: disable=protected-access
  path = data.build(cfg, 'test').paths[0]
  stat = os.stat(path)
  with Image.open(path) as image:  # A flat picture: a shorter JPEG...
    flat = Image.new('RGB', image.size, (40, 90, 200))
  flat.save(tmp_path / 'flat.jpg', quality=90)
  other = (tmp_path / 'flat.jpg').read_bytes()
  assert len(other) < stat.st_size
  with open(path, 'wb') as f:  # ...padded after its end: same size, old mtime.
    f.write(other + b'\x00' * (stat.st_size - len(other)))
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
  truth = cache_epoch(cub, tmp_path, cache=False)
  assert not np.array_equal(truth[0]['image'], first[0]['image'])
  # The cheap check trusts (size, mtime): documented, kept.
  cub._assert_same(cache_epoch(cub, tmp_path), first)  # pylint: disable=protected-access
  said = warnings_of(monkeypatch)
  cub._assert_same(cache_epoch(cub, tmp_path, cache='verify'), truth)  # pylint: disable=protected-access
  assert len(said) == 1 and 'data.cache=verify: 1 source file' in said[0]
  assert path in said[0]
  cub._assert_same(cache_epoch(cub, tmp_path, cache='verify'), truth)  # pylint: disable=protected-access
  assert len(said) == 1  # Verified once per process.
  monkeypatch.setattr(cache, '_checked_this_process', set())
  builds = []
  build = cache._build  # pylint: disable=protected-access
  monkeypatch.setattr(cache, '_build',
                      lambda *a, **k: builds.append(a[3]) or build(*a, **k))
  cub._assert_same(cache_epoch(cub, tmp_path, cache='rebuild'), truth)  # pylint: disable=protected-access
  cub._assert_same(cache_epoch(cub, tmp_path, cache='rebuild'), truth)  # pylint: disable=protected-access
  assert len(builds) == 1


def test_metrics_log_drops_a_torn_line_and_rewrites_atomically(tmp_path):
  from concepthash_jax import metrics_log  # pylint: disable=g-import-not-at-top
  lines = [json.dumps({'step': s, 'train/loss': 1.0 / s}) + '\n'
           for s in (1, 2, 3)]
  (tmp_path / 'metrics.jsonl').write_text(''.join(lines) + '{"step": 4, "tr')
  log = metrics_log.MetricsLogger(str(tmp_path), start_step=2, total_steps=4,
                                  batch_size=1)
  log.close()
  assert (tmp_path / 'metrics.jsonl').read_text() == ''.join(lines[:2])
  assert [h['step'] for h in log.history] == [1, 2]


def test_os_error_at_a_tool_boundary_is_one_fatal_line(tmp_path, capsys):
  from concepthash_jax.tools import cli  # pylint: disable=g-import-not-at-top
  (tmp_path / 'a_file').write_text('x')

  def main(argv):
    del argv
    with open(tmp_path / 'a_file' / 'out.json', 'w'):
      pass
  with pytest.raises(SystemExit) as e:
    cli.call_main(main, ['tool'])
  assert e.value.code == 2
  assert capsys.readouterr().err == (
      f'FATAL: {tmp_path / "a_file" / "out.json"}: Not a directory; a file '
      'stands where a folder is needed on this path; choose another path\n')


def test_export_through_a_link_replaces_the_folder_and_keeps_the_link(tmp_path):
  write_tiny_export(tmp_path / 'real', 'old')
  os.symlink(tmp_path / 'real', tmp_path / 'link')
  write_tiny_export(tmp_path / 'link', 'new')
  assert os.path.islink(tmp_path / 'link')
  assert exporting.read_export(str(tmp_path / 'link'))['class_names'] == [
      'new-a', 'new-b']
  assert sorted(os.listdir(tmp_path)) == ['link', 'real']
