"""Ours against the authors' PyTorch step on one GPU: same batch, float32 and bfloat16.

  python benchmarks/gpu_side_by_side.py --batches=256,32 --out=/tmp/gpu.jsonl

Needs one environment with jax (CUDA), torch (CUDA) and transformers; torch is not a
dependency of this project (a GPU image usually has both). Every row runs in its own
process, one after the other (a GPU's speed does not drift the way a shared CPU's does,
and each side gets the whole card and its own peak-memory figure):
  ours    benchmarks/train_step.py --child=DTYPE (the shipped step, random ViT-B/32)
  theirs  benchmarks/pytorch_reference_step.py --device=cuda --precision=P

The precisions are paired so that both sides do the same arithmetic:
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
import subprocess
import sys

from absl import app
from absl import flags

import child  # benchmarks/child.py: run_json
import table  # benchmarks/table.py: print_table

HERE = os.path.dirname(os.path.abspath(__file__))

FLAGS = flags.FLAGS
flags.DEFINE_list('batches', ['256', '32'], 'Global batch sizes, in the order run.')
flags.DEFINE_list('pairings', ['float32', 'float32/TF32', 'bfloat16'],
                  'Precision pairings to run (see the module docstring).')
flags.DEFINE_integer('steps', 30, 'Timed train steps and eval forwards per row.')
flags.DEFINE_string('out', '', 'JSON-lines file the rows are appended to.')
flags.DEFINE_string('device', 'cuda', 'torch device of the authors\' step.')

# pairing -> (ours: config.model.dtype, jax_default_matmul_precision; theirs: --precision)
PAIRINGS = {
    'float32': (('float32', 'highest'), 'float32'),
    'float32/TF32': (('float32', 'default'), 'tf32'),
    'bfloat16': (('bfloat16', 'default'), 'bfloat16'),
}


def ours(dtype: str, precision: str, batch: int) -> dict:
  return child.run_json([sys.executable, os.path.join(HERE, 'train_step.py'),
                         f'--child={dtype}', f'--batch={batch}', f'--steps={FLAGS.steps}',
                         f'--eval_steps={FLAGS.steps}', f'--matmul_precision={precision}'])


def theirs(precision: str, batch: int) -> dict:
  # The authors' step prints bare JSON (its own command-line output), no prefix.
  return child.run_json([sys.executable, os.path.join(HERE, 'pytorch_reference_step.py'),
                         f'--device={FLAGS.device}', f'--precision={precision}',
                         f'--batch={batch}', '--warmup=5', f'--steps={FLAGS.steps}',
                         '--eval_warmup=3', f'--eval_steps={FLAGS.steps}'], prefix='')


def device_name() -> str:
  try:
    out = subprocess.run(['nvidia-smi', '--query-gpu=name,driver_version',
                          '--format=csv,noheader'], capture_output=True, text=True,
                         check=False)
  except FileNotFoundError:  # No NVIDIA driver tools (a CPU smoke run).
    return FLAGS.device
  return out.stdout.strip() or FLAGS.device


def main(argv):
  del argv
  unknown = set(FLAGS.pairings) - set(PAIRINGS)
  if unknown:
    raise app.UsageError(f'--pairings: unknown {sorted(unknown)}; valid: {list(PAIRINGS)}')
  rows = []
  for batch in (int(b) for b in FLAGS.batches):
    for pairing in FLAGS.pairings:
      (dtype, precision), their_precision = PAIRINGS[pairing]
      row = dict(batch=batch, pairing=pairing, ours=ours(dtype, precision, batch),
                 theirs=theirs(their_precision, batch))
      rows.append(row)
      if FLAGS.out:
        with open(FLAGS.out, 'a') as f:
          f.write(json.dumps(row) + '\n')
      print(f'batch {batch} {pairing}: ours train {row["ours"]["train_img_s"]:.0f}, '
            f'theirs train {row["theirs"]["train_img_s"]:.0f} img/s', flush=True)

  first = rows[0]
  print(f'\n{device_name()}; ours: jax {first["ours"].get("jax", "?")}, '
        f'{first["ours"]["backend"]} x{first["ours"]["devices"]}, model.remat=dots; '
        f'theirs: torch {first["theirs"]["torch"]}, transformers '
        f'{first["theirs"]["transformers"]}; {FLAGS.steps} timed steps per row\n')
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


if __name__ == '__main__':
  app.run(main)
