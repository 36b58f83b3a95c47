"""XLA:CPU settings that `config.train` chooses.

Two ways in. The scheduler flag goes through XLA_FLAGS, which XLA reads once, when its
first backend starts, so the command-line tools call `configure_xla_flags(config)` first
thing. The matmul library goes with each compile (`compiler_options`, which XLA:CPU
honours for it): the train step and the encode step carry their choice themselves, so a
run, a later `ConceptHasher` in another process and any user script compute the same
codes, whatever else the process did first.
"""
import functools
import os
from typing import Optional

import jax
import jax.numpy as jnp

# XLA:CPU matrix-multiply library for `train.cpu_matmul`. XLA's default hands dots to
# YNNPACK; turning YNN fusions off sends them to Eigen. Side by side (BENCHMARKS.md, "CPU
# train step and eval forward against the authors' step"): on an Intel Xeon with AVX-512 (2 x 512-bit FMA, AMX), float32
# ran the ViT-B/32 train step 1.11x and the eval forward 1.20x faster on Eigen, while
# bfloat16 needs YNNPACK (its bf16 kernels; Eigen's bf16 eval forward was 2.1x
# slower); on an AMD Zen 4, YNNPACK already ran float32 at that CPU's peak. 'auto'
# follows those figures.
CPU_MATMUL = ('auto', 'ynnpack', 'eigen')
# jax.jit compiler_options of each library.
CPU_MATMUL_OPTIONS = {'ynnpack': {}, 'eigen': {'xla_cpu_experimental_ynn_fusion_type': ''}}


def cpu_matmul_of(config) -> str:
  """A run's train.cpu_matmul; 'auto' for runs saved before the key existed."""
  return config.train.get('cpu_matmul', 'auto') if 'train' in config else 'auto'


@functools.lru_cache(maxsize=None)
def _intel_avx512(cpuinfo: str) -> bool:
  """Whether `cpuinfo` (/proc/cpuinfo) describes an Intel CPU with AVX-512F."""
  try:
    with open(cpuinfo) as f:
      text = f.read(1 << 16)  # The first processor's block is enough.
  except OSError:
    return False  # Not Linux: keep XLA's default.
  flags_line = next((l for l in text.splitlines() if l.startswith('flags')), '')
  return 'GenuineIntel' in text and 'avx512f' in flags_line.split()


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
