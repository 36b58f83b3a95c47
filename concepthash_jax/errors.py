"""Error types of mistakes the user fixes: a config, a path, a file, a workdir.

launch.py prints the message of a `UserError` alone (no traceback) and exits
with `EXIT_USER_ERROR`; anything else is a fault of the code and keeps its
traceback. Each subclass also derives from the builtin that callers already
catch (ValueError, FileNotFoundError, RuntimeError), so code written against
the builtin keeps working.
"""

EXIT_USER_ERROR = 2  # A UserError: the message says what to fix.
EXIT_PREEMPTED = 75  # SIGTERM: saved a checkpoint and stopped; rerun to resume.


class UserError(Exception):
  """A mistake the user can fix; the message names the file or key and the fix."""


class ConfigError(UserError, ValueError):
  """A config value that cannot work (found after the flags were parsed)."""


class DataError(UserError, ValueError):
  """A dataset file that exists but does not hold what its layout promises."""


class MissingFileError(UserError, FileNotFoundError):
  """A file or directory the run needs is not there."""


class WorkdirError(UserError, RuntimeError):
  """The workdir is busy, or holds a run the new config cannot continue."""


class CheckpointError(UserError, RuntimeError):
  """No checkpoint of a workdir can be read."""
