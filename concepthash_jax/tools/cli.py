"""What every command-line tool shares: config names, --help, the absl run.

The console scripts (`concepthash-train`, `-encode`, ...) and `python -m
concepthash_jax.tools.X` both enter through `run`, so a tool behaves the same
whichever way it is started and from any directory.
"""
import os
import sys
from typing import Callable, Optional, Sequence

from absl import app
from absl import flags
import ml_collections

from concepthash_jax import configs as configs_pkg
from concepthash_jax import errors
from concepthash_jax import safe_files
from concepthash_jax import xla_flags

CONFIG_DIR = os.path.dirname(os.path.abspath(configs_pkg.__file__))
# Modules of the config folder that are not a config of their own.
_NOT_CONFIGS = ('__init__', 'common')
# absl's help flags exit with status 1; ours print the same and exit 0.
_HELP_ARGS = ('-h', '-?', '--help', '--helpshort', '-help', '-helpshort')
_HELPFULL_ARGS = ('--helpfull', '-helpfull')

# `define_run_flags` defines flags for the tool that calls it: absl then files
# them under that tool's module (its --help block), not under this one.
flags.disclaim_key_flags()


def config_names() -> list:
  """Names of the installed config files ('base', 'cub', ...), sorted."""
  return sorted(name[:-3] for name in os.listdir(CONFIG_DIR)
                if name.endswith('.py') and name[:-3] not in _NOT_CONFIGS)


def resolve_config(value: str) -> str:
  """`--config` value -> a config file path[:arg] that ml_collections loads.

  An existing file wins; otherwise a built-in name (`cub`, `cub:nbit=32`) or a
  checkout-relative `configs/<name>.py` means the installed file of that name.

  Args:
    value: what the user gave, path-or-name[:arg].

  Returns:
    path[:arg] with path an existing file.

  Raises:
    SystemExit: neither a file nor a built-in name (one sentence naming both).
  """
  path, sep, arg = value.partition(':')
  if os.path.isfile(path):
    return value
  name = path[:-3] if path.endswith('.py') else path
  if name.startswith('configs/'):
    name = name[len('configs/'):]
  if name in config_names():
    return os.path.join(CONFIG_DIR, f'{name}.py') + sep + arg
  sys.exit(f'--config={value}: {path} is neither a config file nor a built-in '
           f'config; give the path of a .py file defining get_config() or one '
           f'of {", ".join(config_names())} (e.g. --config=cub:nbit=32).')


def resolve_config_args(argv: Sequence[str]) -> list:
  """argv with every --config value (`=value` or next argument) resolved."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg == '--':
      break
    for prefix in ('--config=', '-config='):
      if arg.startswith(prefix):
        out[i] = prefix + resolve_config(arg[len(prefix):])
    if arg in ('--config', '-config') and i + 1 < len(out):
      out[i + 1] = resolve_config(out[i + 1])
  return out


def define_run_flags(*, data_root: bool = True) -> None:
  """Defines --workdir and --checkpoint, the trained run a tool reads.

  The tools that restore a run (encode, explain, export) name it alike; each
  calls this from its own `define_flags` and marks --workdir required where it
  is (export can read an official state dict instead).

  Args:
    data_root: also --data_root, to find a dataset moved since training.
  """
  flags.DEFINE_string('workdir', None, 'Run directory written by launch.py.')
  flags.DEFINE_enum('checkpoint', 'latest', ['latest', 'best'],
                    'Which checkpoint: the final one or the best by mAP@R.')
  if data_root:
    flags.DEFINE_string('data_root', None, 'Override config.data.root '
                        '(dataset moved since training).')


def help_text(doc: str, flag_names: Sequence[str], full: bool = False) -> str:
  """The tool's docstring and its own flags (every flag when `full`)."""
  if full:
    flag_str = flags.FLAGS.get_help()
  else:
    wanted = set(flag_names)
    blocks = []
    for module, module_flags in flags.FLAGS.flags_by_module_dict().items():
      if wanted & {f.name for f in module_flags}:
        # module_help starts with the module's name or file: noise here.
        text = flags.FLAGS.module_help(module).strip('\n')
        blocks.append(text.split('\n', 1)[1])
    flag_str = '\n'.join(blocks) + (
        '\n\n--helpfull lists every flag (absl logging, JAX, ...).')
  return f'{doc.strip()}\n\nflags:\n{flag_str}\n'


def exit_user_error(error):
  """Prints the message alone (the traceback of a user mistake is noise); exits 2."""
  sys.stderr.write(f'FATAL: {error}\n')
  sys.exit(errors.EXIT_USER_ERROR)


def os_error_message(error: OSError) -> str:
  """One sentence naming the path an OSError is about, and the fix."""
  path = error.filename if error.filename is not None else '(no path given)'
  if error.filename2 is not None:
    path = f'{path} -> {error.filename2}'
  return safe_files.describe_os_error(error, os.fsdecode(path)
                                      if isinstance(path, bytes) else str(path))


def call_main(main: Callable, argv):
  """`main(argv)`; a UserError, or an OSError about a path, ends in one FATAL line.

  Any other exception is a fault of the code and keeps its traceback.
  """
  try:
    return main(argv)
  except errors.UserError as e:
    exit_user_error(e)
  except OSError as e:
    if e.filename is None:
      raise  # Not about a path the user gave (a socket, a library fault).
    exit_user_error(os_error_message(e))


def run(main: Callable, doc: str,
        define_flags: Optional[Callable[[], None]] = None,
        flags_parser: Callable = app.parse_flags_with_usage) -> None:
  """Defines the tool's flags, answers --help (exit 0), else absl's app.run.

  A user's mistake (errors.UserError, or an OSError naming a path) raised by
  `main` ends in one `FATAL:` line and exit status 2, without a traceback.

  Args:
    main: absl main(argv).
    doc: the help text (the tool's module docstring).
    define_flags: defines the tool's flags (tools define them only when run,
      so that importing a tool claims no flag names).
    flags_parser: absl flags parser (see absl.app.run).
  """
  before = set(flags.FLAGS)
  if define_flags is not None:
    define_flags()
  ours = set(flags.FLAGS) - before
  # ml_collections reads --config.a.b overrides from sys.argv itself.
  sys.argv[:] = resolve_config_args(sys.argv)
  args = sys.argv[1:sys.argv.index('--')] if '--' in sys.argv else sys.argv[1:]
  full = any(a in _HELPFULL_ARGS for a in args)
  if full or any(a in _HELP_ARGS for a in args):
    sys.stdout.write(help_text(doc, sorted(ours), full=full))
    sys.exit(0)

  def main_with_cache(argv):
    # Before the tool's first compile: a tool with a --config (train, ablate) caches
    # where its config says, the others in the default folder.
    config = flags.FLAGS['config'].value if 'config' in flags.FLAGS else None
    try:
      xla_flags.configure_compilation_cache(
          config if isinstance(config, ml_collections.ConfigDict) else None)
    except errors.UserError as e:
      exit_user_error(e)
    return call_main(main, argv)

  app.run(main_with_cache, flags_parser=flags_parser)
