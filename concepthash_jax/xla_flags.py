"""Process-wide XLA settings that `config.train` chooses.

Three ways in. The scheduler flag goes through XLA_FLAGS, which XLA reads once, when its
first backend starts, so the command-line tools call `configure_xla_flags(config)` first
thing. The matmul library goes with each compile (`compiler_options`, which XLA:CPU
honours for it): the train step and the encode step carry their choice themselves, so a
run, a later `ConceptHasher` in another process and any user script compute the same
codes, whatever else the process did first. The persistent compilation cache
(`configure_compilation_cache`) is JAX's, pointed at a folder by the command-line tools.
"""
import functools
import hashlib
import os
import platform
from typing import Optional

from absl import logging
import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cache
import jax.numpy as jnp

from concepthash_jax import errors

# XLA:CPU matrix-multiply library for `train.cpu_matmul`. XLA's default hands dots to
# YNNPACK; turning YNN fusions off sends them to Eigen. 'auto' takes whichever runs the
# float32 products faster on the CPU at hand (Eigen on Intel CPUs with AVX-512, where
# YNNPACK's float32 kernels trail it; YNNPACK elsewhere, where it reaches the CPU's peak)
# and YNNPACK for bfloat16, whose bf16-in/f32-out kernels Eigen lacks (BENCHMARKS.md,
# "Against the authors' step").
CPU_MATMUL = ('auto', 'ynnpack', 'eigen')
# jax.jit compiler_options of each library.
CPU_MATMUL_OPTIONS = {'ynnpack': {}, 'eigen': {'xla_cpu_experimental_ynn_fusion_type': ''}}


def _train_section(config):
  """config.train, or {} for no config (a tool without one) or one without it."""
  return config.train if config is not None and 'train' in config else {}


def cpu_matmul_of(config) -> str:
  """A run's train.cpu_matmul; 'auto' for runs saved before the key existed."""
  return _train_section(config).get('cpu_matmul', 'auto')


@functools.lru_cache(maxsize=None)
def _first_cpu(cpuinfo: str) -> dict:
  """The fields of the first processor in `cpuinfo` (/proc/cpuinfo); {} off Linux."""
  try:
    with open(cpuinfo) as f:
      text = f.read(1 << 16)  # The first processor's block is enough.
  except OSError:
    return {}
  fields = {}
  for line in text.split('\n\n', 1)[0].splitlines():
    key, _, value = line.partition(':')
    fields[key.strip()] = value.strip()
  return fields


def _intel_avx512(cpuinfo: str) -> bool:
  """Whether `cpuinfo` describes an Intel CPU with AVX-512F (False off Linux)."""
  cpu = _first_cpu(cpuinfo)
  return cpu.get('vendor_id') == 'GenuineIntel' and 'avx512f' in cpu.get('flags', '').split()


def resolve_cpu_matmul(choice: str, dtype: str = 'float32',
                       cpuinfo: str = '/proc/cpuinfo') -> str:
  """`train.cpu_matmul` with 'auto' resolved for this CPU and model.dtype."""
  if choice not in CPU_MATMUL:
    raise ValueError(f'Unknown train.cpu_matmul {choice!r}; valid: {", ".join(CPU_MATMUL)}.')
  if choice != 'auto':
    return choice
  if dtype != 'float32':
    return 'ynnpack'
  return 'eigen' if _intel_avx512(cpuinfo) else 'ynnpack'


def compiler_options(cpu_matmul: str = 'auto', dtype='float32') -> Optional[dict]:
  """jax.jit compiler_options for `train.cpu_matmul` at compute dtype `dtype`.

  None off the CPU backend (GPU/TPU compilers have their own matmuls) and for XLA's
  default library.
  """
  if jax.default_backend() != 'cpu':
    return None
  library = resolve_cpu_matmul(cpu_matmul, jnp.dtype(dtype).name)
  return dict(CPU_MATMUL_OPTIONS[library]) or None


def configure_xla_flags(config) -> str:
  """Adds the XLA flags `config.train` asks for to XLA_FLAGS; returns them.

  Call it before any JAX computation. Flags the user already set in XLA_FLAGS win.
  (jax.jit's compiler_options accepts the scheduler flag but XLA:CPU does not read it
  from there: the step's memory is unchanged; hence the environment.)
  """
  wanted = {}
  if not config.train.cpu_concurrency_scheduler:
    wanted['xla_cpu_enable_concurrency_optimized_scheduler'] = 'false'
  current = os.environ.get('XLA_FLAGS', '')
  added = [f'--{k}={v}' for k, v in wanted.items() if f'--{k}=' not in current]
  if added:
    os.environ['XLA_FLAGS'] = ' '.join([current, *added]).strip()
  return ' '.join(added)


# ------------------------------------------------------------- compilation cache

