"""Writing files a user keeps: temporary name, then rename; never over a stranger.

Every file the product writes (workdir files, checkpoints, exports, indexes,
caches, pages) goes through here, so that a crash, a full disk or a SIGKILL
leaves either the old file or the new one, never a torn mix, and so that a
path the user mistyped never destroys a file the product did not write.

  with safe_files.atomic_write('db.chindex', kind='index') as f:
    f.write(payload)                      # lands as db.chindex only on success

  safe_files.check_replaceable(path, 'index', is_ours=index_lib.is_index)

A folder the product owns carries a marker file, `MARKER`, naming its kind
('workdir', 'export', 'cache', 'pages', ...), so that the next write into it
can tell a folder of ours from a user's folder that merely has the same name.
"""
import contextlib
import hashlib
import ctypes
import errno
import json
import os
import secrets
import shutil
from typing import Callable, Optional

from concepthash_jax import errors

MARKER = '.concepthash_jax'  # Marker file of a folder this product owns.


class OverwriteError(errors.UserError, FileExistsError):
  """The destination exists and is not a file of the kind the product writes."""


class WriteError(errors.UserError, OSError):
  """The file system refused a write (read-only, full, a file on the path)."""


def temporary_name(path: str) -> str:
  """A unique sibling of `path` (same folder, so the rename is atomic)."""
  folder, name = os.path.split(os.path.abspath(path))
  return os.path.join(folder, f'.{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}')


def describe_os_error(error: OSError, path: str, fix: str = '') -> str:
  """One sentence naming `path`, what the system said and the fix."""
  reason = error.strerror or str(error)
  hint = {
      30: 'the disk is read-only; choose a writable folder',
      28: 'the disk is full; free space and rerun',
      20: 'a file stands where a folder is needed on this path; choose another path',
      21: 'it is a folder; give a file path',
      13: 'permission denied; choose a folder you can write',
      17: 'it already exists',
  }.get(error.errno, '')
  fix = fix or hint
  return f'{path}: {reason}' + (f'; {fix}' if fix else '')


@contextlib.contextmanager
def write_errors(path: str, fix: str = ''):
  """Turns an OSError inside the block into a WriteError naming `path`."""
  try:
    yield
  except errors.UserError:
    raise
  except OSError as e:
    # The user's path, not the temporary sibling the system may have named.
    raise WriteError(describe_os_error(e, path, fix)) from e


