"""XLA flags that `config.train` chooses, set before the first JAX computation.

XLA reads XLA_FLAGS once, when its first backend starts, so the command-line tools call
`configure_xla_flags(config)` first thing. All flags here are XLA:CPU's; GPU and TPU
compilers ignore them.
"""
import os

# XLA:CPU matrix-multiply library for `train.cpu_matmul`. XLA's default hands dots to
# YNNPACK; turning YNN fusions off sends them to Eigen. Side by side (BENCHMARKS.md
# "Matmul library"): on an Intel Xeon with AVX-512 (2 x 512-bit FMA, AMX), float32
# ran the ViT-B/32 train step 1.11x and the eval forward 1.20x faster on Eigen, while
# bfloat16 needs YNNPACK (its bf16 kernels; Eigen's bf16 eval forward was 2.1x
# slower); on an AMD Zen 4, YNNPACK already ran float32 at that CPU's peak. 'auto'
# follows those figures.
CPU_MATMUL = ('auto', 'ynnpack', 'eigen')
_CPU_MATMUL_FLAGS = {'ynnpack': {}, 'eigen': {'xla_cpu_experimental_ynn_fusion_type': ''}}


def resolve_cpu_matmul(choice: str, dtype: str = 'float32',
                       cpuinfo: str = '/proc/cpuinfo') -> str:
  """`train.cpu_matmul` with 'auto' resolved for this CPU and model.dtype."""
  if choice not in CPU_MATMUL:
    raise ValueError(f'Unknown train.cpu_matmul {choice!r}; valid: {", ".join(CPU_MATMUL)}.')
  if choice != 'auto':
    return choice
  if dtype != 'float32':
    return 'ynnpack'
  try:
    with open(cpuinfo) as f:
      text = f.read(1 << 16)  # The first processor's block is enough.
  except OSError:
    return 'ynnpack'  # Not Linux: keep XLA's default.
  flags_line = next((l for l in text.splitlines() if l.startswith('flags')), '')
  intel_avx512 = 'GenuineIntel' in text and 'avx512f' in flags_line.split()
  return 'eigen' if intel_avx512 else 'ynnpack'


def configure_xla_flags(config=None) -> str:
  """Adds the XLA flags `config.train` asks for to XLA_FLAGS; returns them.

  config None (tools that read a trained model rather than a config) takes the
  defaults of `configs/base.py`.

  Call it before any JAX computation. Flags the user already set in XLA_FLAGS win.
  (jax.jit's compiler_options accepts the scheduler flag but XLA:CPU does not read it
  from there: the step's memory is unchanged; hence the environment.)
  """
  if config is None:
    from concepthash_jax.configs import base  # pylint: disable=g-import-not-at-top
    config = base.get_config()
  wanted = {}
  if not config.train.cpu_concurrency_scheduler:
    wanted['xla_cpu_enable_concurrency_optimized_scheduler'] = 'false'
  wanted.update(_CPU_MATMUL_FLAGS[resolve_cpu_matmul(config.train.get('cpu_matmul', 'auto'),
                                                     config.model.dtype)])
  current = os.environ.get('XLA_FLAGS', '')
  added = [f'--{k}={v}' for k, v in wanted.items() if f'--{k}=' not in current]
  if added:
    os.environ['XLA_FLAGS'] = ' '.join([current, *added]).strip()
  return ' '.join(added)
