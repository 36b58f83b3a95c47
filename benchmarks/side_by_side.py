"""Ours against the authors' PyTorch step, on a CPU or one GPU.

  pip install -e . torch transformers    # one environment with both (benchmarks only)
  python -m benchmarks.side_by_side --device=cpu --rounds=6
  python -m benchmarks.side_by_side --device=cpu --isa=AVX2   # emulate an AVX2-only CPU
  python -m benchmarks.side_by_side --device=gpu --batches=256,32 --out=/tmp/gpu.jsonl

torch and transformers are not dependencies of this project.

--device=cpu: both steps live in one process and alternate step by step (round r times
ours train, theirs train, ours eval, theirs eval): timing the two frameworks in separate
processes minutes apart mixes the speed of the code with the speed of a shared box at
that moment. Each round gives a ratio from adjacent measurements; the table reports
medians and the ratio's range over rounds. `--isa=AVX2` caps both sides before either
starts: XLA with --xla_cpu_max_isa=AVX2, PyTorch with ATEN_CPU_CAPABILITY=avx2,
ONEDNN_MAX_CPU_ISA=AVX2 and MKL_ENABLE_INSTRUCTIONS=AVX2 (MKL runs PyTorch's fp32 matmuls
and ignores the oneDNN cap); label such figures emulated. The train step runs at
--batch, the eval forward at every batch in --eval_batches on both sides; when both
shipped eval batches are listed (the authors' loaders take 32, ours
data.eval_batch_size), a last row compares each side at its own batch in images per
second: what a user of either code base gets. Peak memory is not reported (one process
holds both); `python -m benchmarks.train_step` measures ours alone.

--device=gpu: every row runs in its own process, one after the other (a GPU's speed does
not drift the way a shared CPU's does, and each side gets the whole card and its own
peak-memory figure). The precisions are paired so that both sides do the same
arithmetic:
  float32       ours with jax_default_matmul_precision=highest; theirs as released
                (PyTorch's default: no TF32)
  float32/TF32  ours at XLA's default precision (float32 products may use TF32 on
                GPUs); theirs with allow_tf32 for matmuls and cuDNN
  bfloat16      ours with model.dtype=bfloat16; theirs under torch.autocast(bfloat16)
Each result is appended to --out as one JSON line when it is measured (a run cut short
keeps what it has); the table is printed at the end.
"""
import json
import os
import statistics
import subprocess

from absl import app
from absl import flags

from benchmarks import child
from benchmarks import table
# train_step defines --batch, --num_classes and --remat (used here for both sides); it
# imports jax without starting a backend, so the XLA_FLAGS set in main() still apply.
from benchmarks import train_step as ours_bench

FLAGS = flags.FLAGS
flags.DEFINE_enum('device', 'cpu', ['cpu', 'gpu'],
                  'Where both steps run (see the module docstring for how each is timed).')
# --device=cpu
flags.DEFINE_integer('rounds', 6, 'cpu: timed rounds (after one warm-up round).')
flags.DEFINE_enum('isa', 'native', ['native', 'AVX2'], 'cpu: instruction-set cap, both sides.')
flags.DEFINE_enum('ours_dtype', 'float32', ['float32', 'bfloat16'],
                  'cpu: ours\' config.model.dtype (the authors\' step stays float32).')
flags.DEFINE_list('eval_batches', ['32', '128'],
                  'cpu: batch sizes of the eval forward, each timed on both sides.')
# --device=gpu
flags.DEFINE_list('batches', ['256', '32'], 'gpu: global batch sizes, in the order run.')
flags.DEFINE_list('pairings', ['float32', 'float32/TF32', 'bfloat16'],
                  'gpu: precision pairings to run (see the module docstring).')
flags.DEFINE_integer('timed_steps', 30, 'gpu: timed train steps and eval forwards per row.')
flags.DEFINE_string('out', '', 'gpu: JSON-lines file the rows are appended to.')