def _fsync_folder(folder: str) -> None:
  """Makes a rename inside `folder` durable (no-op where folders cannot sync)."""
  try:
    fd = os.open(folder, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def publish_mode(path: str) -> None:
  """Gives a finished temporary file the permissions a plain `open` would."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(path, 0o666 & ~umask)


def replace(tmp_path: str, path: str) -> None:
  """Renames a finished temporary file over `path` and syncs the folder."""
  os.replace(tmp_path, path)
  _fsync_folder(os.path.dirname(os.path.abspath(path)) or '.')


@contextlib.contextmanager
def atomic_write(path: str, mode: str = 'wb', *, fix: str = ''):
  """Opens a temporary sibling of `path`; renames it into place on success.

  On any exception the temporary file is removed and `path` is untouched. An
  OSError (read-only disk, full disk, a file on the path) becomes one
  WriteError sentence naming `path`.

  Args:
    path: the final file.
    mode: 'wb' or 'w'.
    fix: what to tell the user when the write fails (default: by errno).

  Yields:
    The open temporary file.
  """
  tmp = None
  with write_errors(path, fix):
    if os.path.isdir(path):
      raise OverwriteError(f'{path} is a folder; give the path of a file.')
    tmp = temporary_name(path)
    try:
      with open(tmp, mode) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
      publish_mode(tmp)
      replace(tmp, path)  # Syncs the folder too.
      tmp = None
    finally:
      if tmp is not None and os.path.exists(tmp):
        os.remove(tmp)


def sha256_file(path: str) -> str:
  """Hex sha256 of a file's bytes, read in blocks."""
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def write_text(path: str, text: str, **kwargs) -> None:
  """`atomic_write` of a whole text."""
  with atomic_write(path, 'w', **kwargs) as f:
    f.write(text)


def write_json(path: str, obj, **kwargs) -> None:
  """`atomic_write` of an indented JSON document."""
  write_text(path, json.dumps(obj, indent=2) + '\n', **kwargs)


def check_replaceable(path: str, what: str, *,
                      is_ours: Callable[[str], bool], fix: str = '') -> None:
  """Refuses (OverwriteError) when `path` exists and is not a `what` of ours.

  Args:
    path: the destination about to be written.
    what: the kind of file, for the message ('code index', ...).
    is_ours: True when the existing file is one the product wrote.
    fix: the remedy; default: choose another path or move the file away.
  """
  if not os.path.lexists(path):
    return
  if os.path.isdir(path) and not os.path.islink(path):
    raise OverwriteError(f'{path} is a folder, not a {what}; give the path of '
                         f'a {what} file.')
  if not is_ours(path):
    raise OverwriteError(
        f'{path} exists and is not a {what} written by concepthash_jax; '
        + (fix or 'choose another path, or move that file away first.'))


def write_marker(folder: str, kind: str, **fields) -> None:
  """Marks `folder` as one of ours of kind `kind` (atomically)."""
  write_json(os.path.join(folder, MARKER), {'kind': kind, **fields})


def folder_kind(folder: str) -> Optional[str]:
  """The kind in `folder`'s marker, or None (no marker, or unreadable)."""
  try:
    with open(os.path.join(folder, MARKER)) as f:
      return json.load(f).get('kind')
  except (OSError, ValueError, AttributeError):
    return None


def file_on_path(folder: str) -> Optional[str]:
  """The nearest existing ancestor of `folder` (itself included) that is not a folder."""
  current = os.path.abspath(folder)
  while not os.path.lexists(current):
    parent = os.path.dirname(current)
    if parent == current:
      return None
    current = parent
  return None if os.path.isdir(current) else current


def ensure_folder(folder: str, what: str, fix: str = '') -> None:
  """Creates `folder` (and parents), or one WriteError sentence naming it."""
  blocker = file_on_path(folder)
  if blocker == os.path.abspath(folder):
    raise WriteError(f'{folder} is a file, not a folder; give a folder path '
                     f'for the {what}.')
  if blocker:
    raise WriteError(f'{folder}: {blocker} is a file, and a folder is needed '
                     f'there; give another folder path for the {what}.')
  with write_errors(folder, fix):
    os.makedirs(folder, exist_ok=True)


def claim_folder(folder: str, kind: str, what: str, *,
                 is_legacy: Optional[Callable[[str], bool]] = None) -> None:
  """Creates or reuses an output folder of `kind`; refuses a folder of other files.

  A folder is reused when it carries this kind's marker, when it is empty, or
  when `is_legacy` recognises it as an unmarked folder the product wrote;
  then it is marked. Anything else is a user's folder and stays
  untouched, so output never lands among files the product did not write.

  Args:
    folder: the output folder.
    kind: the marker kind ('pages', 'explain', ...).
    what: what goes there, for the message.
    is_legacy: recognises an unmarked folder of ours, or None.

  Raises:
    OverwriteError: a folder holding other files.
    WriteError: a file on the path, or a folder that cannot be written.
  """
  if os.path.isdir(folder) and folder_kind(folder) != kind and os.listdir(folder):
    if not (is_legacy and is_legacy(folder)):
      raise OverwriteError(
          f'{folder} is a folder of other files, not one of {what}; give a new '
          'or empty folder.')
  ensure_folder(folder, what)
  with write_errors(folder, 'choose a writable folder'):
    write_marker(folder, kind)


def save_figure(fig, path: str, **kwargs) -> None:
  """`atomic_write` of a matplotlib figure, in the format its file name says."""
  fmt = os.path.splitext(path)[1].lstrip('.') or 'png'
  with atomic_write(path) as f:
    fig.savefig(f, format=fmt, **kwargs)


_RENAME_EXCHANGE = 2  # renameat2 flag: swap two paths atomically (Linux).
_AT_FDCWD = -100


def _exchange(first: str, second: str) -> bool:
  """Swaps two existing paths in one atomic step; False where unsupported."""
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = libc.renameat2
  except (OSError, AttributeError):
    return False
  if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second),
               _RENAME_EXCHANGE) == 0:
    return True
  code = ctypes.get_errno()
  if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
    return False  # This file system cannot exchange: two renames instead.
  raise OSError(code, os.strerror(code), second)


