"""One benchmark row in a child process: the parent's runner and the child's printer.

Each row of a benchmark table runs in its own Python process, so that its peak memory
(host RSS, an accelerator's high-water mark) and its compile caches are that row's
alone. The child prints its result as one JSON line behind a prefix (print_json); the
parent runs the child and reads the last such line back (run_json). Other output on
stdout (library warnings, progress) is passed over.

Defines no flags: the benchmark scripts import one another, and absl flags defined twice
clash.
"""
import json
import os
import shlex
import subprocess
import sys

# The folder that holds the `benchmarks` package: children run from it, so
# `python -m benchmarks.NAME` finds the package whatever the parent's working folder.
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The end of a failed child's stderr that goes into the error: its traceback, not the
# whole log.
_STDERR_TAIL = 3000


def print_json(obj: dict, prefix: str = 'RESULT ') -> None:
  """Prints `obj` as the one JSON line that run_json reads back, flushed at once.

  Args:
    obj: the row's result, a JSON-serialisable dict (run_json reads back objects only).
    prefix: what the line starts with (the parent's run_json `prefix`).
  """
  print(prefix + json.dumps(obj), flush=True)


def module_command(module: str, *args: str, python: str = sys.executable) -> list:
  """The command line that runs benchmark `module` (`benchmarks.NAME`) as a child.

  Args:
    module: the module's dotted name; a script passes its own `__spec__.name`.
    *args: its command-line arguments.
    python: the interpreter (another environment's, for a side that needs torch).
  """
  return [python, '-m', module, *args]


def run_json(cmd: list, prefix: str = 'RESULT ') -> dict:
  """Runs `cmd` and returns the JSON object on the last stdout line after `prefix`.

  Args:
    cmd: the child's command line (program and arguments).
    prefix: what the result line starts with, before its `{`; '' for a child that prints
      bare JSON (pytorch_reference_step.py).

  Returns:
    The parsed object.

  Raises:
    RuntimeError: the child exited non-zero or printed no result line; the message names
      the command, its exit code and the end of its stderr.
  """
  out = subprocess.run(cmd, capture_output=True, text=True, check=False,
                       cwd=_PACKAGE_PARENT)
  # The `{` keeps a bare-JSON child's other stdout lines out when prefix is ''.
  lines = [l for l in out.stdout.splitlines() if l.startswith(prefix + '{')]
  if out.returncode or not lines:
    missing = '' if out.returncode else f', no stdout line {prefix!r} + JSON'
    raise RuntimeError(f'{shlex.join(cmd)} failed (exit code '
                       f'{out.returncode}{missing}); the end of its stderr:\n'
                       f'{out.stderr[-_STDERR_TAIL:]}')
  return json.loads(lines[-1][len(prefix):])