# Environment each side reads once, when its library initialises.
ISA_ENV = {'AVX2': {'ATEN_CPU_CAPABILITY': 'avx2', 'ONEDNN_MAX_CPU_ISA': 'AVX2',
                    'MKL_ENABLE_INSTRUCTIONS': 'AVX2'}}
ISA_XLA_FLAG = {'AVX2': '--xla_cpu_max_isa=AVX2'}

# pairing -> (ours: config.model.dtype, jax_default_matmul_precision; theirs: --precision)
PAIRINGS = {
    'float32': (('float32', 'highest'), 'float32'),
    'float32/TF32': (('float32', 'default'), 'tf32'),
    'bfloat16': (('bfloat16', 'default'), 'bfloat16'),
}


def run_cpu() -> None:
  """Both sides interleaved in this process; prints the table of per-round ratios."""
  os.environ.update(ISA_ENV.get(FLAGS.isa, {}))
  if FLAGS.isa in ISA_XLA_FLAG:
    os.environ['XLA_FLAGS'] = ' '.join(
        [os.environ.get('XLA_FLAGS', ''), ISA_XLA_FLAG[FLAGS.isa]]).strip()
  # Imported here: torch is needed on this path only, after the ISA environment is set.
  from benchmarks import pytorch_reference_step as ref_bench  # pylint: disable=g-import-not-at-top
  from concepthash_jax import xla_flags  # pylint: disable=g-import-not-at-top
  from concepthash_jax.configs import cub  # pylint: disable=g-import-not-at-top
  xla_flags.configure_xla_flags(cub.get_config())

  eval_batches = [int(b) for b in FLAGS.eval_batches]
  steps, batches = {}, {}
  steps['ours train'], _, ours_info = ours_bench.build_ours(
      FLAGS.ours_dtype, FLAGS.batch, FLAGS.num_classes, FLAGS.remat)
  steps['theirs train'], _, info = ref_bench.build_reference(
      FLAGS.batch, FLAGS.num_classes, threads=os.cpu_count())
  batches['ours train'] = batches['theirs train'] = FLAGS.batch
  for b in eval_batches:
    steps[f'ours eval {b}'] = ours_info['eval_at'](b)
    steps[f'theirs eval {b}'] = info['eval_at'](b)
    batches[f'ours eval {b}'] = batches[f'theirs eval {b}'] = b
  times = ours_bench.interleave(steps, FLAGS.rounds)
  # Seconds per image, per round: sides at different batches compare per image.
  per_image = {k: [t / batches[k] for t in v] for k, v in times.items()}
  for r in range(FLAGS.rounds):
    print(f'round {r + 1}: ' + ', '.join(f'{k} {1 / per_image[k][r]:.2f}' for k in steps))

  print(f'\n{ours_bench.cpu_line()}\nISA: {FLAGS.isa}{" (emulated)" if FLAGS.isa != "native" else ""}, '
        f'ours {FLAGS.ours_dtype} / theirs float32, {FLAGS.rounds} interleaved rounds, '
        f'torch {info["torch"]} ({info["threads"]} threads), model.remat={FLAGS.remat}, '
        f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}\n')
  pairs = [('train', FLAGS.batch, 'ours train', 'theirs train')]
  pairs += [('eval', b, f'ours eval {b}', f'theirs eval {b}') for b in eval_batches]
  shipped = (cub.get_config().data.eval_batch_size, ref_bench.RELEASED_EVAL_BATCH)
  if shipped[0] != shipped[1] and set(shipped) <= set(eval_batches):
    pairs.append(('eval, each at its shipped batch', f'{shipped[0]} / {shipped[1]}',
                  f'ours eval {shipped[0]}', f'theirs eval {shipped[1]}'))
  rows = []
  for step, batch, ours, theirs in pairs:
    rows.append((step, batch, f'{statistics.median(1 / t for t in per_image[ours]):.2f}',
                 f'{statistics.median(1 / t for t in per_image[theirs]):.2f}',
                 *ours_bench.speed_up(per_image[theirs], per_image[ours])))
  table.print_table(['step', 'batch (ours / theirs)', 'ours img/s', "authors' PyTorch img/s",
                     'ratio (median)', 'ratio range'], rows)