def replace_folder(staged: str, path: str) -> None:
  """Puts the finished folder `staged` at `path`; the folder that was there goes.

  Where the system can (Linux renameat2), the two folders are exchanged in one
  atomic step, so `path` always holds the whole old folder or the whole new
  one. Elsewhere the old folder is renamed aside first and renamed back if the
  second rename fails; only a kill between the two renames leaves `path`
  missing, with the old folder beside it under a `.old-` name.

  Args:
    staged: a complete folder, a sibling of `path` (same file system).
    path: the destination; a folder or absent.
  """
  if not os.path.lexists(path):
    os.rename(staged, path)
  elif _exchange(staged, path):
    shutil.rmtree(staged)  # Now the old folder.
  else:
    old = aside_name(path)
    os.rename(path, old)
    try:
      os.rename(staged, path)
    except BaseException:
      os.rename(old, path)
      raise
    shutil.rmtree(old)
  _fsync_folder(os.path.dirname(os.path.abspath(path)) or '.')


def aside_name(path: str) -> str:
  """A unique sibling name for the old folder while `replace_folder` runs."""
  folder, name = os.path.split(os.path.abspath(path))
  return os.path.join(folder,
                      f'.{name}.old-{os.getpid()}-{secrets.token_hex(4)}')


def _pid_of(entry: str, prefix: str):
  """The process id in a sibling name '<prefix><pid>-<hex>', or None."""
  try:
    return int(entry[len(prefix):].split('-', 1)[0])
  except ValueError:
    return None


def _running(pid) -> bool:
  if pid is None:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def remove_stale_siblings(path: str) -> None:
  """Removes what killed writers of `path` left beside it (their process is gone).

  Call after a new `path` is in place: a set-aside old folder is then out of
  date, and a half-written temporary one never became anything.
  """
  folder, name = os.path.split(os.path.abspath(path))
  for entry in os.listdir(folder):
    for prefix in (f'.{name}.old-', f'.{name}.tmp-'):
      if entry.startswith(prefix) and not _running(_pid_of(entry, prefix)):
        stale = os.path.join(folder, entry)
        if os.path.isdir(stale) and not os.path.islink(stale):
          shutil.rmtree(stale, ignore_errors=True)
        else:
          os.remove(stale)


def set_aside_folders(path: str) -> list:
  """Old folders a killed `replace_folder` left beside `path` (newest first)."""
  folder, name = os.path.split(os.path.abspath(path))
  try:
    entries = os.listdir(folder)
  except OSError:
    return []
  found = [os.path.join(folder, e) for e in entries
           if e.startswith(f'.{name}.old-')]
  return sorted(found, key=os.path.getmtime, reverse=True)


@contextlib.contextmanager
def staged_folder(path: str, *, fix: str = ''):
  """Yields an empty temporary sibling of `path`; on success it replaces `path`.

  On any exception the temporary folder is removed and `path` is untouched;
  an OSError becomes one WriteError naming `path`.
  """
  with write_errors(path, fix):
    if os.path.islink(path):  # Replace the folder it points to, keep the link.
      path = os.path.realpath(path)
    parent = os.path.dirname(os.path.abspath(path))
    blocker = file_on_path(parent)
    if blocker:
      raise WriteError(f'{path}: {blocker} is a file, and a folder is needed '
                       'there; choose another path.')
    os.makedirs(parent, exist_ok=True)
    staged = temporary_name(path)
    os.mkdir(staged)
    try:
      yield staged
      replace_folder(staged, path)
      staged = None
    finally:
      if staged is not None:
        shutil.rmtree(staged, ignore_errors=True)