# The persistent compilation cache (`train.compilation_cache`): every program that took
# JAX at least `jax_persistent_cache_min_compile_time_secs` (1 s by default) to compile
# is written to disk, keyed by the program, its compile options, the XLA flags, the
# devices and the jax version, so a later process (a resumed or repeated run, the
# encode / explain / search tools) loads the executable a fresh compile would give
# instead of compiling again (BENCHMARKS.md, "Start-up"). On GPUs JAX also keeps XLA's
# autotuning results there.
# Beyond this size the least recently used entries go; it holds the programs of many runs
# of many configs. JAX's size cap locks the folder with the filelock package, hence its
# place in setup.cfg.
COMPILATION_CACHE_MAX_BYTES = 4 << 30
# The environment variables by which a user chooses JAX's cache themselves; theirs wins.
_USER_CACHE_ENV = ('JAX_COMPILATION_CACHE_DIR', 'JAX_ENABLE_COMPILATION_CACHE')
_configured_dir = None  # The folder configure_compilation_cache set, if any.


def host_key(cpuinfo: str = '/proc/cpuinfo') -> str:
  """This machine's kind and JAX build, as a folder name: '<arch>-<12 hex digits>'.

  XLA:CPU compiles for the CPU it runs on. In a cache folder shared by different
  machines (a home directory on a cluster), a program compiled on a CPU with more
  instructions is rejected elsewhere and compiled again, and one compiled with fewer
  loads and runs slower, so each kind of machine (CPU model and flags) and each JAX
  build keeps its own subfolder.
  """
  import jaxlib  # pylint: disable=g-import-not-at-top
  cpu = _first_cpu(cpuinfo)
  described = '|'.join([platform.machine(), cpu.get('model name', platform.processor()),
                        cpu.get('flags', ''), jax.__version__, jaxlib.__version__])
  return f'{platform.machine()}-{hashlib.sha256(described.encode()).hexdigest()[:12]}'


def compilation_cache_dir(config=None) -> Optional[str]:
  """The folder `config.train` asks to cache compiled programs in; None = off.

  Args:
    config: a run config, or None (a tool with no config of its own): the default.

  Returns:
    train.compilation_cache_dir ('' meaning $XDG_CACHE_HOME/concepthash_jax/xla, i.e.
    ~/.cache/concepthash_jax/xla), in it this machine's subfolder (`host_key`); None
    when train.compilation_cache is False.
  """
  train = _train_section(config)
  if not train.get('compilation_cache', True):
    return None
  from concepthash_jax.data import cache  # pylint: disable=g-import-not-at-top
  folder = train.get('compilation_cache_dir', '')
  if not folder:
    folder = os.path.join(cache.default_dir(), 'xla')
  elif '://' not in folder:
    folder = os.path.expanduser(folder)
  return os.path.join(folder, host_key())


def _user_chose_cache() -> bool:
  """Whether the user set JAX's cache themselves (environment or jax.config)."""
  current = jax.config.jax_compilation_cache_dir
  return (any(name in os.environ for name in _USER_CACHE_ENV)
          or not jax.config.jax_enable_compilation_cache
          or bool(current and current != _configured_dir))


def configure_compilation_cache(config=None) -> Optional[str]:
  """Points JAX's persistent compilation cache at `config`'s folder; returns it.

  A user's own choice wins (JAX_COMPILATION_CACHE_DIR, JAX_ENABLE_COMPILATION_CACHE, or
  jax.config set before the call): then nothing changes and None is returned, as it is
  when train.compilation_cache is False. Safe after earlier compiles (the cache is
  reset, so the next compile uses the folder).

  Args:
    config: the run config, or None for the default folder.

  Returns:
    The folder in use, or None.

  Raises:
    errors.ConfigError: train.compilation_cache_dir was given and cannot be created or
      written. (The default folder that cannot be only logs a warning: the cache saves
      time, a run does not need it.)
  """
  global _configured_dir
  if _user_chose_cache():
    return None
  folder = compilation_cache_dir(config)
  # A remote folder (gs://..., what a multi-host pod shares, since only JAX's process 0
  # writes entries) is JAX's to reach; a local one is checked here, where a bad path
  # can still be named.
  if folder is not None and '://' not in folder:
    try:
      os.makedirs(folder, exist_ok=True)
      if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f'no write permission on {folder}')
    except OSError as e:
      explicit = _train_section(config).get('compilation_cache_dir', '')
      if explicit:
        raise errors.ConfigError(
            f'config.train.compilation_cache_dir={explicit!r} cannot hold the compilation '
            f'cache ({e}); give a writable folder, or turn the cache off with '
            '--config.train.compilation_cache=False.') from None
      logging.warning('No compilation cache (%s); every process compiles afresh.', e)
      folder = None
  if folder == _configured_dir:
    return folder
  jax.config.update('jax_compilation_cache_dir', folder)
  if folder is not None and jax.config.jax_compilation_cache_max_size == -1:
    jax.config.update('jax_compilation_cache_max_size', COMPILATION_CACHE_MAX_BYTES)
  jax_cache.reset_cache()  # A process that compiled already switches at its next compile.
  _configured_dir = folder
  if folder is not None:
    logging.info('Compilation cache: %s', folder)
  return folder