def gpu_ours(dtype: str, precision: str, batch: int) -> dict:
  """One row of ours in its own process: the shipped step, random ViT-B/32."""
  return child.run_json(child.module_command(
      ours_bench.__name__, f'--child={dtype}', f'--batch={batch}',
      f'--steps={FLAGS.timed_steps}', f'--eval_steps={FLAGS.timed_steps}',
      f'--matmul_precision={precision}'))


def gpu_theirs(precision: str, batch: int) -> dict:
  """One row of the authors' step in its own process, on the first CUDA device."""
  # The authors' step prints bare JSON (its own command-line output), no prefix.
  return child.run_json(child.module_command(
      'benchmarks.pytorch_reference_step', '--device=cuda', f'--precision={precision}',
      f'--batch={batch}', '--warmup=5', f'--steps={FLAGS.timed_steps}',
      '--eval_warmup=3', f'--eval_steps={FLAGS.timed_steps}'), prefix='')


def gpu_name() -> str:
  """The GPU's name and driver version from nvidia-smi ('gpu' where it is missing)."""
  try:
    out = subprocess.run(['nvidia-smi', '--query-gpu=name,driver_version',
                          '--format=csv,noheader'], capture_output=True, text=True,
                         check=False)
  except FileNotFoundError:  # No NVIDIA driver tools.
    return 'gpu'
  return out.stdout.strip() or 'gpu'


def run_gpu() -> None:
  """Every (batch, pairing) row in child processes; prints the table."""
  unknown = set(FLAGS.pairings) - set(PAIRINGS)
  if unknown:
    raise app.UsageError(f'--pairings: unknown {sorted(unknown)}; valid: {list(PAIRINGS)}')
  rows = []
  for batch in (int(b) for b in FLAGS.batches):
    for pairing in FLAGS.pairings:
      (dtype, precision), their_precision = PAIRINGS[pairing]
      row = dict(batch=batch, pairing=pairing, ours=gpu_ours(dtype, precision, batch),
                 theirs=gpu_theirs(their_precision, batch))
      rows.append(row)
      if FLAGS.out:
        with open(FLAGS.out, 'a') as f:
          f.write(json.dumps(row) + '\n')
      print(f'batch {batch} {pairing}: ours train {row["ours"]["train_img_s"]:.0f}, '
            f'theirs train {row["theirs"]["train_img_s"]:.0f} img/s', flush=True)

  first = rows[0]
  print(f'\n{gpu_name()}; ours: jax {first["ours"].get("jax", "?")}, '
        f'{first["ours"]["backend"]} x{first["ours"]["devices"]}, model.remat=dots; '
        f'theirs: torch {first["theirs"]["torch"]}, transformers '
        f'{first["theirs"]["transformers"]}; {FLAGS.timed_steps} timed steps per row\n')
  cells = []
  for r in rows:
    o, t = r['ours'], r['theirs']
    cells.append((r['batch'], r['pairing'], f'{o["train_img_s"]:.0f}',
                  f'{t["train_img_s"]:.0f}', f'{o["train_img_s"] / t["train_img_s"]:.2f}',
                  f'{o["eval_img_s"]:.0f}', f'{t["eval_img_s"]:.0f}',
                  f'{o["eval_img_s"] / t["eval_img_s"]:.2f}',
                  f'{o["peak_device_gb"]:.2f} / {t["peak_device_gb"]:.2f}'))
  table.print_table(['batch', 'precision', 'ours train img/s', 'theirs train img/s',
                     'train ratio', 'ours eval img/s', 'theirs eval img/s', 'eval ratio',
                     'ours / theirs peak GPU GB'], cells)


def main(argv):
  del argv
  run_cpu() if FLAGS.device == 'cpu' else run_gpu()


if __name__ == '__main__':
  app.run(main)
